"""GELU: pyext.gelu and its ops gelu_{fwd,bwd}_{cuda,triton}."""
import torch
from torch import Tensor

from pyext import _backend, reference
from pyext.ops._register import (create_graph_grads, fx_traceable, missing_reason, register_stages,
                                 sharding_rules_for)

_APPROXIMATE = ("none", "tanh")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@torch.library.custom_op("pyext::gelu_fwd_triton", mutates_args=())
def gelu_fwd_triton(x: Tensor, approximate: str) -> Tensor:
    from pyext.triton_kernels import gelu as kernels
    return kernels.gelu_fwd(x, approximate)


@torch.library.custom_op("pyext::gelu_bwd_triton", mutates_args=())
def gelu_bwd_triton(grad: Tensor, x: Tensor, approximate: str) -> Tensor:
    from pyext.triton_kernels import gelu as kernels
    return kernels.gelu_bwd(grad, x, approximate)


def _fake_fwd(x, approximate):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fake_bwd(grad, x, approximate):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, approximate = inputs
    ctx.save_for_backward(x)
    ctx.approximate = approximate


def _make_backward(bwd_op):
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            return create_graph_grads("gelu", ctx, reference.gelu, (x, ctx.approximate), (grad,))
        return bwd_op(grad, x, ctx.approximate), None
    return backward


FWD, BWD, DIFFERENTIABLE = register_stages("gelu", _fake_fwd, _fake_bwd, _setup_context, _make_backward)


def _why_not(backend: str, x: Tensor):
    if backend == "torch":
        return None
    reason = _backend.device_reason(backend, x, dtensors=True) or missing_reason(backend, FWD, "gelu")
    if reason is not None:
        return reason
    sharding_rules_for(x, "gelu", backend)
    if x.dtype not in _KERNEL_DTYPES:
        return f"dtype {x.dtype} is not supported (float32, float16, bfloat16, float64 are)"
    return None


@fx_traceable
def gelu(x: Tensor, approximate: str = "none", *, backend=None) -> Tensor:
    """GELU with `torch.nn.functional.gelu`'s semantics (NaN and inf included).

    approximate: "none" (exact, erf) or "tanh". Differentiable. Kernels take
    float32/float16/bfloat16/float64 of any shape; non-contiguous input is
    copied once. The output is contiguous. A backward with create_graph=True
    (double backward) is torch's under "auto"; a named kernel backend raises.
    """
    if approximate not in _APPROXIMATE:
        raise RuntimeError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")  # as F.gelu
    if not isinstance(x, Tensor):
        raise TypeError(f"gelu: x must be a Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise NotImplementedError(f"gelu: x must be a floating-point tensor, got dtype {x.dtype}")
    name = _backend.select("gelu", backend, x.device, lambda b: _why_not(b, x))
    if name == "torch":
        return reference.gelu(x, approximate)
    return DIFFERENTIABLE[_backend.is_auto(backend)][name](x, approximate)
