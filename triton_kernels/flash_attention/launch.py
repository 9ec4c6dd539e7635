"""Host side the attention passes share: autotune configs and keys, the
arguments of a launch, and an attention mask's view and block bounds."""
import os
from typing import NamedTuple

import torch
import triton

from .._utils import next_power_of_2

LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs(kind):
    """Block sizes to try on a GPU; one small fixed shape under the interpreter.
    "fwd_tma" (the descriptor forward) also says whether its key loop is warp
    specialised; it and "bwd_tma" (the descriptor backward: the pointer
    backward's shapes and one more) set each config's descriptor boxes
    before a launch."""
    if _INTERPRET:
        shapes = [(16, 16, 1, 1, False)]
    elif kind == "fwd":
        shapes = [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 32, 4, 2)]
    elif kind == "fwd_tma":  # (BLOCK_M, BLOCK_N, warps, stages, warp-specialised)
        # Warp specialisation (the key loop split into a TMA producer partition
        # and the consumer's math) only with 4 warps and 64 rows: with 8 warps
        # Triton 3.6 and 3.8 leave the loop unspecialised, and with 128 rows on
        # 4 warps their Hopper pass fails to compile (NVGPUWarpSpecialization).
        shapes = [(128, 64, 8, 3, False), (128, 128, 8, 2, False), (64, 64, 4, 3, False), (128, 32, 4, 4, False),
                  (64, 64, 4, 3, True), (64, 128, 4, 2, True), (64, 32, 4, 4, True)]
    else:  # the 8-warp tiles: at d128 ptxas spills nothing in 64 x 64 and 32 x 64 on 8 warps, 40-1748 B a
        # thread on 4 (sm_90); at d256 every tile spills 8 B-5 KB but 32 x 32 on 8 warps
        shapes = [(64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2), (32, 32, 4, 1), (64, 64, 8, 2),
                  (32, 64, 8, 2), (32, 32, 8, 2)]
        if kind == "bwd_tma":  # FlashAttention-2's d128 backward tile, 128 keys by 64 queries on 8 warps: with
            # the addresses off the registers ptxas spills 28 B a thread in it at d128 (92 with atomic dQ), none
            # at d64 or in the dQ kernel (sm_90)
            shapes.append((64, 128, 8, 2))
    if kind == "fwd_tma":
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "WARP_SPECIALIZE": ws}, num_warps=w, num_stages=s,
                              pre_hook=_set_boxes) for m, n, w, s, ws in shapes]
    hook = _set_boxes if kind == "bwd_tma" else None
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s, pre_hook=hook)
            for m, n, w, s, *_ in shapes]


# Each descriptor argument's box [1, 1, rows, columns]: rows of a query block (BLOCK_M) or
# of a key block (BLOCK_N); columns over the query/key head dim (BLOCK_D) or the value one (BLOCK_DV).
_BOXES = {"q_desc": ("BLOCK_M", "BLOCK_D"), "out_desc": ("BLOCK_M", "BLOCK_DV"), "dout_desc": ("BLOCK_M", "BLOCK_DV"),
          "dq_desc": ("BLOCK_M", "BLOCK_D"), "k_desc": ("BLOCK_N", "BLOCK_D"), "v_desc": ("BLOCK_N", "BLOCK_DV"),
          "dk_desc": ("BLOCK_N", "BLOCK_D"), "dv_desc": ("BLOCK_N", "BLOCK_DV")}


def _set_boxes(nargs):
    """Sets the boxes of the descriptors among a launch's arguments for the config about to run."""
    for name, (rows, columns) in _BOXES.items():
        if name in nargs:
            nargs[name].block_shape = [1, 1, nargs[rows], nargs[columns]]


def _seq_bucket(n):
    """Autotune key: sequence lengths rounded up to a power of two."""
    return next_power_of_2(max(int(n), 1))


def _tuning_key(buckets, *tensors):
    """What an attention launch's autotune key holds besides the constexprs
    it passes (chosen_configs.ChosenConfigs): the sequence buckets, and the
    dtypes of its inputs (None for one not given)."""
    return buckets, tuple(None if t is None else t.dtype for t in tensors)


def _unit_last_stride(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def empty_out(q, v_dim):
    """An empty out, (B, Hq, Sq, v_dim), in q's memory order (see the package
    docstring): q's own layout when the head dims agree."""
    if v_dim == q.shape[3]:
        return torch.empty_like(q)
    order = sorted(range(3), key=lambda i: q.stride(i), reverse=True)  # outermost dim first
    out = q.new_empty([q.shape[i] for i in order] + [v_dim])
    return out.permute(*sorted(range(3), key=order.index), 3)


def _block_d(head_dim):
    return max(16, next_power_of_2(head_dim))


# Dropout's Philox counter, m * ceil(Sk / 4) + n / 4, is an int32: Sq * Sk below this keeps it so.
MAX_DROPOUT_SCORES = 2 ** 31


def _mask_view(mask, shape, device):
    """(tensor, its four strides, MASK) of an attention mask as the kernels
    read it: broadcast to `shape` (B, Hq, Sq, Sk) without a copy (stride 0
    along broadcast dims), booleans as bytes; MASK 0 none, 1 boolean, 2 additive."""
    if mask is None:
        return None, (0, 0, 0, 0), 0
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(f"attention mask: expected bool or floating dtype, got {mask.dtype}")
    if mask.device != device:
        raise ValueError(f"attention mask: on {mask.device}, the inputs on {device}")
    mask = torch.broadcast_to(mask, shape)
    kind = 1 if mask.dtype == torch.bool else 2
    return (mask.view(torch.int8) if kind == 1 else mask), tuple(mask.stride()), kind


def _window_bounds(window, q, k):
    """(left, right) of a local window (None: none), keys the kernels compare
    with i + causal_offset; -1 (unbounded), or a bound past every key, as
    Sq + Sk (int32 arithmetic in the kernels)."""
    if window is None:
        return 0, 0
    unbounded = q.shape[2] + k.shape[2]
    return tuple(unbounded if w < 0 else min(w, unbounded) for w in window)


def _logit_scales(scale, softcap):
    """(qk_scale, cap_log2e) of the kernels' logits (tiles._soft_capped):
    (scale * log2(e), unused) without a soft cap, (scale / c, c * log2(e))
    with one, c = softcap > 0."""
    if softcap > 0:
        return scale / softcap, softcap * LOG2E
    return scale * LOG2E, 0.0


class Packed(NamedTuple):
    """A packed batch (varlen.py): sequence b is rows cu_seqlens_q[b] ..
    cu_seqlens_q[b + 1] - 1 of the queries (of the keys: cu_seqlens_k), none
    longer than max_seqlen_q (max_seqlen_k). The kernels take its q, k, v as
    (B, H, total, D) views whose batch stride is 0: each batch entry starts at
    its sequence's first row."""
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


def _cu_seqlens(packed):
    """The kernels' cu_seqlens_q, cu_seqlens_k arguments: None for a dense batch."""
    return (None, None) if packed is None else (packed.cu_seqlens_q, packed.cu_seqlens_k)


def _prepare(q, k, v, causal, dropout_p, mask, softcap, packed=None):
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    batch, heads_q, seq_q, head_dim = q.shape
    heads_k, seq_k, v_dim = k.shape[1], k.shape[2], v.shape[3]
    longest = (packed.max_seqlen_q, packed.max_seqlen_k) if packed else (seq_q, seq_k)
    if dropout_p > 0 and longest[0] * longest[1] >= MAX_DROPOUT_SCORES:
        raise ValueError(f"dropout needs Sq * Sk below 2^31, got {longest[0]} * {longest[1]}")
    mask, mask_strides, mask_kind = _mask_view(mask, (batch, heads_q, seq_q, seq_k), q.device)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2))
    sizes = (seq_q, seq_k, heads_q, heads_q // heads_k if heads_k else 1)  # no heads: nothing launches
    meta = dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), V_DIM=v_dim, BLOCK_DV=_block_d(v_dim),
                CAUSAL=bool(causal), DROPOUT=dropout_p > 0, MASK=mask_kind, SOFTCAP=softcap > 0,
                VARLEN=packed is not None)
    buckets = tuple(_seq_bucket(n) for n in longest)
    return q, k, v, mask, strides + sizes + mask_strides, sizes, meta, buckets
