"""Norms over groups of a row (pyext.layer_norm / rms_norm with group_size):
forward, backward, and both.

Cohere's per-head QK norm (Command R+: 96 query heads of 128, a LayerNorm
over each head with a weight of (heads, 128), no bias) and Qwen4-Exp's
hyper-connection norm (an RMSNorm over each of a token's 4 streams of its
width). Bytes, M rows of N = G groups, e the element size of x, e_w the
weight's, statistics fp32 per group:
  forward   LayerNorm  read x, w; write y, mean, rstd:  2*M*N*e + N*e_w + 8*M*G
            RMSNorm    read x, w; write y, rstd:        2*M*N*e + N*e_w + 4*M*G
  backward  read x, dy, w, the statistics; write dx, dw:  3*M*N*e + 2*N*e_w + the statistics
  fwd+bwd   the sum of the two.
Floor = bytes / measured copy bandwidth (dw's partial sums not counted).
Peers: the models' own code (eager; float32 math, one rounding) and
torch.compile of it. Liger's and Apex's norms take no weight per group.
"""
import torch

import pyext
from pyext import reference
from benchmarks.harness import HAS_GPU, Case, Check, autograd_callable, grid_count, norm_grid, oracle_of, our_backends

# (kind, rows, groups, group size): Command R+'s query and key norms over
# 8192 tokens, 4 streams of 4096
SHAPES_GPU = [("layer_norm", 8192, 96, 128), ("layer_norm", 8192, 8, 128), ("rms_norm", 4096, 4, 4096)]
SHAPES_QUICK = SHAPES_GPU[:1] + SHAPES_GPU[2:]
SHAPES_SMOKE = [("layer_norm", 4, 2, 64), ("rms_norm", 4, 2, 64)]
EPS = 1e-5
# the provider names its cases may hold (python -m benchmarks checks --skip-providers against them)
PROVIDERS = ("pyext-cuda", "pyext-triton", "torch", "torch.compile")


def _bytes(rms: bool, rows: int, n: int, groups: int, e: int, e_w: int, direction: str) -> int:
    stats = (4 if rms else 8) * rows * groups
    fwd = 2 * rows * n * e + n * e_w + stats
    bwd = 3 * rows * n * e + 2 * n * e_w + stats
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]


def _grid(quick: bool):
    return norm_grid(quick, SHAPES_GPU, SHAPES_QUICK, SHAPES_SMOKE)


def count(quick: bool, dtypes) -> int:
    return grid_count(_grid(quick), dtypes)


def cohere_qk_norm(x, weight):
    """Cohere's CohereLayerNorm over the last dim of x (tokens, heads, head_dim), as transformers writes it."""
    h = x.float()
    mean = h.mean(-1, keepdim=True)
    h = (h - mean) * torch.rsqrt((h - mean).pow(2).mean(-1, keepdim=True) + EPS)
    return (weight.float() * h).to(x.dtype)


def streams_rms_norm(x, weight):
    """Qwen4-Exp's norm over groups of x (tokens, streams, width) (Qwen4ExpTextRMSNorm, its weight plain)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    return (h * weight.float()).to(x.dtype)


def _oracle(rms: bool):
    """The norm over each group of the last dim, by pyext's reference (the oracle in float64)."""
    if rms:
        return lambda x, w: reference.grouped_rms_norm(x, x.shape[1:], w, EPS, x.shape[-1])
    return lambda x, w: reference.grouped_layer_norm(x, x.shape[1:], w, None, EPS, x.shape[-1])


def cases(quick: bool, dtypes):
    device = "cuda" if HAS_GPU else "cpu"
    shapes, directions = _grid(quick)
    ours = our_backends()
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(shapes) * len(dtypes))
    for dtype in dtypes:
        for kind, rows, groups, size in shapes:
            rms = kind == "rms_norm"
            models_code = streams_rms_norm if rms else cohere_qk_norm
            norm = getattr(pyext, kind)
            fns = {
                "pyext-cuda": "pyext has no CUDA kernels for norms over groups",
                "pyext-triton": lambda x, w, norm=norm: norm(x, x.shape[1:], w, eps=EPS, group_size=x.shape[-1],
                                                             backend="triton"),
                "torch": models_code,
                "torch.compile": torch.compile(models_code, dynamic=False),
            }
            x = torch.randn(rows, groups, size, device=device, dtype=dtype, requires_grad=True)
            weight = torch.randn(groups, size, device=device, dtype=dtype, requires_grad=True)
            dy = torch.randn_like(x)
            for direction in directions:
                providers = {name: fn if isinstance(fn, str) else
                             ours.get(name) or autograd_callable(fn, [x, weight], direction, dy)
                             for name, fn in fns.items()}
                yield Case(op=f"{kind}[groups]", label=f"{rows}x{groups}x{size}", size=groups * size,
                           dtype=str(dtype).split(".")[1], direction=direction,
                           bytes=_bytes(rms, rows, groups * size, groups, x.element_size(), weight.element_size(),
                                        direction),
                           flops=0, providers=providers,
                           check=Check(oracle_of(_oracle(rms), [x, weight], direction, dy), yardsticks=("torch",)))
