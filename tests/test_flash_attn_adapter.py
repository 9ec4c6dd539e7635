"""tests/flash_attn_adapter: FlashAttention's API on pyext, through which
FlashAttention's own test file runs against ours on a GPU (run.sh). Here,
on small shapes: each entry point gives what pyext gives on the same data in
FlashAttention's layout, and what pyext lacks skips rather than fails."""
import importlib
import os
import subprocess
import sys

import pytest
import torch

import pyext
from conftest import device_for

ADAPTER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flash_attn_adapter")


@pytest.fixture
def fa(monkeypatch):
    """The adapter's flash_attn, imported for this test only (a benchmark peer
    named flash_attn must not find it afterwards)."""
    monkeypatch.setenv("PYEXT_FA_BACKEND", "triton")
    monkeypatch.syspath_prepend(ADAPTER)
    for name in [m for m in sys.modules if m.split(".")[0] == "flash_attn"]:
        monkeypatch.delitem(sys.modules, name)
    module = importlib.import_module("flash_attn")
    yield module
    for name in [m for m in sys.modules if m.split(".")[0] == "flash_attn"]:
        del sys.modules[name]


def _qkv(device, b=2, sq=33, sk=40, h=4, hk=2, d=32):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(b, s, n, d, generator=gen).to(device, torch.bfloat16) for s, n in ((sq, h), (sk, hk), (sk, hk))]


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_func_is_pyext_in_flash_attentions_layout(fa, causal):
    q, k, v = _qkv(device_for("triton"))
    out, lse, probs = fa.flash_attn_func(q, k, v, causal=causal, window_size=torch.tensor([7, 3]), softcap=20.0,
                                         return_attn_probs=True)
    ref, ref_lse = pyext.flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                                         window_size=(7, 3), softcap=20.0, return_lse=True, backend="triton")
    assert out.shape == q.shape and probs is None
    assert torch.equal(out, ref.transpose(1, 2)) and torch.equal(lse, ref_lse)
    kv = torch.stack([k, v], dim=2)
    assert torch.equal(fa.flash_attn_kvpacked_func(q, kv, causal=causal, window_size=(7, 3), softcap=20.0), out)


def test_packed_calls_match_the_padded_batch(fa):
    from flash_attn.bert_padding import pad_input, unpad_input
    q, k, v = _qkv(device_for("triton"), sq=40, hk=4)
    mask = torch.arange(40, device=q.device) < torch.tensor([[40], [23]], device=q.device)
    (q_un, idx, cu, longest, used), (k_un, *_), (v_un, *_) = (unpad_input(t, mask) for t in (q, k, v))
    assert cu.tolist() == [0, 40, 63] and longest == 40 and used.tolist() == [40, 23]
    out = pad_input(fa.flash_attn_varlen_func(q_un, k_un, v_un, cu, cu, longest, longest, causal=True), idx, 2, 40)
    for b, n in enumerate((40, 23)):
        one = fa.flash_attn_func(q[b:b + 1, :n], k[b:b + 1, :n], v[b:b + 1, :n], causal=True)
        assert torch.equal(out[b:b + 1, :n], one)
    assert not out[1, 23:].any()
    qkv = torch.stack([q_un, k_un, v_un], dim=1)
    assert torch.equal(fa.flash_attn_varlen_qkvpacked_func(qkv, cu, longest, causal=True),
                       fa.flash_attn_varlen_func(q_un, k_un, v_un, cu, cu, longest, longest, causal=True))


@pytest.mark.parametrize("call", ["alibi", "dropout pattern", "kv cache", "paged"])
def test_what_pyext_lacks_skips_saying_why(fa, call):
    q, k, v = _qkv(device_for("triton"), hk=4)
    cu = torch.tensor([0, 33, 66], dtype=torch.int32, device=q.device)
    calls = {
        "alibi": lambda: fa.flash_attn_func(q, k, v, alibi_slopes=torch.ones(2, 4)),
        "dropout pattern": lambda: fa.flash_attn_func(q, k, v, 0.1, return_attn_probs=True),
        "kv cache": lambda: fa.flash_attn_with_kvcache(q, k, v),
        "paged": lambda: fa.flash_attn_varlen_func(q[0], q[0], q[0], cu, cu, 33, 33, block_table=cu),
    }
    with pytest.raises(pytest.skip.Exception, match="pyext"):
        calls[call]()


def test_a_backend_that_cannot_run_a_call_skips_with_its_reason(fa, monkeypatch):
    monkeypatch.setattr(fa, "BACKEND", "cuda")
    q, k, v = _qkv(device_for("triton"))  # the CUDA kernels have no soft cap (and no CPU)
    with pytest.raises(pytest.skip.Exception, match="backend 'cuda' cannot run this call"):
        fa.flash_attn_func(q, k, v, softcap=20.0)


SAMPLED = """
import pytest

@pytest.mark.parametrize("c", ["x", "y", "z"])
@pytest.mark.parametrize("a,b", [(1, 2), (3, 4)])
@pytest.mark.parametrize("d", list(range(100)))
def test_grid(a, b, c, d):
    assert (a, b) in [(1, 2), (3, 4)] and c in "xyz" and 0 <= d < 100

def test_plain():
    pass
"""


def test_the_sample_keeps_the_same_one_in_n_of_each_grid(tmp_path):
    """run.sh's fa_sample plugin: one in FA_SAMPLE of a function's parameter
    combinations, the same ones each run, drawn before pytest makes the tests."""
    (tmp_path / "test_sampled.py").write_text(SAMPLED)

    def collected(n):
        env = dict(os.environ, PYTHONPATH=ADAPTER, FA_SAMPLE=str(n))
        out = subprocess.run([sys.executable, "-m", "pytest", "-p", "fa_sample", "-p", "no:cacheprovider",
                              "--collect-only", "-q", str(tmp_path / "test_sampled.py")],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        return [line for line in out.stdout.splitlines() if "::" in line]

    every, sample = collected(1), collected(8)
    assert len(every) == 601
    assert 40 < len(sample) < 120 and sample == collected(8)
    assert "test_sampled.py::test_plain" in sample
