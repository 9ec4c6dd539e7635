"""The stand-in flash_attn package of .ci/fa_adapter, through which
FlashAttention's own tests run against pyext on the GPU machine: its layout
and packing match FlashAttention's, and what pyext lacks skips."""
import importlib
import pathlib
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import HAS_GPU, assert_close, make_tensor

ADAPTER = pathlib.Path(__file__).resolve().parents[1] / ".ci" / "fa_adapter"


@pytest.fixture
def flash_attn(monkeypatch):
    """The stand-in, imported in place of any real flash_attn and taken out
    again after the test (the benchmarks look for the real one)."""
    real = [m for m in sys.modules if m.split(".")[0] == "flash_attn"]
    for name in real:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(ADAPTER))
    yield importlib.import_module("flash_attn")
    for name in [m for m in sys.modules if m.split(".")[0] == "flash_attn"]:
        del sys.modules[name]


def bshd(batch, seq, heads, d, dtype=torch.float32):
    device = "cuda" if HAS_GPU else "cpu"
    return make_tensor((batch, seq, heads, d), dtype, device)


def reference(q, k, v, causal):
    """FlashAttention's semantics by SDPA: (B, S, H, D), GQA, causal bottom-right."""
    q, k, v = (t.transpose(1, 2).double() for t in (q, k, v))
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    mask = None
    if causal:
        sq, sk = q.shape[2], k.shape[2]
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq, sk", [(5, 9), (9, 5)])
def test_flash_attn_func_is_flashattentions_layout_and_causal_alignment(flash_attn, causal, sq, sk):
    q, k, v = bshd(2, sq, 4, 16), bshd(2, sk, 2, 16), bshd(2, sk, 2, 16)
    out, lse, probs = flash_attn.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    ref = reference(q, k, v, causal)
    rows = ref.isfinite().all(-1)  # bottom-right causal with sq > sk: the first rows see no key
    assert_close(out[rows], ref[rows].float(), ref[rows].float().to(out.dtype), "out")
    assert lse.shape == (2, 4, sq) and probs is None
    assert flash_attn.flash_attn_func(q, k, v, causal=causal).shape == q.shape


def test_packed_forms_unpack_as_flashattention_packs(flash_attn):
    qkv = bshd(2, 7, 3 * 2, 16).view(2, 7, 3, 2, 16)
    q, k, v = qkv.unbind(2)
    expected = flash_attn.flash_attn_func(q, k, v, causal=True)
    torch.testing.assert_close(flash_attn.flash_attn_qkvpacked_func(qkv, causal=True), expected, rtol=0, atol=0)
    torch.testing.assert_close(flash_attn.flash_attn_kvpacked_func(q, qkv[:, :, 1:], causal=True), expected,
                               rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, what", [
    ({"dropout_p": 0.1}, "dropout"),
    ({"softcap": 30.0}, "softcap"),
    ({"alibi_slopes": torch.ones(2, 2)}, "ALiBi"),
    ({"window_size": torch.tensor([3, 0])}, "local window"),
])
def test_what_pyext_lacks_skips_and_says_what(flash_attn, kwargs, what):
    q = bshd(2, 5, 2, 16)
    with pytest.raises(pytest.skip.Exception, match=what):
        flash_attn.flash_attn_func(q, q, q, **kwargs)
    with pytest.raises(pytest.skip.Exception, match="head dim 59"):
        flash_attn.flash_attn_func(*(bshd(1, 4, 1, 59) for _ in range(3)))
