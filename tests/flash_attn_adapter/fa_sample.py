"""pytest plugin for run.sh: FA_SAMPLE=N keeps one in N of each test
function's parameter combinations, chosen by a hash of the combination, so
the same ones every run. FlashAttention's file parametrizes about 508,000
tests, which pytest takes over a minute only to collect; the sample is drawn
from the product of a function's parametrize lists before pytest makes any
of them, so collecting the rest is quick."""
import itertools
import os
import zlib

import pytest


def _combinations(marks):
    """Argument names and every combination of values of these parametrize
    marks (each a plain list of values, one tuple a value for several names)."""
    names, axes = [], []
    for mark in marks:
        argnames = mark.args[0]
        argnames = [a.strip() for a in argnames.split(",")] if isinstance(argnames, str) else list(argnames)
        names += argnames
        axes.append([tuple(v) if len(argnames) > 1 else (v,) for v in mark.args[1]])
    return names, [sum(c, ()) for c in itertools.product(*axes)]


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc):
    n = int(os.environ.get("FA_SAMPLE", "1"))
    marks = [m for m in metafunc.definition.own_markers if m.name == "parametrize"]
    if n <= 1 or not marks or len(marks) != len(list(metafunc.definition.iter_markers("parametrize"))) \
            or any(m.kwargs or len(m.args) != 2 for m in marks):
        return  # pytest parametrizes it in full
    names, combinations = _combinations(marks)
    kept = [c for c in combinations if zlib.crc32(repr(c).encode()) % n == 0]
    metafunc.definition.own_markers = [m for m in metafunc.definition.own_markers if m.name != "parametrize"]
    if kept:
        metafunc.parametrize(names, kept)
    else:
        metafunc.parametrize(names, [pytest.param(*combinations[0], marks=pytest.mark.skip(f"FA_SAMPLE={n}"))])
