"""What flash_attention adds to torch's SDPA, as FlashAttention and HF's
models use it: a local window (window_size), a logit soft cap (Gemma 2), and
attention sinks (GPT-OSS); on the Triton kernels, against the float64 oracle."""

import pytest
import torch

import pyext
from pyext import reference
from pyext.ops import attention
from conftest import FLOOR, assert_close, device_for, make_tensor
from attention_checks import TRITON_AND_REFERENCE, band, check_sinks, check_softcap, qkv, sdpa


# (shape as qkv takes it, causal, window_size): a causal sliding window over blocks
# at both ends, a two-sided band with Sq > Sk (rows that see no key), the
# diagonal alone, a window wider than the keys, a right bound alone
WINDOW_CASES = [((2, 4, 2, 45, 70, 32), True, (20, -1)), ((1, 2, 1, 70, 45, 40), False, (10, 5)),
                ((1, 2, 2, 33, 33, 16), False, (0, 0)), ((1, 2, 2, 40, 40, 64), True, (100, -1)),
                ((1, 2, 2, 19, 50, 32), False, (-1, 3))]


@pytest.mark.parametrize("backend,deterministic", TRITON_AND_REFERENCE)
@pytest.mark.parametrize("shape,causal,window", WINDOW_CASES, ids=str)
def test_local_window_matches_oracle(backend, deterministic, shape, causal, window):
    """flash_attention's window_size (FlashAttention's local attention): out,
    lse, dq, dk, dv against the float64 oracle, with torch's SDPA given the
    band as a boolean mask as the yardstick (rows that see no key set to 0)."""
    q, k, v = qkv(shape, torch.bfloat16, device_for(backend))
    out, lse = pyext.flash_attention(q, k, v, causal=causal, window_size=window, return_lse=True,
                                     deterministic=deterministic, backend=backend)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    visible = band(q.shape[2], k.shape[2], causal, window, q.device)

    def yardstick(q, k, v):
        o = sdpa(q, k, v, attn_mask=visible, enable_gqa=True)
        scores = (q @ k.repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(-2, -1)) * q.shape[-1] ** -0.5
        return o.masked_fill(~visible.any(-1)[:, None], 0), torch.logsumexp(scores.float().masked_fill(
            ~visible, float("-inf")), -1)

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        o, lse_ = fn(*leaves)
        return [o, lse_] + list(torch.autograd.grad(o, leaves, dout.to(dtype)))
    ref = run(lambda *t: reference.attention(*t, causal=causal, causal_offset=k.shape[2] - q.shape[2],
                                             window=window), torch.float64)
    pt = run(yardstick, q.dtype)
    for name, o, r, p in zip(["out", "lse", "dq", "dk", "dv"], [out, lse, *grads], ref, pt):
        assert_close(o, r, p, name)


# (shape as qkv takes it, causal, window_size, softcap, scale, dtype): Gemma 2's cap
# 50 on a causal GQA block with Sq < Sk; a cap that saturates (scores of
# spread ~5.7 against 1.0) with Sq > Sk in fp16; a causal sliding window
# (Gemma 2's local layers); one query row
SOFTCAP_CASES = [((2, 4, 2, 45, 70, 32), True, (-1, -1), 50.0, None, torch.bfloat16),
                 ((1, 2, 1, 70, 45, 32), False, (-1, -1), 1.0, 1.0, torch.float16),
                 ((2, 4, 2, 45, 70, 32), True, (20, -1), 5.0, 1.0, torch.bfloat16),
                 ((1, 2, 2, 1, 33, 64), False, (-1, -1), 3.0, 0.5, torch.bfloat16)]


@pytest.mark.parametrize("backend,deterministic", TRITON_AND_REFERENCE)
@pytest.mark.parametrize("shape,causal,window,softcap,scale,dtype", SOFTCAP_CASES, ids=str)
def test_softcap_matches_oracle(backend, deterministic, shape, causal, window, softcap, scale, dtype):
    check_softcap(backend, deterministic, shape, causal, window, softcap, scale, dtype)


# (shape as qkv takes it, causal, window_size, the sinks' spread, their dtype, dtype): GPT-OSS's full
# and sliding (W = 20) layers, causal GQA with Sq < Sk; Sq > Sk causal, whose first rows see no key
# but the sink; sinks that outweigh the scores (spread 6) in bf16; one query row in fp16
SINKS_CASES = [((2, 4, 2, 45, 70, 32), True, (-1, -1), 1.0, torch.float32, torch.bfloat16),
               ((2, 4, 2, 45, 70, 32), True, (19, -1), 1.0, torch.float32, torch.bfloat16),
               ((1, 2, 1, 70, 45, 32), True, (-1, -1), 1.0, torch.float32, torch.float16),
               ((1, 2, 2, 33, 33, 64), False, (-1, -1), 6.0, torch.bfloat16, torch.bfloat16),
               ((1, 2, 2, 1, 33, 64), False, (-1, -1), 1.0, torch.float32, torch.float16)]


@pytest.mark.parametrize("backend,deterministic", TRITON_AND_REFERENCE)
@pytest.mark.parametrize("shape,causal,window,sink_scale,sinks_dtype,dtype", SINKS_CASES, ids=str)
def test_sinks_match_oracle(backend, deterministic, shape, causal, window, sink_scale, sinks_dtype, dtype):
    check_sinks(backend, deterministic, shape, causal, window, sink_scale, sinks_dtype, dtype)


def test_sinks_are_checked():
    q = make_tensor((1, 2, 8, 16), torch.bfloat16, "cpu")
    for bad in [torch.zeros(3), torch.zeros(1, 2), torch.zeros(2, dtype=torch.int64), [0.0, 0.0]]:
        with pytest.raises(ValueError, match=r"sinks must be a floating-point tensor of one logit per query head"):
            pyext.flash_attention(q, q, q, sinks=bad)


@pytest.mark.parametrize("bad,error,match", [
    ("window_and_mask", ValueError, "window in place of a mask"), ("causal_and_mask", RuntimeError, "is_causal"),
    ("broadcast_batch", ValueError, "same leading dims"),
])
def test_sdpa_with_extras_refuses_what_it_does_not_define(bad, error, match):
    """The SDPA path pyext.patch gives HF's attention with a window, a soft
    cap or sinks: a window beside a mask, a mask with is_causal (torch's
    refusal) and leading dims to broadcast with a cap (its reference takes
    none) are errors naming what is wrong, whichever backend auto picks."""
    q, k, v = (t.detach() for t in qkv((1, 2, 2, 6, 6, 16), torch.bfloat16, device_for("triton")))
    kwargs = dict(softcap=2.0)
    if bad == "window_and_mask":
        kwargs = dict(attn_mask=torch.ones(6, 6, dtype=torch.bool, device=q.device), window=(2, 0))
    elif bad == "causal_and_mask":
        kwargs.update(attn_mask=torch.ones(6, 6, dtype=torch.bool, device=q.device), is_causal=True)
    else:
        q = torch.cat([q, q])
    with pytest.raises(error, match=match):
        attention._scaled_dot_product_attention(q, k, v, **kwargs)


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_with_a_softcap_matches_the_reference(backend, masked):
    """The SDPA path pyext.patch gives HF's Gemma 2: under auto the kernels
    even with a mask (torch's SDPA has no cap; its fallback is the reference)."""
    q, k, v = (t.detach() for t in qkv((2, 4, 2, 21, 21, 32), torch.bfloat16, device_for("triton")))
    mask = torch.rand(2, 1, 21, 21, device=q.device) > 0.3 if masked else None
    out = attention._scaled_dot_product_attention(q, k, v, mask, 0.0, not masked, 0.5, True, backend=backend,
                                                  softcap=2.0)
    ref, _ = reference.attention(q.double(), k.double(), v.double(), scale=0.5, causal=not masked, mask=mask,
                                 softcap=2.0)
    lower, _ = reference.attention(q, k, v, scale=0.5, causal=not masked, mask=mask, softcap=2.0)
    assert_close(out, ref, lower, "out")


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_with_sinks_matches_the_reference(backend, masked):
    """The SDPA path pyext.patch gives HF's GPT-OSS: under auto the kernels
    even with a mask (torch's SDPA has no sinks; its fallback is the
    reference), the sinks' gradient too, against the reference in the
    inputs' dtype (float32 inside)."""
    q, k, v = (t.detach() for t in qkv((2, 4, 2, 21, 21, 32), torch.bfloat16, device_for("triton")))
    mask = torch.rand(2, 1, 21, 21, device=q.device) > 0.3 if masked else None
    sinks = torch.randn(4, device=q.device, requires_grad=True)
    out = attention._scaled_dot_product_attention(q, k, v, mask, 0.0, not masked, 0.5, True, backend=backend,
                                                  sinks=sinks)
    dout = torch.randn_like(out)
    (dsinks,) = torch.autograd.grad(out, sinks, dout)
    sinks64 = sinks.detach().double().requires_grad_()
    ref, _ = reference.attention(q.double(), k.double(), v.double(), scale=0.5, causal=not masked, mask=mask,
                                 sinks=sinks64)
    lower, _ = reference.attention(q, k, v, scale=0.5, causal=not masked, mask=mask, sinks=sinks)
    assert_close(out, ref, lower, "out")
    assert_close(dsinks, torch.autograd.grad(ref, sinks64, dout.double())[0],
                 torch.autograd.grad(lower, sinks, dout)[0], "dsinks")


def test_softcap_is_checked():
    q = make_tensor((1, 2, 8, 16), torch.bfloat16, "cpu")
    for bad in [-1.0, float("inf"), float("nan"), "a", None, True]:
        with pytest.raises(ValueError, match="softcap must be a finite number >= 0"):
            pyext.flash_attention(q, q, q, softcap=bad)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("feature", ["sinks", "softcap"])
def test_rows_nearly_one_hot_get_their_small_dS(feature, deterministic):
    """Rows whose P is about 0.98 on one key: each sees its own key and its
    sink (window (0, 0), sinks 0, the key scored 4), or its own key and the
    one before under a soft cap (window (1, 0), scored 4 and 0). dS = P (dP
    - D) is then a small difference, and D = rowsum(dO * O) from out's 8
    bits alone put dq and dk at 1.2 to 6 times the rule's bound (v spread 8,
    so that the floor does not hide it); D from out + out_lo keeps them
    under a quarter of it (triton_kernels/flash_attention/forward.py,
    stores_low_part)."""
    d = 32
    k = make_tensor((1, 2, 64, d), torch.float32, device_for("triton"))
    v = make_tensor((1, 2, 64, d), torch.float32, device_for("triton"), scale=8.0)
    own = k
    if feature == "softcap":  # orthogonal to the key before: that key scores 0
        before = k.roll(1, 2)
        own = k - before * ((k * before).sum(-1, keepdim=True) / (before * before).sum(-1, keepdim=True))
    q = own * (4.0 / (d ** -0.5 * (own * k).sum(-1, keepdim=True)))
    q, k, v = (t.to(torch.bfloat16).requires_grad_() for t in (q, k, v))
    if feature == "sinks":
        check_sinks("triton", deterministic, None, False, (0, 0), None, torch.float32, None,
                    inputs=(q, k, v, torch.zeros(2, device=q.device)))
    else:
        check_softcap("triton", deterministic, None, False, (1, 0), 20.0, None, inputs=(q, k, v))


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("softcap", [0.0, 2.0])
def test_a_window_is_its_band_as_a_mask_without_the_mask(deterministic, softcap, dropout_seeds):
    """With dropout, and a soft cap, too: the window kernels give what the
    masked kernels give for the band as a boolean mask (the same dropout
    mask, a function of the seed and (query, key) alone), out and gradients.
    (SDPA with a cap, as pyext.patch calls it for HF's Gemma 2.) Both
    backwards' D read out + out_lo."""
    q, k, v = qkv((1, 4, 2, 45, 70, 32), torch.bfloat16, device_for("triton"))
    visible = band(45, 70, True, (20, -1), q.device)
    torch.use_deterministic_algorithms(deterministic)
    try:
        results = []
        for call in (lambda: pyext.flash_attention(q, k, v, causal=True, window_size=(20, -1), dropout_p=0.3,
                                                   softcap=softcap, backend="triton"),
                     lambda: attention._scaled_dot_product_attention(q, k, v, attn_mask=visible, dropout_p=0.3,
                                                                     enable_gqa=True, backend="triton",
                                                                     softcap=softcap)):
            torch.manual_seed(5)  # the same dropout seed for both
            out = call()
            results.append([out] + list(torch.autograd.grad(out, (q, k, v), torch.ones_like(out))))
    finally:
        torch.use_deterministic_algorithms(False)
    for name, window_result, mask_result in zip(["out", "dq", "dk", "dv"], *results):
        # the masked kernels recompute P from each row's (m, l), these from lse: last-bit
        # differences, a unit in bf16's last place (2 ** -7 of the value; dk reaches 7 here)
        torch.testing.assert_close(window_result, mask_result, rtol=2 ** -7, atol=FLOOR[torch.bfloat16],
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_window_size_is_checked():
    q = make_tensor((1, 2, 8, 16), torch.bfloat16, "cpu")
    for bad in [(1,), (-2, 0), "ab", (1.5, 2), None]:
        with pytest.raises(ValueError, match="window_size must be two integers"):
            pyext.flash_attention(q, q, q, window_size=bad)


@pytest.mark.gpu
def test_cuda_kernels_name_the_window_as_what_they_lack():
    q, k, v = qkv((1, 2, 2, 16, 16, 64), torch.bfloat16, "cuda")
    with pytest.raises(pyext.BackendUnavailable, match="window"):
        pyext.flash_attention(q, k, v, causal=True, window_size=(4, -1), backend="cuda")


@pytest.mark.gpu
def test_cuda_kernels_name_the_sinks_as_what_they_lack():
    q, k, v = qkv((1, 2, 2, 16, 16, 64), torch.bfloat16, "cuda")
    with pytest.raises(pyext.BackendUnavailable, match="sinks"):
        pyext.flash_attention(q, k, v, causal=True, sinks=torch.zeros(2, device="cuda"), backend="cuda")


@pytest.mark.gpu
def test_cuda_kernels_name_the_softcap_as_what_they_lack():
    q, k, v = qkv((1, 2, 2, 16, 16, 64), torch.bfloat16, "cuda")
    with pytest.raises(pyext.BackendUnavailable, match="softcap"):
        pyext.flash_attention(q, k, v, causal=True, softcap=30.0, backend="cuda")


@pytest.mark.parametrize("layout", ["contiguous", "bshd"])
@pytest.mark.parametrize("window,softcap,sinks,scale,dropout_p", [
    ((4, -1), 0.0, False, 0.25, 0.2), ((-1, -1), 2.5, False, 0.25, 0.2), ((4, 1), 2.5, False, 0.25, 0.2),
    ((-1, -1), 0.0, True, 0.25, 0.2),
    ((-1, -1), 0.0, False, 1.0, 0.0),  # none of the extras at 4x the default scale: out_lo for that alone
    ((-1, -1), 0.0, False, 0.25, 0.0)], ids=str)  # and at the default: an empty out_lo
def test_opcheck_extras(layout, window, softcap, sinks, scale, dropout_p):
    q, k, v = qkv((1, 2, 1, 9, 12, 16), torch.bfloat16, device_for("triton"), layout)
    seed = torch.tensor([7], device=q.device)
    sink = torch.randn(2, device=q.device, requires_grad=True) if sinks else None
    args = (scale, True, 3, *window, softcap)
    torch.library.opcheck(torch.ops.pyext.flash_attn_extras_fwd_triton, (q, k, v, *args, sink, dropout_p, seed))
    with torch.no_grad():
        out, lse, out_lo = torch.ops.pyext.flash_attn_extras_fwd_triton(q, k, v, *args, sink, dropout_p, seed)
    assert out_lo.shape == (out.shape if (scale, dropout_p) != (0.25, 0.0) or sinks or softcap else (0,))
    sink = None if sink is None else sink.detach()
    torch.library.opcheck(torch.ops.pyext.flash_attn_extras_bwd_triton,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, out_lo, lse, *args, sink,
                           dropout_p, seed, True))


@pytest.mark.parametrize("extra", ["window", "softcap", "sinks"])
def test_double_backward_under_auto_is_the_references(extra, auto_runs_the_triton_kernels):
    """A backward with create_graph=True through the extras' kernels under
    auto: the reference's graph, window, cap and sinks with it, so the
    second derivatives are the reference's own."""
    q, k, v = (t.detach() for t in qkv((1, 2, 1, 9, 12, 16), torch.bfloat16, device_for("triton")))
    window = (4, -1) if extra == "window" else None
    softcap = 5.0 if extra == "softcap" else 0.0
    sinks = torch.randn(2, device=q.device) if extra == "sinks" else None
    c = torch.randn(q.shape, dtype=q.dtype, device=q.device)

    def second(fn):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        first = torch.autograd.grad((fn(*leaves) * c).sum(), leaves, create_graph=True)
        return torch.autograd.grad(sum(g.float().square().sum() for g in first), leaves)
    got = second(lambda *t: pyext.flash_attention(*t, causal=True, window_size=window or (-1, -1), softcap=softcap,
                                                  sinks=sinks))
    expected = second(lambda *t: reference.attention(*t, scale=0.25, causal=True, causal_offset=3, window=window,
                                                     softcap=softcap, sinks=sinks)[0])
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


def test_compile_fullgraph_with_sinks():
    """flash_attention with sinks, a parameter given its gradient, under
    torch.compile(fullgraph=True): the gradients, the sinks' included, are
    eager's bit for bit (the deterministic backward)."""
    q, k, v = qkv((1, 2, 2, 9, 9, 16), torch.bfloat16, device_for("triton"))
    sinks = torch.randn(2, device=q.device, requires_grad=True)

    def f(q, k, v, sinks):
        return pyext.flash_attention(q, k, v, causal=True, sinks=sinks, deterministic=True,
                                     backend="triton").float().sum()
    torch._dynamo.reset()
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, sinks),
                                   (q, k, v, sinks))
    eager = torch.autograd.grad(f(q, k, v, sinks), (q, k, v, sinks))
    assert all(torch.equal(c, e) for c, e in zip(compiled, eager))


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("window", [(-1, -1), (1023, -1)], ids=str)
def test_large_softcap(deterministic, window):
    """Gemma 2's attention at a training length: cap 50, head dim 256, causal,
    its global and local (a window of 1024) layers, GQA."""
    check_softcap("triton", deterministic, (1, 4, 2, 2048, 2048, 256), True, window, 50.0, None)
