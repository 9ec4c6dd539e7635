"""`python -m benchmarks`: every op of pyext against its peers, in one run.

Each op has a module here with a `cases(quick, dtypes)` generator of
harness.Case; OPS lists them in the order they run.
"""
import os

import torch

if not torch.cuda.is_available():
    # No GPU: the smoke run takes Triton through its CPU interpreter, which
    # must be chosen before any kernel is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks import adamw, gelu  # noqa: E402

OPS = {
    "gelu": gelu.cases,
    "adamw": adamw.cases,
}
