"""The attention ops and their autograd: flash_attn_{fwd,bwd}_{triton,cuda},
the Triton-only variants (dropout, masked, extras), their fake
implementations, and _FlashAttention, which runs the op a call needs and
carries the backward's choices.

    flash_attn_fwd(q, k, v, scale, causal, causal_offset) -> (out, lse, out_lo)
    flash_attn_bwd(dout, q, k, v, out, out_lo, lse, scale, causal, causal_offset, deterministic) -> (dq, dk, dv)

out_lo is what rounding out to its dtype left out, stored at a scale of
2/sqrt(D) or more (forward.peaky_scale; flash_attention_api.cpp's
stores_out_lo) and empty below it: such a scale makes rows of P nearly
one-hot on any data, where the backward's D = rowsum(dO * O) from the
rounded out alone costs dq and dk the rule; the backward reads out + out_lo.

Kernels cover float16/bfloat16, head dims up to 256 (multiples of 8 in the
CUDA kernels; a value head dim of its own below the query/key one in the
Triton kernels), any Sq and Sk, GQA/MQA, causal with any alignment, no mask
and no dropout.
The CUDA forward and backward run the sm_90a kernels (wgmma, TMA) on
compute capability 9.x for head dims that pad to 64 or 128, the mma.sync
kernels elsewhere; PYEXT_FLASH_SM90=0 in the environment (read per call)
forces the latter.
The Triton and CUDA backwards with deterministic=False sum dQ with atomics
(fewer products, last bits vary run to run); with True, dQ has a kernel of
its own.
The public functions carry the caller's choice from the forward to the
backward in _FlashAttention's context; a forward op called directly gets the
deterministic backward.
Dropout (Triton only): flash_attn_dropout_{fwd,bwd}_triton take dropout_p
and `seed`, a one-element int64 tensor drawn from torch's generator on the
inputs' device per call; the backward draws the forward's mask from it.
Their out_lo is stored at any scale: a row that sees one key has O = v /
(1 - dropout_p), which out rounds, and D from the rounded out costs that
row's dq the rule (triton_kernels/flash_attention/tiles.py, _low_part).
An attention mask (Triton only; SDPA's attn_mask, never with causal):
flash_attn_masked_{fwd,bwd}_triton, with dropout too (dropout_p 0 and no
seed for none); their second output is each row's (max, sum), (B, H, S, 2)
fp32, in place of lse, and their third out_lo, with or without dropout: a
bias makes P peaky, where D from the rounded out costs dq and dk the rule.
With mask_grad (an additive mask that requires grad, a learned bias) the
backward's fifth output is the mask's gradient, dS, (B, Hq, Sq, Sk) in the
mask's dtype, D then summed from the tiles (flash_attn_bwd's dmask).
The extras (Triton only): a local window, a logit soft cap and attention
sinks (flash_attention's window_size, softcap and sinks; (-1, -1), 0 and
None for none): flash_attn_extras_{fwd,bwd}_triton, with dropout too, and
out_lo as the dropout ops' with dropout, a cap, sinks or a scale of
2/sqrt(D) or more (a cap or such a scale makes P peaky, and a row that
sees one key and its sink has dS = P (1 - P) dP: small differences
again), empty with a window alone. The masked ops take a soft cap and
sinks as well (HF's Gemma 2 with a padded batch or its sliding-window mask,
GPT-OSS's, through pyext.patch). The backward ops take the sinks too, for
their gradient (their fourth output, empty without sinks); lse includes
them, so dQ, dK and dV need nothing more.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from pyext import reference
from pyext.ops._register import called_past_autograd, create_graph_grads, past_autograd, register_stages, traced_as


@torch.library.custom_op("pyext::flash_attn_fwd_triton", mutates_args=())
def flash_attn_fwd_triton(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool,
                          causal_offset: int) -> Tuple[Tensor, Tensor, Tensor]:
    from pyext.triton_kernels import flash_attention as kernels
    return _with_out_lo(kernels.flash_attn_fwd(q, k, v, scale, causal, causal_offset))


@torch.library.custom_op("pyext::flash_attn_bwd_triton", mutates_args=())
def flash_attn_bwd_triton(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, out_lo: Tensor, lse: Tensor,
                          scale: float, causal: bool, causal_offset: int,
                          deterministic: bool) -> Tuple[Tensor, Tensor, Tensor]:
    from pyext.triton_kernels import flash_attention as kernels
    return kernels.flash_attn_bwd(dout, q, k, v, out, lse, scale, causal, causal_offset, deterministic,
                                  out_lo=_out_lo_if_stored(out_lo))


@torch.library.custom_op("pyext::flash_attn_dropout_fwd_triton", mutates_args=())
def flash_attn_dropout_fwd_triton(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, causal_offset: int,
                                  dropout_p: float, seed: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    from pyext.triton_kernels import flash_attention as kernels
    return _with_out_lo(kernels.flash_attn_fwd(q, k, v, scale, causal, causal_offset, dropout_p=dropout_p, seed=seed))


@torch.library.custom_op("pyext::flash_attn_dropout_bwd_triton", mutates_args=())
def flash_attn_dropout_bwd_triton(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, out_lo: Tensor,
                                  lse: Tensor, scale: float, causal: bool, causal_offset: int, dropout_p: float,
                                  seed: Tensor, deterministic: bool) -> Tuple[Tensor, Tensor, Tensor]:
    from pyext.triton_kernels import flash_attention as kernels
    return kernels.flash_attn_bwd(dout, q, k, v, out, lse, scale, causal, causal_offset, deterministic,
                                  dropout_p=dropout_p, seed=seed, out_lo=_out_lo_if_stored(out_lo))


@torch.library.custom_op("pyext::flash_attn_masked_fwd_triton", mutates_args=())
def flash_attn_masked_fwd_triton(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, softcap: float,
                                 sinks: Optional[Tensor], dropout_p: float,
                                 seed: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    from pyext.triton_kernels import flash_attention as kernels
    return kernels.flash_attn_fwd(q, k, v, scale, False, 0, dropout_p=dropout_p, seed=seed, mask=mask,
                                  softcap=softcap, sinks=sinks)


@torch.library.custom_op("pyext::flash_attn_masked_bwd_triton", mutates_args=())
def flash_attn_masked_bwd_triton(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, out: Tensor,
                                 out_lo: Tensor, stats: Tensor, scale: float, softcap: float, sinks: Optional[Tensor],
                                 dropout_p: float, seed: Optional[Tensor], deterministic: bool,
                                 mask_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from pyext.triton_kernels import flash_attention as kernels
    ds = _ds_buffer(q, k, mask, mask_grad)
    grads = _with_dsinks(kernels.flash_attn_bwd(dout, q, k, v, out, stats, scale, False, 0, deterministic,
                                                dropout_p=dropout_p, seed=seed, mask=mask, softcap=softcap,
                                                sinks=sinks, out_lo=out_lo, dmask=ds),
                         q)
    return (*grads, mask.new_empty(0) if ds is None else ds.sum_to_size(mask.shape).to(mask.dtype))


def _ds_buffer(q: Tensor, k: Tensor, mask: Tensor, mask_grad: bool) -> Optional[Tensor]:
    """With mask_grad, where the dK/dV kernel writes dS, the gradient of an
    additive mask at each score: (B, Hq, Sq, Sk), contiguous. In the mask's
    dtype where the mask has that shape; in float32 where it broadcasts
    (a learned bias (1, H, Sq, Sk), T5's or BEiT's), so that its gradient,
    the sum over the broadcast dims, is rounded once, as torch's SDPA
    rounds it (each element rounded first put the sum of B * Hq of them
    past the rule). None without mask_grad."""
    if not mask_grad:
        return None
    if mask.dtype == torch.bool:
        raise ValueError("flash_attn_masked_bwd_triton: mask_grad=True needs an additive (floating-point) mask")
    scores = (*q.shape[:3], k.shape[2])
    return mask.new_empty(scores, dtype=mask.dtype if tuple(mask.shape) == scores else torch.float32)


def _empty_dmask(mask: Tensor, mask_grad: bool) -> Tensor:
    """The masked backward's fifth output: with mask_grad, the gradient of
    the additive mask, in its shape and dtype, contiguous; else empty."""
    return mask.new_empty(mask.shape if mask_grad else 0)


def _kernel_window(window_left: int, window_right: int):
    return None if (window_left, window_right) == (-1, -1) else (window_left, window_right)


@torch.library.custom_op("pyext::flash_attn_extras_fwd_triton", mutates_args=())
def flash_attn_extras_fwd_triton(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, causal_offset: int,
                                 window_left: int, window_right: int, softcap: float, sinks: Optional[Tensor],
                                 dropout_p: float, seed: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    from pyext.triton_kernels import flash_attention as kernels
    return _with_out_lo(kernels.flash_attn_fwd(q, k, v, scale, causal, causal_offset, dropout_p=dropout_p, seed=seed,
                                               window=_kernel_window(window_left, window_right), softcap=softcap,
                                               sinks=sinks))


@torch.library.custom_op("pyext::flash_attn_extras_bwd_triton", mutates_args=())
def flash_attn_extras_bwd_triton(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, out_lo: Tensor,
                                 lse: Tensor, scale: float, causal: bool, causal_offset: int, window_left: int,
                                 window_right: int, softcap: float, sinks: Optional[Tensor], dropout_p: float,
                                 seed: Optional[Tensor], deterministic: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    from pyext.triton_kernels import flash_attention as kernels
    return _with_dsinks(kernels.flash_attn_bwd(dout, q, k, v, out, lse, scale, causal, causal_offset, deterministic,
                                               dropout_p=dropout_p, seed=seed,
                                               window=_kernel_window(window_left, window_right), softcap=softcap,
                                               sinks=sinks, out_lo=_out_lo_if_stored(out_lo)), q)


def _with_dsinks(grads, q: Tensor):
    """(dq, dk, dv, dsinks) of a backward that may have had no sinks: dsinks
    then an empty float32 tensor (an op's outputs cannot be None)."""
    return grads if len(grads) == 4 else (*grads, q.new_empty(0, dtype=torch.float32))


def _with_out_lo(outputs):
    """(out, lse, out_lo) of a forward that may have stored no out_lo: it is
    then empty (an op's outputs cannot be None; stores_low_part says when
    flash_attn_fwd stores it)."""
    return outputs if len(outputs) == 3 else (*outputs, outputs[0].new_empty(0))


def _out_lo_if_stored(out_lo: Tensor) -> Optional[Tensor]:
    """The backward's out_lo: the forward's where it stored one (out-sized),
    else None (_with_out_lo's empty tensor; where out itself is empty, the
    backward reads neither)."""
    return out_lo if out_lo.numel() else None


def _fake_fwd_cuda(q, k, v, scale, causal, causal_offset):
    b, h, s, d = q.shape
    return q.new_empty((b, h, s, d)), q.new_empty((b, h, s), dtype=torch.float32)


def _fake_fwd_triton(q, k, v, *_):
    """out in q's memory order, as the Triton launcher makes it."""
    from pyext.triton_kernels.flash_attention import empty_out
    b, h, s, d = q.shape
    q = q if q.stride(-1) == 1 else q.contiguous()
    return empty_out(q, v.shape[-1]), q.new_empty((b, h, s), dtype=torch.float32)


def _fake_masked_fwd_triton(q, k, v, *_):
    """out as the Triton launcher makes it; each row's (max, sum) in place of
    lse; out_lo, what rounding out left out, in out's strides."""
    out, lse = _fake_fwd_triton(q, k, v)
    return out, lse.new_empty((*lse.shape, 2)), torch.empty_like(out)


def _fake_fwd_with_out_lo(fake_fwd, scale_at: int, dropout_at: Optional[int] = None,
                          softcap_at: Optional[int] = None, sinks_at: Optional[int] = None):
    """fake_fwd's (out, lse) and out_lo: in out's strides where the forward
    stores one (stores_low_part), else empty; the op's first argument being
    q and those at `scale_at`, `dropout_at`, `softcap_at` and `sinks_at`
    scale, dropout_p, softcap and sinks (an op without the last three has none)."""
    def fake(*args):
        from pyext.triton_kernels.flash_attention import stores_low_part
        out, lse = fake_fwd(*args)
        stored = stores_low_part(0.0 if dropout_at is None else args[dropout_at], None,
                                 0.0 if softcap_at is None else args[softcap_at],
                                 None if sinks_at is None else args[sinks_at], args[scale_at], args[0].shape[-1])
        return out, lse, torch.empty_like(out) if stored else out.new_empty(0)
    return fake


def _fake_bwd_cuda(dout, q, k, v, out, out_lo, lse, scale, causal, causal_offset, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _fake_bwd_triton(dout, q, k, v, *_):
    """Each gradient in its input's memory order, as the Triton launcher makes them."""
    return tuple(torch.empty_like(t if t.stride(-1) == 1 else t.contiguous()) for t in (q, k, v))


def _fake_bwd_with_sinks_triton(sinks_at: int):
    """_fake_bwd_triton and dsinks, the op's argument at `sinks_at` being the sinks."""
    def fake(dout, q, k, v, *rest):
        sinks = rest[sinks_at - 4]
        dsinks = q.new_empty(0 if sinks is None else sinks.shape[0], dtype=torch.float32)
        return (*_fake_bwd_triton(dout, q, k, v), dsinks)
    return fake


def _fake_masked_bwd_triton(dout, q, k, v, mask, *rest):
    """The masked backward's outputs: _fake_bwd_with_sinks_triton's and dmask."""
    mask_grad = rest[-1]
    return (*_fake_bwd_with_sinks_triton(10)(dout, q, k, v, mask, *rest[:-1]), _empty_dmask(mask, mask_grad))


def _setup_context(ctx, inputs, output):
    q, k, v, scale, causal, causal_offset = inputs
    out, lse, out_lo = output
    ctx.mark_non_differentiable(lse, out_lo)  # lse: a statistic returned for inspection, as in FlashAttention
    ctx.set_materialize_grads(False)  # no zeros made for them in the backward
    ctx.save_for_backward(q, k, v, out, out_lo, lse)
    ctx.args = (scale, causal, causal_offset)
    # a forward op called directly; _FlashAttention sets the caller's choice and the function called
    ctx.deterministic, ctx.function = True, "flash_attention"


def _dropout_setup_context(ctx, inputs, output):
    q, k, v, scale, causal, causal_offset, dropout_p, seed = inputs
    out, lse, out_lo = output
    ctx.mark_non_differentiable(lse, out_lo)
    ctx.set_materialize_grads(False)  # no zeros made for them in the backward
    ctx.save_for_backward(q, k, v, out, out_lo, lse, seed)
    ctx.args, ctx.dropout_p = (scale, causal, causal_offset), dropout_p
    ctx.deterministic, ctx.function = True, "flash_attention"


def _masked_setup_context(ctx, inputs, output):
    q, k, v, mask, scale, softcap, sinks, dropout_p, seed = inputs
    out, stats, out_lo = output
    ctx.mark_non_differentiable(stats, out_lo)
    ctx.set_materialize_grads(False)  # no zeros made for them in the backward
    ctx.save_for_backward(q, k, v, mask, out, out_lo, stats, sinks, seed)
    ctx.scale, ctx.softcap, ctx.dropout_p = scale, softcap, dropout_p
    ctx.mask_grad = ctx.needs_input_grad[3]  # a learned bias (BEiT's, T5's): dS, written by the backward
    ctx.deterministic, ctx.function = True, "scaled_dot_product_attention"


def _extras_setup_context(ctx, inputs, output):
    q, k, v, scale, causal, causal_offset, window_left, window_right, softcap, sinks, dropout_p, seed = inputs
    out, lse, out_lo = output
    ctx.mark_non_differentiable(lse, out_lo)
    ctx.set_materialize_grads(False)  # no zeros made for them in the backward
    ctx.save_for_backward(q, k, v, out, out_lo, lse, sinks, seed)
    ctx.args, ctx.window = (scale, causal, causal_offset), (window_left, window_right)
    ctx.softcap, ctx.dropout_p = softcap, dropout_p
    ctx.deterministic, ctx.function = True, "flash_attention"


def _reference_out(q, k, v, scale, causal, causal_offset, dropout_p=0.0, keep=None, mask=None, window=None,
                   softcap=0.0, sinks=None):
    return reference.attention(q, k, v, scale=scale, causal=causal, causal_offset=causal_offset,
                               dropout_p=dropout_p, keep=keep, mask=mask, window=window, softcap=softcap,
                               sinks=sinks)[0]


def _sinks_grad(sinks, dsinks):
    """The sinks' gradient as the autograd wants it: the kernels' float32
    dsinks in the sinks' dtype, None where they need none. (The sink is one
    more logit of each row's softmax whose value is 0: its dP is 0, so its
    dS = P_sink * (0 - D), D = sum over keys of P dP; see _bwd_kv_kernel.)"""
    return None if sinks is None or not sinks.requires_grad else dsinks.to(sinks.dtype)


def _kernels_keep_mask(seed, q, k, dropout_p):
    """The dropout mask the kernels drew from `seed`, for the reference."""
    from pyext.triton_kernels import flash_attention as kernels
    return kernels.dropout_keep_mask(seed, *q.shape[:3], k.shape[2], dropout_p)


def _make_backward(bwd_op):
    def backward(ctx, dout, *_):
        q, k, v, out, out_lo, lse = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            return create_graph_grads(ctx.function, ctx, _reference_out, (q, k, v, *ctx.args), (dout,))
        dq, dk, dv = bwd_op(dout, q, k, v, out, out_lo, lse, *ctx.args, ctx.deterministic)
        return dq, dk, dv, None, None, None
    return backward


def _make_dropout_backward(bwd_op):
    def backward(ctx, dout, *_):
        q, k, v, out, out_lo, lse, seed = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the reference, with the kernels' mask
            keep = _kernels_keep_mask(seed, q, k, ctx.dropout_p)
            return create_graph_grads(ctx.function, ctx, _reference_out,
                                      (q, k, v, *ctx.args, ctx.dropout_p, keep), (dout,))
        dq, dk, dv = bwd_op(dout, q, k, v, out, out_lo, lse, *ctx.args, ctx.dropout_p, seed, ctx.deterministic)
        return dq, dk, dv, None, None, None, None, None
    return backward


def _make_masked_backward(bwd_op):
    def backward(ctx, dout, *_):
        q, k, v, mask, out, out_lo, stats, sinks, seed = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the reference, with the kernels' dropout mask
            keep = _kernels_keep_mask(seed, q, k, ctx.dropout_p) if ctx.dropout_p > 0 else None
            grads = create_graph_grads(ctx.function, ctx, _reference_out,
                                       (q, k, v, ctx.scale, False, 0, ctx.dropout_p, keep, mask, None, ctx.softcap,
                                        sinks), (dout,))
            return grads[:3] + (grads[8], None, None, grads[-1], None, None)
        dq, dk, dv, dsinks, dmask = bwd_op(dout, q, k, v, mask, out, out_lo, stats, ctx.scale, ctx.softcap, sinks,
                                           ctx.dropout_p, seed, ctx.deterministic, ctx.mask_grad)
        return dq, dk, dv, dmask if ctx.mask_grad else None, None, None, _sinks_grad(sinks, dsinks), None, None
    return backward


def _make_extras_backward(bwd_op):
    def backward(ctx, dout, *_):
        q, k, v, out, out_lo, lse, sinks, seed = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the reference, with the kernels' dropout mask
            keep = _kernels_keep_mask(seed, q, k, ctx.dropout_p) if ctx.dropout_p > 0 else None
            grads = create_graph_grads(ctx.function, ctx, _reference_out,
                                       (q, k, v, *ctx.args, ctx.dropout_p, keep, None, ctx.window, ctx.softcap,
                                        sinks), (dout,))
            return grads[:3] + (None,) * 6 + (grads[-1], None, None)
        dq, dk, dv, dsinks = bwd_op(dout, q, k, v, out, out_lo, lse, *ctx.args, *ctx.window, ctx.softcap, sinks,
                                    ctx.dropout_p, seed, ctx.deterministic)
        return (dq, dk, dv) + (None,) * 6 + (_sinks_grad(sinks, dsinks), None, None)
    return backward


FWD, BWD, _ = register_stages("flash_attn", {"cuda": _fake_fwd_with_out_lo(_fake_fwd_cuda, 3),
                                             "triton": _fake_fwd_with_out_lo(_fake_fwd_triton, 3)},
                              {"cuda": _fake_bwd_cuda, "triton": _fake_bwd_triton}, _setup_context, _make_backward)
DROPOUT_FWD, DROPOUT_BWD, _ = register_stages("flash_attn_dropout", _fake_fwd_with_out_lo(_fake_fwd_triton, 3, 6),
                                              _fake_bwd_triton, _dropout_setup_context, _make_dropout_backward)
MASKED_FWD, MASKED_BWD, _ = register_stages("flash_attn_masked", _fake_masked_fwd_triton, _fake_masked_bwd_triton,
                                            _masked_setup_context, _make_masked_backward)
EXTRAS_FWD, EXTRAS_BWD, _ = register_stages("flash_attn_extras",
                                            _fake_fwd_with_out_lo(_fake_fwd_triton, 3, 10, 8, 9),
                                            _fake_bwd_with_sinks_triton(13), _extras_setup_context,
                                            _make_extras_backward)


# the kinds of attention call: kind -> (forward ops, setup_context, backward
# maker, backward ops), each op table by backend name
_KINDS = {"plain": (FWD, _setup_context, _make_backward, BWD),
          "dropout": (DROPOUT_FWD, _dropout_setup_context, _make_dropout_backward, DROPOUT_BWD),
          "masked": (MASKED_FWD, _masked_setup_context, _make_masked_backward, MASKED_BWD),
          "extras": (EXTRAS_FWD, _extras_setup_context, _make_extras_backward, EXTRAS_BWD)}


def _kind_of(q, k, v, scale, causal, causal_offset, dropout_p=0.0, seed=None, mask=None, window=None, softcap=0.0,
             sinks=None):
    """(the kind of an attention call, its forward op's inputs)."""
    if mask is not None:  # SDPA's attn_mask: never causal (SDPA refuses both), never a window
        return "masked", (q, k, v, mask, scale, softcap, sinks, dropout_p, seed)
    if window is not None or softcap > 0 or sinks is not None:
        return "extras", (q, k, v, scale, causal, causal_offset, *(window or (-1, -1)), softcap, sinks, dropout_p,
                          seed)
    if dropout_p > 0:
        return "dropout", (q, k, v, scale, causal, causal_offset, dropout_p, seed)
    return "plain", (q, k, v, scale, causal, causal_offset)


def _forward_op_call(function: str, backend: str, auto: bool, deterministic: bool, *args):
    """What _FlashAttention.apply computes, by the kind's forward op itself (for _register.traced_as)."""
    kind, inputs = _kind_of(*args)
    return _KINDS[kind][0][backend](*inputs)


class _FlashAttention(torch.autograd.Function):
    """The forward op of `backend` with a backward that honours `deterministic`
    and `auto` (see create_graph_grads) and names the `function` called in
    its errors: the op's schema has no place for them, so they live in this
    context."""

    @staticmethod
    def forward(ctx, function: str, backend: str, auto: bool, deterministic: bool, q, k, v, scale, causal,
                causal_offset, dropout_p=0.0, seed=None, mask=None, window=None, softcap=0.0, sinks=None):
        ctx.kind, inputs = _kind_of(q, k, v, scale, causal, causal_offset, dropout_p, seed, mask, window, softcap,
                                    sinks)
        forward_ops, setup_context, _, _ = _KINDS[ctx.kind]
        with past_autograd():
            output = forward_ops[backend](*inputs)
        setup_context(ctx, inputs, output)
        if ctx.kind == "masked":  # the mask's place here (setup_context read the op's)
            ctx.mask_grad = ctx.needs_input_grad[12]
        ctx.backend, ctx.auto, ctx.deterministic, ctx.function = backend, auto, deterministic, function
        return output

    @staticmethod
    def backward(ctx, dout, dlse, *_):
        _, _, make_backward, backward_ops = _KINDS[ctx.kind]
        grads = make_backward(called_past_autograd(backward_ops[ctx.backend]))(ctx, dout, dlse)
        sinks_at = {"masked": 6, "extras": 9}.get(ctx.kind)  # the sinks' place in the op's inputs
        dsinks = None if sinks_at is None else grads[sinks_at]
        dmask = grads[3] if ctx.kind == "masked" else None
        return (None, None, None, None, *grads[:3]) + (None,) * 5 + (dmask, None, None, dsinks)


# the public functions' call: _FlashAttention.apply, the forward op itself while torch.jit.trace runs
flash_attention_apply = traced_as(_forward_op_call, _FlashAttention.apply)
