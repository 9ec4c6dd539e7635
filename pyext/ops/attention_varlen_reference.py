"""flash_attention_varlen's reference (backend "torch", and what "auto"
leaves to it) as one op for torch.compile and torch.export:

    flash_attn_varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal, window_left,
                                window_right, softcap, sinks) -> (out, lse)
    flash_attn_varlen_reference_bwd(dout, dlse, q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal,
                                    window_left, window_right, softcap, sinks) -> (dq, dk, dv, dsinks)

The reference reads the offsets on the host and runs each sequence on its
own, which a trace cannot follow (a size that depends on the offsets'
values): traced, the call is these ops, opaque, their shapes from fake
implementations, the backward the reference's own, its forward recomputed
(memory as the eager call's: each sequence's S x S at a time). Eager calls run the
reference directly. Dropout stays eager (its draws are the reference's).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from pyext import reference


def _window(left: int, right: int):
    return None if (left, right) == (-1, -1) else (left, right)


@torch.library.custom_op("pyext::flash_attn_varlen_reference", mutates_args=())
def flash_attn_varlen_reference(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                                scale: float, causal: bool, window_left: int, window_right: int, softcap: float,
                                sinks: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    return reference.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, scale=scale, causal=causal,
                                      window=_window(window_left, window_right), softcap=softcap, sinks=sinks)


@flash_attn_varlen_reference.register_fake
def _fake(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal, window_left, window_right, softcap, sinks):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty((q.shape[0], q.shape[1], v.shape[2])), q.new_empty((q.shape[1], q.shape[0]), dtype=lse_dtype)


@torch.library.custom_op("pyext::flash_attn_varlen_reference_bwd", mutates_args=())
def flash_attn_varlen_reference_bwd(dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
                                    cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, scale: float, causal: bool,
                                    window_left: int, window_right: int, softcap: float,
                                    sinks: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dsinks; empty without sinks): the reference's gradients,
    its forward recomputed under autograd (an op too: a trace of the
    backward cannot follow the offsets either)."""
    offsets_q, offsets_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()  # read outside the vjp (torch 2.9)

    def forward(q, k, v, *sinks):
        return reference.attention_varlen(q, k, v, offsets_q, offsets_k, scale=scale, causal=causal,
                                          window=_window(window_left, window_right), softcap=softcap,
                                          sinks=sinks[0] if sinks else None)
    # torch.func's vjp: plain autograd is off inside an op's kernel
    (out, lse), vjp = torch.func.vjp(forward, q, k, v, *([] if sinks is None else [sinks]))
    dq, dk, dv, *dsinks = vjp((dout, torch.zeros_like(lse) if dlse is None else dlse))
    return dq, dk, dv, dsinks[0] if dsinks else q.new_empty(0)


@flash_attn_varlen_reference_bwd.register_fake
def _fake_bwd(dout, dlse, q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal, window_left, window_right, softcap,
              sinks):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(sinks) if sinks is not None else q.new_empty(0))


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, *options, sinks = inputs
    ctx.save_for_backward(q, k, v, cu_seqlens_q, cu_seqlens_k, sinks)
    ctx.options = options  # scale, causal, window_left, window_right, softcap


def _backward(ctx, dout, dlse):
    q, k, v, cu_seqlens_q, cu_seqlens_k, sinks = ctx.saved_tensors
    dq, dk, dv, dsinks = flash_attn_varlen_reference_bwd(dout, dlse, q, k, v, cu_seqlens_q, cu_seqlens_k,
                                                         *ctx.options, sinks)
    return dq, dk, dv, None, None, None, None, None, None, None, dsinks if sinks is not None else None


flash_attn_varlen_reference.register_autograd(_backward, setup_context=_setup_context)
