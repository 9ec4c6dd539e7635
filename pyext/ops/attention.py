"""pyext.flash_attention and pyext.scaled_dot_product_attention: each checks
its call (attention_checks.py), picks a backend, and runs the kernels'
ops (attention_ops.py) or the fallback: the reference, or torch's SDPA.
"""
import math
import threading
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from pyext import _backend, reference
from pyext._autocast import autocast_inputs
from pyext.ops.attention_checks import (_LAYOUT_HINT, _check_qkv, _extras_problem, _heads_fit, _mask_problem, _sinks,
                                        _softcap, _why_not, _window, softmax_scale)
from pyext.ops.attention_ops import flash_attention_apply
from pyext.ops._register import fx_traceable


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

# The same for scaled_dot_product_attention with a head dim that is not a
# multiple of 8: torch's SDPA (its flash kernel pads such heads to one) until
# a GPU run shows the Triton kernels at least as fast there (they read such
# rows without 16-byte loads and never through TMA). flash_attention, whose
# fallback is the reference, takes the Triton kernels under auto.
SDPA_UNALIGNED_HEAD_AUTO_ORDER = ()

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


def _as_4d(q: Tensor, k: Tensor, v: Tensor):
    """SDPA inputs of another rank as (B, H, S, D), when their leading dims
    agree: (S, D) as one head, (H, S, D) as one batch, (..., H, S, D) with
    the leading dims as the batch (reshaped: a view where the strides allow).
    Inputs that broadcast their leading dims are returned as they are."""
    if q.dim() == 4 or not q.dim() == k.dim() == v.dim() or not q.shape[:-3] == k.shape[:-3] == v.shape[:-3]:
        return q, k, v
    batch = math.prod(q.shape[:-3])
    return tuple(t.reshape(batch, t.shape[-3] if t.dim() > 2 else 1, *t.shape[-2:]) for t in (q, k, v))


def _kernel_mask(attn_mask: Tensor, query: Tensor, key: Tensor, q: Tensor) -> Tensor:
    """attn_mask as the kernels take it, for the 4-D inputs q. Inputs of up
    to 4 dims: the mask as it is (the kernels read it broadcast, and sum a
    learned bias's gradient over its broadcast dims in float32:
    flash_attn_masked_bwd_triton). Inputs with more leading dims, which q
    flattens into its batch: the mask's leading dims broadcast and
    flattened the same way (a copy where the reshape needs one); a half
    mask that requires grad goes up to float32 first there, so that its
    gradient's sum over those dims is rounded once too."""
    if query.dim() <= 4:
        return attn_mask
    scores = (*query.shape[:-1], key.shape[-2])
    lead = len(scores) - 3
    mask = attn_mask.reshape((1,) * (len(scores) - attn_mask.dim()) + tuple(attn_mask.shape))
    if attn_mask.requires_grad and torch.is_grad_enabled() and attn_mask.dtype != torch.float32 and \
            tuple(mask.shape[:lead]) != scores[:lead]:
        mask = mask.float()
    mask = torch.broadcast_to(mask, (*scores[:lead], *mask.shape[lead:]))
    return mask.reshape(q.shape[0], *mask.shape[lead:])


@fx_traceable
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
    carries no gradient (it includes the sinks; -inf, the log of an empty sum,
    on every backend for a row that sees no key, where FlashAttention-2
    writes +inf). dropout_p in [0, 1): each attention weight is dropped
    with that probability and the kept ones scaled by 1 / (1 - p), as
    SDPA's dropout does; the mask comes from torch's generator on the inputs'
    device (torch.manual_seed reproduces it) and is drawn again, not stored,
    in the backward. The Triton kernels and the reference have dropout (up to
    Sq * Sk < 2^31 in the kernels), the CUDA kernels not. The lse returned is
    that of the undropped weights. The Triton backend gives out in q's memory order, as
    torch's flash SDPA does (for q a (B, S, H, D) view, out is one too); the
    CUDA backend gives it contiguous.
    deterministic=False: the Triton backward adds dQ up with fp32 atomics in
    one pass (five products a tile where two passes take seven; dQ's last
    bits vary run to run). deterministic=True: it computes dQ in a second
    pass instead, giving the same bits run to run. Which is faster depends on
    the GPU: benchmarks/NOTES.md has the measured figures.
    None (the default) means torch.are_deterministic_algorithms_enabled() at
    the call: False unless torch.use_deterministic_algorithms(True) was set.
    The CUDA backward does the same (its sm_90a and mma.sync kernels alike);
    the reference is deterministic either way. A backward with
    create_graph=True (double backward) is the reference's, from the saved
    inputs (an S x S matrix), under "auto"; a named kernel backend raises.
    On compute capability 9.0 and up the Triton forward and backward read
    their tiles through TMA (tensor descriptors) where the call has no
    dropout, mask or window and the layouts are 16-byte aligned;
    PYEXT_TRITON_ATTN_LOADS=pointer keeps them on the pointer kernels.
    Kernels: float16/bfloat16, head dims up to 256, multiples of 8 in the
    CUDA kernels, any in the Triton ones (v's may be its own, below q's and
    k's, as in DeepSeek's MLA: the Triton kernels);
    other inputs go to the reference (backend "auto") or raise (a kernel
    backend named). DTensors (a tensor-parallel model's heads) are other
    inputs: the reference runs them through DTensor's own ops, which in
    torch 2.11 cannot multiply 4-D tensors sharded along the heads (2.14's
    can). Under torch.autocast, q, k and v are cast as torch casts
    them for its SDPA (float32 to the region's dtype).
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
                           f"{k.shape[1]}/{v.shape[1]}" + _LAYOUT_HINT)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"flash_attention: dropout_p must be in [0, 1), got {dropout_p}")
    window, softcap = _window("flash_attention", window_size), _softcap("flash_attention", softcap)
    sinks = _sinks("flash_attention", sinks, q)
    scale = softmax_scale(scale, q.shape[-1])
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
        out, lse = flash_attention_apply("flash_attention", name, _backend.is_auto(backend), deterministic,
                                         *_distinct(q, k, v), scale, causal, causal_offset, dropout_p, seed, None,
                                         window, softcap, sinks)[:2]
    return (out, lse) if return_lse else out


@fx_traceable
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
    (with dropout too; a mask that requires grad, a learned bias, gets its
    gradient, in its dtype), torch's SDPA under auto (SDPA_MASK_AUTO_ORDER).
    Head dims that are not a multiple of 8: likewise
    (SDPA_UNALIGNED_HEAD_AUTO_ORDER). The
    backward is deterministic when torch.are_deterministic_algorithms_enabled()
    at the call (see flash_attention's `deterministic`). Under torch.autocast
    the inputs are cast as torch casts them (float32 to the region's dtype),
    so such calls run the kernels too. Inputs of rank 2, 3 or above 4 run the
    kernels when their leading dims agree (no broadcasting)."""
    return _scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                         backend=backend)


@fx_traceable
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
    if query.shape[-1] % 8 or value.shape[-1] % 8:
        order = tuple(b for b in order if b in SDPA_UNALIGNED_HEAD_AUTO_ORDER)
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
        # No batch or no heads: torch 2.11's SDPA divides by the heads (SIGFPE,
        # on CPU at least) and gives an empty batch no tensor at all (None, on
        # CUDA). The plain products give its empty result, in the graph.
        empty = query.dim() >= 3 and 0 in query.shape[:-2]
        if (attn_mask is not None or empty) and enable_gqa and query.dim() >= 3 and \
                0 < key.shape[-3] != query.shape[-3]:
            # what transformers does before torch's SDPA: its fused kernels take no mask with enable_gqa
            group = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(group, -3), value.repeat_interleave(group, -3)
            enable_gqa = False
        if empty:
            _refuse_as_torch_sdpa(query, attn_mask, is_causal)
            return (query @ key.transpose(-2, -1)).softmax(-1) @ value
        return torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    scale = softmax_scale(scale, query.shape[-1])
    seed = _dropout_seed(q.device) if dropout_p > 0 else None
    mask = _kernel_mask(attn_mask, query, key, q) if masked else None
    out = flash_attention_apply("scaled_dot_product_attention", name, _backend.is_auto(backend),
                                torch.are_deterministic_algorithms_enabled(), *_distinct(q, k, v), scale,
                                is_causal, 0, dropout_p, seed, mask, window, softcap, sinks)[0]
    return out.reshape(*query.shape[:-1], value.shape[-1]) if q is not query else out


def _refuse_as_torch_sdpa(query: Tensor, attn_mask: Optional[Tensor], is_causal: bool) -> None:
    """The argument errors torch's SDPA raises, for calls that do not reach it (an empty batch)."""
    if attn_mask is None:
        return
    if is_causal:
        raise RuntimeError("_scaled_dot_product_attention: Explicit attn_mask should not be set when is_causal=True")
    if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
        raise RuntimeError(f"Expected attn_mask dtype to be bool or float or to match query dtype, but got "
                           f"attn_mask.dtype: {attn_mask.dtype} and query.dtype: {query.dtype} instead.")


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
