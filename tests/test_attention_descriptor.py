"""The Hopper path of the Triton attention: the forward and the backward
through tensor descriptors (TMA on sm_90), forced on CPU under the
interpreter. flash_attention.use_loads("descriptor") runs the descriptor
kernels wherever Triton has host tensor descriptors, the interpreter
included; "auto" takes them on compute capability 9.0 and up only. Both
dQ paths of the backward (atomic and deterministic) every time."""

import pytest
import torch
import torch.nn.functional as F
import triton

import pyext
from pyext import reference
from pyext.triton_kernels.flash_attention import loads
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
    if not HAS_GPU and tuple(map(int, triton.__version__.split(".")[:2])) < (3, 6):
        pytest.skip(f"Triton {triton.__version__}'s interpreter asks a descriptor's strides in elements "
                    "to be multiples of 16 (3.6's: in bytes, as TMA does)")
    return flash_attention


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("shape,layout,causal", DESCRIPTOR_CASES, ids=str)
def test_descriptor_kernels_match_oracle(triton_fa, shape, layout, causal, deterministic):
    q, k, v = qkv(shape, torch.bfloat16, device_for("triton"), layout)
    with triton_fa.use_loads("descriptor"):
        out = triton_fa.empty_out(q, v.shape[-1])
        assert triton_fa.forward_loads(q, k, v, out) == "descriptor"
        grads = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        assert triton_fa.backward_loads(q, k, v, out, *grads) == "descriptor"
        check_flash("triton", q, k, v, causal, deterministic)


# (shape, causal, window_size, softcap, scale, dtype), as test_attention_extras'
# SOFTCAP_CASES: Gemma 2's cap 50 on a causal GQA block with Sq < Sk; one query row
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("shape,causal,window,softcap,scale,dtype", [
    ((2, 4, 2, 45, 70, 32), True, (-1, -1), 50.0, None, torch.bfloat16),
    ((1, 2, 2, 1, 33, 64), False, (-1, -1), 3.0, 0.5, torch.bfloat16)], ids=str)
def test_descriptor_kernels_with_a_softcap_match_oracle(triton_fa, shape, causal, window, softcap, scale, dtype,
                                                        deterministic):
    with triton_fa.use_loads("descriptor"):
        check_softcap("triton", deterministic, shape, causal, window, softcap, scale, dtype)


# (shape, causal, window_size, the sinks' spread, their dtype, dtype), as
# test_attention_extras' SINKS_CASES: GPT-OSS's causal GQA with Sq < Sk; Sq > Sk
# causal, whose first rows see no key but the sink; sinks that outweigh the scores
@pytest.mark.parametrize("shape,causal,window,sink_scale,sinks_dtype,dtype", [
    ((2, 4, 2, 45, 70, 32), True, (-1, -1), 1.0, torch.float32, torch.bfloat16),
    ((1, 2, 1, 70, 45, 32), True, (-1, -1), 1.0, torch.float32, torch.float16),
    ((1, 2, 2, 33, 33, 64), False, (-1, -1), 6.0, torch.bfloat16, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_descriptor_kernels_with_sinks_match_oracle(triton_fa, shape, causal, window, sink_scale, sinks_dtype,
                                                    dtype, deterministic):
    with triton_fa.use_loads("descriptor"):
        check_sinks("triton", deterministic, shape, causal, window, sink_scale, sinks_dtype, dtype)


@pytest.mark.parametrize("shape", [(1, 2, 2, 13, 21, 40), (2, 4, 2, 21, 13, 64)], ids=str)
def test_descriptor_forward_top_left_causal_matches_torch(triton_fa, shape):
    q, k, v = (t.detach() for t in qkv(shape, torch.bfloat16, device_for("triton")))
    gqa = shape[1] != shape[2]
    with triton_fa.use_loads("descriptor"):
        out = pyext.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa, backend="triton")
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True, enable_gqa=gqa)
    assert_close(out, ref, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa), "sdpa out")


EXTRAS = [{"scale": 40 ** -0.5}, {"scale": 0.5}, {"softcap": 5.0}, {"sinks": True}]
EXTRAS_IDS = ["plain", "peaky_scale", "softcap", "sinks"]


def _extras(extra, device):
    """(scale, the forward's keyword arguments) of an EXTRAS entry, at head dim 40."""
    extra = dict(extra)
    if "sinks" in extra:
        extra["sinks"] = torch.randn(4, device=device)
    return extra.pop("scale", 0.3), extra


@pytest.mark.parametrize("extra", EXTRAS, ids=EXTRAS_IDS)
def test_descriptor_forward_writes_every_element(triton_fa, extra):
    """out and lse poisoned with NaN, and with a cap, sinks or a scale over
    twice the default out_lo, which the descriptor forward writes through
    pointers: at most half a unit in out's last place, and not all zero."""
    q, k, v = (t.detach() for t in qkv((1, 4, 2, 19, 22, 40), torch.bfloat16, device_for("triton")))
    scale, extra = _extras(extra, q.device)
    with triton_fa.use_loads("descriptor"):
        out, lse, *out_lo = triton_fa.flash_attn_fwd(q, k, v, scale, True, 3, out=poisoned_like(q),
                                                     lse=torch.full(q.shape[:3], float("nan"), device=q.device),
                                                     out_lo=poisoned_like(q), **extra)
    assert not out.isnan().any() and not lse.isnan().any()
    assert len(out_lo) == (scale != 40 ** -0.5)  # every entry but "plain"
    for lo in out_lo:
        assert lo.any() and (lo.double().abs() <= out.double().abs() * 2 ** -8).all()


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("extra", EXTRAS, ids=EXTRAS_IDS)
def test_descriptor_backward_writes_every_gradient(triton_fa, extra, deterministic, monkeypatch):
    """dq, dk, dv poisoned with NaN: the descriptor kernels (and no others)
    write every element. Under the interpreter the two paths run the same
    math on the same tiles in the same order: the same bits as the pointer
    backward's."""
    from pyext.triton_kernels.flash_attention import backward, backward_tma
    q, k, v = (t.detach() for t in qkv((1, 4, 2, 19, 22, 40), torch.bfloat16, device_for("triton")))
    scale, extra = _extras(extra, q.device)
    out, lse, *out_lo = triton_fa.flash_attn_fwd(q, k, v, scale, True, 3, **extra)
    dout = torch.randn_like(out)

    def gradients(loads):
        with triton_fa.use_loads(loads):
            return triton_fa.flash_attn_bwd(dout, q, k, v, out, lse, scale, True, 3, deterministic,
                                            dq=poisoned_like(q), dk=poisoned_like(k), dv=poisoned_like(v),
                                            out_lo=out_lo[0] if out_lo else None, **extra)
    launched = []
    kernels = {name: getattr(m, name) for m in (backward, backward_tma) for name in dir(m) if name.startswith("_bwd_")}
    for name, kernel in kernels.items():
        if hasattr(kernel, "launch"):  # the autotuned kernels (ChosenConfigs)
            monkeypatch.setattr(kernel, "launch", lambda *a, _name=name, _launch=kernel.launch, **kw: (
                launched.append(_name), _launch(*a, **kw)))
    grads = gradients("descriptor")
    expected = ["_bwd_dkdv_tma_kernel", "_bwd_dq_tma_kernel"] if deterministic else ["_bwd_dkdv_dq_tma_kernel"]
    assert launched == expected
    for g in grads:
        assert not g.isnan().any() and g.any()
    if not HAS_GPU:
        for g, p in zip(grads, gradients("pointer"), strict=True):
            assert torch.equal(g, p)


SCALE = 48 ** -0.5  # the default scale at the head dim of the loads tests: plain attention, (out, lse)


def test_backward_loads_choice_and_its_errors(triton_fa, monkeypatch):
    """"auto" takes the descriptor backward where TMA can address every
    tensor it reads or writes (q, k, v, dout, dq, dk, dv), else pointers;
    forced, a layout it cannot address raises, naming the tensor."""
    from pyext.triton_kernels.flash_attention import loads
    q, k, v = (t.detach() for t in qkv((1, 2, 1, 9, 12, 48), torch.bfloat16, device_for("triton")))
    out, lse = triton_fa.flash_attn_fwd(q, k, v, SCALE, False, 0)
    grads = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    good = torch.randn_like(out)
    broadcast = make_tensor((1, 1, 9, 48), torch.bfloat16, q.device).expand(1, 2, 9, 48)  # a head stride of 0
    assert triton_fa.backward_loads(q, k, v, good, *grads) == ("descriptor" if HAS_GPU else "pointer")
    monkeypatch.setattr(loads, "_has_tma", lambda t: True)  # as on an H100
    assert triton_fa.backward_loads(q, k, v, good, *grads) == "descriptor"
    assert triton_fa.backward_loads(q, k, v, broadcast, *grads) == "pointer"
    with triton_fa.use_loads("pointer"):
        assert triton_fa.backward_loads(q, k, v, good, *grads) == "pointer"
    with triton_fa.use_loads("descriptor"), pytest.raises(ValueError, match="dout: strides"):
        triton_fa.flash_attn_bwd(broadcast, q, k, v, out, lse, SCALE, False, 0, True)
    got = triton_fa.flash_attn_bwd(broadcast, q, k, v, out, lse, SCALE, False, 0, True)  # auto: pointers
    with triton_fa.use_loads("pointer"):
        assert all(torch.equal(g, p) for g, p in
                   zip(got, triton_fa.flash_attn_bwd(broadcast.contiguous(), q, k, v, out, lse, SCALE, False, 0, True)))


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
    with monkeypatch.context() as older_triton:  # one without host tensor descriptors
        older_triton.setattr(loads, "TensorDescriptor", None)
        assert triton_fa.forward_loads(q, k, v, out) == "pointer"
        with triton_fa.use_loads("descriptor"), pytest.raises(RuntimeError, match="no host tensor descriptors"):
            triton_fa.forward_loads(q, k, v, out)
    # Layouts TMA cannot address: a base one element off 16 bytes, a broadcast
    # (stride 0) key head. "auto" falls back to pointers (and is right); forced, they raise.
    wide = make_tensor((1, 2, 9, 56), torch.bfloat16, q.device)
    shifted = wide[..., 1:49]
    broadcast = k[:, :1].expand(1, 2, 12, 48)
    for bad_q, bad_k, why in ((shifted, k, "16-byte aligned"), (q, broadcast, "positive multiples")):
        assert triton_fa.forward_loads(bad_q, bad_k, v, out) == "pointer"
        with triton_fa.use_loads("descriptor"), pytest.raises(ValueError, match=why):
            triton_fa.flash_attn_fwd(bad_q, bad_k, v, SCALE, False, 0)
    got, _ = triton_fa.flash_attn_fwd(shifted, k, v, SCALE, False, 0)
    ref, _ = reference.attention(shifted.double(), k.double(), v.double(), scale=SCALE, causal=False, causal_offset=0)
    pt, _ = reference.attention(shifted, k, v, scale=SCALE, causal=False, causal_offset=0)
    assert_close(got, ref, pt, "out")
