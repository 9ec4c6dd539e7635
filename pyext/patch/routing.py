"""How a patched model's calls reach pyext: the torch-function mode that
sends F.scaled_dot_product_attention, F.layer_norm, F.rms_norm and F.gelu
calls to pyext's, and the forwards that enter it (the model's, and those of
its modules whose code names a routed function)."""
import inspect
import threading
from types import CodeType

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from pyext.ops import attention
from pyext.ops.gelu import gelu as pyext_gelu
from pyext.ops.layer_norm import layer_norm as pyext_layer_norm, rms_norm as pyext_rms_norm


# The F functions whose calls patch() routes (the patch() flag of each, its
# name in code), to pyext's, called with torch's own parameter names.
def _layer_norm_call(backend, input, normalized_shape, weight=None, bias=None, eps=1e-5):
    return pyext_layer_norm(input, normalized_shape, weight, bias, eps, backend=backend)


def _rms_norm_call(backend, input, normalized_shape, weight=None, eps=None):
    return pyext_rms_norm(input, normalized_shape, weight, eps, backend=backend)


def _gelu_call(backend, input, approximate="none"):
    return pyext_gelu(input, approximate, backend=backend)


_ROUTED_FUNCTIONS = {"layer_norm": (F.layer_norm, _layer_norm_call), "rms_norm": (F.rms_norm, _rms_norm_call),
                     "gelu": (F.gelu, _gelu_call)}


class _RouteCalls(TorchFunctionMode):
    """Sends F.scaled_dot_product_attention ("attention" in `flags`; with a
    logit soft cap when softcap > 0, attention sinks when given, a local
    window (left, right) in place of a mask when given, enable_gqa with gqa)
    and F.layer_norm, F.rms_norm, F.gelu
    (their flags) to pyext's, with the patch's backend. pyext's own
    fallbacks call torch's ops below these functions (pyext.reference), so
    they are never sent back."""

    def __init__(self, backend, flags, softcap=0.0, window=None, gqa=False, sinks=None):
        super().__init__()
        self.backend, self.attention, self.softcap, self.window = backend, "attention" in flags, softcap, window
        self.gqa, self.sinks = gqa, sinks
        self.calls = {fn: call for flag, (fn, call) in _ROUTED_FUNCTIONS.items() if flag in flags}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self.attention and \
                not getattr(attention.calling_torch_sdpa, "active", False):
            if self.gqa:
                kwargs["enable_gqa"] = True
            return attention._scaled_dot_product_attention(*args, **kwargs, backend=self.backend,
                                                               softcap=self.softcap, window=self.window,
                                                               sinks=self.sinks)
        call = self.calls.get(func)
        if call is not None:
            return call(self.backend, *args, **kwargs)
        return func(*args, **kwargs)


def _code_of(f):
    """The code `f` runs: past decorators that keep the function they wrap as
    __wrapped__ (functools.wraps; transformers 5.24 so wraps its attention
    modules' forwards in deprecate_kwarg), else f's own; None for no code."""
    return getattr(inspect.unwrap(f), "__code__", None) if callable(f) else None


def _named_in(cls, names) -> set:
    """Which of `names` a method of `cls` or of its bases (torch's and
    pyext's own classes aside, e.g. FSDP2's wrapper class) names: the
    modules whose forward gets routed besides the model's, so that a block
    recomputed in the backward by torch.utils.checkpoint, outside the
    model's forward, routes its calls too."""
    found = set()
    for klass in cls.__mro__:
        if klass.__module__.startswith(("torch.", "pyext.", "builtins")):
            continue
        for member in vars(klass).values():
            code = _code_of(getattr(member, "__func__", member))
            if code is not None:
                found |= _names_in_code(code, names)
    return found


def _names_in_code(code, names) -> set:
    found = names & set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, CodeType):
            found |= _names_in_code(c, names)
    return found


class _Routing(threading.local):
    def __init__(self):
        self.backends = []  # (backend, flags) of the routed forwards this thread is inside


_routing = _Routing()


class _ForwardWrapper:
    """A patched module's forward wrapping the forward it had. An object
    holding the module rather than a closure over its bound forward, so that
    copy.deepcopy and pickling of the model carry it along, bound to the copy
    (a closure would keep calling the original model)."""

    def __init__(self, model, previous=None):
        self.model, self.previous = model, previous

    def _forward(self, *args, **kwargs):
        if self.previous is not None:  # an instance forward set before the patch
            return self.previous(*args, **kwargs)
        return type(self.model).forward(self.model, *args, **kwargs)

    @property
    def __signature__(self):  # what inspect.signature(model.forward) gives, as before the patch
        return inspect.signature(self.previous or type(self.model).forward.__get__(self.model))

    @property
    def __code__(self):  # the code it runs, which torch.export reads off model.forward to name the graph
        return getattr(self.previous or type(self.model).forward, "__code__", None)


class _RoutedForward(_ForwardWrapper):
    """The forward it had, run inside _RouteCalls, unless this thread is
    inside a routed forward of the same backend and flags already (one mode
    however the routed modules nest: the mode costs per torch call)."""

    def __init__(self, model, backend, flags, previous=None):
        super().__init__(model, previous)
        self.backend, self.flags = backend, flags

    def __call__(self, *args, **kwargs):
        if _routing.backends and _routing.backends[-1] == (self.backend, self.flags):
            return self._forward(*args, **kwargs)
        _routing.backends.append((self.backend, self.flags))
        try:
            with _RouteCalls(self.backend, self.flags):
                return self._forward(*args, **kwargs)
        finally:
            _routing.backends.pop()


class _TorchFastPathForward(_ForwardWrapper):
    """nn.TransformerEncoder's forward in eval mode with the routing mode set
    aside. torch takes its inference fast path (nested tensors: the padded
    rows of a src_key_padding_mask batch skipped, zeros in the output) only
    where no torch-function mode is active; inside _RouteCalls it took the
    slow path and gave the padded rows values. Where torch takes its slow
    path all the same, the layers' swapped modules (pyext.nn's attention
    and norms, pyext's GELU) still run pyext's kernels: the mode only routes
    F calls, and the encoder's code makes none."""

    def __call__(self, *args, **kwargs):
        if self.model.training or not isinstance(torch.overrides._get_current_function_mode(), _RouteCalls):
            return self._forward(*args, **kwargs)
        _routing.backends.append(None)  # a routed forward inside enters its own mode
        try:
            with torch.overrides._pop_mode_temporarily():
                return self._forward(*args, **kwargs)
        finally:
            _routing.backends.pop()
