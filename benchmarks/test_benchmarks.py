"""The benchmark cases through pytest-benchmark: `pytest benchmarks/`
(`--benchmark-json out.json` works). Each op's first quick case, every
provider, with the device synchronised inside the timed call."""
import itertools

import pytest
import torch

from benchmarks import COUNTS, OPS
from benchmarks.harness import HAS_GPU

PROVIDERS = ["pyext-cuda", "pyext-triton", "torch", "torch.compile", "sdpa-flash", "torch-fused"]


@pytest.fixture(scope="module")
def first_cases():
    return {op: next(iter(make(True, [torch.bfloat16, torch.float32])), None) for op, make in OPS.items()}


@pytest.mark.parametrize("op,provider", list(itertools.product(OPS, PROVIDERS)))
def test_benchmark(benchmark, first_cases, op, provider):
    case = first_cases[op]
    if case is None:
        pytest.skip(f"{op} has no case here")
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


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "full"])
@pytest.mark.parametrize("op", list(OPS))
def test_count_is_the_number_of_cases_made(op, quick):
    """The progress bar's total: each op's count matches the cases it yields
    (made one at a time, as the suite makes them)."""
    for dtypes in ([torch.bfloat16, torch.float32], [torch.float16]):
        assert COUNTS[op](quick, dtypes) == sum(1 for _ in OPS[op](quick, dtypes)), dtypes
