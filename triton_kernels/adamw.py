"""Fused AdamW step in Triton: every tensor of a group in one grouped launch.

The update (Loshchilov & Hutter, decoupled weight decay; torch.optim.AdamW's
bias corrections), per element, in fp32 whatever the parameter dtype:

    g     = grad / grad_scale                       (GradScaler; the unscaled g is stored back)
    g     = -g                                      (maximize)
    p     = p * (1 - lr * weight_decay)             (decoupled weight decay: not in m or v)
    m     = beta1 * m + (1 - beta1) * g             (first moment)
    v     = beta2 * v + (1 - beta2) * g^2           (second moment)
    vmax  = max(vmax, v)                            (amsgrad: normalise by vmax instead of v)
    p     = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

Bytes per fp32 parameter: read p, g, m, v and write p, m, v = 7 * 4 = 28
(amsgrad: + 8 for vmax; bf16/fp16 params: 2 * 2 + 5 * 4 = 24).

Launch layout: a pointer table holds, per tensor, the addresses of p, g, m, v
and vmax, its size and its first block; a block table maps each program to
its tensor. One program updates BLOCK elements of one tensor, so a single
launch covers any number of tensors of one dtype on one device.
"""
import collections

import torch
import triton
import triton.language as tl

from ._utils import on_device, to_out

BLOCK = 4096  # elements per program: 16 per thread at 8 warps
NUM_WARPS = 8

# Pointer table columns (int64), one row per tensor, padded to ROW.
P, G, M, V, VMAX, NUMEL, FIRST_BLOCK = (tl.constexpr(i) for i in range(7))
ROW = tl.constexpr(8)


@triton.jit
def _update(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, mask, beta1, beta2, eps, decay, step_size,
            bias_correction2_sqrt, grad_scale, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
            UNSCALE: tl.constexpr):
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask)
    v = tl.load(v_ptr + offs, mask=mask)
    if UNSCALE:
        g = tl.div_rn(g, grad_scale)
        tl.store(g_ptr + offs, to_out(g, g_ptr.dtype.element_ty), mask=mask)
    if MAXIMIZE:
        g = -g
    p = p * decay
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    if AMSGRAD:
        v_hat = tl.maximum(tl.load(vmax_ptr + offs, mask=mask), v, propagate_nan=tl.PropagateNan.ALL)
        tl.store(vmax_ptr + offs, v_hat, mask=mask)
    else:
        v_hat = v
    denom = tl.div_rn(tl.sqrt_rn(v_hat), bias_correction2_sqrt) + eps
    p = p - step_size * tl.div_rn(m, denom)
    tl.store(p_ptr + offs, to_out(p, p_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)


@triton.jit
def adamw_kernel(tensor_table, block_table, bias_corrections, lr, lr_ptr, beta1, beta2, eps,
                 weight_decay, grad_scale_ptr, found_inf_ptr, PARAM_DTYPE: tl.constexpr,
                 AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, LR_ON_DEVICE: tl.constexpr,
                 UNSCALE: tl.constexpr, SKIP_ON_INF: tl.constexpr, ALIGNED: tl.constexpr,
                 BLOCK: tl.constexpr):
    if SKIP_ON_INF:
        if tl.load(found_inf_ptr) != 0:  # GradScaler saw inf/NaN: this step is skipped
            return
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(block_table + pid).to(tl.int64)
    row = tensor_table + t * ROW
    numel = tl.load(row + NUMEL)
    start = (pid - tl.load(row + FIRST_BLOCK)) * BLOCK
    p_ptr = tl.load(row + P).to(tl.pointer_type(PARAM_DTYPE))
    g_ptr = tl.load(row + G).to(tl.pointer_type(PARAM_DTYPE))
    m_ptr = tl.load(row + M).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(row + V).to(tl.pointer_type(tl.float32))
    vmax_ptr = tl.load(row + VMAX).to(tl.pointer_type(tl.float32))
    if ALIGNED:  # every address of the launch is 16-byte aligned (checked on the host)
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        vmax_ptr = tl.multiple_of(vmax_ptr, 16)
    if LR_ON_DEVICE:
        lr = tl.load(lr_ptr).to(tl.float32)
    # 1 - beta1^t and sqrt(1 - beta2^t) of this tensor's own step count t
    bias_correction1 = tl.load(bias_corrections + 2 * t)
    bias_correction2_sqrt = tl.load(bias_corrections + 2 * t + 1)
    grad_scale = 1.0
    if UNSCALE:
        grad_scale = tl.load(grad_scale_ptr)
    decay = 1.0 - lr * weight_decay
    step_size = tl.div_rn(lr, bias_correction1)
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= numel:  # a full block: no mask, so the accesses vectorise
        _update(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, None, beta1, beta2, eps, decay, step_size,
                bias_correction2_sqrt, grad_scale, AMSGRAD, MAXIMIZE, UNSCALE)
    else:
        _update(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, offs < numel, beta1, beta2, eps, decay,
                step_size, bias_correction2_sqrt, grad_scale, AMSGRAD, MAXIMIZE, UNSCALE)


_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


class _Tables:
    """Device copies of the pointer and block tables of one list of tensors.

    Built once per distinct set of addresses and sizes and reused while they
    stay the same (the usual case from one step to the next); never modified.
    A table that a CUDA graph reads is kept for the life of the process. One
    built during a capture is filled only when the graph replays (its copy
    from pinned host memory is part of the graph), so eager steps never use it.
    """

    def __init__(self, capacity=8):
        self.recent = collections.OrderedDict()  # eager tables, least recently used first
        self.kept_for_graphs = {}  # id -> table, never freed
        self.capacity = capacity

    @staticmethod
    def _build(device, rows, blocks_per_tensor):
        tensor_table = torch.tensor(rows, dtype=torch.int64)
        block_table = torch.repeat_interleave(torch.arange(len(rows), dtype=torch.int32),
                                              torch.tensor(blocks_per_tensor))
        if device.type != "cuda":
            return tensor_table, block_table
        host = (tensor_table.pin_memory(), block_table.pin_memory())
        return host + tuple(t.to(device, non_blocking=True) for t in host)

    def get(self, device, rows, blocks_per_tensor):
        """(tensor_table, block_table) on `device`."""
        key = (device, tuple(map(tuple, rows)))
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        entry = self.recent.get(key)
        if entry is None:
            entry = self._build(device, rows, blocks_per_tensor)
            if not capturing:
                self.recent[key] = entry
                if len(self.recent) > self.capacity:
                    self.recent.popitem(last=False)
        else:
            self.recent.move_to_end(key)
        if capturing:
            self.kept_for_graphs[id(entry)] = entry
        return entry[-2:]


_tables = _Tables()


def _aligned(*addresses):
    return all(a % 16 == 0 for a in addresses)


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, lr_tensor,
               beta1, beta2, weight_decay, eps, amsgrad, maximize, grad_scale, found_inf):
    """One AdamW step over lists of tensors on one device, params of one dtype.

    params/grads: float32, float16 or bfloat16; moments float32; each tensor's
    p, g, m, v (and vmax) share one non-overlapping dense layout (checked by
    the caller, pyext.ops.adamw). state_steps: per-tensor step counts on the
    device, already counting this step. lr_tensor (device, 1 element)
    overrides `lr` when given.
    grad_scale / found_inf: GradScaler's float32 scale and inf flag, or None.
    """
    live = [i for i, p in enumerate(params) if p.numel()]
    if not live:
        return
    device = params[0].device
    rows, blocks_per_tensor, addresses = [], [], []
    first_block = 0
    for i in live:
        vmax = max_exp_avg_sqs[i].data_ptr() if amsgrad else 0
        ptrs = [params[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(),
                exp_avg_sqs[i].data_ptr(), vmax]
        n_blocks = triton.cdiv(params[i].numel(), BLOCK)
        rows.append(ptrs + [params[i].numel(), first_block, 0])
        blocks_per_tensor.append(n_blocks)
        addresses += ptrs
        first_block += n_blocks
    tensor_table, block_table = _tables.get(device, rows, blocks_per_tensor)

    # Per-tensor 1 - beta^t from the device step counts, in float64 (Triton
    # has no portable float64 pow), by a few device-side torch ops: no host
    # sync, capturable.
    t = torch.stack([state_steps[i] for i in live]).to(torch.float64)
    bias_corrections = torch.stack([1 - beta1 ** t, (1 - beta2 ** t).sqrt()], dim=1).to(torch.float32)
    unused = tensor_table
    with on_device(params[0]):
        adamw_kernel[(first_block,)](
            tensor_table, block_table, bias_corrections, lr,
            lr_tensor if lr_tensor is not None else unused, beta1, beta2, eps, weight_decay,
            grad_scale if grad_scale is not None else unused,
            found_inf if found_inf is not None else unused,
            PARAM_DTYPE=_TL_DTYPE[params[0].dtype], AMSGRAD=amsgrad, MAXIMIZE=maximize,
            LR_ON_DEVICE=lr_tensor is not None, UNSCALE=grad_scale is not None, SKIP_ON_INF=found_inf is not None,
            ALIGNED=_aligned(*addresses), BLOCK=BLOCK, num_warps=NUM_WARPS)
