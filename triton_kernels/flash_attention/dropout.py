"""The dropout mask the attention kernels draw, as a tensor: what the
reference needs to compute the same dropout (tests, the double backward)."""
import torch
import triton
import triton.language as tl

from .._utils import FMA, cdiv, on_device
from .tiles import _dropout_keep


@triton.jit
def _dropout_keep_kernel(seed_ptr, keep_ptr, seq_q, seq_k, keep, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    bh = tl.program_id(2).to(tl.int64)
    kept = _dropout_keep(seed_ptr, bh, offs_m, tl.program_id(1) * BLOCK_N, seq_k, keep, BLOCK_M, BLOCK_N)
    tl.store(keep_ptr + (bh * seq_q + offs_m[:, None]) * seq_k + offs_n[None, :], kept.to(tl.int8),
             mask=(offs_m[:, None] < seq_q) & (offs_n[None, :] < seq_k))


def dropout_keep_mask(seed, batch: int, heads_q: int, seq_q: int, seq_k: int, dropout_p: float):
    """The (B, Hq, Sq, Sk) bool mask of the P elements that the kernels keep
    under `seed`: what the reference needs to compute the same dropout (the
    tests, and the double backward)."""
    kept = torch.empty((batch, heads_q, seq_q, seq_k), dtype=torch.int8, device=seed.device)
    if kept.numel():
        grid = (cdiv(seq_q, 16), cdiv(seq_k, 16), batch * heads_q)
        with on_device(seed):
            _dropout_keep_kernel[grid](seed, kept, seq_q, seq_k, 1.0 - dropout_p, BLOCK_M=16, BLOCK_N=16,
                                       **FMA)
    return kept.bool()
