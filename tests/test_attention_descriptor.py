"""The Hopper forward of the Triton attention: tensor descriptors (TMA on
sm_90), forced on CPU under the interpreter. flash_attention.use_loads("descriptor")
runs the descriptor forward wherever Triton has host tensor descriptors, the
interpreter included; "auto" takes it on compute capability 9.0 and up
only. The backward is the pointer kernels'."""

import pytest
import torch
import torch.nn.functional as F

import pyext
from pyext import reference
from conftest import HAS_GPU, assert_close, device_for, make_tensor, poisoned_like
from attention_checks import check_flash, check_sinks, check_softcap, qkv


# (shape as qkv takes it, layout, causal): ragged S, D 40/80, GQA/MQA, both Sq < Sk and Sq > Sk
DESCRIPTOR_CASES = [
    ((2, 2, 1, 19, 33, 40), "contiguous", True),
    ((1, 4, 2, 33, 20, 80), "contiguous", True),
    ((1, 4, 2, 17, 17, 80), "bshd", False),
    ((2, 2, 1, 21, 18, 48), "bshd", True),
    ((1, 4, 2, 19, 22, 40, 24), "bshd", False),  # a value head dim of its own
]


@pytest.fixture
def triton_fa():
    from pyext.triton_kernels import flash_attention
    if HAS_GPU and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the descriptor forward runs on compute capability 9.0 and up")
    return flash_attention


@pytest.mark.parametrize("shape,layout,causal", DESCRIPTOR_CASES, ids=str)
def test_descriptor_forward_matches_oracle(triton_fa, shape, layout, causal):
    q, k, v = qkv(shape, torch.bfloat16, device_for("triton"), layout)
    with triton_fa.use_loads("descriptor"):
        assert triton_fa.forward_loads(q, k, v, triton_fa.empty_out(q, v.shape[-1])) == "descriptor"
        check_flash("triton", q, k, v, causal)


# (shape, causal, window_size, softcap, scale, dtype), as test_attention_extras'
# SOFTCAP_CASES: Gemma 2's cap 50 on a causal GQA block with Sq < Sk; one query row
@pytest.mark.parametrize("shape,causal,window,softcap,scale,dtype", [
    ((2, 4, 2, 45, 70, 32), True, (-1, -1), 50.0, None, torch.bfloat16),
    ((1, 2, 2, 1, 33, 64), False, (-1, -1), 3.0, 0.5, torch.bfloat16)], ids=str)
def test_descriptor_forward_with_a_softcap_matches_oracle(triton_fa, shape, causal, window, softcap, scale, dtype):
    with triton_fa.use_loads("descriptor"):
        check_softcap("triton", False, shape, causal, window, softcap, scale, dtype)


# (shape, causal, window_size, the sinks' spread, their dtype, dtype), as
# test_attention_extras' SINKS_CASES: GPT-OSS's causal GQA with Sq < Sk; Sq > Sk
# causal, whose first rows see no key but the sink; sinks that outweigh the scores
@pytest.mark.parametrize("shape,causal,window,sink_scale,sinks_dtype,dtype", [
    ((2, 4, 2, 45, 70, 32), True, (-1, -1), 1.0, torch.float32, torch.bfloat16),
    ((1, 2, 1, 70, 45, 32), True, (-1, -1), 1.0, torch.float32, torch.float16),
    ((1, 2, 2, 33, 33, 64), False, (-1, -1), 6.0, torch.bfloat16, torch.bfloat16)], ids=str)
def test_descriptor_forward_with_sinks_matches_oracle(triton_fa, shape, causal, window, sink_scale, sinks_dtype,
                                                      dtype):
    with triton_fa.use_loads("descriptor"):
        check_sinks("triton", False, shape, causal, window, sink_scale, sinks_dtype, dtype)


@pytest.mark.parametrize("shape", [(1, 2, 2, 13, 21, 40), (2, 4, 2, 21, 13, 64)], ids=str)
def test_descriptor_forward_top_left_causal_matches_torch(triton_fa, shape):
    q, k, v = (t.detach() for t in qkv(shape, torch.bfloat16, device_for("triton")))
    gqa = shape[1] != shape[2]
    with triton_fa.use_loads("descriptor"):
        out = pyext.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa, backend="triton")
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True, enable_gqa=gqa)
    assert_close(out, ref, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa), "sdpa out")


@pytest.mark.parametrize("extra", [{}, {"softcap": 5.0}, {"sinks": True}], ids=["plain", "softcap", "sinks"])
def test_descriptor_forward_writes_every_element(triton_fa, extra):
    """out and lse poisoned with NaN, and with a cap or sinks out_lo, which
    the descriptor forward writes through pointers: at most half a unit in
    out's last place, and not all zero."""
    q, k, v = (t.detach() for t in qkv((1, 4, 2, 19, 22, 40), torch.bfloat16, device_for("triton")))
    if "sinks" in extra:
        extra = {"sinks": torch.randn(4, device=q.device)}
    with triton_fa.use_loads("descriptor"):
        out, lse, *out_lo = triton_fa.flash_attn_fwd(q, k, v, 0.3, True, 3, out=poisoned_like(q),
                                                     lse=torch.full(q.shape[:3], float("nan"), device=q.device),
                                                     out_lo=poisoned_like(q), **extra)
    assert not out.isnan().any() and not lse.isnan().any()
    assert len(out_lo) == bool(extra)
    for lo in out_lo:
        assert lo.any() and (lo.double().abs() <= out.double().abs() * 2 ** -8).all()


def test_forward_loads_choice_and_its_errors(triton_fa, monkeypatch):
    q, k, v = (t.detach() for t in qkv((1, 2, 1, 9, 12, 48), torch.bfloat16, device_for("triton")))
    out = torch.empty_like(q)
    expected_auto = "descriptor" if HAS_GPU else "pointer"  # the interpreter takes it only when forced
    assert triton_fa.forward_loads(q, k, v, out) == expected_auto
    with triton_fa.use_loads("pointer"):
        assert triton_fa.forward_loads(q, k, v, out) == "pointer"
    monkeypatch.setenv(triton_fa.LOADS_ENV, "pointer")
    assert triton_fa.forward_loads(q, k, v, out) == "pointer"
    with triton_fa.use_loads("descriptor"):  # the context manager wins over the environment
        assert triton_fa.forward_loads(q, k, v, out) == "descriptor"
    monkeypatch.setenv(triton_fa.LOADS_ENV, "tma")
    with pytest.raises(ValueError, match=triton_fa.LOADS_ENV):
        triton_fa.forward_loads(q, k, v, out)
    monkeypatch.delenv(triton_fa.LOADS_ENV)
    with pytest.raises(ValueError, match="use_loads"), triton_fa.use_loads("tma"):
        pass
    # Layouts TMA cannot address: a base one element off 16 bytes, a broadcast
    # (stride 0) key head. "auto" falls back to pointers (and is right); forced, they raise.
    wide = make_tensor((1, 2, 9, 56), torch.bfloat16, q.device)
    shifted = wide[..., 1:49]
    broadcast = k[:, :1].expand(1, 2, 12, 48)
    for bad_q, bad_k, why in ((shifted, k, "16-byte aligned"), (q, broadcast, "positive multiples")):
        assert triton_fa.forward_loads(bad_q, bad_k, v, out) == "pointer"
        with triton_fa.use_loads("descriptor"), pytest.raises(ValueError, match=why):
            triton_fa.flash_attn_fwd(bad_q, bad_k, v, 0.3, False, 0)
    got, _ = triton_fa.flash_attn_fwd(shifted, k, v, 0.3, False, 0)
    ref, _ = reference.attention(shifted.double(), k.double(), v.double(), scale=0.3, causal=False, causal_offset=0)
    pt, _ = reference.attention(shifted, k, v, scale=0.3, causal=False, causal_offset=0)
    assert_close(got, ref, pt, "out")
