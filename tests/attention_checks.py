"""What the attention tests share: the backends they run, q, k, v, and the
checks of each feature's outputs and gradients against the float64 oracle
with PyTorch's own attention in the test dtype as the yardstick (the rule of
conftest.assert_close)."""

import pytest
import torch
import torch.nn.functional as F

import pyext
from pyext import reference
from conftest import assert_close, device_for, make_tensor

DTYPES = [torch.bfloat16, torch.float16]
KERNEL_BACKENDS = ["triton", pytest.param("cuda", marks=pytest.mark.gpu)]
# (backend, deterministic): the Triton backward has two paths, dQ summed with
# atomics (the default) and the deterministic two-kernel one; so has the CUDA
# backward, on either stage (sm_90a and mma.sync kernels).
FLASH_KERNELS = [
    pytest.param("triton", False, id="triton-atomic"),
    pytest.param("triton", True, id="triton-deterministic"),
    pytest.param("cuda", False, id="cuda-atomic", marks=pytest.mark.gpu),
    pytest.param("cuda", True, id="cuda-deterministic", marks=pytest.mark.gpu),
]
FLASH_BACKENDS = [pytest.param("torch", False, id="torch")] + FLASH_KERNELS
# the same without CUDA: for what only the Triton kernels and the reference have (windows, caps, sinks)
TRITON_AND_REFERENCE = FLASH_BACKENDS[:3]


def qkv(shape, dtype, device, layout="contiguous"):
    """q, k, v of shape (batch, query heads, key heads, Sq, Sk, head dim[, value head dim])."""
    b, hq, hk, sq, sk, d, *dv = shape
    dv = dv[0] if dv else d
    if layout == "bshd":  # (B, S, H, D) memory viewed as (B, H, S, D), as models produce
        q = make_tensor((b, sq, hq, d), dtype, device).transpose(1, 2)
        k, v = (make_tensor((b, sk, hk, e), dtype, device).transpose(1, 2) for e in (d, dv))
    else:
        q = make_tensor((b, hq, sq, d), dtype, device)
        k, v = (make_tensor((b, hk, sk, e), dtype, device) for e in (d, dv))
    return [t.requires_grad_() for t in (q, k, v)]


def sdpa(q, k, v, **kwargs):
    """torch's SDPA, run where it can be by its fused kernel, the yardstick's
    core. Its CPU flash kernel takes v only at q's head dim; for a narrower
    v (MLA's) it would fall to its math backend, fp32 inside, whose error is
    one final rounding: a yardstick no fused kernel meets (the kernels'
    delta = rowsum(dO * O) sees O in the dtype, as torch's fused kernels'
    do). So v is zero-padded to q's head dim, as HF runs MLA on
    FlashAttention-2, and out cut back: the zero columns add nothing to any
    product (benchmarks/NOTES.md, "The yardstick of a narrower V")."""
    dv = v.shape[-1]
    if dv < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - dv))
    return F.scaled_dot_product_attention(q, k, v, **kwargs)[..., :dv]


def torch_attention(q, k, v, scale, causal, offset):
    """PyTorch's own attention in q's dtype, the yardstick of the rule: out
    from its SDPA (bottom-right causal as a mask; is_causal when Sq == Sk, so
    that its fused kernels run), with rows that see no key set to 0 as pyext
    defines them; lse from the scores computed in q's dtype. Those rows (the
    first Sq - Sk when causal) are kept out of SDPA: torch 2.11's CUDA
    kernels give a fully masked row non-finite gradients."""
    sq, sk = q.shape[2], k.shape[2]
    visible = (torch.arange(sk, device=q.device)[None, :]
               <= torch.arange(sq, device=q.device)[:, None] + offset)
    if not causal:
        out = sdpa(q, k, v, scale=scale, enable_gqa=True)
    elif sq == sk:
        out = sdpa(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        first = max(0, -offset)
        out = sdpa(q[:, :, first:], k, v, attn_mask=visible[first:], scale=scale, enable_gqa=True)
        out = F.pad(out, (0, 0, first, 0))
    scores = (q @ k.repeat_interleave(q.shape[1] // k.shape[1], dim=1).transpose(-2, -1)) * scale
    if causal:
        scores = scores.masked_fill(~visible, float("-inf"))
    return out, torch.logsumexp(scores.float(), dim=-1)


def check_flash(backend, q, k, v, causal, deterministic=False, scale=None):
    """out, lse, dq, dk, dv of `backend` against the float64 oracle, with
    PyTorch's own attention in the inputs' dtype as the yardstick."""
    out, lse = pyext.flash_attention(q, k, v, causal=causal, scale=scale, return_lse=True,
                                     deterministic=deterministic, backend=backend)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    assert_flash_close([out, lse, *grads], q, k, v, dout, scale, causal, k.shape[2] - q.shape[2])


def compiled_and_eager(loss, grads):
    """(grads(loss compiled with fullgraph=True), grads(loss)), with torch's
    deterministic algorithms on: the kernels' deterministic backward, so
    that the two agree to the bit where the compiled graph runs the same ops."""
    torch._dynamo.reset()
    torch.use_deterministic_algorithms(True)
    try:
        return grads(torch.compile(loss, fullgraph=True, backend="aot_eager")), grads(loss)
    finally:
        torch.use_deterministic_algorithms(False)


def assert_flash_close(outs, q, k, v, dout, scale, causal, offset):
    """outs = out, lse, dq, dk, dv of flash attention (bottom-right causal at
    `offset`) against the float64 oracle, PyTorch's own in q's dtype the yardstick."""
    def run(attention, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        o, lse = attention(*leaves, scale, causal, offset)
        return [o, lse] + list(torch.autograd.grad(o, leaves, dout.to(dtype)))

    ref = run(lambda *a: reference.attention(*a[:3], scale=a[3], causal=a[4], causal_offset=a[5]), torch.float64)
    pt = run(torch_attention, q.dtype)
    assert_all_close(["out", "lse", "dq", "dk", "dv"], outs, ref, pt)


def assert_all_close(names, outs, refs, pts):
    """The rule for every tensor, every failure reported: which of them are
    wrong (lse only: S = Q K^T or the softmax; dv only: P^T dO; ...) points
    at the product."""
    failures = []
    for name, o, r, p in zip(names, outs, refs, pts, strict=True):
        try:
            assert_close(o, r, p, name)
        except AssertionError as e:
            failures.append(str(e).splitlines()[0])
    assert not failures, "\n".join(failures)


def band(sq, sk, causal, window, device):
    """The (Sq, Sk) boolean mask of causality and a local window (left, right), bottom-right aligned."""
    i = torch.arange(sq, device=device)[:, None] + sk - sq
    j = torch.arange(sk, device=device)[None, :]
    visible = (j <= i) if causal else torch.ones(sq, sk, dtype=torch.bool, device=device)
    left, right = window
    return visible & ((j >= i - left) if left >= 0 else True) & ((j <= i + right) if right >= 0 else True)


def softcapped_eager(q, k, v, scale, visible, softcap):
    """PyTorch's own way to run a soft cap, the yardstick: attention written
    out in the inputs' dtype as HF's Gemma 2 eager attention computes it
    (products in the dtype, the softmax in float32; torch's SDPA has no cap),
    rows that see no key set to 0; with lse from its capped scores."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q @ k.transpose(-2, -1)) * scale
    s = softcap * torch.tanh(s / softcap)
    lse = torch.logsumexp(s.float().masked_fill(~visible, float("-inf")), -1)
    p = torch.softmax(s.masked_fill(~visible, torch.finfo(s.dtype).min), -1, dtype=torch.float32).to(q.dtype)
    return (p @ v).masked_fill(~visible.any(-1)[:, None], 0), lse


def check_softcap(backend, deterministic, shape, causal, window, softcap, scale, dtype=torch.bfloat16, inputs=None):
    """out, lse, dq, dk, dv of flash_attention with a soft cap (and a window)
    against the float64 oracle, softcapped_eager the yardstick; on random
    q, k, v of `shape` and `dtype`, or on `inputs` (q, k, v)."""
    q, k, v = inputs or qkv(shape, dtype, device_for(backend))
    out, lse = pyext.flash_attention(q, k, v, causal=causal, window_size=window, softcap=softcap, scale=scale,
                                     return_lse=True, deterministic=deterministic, backend=backend)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    visible = band(q.shape[2], k.shape[2], causal, window, q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else scale

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        o, lse_ = fn(*leaves)
        return [o, lse_] + list(torch.autograd.grad(o, leaves, dout.to(dtype)))
    ref = run(lambda *t: reference.attention(*t, scale=scale, causal=causal, causal_offset=k.shape[2] - q.shape[2],
                                             window=window, softcap=softcap), torch.float64)
    pt = run(lambda *t: softcapped_eager(*t, scale, visible, softcap), q.dtype)
    assert_all_close(["out", "lse", "dq", "dk", "dv"], [out, lse, *grads], ref, pt)


def sinks_eager(q, k, v, sinks, scale, visible):
    """PyTorch's own way to run attention sinks, the yardstick: HF's GPT-OSS
    eager attention (the sink a last column of the scores, dropped after
    the softmax), products in the inputs' dtype, the softmax in float32
    (torch's SDPA has no sinks); with lse over the scores and the sink."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = ((q @ k.transpose(-2, -1)) * scale).float().masked_fill(~visible, float("-inf"))
    s = torch.cat([s, sinks.float().view(1, -1, 1, 1).expand(*s.shape[:-1], 1)], -1)
    p = torch.softmax(s, -1)[..., :-1].to(q.dtype)
    return p @ v, torch.logsumexp(s, -1)


def check_sinks(backend, deterministic, shape, causal, window, sink_scale, sinks_dtype, dtype, inputs=None):
    """out, lse, dq, dk, dv and dsinks of flash_attention with sinks (and a
    window) against the float64 oracle, sinks_eager the yardstick; on random
    q, k, v of `shape` and `dtype` and sinks of spread `sink_scale`, or on
    `inputs` (q, k, v, sinks)."""
    if inputs is None:
        q, k, v = qkv(shape, dtype, device_for(backend))
        sinks = torch.randn(shape[1], device=q.device) * sink_scale
    else:
        q, k, v, sinks = inputs
    sinks = sinks.to(sinks_dtype).requires_grad_()
    out, lse = pyext.flash_attention(q, k, v, causal=causal, window_size=window, sinks=sinks, return_lse=True,
                                     deterministic=deterministic, backend=backend)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, sinks), dout)
    visible = band(q.shape[2], k.shape[2], causal, window, q.device)
    scale = q.shape[-1] ** -0.5

    def run(fn, dtype, sinks_dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        leaves.append(sinks.detach().to(sinks_dtype).requires_grad_())
        o, lse_ = fn(*leaves)
        return [o, lse_] + list(torch.autograd.grad(o, leaves, dout.to(dtype)))
    ref = run(lambda q, k, v, s: reference.attention(q, k, v, causal=causal, causal_offset=k.shape[2] - q.shape[2],
                                                     window=window, sinks=s), torch.float64, torch.float64)
    pt = run(lambda *t: sinks_eager(*t, scale, visible), q.dtype, sinks_dtype)
    assert_all_close(["out", "lse", "dq", "dk", "dv", "dsinks"], [out, lse, *grads], ref, pt)


def check_dropout(q, k, v, causal, deterministic, dropout_p, seeds):
    """out, dq, dk, dv of the Triton kernels with dropout against the float64
    oracle given the mask the kernels drew (dropout_keep_mask draws it again
    from the last of `seeds`, the seeds the call drew: the dropout_seeds
    fixture's list), attention_with_dropout in the inputs' dtype the
    yardstick. Returns lse, that of the undropped P."""
    from pyext.triton_kernels.flash_attention import dropout_keep_mask
    out, lse = pyext.flash_attention(q, k, v, causal=causal, dropout_p=dropout_p, return_lse=True,
                                     deterministic=deterministic, backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    offset, scale = k.shape[2] - q.shape[2], q.shape[-1] ** -0.5
    keep = dropout_keep_mask(seeds[-1], *q.shape[:3], k.shape[2], dropout_p)

    def run(attention_fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        o = attention_fn(*leaves)
        return [o] + list(torch.autograd.grad(o, leaves, dout.to(dtype)))
    ref = run(lambda *t: reference.attention(*t, scale=scale, causal=causal, causal_offset=offset,
                                             dropout_p=dropout_p, keep=keep)[0], torch.float64)
    pt = run(lambda *t: attention_with_dropout(*t, scale, causal, offset, keep, dropout_p), q.dtype)
    assert_all_close(["out", "dq", "dk", "dv"], [out, *grads], ref, pt)
    return lse


def attention_with_dropout(q, k, v, scale, causal, offset, keep, dropout_p):
    """Attention with this dropout mask in q's dtype, as torch's math SDPA
    computes (the products and the softmax in that dtype): the rule's
    yardstick for the kernels' dropout."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    visible = (torch.arange(k.shape[2], device=q.device)[None, :]
               <= torch.arange(q.shape[2], device=q.device)[:, None] + (offset if causal else k.shape[2]))
    p = ((q @ k.transpose(-2, -1)) * scale).masked_fill(~visible, float("-inf")).softmax(-1)
    p = p.masked_fill(~visible.any(-1)[:, None], 0)  # rows that see no key: 0, as pyext defines them
    return (p * keep / (1 - dropout_p)).to(q.dtype) @ v
