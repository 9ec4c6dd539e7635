"""The benchmark cases through pytest-benchmark: `pytest benchmarks/`
(`--benchmark-json out.json` works). Each op's first quick case, every
provider it holds, with the device synchronised inside the timed call.
Without a GPU these are the smoke run's tiny CPU cases: timings that mean
nothing, which a warning of the run says."""
import warnings

import pytest
import torch

from benchmarks import COUNTS, OPS, PROVIDERS
from benchmarks.harness import HAS_GPU, OURS


@pytest.fixture(scope="module")
def first_cases():
    if not HAS_GPU:
        warnings.warn("NO GPU: the benchmarks ran tiny CPU cases; their timings mean nothing")
    return {op: next(iter(make(True, [torch.bfloat16, torch.float32])), None) for op, make in OPS.items()}


@pytest.mark.parametrize("op,provider", [(op, provider) for op in OPS for provider in PROVIDERS[op]])
def test_benchmark(benchmark, first_cases, op, provider):
    case = first_cases[op]
    if case is None:
        pytest.skip(f"{op} has no case here")
    fn = case.providers.get(provider)
    if fn is None:
        pytest.skip(f"{provider} is not a provider of {op}'s first case")
    if isinstance(fn, str):
        pytest.skip(fn)

    def run():
        fn()
        if HAS_GPU:
            torch.cuda.synchronize()
    if provider not in OURS:
        try:  # a peer that cannot run this case is skipped, saying why, as the suite records it
            run()
        except Exception as e:
            pytest.skip(f"{provider}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")

    benchmark.extra_info.update(op=op, label=case.label, dtype=case.dtype, direction=case.direction,
                                bytes=case.bytes, flops=case.flops, gpu=HAS_GPU)
    benchmark(run)


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "full"])
@pytest.mark.parametrize("op", list(OPS))
def test_count_is_the_number_of_cases_made(op, quick):
    """The progress bar's total: each op's count matches the cases it yields
    (made one at a time, as the suite makes them)."""
    for dtypes in ([torch.bfloat16, torch.float32], [torch.float16]):
        assert COUNTS[op](quick, dtypes) == sum(1 for _ in OPS[op](quick, dtypes)), dtypes


@pytest.mark.parametrize("op", list(OPS))
def test_providers_are_the_names_the_cases_hold(op):
    """PROVIDERS[op], which --skip-providers is checked against, names every
    provider of the op's cases, and no other."""
    held = {name for quick in (True, False) for dtypes in ([torch.bfloat16, torch.float32], [torch.float16])
            for case in OPS[op](quick, dtypes) for name in case.providers}
    assert held == set(PROVIDERS[op])
