"""Copied beside FlashAttention's test file by run.sh: deselects the cases
pyext does not support (dropout, softcap, ALiBi, a local window, head dims
that are not a multiple of 8; they would only skip) and keeps every
$FA_SAMPLE-th of the rest, in collection order. $FA_FAKE_CAPABILITY=9.0
makes collection work without a GPU (the file asks for the capability at
import), to count cases."""
import os

import pytest
import torch

if os.environ.get("FA_FAKE_CAPABILITY"):
    _capability = tuple(int(x) for x in os.environ["FA_FAKE_CAPABILITY"].split("."))
    torch.cuda.get_device_capability = lambda device=None: _capability

UNSUPPORTED = {
    "dropout_p": lambda p: p > 0,
    "softcap": lambda c: c > 0,
    "alibi": bool,
    "local": bool,
    "d": lambda d: d % 8 != 0,
}


def pytest_collection_modifyitems(config, items):
    sample = int(os.environ.get("FA_SAMPLE", "1"))
    kept, dropped = [], []
    for item in items:
        params = item.callspec.params if hasattr(item, "callspec") else {}
        if any(name in params and bad(params[name]) for name, bad in UNSUPPORTED.items()):
            dropped.append(item)
        else:
            kept.append(item)
    chosen = kept[::sample]
    dropped += [item for i, item in enumerate(kept) if i % sample]
    config.hook.pytest_deselected(items=dropped)
    items[:] = chosen
    print(f"\nfa_adapter: {len(kept)} supported cases of {len(kept) + len(dropped)}; running every {sample}-th: "
          f"{len(chosen)}")
