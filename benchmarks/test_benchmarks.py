"""The benchmark cases through pytest-benchmark: `pytest benchmarks/`
(`--benchmark-json out.json` works). Each op's first quick case, every
provider, with the device synchronised inside the timed call."""
import itertools

import pytest
import torch

from benchmarks import OPS
from benchmarks.harness import HAS_GPU

PROVIDERS = ["pyext-cuda", "pyext-triton", "torch", "torch.compile", "torch-forloop", "torch-foreach",
             "torch-fused"]


@pytest.fixture(scope="module")
def first_cases():
    dtype = torch.bfloat16 if HAS_GPU else torch.float32
    return {op: next(iter(make(True, [dtype]))) for op, make in OPS.items()}


@pytest.mark.parametrize("op,provider", list(itertools.product(OPS, PROVIDERS)))
def test_benchmark(benchmark, first_cases, op, provider):
    case = first_cases[op]
    fn = case.providers.get(provider)
    if fn is None:
        pytest.skip(f"{provider} is not a provider of {op}")
    if isinstance(fn, str):
        pytest.skip(fn)

    def run():
        fn()
        if HAS_GPU:
            torch.cuda.synchronize()

    benchmark.extra_info.update(op=op, label=case.label, direction=case.direction, bytes=case.bytes,
                                flops=case.flops)
    benchmark(run)
