"""Helpers shared by the Triton kernels and their launch functions."""
import contextlib
import os
import struct

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice


def on_device(t: torch.Tensor):
    """Launch on t's GPU (Triton launches on the current device); no-op on CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# Every launch asks for fused multiply-adds (FMA contraction) by name: the kernels
# are written, tuned and tested with them, marking the products that must not fuse
# (`mul_rn`). Triton 3.6-3.9 fuse unless told otherwise; 3.10 turns that default off
# (3.9 warns of it at the first compile that does not say).
FMA = {"enable_fp_fusion": True}


# Host-side integer helpers for grids and block sizes: Triton 3.8 makes its
# own (triton.cdiv, triton.next_power_of_2) constexpr functions, about 2 us a
# call on the host, several per launch.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def float32_pair(value: float):
    """value as two fp32 values whose sum is value to double precision:
    Triton passes Python floats as fp32. In fp32 math the low part of a sum
    vanishes ((v + high) + low rounds to v + high); in fp64 the pair restores it."""
    high = struct.unpack("f", struct.pack("f", value))[0]
    return high, value - high


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
# Kernels narrow through `round_to` (outputs, and operands such as attention's
# P and dS before a product) so both round the same way: truncation is biased,
# and sums of truncated values drift.
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _round_bf16_by_hand(x):
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    rounded = bits.to(tl.float32, bitcast=True)
    return tl.where(x != x, x, rounded)


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """x converted to dtype, rounding to nearest even."""
    if _INTERPRETED and dtype == tl.bfloat16:
        return _round_bf16_by_hand(x.to(tl.float32)).to(dtype)
    return x.to(dtype)


@triton.jit
def dot(a, b):
    """tl.dot with fp32 accumulation. The interpreter (Triton 3.8) multiplies
    bfloat16 matrices wrongly, so there the operands go up to float32 first:
    exact, like the tensor cores' products of bf16 values."""
    if _INTERPRETED and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


@triton.jit
def tanh(u):
    """tanh(u) = 1 - 2 / (exp(2u) + 1), float32: exact limits +-1 as exp
    over/underflows, an absolute error of about 1e-7 (libdevice's tanh is
    not in the interpreter)."""
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def mul_rn(a, b):
    """a * b rounded to the compute type, never fused into a following add.
    A product used twice (summed, then subtracted from its own mean) must be
    the same value both times: with one row element, g - mean(g) is then 0
    exactly, where fma(dy, w, -mean) would leave g's rounding error times rstd."""
    if _INTERPRETED:
        return a * b
    return libdevice.mul_rn(a, b)


@triton.jit
def to_compute(x):
    """x in the type the kernels compute in: fp32 for fp32/fp16/bf16, fp64 for fp64.
    One return: the compiler types every return of a function alike, even one
    behind a compile-time condition."""
    return x.to(tl.float64 if x.dtype == tl.float64 else tl.float32)
