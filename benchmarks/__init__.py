"""`python -m benchmarks`: every op of pyext against its peers, in one run.

Each op has a module here with a `cases(quick, dtypes)` generator of
harness.Case and a `count(quick, dtypes)` of how many it makes (for the
progress bar; the cases hold GPU tensors, so they are made one at a time);
OPS lists them in the order they run, COUNTS their counts, PROVIDERS the
provider names each module's cases may hold.
"""
import os

import torch

if not torch.cuda.is_available():
    # No GPU: the smoke run takes Triton through its CPU interpreter, which
    # must be chosen before any kernel is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks import adamw, attention, gelu, grouped_norm, layer_norm, rms_norm_gated, train_step  # noqa: E402

OPS = {
    "gelu": gelu.cases,
    "layer_norm": layer_norm.layer_norm_cases,
    "rms_norm": layer_norm.rms_norm_cases,
    "rms_norm_gated": rms_norm_gated.cases,
    "grouped_norm": grouped_norm.cases,
    "attention": attention.cases,
    "adamw": adamw.cases,
    "train_step": train_step.cases,
}
PROVIDERS = {
    "gelu": gelu.PROVIDERS,
    "layer_norm": layer_norm.PROVIDERS,
    "rms_norm": layer_norm.PROVIDERS,
    "rms_norm_gated": rms_norm_gated.PROVIDERS,
    "grouped_norm": grouped_norm.PROVIDERS,
    "attention": attention.PROVIDERS,
    "adamw": adamw.PROVIDERS,
    "train_step": train_step.PROVIDERS,
}
COUNTS = {
    "gelu": gelu.count,
    "layer_norm": layer_norm.count,
    "rms_norm": layer_norm.rms_norm_count,
    "rms_norm_gated": rms_norm_gated.count,
    "grouped_norm": grouped_norm.count,
    "attention": attention.count,
    "adamw": adamw.count,
    "train_step": train_step.count,
}
