"""Gated RMSNorm: pyext.rms_norm_gated and its ops rms_norm_gated_{fwd,bwd}_triton.

The forward op returns (y, rstd), rstd of x's leading shape (then the
groups, where group_size makes them) in fp32 (fp64 for fp64 x), saved for
the backward; the backward op returns (dx, dgate, dweight), dweight an
empty tensor unless asked for. The ops take group_size None for whole rows.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from pyext import _backend, reference
from pyext.ops._register import (create_graph_grads, fx_traceable, missing_reason, register_stages,
                                 sharding_rules_for)
from pyext.ops.layer_norm import (_KERNEL_DTYPES, _narrower_rms_weight, _param_dtype_ok, _stat_dtype,
                                  checked_eps, default_rms_eps, groups_reason)

ACTIVATIONS = ("silu", "sigmoid")


def _check_inputs(op: str, x, gate, weight, activation, group_size):
    """Errors for a call no backend can serve, each naming its argument."""
    for name, t in (("x", x), ("gate", gate), ("weight", weight)):
        if not isinstance(t, Tensor) and (t is not None or name != "weight"):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if x.dim() == 0:
        raise RuntimeError(f"{op}: x must have at least one dimension (the normalized one), got a scalar")
    if gate.shape != x.shape:
        raise RuntimeError(f"{op}: gate must have x's shape {list(x.shape)}, got gate of shape {list(gate.shape)}")
    n = x.shape[-1]
    if weight is not None and tuple(weight.shape) != (n,):
        raise RuntimeError(f"{op}: weight must have shape [{n}] (x's last dim), got weight of shape "
                           f"{list(weight.shape)}")
    for name, t in (("gate", gate), ("weight", weight)):
        if t is not None and t.device != x.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if group_size is not None and (not isinstance(group_size, int) or group_size <= 0 or n % group_size):
        raise ValueError(f"{op}: group_size must be a positive divisor of x's last dim {n}, got {group_size!r}")
    for name, t in (("x", x), ("gate", gate), ("weight", weight)):
        if t is not None and not t.is_floating_point():
            raise NotImplementedError(f"{op}: {name} must be a floating-point tensor, got dtype {t.dtype}")


def _kernel_reason(x, gate, weight, group_size) -> Optional[str]:
    """Why the Triton kernels cannot take this call (beyond the device), or None."""
    for name, t in (("x", x), ("gate", gate)):
        if t.dtype not in _KERNEL_DTYPES:
            return f"{name} dtype {t.dtype} is not supported (float32, float16, bfloat16, float64 are)"
    if weight is not None and not (_param_dtype_ok(x.dtype, weight.dtype) or
                                   _narrower_rms_weight(x.dtype, weight.dtype)):
        return (f"weight dtype {weight.dtype} with x dtype {x.dtype} is not supported (x's dtype, float32 for "
                "float16/bfloat16 x, or a narrower one)")
    return groups_reason(x.shape[-1] // group_size if group_size else 1)


# ------------------------------------------------------- Triton stages (ops)

@torch.library.custom_op("pyext::rms_norm_gated_fwd_triton", mutates_args=())
def rms_norm_gated_fwd_triton(x: Tensor, gate: Tensor, weight: Optional[Tensor], eps: float, activation: str,
                              norm_before_gate: bool, group_size: Optional[int]) -> Tuple[Tensor, Tensor]:
    from pyext.triton_kernels import rms_norm_gated as kernels
    _check_inputs("rms_norm_gated_fwd_triton", x, gate, weight, activation, group_size)
    reason = _kernel_reason(x, gate, weight, group_size)
    if reason is not None:
        raise RuntimeError(f"rms_norm_gated_fwd_triton: {reason}")
    return kernels.rms_norm_gated_fwd(x, gate, weight, eps, activation, not norm_before_gate, group_size)


@torch.library.custom_op("pyext::rms_norm_gated_bwd_triton", mutates_args=())
def rms_norm_gated_bwd_triton(grad: Tensor, x: Tensor, gate: Tensor, rstd: Tensor, weight: Optional[Tensor],
                              activation: str, norm_before_gate: bool, need_dweight: bool,
                              group_size: Optional[int]) -> Tuple[Tensor, Tensor, Tensor]:
    from pyext.triton_kernels import rms_norm_gated as kernels
    op = "rms_norm_gated_bwd_triton"
    _check_inputs(op, x, gate, weight, activation, group_size)
    reason = _kernel_reason(x, gate, weight, group_size)
    if reason is not None:
        raise RuntimeError(f"{op}: {reason}")
    if grad.shape != x.shape or grad.dtype != x.dtype or grad.device != x.device:
        raise RuntimeError(f"{op}: grad must match x ({x.dtype} {list(x.shape)} on {x.device}), "
                           f"got {grad.dtype} {list(grad.shape)} on {grad.device}")
    stat, shape = _stat_dtype(x.dtype), _rstd_shape(x, group_size)
    if rstd.shape != shape or rstd.dtype != stat or rstd.device != x.device:
        raise RuntimeError(f"{op}: rstd must be {stat} of shape {list(shape)} on {x.device}, "
                           f"got {rstd.dtype} {list(rstd.shape)} on {rstd.device}")
    if need_dweight and weight is None:
        raise RuntimeError(f"{op}: need_dweight without a weight")
    return kernels.rms_norm_gated_bwd(grad, x, gate, rstd, weight, activation, not norm_before_gate, need_dweight,
                                      group_size)


# ------------------------------------------- fake implementations, autograd

def _rstd_shape(x, group_size):
    """rstd's shape: x's leading shape, then the groups where there are groups."""
    return x.shape[:-1] + ((x.shape[-1] // group_size,) if group_size else ())


def _fake_fwd(x, gate, weight, eps, activation, norm_before_gate, group_size):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(_rstd_shape(x, group_size), dtype=_stat_dtype(x.dtype)))


def _fake_bwd(grad, x, gate, rstd, weight, activation, norm_before_gate, need_dweight, group_size):
    dweight = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_dweight else x.new_empty(0)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(gate, memory_format=torch.contiguous_format), dweight)


def _setup_context(ctx, inputs, output):
    x, gate, weight, eps, activation, norm_before_gate, group_size = inputs
    ctx.save_for_backward(x, gate, output[1], weight)
    ctx.options = (eps, activation, norm_before_gate, group_size)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _make_backward(bwd_op):
    def backward(ctx, grad, _rstd_grad):
        if grad is None:
            return None, None, None, None, None, None, None
        x, gate, rstd, weight = ctx.saved_tensors
        _, activation, norm_before_gate, group_size = ctx.options
        if torch.is_grad_enabled():  # create_graph=True
            return create_graph_grads("rms_norm_gated", ctx, reference.rms_norm_gated,
                                      (x, gate, weight, *ctx.options), (grad,))
        need_dx, need_dgate, need_dweight = ctx.needs_input_grad[:3]
        dx, dgate, dweight = bwd_op(grad, x, gate, rstd, weight, activation, norm_before_gate, need_dweight,
                                    group_size)
        return (dx if need_dx else None, dgate if need_dgate else None, dweight if need_dweight else None,
                None, None, None, None)
    return backward


RMS_NORM_GATED_FWD, _, RMS_NORM_GATED = register_stages("rms_norm_gated", _fake_fwd, _fake_bwd, _setup_context,
                                                        _make_backward)


# ------------------------------------------------------------ public API

@fx_traceable
def rms_norm_gated(x: Tensor, gate: Tensor, weight: Optional[Tensor] = None, eps: Optional[float] = None, *,
                   activation: str = "silu", norm_before_gate: bool = True, group_size: Optional[int] = None,
                   backend=None) -> Tensor:
    """RMSNorm over x's last dim fused with a gate, the norm of linear
    attention and Mamba layers:

        norm_before_gate=True  (Qwen3-Next, Qwen3.5, OLMo hybrid, GLM-5 Next, Kimi Linear)
            y = x / sqrt(mean(x^2) + eps) * weight * act(gate)
        norm_before_gate=False (Mamba 2, Bamba, Nemotron-H, Granite 4)
            h = x * act(gate);  y = h / sqrt(mean(h^2) + eps) * weight

    act is silu or sigmoid; gate has x's shape, in any floating dtype
    (Granite 4's Mamba layers gate float32 x with a bfloat16 gate; dgate
    comes in the gate's dtype); weight (x's last dim,) is optional; group_size normalizes groups of that many features
    separately (None: the whole row). eps None means what it means in
    F.rms_norm. Differentiable in x, gate and weight; computed in float32
    (float64 for float64 x) and rounded once to x's dtype, where the models'
    own code rounds the normalized x before the weight.

    The Triton kernels take float32/float16/bfloat16/float64 x with weight
    of x's dtype, float32, or a narrower one (Mamba's float32 residual
    stream through bfloat16 norms; dweight in the weight's dtype). The fast
    path holds rows (or groups) of up to 8192 features whole (one read of x
    and gate forward; x, gate and dy backward), up to 65535 groups a row
    (the grid's limit); longer ones go through chunked kernels that read
    each input twice. "auto" sends other calls to torch (the
    reference), a named backend raises.
    There are no CUDA kernels for it.
    """
    _check_inputs("rms_norm_gated", x, gate, weight, activation, group_size)
    eps = checked_eps("rms_norm_gated", eps, optional=True)

    def why_not(name):
        if name == "torch":
            return None
        reason = (_backend.device_reason(name, *(t for t in (x, gate, weight) if t is not None), dtensors=True)
                  or missing_reason(name, RMS_NORM_GATED_FWD, "rms_norm_gated"))
        if reason is None:
            sharding_rules_for(x, "rms_norm_gated", name)
        return reason or _kernel_reason(x, gate, weight, group_size)
    name = _backend.select("rms_norm_gated", backend, x.device, why_not)
    if name == "torch":
        return reference.rms_norm_gated(x, gate, weight, eps, activation, norm_before_gate, group_size)
    eps = default_rms_eps(x.dtype) if eps is None else eps
    groups = None if group_size in (None, x.shape[-1]) else group_size
    return RMS_NORM_GATED[_backend.is_auto(backend)][name](x, gate, weight, eps, activation, norm_before_gate,
                                                           groups)[0]
