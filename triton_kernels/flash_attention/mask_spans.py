"""Block bounds of a boolean attention mask, from its (B, Hq, Sq, Sk) int8
view (None for no mask or an additive one): the kernels visit only the key
blocks between a query block's first and last attended keys (row_spans), and
the query blocks between a key block's first and last attending rows
(col_spans). So a causal mask given as a mask (HF's decoders with padding)
costs a causal attention's work, a sliding window (Mistral's, Gemma's local
layers, gpt-oss's) S x W rather than S^2 / 2, and padding keys, left or
right, none. Each is computed on the mask's own extent (broadcast dims taken
once), int32 contiguous, the pair interleaved (start, end), and only by the
launches that read it.

Bytes: one read of the mask's own extent per bound asked for, B H Sq Sk
(268 MB for one 16384 x 16384 mask), and B H S * 8 written; the reduction in
registers, no atomics, so the same bounds every run. (torch's argmax on the
mask and on its reversal, before, read it four times and copied it once.)
"""
import torch
import triton
import triton.language as tl

from .._utils import FMA, cdiv, on_device
from .launch import _INTERPRET


@triton.jit
def _mask_spans_kernel(mask, spans, stride_b, stride_h, stride_keep, stride_red, heads, n_keep, n_red,
                       BLOCK_KEEP: tl.constexpr, BLOCK_RED: tl.constexpr):
    """spans[b, h, i] = (first r with mask[b, h, i, r] != 0, one past the
    last) for BLOCK_KEEP indices i along the kept axis, r along the reduced
    one, in chunks of BLOCK_RED; (n_red, 0) where none."""
    bh, block = tl.program_id(0), tl.program_id(1)
    keep = block * BLOCK_KEEP + tl.arange(0, BLOCK_KEEP)
    rows = mask + (bh // heads).to(tl.int64) * stride_b + (bh % heads).to(tl.int64) * stride_h + \
        keep[:, None].to(tl.int64) * stride_keep
    first = tl.full([BLOCK_KEEP], n_red, tl.int32)
    end = tl.zeros([BLOCK_KEEP], tl.int32)
    for start in range(0, n_red, BLOCK_RED):
        red = start + tl.arange(0, BLOCK_RED)
        inside = (keep[:, None] < n_keep) & (red[None, :] < n_red)
        hit = tl.load(rows + red[None, :].to(tl.int64) * stride_red, mask=inside, other=0) != 0
        first = tl.minimum(first, tl.min(tl.where(hit, red[None, :], n_red), axis=1))
        end = tl.maximum(end, tl.max(tl.where(hit, red[None, :] + 1, 0), axis=1))
    out = spans + (bh.to(tl.int64) * n_keep + keep) * 2
    tl.store(out, first, mask=keep < n_keep)
    tl.store(out + 1, end, mask=keep < n_keep)


def _spans(mask, dim: int, length: int) -> torch.Tensor:
    """(B, H, n, 2) int32 bounds along `dim` (-1: each row's keys; -2: each
    key's rows) of `mask`, int8 (B, H, Sq, Sk) over its own extent (size 1
    along a dim it is broadcast over), n its size along the other dim.
    `length` is the mask's full size along `dim`: where the mask is one entry
    wide there (the same for every index), a hit spans (0, length)."""
    batch, heads = mask.shape[:2]
    keep_dim = -2 if dim == -1 else -1
    n_keep, n_red = mask.shape[keep_dim], mask.shape[dim]
    spans = torch.empty(batch, heads, n_keep, 2, dtype=torch.int32, device=mask.device)
    # 64 x 128 mask bytes a step on 8 warps: on 4, ptxas spills 700-930 B a thread (sm_90; 8 warps: 0 B
    # under Triton 3.8, 24 B under 3.6)
    block_keep, block_red = (16, 16) if _INTERPRET else (64, 128)
    grid = (batch * heads, cdiv(n_keep, block_keep))
    with on_device(mask):
        _mask_spans_kernel[grid](mask, spans, mask.stride(0), mask.stride(1), mask.stride(keep_dim),
                                 mask.stride(dim), heads, n_keep, n_red, BLOCK_KEEP=block_keep, BLOCK_RED=block_red,
                                 num_warps=8, **FMA)
    if n_red == 1 < length:  # (0, 1) or (1, 0): every index along dim alike
        hit = spans[..., 1:] > 0
        spans = torch.where(hit, spans.new_tensor([0, length]), spans.new_tensor([length, 0]))
    return spans


def _own_extent(mask):
    """The (B, Hq, Sq, Sk) int8 view over its own extent: broadcast (stride 0) dims of size 1."""
    return mask[tuple(slice(0, 1) if st == 0 else slice(None) for st in mask.stride())]


def row_spans(mask):
    """Each query row's first attended key and one past its last, (B, Hq, Sq, 2); (Sk, 0) where none."""
    if mask is None or mask.dtype != torch.int8:
        return None
    batch, heads, seq_q, seq_k = mask.shape
    return _spans(_own_extent(mask), -1, seq_k).expand(batch, heads, seq_q, 2).contiguous()


def col_spans(mask):
    """Each key's first attending query row and one past its last, (B, Hq, Sk, 2); (Sq, 0) where none."""
    if mask is None or mask.dtype != torch.int8:
        return None
    batch, heads, seq_q, seq_k = mask.shape
    return _spans(_own_extent(mask), -2, seq_q).expand(batch, heads, seq_k, 2).contiguous()
