"""Gated RMSNorm cases: rows x hidden, forward, backward, and both.

Rows of a head's values (Qwen3-Next's linear attention: 32 value heads of
128 per token), of Mamba 2's inner widths (4096; 5120, whose 8192 tile
the backward holds with registers spilled), and rows of 16384, past the
rows held whole (the chunked kernels). Bytes, e the
element size of x and gate, the weight e_w, rstd fp32:
  forward   read x, gate, w; write y, rstd:                  3*M*N*e +   N*e_w + 4*M
  backward  read x, gate, dy, w, rstd; write dx, dgate, dw:  5*M*N*e + 2*N*e_w + 4*M
  fwd+bwd   the sum of the two.
Floor = bytes / measured copy bandwidth (dw's partial sums not counted).
Peers: the models' own code (Qwen3-Next's Qwen3NextRMSNormGated, eager)
and torch.compile of it. (FLA's fused gated norm is the natural third; it
is not among the peer wheels the GPU machine has.)
"""
import torch

import pyext
from pyext import reference
from benchmarks.harness import HAS_GPU, Case, Check, autograd_callable, grid_count, norm_grid, oracle_of, our_backends

HEADS_ROWS = (16384 * 32, 128)  # 16k tokens x 32 value heads of 128 (Qwen3-Next)
SHAPES_GPU = [HEADS_ROWS, (4096 * 32, 128), (16384, 4096), (4096, 4096), (8192, 5120), (4096, 16384)]
SHAPES_QUICK = [HEADS_ROWS, (16384, 4096)]
SHAPES_SMOKE = [(4, 128)]
# the provider names its cases may hold (python -m benchmarks checks --skip-providers against them)
PROVIDERS = ("pyext-cuda", "pyext-triton", "torch", "torch.compile")


def _bytes(rows: int, hidden: int, e: int, e_w: int, direction: str) -> int:
    fwd = 3 * rows * hidden * e + hidden * e_w + 4 * rows
    bwd = 5 * rows * hidden * e + 2 * hidden * e_w + 4 * rows
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]


def _grid(quick: bool):
    return norm_grid(quick, SHAPES_GPU, SHAPES_QUICK, SHAPES_SMOKE)


def count(quick: bool, dtypes) -> int:
    return grid_count(_grid(quick), dtypes)


def models_code(x, gate, weight, eps=1e-6):
    """Qwen3-Next's gated norm as transformers writes it (Qwen3NextRMSNormGated.forward)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = weight * h.to(x.dtype)
    return (h * torch.nn.functional.silu(gate.float())).to(x.dtype)


def cases(quick: bool, dtypes):
    device = "cuda" if HAS_GPU else "cpu"
    shapes, directions = _grid(quick)
    ours = our_backends()
    fns = {
        "pyext-cuda": "pyext has no CUDA kernels for rms_norm_gated",
        "pyext-triton": lambda x, gate, weight: pyext.rms_norm_gated(x, gate, weight, 1e-6, backend="triton"),
        "torch": models_code,
        "torch.compile": torch.compile(models_code, dynamic=False),
    }
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                               2 * len(shapes) * len(dtypes))
    for dtype in dtypes:
        for rows, hidden in shapes:
            x = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)
            gate = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)
            weight = torch.randn(hidden, device=device, dtype=dtype, requires_grad=True)
            dy = torch.randn_like(x)
            for direction in directions:
                providers = {name: fn if isinstance(fn, str) else
                             ours.get(name) or autograd_callable(fn, [x, gate, weight], direction, dy)
                             for name, fn in fns.items()}
                yield Case(op="rms_norm_gated", label=f"{rows}x{hidden}", size=hidden,
                           dtype=str(dtype).split(".")[1], direction=direction,
                           bytes=_bytes(rows, hidden, x.element_size(), weight.element_size(), direction),
                           flops=0, providers=providers,
                           check=Check(oracle_of(lambda x, gate, w: reference.rms_norm_gated(x, gate, w, 1e-6),
                                                 [x, gate, weight], direction, dy), yardsticks=("torch",)))
