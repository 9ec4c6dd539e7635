"""pyext.scaled_dot_product_attention with an attn_mask: the specification.

The Triton kernels take SDPA's mask, boolean (False: not attended) or
additive (bool, float32 or the inputs' dtype), broadcast to (B, Hq, Sq, Sk)
from any shape and strides, with dropout too. "auto" leaves masked calls to
torch's SDPA until a GPU run measures ours faster (SDPA_MASK_AUTO_ORDER);
backend="triton" runs them.
"""
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import pyext
from pyext import reference
from pyext.ops import attention, attention_ops
from conftest import (ShapesMade, assert_close, device_for, hessian_vector_product, hvp_directions, make_tensor,
                      poisoned_like)
from attention_checks import attention_with_dropout, compiled_and_eager, qkv, sdpa

SHAPE = (2, 4, 2, 19, 33, 40)  # (batch, query heads, key heads, Sq, Sk, head dim): GQA, ragged lengths
# mask shapes for SHAPE, each broadcast to (B, Hq, Sq, Sk) its own way
MASK_SHAPES = {"full": (2, 4, 19, 33), "square": (19, 33), "key_padding": (2, 1, 1, 33),
               "per_head": (4, 19, 33), "transposed": (19, 33)}


def make_mask(kind, shape_name, dtype, device, shape=None):
    """A random mask: "bool" (70% attended), "additive" (float32 normal) or
    "additive_qdtype" (in the inputs' dtype). "transposed" has its last two
    dims swapped in memory."""
    shape = shape or MASK_SHAPES[shape_name]
    if shape_name == "transposed":
        shape = (*shape[:-2], shape[-1], shape[-2])
    if kind == "bool":
        mask = torch.rand(shape, device=device) > 0.3
    else:
        mask = 2 * torch.randn(shape, device=device, dtype=torch.float32 if kind == "additive" else dtype)
    return mask.transpose(-2, -1) if shape_name == "transposed" else mask


def torch_sdpa(q, k, v, mask, **kwargs):
    return sdpa(q, k, v, attn_mask=mask, enable_gqa=True, **kwargs)


def torch_math_sdpa(q, k, v, mask, **kwargs):
    """torch's SDPA on its math backend: differentiable twice (the backward
    of torch's CPU flash kernel is not), rows that see no key 0, and its
    backward from the softmax's output (see test_rows_masked_everywhere...)."""
    with sdpa_kernel(SDPBackend.MATH):
        return torch_sdpa(q, k, v, mask, **kwargs)


def check_masked(q, k, v, mask, deterministic, yardstick=torch_sdpa, **kwargs):
    """out, dq, dk, dv of backend="triton" against the float64 oracle, with
    torch in the inputs' dtype (its SDPA, unless told) as the yardstick; and
    dmask, in the mask's dtype, where the mask requires grad. On a GPU a
    float32 mask for half inputs goes to torch's math backend: its
    memory-efficient kernel refuses it, and torch 2.11's cuDNN one misreads it."""
    if yardstick is torch_sdpa and q.is_cuda and mask.dtype == torch.float32:
        yardstick = torch_math_sdpa
    learned = mask.requires_grad
    torch.use_deterministic_algorithms(deterministic)
    try:
        out = pyext.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, backend="triton", **kwargs)
    finally:
        torch.use_deterministic_algorithms(False)
    dout = torch.randn_like(out)
    ours = [out] + list(torch.autograd.grad(out, (q, k, v, mask) if learned else (q, k, v), dout))

    def run(fn, dtype, mask_dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        m = mask.detach().to(mask_dtype).requires_grad_(learned)
        o = fn(*leaves, m)
        return [o] + list(torch.autograd.grad(o, leaves + [m] if learned else leaves, dout.to(dtype)))
    scale = kwargs.get("scale")
    ref = run(lambda *t: reference.attention(*(x.reshape(-1, *x.shape[-3:]) for x in t[:3]), scale=scale,
                                             mask=t[3])[0].reshape(out.shape),  # (H, S, D): one batch
              torch.float64, mask.dtype if mask.dtype == torch.bool else torch.float64)
    pt = run(lambda *t: yardstick(*t, **kwargs), q.dtype, mask.dtype)
    failures = []
    for name, o, r, p in zip(["out", "dq", "dk", "dv", "dmask"], ours, ref, pt):
        try:
            assert_close(o, r, p, name)
        except AssertionError as e:
            failures.append(str(e).splitlines()[0])
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("shape_name", list(MASK_SHAPES))
@pytest.mark.parametrize("kind", ["bool", "additive", "additive_qdtype"])
def test_mask_matches_the_oracle(kind, shape_name, deterministic):
    q, k, v = qkv(SHAPE, torch.bfloat16, device_for("triton"))
    check_masked(q, k, v, make_mask(kind, shape_name, q.dtype, q.device), deterministic)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("shape_name", list(MASK_SHAPES))
@pytest.mark.parametrize("kind", ["additive", "additive_qdtype"])
def test_a_mask_that_requires_grad_gets_its_gradient(kind, shape_name, deterministic):
    """A learned bias passed as the mask (BEiT's and MaxViT's relative
    position bias, T5's): its gradient is dS = P (dP - D), summed over the
    dims the mask broadcasts (autograd's sum over the kernels' (B, Hq, Sq,
    Sk) dS, as over torch's), in the mask's dtype."""
    q, k, v = qkv(SHAPE, torch.bfloat16, device_for("triton"))
    check_masked(q, k, v, make_mask(kind, shape_name, q.dtype, q.device).requires_grad_(), deterministic)


def test_a_learned_bias_is_kept_for_the_backward_as_it_is_not_as_a_copy():
    """A bf16 bias (1, H, Sq, Sk) that broadcasts over the batch: the
    backward keeps the bias itself (it kept a float32 copy, per call: one
    per layer for T5's shared position bias), and sums its gradient over
    the batch in float32 (test_a_mask_that_requires_grad_gets_its_gradient
    holds the values). With 5-D inputs, whose leading dims the kernels
    flatten, the copy is the mask's leading dims alone, not its heads
    (it was (B1 * B2, H, Sq, Sk) for a mask of (B1, 1, 1, Sq, Sk)). Under
    no_grad nothing is copied."""
    q, k, v = qkv(SHAPE, torch.bfloat16, device_for("triton"))
    bias = make_mask("additive_qdtype", "per_head", q.dtype, q.device).unsqueeze(0).requires_grad_()
    q5, k5, v5 = (t.detach().reshape(1, 2, *t.shape[1:]).requires_grad_() for t in (q, k, v))
    mask5 = make_mask("bool", "full", q.dtype, q.device, shape=(1, 1, 1, *SHAPE[3:5])).expand(1, 2, 1, -1, -1)
    for inputs, mask in (((q, k, v), bias), ((q5, k5, v5), mask5)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = pyext.scaled_dot_product_attention(*inputs, attn_mask=mask, enable_gqa=True, backend="triton")
        masks = [t for t in saved if t.dim() == 4 and t.shape[-2:] == mask.shape[-2:]]
        if mask is bias:
            assert [(t.data_ptr(), t.dtype) for t in masks] == [(bias.data_ptr(), torch.bfloat16)]
            out.backward(torch.randn_like(out))
            assert bias.grad.dtype == torch.bfloat16 and bias.grad.shape == bias.shape
        else:
            assert [tuple(t.shape) for t in masks] == [(2, 1, *SHAPE[3:5])]
    copies = ShapesMade(torch.ops.aten._to_copy, torch.ops.aten.clone)
    with torch.no_grad(), copies:
        pyext.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True, backend="triton")
    assert copies.shapes == []


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("feature", ["softcap", "sinks", "dropout"])
def test_a_learned_mask_with_a_soft_cap_sinks_or_dropout_gets_its_gradient(feature, deterministic, dropout_seeds):
    """The masked calls pyext.patch makes for Gemma 2 (a cap), GPT-OSS
    (sinks) and a training model's attention dropout, their bias learned:
    the mask is added after the cap, so its gradient is dS before the cap's
    derivative; the sinks and dropout change P and dP, not the formula. The
    yardstick is the reference in the inputs' dtype (torch's SDPA has no cap
    or sinks), with the kernels' dropout mask."""
    from pyext.triton_kernels.flash_attention import dropout_keep_mask
    q, k, v = qkv(SHAPE, torch.bfloat16, device_for("triton"))
    mask = make_mask("additive_qdtype", "per_head", q.dtype, q.device).requires_grad_()
    sinks = torch.randn(SHAPE[1], device=q.device) if feature == "sinks" else None
    extras = dict(softcap=5.0 if feature == "softcap" else 0.0, sinks=sinks)
    p = 0.3 if feature == "dropout" else 0.0
    torch.use_deterministic_algorithms(deterministic)
    try:
        out = attention._scaled_dot_product_attention(q, k, v, mask, p, False, None, True, backend="triton", **extras)
    finally:
        torch.use_deterministic_algorithms(False)
    dout = torch.randn_like(out)
    ours = [out] + list(torch.autograd.grad(out, (q, k, v, mask), dout))
    keep = dropout_keep_mask(dropout_seeds[-1], *q.shape[:3], k.shape[2], p) if p else None

    def run(dtype, mask_dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)] + \
            [mask.detach().to(mask_dtype).requires_grad_()]
        o = reference.attention(*leaves[:3], mask=leaves[3], dropout_p=p, keep=keep, **extras)[0]
        return [o] + list(torch.autograd.grad(o, leaves, dout.to(dtype)))
    for name, o, r, y in zip(["out", "dq", "dk", "dv", "dmask"], ours, run(torch.float64, torch.float64),
                             run(q.dtype, mask.dtype)):
        assert_close(o, r, y, name)


def test_the_masked_op_called_directly_gives_a_broadcast_mask_its_gradient():
    """The op takes a mask of any shape that broadcasts (the public functions
    hand it one broadcast to (B, Hq, Sq, Sk)): its gradient is summed to
    that shape, as through scaled_dot_product_attention."""
    q, k, v = (t.detach() for t in qkv(SHAPE, torch.bfloat16, device_for("triton")))
    mask = make_mask("additive", "square", q.dtype, q.device).requires_grad_()
    out = torch.ops.pyext.flash_attn_masked_fwd_triton(q, k, v, mask, 0.25, 0.0, None, 0.0, None)[0]
    dout = torch.randn_like(out)
    (direct,) = torch.autograd.grad(out, mask, dout)
    out = pyext.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True, backend="triton")
    (public,) = torch.autograd.grad(out, mask, dout)
    assert direct.shape == mask.shape
    torch.testing.assert_close(direct, public)


@pytest.mark.parametrize("deterministic", [False, True])
def test_mask_that_makes_one_key_a_sink(deterministic):
    """A bias of +10 on key 0 for every row (a sink, as trained models make
    of the first token): each row's P nearly one-hot there, so its dP - D is
    a small difference and D = rowsum(dO * O) must see O to more than out's
    8 bits. With D from the rounded out, dk failed the rule in 8 of 8 seeds
    (up to 2.2x the bound); with out + out_lo, at most 0.39x."""
    q, k, v = qkv(SHAPE, torch.bfloat16, device_for("triton"))
    mask = make_mask("additive", "per_head", q.dtype, q.device)
    mask[..., 0] += 10.0
    check_masked(q, k, v, mask, deterministic)


@pytest.mark.parametrize("kind", ["bool", "additive_qdtype"])
def test_mask_in_float16_with_a_custom_scale(kind):
    q, k, v = qkv(SHAPE, torch.float16, device_for("triton"))
    check_masked(q, k, v, make_mask(kind, "full", q.dtype, q.device), False, scale=0.37)


@pytest.mark.parametrize("shape,mask_shape", [((1, 3, 3, 1, 23, 16), (1, 1, 1, 23)),
                                              ((1, 2, 2, 40, 1, 32), (40, 1))], ids=str)
def test_mask_with_one_query_or_one_key(shape, mask_shape):
    q, k, v = qkv(shape, torch.bfloat16, device_for("triton"))
    check_masked(q, k, v, make_mask("additive", None, q.dtype, q.device, mask_shape), True)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_mask_with_a_value_head_dim_of_its_own(kind):
    q, k, v = qkv((2, 4, 2, 19, 33, 40, 24), torch.bfloat16, device_for("triton"))
    check_masked(q, k, v, make_mask(kind, "key_padding", q.dtype, q.device), kind == "bool")


def test_mask_on_inputs_of_rank_3_and_bshd_views():
    """(H, S, D) inputs with an (Sq, Sk) mask; (B, S, H, D) memory viewed as (B, H, S, D)."""
    q, k, v = (t.detach()[0].requires_grad_() for t in qkv((1, 2, 2, 19, 33, 40), torch.bfloat16,
                                                           device_for("triton")))
    check_masked(q, k, v, make_mask("bool", "square", q.dtype, q.device), False)
    q, k, v = qkv(SHAPE, torch.bfloat16, device_for("triton"), layout="bshd")
    check_masked(q, k, v, make_mask("additive", "key_padding", q.dtype, q.device), True)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("fill", ["bool", "-inf", "finfo.min"])
def test_rows_masked_everywhere_give_what_torch_gives(fill, deterministic):
    """A padding mask as HF builds it: batch 1's last 12 keys masked, and
    query rows 3 and 4 of batch 0 masked everywhere. With False or -inf such
    rows are 0, with zero gradients (torch's SDPA); with finfo.min, a finite
    value, they are an even average of V, as torch's softmax makes them.
    The yardstick is torch's math backend in the dtype: torch's fused CPU
    kernel recomputes a finfo.min row's P from its lse, m + log(l) with m
    near -3.4e38, which is m, and gets its gradients wrong by ~20 (the
    kernels keep m and l apart for this), so the rule would pass anything
    against it; and a fused GPU kernel need not give 0 for a row that sees
    no key."""
    q, k, v = qkv(SHAPE, torch.bfloat16, device_for("triton"))
    masked = torch.zeros(2, 1, 19, 33, dtype=torch.bool, device=q.device)
    masked[1, :, :, -12:] = True
    masked[0, :, 3:5, :] = True
    if fill == "bool":
        mask = ~masked
    else:
        value = float("-inf") if fill == "-inf" else torch.finfo(q.dtype).min
        mask = torch.zeros(masked.shape, dtype=q.dtype, device=q.device).masked_fill(masked, value)
    check_masked(q, k, v, mask, deterministic, yardstick=torch_math_sdpa)


def structured_mask(name, batch, seq_q, seq_k, device):
    """Boolean masks with whole blocks to skip (row_spans and col_spans in
    triton_kernels/flash_attention/mask_spans.py): a causal mask given as a mask,
    right and left padding of the keys, HF's decoder mask (causal and right
    padding), and a causal sliding window of 20 keys (blocks to skip before
    and after each row's keys), (B, 1, Sq, Sk) or (B, 1, 1, Sk)."""
    rows, cols = torch.arange(seq_q, device=device)[:, None], torch.arange(seq_k, device=device)
    lengths = torch.tensor([seq_k, seq_k - 21][:batch], device=device)
    right = cols[None, :] < lengths[:, None]
    left = cols[None, :] >= (seq_k - lengths)[:, None]
    causal = cols[None, :] <= rows + seq_k - seq_q
    window = causal & (cols[None, :] > rows + seq_k - seq_q - 20)
    return {"causal": causal.expand(batch, 1, seq_q, seq_k), "right_padding": right[:, None, None, :],
            "left_padding": left[:, None, None, :],
            "causal_and_padding": causal[None, None] & right[:, None, None, :],
            "sliding_window": window.expand(batch, 1, seq_q, seq_k)}[name]


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("name", ["causal", "right_padding", "left_padding", "causal_and_padding", "sliding_window"])
def test_structured_masks_whose_blocks_the_kernels_skip(name, deterministic):
    """The kernels skip key blocks outside a query block's attended keys and
    query blocks outside a key block's attending rows: lengths spanning
    several blocks (16 under the interpreter, 32-128 on a GPU), so a wrong
    bound drops whole blocks."""
    q, k, v = qkv((2, 2, 1, 45, 70, 32), torch.bfloat16, device_for("triton"))
    check_masked(q, k, v, structured_mask(name, 2, 45, 70, q.device), deterministic)


def test_the_block_bounds_of_a_boolean_mask():
    """Per query row its first attended key and one past its last, per key its
    first attending row and one past its last, (Sk, 0) and (Sq, 0) for none:
    from the mask's own extent when broadcast."""
    from pyext.triton_kernels.flash_attention.launch import _mask_view
    from pyext.triton_kernels.flash_attention.mask_spans import col_spans, row_spans
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 1]], dtype=torch.bool)
    cpu = torch.device("cpu")

    def spans(m, shape):
        view = _mask_view(m, shape, cpu)[0]
        return row_spans(view)[0, -1].tolist(), col_spans(view)[0, -1].tolist()
    assert spans(mask, (1, 1, 3, 4)) == ([[1, 3], [4, 0], [0, 4]], [[2, 3], [0, 1], [0, 1], [2, 3]])
    assert spans(mask[:, :1], (1, 2, 3, 4)) == ([[4, 0], [4, 0], [0, 4]], [[2, 3]] * 4)  # the same for every key
    assert spans(mask[:1], (1, 2, 3, 4)) == ([[1, 3]] * 3, [[3, 0], [0, 3], [0, 3], [3, 0]])  # every row
    assert row_spans(_mask_view(torch.randn(3, 4), (1, 1, 3, 4), cpu)[0]) is None  # additive: no bounds


def reference_spans(mask, dim):
    """(first nonzero index, one past the last) along dim, (n, 0) where none: by the definition."""
    n = mask.shape[dim]
    index = torch.arange(n).view(-1, *([1] * (-dim - 1)))
    first = torch.where(mask, index, n).amin(dim)
    end = torch.where(mask, index + 1, 0).amax(dim)
    return torch.stack([first, end], -1)


@pytest.mark.parametrize("extent", [(2, 3, 37, 53), (2, 1, 37, 53), (2, 1, 1, 53), (1, 1, 37, 1), (2, 3, 1, 1)],
                         ids=str)
def test_the_block_bounds_of_random_masks(extent):
    """row_spans and col_spans of sparse random masks (a row or key with no
    hit among them) over several of the kernel's blocks, broadcast from the
    mask's own extent to (2, 3, 37, 53), against the definition."""
    from pyext.triton_kernels.flash_attention.launch import _mask_view
    from pyext.triton_kernels.flash_attention.mask_spans import col_spans, row_spans
    g = torch.Generator().manual_seed(sum(extent))
    mask = torch.rand(extent, generator=g) < (0.05 if math.prod(extent) > 100 else 0.5)
    shape = (2, 3, 37, 53)
    view = _mask_view(mask, shape, torch.device("cpu"))[0]
    full = mask.expand(shape)
    assert torch.equal(row_spans(view), reference_spans(full, -1).int())
    assert torch.equal(col_spans(view), reference_spans(full, -2).int())


@pytest.mark.parametrize("deterministic", [False, True])
def test_mask_with_dropout_matches_the_oracle_with_the_kernels_mask(deterministic, dropout_seeds):
    from pyext.triton_kernels.flash_attention import dropout_keep_mask
    p = 0.3
    q, k, v = qkv(SHAPE, torch.bfloat16, device_for("triton"))
    mask = make_mask("bool", "key_padding", q.dtype, q.device)
    torch.use_deterministic_algorithms(deterministic)
    try:
        out = pyext.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, enable_gqa=True,
                                                 backend="triton")
    finally:
        torch.use_deterministic_algorithms(False)
    dout = torch.randn_like(out)
    ours = [out] + list(torch.autograd.grad(out, (q, k, v), dout))
    keep = dropout_keep_mask(dropout_seeds[-1], *q.shape[:3], k.shape[2], p)
    scale = q.shape[-1] ** -0.5

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        o = fn(*leaves)
        return [o] + list(torch.autograd.grad(o, leaves, dout.to(dtype)))
    ref = run(lambda *t: reference.attention(*t, dropout_p=p, keep=keep, mask=mask)[0], torch.float64)
    pt = run(lambda *t: attention_with_dropout(*t, scale, False, 0, keep & mask, p), q.dtype)
    for name, o, r, y in zip(["out", "dq", "dk", "dv"], ours, ref, pt):
        assert_close(o, r, y, name)


def test_mask_double_backward_under_auto_is_the_references(monkeypatch, auto_runs_the_triton_kernels):
    """A backward with create_graph=True through masked attention, the
    kernels chosen by auto: the reference differentiates the same mask."""
    monkeypatch.setattr(attention, "SDPA_MASK_AUTO_ORDER", ("triton",))
    calls, forward = [], attention_ops.MASKED_FWD["triton"]
    monkeypatch.setitem(attention_ops.MASKED_FWD, "triton", lambda *a: calls.append(1) or forward(*a))
    q, k, v = (t.detach() for t in qkv((1, 2, 2, 17, 24, 16), torch.float16, device_for("triton")))
    mask = make_mask("additive", None, q.dtype, q.device, (17, 24))
    c, r = hvp_directions(q.shape, (q, k, v))
    got = hessian_vector_product(lambda *t: pyext.scaled_dot_product_attention(*t, attn_mask=mask), (q, k, v), c, r)
    assert calls == [1]
    want = hessian_vector_product(lambda *t: reference.attention(*t, mask=mask)[0], [t.double() for t in (q, k, v)],
                                  c, r)
    same_dtype = hessian_vector_product(lambda *t: torch_math_sdpa(*t, mask), (q, k, v), c, r)
    for name, g, w, pt in zip(("q", "k", "v"), got, want, same_dtype):
        assert_close(g, w, pt, f"Hessian-vector product, {name}")


def test_a_learned_mask_gets_its_gradient_in_a_double_backward(monkeypatch, auto_runs_the_triton_kernels):
    """create_graph=True through a masked call the kernels ran (auto): the
    reference's gradients, the mask's among them, each differentiable (the
    second derivatives: test_mask_double_backward_under_auto_is_the_references)."""
    monkeypatch.setattr(attention, "SDPA_MASK_AUTO_ORDER", ("triton",))
    calls, forward = [], attention_ops.MASKED_FWD["triton"]
    monkeypatch.setitem(attention_ops.MASKED_FWD, "triton", lambda *a: calls.append(1) or forward(*a))
    q, k, v = qkv((1, 2, 2, 17, 24, 16), torch.float16, device_for("triton"))
    mask = make_mask("additive", None, q.dtype, q.device, (17, 24)).requires_grad_()

    dout = torch.randn(q.shape, dtype=q.dtype, device=q.device)

    def grads(fn, *inputs):
        out = fn(*inputs)
        return torch.autograd.grad(out, inputs, dout.to(out.dtype), create_graph=True)
    got = grads(lambda *t: pyext.scaled_dot_product_attention(*t[:3], attn_mask=t[3]), q, k, v, mask)
    assert calls == [1] and all(g.requires_grad for g in got)
    want = grads(lambda *t: reference.attention(*t[:3], mask=t[3])[0],
                 *(t.detach().double().requires_grad_() for t in (q, k, v, mask)))
    same_dtype = grads(lambda *t: torch_math_sdpa(*t), *(t.detach().requires_grad_() for t in (q, k, v, mask)))
    for name, g, w, pt in zip(("dq", "dk", "dv", "dmask"), got, want, same_dtype):
        assert_close(g, w, pt, name)


@pytest.mark.parametrize("bad,why", [("integer", "bool or floating"), ("other_device", "on meta")])
def test_the_masked_ops_refuse_a_mask_they_cannot_read_before_any_launch(bad, why):
    """Direct callers of the launch functions (what the ops run; no SDPA checks
    in front): a clear error, never a wild read. (A meta tensor stands for a
    mask on another device: through the op, torch would dispatch it to the
    fake implementation.)"""
    from pyext.triton_kernels import flash_attention as kernels
    q, k, v = (t.detach() for t in qkv((1, 2, 1, 9, 12, 16), torch.bfloat16, device_for("triton")))
    mask = (torch.ones(9, 12, dtype=torch.int32, device=q.device) if bad == "integer"
            else torch.ones(9, 12, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match=why):
        kernels.flash_attn_fwd(q, k, v, 0.25, False, 0, mask=mask)
    out, stats, out_lo = kernels.flash_attn_fwd(q, k, v, 0.25, False, 0, mask=torch.ones(9, 12, dtype=torch.bool,
                                                                                         device=q.device))
    with pytest.raises(ValueError, match=why):
        kernels.flash_attn_bwd(out, q, k, v, out, stats, 0.25, False, 0, True, mask=mask, out_lo=out_lo)


@pytest.mark.parametrize("deterministic", [False, True])
def test_masked_kernels_write_every_element(deterministic):
    from pyext.triton_kernels import flash_attention as kernels
    q, k, v = (t.detach() for t in qkv(SHAPE, torch.bfloat16, device_for("triton")))
    mask = make_mask("additive", "key_padding", q.dtype, q.device)
    stats = torch.full((*q.shape[:3], 2), float("nan"), device=q.device)
    out, stats, out_lo = kernels.flash_attn_fwd(q, k, v, 0.3, False, 0, out=poisoned_like(q), lse=stats, mask=mask)
    assert not out.isnan().any() and not stats.isnan().any()
    dmask = torch.full((*q.shape[:3], k.shape[2]), float("nan"), dtype=mask.dtype, device=q.device)
    grads = kernels.flash_attn_bwd(torch.randn_like(out), q, k, v, out, stats, 0.3, False, 0, deterministic,
                                   dq=poisoned_like(q), dk=poisoned_like(k), dv=poisoned_like(v), mask=mask,
                                   out_lo=out_lo, dmask=dmask)
    assert not any(g.isnan().any() for g in (*grads, dmask))


@pytest.mark.parametrize("sinks", [False, True], ids=["", "sinks"])
def test_masked_kernels_with_no_keys_write_every_element(sinks):
    """Sk = 0: nothing launches; each row's statistics are those of no key,
    (max, sum) = (-inf, 0), or the sink's (sink * log2(e), 1), out and
    every gradient 0."""
    from pyext.triton_kernels import flash_attention as kernels
    q, k, v = (t.detach() for t in qkv((1, 2, 1, 9, 0, 16), torch.bfloat16, device_for("triton")))
    mask = torch.ones(9, 0, dtype=torch.bool, device=q.device)
    sinks = torch.randn(2, device=q.device) if sinks else None
    stats = torch.full((*q.shape[:3], 2), float("nan"), device=q.device)
    out, stats, out_lo = kernels.flash_attn_fwd(q, k, v, 0.3, False, 0, out=poisoned_like(q), lse=stats, mask=mask,
                                                sinks=sinks)
    start = torch.full_like(stats[..., 0], float("-inf")) if sinks is None else \
        (sinks.view(1, 2, 1) * 1.4426950408889634).expand_as(stats[..., 0])
    torch.testing.assert_close(stats, torch.stack([start, torch.full_like(start, float(sinks is not None))], -1))
    grads = kernels.flash_attn_bwd(torch.randn_like(out), q, k, v, out, stats, 0.3, False, 0, True,
                                   dq=poisoned_like(q), dk=poisoned_like(k), dv=poisoned_like(v), mask=mask,
                                   sinks=sinks, out_lo=out_lo)
    for t in (out, out_lo, *grads):
        assert torch.equal(t, torch.zeros_like(t))


@pytest.mark.parametrize("layout", ["contiguous", "bshd"])
@pytest.mark.parametrize("dropout_p,sinks,learned", [(0.0, False, False), (0.2, False, False), (0.0, True, False),
                                                     (0.2, True, True)], ids=str)
def test_opcheck_masked(layout, dropout_p, sinks, learned):
    """learned: an additive mask whose gradient the backward gives (mask_grad)."""
    q, k, v = qkv((1, 2, 1, 9, 12, 16), torch.bfloat16, device_for("triton"), layout)
    mask = make_mask("additive" if learned else "bool", None, q.dtype, q.device, (1, 1, 9, 12))
    seed = torch.tensor([7], device=q.device) if dropout_p else None
    sink = torch.randn(2, device=q.device, requires_grad=True) if sinks else None
    args = (0.25, 2.5 if dropout_p else 0.0)  # scale, softcap
    torch.library.opcheck(torch.ops.pyext.flash_attn_masked_fwd_triton, (q, k, v, mask, *args, sink, dropout_p, seed))
    with torch.no_grad():
        out, stats, out_lo = torch.ops.pyext.flash_attn_masked_fwd_triton(q, k, v, mask, *args, sink, dropout_p, seed)
    sink = None if sink is None else sink.detach()
    for deterministic in (False, True):
        torch.library.opcheck(torch.ops.pyext.flash_attn_masked_bwd_triton,
                              (torch.randn_like(out), q.detach(), k.detach(), v.detach(), mask, out, out_lo, stats,
                               *args, sink, dropout_p, seed, deterministic, learned))


def test_the_masked_backward_gives_a_half_masks_gradient_in_its_shape_and_dtype_and_refuses_a_bool_one():
    """mask_grad: the gradient of the mask as given, in its shape and dtype
    (a bf16 bias that broadcasts: summed in float32 inside the op, rounded
    once), through opcheck's fake and real runs; a boolean mask has no
    gradient to give, said before any launch."""
    q, k, v = (t.detach() for t in qkv((2, 2, 1, 9, 12, 16), torch.bfloat16, device_for("triton")))
    bias = make_mask("additive_qdtype", None, q.dtype, q.device, (1, 2, 9, 12))
    with torch.no_grad():
        out, stats, out_lo = torch.ops.pyext.flash_attn_masked_fwd_triton(q, k, v, bias, 0.25, 0.0, None, 0.0, None)
    args = (torch.randn_like(out), q, k, v, bias, out, out_lo, stats, 0.25, 0.0, None, 0.0, None, True, True)
    torch.library.opcheck(torch.ops.pyext.flash_attn_masked_bwd_triton, args)
    dmask = torch.ops.pyext.flash_attn_masked_bwd_triton(*args)[-1]
    assert dmask.shape == bias.shape and dmask.dtype == torch.bfloat16
    boolean = make_mask("bool", None, q.dtype, q.device, (1, 2, 9, 12))
    with pytest.raises(ValueError, match="mask_grad=True needs an additive"):
        torch.ops.pyext.flash_attn_masked_bwd_triton(*args[:4], boolean, *args[5:])


@pytest.mark.parametrize("learned", [False, True], ids=["bool", "learned"])
def test_compile_fullgraph_with_a_mask(learned):
    """torch.compile keeps the masked op in one graph and computes what eager
    does, its gradients within the rule; a learned mask's too."""
    q, k, v = qkv((1, 2, 2, 9, 11, 16), torch.bfloat16, device_for("triton"))
    mask = make_mask("additive" if learned else "bool", None, q.dtype, q.device, (9, 11))

    def f(q, k, v, *m, backend="triton"):
        return pyext.scaled_dot_product_attention(q * 2, k, v, attn_mask=m[0] if m else mask,
                                                  backend=backend).float().sum()

    def grads(fn, dtype=q.dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        if learned:
            leaves.append(mask.to(torch.float64 if dtype == torch.float64 else mask.dtype).requires_grad_())
        return torch.autograd.grad(fn(*leaves), leaves)
    compiled, eager = compiled_and_eager(f, grads)
    assert all(torch.equal(c, e) for c, e in zip(compiled, eager))
    ref64, pt = (grads(lambda *t: f(*t, backend="torch"), dtype) for dtype in (torch.float64, q.dtype))
    for name, g, r, p in zip(("dq", "dk", "dv", "dmask"), compiled, ref64, pt):
        assert_close(g, r, p, name)


BAD_MASKS = {  # name: (mask maker for bf16 inputs (1, 2, 7, 16), SDPA keyword arguments, the reason named)
    "integer": (lambda d: torch.ones(7, 7, dtype=torch.int32, device=d), {}, "int32"),
    "float16_for_bfloat16": (lambda d: torch.zeros(7, 7, dtype=torch.float16, device=d), {}, "float16"),
    "with_is_causal": (lambda d: torch.ones(7, 7, dtype=torch.bool, device=d), {"is_causal": True}, "is_causal"),
    "not_broadcasting": (lambda d: torch.ones(3, 7, dtype=torch.bool, device=d), {}, "does not broadcast"),
}


@pytest.mark.parametrize("case", list(BAD_MASKS))
def test_masks_the_kernels_do_not_take_go_to_torch_under_auto_and_are_named_otherwise(case):
    """auto gives torch's SDPA result, or its error; backend="triton" raises
    BackendUnavailable naming what the kernels do not take."""
    make, kwargs, reason = BAD_MASKS[case]
    device = device_for("triton")
    q, k, v = (make_tensor((1, 2, 7, 16), torch.bfloat16, device) for _ in range(3))
    mask = make(device)
    try:
        theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)
    except RuntimeError as e:
        with pytest.raises(RuntimeError, match=re.escape(str(e).splitlines()[0])):
            pyext.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs, backend="auto")
    else:
        assert torch.equal(pyext.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs), theirs)
    with pytest.raises(pyext.BackendUnavailable, match=reason):
        pyext.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs, backend="triton")


def test_a_masked_gqa_call_torch_runs_gets_its_key_heads_repeated_as_transformers_repeats_them():
    """Under backend "torch", a mask with enable_gqa goes to torch's SDPA with
    K and V repeated per query head (its fused kernels take no mask with
    enable_gqa): what torch's SDPA gives for the same call."""
    q, k, v = (t.detach() for t in qkv((2, 4, 2, 13, 21, 32), torch.bfloat16, "cpu"))
    mask = torch.rand(2, 1, 13, 21) > 0.3
    out = pyext.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, backend="torch")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))


@pytest.mark.gpu
def test_cuda_kernels_name_the_mask_as_what_they_lack():
    q = torch.randn(1, 2, 8, 16, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(8, 8, dtype=torch.bool, device="cuda")
    with pytest.raises(pyext.BackendUnavailable, match="cuda kernels have no attention mask"):
        pyext.scaled_dot_product_attention(q, q, q, attn_mask=mask, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_large_padding_mask(deterministic, head_dim):
    """An HF-style padded batch at training size: each sequence's own length, finfo.min past it."""
    q, k, v = qkv((4, 8, 8, 1024, 1024, head_dim), torch.bfloat16, "cuda")
    lengths = torch.tensor([1024, 1000, 517, 64], device="cuda")
    padding = torch.arange(1024, device="cuda")[None, :] >= lengths[:, None]
    mask = torch.zeros(4, 1, 1, 1024, dtype=q.dtype, device="cuda").masked_fill(
        padding[:, None, None, :], torch.finfo(q.dtype).min)
    check_masked(q, k, v, mask, deterministic)


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("mask_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_large_learned_bias(mask_dtype, deterministic):
    """A relative position bias at training size (T5-base: 12 heads, 512
    tokens), shared by the batch, learned: its gradient summed over 8 rows."""
    q, k, v = qkv((8, 12, 12, 512, 512, 64), torch.bfloat16, "cuda")
    bias = (2 * torch.randn(1, 12, 512, 512, device="cuda")).to(mask_dtype).requires_grad_()
    check_masked(q, k, v, bias, deterministic)
