"""Backend selection: auto, named backends, set_backend, use_backend, PYEXT_BACKEND."""
import os
import subprocess
import sys

import pytest
import torch

import pyext
from conftest import HAS_GPU


def test_available_backends_lists_every_backend_with_a_reason():
    status = pyext.available_backends()
    assert set(status) == {"auto", "cuda", "triton", "torch"}
    assert status["torch"].available and status["auto"].available
    for name, (ok, reason) in status.items():
        assert isinstance(ok, bool) and reason, name
    if not HAS_GPU:
        assert not status["cuda"].available


def test_auto_on_cpu_tensors_uses_the_reference(monkeypatch):
    calls = []
    monkeypatch.setattr(pyext.reference, "gelu", lambda x, a: calls.append(a) or x)
    pyext.gelu(torch.randn(3), "tanh", backend="auto")
    assert calls == ["tanh"]


def test_set_backend_and_use_backend(restore_backend):
    pyext.set_backend("torch")
    assert pyext.get_backend() == "torch"
    with pyext.use_backend("triton"):
        assert pyext.get_backend() == "triton"
        with pytest.raises(pyext.BackendUnavailable):
            with pyext.use_backend("cuda"):
                pyext.gelu(torch.randn(2))
        assert pyext.get_backend() == "triton"
    assert pyext.get_backend() == "torch"
    with pytest.raises(ValueError, match="backend"):
        pyext.set_backend("fastest")


def test_per_call_backend_overrides_the_default(restore_backend):
    pyext.set_backend("cuda")
    pyext.gelu(torch.randn(2), backend="torch")  # no error: the call names torch


def test_environment_variable_sets_the_default():
    code = "import pyext; print(pyext.get_backend())"
    env = dict(os.environ, PYEXT_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "torch", out.stderr
    env["PYEXT_BACKEND"] = "bogus"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "backend" in out.stderr
