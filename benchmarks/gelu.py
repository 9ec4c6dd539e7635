"""GELU cases: forward reads x and writes y (2 elements), backward reads x and
dy and writes dx (3). Floor = those bytes over the measured copy bandwidth."""
import torch
import torch.nn.functional as F

import pyext
from benchmarks.harness import HAS_GPU, Case, Check, autograd_callable, oracle_of, our_backends

ELEMENTS_GPU = [1 << 22, 1 << 24, 1 << 26, 1 << 27]  # 1 << 26 fp32 = 256 MB
ELEMENTS_QUICK = [1 << 24, 1 << 26]
ELEMENTS_SMOKE = [1 << 12]
# the provider names its cases may hold (python -m benchmarks checks --skip-providers against them)
PROVIDERS = ("pyext-cuda", "pyext-triton", "torch", "torch.compile")


DIRECTIONS = (("fwd", 2), ("bwd", 3))  # with the tensors each moves


def _sizes(quick: bool):
    return (ELEMENTS_QUICK if quick else ELEMENTS_GPU) if HAS_GPU else ELEMENTS_SMOKE


def count(quick: bool, dtypes) -> int:
    return len(dtypes) * len(_sizes(quick)) * len(DIRECTIONS)


def cases(quick: bool, dtypes):
    device = "cuda" if HAS_GPU else "cpu"
    sizes = _sizes(quick)
    ours = our_backends()
    # static shapes, as the norms' peers (a shape compiled for at its first call; never dynamic ones)
    compiled = torch.compile(lambda t: F.gelu(t, approximate="tanh"), dynamic=False)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(sizes) * len(dtypes))
    fns = {
        "pyext-cuda": lambda t: pyext.gelu(t, "tanh", backend="cuda"),
        "pyext-triton": lambda t: pyext.gelu(t, "tanh", backend="triton"),
        "torch": lambda t: F.gelu(t, approximate="tanh"),
        "torch.compile": compiled,
    }
    for dtype in dtypes:
        for n in sizes:
            x = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
            dy = torch.randn_like(x)
            for direction, tensors in DIRECTIONS:
                providers = {name: ours.get(name) or autograd_callable(fn, [x], direction, dy)
                             for name, fn in fns.items()}
                yield Case(op="gelu", label=f"tanh n={n}", size=n, dtype=str(dtype).split(".")[1],
                           direction=direction, bytes=tensors * n * x.element_size(), flops=0,
                           providers=providers,
                           check=Check(oracle_of(fns["torch"], [x], direction, dy), yardsticks=("torch",)))
