"""What every op module needs to register its stages.

CUDA stages are defined in C++ (csrc/<op>/<op>_api.cpp) and only get their
fake implementation and autograd in Python; Triton stages are defined in
Python with torch.library.custom_op. Both are reached as torch.ops.pyext.*.
"""
import contextlib
import functools
import inspect

import torch
from torch.fx import Proxy

from pyext import _backend


def kernel_backends(*ops: str):
    """Kernel backends ("cuda", "triton") whose stages `<op>_<backend>` all
    exist in this process: Triton's always (its ops import Triton lazily), the
    CUDA ones when the extension is built and carries them."""
    names = ("cuda", "triton") if _backend.CUDA_BUILT else ("triton",)
    return [b for b in names if all(hasattr(torch.ops.pyext, f"{op}_{b}") for op in ops)]


def missing_reason(backend: str, table: dict, op: str):
    """Why a kernel backend has no stages for `op` here, or None."""
    if backend != "torch" and backend not in table:
        return f"the CUDA extension pyext._C has no {op} kernels (not in the sources it was built from)"
    return None


def sharding_rules_for(x, family: str, backend: str) -> None:
    """Where x is a DTensor (tensor parallelism's activations), the DTensor
    rules of the family's ops (sharding.py's families) of this
    backend, registered once (ops/sharding.py; imported only then, as
    torch.distributed.tensor costs ~0.25 s)."""
    if type(x) not in _backend.PLAIN_TENSOR_TYPES and _backend.is_dtensor(x):
        from pyext.ops import sharding
        sharding.register(family, backend)


def register_stages(op: str, fake_fwd, fake_bwd, setup_context, make_backward):
    """Fake implementations and autograd for `<op>_fwd_<backend>` and
    `<op>_bwd_<backend>` of every kernel backend here; returns the forward
    ops, the backward ops, each by backend name, and the differentiable
    forwards for the public functions (`differentiable_forward`), by whether
    the call asked for "auto", then by backend name. fake_fwd and
    fake_bwd may be dicts by backend name, for backends whose outputs differ
    in layout."""
    fwd, bwd, differentiable = {}, {}, {False: {}, True: {}}
    for name in kernel_backends(f"{op}_fwd", f"{op}_bwd"):
        fwd[name] = getattr(torch.ops.pyext, f"{op}_fwd_{name}")
        bwd[name] = getattr(torch.ops.pyext, f"{op}_bwd_{name}")
        torch.library.register_fake(f"pyext::{op}_fwd_{name}")(
            fake_fwd[name] if isinstance(fake_fwd, dict) else fake_fwd)
        torch.library.register_fake(f"pyext::{op}_bwd_{name}")(
            fake_bwd[name] if isinstance(fake_bwd, dict) else fake_bwd)
        backward = make_backward(called_past_autograd(bwd[name]))
        torch.library.register_autograd(f"pyext::{op}_fwd_{name}", backward, setup_context=setup_context)
        for auto in (False, True):
            differentiable[auto][name] = differentiable_forward(fwd[name], setup_context, backward, auto)
    return fwd, bwd, differentiable


def past_autograd():
    """A context in which ops go straight to their kernels, past the autograd
    kernels torch.library registered for them: for op calls inside an
    autograd.Function (grad mode off), where those Python kernels only
    redispatch, at a few us a call (benchmarks/NOTES.md, "Host cost of a
    call"). The Function records the graph; dispatch modes and tensor
    subclasses still see the ops. Traced (torch.compile), nothing changes."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch._C._AutoDispatchBelowAutograd()


def called_past_autograd(op):
    """op, each call of it in `past_autograd`."""
    def call(*args):
        with past_autograd():
            return op(*args)
    return call


def fx_traceable(fn):
    """A public function that torch.fx.symbolic_trace records as one node,
    as it records torch's F functions (torchvision's and timm's feature
    extraction, FX quantization): given a Proxy for its first argument, the
    call becomes a node of the graph, which runs pyext's function when the
    traced module runs, rather than pyext's checks running on the Proxy."""
    @functools.wraps(fn)
    def traceable(*args, **kwargs):
        first = args[0] if args else next(iter(kwargs.values()), None)  # called by keyword too
        if isinstance(first, Proxy):
            return first.tracer.create_proxy("call_function", traceable, args, kwargs)
        return fn(*args, **kwargs)
    return traceable


def differentiable_forward(fwd_op, setup_context, backward, auto: bool):
    """fwd_op with the autograd registered on it (the same setup_context and
    backward), as an autograd.Function whose context records `auto` (the
    call asked for backend "auto": see `create_graph_grads`). It is what the
    public functions call, since
    torch.library's generic autograd wrapper costs more host time per call
    (it fills in the schema's defaults, walks the arguments, redispatches;
    benchmarks/NOTES.md, "Host cost of a call"). Inside the Function the op
    is called past its own autograd wrapper (`past_autograd`); the op keeps
    its autograd for direct callers."""
    # forward takes ctx, rather than a separate setup_context staticmethod: with
    # one, Function.apply binds the arguments through inspect.signature on every
    # call (about 30 us).
    def forward(ctx, *args):
        with past_autograd():
            output = fwd_op(*args)
        setup_context(ctx, args, output)
        ctx.auto = auto
        return output
    # torch.compile, where no input requires grad, inlines forward and leaves ctx out
    # when the call's arguments are as many as forward's parameters (here ctx and
    # args: an op of two arguments, GELU's, lost its first to ctx). forward shows the
    # op's arguments one by one, one parameter more than any call gives.
    forward.__signature__ = inspect.Signature(
        [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_ONLY)] +
        [inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_ONLY) for a in fwd_op.default._schema.arguments])

    # named after the op, so a graph's grad_fn says which kernel ran (e.g. layer_norm_fwd_cudaBackward)
    function = type(fwd_op.__name__, (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(backward)})
    return traced_as(fwd_op, function.apply)


def traced_as(forward_op_call, apply):
    """apply (an autograd.Function's), or, while torch.jit.trace runs,
    forward_op_call, which calls the forward op itself with the same
    arguments (its autograd registered on it): a trace records a Function
    as a Python call, which torch.jit.save cannot save, and an op as itself."""
    def call(*args):
        return forward_op_call(*args) if torch.jit.is_tracing() else apply(*args)
    return call


def create_graph_grads(op: str, ctx, reference_fn, inputs, grads):
    """The input gradients of a backward run with create_graph=True (double
    backward: gradient penalties, Hessian-vector products, physics-informed
    losses), which must themselves be differentiable. The kernels' backward
    computes values, not a graph; so under backend "auto" the forward is
    recomputed by the reference, reference_fn(*inputs), and torch
    differentiates it (torch's own cost for such a backward). A kernel
    backend named explicitly raises instead, as it does for any case its
    kernels do not cover. A second backward through the op's output runs the
    kernels' backward, and its part of an input's gradient is added to the
    reference's in the input's dtype: in float16 and bfloat16, one rounding
    more than torch's math SDPA, whose parts meet in float32. inputs: the
    forward's arguments (the saved tensors among them); returns one gradient
    (or None) per argument."""
    if not getattr(ctx, "auto", False):
        raise _backend.BackendUnavailable(
            f"pyext.{op}: a backward with create_graph=True (double backward) needs differentiable "
            "gradients, and the kernels' backward is not differentiable; backend 'auto' or 'torch' serves it")
    wanted = [i for i, t in enumerate(inputs) if isinstance(t, torch.Tensor) and t.requires_grad]
    outputs = reference_fn(*inputs)  # grad mode is on: create_graph=True
    found = torch.autograd.grad(outputs, [inputs[i] for i in wanted], grads, create_graph=True, allow_unused=True)
    result = [None] * len(inputs)
    for i, g in zip(wanted, found):
        result[i] = g
    return tuple(result)
