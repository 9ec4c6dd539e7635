"""LayerNorm and RMSNorm: pyext.layer_norm, pyext.rms_norm and their ops
{layer_norm,rms_norm}_{fwd,bwd}_{cuda,triton}.

Forward ops return (y, mean, rstd) for LayerNorm and (y, rstd) for RMSNorm;
mean and rstd have x's leading (batch) shape, in fp32 (fp64 for fp64 x), and
are saved for the backward. Backward ops return (dx, dweight, dbias) and
(dx, dweight); a gradient not asked for (need_* false) is an empty tensor.
"""
import math
import operator
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from pyext import _backend, reference
from pyext._autocast import autocast_inputs
from pyext.ops._register import (create_graph_grads, fx_traceable, missing_reason, register_stages,
                                 sharding_rules_for)

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_REDUCED = (torch.float16, torch.bfloat16)
MAX_GROUPS = 65535  # groups a row: the Triton kernels' grid axis 1 holds them (CUDA's limit)


def default_rms_eps(dtype: torch.dtype) -> float:
    """What eps=None means in F.rms_norm: the machine epsilon of the type torch
    computes in (float32 for float16/bfloat16/float32 input, float64 for float64),
    which is what torch's kernels use (its docstring says finfo(x.dtype).eps)."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _param_dtype_ok(x_dtype, p_dtype) -> bool:
    """The parameter dtypes the kernels take: x's, or float32 for float16/bfloat16 x."""
    return p_dtype == x_dtype or (x_dtype in _REDUCED and p_dtype == torch.float32)


def _narrower_rms_weight(x_dtype, w_dtype) -> bool:
    """An RMSNorm weight of a narrower dtype than x's (float16/bfloat16 on
    float32 x, say: Mamba's float32 residual stream through its bfloat16
    norms). F.rms_norm's result is then in x's dtype, computed as the
    Triton kernels compute any call (in float32, float64 for float64 x);
    dweight in the weight's. The Triton kernels take it; the CUDA ones do not."""
    return w_dtype in _KERNEL_DTYPES and w_dtype != x_dtype and torch.promote_types(x_dtype, w_dtype) == x_dtype


def _as_shape(op: str, normalized_shape) -> Tuple[int, ...]:
    """normalized_shape as torch's int-list arguments take it: a sequence of
    ints, SymInts or integers of other kinds (operator.index: NumPy's,
    one-element integer tensors; what nn.LayerNorm(np.prod(s)) keeps), not
    a bare int or tensor, nor bools or floats."""
    def dim(d):
        if isinstance(d, bool) or (isinstance(d, Tensor) and d.dtype == torch.bool):
            raise TypeError
        # an int or SymInt as it is: traced by torch.compile a symbolic size passes isinstance(d, int), and
        # operator.index of it would pin it to its value (one graph per hidden size)
        return d if isinstance(d, (int, torch.SymInt)) else operator.index(d)

    try:
        if isinstance(normalized_shape, (int, Tensor)):
            raise TypeError
        return tuple(dim(d) for d in normalized_shape)
    except (TypeError, RuntimeError):  # RuntimeError: a tensor dim whose value cannot be read (meta)
        raise TypeError(f"{op}: normalized_shape must be a tuple or list of ints, got {normalized_shape!r}") from None


def checked_eps(op: str, eps, optional: bool) -> Optional[float]:
    """eps as a float (None stays None where `optional`: rms_norm's
    default), or the TypeError torch raises for another type, naming eps."""
    if eps is None and optional:
        return None
    if eps is not None and not isinstance(eps, str):
        try:
            return float(eps)
        except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several elements
            pass
    raise TypeError(f"{op}: eps must be a float, got {type(eps).__name__}")


def _check_inputs(op: str, x, normalized_shape, weight, bias, rms: bool, group_size=None) -> Tuple[int, ...]:
    """The errors F.layer_norm / F.rms_norm raise for the same call (type and
    meaning; our messages name the argument), and a group_size that is not a
    positive divisor of prod(normalized_shape). Returns normalized_shape as a tuple."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a Tensor, got {type(x).__name__}")
    shape = _as_shape(op, normalized_shape)
    if not shape:
        raise RuntimeError(f"{op}: normalized_shape must have at least one dimension, got []")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != shape:
            raise RuntimeError(f"{op}: {name} must have shape normalized_shape {list(shape)}, "
                               f"got {name} of shape {list(p.shape)}")
    k = len(shape)
    if x.dim() < k or tuple(x.shape[x.dim() - k:]) != shape:
        raise RuntimeError(f"{op}: expected x of shape [*, {', '.join(map(str, shape))}] "
                           f"(normalized_shape={list(shape)}), got x of shape {list(x.shape)}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.device != x.device:
            raise RuntimeError(f"{op}: {name} is on {p.device} but x is on {x.device}")
    if not rms:  # F.rms_norm promotes any weight dtype; F.layer_norm refuses a mix
        for name, p in (("weight", weight), ("bias", bias)):
            if p is not None and not _param_dtype_ok(x.dtype, p.dtype):
                raise RuntimeError(f"{op}: {name} must have x's dtype {x.dtype} (or float32 for float16/"
                                   f"bfloat16 x), got {name} of dtype {p.dtype}")
        if weight is not None and bias is not None and weight.dtype != bias.dtype:
            raise RuntimeError(f"{op}: bias dtype {bias.dtype} differs from weight dtype {weight.dtype}")
    if not x.is_floating_point():
        raise NotImplementedError(f"{op}: x must be a floating-point tensor, got dtype {x.dtype}")
    if group_size is not None and (not isinstance(group_size, int) or isinstance(group_size, bool)
                                   or group_size <= 0 or math.prod(shape) % group_size):
        raise ValueError(f"{op}: group_size must be a positive divisor of prod(normalized_shape) = "
                         f"{math.prod(shape)}, got {group_size!r}")
    return shape


def _check_backward(op: str, grad, x, mean, rstd, weight, bias, need_dweight, need_dbias, group_size=None):
    """Checks of a backward op's arguments (they may come from anywhere): the
    statistics of x's leading shape, then the groups where there are groups."""
    if grad.shape != x.shape or grad.dtype != x.dtype or grad.device != x.device:
        raise RuntimeError(f"{op}: grad must match x ({x.dtype} {list(x.shape)} on {x.device}), "
                           f"got {grad.dtype} {list(grad.shape)} on {grad.device}")
    lead = rstd.dim() - (group_size is not None)
    shape = x.shape[lead:]
    rms = mean is None  # RMSNorm saves no mean
    if 0 <= lead < x.dim():  # else the statistics' shape is wrong, below
        _check_inputs(op, x, shape, weight, bias, rms=rms, group_size=group_size)
    groups = (shape.numel() // group_size,) if group_size else ()
    stat = _stat_dtype(x.dtype)
    for name, s in (("mean", mean), ("rstd", rstd)):
        if s is None:
            continue
        if (not 0 <= lead < x.dim() or tuple(s.shape) != tuple(x.shape[:lead]) + groups or s.dtype != stat
                or s.device != x.device):
            of = "x's leading shape, then the groups," if groups else "x's leading shape"
            raise RuntimeError(f"{op}: {name} must be {stat} of {of} on {x.device}, "
                               f"got {s.dtype} {list(s.shape)} on {s.device}")
    _kernel_dtypes_or_raise(op, x, weight, bias, rms=rms)
    if need_dweight and weight is None:
        raise RuntimeError(f"{op}: need_dweight without a weight")
    if need_dbias and bias is None:
        raise RuntimeError(f"{op}: need_dbias without a bias")


# ------------------------------------------------------- Triton stages (ops)

def groups_reason(groups: int) -> Optional[str]:
    """Why the Triton kernels cannot take rows of this many groups, or None."""
    if groups > MAX_GROUPS:
        return f"{groups} groups a row, more than the {MAX_GROUPS} the Triton kernels' grid takes"
    return None


def _kernel_dtypes_or_raise(op, x, *params, rms=False):
    if x.dtype not in _KERNEL_DTYPES:
        raise RuntimeError(f"{op}: x dtype {x.dtype} is not supported (float32, float16, bfloat16, float64 are)")
    for p in params:
        if p is not None and not (_param_dtype_ok(x.dtype, p.dtype) or rms and _narrower_rms_weight(x.dtype, p.dtype)):
            raise RuntimeError(f"{op}: weight dtype {p.dtype} is not supported with x dtype {x.dtype}")


@torch.library.custom_op("pyext::layer_norm_fwd_triton", mutates_args=())
def layer_norm_fwd_triton(x: Tensor, normalized_shape: List[int], weight: Optional[Tensor],
                          bias: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    from pyext.triton_kernels import layer_norm as kernels
    shape = _check_inputs("layer_norm_fwd_triton", x, normalized_shape, weight, bias, rms=False)
    _kernel_dtypes_or_raise("layer_norm_fwd_triton", x, weight, bias)
    return kernels.layer_norm_fwd(x, shape, weight, bias, eps)


@torch.library.custom_op("pyext::layer_norm_bwd_triton", mutates_args=())
def layer_norm_bwd_triton(grad: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor],
                          bias: Optional[Tensor], need_dweight: bool,
                          need_dbias: bool) -> Tuple[Tensor, Tensor, Tensor]:
    from pyext.triton_kernels import layer_norm as kernels
    _check_backward("layer_norm_bwd_triton", grad, x, mean, rstd, weight, bias, need_dweight, need_dbias)
    return kernels.layer_norm_bwd(grad, x, mean, rstd, weight, bias, need_dweight, need_dbias)


@torch.library.custom_op("pyext::rms_norm_fwd_triton", mutates_args=())
def rms_norm_fwd_triton(x: Tensor, normalized_shape: List[int], weight: Optional[Tensor],
                        eps: float) -> Tuple[Tensor, Tensor]:
    from pyext.triton_kernels import layer_norm as kernels
    shape = _check_inputs("rms_norm_fwd_triton", x, normalized_shape, weight, None, rms=True)
    _kernel_dtypes_or_raise("rms_norm_fwd_triton", x, weight, rms=True)
    return kernels.rms_norm_fwd(x, shape, weight, eps)


@torch.library.custom_op("pyext::rms_norm_bwd_triton", mutates_args=())
def rms_norm_bwd_triton(grad: Tensor, x: Tensor, rstd: Tensor, weight: Optional[Tensor],
                        need_dweight: bool) -> Tuple[Tensor, Tensor]:
    from pyext.triton_kernels import layer_norm as kernels
    _check_backward("rms_norm_bwd_triton", grad, x, None, rstd, weight, None, need_dweight, False)
    return kernels.rms_norm_bwd(grad, x, rstd, weight, need_dweight)


# ------------------------------------------- fake implementations, autograd

def _fake_stats(x, normalized_shape):
    batch = x.shape[:x.dim() - len(normalized_shape)]
    return x.new_empty(batch, dtype=_stat_dtype(x.dtype))


def _fake_grad(need, param, x):
    if need:
        return torch.empty_like(param, memory_format=torch.contiguous_format)
    return x.new_empty(0)


def _fake_ln_fwd(x, normalized_shape, weight, bias, eps):
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    return y, _fake_stats(x, normalized_shape), _fake_stats(x, normalized_shape)


def _fake_rms_fwd(x, normalized_shape, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), _fake_stats(x, normalized_shape)


def _fake_ln_bwd(grad, x, mean, rstd, weight, bias, need_dweight, need_dbias):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    return dx, _fake_grad(need_dweight, weight, x), _fake_grad(need_dbias, bias, x)


def _fake_rms_bwd(grad, x, rstd, weight, need_dweight):
    return torch.empty_like(x, memory_format=torch.contiguous_format), _fake_grad(need_dweight, weight, x)


def _ln_setup_context(ctx, inputs, output):
    x, normalized_shape, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, mean, rstd, weight, bias)
    ctx.normalized_shape, ctx.eps = normalized_shape, eps
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)


def _rms_setup_context(ctx, inputs, output):
    x, normalized_shape, weight, eps = inputs
    _, rstd = output
    ctx.save_for_backward(x, rstd, weight)
    ctx.normalized_shape, ctx.eps = normalized_shape, eps
    ctx.mark_non_differentiable(rstd)
    ctx.set_materialize_grads(False)


def _make_ln_backward(bwd_op):
    def backward(ctx, grad, _mean_grad, _rstd_grad):
        if grad is None:
            return None, None, None, None, None
        x, mean, rstd, weight, bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            return create_graph_grads("layer_norm", ctx, reference.layer_norm,
                                      (x, ctx.normalized_shape, weight, bias, ctx.eps), (grad,))
        need_dx, _, need_dweight, need_dbias, _ = ctx.needs_input_grad
        dx, dweight, dbias = bwd_op(grad, x, mean, rstd, weight, bias, need_dweight, need_dbias)
        return (dx if need_dx else None, None, dweight if need_dweight else None,
                dbias if need_dbias else None, None)
    return backward


def _make_rms_backward(bwd_op):
    def backward(ctx, grad, _rstd_grad):
        if grad is None:
            return None, None, None, None
        x, rstd, weight = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            return create_graph_grads("rms_norm", ctx, reference.rms_norm,
                                      (x, ctx.normalized_shape, weight, ctx.eps), (grad,))
        need_dx, _, need_dweight, _ = ctx.needs_input_grad
        dx, dweight = bwd_op(grad, x, rstd, weight, need_dweight)
        return dx if need_dx else None, None, dweight if need_dweight else None, None
    return backward


LAYER_NORM_FWD, _, LAYER_NORM = register_stages("layer_norm", _fake_ln_fwd, _fake_ln_bwd, _ln_setup_context,
                                                _make_ln_backward)
_, _, RMS_NORM = register_stages("rms_norm", _fake_rms_fwd, _fake_rms_bwd, _rms_setup_context,
                                 _make_rms_backward)


# ------------------------------------------------------------ public API

def _why_not(backend: str, x: Tensor, *params, rms=False, family="norm"):
    """Why `backend` cannot run this norm call, or None. family: whose ops'
    DTensor rules (sharding.py) a DTensor x takes: "norm" or "grouped_norm"."""
    if backend == "torch":
        return None
    reason = (_backend.device_reason(backend, x, *(p for p in params if p is not None), dtensors=True)
              or missing_reason(backend, LAYER_NORM_FWD, "layer_norm"))
    if reason is not None:
        return reason
    sharding_rules_for(x, family, backend)
    if x.dtype not in _KERNEL_DTYPES:
        return f"dtype {x.dtype} is not supported (float32, float16, bfloat16, float64 are)"
    narrower = rms and backend == "triton"
    for p in params:
        if p is not None and not (_param_dtype_ok(x.dtype, p.dtype) or narrower and
                                  _narrower_rms_weight(x.dtype, p.dtype)):
            return (f"weight dtype {p.dtype} with x dtype {x.dtype} is not supported (the {backend} kernels take "
                    "x's dtype, or float32 for float16/bfloat16 x" + (
                        "; the Triton ones also a narrower RMSNorm weight)" if rms else ")"))
    return None


@fx_traceable
def layer_norm(x: Tensor, normalized_shape, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5, *, group_size: Optional[int] = None, backend=None) -> Tensor:
    """LayerNorm with `torch.nn.functional.layer_norm`'s semantics: normalizes
    over the trailing dims `normalized_shape`, then scales by weight and adds
    bias (each optional). Differentiable in x, weight and bias.

    Kernels (cuda, triton) take float32/float16/bfloat16/float64 x, with weight
    and bias of x's dtype or float32 (float16/bfloat16 x; computed in fp32,
    output in x's dtype, as torch does on CPU). Non-contiguous x is copied
    once; the output is contiguous. Statistics are fp32 (fp64 for fp64 x).
    x - mean is taken to the ulp of the row's spread, not of its offset from
    zero (the mean is corrected by the mean of x - mean, forward and
    backward): rows far from zero keep the accuracy of centered rows, where
    torch's kernels lose the mean's rounding times rstd.

    Hidden size n = prod(normalized_shape): any n >= 0. The fast path holds a
    row in registers and reads it once: n <= 16384 in the forward and n <= 8192
    in the backward (half that for fp64 in the CUDA kernels). Beyond it, a
    chunked path loops over the row (re-reading it, from L2 when it fits).
    dweight and dbias are reduced in two deterministic stages, no atomics.
    A backward with create_graph=True (double backward) is torch's, from the
    saved inputs, under "auto"; a kernel backend named explicitly raises.

    Under torch.autocast, x, weight and bias are cast as torch casts them for
    F.layer_norm: to float32 on CUDA (float32 output), not on CPU.

    group_size (keyword, not in torch): normalize each group of group_size
    consecutive elements of a row separately, the weight and bias still of
    normalized_shape: a per-head QK norm with a weight per head is
    layer_norm(q, (heads, head_dim), w, group_size=head_dim) (Cohere's).
    The Triton kernels hold groups of up to the sizes above and take up to
    65535 groups a row (their grid's limit; more go to torch under "auto",
    a named "triton" raises); the CUDA kernels take none (a named "cuda"
    raises).
    """
    x, weight, bias = autocast_inputs("aten::layer_norm", x, weight, bias)
    shape = _check_inputs("layer_norm", x, normalized_shape, weight, bias, rms=False, group_size=group_size)
    eps = checked_eps("layer_norm", eps, optional=False)
    if group_size is not None and group_size != math.prod(shape):
        return grouped_norm.layer_norm(x, shape, weight, bias, eps, group_size, backend)
    name = _backend.select("layer_norm", backend, x.device, lambda b: _why_not(b, x, weight, bias))
    if name == "torch":
        return reference.layer_norm(x, shape, weight, bias, eps)
    return LAYER_NORM[_backend.is_auto(backend)][name](x, list(shape), weight, bias, eps)[0]


@fx_traceable
def rms_norm(x: Tensor, normalized_shape, weight: Optional[Tensor] = None, eps: Optional[float] = None, *,
             group_size: Optional[int] = None, backend=None) -> Tensor:
    """RMSNorm with `torch.nn.functional.rms_norm`'s semantics:
    y = x / sqrt(mean(x^2 over normalized_shape) + eps) * weight.

    eps=None means what it means in torch: the machine epsilon of the math type
    (float32 for float16/bfloat16/float32 x, float64 for float64; see
    `default_rms_eps`). Kernels take float32/float16/bfloat16/float64 x with
    weight of x's dtype or float32, the Triton ones also a weight of a
    narrower dtype (y in x's dtype, as torch promotes); other weight dtypes
    go to the reference under "auto". Fast path, chunked path and double
    backward as in `layer_norm`. Under torch.autocast, x and weight are cast
    as torch casts them for F.rms_norm. group_size as in `layer_norm`:
    rms_norm(h, (streams * d,), w, group_size=d) normalizes each of a row's
    streams (Qwen4-Exp's hyper-connection norm).
    """
    x, weight = autocast_inputs("aten::rms_norm", x, weight)
    shape = _check_inputs("rms_norm", x, normalized_shape, weight, None, rms=True, group_size=group_size)
    eps = checked_eps("rms_norm", eps, optional=True)
    if group_size is not None and group_size != math.prod(shape):
        return grouped_norm.rms_norm(x, shape, weight, eps, group_size, backend)
    name = _backend.select("rms_norm", backend, x.device, lambda b: _why_not(b, x, weight, rms=True))
    if name == "torch":
        return reference.rms_norm(x, shape, weight, eps)
    eps = default_rms_eps(x.dtype) if eps is None else eps
    return RMS_NORM[_backend.is_auto(backend)][name](x, list(shape), weight, eps)[0]


from pyext.ops import grouped_norm  # noqa: E402  (its ops build on this module's checks)
