"""Attention: pyext.flash_attention, pyext.scaled_dot_product_attention and
their ops flash_attn_{fwd,bwd}_{triton,cuda}.

    flash_attn_fwd(q, k, v, scale, causal, causal_offset) -> (out, lse)
    flash_attn_bwd(dout, q, k, v, out, lse, scale, causal, causal_offset, deterministic) -> (dq, dk, dv)

Kernels cover float16/bfloat16, head dims that are multiples of 8 up to 256
(a value head dim of its own below the query/key one in the Triton kernels),
any Sq and Sk, GQA/MQA, causal with any alignment, no mask and no dropout.
The CUDA forward and backward run the sm_90a kernels (wgmma, TMA) on
compute capability 9.x for head dims that pad to 64 or 128, the mma.sync
kernels elsewhere; PYEXT_FLASH_SM90=0 in the environment (read per call)
forces the latter.
The Triton backward with deterministic=False sums dQ with atomics (faster,
last bits vary run to run); the CUDA backward is deterministic either way.
The public functions carry the caller's choice from the forward to the
backward in _FlashAttention's context; a forward op called directly gets the
deterministic backward.
Dropout (Triton only): flash_attn_dropout_{fwd,bwd}_triton take dropout_p
and `seed`, a one-element int64 tensor drawn from torch's generator on the
inputs' device per call; the backward draws the forward's mask from it.
An attention mask (Triton only; SDPA's attn_mask, never with causal):
flash_attn_masked_{fwd,bwd}_triton, with dropout too (dropout_p 0 and no
seed for none); their second output is each row's (max, sum), (B, H, S, 2)
fp32, in place of lse, and a third, out_lo, what rounding out to its dtype
left out, which the backward adds to out for D = rowsum(dO * O): a bias
makes P peaky, and there D from the rounded out costs dq and dk the rule
(see triton_kernels/flash_attention/tiles.py, _low_part).
The extras (Triton only): a local window, a logit soft cap and attention
sinks (flash_attention's window_size, softcap and sinks; (-1, -1), 0 and
None for none): flash_attn_extras_{fwd,bwd}_triton, with dropout too. The
masked ops take a soft cap and sinks as well (HF's Gemma 2 with a padded
batch or its sliding-window mask, GPT-OSS's, through pyext.patch). The
backward ops take the sinks too, for their gradient (their fourth output,
empty without sinks); lse includes them, so dQ, dK and dV need nothing more.
"""
import math
import threading
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from pyext import _backend, reference
from pyext._autocast import autocast_inputs
from pyext.ops._register import create_graph_grads, missing_reason, register_stages

_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


@torch.library.custom_op("pyext::flash_attn_fwd_triton", mutates_args=())
def flash_attn_fwd_triton(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool,
                          causal_offset: int) -> Tuple[Tensor, Tensor]:
    from pyext.triton_kernels import flash_attention as kernels
    return kernels.flash_attn_fwd(q, k, v, scale, causal, causal_offset)


@torch.library.custom_op("pyext::flash_attn_bwd_triton", mutates_args=())
def flash_attn_bwd_triton(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                          scale: float, causal: bool, causal_offset: int,
                          deterministic: bool) -> Tuple[Tensor, Tensor, Tensor]:
    from pyext.triton_kernels import flash_attention as kernels
    return kernels.flash_attn_bwd(dout, q, k, v, out, lse, scale, causal, causal_offset, deterministic)


@torch.library.custom_op("pyext::flash_attn_dropout_fwd_triton", mutates_args=())
def flash_attn_dropout_fwd_triton(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, causal_offset: int,
                                  dropout_p: float, seed: Tensor) -> Tuple[Tensor, Tensor]:
    from pyext.triton_kernels import flash_attention as kernels
    return kernels.flash_attn_fwd(q, k, v, scale, causal, causal_offset, dropout_p=dropout_p, seed=seed)


@torch.library.custom_op("pyext::flash_attn_dropout_bwd_triton", mutates_args=())
def flash_attn_dropout_bwd_triton(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                  scale: float, causal: bool, causal_offset: int, dropout_p: float, seed: Tensor,
                                  deterministic: bool) -> Tuple[Tensor, Tensor, Tensor]:
    from pyext.triton_kernels import flash_attention as kernels
    return kernels.flash_attn_bwd(dout, q, k, v, out, lse, scale, causal, causal_offset, deterministic,
                                  dropout_p=dropout_p, seed=seed)


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
                                 dropout_p: float, seed: Optional[Tensor],
                                 deterministic: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    from pyext.triton_kernels import flash_attention as kernels
    return _with_dsinks(kernels.flash_attn_bwd(dout, q, k, v, out, stats, scale, False, 0, deterministic,
                                               dropout_p=dropout_p, seed=seed, mask=mask, softcap=softcap,
                                               sinks=sinks, out_lo=out_lo), q)


def _kernel_window(window_left: int, window_right: int):
    return None if (window_left, window_right) == (-1, -1) else (window_left, window_right)


@torch.library.custom_op("pyext::flash_attn_extras_fwd_triton", mutates_args=())
def flash_attn_extras_fwd_triton(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, causal_offset: int,
                                 window_left: int, window_right: int, softcap: float, sinks: Optional[Tensor],
                                 dropout_p: float, seed: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    from pyext.triton_kernels import flash_attention as kernels
    return kernels.flash_attn_fwd(q, k, v, scale, causal, causal_offset, dropout_p=dropout_p, seed=seed,
                                  window=_kernel_window(window_left, window_right), softcap=softcap, sinks=sinks)


@torch.library.custom_op("pyext::flash_attn_extras_bwd_triton", mutates_args=())
def flash_attn_extras_bwd_triton(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                 scale: float, causal: bool, causal_offset: int, window_left: int,
                                 window_right: int, softcap: float, sinks: Optional[Tensor], dropout_p: float,
                                 seed: Optional[Tensor], deterministic: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    from pyext.triton_kernels import flash_attention as kernels
    return _with_dsinks(kernels.flash_attn_bwd(dout, q, k, v, out, lse, scale, causal, causal_offset, deterministic,
                                               dropout_p=dropout_p, seed=seed,
                                               window=_kernel_window(window_left, window_right), softcap=softcap,
                                               sinks=sinks), q)


def _with_dsinks(grads, q: Tensor):
    """(dq, dk, dv, dsinks) of a backward that may have had no sinks: dsinks
    then an empty float32 tensor (an op's outputs cannot be None)."""
    return grads if len(grads) == 4 else (*grads, q.new_empty(0, dtype=torch.float32))


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


def _fake_bwd_cuda(dout, q, k, v, out, lse, scale, causal, causal_offset, deterministic):
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


def _setup_context(ctx, inputs, output):
    q, k, v, scale, causal, causal_offset = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)  # a statistic returned for inspection, as in FlashAttention
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = (scale, causal, causal_offset)
    ctx.deterministic = True  # a forward op called directly; _FlashAttention sets the caller's choice


def _dropout_setup_context(ctx, inputs, output):
    q, k, v, scale, causal, causal_offset, dropout_p, seed = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, seed)
    ctx.args, ctx.dropout_p = (scale, causal, causal_offset), dropout_p
    ctx.deterministic = True


def _masked_setup_context(ctx, inputs, output):
    q, k, v, mask, scale, softcap, sinks, dropout_p, seed = inputs
    out, stats, out_lo = output
    ctx.mark_non_differentiable(stats, out_lo)
    ctx.save_for_backward(q, k, v, mask, out, out_lo, stats, sinks, seed)
    ctx.scale, ctx.softcap, ctx.dropout_p = scale, softcap, dropout_p
    ctx.deterministic = True


def _extras_setup_context(ctx, inputs, output):
    q, k, v, scale, causal, causal_offset, window_left, window_right, softcap, sinks, dropout_p, seed = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, sinks, seed)
    ctx.args, ctx.window = (scale, causal, causal_offset), (window_left, window_right)
    ctx.softcap, ctx.dropout_p = softcap, dropout_p
    ctx.deterministic = True


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
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            return create_graph_grads("flash_attention", ctx, _reference_out, (q, k, v, *ctx.args), (dout,))
        dq, dk, dv = bwd_op(dout, q, k, v, out, lse, *ctx.args, ctx.deterministic)
        return dq, dk, dv, None, None, None
    return backward


def _make_dropout_backward(bwd_op):
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, seed = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the reference, with the kernels' mask
            keep = _kernels_keep_mask(seed, q, k, ctx.dropout_p)
            return create_graph_grads("flash_attention", ctx, _reference_out,
                                      (q, k, v, *ctx.args, ctx.dropout_p, keep), (dout,))
        dq, dk, dv = bwd_op(dout, q, k, v, out, lse, *ctx.args, ctx.dropout_p, seed, ctx.deterministic)
        return dq, dk, dv, None, None, None, None, None
    return backward


def _make_masked_backward(bwd_op):
    def backward(ctx, dout, *_):
        q, k, v, mask, out, out_lo, stats, sinks, seed = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the reference, with the kernels' dropout mask
            keep = _kernels_keep_mask(seed, q, k, ctx.dropout_p) if ctx.dropout_p > 0 else None
            grads = create_graph_grads("scaled_dot_product_attention", ctx, _reference_out,
                                       (q, k, v, ctx.scale, False, 0, ctx.dropout_p, keep, mask, None, ctx.softcap,
                                        sinks), (dout,))
            return grads[:3] + (None, None, None, grads[-1], None, None)
        dq, dk, dv, dsinks = bwd_op(dout, q, k, v, mask, out, out_lo, stats, ctx.scale, ctx.softcap, sinks,
                                    ctx.dropout_p, seed, ctx.deterministic)
        return dq, dk, dv, None, None, None, _sinks_grad(sinks, dsinks), None, None
    return backward


def _make_extras_backward(bwd_op):
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, sinks, seed = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the reference, with the kernels' dropout mask
            keep = _kernels_keep_mask(seed, q, k, ctx.dropout_p) if ctx.dropout_p > 0 else None
            grads = create_graph_grads("flash_attention", ctx, _reference_out,
                                       (q, k, v, *ctx.args, ctx.dropout_p, keep, None, ctx.window, ctx.softcap,
                                        sinks), (dout,))
            return grads[:3] + (None,) * 6 + (grads[-1], None, None)
        dq, dk, dv, dsinks = bwd_op(dout, q, k, v, out, lse, *ctx.args, *ctx.window, ctx.softcap, sinks,
                                    ctx.dropout_p, seed, ctx.deterministic)
        return (dq, dk, dv) + (None,) * 6 + (_sinks_grad(sinks, dsinks), None, None)
    return backward


FWD, BWD, _ = register_stages("flash_attn", {"cuda": _fake_fwd_cuda, "triton": _fake_fwd_triton},
                              {"cuda": _fake_bwd_cuda, "triton": _fake_bwd_triton}, _setup_context, _make_backward)
DROPOUT_FWD, DROPOUT_BWD, _ = register_stages("flash_attn_dropout", _fake_fwd_triton, _fake_bwd_triton,
                                              _dropout_setup_context, _make_dropout_backward)
MASKED_FWD, MASKED_BWD, _ = register_stages("flash_attn_masked", _fake_masked_fwd_triton,
                                            _fake_bwd_with_sinks_triton(10), _masked_setup_context,
                                            _make_masked_backward)
EXTRAS_FWD, EXTRAS_BWD, _ = register_stages("flash_attn_extras", _fake_fwd_triton, _fake_bwd_with_sinks_triton(12),
                                            _extras_setup_context, _make_extras_backward)


class _FlashAttention(torch.autograd.Function):
    """The forward op of `backend` with a backward that honours `deterministic`
    and `auto` (see create_graph_grads): the op's schema has no place for
    them, so they live in this context."""

    @staticmethod
    def forward(ctx, backend: str, auto: bool, deterministic: bool, q, k, v, scale, causal, causal_offset,
                dropout_p=0.0, seed=None, mask=None, window=None, softcap=0.0, sinks=None):
        if mask is not None:  # SDPA's attn_mask: never causal (SDPA refuses both), never a window
            ctx.kind, inputs = "masked", (q, k, v, mask, scale, softcap, sinks, dropout_p, seed)
            output = MASKED_FWD[backend](*inputs)
            _masked_setup_context(ctx, inputs, output)
        elif window is not None or softcap > 0 or sinks is not None:
            ctx.kind, inputs = "extras", (q, k, v, scale, causal, causal_offset, *(window or (-1, -1)), softcap,
                                          sinks, dropout_p, seed)
            output = EXTRAS_FWD[backend](*inputs)
            _extras_setup_context(ctx, inputs, output)
        elif dropout_p > 0:
            ctx.kind, inputs = "dropout", (q, k, v, scale, causal, causal_offset, dropout_p, seed)
            output = DROPOUT_FWD[backend](*inputs)
            _dropout_setup_context(ctx, inputs, output)
        else:
            ctx.kind, inputs = "plain", (q, k, v, scale, causal, causal_offset)
            output = FWD[backend](*inputs)
            _setup_context(ctx, inputs, output)
        ctx.backend, ctx.auto, ctx.deterministic = backend, auto, deterministic
        return output

    @staticmethod
    def backward(ctx, dout, dlse, *_):
        make, table = {"masked": (_make_masked_backward, MASKED_BWD), "dropout": (_make_dropout_backward, DROPOUT_BWD),
                       "extras": (_make_extras_backward, EXTRAS_BWD), "plain": (_make_backward, BWD)}[ctx.kind]
        grads = make(table[ctx.backend])(ctx, dout, dlse)
        sinks_at = {"masked": 6, "extras": 9}.get(ctx.kind)  # the sinks' place in the op's inputs
        dsinks = None if sinks_at is None else grads[sinks_at]
        return (None, None, None, *grads[:3]) + (None,) * 8 + (dsinks,)


def _distinct(*tensors: Tensor) -> List[Tensor]:
    """The tensors, each given again after its first place (q is k is v for
    self-attention on one x; a packed batch's cu_seqlens_q is cu_seqlens_k)
    as a view of itself there: torch.compile cannot trace an
    autograd.Function given one tensor for two inputs. A view copies nothing
    and passes gradients back to the tensor."""
    out = []
    for t in tensors:
        out.append(t.view_as(t) if any(t is s for s in out) else t)
    return out


def _dropout_seed(device: torch.device) -> Tensor:
    """A fresh key for the kernels' dropout mask, from torch's generator on `device`
    (so torch.manual_seed reproduces it, and a CUDA graph draws anew at each replay)."""
    return torch.randint(2 ** 62, (1,), device=device)


# The kernel backends auto tries for scaled_dot_product_attention with dropout:
# none yet, so torch's SDPA (its flash kernel draws four numbers per Philox
# call, as ours now do, in CUDA) until a GPU run of the benchmark's dropout
# cases shows the Triton kernels' dropout at least as fast (benchmarks/NOTES.md,
# "Attention dropout"). flash_attention, whose fallback is the reference,
# takes the Triton kernels under auto.
SDPA_DROPOUT_AUTO_ORDER = ()

# The same for scaled_dot_product_attention with an attn_mask: torch's SDPA
# (its memory-efficient kernel reads the mask as we do, a tile per block)
# until a GPU run of the benchmark's masked cases shows the Triton kernels at
# least as fast (benchmarks/NOTES.md, "Attention masks").
SDPA_MASK_AUTO_ORDER = ()

# The kernel backends "auto" tries. The CUDA kernels (issue 5) join when a GPU
# run of tests/test_attention.py has passed with them; until then only
# backend="cuda", named, runs them.
AUTO_ORDER = ("triton",)


# .active: this thread is calling torch's SDPA on pyext's behalf; pyext.patch's
# routing mode lets such calls through. Per thread, as torch's mode stacks are:
# another thread's patched model must not see it.
calling_torch_sdpa = threading.local()


def torch_sdpa(*args, **kwargs):
    """torch's own SDPA, not re-routed to pyext by a patched model's forward."""
    calling_torch_sdpa.active = True
    try:
        return F.scaled_dot_product_attention(*args, **kwargs)
    finally:
        calling_torch_sdpa.active = False


def _heads_fit(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """(B, H, S, D) inputs whose heads the kernels take: as many key as value
    heads, and query heads a multiple of them (GQA/MQA)."""
    hq, hk = q.shape[1], k.shape[1]
    return hk == v.shape[1] and (hq % hk == 0 if hk else hq == 0)


def _why_not(backend: str, q: Tensor, k: Tensor, v: Tensor, extra: Optional[str] = None, dropout_p: float = 0.0,
             masked: bool = False):
    """Why `backend` cannot run this attention call, or None."""
    if backend == "torch":
        return None
    reason = _backend.device_reason(backend, q, k, v)
    if reason is not None:
        return reason
    if missing_reason(backend, FWD, "attention"):
        return missing_reason(backend, FWD, "attention")
    if extra is not None:
        return extra
    if masked and backend not in MASKED_FWD:
        return f"an attn_mask: the {backend} kernels have no attention mask (the Triton ones do)"
    if dropout_p != 0.0:
        if backend not in DROPOUT_FWD:
            return f"dropout_p={dropout_p}: the {backend} kernels have no dropout (the Triton ones do)"
        if not 0.0 < dropout_p < 1.0:
            return f"dropout_p={dropout_p} is not in (0, 1)"
        from pyext.triton_kernels.flash_attention import MAX_DROPOUT_SCORES
        if q.dim() == 4 and q.shape[2] * k.shape[2] >= MAX_DROPOUT_SCORES:
            return f"dropout needs Sq * Sk below 2^31 (its random counter), got {q.shape[2]} * {k.shape[2]}"
    if not q.dim() == k.dim() == v.dim() == 4:
        return (f"it needs query, key and value of one rank with the same leading dims (no broadcasting), got "
                f"shapes {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        return "it needs the same batch size for query, key and value (no broadcasting)"
    if not _heads_fit(q, k, v):
        return "it needs as many key as value heads, and query heads a multiple of them (no broadcasting)"
    if backend == "cuda" and k.shape[1] == 0:
        return "the CUDA kernels need at least one key/value head"
    if backend == "triton" and max(q.shape[0], q.shape[1]) > 65535:
        return f"batch {q.shape[0]} or heads {q.shape[1]} past 65535, the Triton kernels' grid limit"
    if q.dtype not in _KERNEL_DTYPES:
        return f"dtype {q.dtype} is not supported (float16 and bfloat16 are)"
    d, dv = q.shape[-1], v.shape[-1]
    if d % 8 or d > MAX_HEAD_DIM or dv % 8 or dv > MAX_HEAD_DIM:
        return (f"head dim {d} (value head dim {dv}) is not supported: "
                f"multiples of 8 up to {MAX_HEAD_DIM}")
    if dv > d or (dv != d and backend != "triton"):
        return (f"value head dim {dv} other than the query/key head dim {d} (the Triton kernels take one "
                f"below it, as DeepSeek's MLA has: benchmarks/NOTES.md, \"Value head dim\")")
    return None


def _as_4d(q: Tensor, k: Tensor, v: Tensor):
    """SDPA inputs of another rank as (B, H, S, D), when their leading dims
    agree: (S, D) as one head, (H, S, D) as one batch, (..., H, S, D) with
    the leading dims as the batch (reshaped: a view where the strides allow).
    Inputs that broadcast their leading dims are returned as they are."""
    if q.dim() == 4 or not q.dim() == k.dim() == v.dim() or not q.shape[:-3] == k.shape[:-3] == v.shape[:-3]:
        return q, k, v
    batch = math.prod(q.shape[:-3])
    return tuple(t.reshape(batch, t.shape[-3] if t.dim() > 2 else 1, *t.shape[-2:]) for t in (q, k, v))


def _mask_problem(attn_mask: Tensor, query: Tensor, key: Tensor, is_causal: bool) -> Optional[str]:
    """Why the kernels cannot take this attn_mask, or None."""
    if is_causal:
        return "an attn_mask with is_causal=True (torch's SDPA refuses the pair)"
    if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype) or attn_mask.device != query.device:
        return (f"an attn_mask of {attn_mask.dtype} on {attn_mask.device} (the kernels take a bool, "
                f"float32 or {query.dtype} mask on {query.device}, as torch's SDPA does)")
    if attn_mask.requires_grad:
        return "an attn_mask that requires grad (the kernels give the mask no gradient)"
    scores = (*query.shape[:-1], key.shape[-2])
    # broadcasts to scores: trailing dims 1 or equal (in Python: torch.broadcast_shapes costs ~30 us of host time)
    if attn_mask.dim() <= len(scores) and all(m in (1, n) for m, n in zip(reversed(attn_mask.shape), reversed(scores))):
        return None
    return f"an attn_mask of shape {list(attn_mask.shape)} that does not broadcast to {list(scores)}"


def _kernel_mask(attn_mask: Tensor, query: Tensor, key: Tensor, q: Tensor) -> Tensor:
    """attn_mask as the kernels take it: broadcast to (B, Hq, Sq, Sk) of the
    4-D inputs q (a view; a copy only where a reshape of broadcast leading
    dims needs one)."""
    mask = torch.broadcast_to(attn_mask, (*query.shape[:-1], key.shape[-2]))
    return mask.reshape(*q.shape[:-1], key.shape[-2])


def _window(op: str, window_size) -> Optional[Tuple[int, int]]:
    """flash_attention's window_size as (left, right), or None for (-1, -1), no window."""
    try:
        left, right = (int(w) for w in window_size)
        valid = left >= -1 and right >= -1 and all(int(w) == w for w in window_size)
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(f"{op}: window_size must be two integers >= -1 (left, right), got {window_size!r}")
    return None if (left, right) == (-1, -1) else (left, right)


def _check_qkv(op: str, q, k, v, gqa: bool):
    """The errors torch's SDPA raises for the same inputs (type and meaning).
    As in torch, the leading (batch, head) dims broadcast; with gqa the query
    heads may also be a multiple of the key/value heads."""
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if not (q.dtype == k.dtype == v.dtype):
        raise RuntimeError(f"{op}: expected query, key and value to have the same dtype, got "
                           f"query {q.dtype}, key {k.dtype}, value {v.dtype}")
    if not (q.device == k.device == v.device):
        raise RuntimeError(f"{op}: expected query, key and value on the same device, got "
                           f"query {q.device}, key {k.device}, value {v.device}")
    if min(q.dim(), k.dim(), v.dim()) < 2:
        raise RuntimeError(f"{op}: expected query, key and value of rank at least 2, got "
                           f"{q.dim()}-D, {k.dim()}-D, {v.dim()}-D")
    if q.shape[-1] != k.shape[-1]:
        raise RuntimeError(f"{op}: query head dim {q.shape[-1]} must equal key head dim {k.shape[-1]}")
    if k.shape[-2] != v.shape[-2]:
        raise RuntimeError(f"{op}: key length {k.shape[-2]} must equal value length {v.shape[-2]}")
    if not q.is_floating_point():
        raise RuntimeError(f"{op}: expected floating-point query, key and value, got {q.dtype}")
    if q.shape[:-2] == k.shape[:-2] == v.shape[:-2]:
        return  # nothing to broadcast (torch.broadcast_shapes costs ~15 us of host time)
    if gqa and q.dim() == k.dim() >= 3 and k.shape[:-2] == v.shape[:-2] and q.shape[:-3] == k.shape[:-3] and \
            k.shape[-3] and q.shape[-3] % k.shape[-3] == 0:
        return  # GQA with nothing else to broadcast
    try:
        kv = list(torch.broadcast_shapes(k.shape[:-2], v.shape[:-2]))
        if gqa and q.dim() >= 3 and kv and kv[-1] and q.shape[-3] % kv[-1] == 0:
            kv[-1] = q.shape[-3]  # each key/value head serves q.shape[-3] / kv[-1] query heads
        torch.broadcast_shapes(q.shape[:-2], tuple(kv))
    except RuntimeError:
        raise RuntimeError(
            f"{op}: the leading (batch, head) dims of query {list(q.shape)}, key {list(k.shape)} and value "
            f"{list(v.shape)} do not broadcast" + (": query heads must be a multiple of key/value heads" if gqa
                                                   else " (fewer key/value heads need enable_gqa=True)")) from None


def _softcap(op: str, softcap) -> float:
    """A logit soft cap as a float, 0.0 for none."""
    try:
        value = float(softcap)
        valid = not isinstance(softcap, bool) and math.isfinite(value) and value >= 0
    except (TypeError, ValueError, RuntimeError):
        valid = False
    if not valid:
        raise ValueError(f"{op}: softcap must be a finite number >= 0 (0 for none), got {softcap!r}")
    return value


def _sinks(op: str, sinks, q: Tensor, heads_dim: int = -3) -> Optional[Tensor]:
    """Attention sinks as given, checked: None, or a floating-point (Hq,)
    tensor on q's device, Hq being q's size in `heads_dim`."""
    if sinks is None:
        return None
    if not isinstance(sinks, Tensor) or not sinks.is_floating_point() or sinks.dim() != 1 or \
            q.dim() < 3 or sinks.shape[0] != q.shape[heads_dim]:
        shape = list(sinks.shape) if isinstance(sinks, Tensor) else type(sinks).__name__
        raise ValueError(f"{op}: sinks must be a floating-point tensor of one logit per query head, shape "
                         f"[{q.shape[heads_dim] if q.dim() >= 3 else 'H'}], got {shape}")
    if sinks.device != q.device:
        raise RuntimeError(f"{op}: expected sinks on the query's device {q.device}, got {sinks.device}")
    return sinks


def _extras_problem(backend: str, window, softcap: float, sinks=None) -> Optional[str]:
    """Why `backend` cannot run a local window, a soft cap or sinks asked for, or None."""
    if backend in EXTRAS_FWD:
        return None
    if window is not None:
        return f"window_size={window}: the {backend} kernels have no local window (the Triton ones do)"
    if softcap > 0:
        return f"softcap={softcap}: the {backend} kernels have no logit soft cap (the Triton ones do)"
    if sinks is not None:
        return f"sinks: the {backend} kernels have no attention sinks (the Triton ones do)"
    return None


def flash_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale: Optional[float] = None,
                    window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0, sinks: Optional[Tensor] = None,
                    dropout_p: float = 0.0, return_lse: bool = False, deterministic: Optional[bool] = None,
                    backend=None):
    """Exact attention without an S x S matrix in memory, layout (B, H, S, D) like SDPA.

    causal=True aligns the mask bottom-right, as FlashAttention does: query i
    sees key j iff j <= i + Sk - Sq (rows that see no key give 0).
    window_size=(left, right), FlashAttention's local attention: query i sees
    key j iff i + Sk - Sq - left <= j <= i + Sk - Sq + right, -1 for no bound
    on that side (with causal=True, (W - 1, -1) is a sliding window of W keys,
    Mistral's or Gemma's); the kernels visit only the key blocks in the
    window. The Triton kernels and the reference have it, the CUDA ones not.
    softcap=c > 0, FlashAttention's soft cap (Gemma 2's logit capping): the
    scores s = q k^T * scale become c * tanh(s / c) before the softmax and
    any mask, so every logit stays within (-c, c); 0 (the default) for none.
    The Triton kernels and the reference have it, the CUDA ones not.
    sinks, a floating-point (Hq,) tensor, attention sinks (GPT-OSS's): one
    more logit per query head in each row's softmax, sinks[h] compared with
    the scaled scores (not capped, not masked), with no value, so the
    weights over the keys sum to below 1 and a row that sees no key gives 0;
    it gets its gradient. The Triton kernels and the reference have them,
    the CUDA ones not. k and v may
    have fewer heads than q (GQA/MQA: Hq a multiple of Hkv). return_lse=True
    also returns the float32 log-sum-exp of each query row, (B, Hq, Sq), which
    carries no gradient (it includes the sinks). dropout_p in [0, 1): each attention weight is
    dropped with that probability and the kept ones scaled by 1 / (1 - p), as
    SDPA's dropout does; the mask comes from torch's generator on the inputs'
    device (torch.manual_seed reproduces it) and is drawn again, not stored,
    in the backward. The Triton kernels and the reference have dropout (up to
    Sq * Sk < 2^31 in the kernels), the CUDA kernels not. The lse returned is
    that of the undropped weights. The Triton backend gives out in q's memory order, as
    torch's flash SDPA does (for q a (B, S, H, D) view, out is one too); the
    CUDA backend gives it contiguous.
    deterministic=False: the Triton backward adds dQ up with fp32 atomics in
    one pass (faster; dQ's last bits vary run to run). deterministic=True: it
    computes dQ in a second pass instead, giving the same bits run to run.
    None (the default) means torch.are_deterministic_algorithms_enabled() at
    the call: False unless torch.use_deterministic_algorithms(True) was set.
    The CUDA backward is always deterministic and ignores the flag; so does
    the reference. A backward with create_graph=True (double backward) is the
    reference's, from the saved inputs (an S x S matrix), under "auto"; a named
    kernel backend raises. Kernels: float16/bfloat16,
    head dims multiple of 8 up to 256 (v's may be its own, below q's and k's,
    as in DeepSeek's MLA: the Triton kernels); other inputs go to the reference
    (backend "auto") or raise (a kernel backend named). Under torch.autocast,
    q, k and v are cast as torch casts them for its SDPA (float32 to the
    region's dtype).
    """
    q, k, v = autocast_inputs("aten::scaled_dot_product_attention", q, k, v)
    if any(isinstance(t, Tensor) and t.is_nested for t in (q, k, v)):
        raise RuntimeError("flash_attention: nested (ragged) tensors are not supported; "
                           "pyext.scaled_dot_product_attention takes them (through torch's SDPA)")
    _check_qkv("flash_attention", q, k, v, gqa=True)
    if not q.dim() == k.dim() == v.dim() == 4:
        raise RuntimeError(f"flash_attention: expected 4-D (B, H, S, D) query, key and value, got "
                           f"{q.dim()}-D, {k.dim()}-D, {v.dim()}-D")
    if not q.shape[0] == k.shape[0] == v.shape[0]:
        raise RuntimeError(f"flash_attention: batch sizes differ: query {q.shape[0]}, key {k.shape[0]}, "
                           f"value {v.shape[0]}")
    if not _heads_fit(q, k, v):
        raise RuntimeError(f"flash_attention: query heads {q.shape[1]} must be a multiple of key/value heads "
                           f"{k.shape[1]}/{v.shape[1]}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"flash_attention: dropout_p must be in [0, 1), got {dropout_p}")
    window, softcap = _window("flash_attention", window_size), _softcap("flash_attention", softcap)
    sinks = _sinks("flash_attention", sinks, q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    causal_offset = k.shape[2] - q.shape[2]
    name = _backend.select("flash_attention", backend, q.device, lambda b: _why_not(
        b, q, k, v, _extras_problem(b, window, softcap, sinks), dropout_p), AUTO_ORDER)
    if name == "torch":
        out, lse = reference.attention(q, k, v, scale=scale, causal=causal, causal_offset=causal_offset,
                                       dropout_p=dropout_p, window=window, softcap=softcap, sinks=sinks)
    else:
        if deterministic is None:
            deterministic = torch.are_deterministic_algorithms_enabled()
        seed = _dropout_seed(q.device) if dropout_p > 0 else None
        out, lse = _FlashAttention.apply(name, _backend.is_auto(backend), deterministic, *_distinct(q, k, v), scale,
                                         causal, causal_offset, dropout_p, seed, None, window, softcap, sinks)
    return (out, lse) if return_lse else out


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False, *, backend=None) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention, with pyext's kernels
    where they apply (is_causal is top-left aligned, as in torch).
    Float32/float64 inputs, head dims over 256 or a value head dim above the
    query/key one go to torch's own SDPA under backend "auto"; a kernel
    backend named explicitly raises (a value head dim below it runs the
    Triton kernels). Dropout: the
    Triton kernels' when named (see flash_attention), torch's SDPA under auto
    until measured faster (SDPA_DROPOUT_AUTO_ORDER). attn_mask, boolean
    (False: not attended) or additive (bool, float32 or the inputs' dtype,
    broadcastable to (..., Sq, Sk)): likewise, the Triton kernels' when named
    (with dropout too; a mask that requires grad goes to torch),
    torch's SDPA under auto (SDPA_MASK_AUTO_ORDER). The
    backward is deterministic when torch.are_deterministic_algorithms_enabled()
    at the call (see flash_attention's `deterministic`). Under torch.autocast
    the inputs are cast as torch casts them (float32 to the region's dtype),
    so such calls run the kernels too. Inputs of rank 2, 3 or above 4 run the
    kernels when their leading dims agree (no broadcasting)."""
    return _scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                         backend=backend)


def _scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                  enable_gqa=False, *, backend=None, softcap: float = 0.0,
                                  window: Optional[Tuple[int, int]] = None, sinks: Optional[Tensor] = None) -> Tensor:
    """scaled_dot_product_attention with what pyext.patch's HF attention adds:
    a logit soft cap (softcap > 0, Gemma 2's; see flash_attention), attention
    sinks ((H,), GPT-OSS's; see flash_attention) and a local window (left,
    right) in place of a mask (a sliding-window layer over an unpadded
    batch), keys i - left .. i + right of query i (top-left, as is_causal).
    torch's SDPA has none of them, so with any the kernels come first under
    auto, masks and dropout too. Fallbacks: torch's SDPA with the window as a
    boolean mask (what transformers gives it), or with a cap or sinks the
    reference (S x S, as HF's eager attention computes it)."""
    query, key, value, attn_mask = autocast_inputs("aten::scaled_dot_product_attention", query, key, value,
                                                   attn_mask)
    _check_qkv("scaled_dot_product_attention", query, key, value, gqa=enable_gqa)
    sinks = _sinks("scaled_dot_product_attention", sinks, query)
    q, k, v = _as_4d(query, key, value)
    masked = attn_mask is not None
    if masked and window is not None:
        raise ValueError("scaled_dot_product_attention: a window in place of a mask, not with one")
    order = SDPA_DROPOUT_AUTO_ORDER if dropout_p > 0 else AUTO_ORDER
    if masked:
        order = tuple(b for b in order if b in SDPA_MASK_AUTO_ORDER)
    if softcap > 0 or window is not None or sinks is not None:
        order = AUTO_ORDER
    name = _backend.select("scaled_dot_product_attention", backend, query.device, lambda b: _why_not(
        b, q, k, v, (_mask_problem(attn_mask, query, key, is_causal) if masked else None) or
        _extras_problem(b, window, softcap, sinks), dropout_p, masked), order)
    if name == "torch" and (softcap > 0 or sinks is not None):
        return _extras_reference(query, key, value, attn_mask, dropout_p, is_causal, scale, softcap, window, sinks)
    if name == "torch":
        if window is not None:
            attn_mask, is_causal = _band(query.shape[-2], key.shape[-2], is_causal, window, query.device), False
        if attn_mask is not None and enable_gqa and query.dim() >= 3 and 0 < key.shape[-3] != query.shape[-3]:
            # what transformers does before torch's SDPA: its fused kernels take no mask with enable_gqa
            group = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(group, -3), value.repeat_interleave(group, -3)
            enable_gqa = False
        if query.dim() >= 3 and query.shape[-3] == key.shape[-3] == 0:
            # No heads: torch 2.11's SDPA divides by their count (SIGFPE, on CPU
            # at least). The plain products give its empty result, in the graph.
            return (query @ key.transpose(-2, -1)).softmax(-1) @ value
        return torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    seed = _dropout_seed(q.device) if dropout_p > 0 else None
    mask = _kernel_mask(attn_mask, query, key, q) if masked else None
    out = _FlashAttention.apply(name, _backend.is_auto(backend), torch.are_deterministic_algorithms_enabled(),
                                *_distinct(q, k, v), scale, is_causal, 0, dropout_p, seed, mask, window, softcap,
                                sinks)[0]
    return out.reshape(*query.shape[:-1], value.shape[-1]) if q is not query else out


def _band(seq_q: int, seq_k: int, causal: bool, window: Tuple[int, int], device) -> Tensor:
    """The (Sq, Sk) boolean mask of top-left causality and a window (left, right), -1 for no bound."""
    i = torch.arange(seq_q, device=device)[:, None]
    j = torch.arange(seq_k, device=device)[None, :]
    left, right = window
    visible = (j <= i) if causal else torch.ones(seq_q, seq_k, dtype=torch.bool, device=device)
    if left >= 0:
        visible = visible & (j >= i - left)
    if right >= 0:
        visible = visible & (j <= i + right)
    return visible


def _extras_reference(query, key, value, attn_mask, dropout_p, is_causal, scale, softcap, window, sinks) -> Tensor:
    """SDPA with a soft cap or sinks where the kernels do not run: the
    reference, in float32 for half inputs, with torch's SDPA's errors for a
    causal mask."""
    if is_causal and attn_mask is not None:
        raise RuntimeError("scaled_dot_product_attention: an attn_mask must not be set with is_causal=True "
                           "(torch's SDPA refuses the pair)")
    q, k, v = _as_4d(query, key, value)
    if not (q.dim() == 4 and q.shape[0] == k.shape[0] == v.shape[0] and _heads_fit(q, k, v)):
        raise ValueError(f"scaled_dot_product_attention with a soft cap or sinks: query, key and value must have "
                         f"the same leading dims (query heads a multiple of key/value heads), got "
                         f"{list(query.shape)}, {list(key.shape)}, {list(value.shape)}")
    mask = _kernel_mask(attn_mask, query, key, q) if attn_mask is not None else None
    out, _ = reference.attention(q, k, v, scale=scale, causal=is_causal, dropout_p=dropout_p, mask=mask,
                                 softcap=softcap, window=window, sinks=sinks)
    return out.reshape(*query.shape[:-1], value.shape[-1])
