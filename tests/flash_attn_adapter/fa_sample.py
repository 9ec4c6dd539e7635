"""pytest plugin for run.sh: FA_SAMPLE=N keeps one of every N of the tests
collected (chosen by a hash of each test's id, so the same ones every run);
FlashAttention's file has tens of thousands."""
import os
import zlib


def pytest_collection_modifyitems(config, items):
    n = int(os.environ.get("FA_SAMPLE", "1"))
    if n <= 1:
        return
    keep = [zlib.crc32(item.nodeid.encode()) % n == 0 for item in items]
    config.hook.pytest_deselected(items=[item for item, k in zip(items, keep) if not k])
    items[:] = [item for item, k in zip(items, keep) if k]
