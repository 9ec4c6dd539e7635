"""pyext.flash_attention_varlen: attention over a packed batch (sequences end
to end, no padding), the specification."""

import contextlib

import pytest
import torch

import pyext
from pyext import reference
from pyext.ops import attention_varlen
from conftest import COMPILERS, device_for, make_tensor, poisoned_like
from attention_checks import assert_all_close, attention_with_dropout, band, sdpa, sinks_eager, softcapped_eager

# (query lengths, key lengths, query heads, key heads, head dim[, value head dim]):
# one sequence; odd lengths one past a block with an empty sequence, a one-row
# one and Sq != Sk both ways, GQA; MQA at head dim 80; a sequence with
# queries but no keys and a value head dim below the query one, neither a
# multiple of 8.
CASES = [
    ((17,), (17,), 2, 2, 64),
    ((17, 1, 0, 33, 20), (17, 5, 3, 33, 9), 4, 2, 40),
    ((5, 31, 12), (5, 31, 12), 3, 1, 80),
    ((9, 4, 24), (30, 0, 2), 2, 2, 36, 13),
]
VARLEN_BACKENDS = [pytest.param("torch", False, id="torch"),
                   pytest.param("triton", False, id="triton-atomic"),
                   pytest.param("triton", True, id="triton-deterministic")]


def offsets(lengths, device):
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32,
                        device=device)


def packed(case, dtype, device):
    """q, k, v (requiring grad), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k of a case."""
    lens_q, lens_k, hq, hk, d, *dv = case
    dv = dv[0] if dv else d
    q = make_tensor((sum(lens_q), hq, d), dtype, device, requires_grad=True)
    k = make_tensor((sum(lens_k), hk, d), dtype, device, requires_grad=True)
    v = make_tensor((sum(lens_k), hk, dv), dtype, device, requires_grad=True)
    return q, k, v, offsets(lens_q, device), offsets(lens_k, device), max(lens_q), max(lens_k)


def per_sequence(attention, q, k, v, cu_q, cu_k):
    """(out, lse) of a packed batch, attention(q, k, v, Sq, Sk) run on each
    sequence as a (1, H, S, D) batch of its own."""
    outs, lses = [], []
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    for q0, q1, k0, k1 in zip(bounds_q, bounds_q[1:], bounds_k, bounds_k[1:]):
        o, lse = attention(*(t.transpose(0, 1)[None] for t in (q[q0:q1], k[k0:k1], v[k0:k1])), q1 - q0, k1 - k0)
        outs.append(o[0].transpose(0, 1))
        lses.append(None if lse is None else lse[0])
    return torch.cat(outs), None if lses[0] is None else torch.cat(lses, 1)


def torch_dense(scale, causal, window, softcap, sinks=None):
    """PyTorch's own attention of one sequence in its dtype, the yardstick:
    SDPA with the visible band as a mask (rows that see no key set to 0, lse
    from the scores), with a soft cap HF Gemma 2's eager attention, with
    sinks HF GPT-OSS's."""
    def attention(q, k, v, sq, sk):
        visible = band(sq, sk, causal, window, q.device)
        if softcap:
            return softcapped_eager(q, k, v, scale, visible, softcap)
        if sinks is not None:
            return sinks_eager(q, k, v, sinks, scale, visible)
        if sk == 0:  # no keys: what pyext defines, zeros (torch's SDPA gives NaN)
            return q.new_zeros((*q.shape[:3], v.shape[3])), torch.full(q.shape[:3], float("-inf"))
        o = sdpa(q, k, v, attn_mask=visible, scale=scale, enable_gqa=True)
        scores = (q @ k.repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(-2, -1)) * scale
        return (o.masked_fill(~visible.any(-1)[:, None], 0),
                torch.logsumexp(scores.float().masked_fill(~visible, float("-inf")), -1))
    return attention


def check_varlen(backend, deterministic, case, causal, dtype=torch.bfloat16, window=(-1, -1), softcap=0.0,
                 scale=None, sinks=None):
    """out, lse, dq, dk, dv of flash_attention_varlen against the float64
    oracle (the reference on each sequence), torch_dense the yardstick.
    sinks: (their spread, their dtype) for random sinks, and dsinks too."""
    q, k, v, cu_q, cu_k, max_q, max_k = packed(case, dtype, device_for(backend))
    leaves = [q, k, v]
    if sinks is not None:
        spread, sinks_dtype = sinks
        sinks = (torch.randn(q.shape[1], device=q.device) * spread).to(sinks_dtype).requires_grad_()
        leaves.append(sinks)
    out, lse = pyext.flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, scale=scale,
                                            window_size=window, softcap=softcap, sinks=sinks, return_lse=True,
                                            deterministic=deterministic, backend=backend)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kernel_window = None if window == (-1, -1) else window

    def run(fn, dtype, sinks_dtype=None):
        copies = [t.detach().to(dtype if i < 3 else sinks_dtype).requires_grad_() for i, t in enumerate(leaves)]
        o, lse_ = fn(*copies)
        return [o, lse_] + list(torch.autograd.grad(o, copies, dout.to(dtype), materialize_grads=True))
    ref = run(lambda q, k, v, s=None: reference.attention_varlen(q, k, v, cu_q, cu_k, scale=scale, causal=causal,
                                                                 window=kernel_window, softcap=softcap, sinks=s),
              torch.float64, torch.float64)
    pt = run(lambda q, k, v, s=None: per_sequence(torch_dense(scale, causal, window, softcap, s), q, k, v, cu_q, cu_k),
             dtype, None if sinks is None else sinks.dtype)
    assert_all_close(["out", "lse", "dq", "dk", "dv", "dsinks"][:len(leaves) + 2], [out, lse, *grads], ref, pt)


@pytest.mark.parametrize("backend,deterministic", VARLEN_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_varlen_matches_oracle(backend, deterministic, case, causal):
    check_varlen(backend, deterministic, case, causal)


@pytest.mark.parametrize("backend,deterministic", VARLEN_BACKENDS)
def test_varlen_in_float16_with_a_custom_scale(backend, deterministic):
    check_varlen(backend, deterministic, CASES[1], True, torch.float16, scale=0.37)


# (case, causal, window_size, softcap): a causal sliding window over a
# sequence longer than it (Mistral's packed SFT), a two-sided band, Gemma 2's
# cap alone and with its window
WINDOW_SOFTCAP_CASES = [(((40, 7, 23), (40, 7, 23), 4, 2, 32), True, (15, -1), 0.0),
                        (((19, 30), (33, 12), 2, 1, 16), False, (6, 4), 0.0),
                        (((21, 2, 30), (21, 9, 30), 4, 2, 32), True, (-1, -1), 3.0),
                        (((40, 7, 23), (40, 7, 23), 2, 2, 64), True, (15, -1), 2.0)]


@pytest.mark.parametrize("backend,deterministic", VARLEN_BACKENDS)
@pytest.mark.parametrize("case,causal,window,softcap", WINDOW_SOFTCAP_CASES, ids=str)
def test_varlen_window_and_softcap_match_oracle(backend, deterministic, case, causal, window, softcap):
    check_varlen(backend, deterministic, case, causal, window=window, softcap=softcap, scale=0.5)


# (case, causal, window_size, the sinks' spread, their dtype, dtype): GPT-OSS's
# packed SFT, its full and sliding (W = 16) layers, over documents with an
# empty one, one with keys but no queries, and one whose first causal rows
# see no key but the sink; sinks that outweigh the scores (spread 6) in bf16
# over a sequence with queries and no keys, a value head dim of its own
SINKS_CASES = [(CASES[1], True, (-1, -1), 1.0, torch.float32, torch.bfloat16),
               (WINDOW_SOFTCAP_CASES[0][0], True, (15, -1), 1.0, torch.float32, torch.bfloat16),
               (CASES[3], False, (-1, -1), 6.0, torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("backend,deterministic", VARLEN_BACKENDS)
@pytest.mark.parametrize("case,causal,window,spread,sinks_dtype,dtype", SINKS_CASES, ids=str)
def test_varlen_sinks_match_oracle(backend, deterministic, case, causal, window, spread, sinks_dtype, dtype):
    check_varlen(backend, deterministic, case, causal, dtype, window, sinks=(spread, sinks_dtype))


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_dropout_matches_the_oracle_with_the_kernels_masks(deterministic, causal, dropout_seeds):
    """Sequence b draws batch entry b's dropout stream (kernels_keep_masks
    draws it again): out and gradients within the rule given those masks."""
    p, case = 0.3, ((19, 1, 26), (33, 4, 20), 4, 2, 32)
    q, k, v, cu_q, cu_k, max_q, max_k = packed(case, torch.bfloat16, device_for("triton"))
    out = pyext.flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, dropout_p=p,
                                       deterministic=deterministic, backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    keeps = attention_varlen.kernels_keep_masks(dropout_seeds[-1], cu_q, cu_k, q.shape[1], p)
    scale = q.shape[-1] ** -0.5
    sequence = iter(keeps)

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        o = fn(*leaves)
        return [o] + list(torch.autograd.grad(o, leaves, dout.to(dtype)))
    ref = run(lambda *t: reference.attention_varlen(*t, cu_q, cu_k, scale=scale, causal=causal, dropout_p=p,
                                                    keeps=keeps)[0], torch.float64)
    pt = run(lambda *t: per_sequence(lambda q_, k_, v_, sq, sk: (attention_with_dropout(
        q_, k_, v_, scale, causal, sk - sq, next(sequence), p), None), *t, cu_q, cu_k)[0], torch.bfloat16)
    assert_all_close(["out", "dq", "dk", "dv"], [out, *grads], ref, pt)


@pytest.mark.parametrize("sinks", [False, True], ids=["", "sinks"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_kernels_write_every_element(deterministic, sinks):
    """Outputs and gradients poisoned with NaN: every row is written, those
    of a sequence with no keys (zeros; lse -inf, or the sink's) and those of
    the rows past the longest sequence's blocks alike; with sinks out_lo too."""
    from pyext.triton_kernels import flash_attention as kernels
    q, k, v, cu_q, cu_k, max_q, max_k = packed(((33, 5, 0, 18), (20, 0, 4, 18), 4, 2, 32), torch.bfloat16,
                                               device_for("triton"))
    q, k, v = (t.detach() for t in (q, k, v))
    sinks = torch.randn(q.shape[1], device=q.device) if sinks else None
    scale = 32 ** -0.5  # the default: out_lo with sinks only
    out, lse, *out_lo = kernels.flash_attn_varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale, True, sinks=sinks,
                                                      out=poisoned_like(q), lse=poisoned_like(q[:, :, 0].T.float()),
                                                      out_lo=poisoned_like(q))
    assert len(out_lo) == (sinks is not None)
    grads = kernels.flash_attn_varlen_bwd(torch.randn_like(out), q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale,
                                          True, deterministic, *(poisoned_like(t) for t in (q, k, v)), sinks=sinks,
                                          out_lo=out_lo[0] if out_lo else None)
    for name, t in zip(["out", "lse", "dq", "dk", "dv", "dsinks", "out_lo"], [out, lse, *grads, *out_lo]):
        assert not t.isnan().any(), f"{name}: an element was never written"
    no_keys = torch.full_like(lse[:, 33:38], float("-inf")) if sinks is None else sinks[:, None].expand(-1, 5)
    assert torch.equal(out[33:38], torch.zeros_like(out[33:38]))
    torch.testing.assert_close(lse[:, 33:38], no_keys)  # the sink's, through log2(e) and back


@pytest.mark.parametrize("sinks", [False, True], ids=["", "sinks"])
@pytest.mark.parametrize("offsets", [([0, 3, 3, 5], [0, 0, 0, 0]), ([0], [0])], ids=["no_keys", "no_sequences"])
def test_a_batch_with_no_keys_or_no_sequences_writes_every_element(offsets, sinks):
    """The kernels launch nothing there and fill in what every row gets
    with no key to see: out and every gradient 0, lse -inf or the sink's."""
    from pyext.triton_kernels import flash_attention as kernels
    device = device_for("triton")
    cu_q, cu_k = (torch.tensor(o, dtype=torch.int32, device=device) for o in offsets)
    q = make_tensor((offsets[0][-1], 4, 16), torch.bfloat16, device)
    k, v = (make_tensor((0, 2, 16), torch.bfloat16, device) for _ in range(2))
    sinks = torch.randn(4, device=device) if sinks else None
    out, lse, *out_lo = kernels.flash_attn_varlen_fwd(q, k, v, cu_q, cu_k, 3, 0, 0.25, False, sinks=sinks,
                                                      out=poisoned_like(q), lse=poisoned_like(q[:, :, 0].T.float()),
                                                      out_lo=poisoned_like(q))
    grads = kernels.flash_attn_varlen_bwd(torch.randn_like(out), q, k, v, out, lse, cu_q, cu_k, 3, 0, 0.25, False,
                                          True, *(poisoned_like(t) for t in (q, k, v)), sinks=sinks,
                                          out_lo=out_lo[0] if out_lo else None)
    no_keys = torch.full_like(lse, float("-inf")) if sinks is None else sinks[:, None].expand_as(lse)
    assert torch.equal(lse, no_keys)
    for t in (out, *out_lo, *grads):
        assert torch.equal(t, torch.zeros_like(t))
    assert len(grads) == 3 + (sinks is not None)


@pytest.mark.parametrize("deterministic", [False, True])
def test_views_of_one_qkv_projection_need_no_copy_to_be_right(deterministic):
    """q, k, v as views of one (total, 3, H, D) projection (FlashAttention's
    qkvpacked layout; strides of 3 H D per row) give what contiguous copies
    give, bit for bit, gradients too."""
    lens = (17, 1, 33, 20)
    cu, longest = offsets(lens, device_for("triton")), max(lens)
    qkv = make_tensor((sum(lens), 3, 2, 32), torch.bfloat16, device_for("triton"), requires_grad=True)
    views = qkv.unbind(1)
    copies = [t.detach().contiguous().requires_grad_() for t in views]
    dout = torch.randn_like(copies[0])

    def run(q, k, v, leaves):
        out = pyext.flash_attention_varlen(q, k, v, cu, cu, longest, longest, causal=True,
                                           deterministic=deterministic, backend="triton")
        return [out, *torch.autograd.grad(out, leaves, dout)]
    strided = run(*views, [qkv])
    contiguous = run(*copies, copies)
    assert torch.equal(strided[0], contiguous[0])
    if deterministic:  # atomic dQ: the order of the additions, so the last bits, vary run to run
        assert torch.equal(strided[1], torch.stack(contiguous[1:], 1))


def test_deterministic_backward_gives_the_same_bits_every_run():
    q, k, v, cu_q, cu_k, max_q, max_k = packed(CASES[1], torch.bfloat16, device_for("triton"))
    dout = torch.randn(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype, device=q.device)

    def grads():
        out = pyext.flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=True, deterministic=True,
                                           backend="triton")
        return torch.autograd.grad(out, (q, k, v), dout)
    assert all(torch.equal(a, b) for a, b in zip(grads(), grads()))


def test_float32_goes_to_the_reference_under_auto_and_is_named_otherwise():
    q, k, v, cu_q, cu_k, max_q, max_k = packed(CASES[2], torch.float32, device_for("triton"))
    out = pyext.flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=True)
    assert torch.equal(out, reference.attention_varlen(q, k, v, cu_q, cu_k, causal=True)[0])
    with pytest.raises(pyext.BackendUnavailable, match="float32"):
        pyext.flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, backend="triton")


def test_auto_runs_the_kernels(auto_runs_the_triton_kernels, monkeypatch):
    calls = []
    monkeypatch.setitem(attention_varlen.VARLEN_FWD, "triton", lambda *a: calls.append(1) or
                        torch.ops.pyext.flash_attn_varlen_fwd_triton(*a))
    q, k, v, cu_q, cu_k, max_q, max_k = packed(CASES[1], torch.bfloat16, device_for("triton"))
    pyext.flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=True)
    assert calls == [1]


@pytest.mark.gpu
def test_cuda_backend_names_packed_batches_as_what_it_lacks():
    q, k, v, cu_q, cu_k, max_q, max_k = packed(CASES[1], torch.bfloat16, "cuda")
    with pytest.raises(pyext.BackendUnavailable, match="packed batch"):
        pyext.flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, backend="cuda")


def _bad(change):
    """flash_attention_varlen's arguments for CASES[1], with `change` applied to them (a dict)."""
    q, k, v, cu_q, cu_k, max_q, max_k = packed(CASES[1], torch.bfloat16, "cpu")
    args = dict(q=q.detach(), k=k.detach(), v=v.detach(), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                max_seqlen_k=max_k)
    change(args)
    return args


BAD = [
    ("k in another dtype", lambda a: a.update(k=a["k"].half()), RuntimeError, "same dtype"),
    ("4-D q", lambda a: a.update(q=a["q"][None]), RuntimeError, "3-D"),
    ("head dims differ", lambda a: a.update(k=a["k"][..., :32]), RuntimeError, "head dim"),
    ("v rows differ", lambda a: a.update(v=a["v"][1:]), RuntimeError, "same rows"),
    ("3 query heads over 2", lambda a: a.update(q=a["q"][:, :3]), RuntimeError, "multiple"),
    ("float offsets", lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"].float()), RuntimeError, "int32 or int64"),
    ("2-D offsets", lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"][None]), RuntimeError, "1-D"),
    ("offset counts differ", lambda a: a.update(cu_seqlens_k=a["cu_seqlens_k"][:-1]), RuntimeError, "offsets"),
    ("offsets not a tensor", lambda a: a.update(cu_seqlens_q=[0, 17]), TypeError, "cu_seqlens_q must be a Tensor"),
    ("offsets elsewhere", lambda a: a.update(cu_seqlens_k=a["cu_seqlens_k"].to("meta")), RuntimeError,
     "cu_seqlens_k on q's device"),
    ("integer q, k, v", lambda a: a.update({n: a[n].to(torch.int32) for n in "qkv"}), RuntimeError, "floating-point"),
    ("dropout_p of 1", lambda a: a.update(dropout_p=1.0), ValueError, "dropout_p"),
    ("max_seqlen not an int", lambda a: a.update(max_seqlen_q=33.0), ValueError, "max_seqlen_q"),
    ("max_seqlen a bool", lambda a: a.update(max_seqlen_k=True), ValueError, "max_seqlen_k"),
    ("max_seqlen a float tensor", lambda a: a.update(max_seqlen_q=torch.tensor(33.0)), ValueError, "max_seqlen_q"),
    ("window below -1", lambda a: a.update(window_size=(-2, 0)), ValueError, "flash_attention_varlen: window_size"),
    ("negative softcap", lambda a: a.update(softcap=-1.0), ValueError, "flash_attention_varlen: softcap"),
    ("one sink per key head", lambda a: a.update(sinks=torch.zeros(2)), ValueError,
     r"one logit per query head, shape \[4\], got \[2\]"),
    ("first offset not 0", lambda a: a["cu_seqlens_q"].add_(1), ValueError, "rise from 0"),
    ("last offset short", lambda a: a.update(q=a["q"][:-1]), ValueError, "rise from 0"),
    ("offsets fall", lambda a: a["cu_seqlens_k"].copy_(torch.tensor([0, 20, 18, 25, 58, 67])), ValueError,
     "never falling"),
    ("a sequence past max_seqlen", lambda a: a.update(max_seqlen_q=32), ValueError,
     "sequence 3 has 33 rows, more than max_seqlen_q=32"),
]


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("what,change,error,match", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_raise_before_any_launch(backend, what, change, error, match, monkeypatch):
    def launched(*_):
        raise AssertionError("a kernel was launched")
    monkeypatch.setitem(attention_varlen.VARLEN_FWD, "triton", launched)
    with pytest.raises(error, match=match):
        pyext.flash_attention_varlen(**_bad(change), backend=backend)


def test_max_seqlens_may_be_any_integer():
    """numpy's integers and one-element integer tensors (what
    cu_seqlens.diff().max() gives) stand for the ints they hold."""
    import numpy as np
    q, k, v, cu_q, cu_k, max_q, max_k = (t.detach() if isinstance(t, torch.Tensor) else t
                                         for t in packed(CASES[1], torch.bfloat16, "cpu"))
    expected = pyext.flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, backend="torch")
    for given in (np.int64, torch.tensor, lambda n: torch.tensor([n], dtype=torch.int32)):
        out = pyext.flash_attention_varlen(q, k, v, cu_q, cu_k, given(max_q), given(max_k), backend="torch")
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_more_sequences_than_the_grid_takes_are_named_by_the_triton_backend():
    """Sequence b is the kernels' grid axis 2 (at most 65535): a batch of
    more runs the reference under auto, and a named Triton backend says why."""
    device = device_for("triton")
    q = make_tensor((0, 2, 16), torch.bfloat16, device)
    offsets = torch.zeros(65537, dtype=torch.int32, device=device)
    with pytest.raises(pyext.BackendUnavailable, match="65536 sequences, past 65535"):
        pyext.flash_attention_varlen(q, q, q, offsets, offsets, 0, 0, backend="triton")


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_vmap_over_packed_batches_is_a_loop_over_them(backend):
    """torch.func.vmap over a batch of packed batches with the same offsets
    (an ensemble's, say): under auto and torch, what a loop over them gives."""
    q, k, v, cu_q, cu_k, max_q, max_k = (t.detach() if isinstance(t, torch.Tensor) else t
                                         for t in packed(CASES[1], torch.bfloat16, "cpu"))
    qs, ks, vs = (torch.stack([t, t.flip(0)]) for t in (q, k, v))

    def attend(q, k, v):
        return pyext.flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=True, backend=backend)
    expected = torch.stack([attend(*t) for t in zip(qs, ks, vs)])
    torch.testing.assert_close(torch.vmap(attend)(qs, ks, vs), expected, rtol=0, atol=0)


def test_offsets_that_hold_no_values_are_not_read():
    """Under FakeTensorMode (shapes traced without data) and on the meta
    device the offsets cannot be read: the Triton op's shapes come out, as
    the op itself gives them."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    q, k, v, cu_q, cu_k, max_q, max_k = (t.detach() if isinstance(t, torch.Tensor) else t
                                         for t in packed(CASES[1], torch.bfloat16, device_for("triton")))
    mode = FakeTensorMode()
    for tensors, context in (((mode.from_tensor(t) for t in (q, k, v, cu_q, cu_k)), mode),
                             ((t.to("meta") for t in (q, k, v, cu_q, cu_k)), contextlib.nullcontext())):
        tensors = list(tensors)
        with context:
            out = pyext.flash_attention_varlen(*tensors, max_q, max_k, causal=True, backend="triton")
        assert out.shape == (q.shape[0], q.shape[1], v.shape[2])


def test_offsets_are_checked_once_per_tensor_until_written(monkeypatch):
    """The layers of a model share one batch's offsets: copied to the host
    once, and again after an in-place write (which must be checked again)."""
    q, k, v, cu_q, cu_k, max_q, max_k = packed(CASES[1], torch.bfloat16, device_for("triton"))
    copies, tolist = [], torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: copies.append(t) or tolist(t))

    def call():
        return pyext.flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, backend="triton")
    for _ in range(3):
        call()
    assert len(copies) == 2 and copies[0] is cu_q and copies[1] is cu_k
    cu_q[1] += 1  # sequence 0 one row longer, sequence 1 one shorter: still valid, checked again
    call()
    assert len(copies) == 3 and copies[2] is cu_q
    cu_q[4] = 52  # sequence 3 one past max_seqlen_q
    with pytest.raises(ValueError, match="sequence 3 has 34 rows"):
        call()


def test_opcheck():
    q, k, v, cu_q, cu_k, max_q, max_k = packed(CASES[1], torch.bfloat16, device_for("triton"))
    sinks = torch.randn(q.shape[1], device=q.device, requires_grad=True)
    args = (q, k, v, cu_q, cu_k, max_q, max_k, 0.25, True, 4, -1, 2.0, sinks, 0.0, None)
    torch.library.opcheck(torch.ops.pyext.flash_attn_varlen_fwd_triton, args)
    with torch.no_grad():
        out, lse, out_lo = torch.ops.pyext.flash_attn_varlen_fwd_triton(*args)
    detached = [t.detach() if isinstance(t, torch.Tensor) else t for t in args]
    torch.library.opcheck(torch.ops.pyext.flash_attn_varlen_bwd_triton,
                          (torch.randn_like(out), *detached[:3], out, out_lo, lse, *detached[3:], True))


@pytest.mark.parametrize("compiler", COMPILERS)
def test_compile_fullgraph(compiler):
    """No graph break (the offsets' host check is skipped while tracing);
    the compiled gradients, the sinks' included, are eager's, bit for bit
    (deterministic backward)."""
    q, k, v, cu_q, cu_k, max_q, max_k = packed(CASES[1], torch.bfloat16, device_for("triton"))
    sinks = torch.randn(q.shape[1], device=q.device)

    def f(q, k, v, sinks):
        return pyext.flash_attention_varlen(q * 2, k, v, cu_q, cu_k, max_q, max_k, causal=True, sinks=sinks,
                                            deterministic=True, backend="triton").float().square().sum()

    def grads(fn):
        leaves = [t.detach().requires_grad_() for t in (q, k, v, sinks)]
        return torch.autograd.grad(fn(*leaves), leaves)
    torch._dynamo.reset()
    compiled = grads(torch.compile(f, fullgraph=True, backend=compiler))
    assert all(torch.equal(c, e) for c, e in zip(compiled, grads(f)))


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_the_reference_path_compiles_in_one_graph(backend):
    """The reference (backend "torch", and "auto" where the kernels do not
    run: here the CPU) reads the offsets on the host, which a trace cannot
    follow: fullgraph raised GuardOnDataDependentSymNode. Traced, it is one
    op (and its backward one): the eager values and gradients, bit for bit."""
    q, k, v = (torch.randn(7, 2, 16, dtype=torch.bfloat16) for _ in range(3))
    sinks = torch.randn(2)
    cu = torch.tensor([0, 2, 7], dtype=torch.int32)

    def f(q, k, v, sinks):
        out, lse = pyext.flash_attention_varlen(q, k, v, cu, cu, 5, 5, causal=True, window_size=(3, 0), sinks=sinks,
                                                return_lse=True, backend=backend)
        return out.float().square().sum() + lse.sum()

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
        loss = fn(*leaves)
        return [loss] + list(torch.autograd.grad(loss, leaves))
    torch._dynamo.reset()
    compiled = grads(torch.compile(f, fullgraph=True, backend="aot_eager"))
    assert all(torch.equal(c, e) for c, e in zip(compiled, grads(f)))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_gradcheck_of_the_reference_in_float64(compiled):
    """Finite differences against the reference's gradients, q, k, v and the
    sinks, with a window, a cap and a sequence with no key (lengths 2, 0,
    3), eager and compiled (traced, the reference is an op whose backward
    is another: attention_varlen_reference.py)."""
    cu_q, cu_k = (torch.tensor(b, dtype=torch.int32) for b in ([0, 2, 4, 7], [0, 3, 3, 6]))

    def f(q, k, v, sinks):
        return pyext.flash_attention_varlen(q, k, v, cu_q, cu_k, 3, 3, causal=True, window_size=(2, 0),
                                            softcap=4.0, sinks=sinks, backend="torch")
    inputs = [torch.randn(*shape, dtype=torch.float64, requires_grad=True)
              for shape in ((7, 2, 8), (6, 1, 8), (6, 1, 8), (2,))]
    torch._dynamo.reset()
    assert torch.autograd.gradcheck(torch.compile(f, fullgraph=True, backend="aot_eager") if compiled else f, inputs)


def test_the_reference_op_passes_opcheck():
    """Its autograd registration test runs the backward op too (whose own
    opcheck cannot look into the torch.func wrappers it computes with)."""
    from pyext.ops.attention_varlen_reference import flash_attn_varlen_reference
    q, k, v = (torch.randn(7, 2, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 2, 7], dtype=torch.int32)
    for sinks in (None, torch.randn(2, dtype=torch.float64, requires_grad=True)):
        torch.library.opcheck(flash_attn_varlen_reference, (q, k, v, cu, cu, 0.25, True, -1, -1, 0.0, sinks))


def test_compiled_packed_batches_of_new_lengths_reuse_one_graph():
    """Each packed batch brings its own max_seqlen: after the first, one
    graph for all (their check pinned each to its value, one graph a batch
    until the recompile limit, where fullgraph raises)."""
    from torch._dynamo.utils import counters

    def f(q, k, v, cu, longest):
        return pyext.flash_attention_varlen(q, k, v, cu, cu, longest, longest, causal=True, backend="triton")
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for n in (3, 5, 7, 9):
        q, k, v = (torch.randn(n + 2, 2, 16, dtype=torch.bfloat16) for _ in range(3))
        cu = torch.tensor([0, 2, n + 2], dtype=torch.int32)
        assert torch.equal(compiled(q, k, v, cu, n), f(q, k, v, cu, n))
    assert counters["stats"]["unique_graphs"] == 2


def test_compile_fullgraph_self_attention_with_one_offsets_tensor():
    """attention_varlen(x, x, x, cu, cu, ...), one tensor for q, k and v and
    one for both offsets, as packed self-attention calls it: no graph break
    (an autograd.Function given one tensor twice does not trace), the
    compiled gradient of x eager's, bit for bit."""
    x, _, _, cu, _, longest, _ = packed(CASES[2], torch.bfloat16, device_for("triton"))

    def f(x):
        return pyext.flash_attention_varlen(x, x, x, cu, cu, longest, longest, causal=True, deterministic=True,
                                            backend="triton").float().square().sum()

    def grad(fn):
        leaf = x.detach().requires_grad_()
        return torch.autograd.grad(fn(leaf), leaf)[0]
    torch._dynamo.reset()
    assert torch.equal(grad(torch.compile(f, fullgraph=True, backend="aot_eager")), grad(f))


def test_double_backward_under_auto_is_the_references(auto_runs_the_triton_kernels):
    """A backward with create_graph=True under auto: the reference's graph,
    so the second derivatives are the reference's own."""
    q, k, v, cu_q, cu_k, max_q, max_k = packed(CASES[3], torch.bfloat16, device_for("triton"))
    c = torch.randn(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype, device=q.device)

    def second(fn):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        first = torch.autograd.grad((fn(*leaves) * c).sum(), leaves, create_graph=True)
        return torch.autograd.grad(sum(g.float().square().sum() for g in first), leaves)
    got = second(lambda *t: pyext.flash_attention_varlen(*t, cu_q, cu_k, max_q, max_k, causal=True))
    expected = second(lambda *t: reference.attention_varlen(*t, cu_q, cu_k, causal=True)[0])
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
def test_large_packed_batch(deterministic):
    """Documents of 1 to 4096 tokens packed to 16K, Llama's heads: the rule against the oracle."""
    lengths = [4096, 1, 3000, 517, 2048, 4096, 1234, 1391]
    check_varlen("triton", deterministic, (lengths, lengths, 8, 2, 128), True)
