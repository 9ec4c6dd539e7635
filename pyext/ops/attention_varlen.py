"""pyext.flash_attention_varlen: attention over a packed batch (FlashAttention's
flash_attn_varlen_func), and its ops flash_attn_varlen_{fwd,bwd}_triton.

    flash_attn_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
                          window_left, window_right, softcap, sinks, dropout_p, seed) -> (out, lse, out_lo)
    flash_attn_varlen_bwd(dout, q, k, v, out, out_lo, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                          max_seqlen_k, scale, causal, window_left, window_right, softcap, sinks, dropout_p,
                          seed, deterministic) -> (dq, dk, dv, dsinks)

q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv), out
(total_q, Hq, Dv), lse (Hq, total_q); see triton_kernels/flash_attention/varlen.py.
sinks (Hq,) or None, every sequence's; dsinks, their gradient, empty
without them; out_lo, what rounding out left out, empty without dropout,
a cap or sinks (both as the dense extras ops').
The kernels are the Triton ones (the CUDA kernels have no packed batches);
elsewhere the reference runs each sequence on its own.
"""
import operator
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from pyext import _backend, reference
from pyext._autocast import autocast_inputs
from pyext._weak import WeakTensorCache
from pyext.ops import attention, attention_checks, attention_ops, attention_varlen_reference
from pyext.ops._register import (called_past_autograd, create_graph_grads, fx_traceable, past_autograd,
                                 register_stages, traced_as)


@torch.library.custom_op("pyext::flash_attn_varlen_fwd_triton", mutates_args=())
def flash_attn_varlen_fwd_triton(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                                 max_seqlen_q: int, max_seqlen_k: int, scale: float, causal: bool, window_left: int,
                                 window_right: int, softcap: float, sinks: Optional[Tensor], dropout_p: float,
                                 seed: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    from pyext.triton_kernels import flash_attention as kernels
    return attention_ops._with_out_lo(kernels.flash_attn_varlen_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal, dropout_p=dropout_p,
        seed=seed, window=attention_ops._kernel_window(window_left, window_right), softcap=softcap, sinks=sinks))


@torch.library.custom_op("pyext::flash_attn_varlen_bwd_triton", mutates_args=())
def flash_attn_varlen_bwd_triton(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, out_lo: Tensor,
                                 lse: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                                 max_seqlen_k: int, scale: float, causal: bool, window_left: int, window_right: int,
                                 softcap: float, sinks: Optional[Tensor], dropout_p: float, seed: Optional[Tensor],
                                 deterministic: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    from pyext.triton_kernels import flash_attention as kernels
    return attention_ops._with_dsinks(kernels.flash_attn_varlen_bwd(
        dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
        deterministic, dropout_p=dropout_p, seed=seed, window=attention_ops._kernel_window(window_left, window_right),
        softcap=softcap, sinks=sinks, out_lo=attention_ops._out_lo_if_stored(out_lo)), q)


def _fake_fwd(q, k, v, *_):
    """out (total_q, Hq, Dv) contiguous and lse (Hq, total_q), as the launcher makes them."""
    return q.new_empty((q.shape[0], q.shape[1], v.shape[2])), q.new_empty((q.shape[1], q.shape[0]),
                                                                           dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal, window_left, window_right,
     softcap, sinks, dropout_p, seed) = inputs
    out, lse, out_lo = output
    ctx.mark_non_differentiable(lse, out_lo)
    ctx.set_materialize_grads(False)  # no zeros made for them in the backward
    ctx.save_for_backward(q, k, v, out, out_lo, lse, cu_seqlens_q, cu_seqlens_k, sinks, seed)
    ctx.args = (max_seqlen_q, max_seqlen_k, scale, causal, window_left, window_right, softcap)
    ctx.dropout_p = dropout_p
    ctx.deterministic = True  # a forward op called directly; _FlashAttentionVarlen sets the caller's choice


def kernels_keep_masks(seed: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, heads_q: int, dropout_p: float):
    """The dropout mask the kernels drew for each sequence, (1, Hq, Sq_b, Sk_b):
    sequence b's stream is that of batch entry b, the key seed + b * Hq."""
    from pyext.triton_kernels import flash_attention as kernels
    offsets_q, offsets_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [kernels.dropout_keep_mask(seed + b * heads_q, 1, heads_q, q1 - q0, k1 - k0, dropout_p)
            for b, (q0, q1, k0, k1) in enumerate(zip(offsets_q, offsets_q[1:], offsets_k, offsets_k[1:]))]


def _reference_out(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal, window, softcap, sinks, dropout_p, keeps):
    return reference.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, scale=scale, causal=causal,
                                      dropout_p=dropout_p, keeps=keeps, window=window, softcap=softcap,
                                      sinks=sinks)[0]


def _make_backward(bwd_op):
    def backward(ctx, dout, *_):
        q, k, v, out, out_lo, lse, cu_seqlens_q, cu_seqlens_k, sinks, seed = ctx.saved_tensors
        max_seqlen_q, max_seqlen_k, scale, causal, window_left, window_right, softcap = ctx.args
        dropout_p = ctx.dropout_p
        if torch.is_grad_enabled():  # create_graph=True: the reference, with the kernels' dropout masks
            keeps = kernels_keep_masks(seed, cu_seqlens_q, cu_seqlens_k, q.shape[1], dropout_p) if dropout_p else None
            grads = create_graph_grads(
                "flash_attention_varlen", ctx, _reference_out,
                (q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal,
                 attention_ops._kernel_window(window_left, window_right), softcap, sinks, dropout_p, keeps), (dout,))
            return grads[:3] + (None,) * 9 + (grads[9], None, None)
        dq, dk, dv, dsinks = bwd_op(dout, q, k, v, out, out_lo, lse, cu_seqlens_q, cu_seqlens_k, *ctx.args, sinks,
                                    dropout_p, seed, ctx.deterministic)
        return (dq, dk, dv) + (None,) * 9 + (attention_ops._sinks_grad(sinks, dsinks), None, None)
    return backward


VARLEN_FWD, VARLEN_BWD, _ = register_stages("flash_attn_varlen",
                                            attention_ops._fake_fwd_with_out_lo(_fake_fwd, 7, 13, 11, 12),
                                            attention_ops._fake_bwd_with_sinks_triton(16), _setup_context,
                                            _make_backward)


class _FlashAttentionVarlen(torch.autograd.Function):
    """The forward op of `backend` with a backward that honours `deterministic`
    and `auto` (see create_graph_grads), as attention_ops._FlashAttention."""

    @staticmethod
    def forward(ctx, backend: str, auto: bool, deterministic: bool, *inputs):
        with past_autograd():
            output = VARLEN_FWD[backend](*inputs)
        _setup_context(ctx, inputs, output)
        ctx.backend, ctx.auto, ctx.deterministic = backend, auto, deterministic
        return output

    @staticmethod
    def backward(ctx, dout, *_):
        grads = _make_backward(called_past_autograd(VARLEN_BWD[ctx.backend]))(ctx, dout)
        return (None, None, None) + grads


def _forward_op_call(backend: str, auto: bool, deterministic: bool, *inputs):
    """What _FlashAttentionVarlen.apply computes, by the forward op itself (for traced_as)."""
    return VARLEN_FWD[backend](*inputs)


# _FlashAttentionVarlen.apply, the forward op itself while torch.jit.trace runs
_varlen_apply = traced_as(_forward_op_call, _FlashAttentionVarlen.apply)


def _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k):
    """torch's error types, with messages naming the argument, before any launch."""
    op = "flash_attention_varlen"
    for name, t in (("q", q), ("k", k), ("v", v), ("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if not (q.dtype == k.dtype == v.dtype):
        raise RuntimeError(f"{op}: expected q, k and v to have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.is_floating_point():
        raise RuntimeError(f"{op}: expected floating-point q, k and v, got {q.dtype}")
    if not q.dim() == k.dim() == v.dim() == 3:
        raise RuntimeError(f"{op}: expected 3-D (total, H, D) q, k and v, got {q.dim()}-D, {k.dim()}-D, "
                           f"{v.dim()}-D")
    if q.shape[2] != k.shape[2]:
        raise RuntimeError(f"{op}: q head dim {q.shape[2]} must equal k head dim {k.shape[2]}")
    if k.shape[:2] != v.shape[:2]:
        raise RuntimeError(f"{op}: k {list(k.shape)} and v {list(v.shape)} must have the same rows and heads")
    if not (k.shape[1] and q.shape[1] % k.shape[1] == 0 or k.shape[1] == q.shape[1] == 0):
        raise RuntimeError(f"{op}: query heads {q.shape[1]} must be a multiple of key/value heads {k.shape[1]}")
    for name, cu, rows in (("cu_seqlens_q", cu_seqlens_q, q), ("cu_seqlens_k", cu_seqlens_k, k)):
        if cu.dim() != 1 or cu.numel() == 0 or cu.dtype not in (torch.int32, torch.int64):
            raise RuntimeError(f"{op}: {name} must be a non-empty 1-D int32 or int64 tensor of B + 1 offsets, got "
                               f"{cu.dtype} of shape {list(cu.shape)}")
        if not cu.device == rows.device == q.device:
            raise RuntimeError(f"{op}: expected {name} on q's device {q.device}, got {cu.device} "
                               f"({'k' if rows is k else 'q'} on {rows.device})")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise RuntimeError(f"{op}: cu_seqlens_q has {cu_seqlens_q.numel()} offsets, cu_seqlens_k "
                           f"{cu_seqlens_k.numel()}: one more than the number of sequences, each")


def _max_seqlen(name: str, n) -> int:
    """n as a Python int: any integer (numpy's, a one-element integer tensor,
    as `cu_seqlens.diff().max()` gives it) but a bool. An int or SymInt as
    it is: traced by torch.compile, operator.index would pin a symbolic
    length to its value (one graph per packed batch)."""
    try:
        length = -1 if isinstance(n, bool) else n if isinstance(n, (int, torch.SymInt)) else operator.index(n)
    except TypeError:
        length = -1
    if length < 0:
        raise ValueError(f"flash_attention_varlen: {name} must be an int >= 0, got {n!r}")
    return length


# Offsets _check_offsets has passed: tensor -> (its version, rows, max_seqlen).
# A model's layers share one batch's offsets: checked (and copied to the host)
# once, not once per layer, until the tensor is written again.
_checked = WeakTensorCache()


def _check_offsets(cu_seqlens_q, cu_seqlens_k, q, k, max_seqlen_q, max_seqlen_k):
    """Offsets that start at 0, never decrease, end at the rows given, and
    whose longest sequence is within max_seqlen: the kernels' grid is sized by
    it, and a longer sequence would be left partly unwritten. One copy of the
    offsets to the host (a sync on a GPU) per offsets tensor and version
    (per call for offsets made under torch.inference_mode, which keep no
    version); skipped where none can be made: while torch.compile traces,
    while a CUDA graph is captured, and for offsets that hold no values
    (fake or meta tensors: shapes traced by FakeTensorMode)."""
    if torch.compiler.is_compiling() or (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    for name, cu, rows, longest, limit in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], "max_seqlen_q", max_seqlen_q),
                                           ("cu_seqlens_k", cu_seqlens_k, k.shape[0], "max_seqlen_k", max_seqlen_k)):
        versioned = not cu.is_inference()  # inference_mode's tensors keep no version: checked on each call
        if (versioned and _checked.get(cu) == (cu._version, rows, limit)) or cu.is_meta or is_fake(cu):
            continue
        offsets = cu.tolist()
        lengths = [b - a for a, b in zip(offsets, offsets[1:])]
        if offsets[0] != 0 or offsets[-1] != rows or min(lengths, default=0) < 0:
            raise ValueError(f"flash_attention_varlen: {name} must rise from 0 to the {rows} rows given, never "
                             f"falling; got {offsets if len(offsets) <= 8 else offsets[:4] + ['...'] + offsets[-2:]}")
        if max(lengths, default=0) > limit:
            b = max(range(len(lengths)), key=lengths.__getitem__)
            raise ValueError(f"flash_attention_varlen: sequence {b} has {lengths[b]} rows, more than "
                             f"{longest}={limit}")
        if versioned:
            _checked[cu] = (cu._version, rows, limit)


def _why_not(backend, q, k, v, sequences, max_seqlen_q, max_seqlen_k, dropout_p):
    """Why `backend` cannot run this packed call, or None."""
    if backend == "torch":
        return None
    reason = _backend.device_reason(backend, q, k, v)
    if reason is None and backend not in VARLEN_FWD:
        reason = f"a packed batch (cu_seqlens): the {backend} kernels have none (the Triton ones do)"
    if reason is None:  # dtype, head dims, heads: as one batch entry of the dense kernels
        reason = attention_checks._why_not(backend, *(t.transpose(0, 1)[None] for t in (q, k, v)))
    if reason is None and sequences > 65535:
        reason = f"{sequences} sequences, past 65535, the Triton kernels' grid limit"
    if reason is None and dropout_p:
        from pyext.triton_kernels.flash_attention import MAX_DROPOUT_SCORES
        if max_seqlen_q * max_seqlen_k >= MAX_DROPOUT_SCORES:
            reason = f"dropout needs Sq * Sk below 2^31 (its random counter), got {max_seqlen_q} * {max_seqlen_k}"
    return reason


@fx_traceable
def flash_attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                           scale: Optional[float] = None, window_size: Tuple[int, int] = (-1, -1),
                           softcap: float = 0.0, sinks: Optional[Tensor] = None, dropout_p: float = 0.0,
                           return_lse: bool = False, deterministic: Optional[bool] = None, backend=None):
    """Attention over a packed batch, FlashAttention's flash_attn_varlen_func:
    sequences of different lengths laid end to end with no padding, q
    (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv), sequence b
    being rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1 of q and rows
    cu_seqlens_k[b] .. cu_seqlens_k[b + 1] - 1 of k and v (B + 1 offsets,
    int32 or int64, from 0 to the total). Each sequence attends to its own
    keys only, as flash_attention would on each alone; returns out
    (total_q, Hq, Dv), and with return_lse=True also lse (Hq, total_q) fp32.
    max_seqlen_q, max_seqlen_k: the longest sequence's lengths (the kernels'
    grid; ints, numpy's or one-element integer tensors). The offsets and
    lengths are checked before any launch, with one copy of the offsets to
    the host per offsets tensor (again after it is written: a model's layers
    sharing a batch's offsets pay it once), except
    while torch.compile traces or a CUDA graph is captured, where the caller
    must get them right.
    causal (bottom-right in each sequence), scale, window_size, softcap,
    sinks (Hq,) (every sequence's), dropout_p (sequence b's stream is batch
    entry b's), deterministic and backend: as flash_attention's. The
    Triton kernels run it (no padding
    computed: the work is the sum over the sequences); "auto" goes to the
    reference (each sequence on its own, S x S) for what they do not take,
    float32 inputs among them; "cuda" raises: its kernels have no packed
    batches."""
    q, k, v = autocast_inputs("aten::scaled_dot_product_attention", q, k, v)
    max_seqlen_q, max_seqlen_k = _max_seqlen("max_seqlen_q", max_seqlen_q), _max_seqlen("max_seqlen_k", max_seqlen_k)
    _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"flash_attention_varlen: dropout_p must be in [0, 1), got {dropout_p}")
    window = attention_checks._window("flash_attention_varlen", window_size)
    softcap = attention_checks._softcap("flash_attention_varlen", softcap)
    sinks = attention_checks._sinks("flash_attention_varlen", sinks, q, heads_dim=-2)
    _check_offsets(cu_seqlens_q, cu_seqlens_k, q, k, max_seqlen_q, max_seqlen_k)
    scale = attention_checks.softmax_scale(scale, q.shape[-1])
    name = _backend.select("flash_attention_varlen", backend, q.device, lambda b: _why_not(
        b, q, k, v, cu_seqlens_q.numel() - 1, max_seqlen_q, max_seqlen_k, dropout_p), attention.AUTO_ORDER)
    if name == "torch" and torch.compiler.is_compiling() and not dropout_p:  # traced: the reference as one op
        out, lse = attention_varlen_reference.flash_attn_varlen_reference(
            q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal, *(window or (-1, -1)), softcap, sinks)
    elif name == "torch":
        out, lse = reference.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, scale=scale, causal=causal,
                                              dropout_p=dropout_p, window=window, softcap=softcap, sinks=sinks)
    else:
        if deterministic is None:
            deterministic = torch.are_deterministic_algorithms_enabled()
        seed = attention._dropout_seed(q.device) if dropout_p > 0 else None
        out, lse = _varlen_apply(name, _backend.is_auto(backend), deterministic,
                                 *attention._distinct(q, k, v, cu_seqlens_q, cu_seqlens_k),
                                 max_seqlen_q, max_seqlen_k, scale, causal, *(window or (-1, -1)),
                                 softcap, sinks, dropout_p, seed)[:2]
    return (out, lse) if return_lse else out
