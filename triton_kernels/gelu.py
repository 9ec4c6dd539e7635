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

from ._utils import on_device, poisonable_out, to_compute, to_out

SQRT1_2 = 0.7071067811865476
INV_SQRT_2PI = 0.3989422804014327
SQRT_2_OVER_PI = 0.7978845608028654
TANH_COEFF = 0.044715

BLOCK = 4096  # elements per program: 16 per thread at 8 warps
NUM_WARPS = 8


@triton.jit
def _tanh(u):
    # tanh(u) = 1 - 2 / (exp(2u) + 1): exact limits +-1 as exp over/underflows.
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def gelu_fwd_kernel(x_ptr, y_ptr, n, TANH: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = to_compute(tl.load(x_ptr + offs, mask=mask))
    if TANH:
        y = 0.5 * x * (1.0 + _tanh(SQRT_2_OVER_PI * (x + TANH_COEFF * x * x * x)))
    else:
        y = 0.5 * x * (1.0 + tl.math.erf(x * SQRT1_2))
    tl.store(y_ptr + offs, to_out(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gelu_bwd_kernel(dy_ptr, x_ptr, dx_ptr, n, TANH: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = to_compute(tl.load(x_ptr + offs, mask=mask))
    dy = to_compute(tl.load(dy_ptr + offs, mask=mask))
    if TANH:
        x2 = x * x
        t = _tanh(SQRT_2_OVER_PI * (x + TANH_COEFF * x2 * x))
        du = SQRT_2_OVER_PI * (1.0 + 3.0 * TANH_COEFF * x2)
        grad = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(x * SQRT1_2))
        grad = cdf + x * INV_SQRT_2PI * tl.exp(-0.5 * x * x)
    tl.store(dx_ptr + offs, to_out(dy * grad, dx_ptr.dtype.element_ty), mask=mask)


def gelu_fwd(x: torch.Tensor, approximate: str, out=None) -> torch.Tensor:
    x = x.contiguous()
    y = poisonable_out(out, x)
    n = x.numel()
    if n:
        with on_device(x):
            gelu_fwd_kernel[(triton.cdiv(n, BLOCK),)](
                x, y, n, TANH=approximate == "tanh", BLOCK=BLOCK, num_warps=NUM_WARPS)
    return y


def gelu_bwd(dy: torch.Tensor, x: torch.Tensor, approximate: str, out=None) -> torch.Tensor:
    x, dy = x.contiguous(), dy.contiguous()
    dx = poisonable_out(out, x)
    n = x.numel()
    if n:
        with on_device(x):
            gelu_bwd_kernel[(triton.cdiv(n, BLOCK),)](
                dy, x, dx, n, TANH=approximate == "tanh", BLOCK=BLOCK, num_warps=NUM_WARPS)
    return dx
