"""Norms over groups of a row: pyext.layer_norm and pyext.rms_norm given a
group_size, and their ops grouped_{layer_norm,rms_norm}_{fwd,bwd}_triton.

A row of n = prod(normalized_shape) elements is normalized over each of its
n / group_size groups of group_size consecutive elements; the weight and
bias keep normalized_shape. The models': Cohere's QK norm (a LayerNorm over
head_dim with a weight of (heads, head_dim)), Qwen4-Exp's hyper-connection
norm (an RMSNorm over each of a row's streams). The forward ops return
(y, mean, rstd) and (y, rstd), the statistics of x's leading shape then the
groups, in fp32 (fp64 for fp64 x); the backward ops return what
layer_norm's do. Triton kernels only: "auto" takes them on a GPU, torch
elsewhere; a named "cuda" raises.
"""
import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from pyext import _backend, reference
from pyext.ops._register import create_graph_grads, register_stages
from pyext.ops.layer_norm import (_check_backward, _check_inputs, _fake_grad, _kernel_dtypes_or_raise, _stat_dtype,
                                  _why_not, default_rms_eps, groups_reason)


# ------------------------------------------------------- Triton stages (ops)

def _raise_for_groups(op, groups):
    reason = groups_reason(groups)
    if reason is not None:
        raise RuntimeError(f"{op}: {reason}")


@torch.library.custom_op("pyext::grouped_layer_norm_fwd_triton", mutates_args=())
def grouped_layer_norm_fwd_triton(x: Tensor, normalized_shape: List[int], weight: Optional[Tensor],
                                  bias: Optional[Tensor], eps: float, group_size: int) -> Tuple[Tensor, Tensor, Tensor]:
    from pyext.triton_kernels import layer_norm as kernels
    op = "grouped_layer_norm_fwd_triton"
    shape = _check_inputs(op, x, normalized_shape, weight, bias, rms=False, group_size=group_size)
    _kernel_dtypes_or_raise(op, x, weight, bias)
    _raise_for_groups(op, math.prod(shape) // group_size)
    return kernels.layer_norm_fwd(x, shape, weight, bias, eps, group_size=group_size)


@torch.library.custom_op("pyext::grouped_layer_norm_bwd_triton", mutates_args=())
def grouped_layer_norm_bwd_triton(grad: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor],
                                  bias: Optional[Tensor], need_dweight: bool, need_dbias: bool,
                                  group_size: int) -> Tuple[Tensor, Tensor, Tensor]:
    from pyext.triton_kernels import layer_norm as kernels
    _check_backward("grouped_layer_norm_bwd_triton", grad, x, mean, rstd, weight, bias, need_dweight, need_dbias,
                    group_size)
    _raise_for_groups("grouped_layer_norm_bwd_triton", rstd.shape[-1])
    return kernels.layer_norm_bwd(grad, x, mean, rstd, weight, bias, need_dweight, need_dbias, group_size=group_size)


@torch.library.custom_op("pyext::grouped_rms_norm_fwd_triton", mutates_args=())
def grouped_rms_norm_fwd_triton(x: Tensor, normalized_shape: List[int], weight: Optional[Tensor], eps: float,
                                group_size: int) -> Tuple[Tensor, Tensor]:
    from pyext.triton_kernels import layer_norm as kernels
    op = "grouped_rms_norm_fwd_triton"
    shape = _check_inputs(op, x, normalized_shape, weight, None, rms=True, group_size=group_size)
    _kernel_dtypes_or_raise(op, x, weight, rms=True)
    _raise_for_groups(op, math.prod(shape) // group_size)
    return kernels.rms_norm_fwd(x, shape, weight, eps, group_size=group_size)


@torch.library.custom_op("pyext::grouped_rms_norm_bwd_triton", mutates_args=())
def grouped_rms_norm_bwd_triton(grad: Tensor, x: Tensor, rstd: Tensor, weight: Optional[Tensor], need_dweight: bool,
                                group_size: int) -> Tuple[Tensor, Tensor]:
    from pyext.triton_kernels import layer_norm as kernels
    _check_backward("grouped_rms_norm_bwd_triton", grad, x, None, rstd, weight, None, need_dweight, False, group_size)
    _raise_for_groups("grouped_rms_norm_bwd_triton", rstd.shape[-1])
    return kernels.rms_norm_bwd(grad, x, rstd, weight, need_dweight, group_size=group_size)


# ------------------------------------------- fake implementations, autograd

def _fake_stats(x, normalized_shape, group_size):
    batch = x.shape[:x.dim() - len(normalized_shape)]
    n = x.shape[x.dim() - len(normalized_shape):].numel()
    return x.new_empty((*batch, n // group_size), dtype=_stat_dtype(x.dtype))


def _fake_ln_fwd(x, normalized_shape, weight, bias, eps, group_size):
    stats = _fake_stats(x, normalized_shape, group_size)
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


def _fake_rms_fwd(x, normalized_shape, weight, eps, group_size):
    return torch.empty_like(x, memory_format=torch.contiguous_format), _fake_stats(x, normalized_shape, group_size)


def _fake_ln_bwd(grad, x, mean, rstd, weight, bias, need_dweight, need_dbias, group_size):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    return dx, _fake_grad(need_dweight, weight, x), _fake_grad(need_dbias, bias, x)


def _fake_rms_bwd(grad, x, rstd, weight, need_dweight, group_size):
    return torch.empty_like(x, memory_format=torch.contiguous_format), _fake_grad(need_dweight, weight, x)


def _ln_setup_context(ctx, inputs, output):
    x, normalized_shape, weight, bias, eps, group_size = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, mean, rstd, weight, bias)
    ctx.normalized_shape, ctx.eps, ctx.group_size = normalized_shape, eps, group_size
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)


def _rms_setup_context(ctx, inputs, output):
    x, normalized_shape, weight, eps, group_size = inputs
    _, rstd = output
    ctx.save_for_backward(x, rstd, weight)
    ctx.normalized_shape, ctx.eps, ctx.group_size = normalized_shape, eps, group_size
    ctx.mark_non_differentiable(rstd)
    ctx.set_materialize_grads(False)


def _make_ln_backward(bwd_op):
    def backward(ctx, grad, _mean_grad, _rstd_grad):
        if grad is None:
            return (None,) * 6
        x, mean, rstd, weight, bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            return create_graph_grads("layer_norm", ctx, reference.grouped_layer_norm,
                                      (x, ctx.normalized_shape, weight, bias, ctx.eps, ctx.group_size), (grad,))
        need_dx, _, need_dweight, need_dbias, _, _ = ctx.needs_input_grad
        dx, dweight, dbias = bwd_op(grad, x, mean, rstd, weight, bias, need_dweight, need_dbias, ctx.group_size)
        return (dx if need_dx else None, None, dweight if need_dweight else None,
                dbias if need_dbias else None, None, None)
    return backward


def _make_rms_backward(bwd_op):
    def backward(ctx, grad, _rstd_grad):
        if grad is None:
            return (None,) * 5
        x, rstd, weight = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            return create_graph_grads("rms_norm", ctx, reference.grouped_rms_norm,
                                      (x, ctx.normalized_shape, weight, ctx.eps, ctx.group_size), (grad,))
        need_dx, _, need_dweight, _, _ = ctx.needs_input_grad
        dx, dweight = bwd_op(grad, x, rstd, weight, need_dweight, ctx.group_size)
        return dx if need_dx else None, None, dweight if need_dweight else None, None, None
    return backward


_, _, GROUPED_LAYER_NORM = register_stages("grouped_layer_norm", _fake_ln_fwd, _fake_ln_bwd, _ln_setup_context,
                                           _make_ln_backward)
_, _, GROUPED_RMS_NORM = register_stages("grouped_rms_norm", _fake_rms_fwd, _fake_rms_bwd, _rms_setup_context,
                                         _make_rms_backward)


# ------------------------------------------------- what the public API calls

def _why_not_grouped(backend: str, x: Tensor, groups: int, *params, rms=False):
    if backend == "cuda":
        return "pyext has no CUDA kernels for norms over groups of a row (group_size); the Triton ones take them"
    return _why_not(backend, x, *params, rms=rms, family="grouped_norm") or \
        (None if backend == "torch" else groups_reason(groups))


def layer_norm(x, shape, weight, bias, eps, group_size, backend):
    """pyext.layer_norm over groups of group_size, its arguments checked."""
    name = _backend.select("layer_norm", backend, x.device,
                           lambda b: _why_not_grouped(b, x, math.prod(shape) // group_size, weight, bias),
                           auto_order=("triton",))
    if name == "torch":
        return reference.grouped_layer_norm(x, shape, weight, bias, eps, group_size)
    return GROUPED_LAYER_NORM[_backend.is_auto(backend)][name](x, list(shape), weight, bias, float(eps),
                                                               group_size)[0]


def rms_norm(x, shape, weight, eps, group_size, backend):
    """pyext.rms_norm over groups of group_size, its arguments checked."""
    name = _backend.select("rms_norm", backend, x.device,
                           lambda b: _why_not_grouped(b, x, math.prod(shape) // group_size, weight, rms=True),
                           auto_order=("triton",))
    if name == "torch":
        return reference.grouped_rms_norm(x, shape, weight, eps, group_size)
    eps = default_rms_eps(x.dtype) if eps is None else float(eps)
    return GROUPED_RMS_NORM[_backend.is_auto(backend)][name](x, list(shape), weight, eps, group_size)[0]
