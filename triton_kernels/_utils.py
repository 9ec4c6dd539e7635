"""Helpers shared by the Triton kernels and their launch functions."""
import contextlib
import os

import torch
import triton
import triton.language as tl


def on_device(t: torch.Tensor):
    """Launch on t's GPU (Triton launches on the current device); no-op on CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def poisonable_out(out, like: torch.Tensor) -> torch.Tensor:
    """`out` if given (tests pass a NaN-filled one), else a new contiguous tensor."""
    if out is None:
        return torch.empty_like(like, memory_format=torch.contiguous_format)
    if out.shape != like.shape or out.dtype != like.dtype or not out.is_contiguous():
        raise ValueError(f"out must be contiguous {like.dtype} of shape {tuple(like.shape)}, "
                         f"got {out.dtype} {tuple(out.shape)}")
    return out


# Triton's interpreter (TRITON_INTERPRET=1, how CI runs the kernels on CPU)
# converts float32 to bfloat16 by truncation; the GPU rounds to nearest even.
# Kernels store through `to_out` so both round the same way.
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _round_bf16_by_hand(x):
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    rounded = bits.to(tl.float32, bitcast=True)
    return tl.where(x != x, x, rounded)


@triton.jit
def to_out(x, dtype: tl.constexpr):
    """x converted to the output dtype, rounding to nearest even."""
    if _INTERPRETED and dtype == tl.bfloat16:
        return _round_bf16_by_hand(x.to(tl.float32)).to(dtype)
    return x.to(dtype)
