"""LayerNorm and RMSNorm cases: rows x hidden, forward, backward, and both.

Bytes (each tensor read once and written once; e = element size of x, e_w of
the weight, statistics fp32):
  forward   LayerNorm  read x, w, b; write y, mean, rstd:  2*M*N*e + 2*N*e_w + 8*M
            RMSNorm    read x, w;    write y, rstd:        2*M*N*e +   N*e_w + 4*M
  backward  LayerNorm  read x, dy, w, mean, rstd; write dx, dw, db:  3*M*N*e + 3*N*e_w + 8*M
            RMSNorm    read x, dy, w, rstd;       write dx, dw:      3*M*N*e + 2*N*e_w + 4*M
  fwd+bwd   the sum of the two.
Floor = bytes / measured copy bandwidth. The partial sums of dw/db that our
two-stage reduction writes and reads back are not counted: they are overhead.
Peers: torch eager, torch.compile, and Liger-Kernel's and Apex's fused norms
when those are installed.
"""
import torch
import torch.nn.functional as F

import pyext
from benchmarks.harness import (HAS_GPU, Case, Check, autograd_callable, grid_count, norm_grid, optional_peer,
                                oracle_of, our_backends)

GPT2 = (16 * 1024, 768)  # GPT-2 small's hidden size over 16 x 1024 tokens: the 16384-row sweep's first point
SHAPES_GPU = [GPT2] + [(rows, hidden) for rows in (4096, 16384) for hidden in (1024, 2048, 4096, 8192)]
SHAPES_QUICK = [GPT2, (4096, 1024), (16384, 8192)]
SHAPES_SMOKE = [(4, 256)]
EPS, RMS_EPS = 1e-5, 1e-6  # every provider's, given explicitly (RMSNorm's default differs by dtype and library)
# the provider names its cases may hold (python -m benchmarks checks --skip-providers against them)
PROVIDERS = ("pyext-cuda", "pyext-triton", "torch", "torch.compile", "liger", "apex")


def _bytes(rms: bool, rows: int, hidden: int, e: int, e_w: int, direction: str) -> int:
    fwd = 2 * rows * hidden * e + (1 if rms else 2) * hidden * e_w + (4 if rms else 8) * rows
    bwd = 3 * rows * hidden * e + (2 if rms else 3) * hidden * e_w + (4 if rms else 8) * rows
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]


def _label(rows: int, hidden: int) -> str:
    return "16x1024x768" if (rows, hidden) == GPT2 else f"{rows}x{hidden}"


def _plot_group(op: str, rows: int) -> str:
    """Plots draw GB/s against hidden size, one line per provider: the
    4096-row sweep gets plots of its own."""
    return f"{op}[4096 rows]" if rows == 4096 else op


def _grid(quick: bool):
    """(shapes, directions) of one norm's cases."""
    return norm_grid(quick, SHAPES_GPU, SHAPES_QUICK, SHAPES_SMOKE)


# Mamba's norms (HF's residual_in_fp32): float32 x through a bfloat16 weight,
# y in float32 as F.rms_norm promotes. The Triton kernels take the mix, the
# CUDA ones refuse it, and torch's CUDA rms_norm leaves its fused kernel for it.
NARROW_WEIGHT_SHAPES_GPU = [(16384, 4096), (16384, 8192)]


def _narrow_weight_grid(quick: bool, dtypes):
    """(shapes, directions) of the bf16-weight RMSNorm cases: with float32 x, so in a run that has float32."""
    if torch.float32 not in dtypes:
        return [], ()
    shapes, directions = _grid(quick)
    if HAS_GPU:
        shapes = NARROW_WEIGHT_SHAPES_GPU[:1] if quick else NARROW_WEIGHT_SHAPES_GPU
    return shapes, directions


def count(quick: bool, dtypes) -> int:
    return grid_count(_grid(quick), dtypes)


def rms_norm_count(quick: bool, dtypes) -> int:
    shapes, directions = _narrow_weight_grid(quick, dtypes)
    return count(quick, dtypes) + len(shapes) * len(directions)


def _cases(rms: bool, quick: bool, dtypes):
    op = "rms_norm" if rms else "layer_norm"
    device = "cuda" if HAS_GPU else "cpu"
    shapes, directions = _grid(quick)
    ours = our_backends()

    if rms:
        def torch_fn(x, w, b):
            return F.rms_norm(x, x.shape[-1:], w, RMS_EPS)

        def pyext_fn(backend):
            return lambda x, w, b: pyext.rms_norm(x, x.shape[-1:], w, RMS_EPS, backend=backend)
    else:
        def torch_fn(x, w, b):
            return F.layer_norm(x, x.shape[-1:], w, b, EPS)

        def pyext_fn(backend):
            return lambda x, w, b: pyext.layer_norm(x, x.shape[-1:], w, b, EPS, backend=backend)

    compiled = torch.compile(torch_fn, dynamic=False)
    fns = {
        "pyext-cuda": pyext_fn("cuda"),
        "pyext-triton": pyext_fn("triton"),
        "torch": torch_fn,
        "torch.compile": compiled,
        "liger": _liger(rms),
        "apex": _apex(rms),
    }
    grid = [(dtype, dtype, op, rows, hidden, fns) for dtype in dtypes for rows, hidden in shapes]
    if rms:
        narrow = dict(fns, **{"pyext-cuda": "the CUDA kernels take no weight narrower than x"})
        grid += [(torch.float32, torch.bfloat16, "rms_norm[bf16 weight]", rows, hidden, narrow)
                 for rows, hidden in _narrow_weight_grid(quick, dtypes)[0]]
    # Static shapes, as a training run has: one graph per shape and dtypes (compiled at the first call).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(grid))
    for dtype, w_dtype, group, rows, hidden, case_fns in grid:
        x = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(hidden, device=device, dtype=w_dtype, requires_grad=True)
        b = None if rms else torch.randn(hidden, device=device, dtype=dtype, requires_grad=True)
        inputs = [x, w, b]
        dy = torch.randn_like(x)
        for direction in directions:
            providers = {name: ours.get(name) or (fn if isinstance(fn, str) else
                                                  autograd_callable(fn, inputs, direction, dy))
                         for name, fn in case_fns.items()}
            yield Case(op=_plot_group(group, rows), label=_label(rows, hidden), size=hidden,
                       dtype=str(dtype).split(".")[1],
                       direction=direction,
                       bytes=_bytes(rms, rows, hidden, x.element_size(), w.element_size(), direction),
                       flops=0, providers=providers,
                       check=Check(oracle_of(torch_fn, inputs, direction, dy), yardsticks=("torch",)))


def _liger(rms: bool):
    """Liger-Kernel's Triton norm, when installed, or why it is skipped."""
    name = "liger_kernel.ops.rms_norm" if rms else "liger_kernel.ops.layer_norm"
    ops = optional_peer(name)
    if isinstance(ops, str):
        return ops
    if rms:  # offset 0, Llama's casting, and not in place (its default writes dx into dy, every provider's)
        return lambda x, w, b: ops.LigerRMSNormFunction.apply(x, w, RMS_EPS, 0.0, "llama", False)
    return lambda x, w, b: ops.LigerLayerNormFunction.apply(x, w, b, EPS)


def _apex(rms: bool):
    """Apex's fused CUDA norm, when installed, or why it is skipped."""
    apex = optional_peer("apex.normalization.fused_layer_norm")
    if isinstance(apex, str):
        return apex
    if rms:
        return lambda x, w, b: apex.fused_rms_norm_affine(x, w, x.shape[-1:], RMS_EPS)
    return lambda x, w, b: apex.fused_layer_norm_affine(x, w, b, x.shape[-1:], EPS)


def layer_norm_cases(quick: bool, dtypes):
    return _cases(False, quick, dtypes)


def rms_norm_cases(quick: bool, dtypes):
    return _cases(True, quick, dtypes)
