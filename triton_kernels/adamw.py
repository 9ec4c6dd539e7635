"""Fused AdamW in Triton: one launch steps every tensor of a (device, dtype) group.

The tensors are reached through tables of their addresses: program i finds
its tensor (block_tensor[i]) and its offset in it (block_start[i]), so tensors
of any sizes share one launch. Per element, in fp32 (the moments formed in
fp64 and rounded once; AdamW, Loshchilov & Hutter):

    g = grad / grad_scale, negated when maximizing      (grad = g, unscaled, as torch's fused AdamW leaves it)
    p = p * (1 - lr * weight_decay)                     (decoupled weight decay)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g^2
    v_max = max(v_max, v)                               (amsgrad only; v_max replaces v below)
    p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

Bytes per fp32 parameter: read p, g, m, v and write p, m, v: 28 (36 with
amsgrad), 4 more with a GradScaler's grad_scale (g written back).
"""
import collections
import math

import torch
import triton
import triton.language as tl

from ._utils import FMA, float32_pair, on_device, round_to

BLOCK = 1024


@triton.jit
def _adamw_kernel(p_tab, g_tab, m_tab, v_tab, vmax_tab, numel_tab, step_tab, block_tensor, block_start,
                  lr, lr_low, lr_ptr, grad_scale_ptr, found_inf_ptr, float64_args, eps,
                  P_DTYPE: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
                  LR_ON_DEVICE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                  BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    offs = tl.load(block_start + pid) + tl.arange(0, BLOCK).to(tl.int64)
    numel = tl.load(numel_tab + t)
    if HAS_FOUND_INF:  # GradScaler saw an inf or NaN: no element is read or written
        numel = tl.where(tl.load(found_inf_ptr) == 0.0, numel, 0)
    mask = offs < numel
    p_ptr = tl.load(p_tab + t).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(g_tab + t).to(tl.pointer_type(P_DTYPE))
    m_ptr = tl.load(m_tab + t).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(v_tab + t).to(tl.pointer_type(tl.float32))
    step = tl.load(step_tab + t)
    if LR_ON_DEVICE:
        lr = tl.load(lr_ptr)
        lr64 = tl.cast(lr, tl.float64)
    else:  # the host's lr to double precision: lr + lr_low (float32_pair)
        lr64 = tl.cast(lr, tl.float64) + tl.cast(lr_low, tl.float64)

    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    if HAS_GRAD_SCALE:
        g = g / tl.load(grad_scale_ptr)
        tl.store(g_ptr + offs, round_to(g, P_DTYPE), mask=mask)
    if MAXIMIZE:
        g = -g
    # 1 - lr * weight_decay in float64, rounded once (float64_args[2] is the
    # weight decay): in float32, 1 - 30 * 0.01 rounds to 0.70000005, one ulp
    # off, unless the compiler fuses it into an fma; every step multiplies p by it.
    p = p * (1.0 - lr64 * tl.load(float64_args + 2)).to(tl.float32)
    # The moments in float64, rounded once to float32 (float64_args[3:7]:
    # beta1, beta2, 1 - beta1, 1 - beta2): in float32 each is three or four
    # roundings (two with an fma the compiler may or may not form), where
    # torch's lerp_ and addcmul_ take two. g * g is exact in float64.
    g64 = g.to(tl.float64)
    m = (tl.load(float64_args + 3) * m.to(tl.float64) + tl.load(float64_args + 5) * g64).to(tl.float32)
    v = (tl.load(float64_args + 4) * v.to(tl.float64) + tl.load(float64_args + 6) * (g64 * g64)).to(tl.float32)
    # 1 - beta^t in float64: in float32, 1 - 0.999^2 = 0.001999 keeps about
    # four correct digits, which the update then carries.
    step64 = step.to(tl.float64)
    bias_correction1 = (1.0 - tl.exp2(step64 * tl.load(float64_args))).to(tl.float32)
    bias_correction2 = (1.0 - tl.exp2(step64 * tl.load(float64_args + 1))).to(tl.float32)
    if AMSGRAD:
        vmax_ptr = tl.load(vmax_tab + t).to(tl.pointer_type(tl.float32))
        vmax = tl.maximum(tl.load(vmax_ptr + offs, mask=mask, other=0.0), v)
        tl.store(vmax_ptr + offs, vmax, mask=mask)
        denom = tl.sqrt(vmax) / tl.sqrt(bias_correction2) + eps
    else:
        denom = tl.sqrt(v) / tl.sqrt(bias_correction2) + eps
    p = p - (lr / bias_correction1) * m / denom
    tl.store(p_ptr + offs, round_to(p, P_DTYPE), mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)


_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _log2(beta):
    return math.log2(beta) if beta > 0 else float("-inf")


_KEPT = 64  # device tables kept per cache, the most recently used


def _kept(cache: collections.OrderedDict, key, make):
    """cache[key], made by make() on first use: tables built on the host and
    copied once, so that a step captured in a CUDA graph (after a warm-up
    step) copies nothing from the host."""
    if key not in cache:
        cache[key] = make()
        if len(cache) > _KEPT:
            cache.popitem(last=False)
    cache.move_to_end(key)
    return cache[key]


def _to_device(host: torch.Tensor, device) -> torch.Tensor:
    """host copied to device; from pinned memory, so the host does not wait for the GPU."""
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


_BLOCKS = collections.OrderedDict()  # per-program tables by the tensors' sizes
_ADDRESSES = collections.OrderedDict()  # address tables by the tensors' addresses


def _block_tables(device, live, numels):
    """The live tensors' sizes and slots, and each program's tensor and offset
    in it. Built with tensor ops (GPT-2 small's 124M parameters are 121k
    programs) and kept by sizes, which stay the same from step to step."""
    def make():
        blocks = torch.tensor([triton.cdiv(n, BLOCK) for n in numels])
        block_tensor = torch.repeat_interleave(torch.arange(len(numels)), blocks)
        first_block = torch.cumsum(blocks, 0) - blocks
        block_start = (torch.arange(block_tensor.numel()) - first_block[block_tensor]) * BLOCK
        both = torch.cat([torch.tensor(numels), torch.tensor(live), block_tensor, block_start])
        return _to_device(both, device).split([len(live), len(live), block_tensor.numel(), block_tensor.numel()])
    return _kept(_BLOCKS, (device, tuple(live), tuple(numels)), make)


def _address_tables(device, live, *tensor_lists):
    """One table of the live tensors' addresses per list, kept by addresses:
    gradients set to None and made again each step may come back elsewhere."""
    addresses = tuple(tuple(tensors[i].data_ptr() for i in live) for tensors in tensor_lists)
    return _kept(_ADDRESSES, (device, addresses),
                 lambda: _to_device(torch.tensor(addresses, dtype=torch.int64), device).unbind(0))


_FLOAT64_ARGS = collections.OrderedDict()  # (device, beta1, beta2, weight_decay) -> float64 device tensor


def _float64_args(device, beta1, beta2, weight_decay):
    """[log2 beta1, log2 beta2, weight_decay, beta1, beta2, 1 - beta1,
    1 - beta2] in float64 on the device (Triton passes float arguments as
    float32: 0.999 would be 0.99900001, and 1 - it 1.3e-5 off; 1 - 0.9999,
    1.7e-4 off, an error of the second moment's every new term)."""
    def make():
        values = [_log2(beta1), _log2(beta2), weight_decay, beta1, beta2, 1.0 - beta1, 1.0 - beta2]
        return _to_device(torch.tensor(values, dtype=torch.float64), device)
    return _kept(_FLOAT64_ARGS, (device, beta1, beta2, weight_decay), make)


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, lr_tensor,
               beta1, beta2, eps, weight_decay, amsgrad, maximize, grad_scale, found_inf):
    """One AdamW step, in place, for tensors of one device and one dtype.

    steps: float32 tensor (len(params),) on the device, already incremented.
    lr_tensor: a 0-d device tensor read by the kernel (capturable), else lr.
    grad_scale: a 1-element device tensor the grads are divided by, or None;
    given, the grads are left divided by it.
    found_inf: a 1-element device tensor, or None: when it is not 0 the step
    changes nothing (GradScaler's skipped step, decided on the device).
    """
    live = [i for i, p in enumerate(params) if p.numel()]
    if not live:
        return
    numels = [params[i].numel() for i in live]
    device = params[0].device
    numel_tab, slots, block_tensor, block_start = _block_tables(device, live, numels)
    p_tab, g_tab, m_tab, v_tab, vmax_tab = _address_tables(
        device, live, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else exp_avgs)
    with on_device(params[0]):
        _adamw_kernel[(block_tensor.numel(),)](
            p_tab, g_tab, m_tab, v_tab, vmax_tab, numel_tab, steps.index_select(0, slots),
            block_tensor, block_start,
            *float32_pair(float(lr)),  # lr and the rest of it: float64 in the kernel, where it matters
            *(t if t is not None else steps for t in (lr_tensor, grad_scale, found_inf)),  # steps: unread
            _float64_args(device, beta1, beta2, weight_decay), eps,
            P_DTYPE=_TL_DTYPE[params[0].dtype], AMSGRAD=bool(amsgrad), MAXIMIZE=bool(maximize),
            LR_ON_DEVICE=lr_tensor is not None, HAS_GRAD_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None, BLOCK=BLOCK, **FMA)
