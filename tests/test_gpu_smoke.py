"""The first-call probes of .ci/gpu_smoke.py and what a failed probe does to
the tests (conftest.SMOKE_SCOPE): runnable without a GPU."""
import importlib.util
import os
import pathlib
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import HAS_GPU

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def gpu_smoke(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_smoke", ROOT / ".ci" / "gpu_smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "LIMIT", 5)
    return module


def test_a_probe_that_hangs_is_killed_and_says_how_far_it_got(gpu_smoke):
    outcome, detail, output = gpu_smoke.run("p", "import time\nprint('forward: ran', flush=True)\ntime.sleep(60)")
    assert outcome == "hung" and "killed after 5 s" in detail and output == "forward: ran\n"


def test_a_probe_that_crashes_gives_its_exit_status_and_last_line(gpu_smoke):
    outcome, detail, _ = gpu_smoke.run("p", "import sys\nsys.exit('illegal memory access')")
    assert outcome == "crashed" and "exit 1" in detail and "illegal memory access" in detail


def test_a_probe_that_returns_is_ok(gpu_smoke):
    assert gpu_smoke.run("p", "pass")[0] == "ok"


@pytest.mark.parametrize("file, params, failed, probe", [
    ("test_attention.py", {"backend": "cuda", "dtype": "bf16"}, {"cuda-attention-sm80"}, "cuda-attention-sm80"),
    ("test_attention.py", {"backend": "triton"}, {"cuda-attention-sm80"}, None),
    ("test_attention.py", {"backend": "cuda", "cuda_stage": "sm90"}, {"cuda-attention-sm90"}, "cuda-attention-sm90"),
    ("test_attention.py", {"backend": "cuda", "cuda_stage": "stage1"}, {"cuda-attention-sm90"}, None),
    ("test_adamw.py", {"backend": "cuda"}, {"cuda-attention-sm80"}, None),
    ("test_adamw.py", {"backend": "cuda"}, {"cuda-adamw"}, "cuda-adamw"),
    ("test_gelu.py", {"backend": "cuda"}, {"cuda-adamw", "cuda-attention-sm80"}, None),
    ("test_layer_norm.py", {"backend": "cuda", "kind": "rms_norm"}, {"cuda-layer-norm"}, "cuda-layer-norm"),
    ("test_layer_norm.py", {"backend": "triton"}, {"cuda-layer-norm"}, None),
    ("test_attention.py", {"backend": "cuda"}, set(), None),
])
def test_a_failed_probe_covers_its_kernels_tests_and_no_others(monkeypatch, file, params, failed, probe):
    import conftest
    monkeypatch.setattr(conftest, "SMOKE_FAILED", failed)
    item = SimpleNamespace(path=ROOT / "tests" / file, callspec=SimpleNamespace(params=params))
    assert conftest.smoke_failure(item) == probe


def test_every_probe_has_a_scope_in_conftest(gpu_smoke, monkeypatch):
    import conftest
    monkeypatch.setattr(gpu_smoke.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_smoke.torch.cuda, "get_device_capability", lambda: (9, 0))
    assert {name for name, _ in gpu_smoke.probes()} == set(conftest.SMOKE_SCOPE)


@pytest.mark.skipif(HAS_GPU, reason="on a GPU, make gpu-check runs the probes themselves")
def test_probe_code_runs_with_the_triton_kernels_on_cpu(gpu_smoke):
    """A mistake in a probe would mark a good kernel broken and skip its tests:
    each probe runs here with the CUDA ops swapped for the Triton ones (same
    signatures) on small CPU tensors, under the interpreter."""
    for name, code in gpu_smoke.probes():
        code = (code.replace('device="cuda"', 'device="cpu"').replace("_cuda(", "_triton(")
                .replace('backend="cuda"', 'backend="triton"').replace("torch.cuda.synchronize()", "pass")
                .replace("ProfilerActivity.CUDA", "ProfilerActivity.CPU")
                .replace("(2, 4, 300, d", "(1, 2, 40, d").replace("1 << 20", "1 << 10"))
        env = dict(os.environ, TRITON_INTERPRET="1")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, f"{name}: {r.stderr[-2000:]}"
        assert "ran" in r.stdout, r.stdout
