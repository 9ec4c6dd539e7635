"""Attention over a packed batch (FlashAttention's varlen): sequences of
different lengths laid end to end with no padding, q (total_q, Hq, D), k
(total_k, Hkv, D), v (total_k, Hkv, Dv); sequence b is query rows
cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1 and key rows likewise by
cu_seqlens_k (int32 or int64, B + 1 offsets from 0). Each sequence attends
to its own keys only: what a batch padded to the longest sequence computes,
without the padding's memory, reads or products (causal is bottom-right in
each sequence, as FlashAttention's). out (total_q, Hq, Dv) contiguous, lse
(Hq, total_q) fp32, and out_lo as out where flash_attn_fwd stores one.

The kernels are the dense ones with VARLEN: they see (B, H, total, D) views
whose batch stride is 0, and each program adds its sequence's first row
(tiles._sequence); the grid is sized by the longest sequence
(max_seqlen_q, max_seqlen_k, which the caller guarantees: pyext's op
checks them), and a program past its sequence's end visits no keys and
writes nothing. The per-row stats (lse, delta, the fp32 dQ buffer) are
those of one long sequence of all rows (tiles._stats_start). Sinks
(Hq,) start every sequence's rows as the dense kernels' (package
docstring); their gradient's shares go to one slot per (sequence, head,
key block).
"""
import torch

from .backward import flash_attn_bwd
from .forward import flash_attn_fwd, stores_low_part
from .launch import Packed, _unit_last_stride


def _batched(t, batch: int):
    """A (total, H, D) tensor as the kernels' (B, H, total, D) view, batch stride 0."""
    return t.transpose(0, 1).unsqueeze(0).expand(batch, -1, -1, -1)


def flash_attn_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, scale: float,
                          causal: bool, out=None, lse=None, dropout_p: float = 0.0, seed=None, window=None,
                          softcap: float = 0.0, sinks=None, out_lo=None):
    """(out, lse) of a packed batch (module docstring), and out_lo where
    flash_attn_fwd stores one (stores_low_part); `out`, `lse` and `out_lo`
    may be passed in (poisoned, by tests). dropout_p, seed, window, softcap and sinks as flash_attn_fwd's,
    per sequence (sequence b's dropout stream is batch entry b's)."""
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    batch = cu_seqlens_q.numel() - 1
    out = q.new_empty((q.shape[0], q.shape[1], v.shape[2])) if out is None else out
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device) if lse is None else lse
    if not stores_low_part(dropout_p, None, softcap, sinks, scale, q.shape[2]):
        out_lo = None
    elif out_lo is None:
        out_lo = torch.empty_like(out)
    outputs = (out, lse) if out_lo is None else (out, lse, out_lo)
    if out.numel() == 0:
        return outputs
    if k.shape[0] == 0 or batch == 0:  # no keys: every row sees none (but its sink)
        lse.copy_(torch.full_like(lse, float("-inf")) if sinks is None else sinks.float()[:, None].expand_as(lse))
        out.zero_()
        if out_lo is not None:
            out_lo.zero_()
        return outputs
    flash_attn_fwd(_batched(q, batch), _batched(k, batch), _batched(v, batch), scale, causal, 0,
                   out=_batched(out, batch), lse=lse, dropout_p=dropout_p, seed=seed, window=window,
                   softcap=softcap, sinks=sinks, packed=Packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k),
                   out_lo=None if out_lo is None else _batched(out_lo, batch))
    return outputs


def flash_attn_varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                          max_seqlen_k: int, scale: float, causal: bool, deterministic: bool, dq=None, dk=None,
                          dv=None, dropout_p: float = 0.0, seed=None, window=None, softcap: float = 0.0,
                          sinks=None, out_lo=None):
    """(dq, dk, dv) of a packed batch, each in its input's memory order, and
    with `sinks` dsinks (Hq,) fp32 after them; the rest as flash_attn_bwd's
    (gradients may be passed in, poisoned; out_lo the forward's)."""
    dout, q, k, v, out = (_unit_last_stride(t) for t in (dout, q, k, v, out))
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    batch = cu_seqlens_q.numel() - 1
    if batch == 0 or q.shape[0] == 0 or k.shape[0] == 0 or q.shape[1] == 0:
        grads = dq.zero_(), dk.zero_(), dv.zero_()
        return grads if sinks is None else (*grads, torch.zeros(q.shape[1], dtype=torch.float32, device=q.device))
    dsinks = flash_attn_bwd(*(_batched(t, batch) for t in (dout, q, k, v, out)), lse, scale, causal, 0,
                            deterministic, dq=_batched(dq, batch), dk=_batched(dk, batch), dv=_batched(dv, batch),
                            dropout_p=dropout_p, seed=seed, window=window, softcap=softcap, sinks=sinks,
                            packed=Packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k),
                            out_lo=None if out_lo is None else _batched(out_lo, batch))[3:]
    return (dq, dk, dv, *dsinks)
