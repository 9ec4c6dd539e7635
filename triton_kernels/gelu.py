"""GELU forward and backward in Triton.

Bytes: forward reads x and writes y (2 elements each), backward reads x and
dy and writes dx (3): memory bound, one flat pass over contiguous data.

  exact:  y = x * Phi(x),  Phi(x) = (1 + erf(x / sqrt 2)) / 2
          dy/dx = Phi(x) + x * exp(-x^2 / 2) / sqrt(2 pi)
  tanh:   u = sqrt(2/pi) (x + 0.044715 x^3),  y = x (1 + tanh u) / 2
          dy/dx = (1 + tanh u) / 2 + x (1 - tanh^2 u) / 2 * sqrt(2/pi) (1 + 3 * 0.044715 x^2)
"""
import torch
import triton
import triton.language as tl

from ._utils import FMA, cdiv, on_device, poisonable_out, round_to, tanh, to_compute

BLOCK = 4096  # elements per program: 16 per thread at 8 warps
NUM_WARPS = 8

# Constants, written out where used (Triton kernels read no Python floats):
# 1/sqrt(2) = 0.7071067811865476, 1/sqrt(2 pi) = 0.3989422804014327,
# sqrt(2/pi) = 0.7978845608028654, and the tanh form's cubic coefficient 0.044715.


@triton.jit
def _gelu(x, TANH: tl.constexpr):
    if TANH:
        return 0.5 * x * (1.0 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _gelu_grad(x, TANH: tl.constexpr):
    if TANH:
        x2 = x * x
        t = tanh(0.7978845608028654 * (x + 0.044715 * x2 * x))
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x2)
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
    cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
    return cdf + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)


@triton.jit
def gelu_fwd_kernel(x_ptr, y_ptr, n, TANH: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = to_compute(tl.load(x_ptr + offs, mask=mask))
    tl.store(y_ptr + offs, round_to(_gelu(x, TANH), y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gelu_bwd_kernel(dy_ptr, x_ptr, dx_ptr, n, TANH: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = to_compute(tl.load(x_ptr + offs, mask=mask))
    dy = to_compute(tl.load(dy_ptr + offs, mask=mask))
    tl.store(dx_ptr + offs, round_to(dy * _gelu_grad(x, TANH), dx_ptr.dtype.element_ty), mask=mask)


def gelu_fwd(x: torch.Tensor, approximate: str, out=None) -> torch.Tensor:
    x = x.contiguous()
    y = poisonable_out(out, x)
    n = x.numel()
    if n:
        with on_device(x):
            gelu_fwd_kernel[(cdiv(n, BLOCK),)](
                x, y, n, TANH=approximate == "tanh", BLOCK=BLOCK, num_warps=NUM_WARPS, **FMA)
    return y


def gelu_bwd(dy: torch.Tensor, x: torch.Tensor, approximate: str, out=None) -> torch.Tensor:
    x, dy = x.contiguous(), dy.contiguous()
    dx = poisonable_out(out, x)
    n = x.numel()
    if n:
        with on_device(x):
            gelu_bwd_kernel[(cdiv(n, BLOCK),)](
                dy, x, dx, n, TANH=approximate == "tanh", BLOCK=BLOCK, num_warps=NUM_WARPS, **FMA)
    return dx
