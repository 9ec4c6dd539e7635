"""Checks of an attention call: the errors torch's SDPA raises for the same
inputs (_check_qkv), pyext's own arguments (_window, _softcap, _sinks), and
why a backend cannot run a call (_why_not, _mask_problem, _extras_problem):
backend "auto" then falls back, a backend named raises with that reason.
"""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from pyext import _backend
from pyext.ops._register import missing_reason
from pyext.ops.attention_ops import DROPOUT_FWD, EXTRAS_FWD, FWD, MASKED_FWD

_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


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
    if backend in ("triton", "cuda") and max(q.shape[0], q.shape[1]) > 65535:
        return f"batch {q.shape[0]} or heads {q.shape[1]} past 65535, the {backend} kernels' grid limit"
    if q.dtype not in _KERNEL_DTYPES:
        return f"dtype {q.dtype} is not supported (float16 and bfloat16 are)"
    d, dv = q.shape[-1], v.shape[-1]
    if not (0 < d <= MAX_HEAD_DIM and 0 < dv <= MAX_HEAD_DIM):
        return f"head dim {d} (value head dim {dv}) is not supported: 1 to {MAX_HEAD_DIM}"
    if backend == "cuda" and (d % 8 or dv % 8):
        return (f"head dim {d} (value head dim {dv}): the CUDA kernels take multiples of 8 "
                f"(their 16-byte loads), the Triton ones any up to {MAX_HEAD_DIM}")
    if dv > d or (dv != d and backend != "triton"):
        return (f"value head dim {dv} other than the query/key head dim {d} (the Triton kernels take one "
                f"below it, as DeepSeek's MLA has: benchmarks/NOTES.md, \"Value head dim\")")
    return None


def softmax_scale(scale: Optional[float], head_dim: int) -> float:
    """The logits' scale: `scale` as given, else torch's SDPA default,
    1 / sqrt(head dim) (inf at head dim 0, as torch's C++ computes it)."""
    if scale is not None:
        return float(scale)
    return 1.0 / math.sqrt(head_dim) if head_dim else math.inf


def _mask_problem(attn_mask: Tensor, query: Tensor, key: Tensor, is_causal: bool) -> Optional[str]:
    """Why the kernels cannot take this attn_mask, or None."""
    if is_causal:
        return "an attn_mask with is_causal=True (torch's SDPA refuses the pair)"
    if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype) or attn_mask.device != query.device:
        return (f"an attn_mask of {attn_mask.dtype} on {attn_mask.device} (the kernels take a bool, "
                f"float32 or {query.dtype} mask on {query.device}, as torch's SDPA does)")
    scores = (*query.shape[:-1], key.shape[-2])
    # broadcasts to scores: trailing dims 1 or equal (in Python: torch.broadcast_shapes costs ~30 us of host time)
    if attn_mask.dim() <= len(scores) and all(m in (1, n) for m, n in zip(reversed(attn_mask.shape), reversed(scores))):
        return None
    return f"an attn_mask of shape {list(attn_mask.shape)} that does not broadcast to {list(scores)}"


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
                                                   else " (fewer key/value heads need enable_gqa=True)")
            + _LAYOUT_HINT) from None


# The layout is SDPA's; a tensor in FlashAttention's (B, S, H, D) is read with its S as heads.
_LAYOUT_HINT = "; the layout is (B, H, S, D): FlashAttention's (B, S, H, D) tensors go in as t.transpose(1, 2)"


def _softcap(op: str, softcap) -> float:
    """A logit soft cap as a float, 0.0 for none."""
    try:
        value = float(softcap)
        # 0 <= value < inf, not math.isfinite: torch 2.14's dynamo cannot trace that under dynamic=True
        valid = not isinstance(softcap, bool) and 0.0 <= value < math.inf
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
