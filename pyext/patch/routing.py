"""How a patched model's calls reach pyext: the torch-function mode that
sends F.scaled_dot_product_attention, F.layer_norm, F.rms_norm and F.gelu
calls to pyext's, and the forwards that enter it (the model's, and those of
its modules whose code names a routed function)."""
import contextlib
import dis
import functools
import inspect
import sys
import weakref
from types import CodeType, FunctionType

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
    window (left, right) in place of a mask when given, enable_gqa with gqa
    where the key has fewer heads than the query)
    and F.layer_norm, F.rms_norm, F.gelu
    (their flags) to pyext's, with the patch's backend. pyext's own
    fallbacks call torch's ops below these functions (pyext.reference), so
    they are never sent back."""

    def __init__(self, backend, flags, softcap=0.0, window=None, gqa=False, sinks=None, entered_by=None):
        super().__init__()
        self.backend, self.attention, self.softcap, self.window = backend, "attention" in flags, softcap, window
        self.gqa, self.sinks = gqa, sinks
        self.entered_by = entered_by  # (backend, flags) of the routed forward that entered it, if one did
        self.calls = {fn: call for flag, (fn, call) in _ROUTED_FUNCTIONS.items() if flag in flags}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self.attention and \
                not getattr(attention.calling_torch_sdpa, "active", False):
            if self.gqa and _fewer_key_heads(args, kwargs):
                kwargs["enable_gqa"] = True
            return attention._scaled_dot_product_attention(*args, **kwargs, backend=self.backend,
                                                               softcap=self.softcap, window=self.window,
                                                               sinks=self.sinks)
        call = self.calls.get(func)
        if call is not None:
            return call(self.backend, *args, **kwargs)
        return func(*args, **kwargs)


def _fewer_key_heads(args, kwargs) -> bool:
    """Whether an SDPA call's key has fewer heads than its query (GQA, MQA):
    only those are asked for enable_gqa, which the legacy ONNX exporter
    (torch.onnx.export(dynamo=False)) refuses to convert."""
    query = args[0] if args else kwargs["query"]
    key = args[1] if len(args) > 1 else kwargs["key"]
    return query.dim() >= 3 and key.dim() >= 3 and key.shape[-3] != query.shape[-3]


def _code_of(f):
    """The code `f` runs: past decorators that keep the function they wrap as
    __wrapped__ (functools.wraps; transformers 5.24 so wraps its attention
    modules' forwards in deprecate_kwarg), else f's own; None for no code."""
    function = _function_of(f)
    return function.__code__ if function is not None else None


def _named_in(module, names, memo=None) -> set:
    """Which of `names` (F functions) the code run by `module`'s forward
    calls: the modules whose forward gets routed besides the model's, so that
    a block recomputed in the backward by torch.utils.checkpoint, outside the
    model's forward, routes its calls too (torch's would save other tensors,
    which checkpoint refuses). That code is the methods of its class and
    bases (torch's and pyext's own classes aside, e.g. FSDP2's wrapper
    class), those of the objects it holds that are not modules (diffusers'
    attention processors: `self.processor(self, ...)` makes the call) or are
    modules with a `__call__` of their own, and the functions these call by
    a global name (a helper in the model's file). `memo` keeps what each
    function calls across the modules of a model, for the same `names`."""
    holders = [module] + [value for value in vars(module).values() if _holds_code(value)] + \
        [child for child in module.children() if type(child).__call__ is not torch.nn.Module.__call__]
    functions = [f for holder in holders for f in _methods(type(holder))]
    functions += [value for value in vars(module).values() if isinstance(value, (FunctionType, functools.partial))]
    memo = {} if memo is None else memo
    found, seen = set(), set()
    while functions:
        function = _function_of(functions.pop())
        if function is None or function in seen:
            continue
        seen.add(function)
        if function not in memo:
            memo[function] = _calls_of(function, names)
        calls, callees = memo[function]
        found |= calls
        functions += callees
    return found


def _direct_callers(modules, name: str) -> list:
    """The paths of those of `modules`, (path, module) pairs (of transformers
    models), whose own code calls F's `name` (_named_in): SAM's vision
    attention calls F.scaled_dot_product_attention itself, with its learned
    relative position bias, where transformers' other models go through the
    attention interface pyext's HF attention replaces. Only modules whose
    forward is defined in a source that mentions the name are read (11 of
    transformers 5.25's modeling files do; reading every module's code costs
    0.25-0.5 s a model)."""
    memo, sought = {}, frozenset({name})
    return [path for path, module in modules
            if any(_source_mentions(klass.__module__, name) for klass in type(module).__mro__
                   if "forward" in vars(klass) and not _torchs_or_ours(klass.__module__))
            and _named_in(module, sought, memo)]


@functools.lru_cache(maxsize=None)
def _source_mentions(module_name: str, text: str) -> bool:
    """Whether the source of Python module `module_name` holds `text`
    (True where it has no source to read: _named_in then reads its code)."""
    try:
        return text in inspect.getsource(sys.modules[module_name])
    except (KeyError, OSError, TypeError):
        return True


def _holds_code(value) -> bool:
    """Whether `value`, held by a module, is an object of a class of its own
    whose methods a forward may call (not a module, tensor or function)."""
    return not isinstance(value, (torch.nn.Module, torch.Tensor, FunctionType, functools.partial)) and \
        callable(value) and not _torchs_or_ours(type(value).__module__)


def _torchs_or_ours(module_name) -> bool:
    """Whether code of this module is torch's, pyext's or builtin (torchvision's and torchtune's are not)."""
    return (module_name or "").split(".")[0] in ("torch", "pyext", "builtins")


def _methods(cls) -> list:
    return [member for klass in cls.__mro__ if not _torchs_or_ours(klass.__module__) for member in vars(klass).values()]


def _function_of(member):
    """The Python function a method, a static or class method, a partial or
    a decorated function runs, or None."""
    member = getattr(member, "__func__", member)
    member = getattr(member, "func", member) if isinstance(member, functools.partial) else member
    try:
        function = inspect.unwrap(member) if callable(member) else None
    except ValueError:  # a chain of __wrapped__ with no end (a mock)
        return None
    return function if isinstance(function, FunctionType) else None


def _calls_of(function, names) -> tuple:
    """(Which of `names` `function` calls as torch's F function, by F.name,
    torch.nn.functional.name or a global bound to it (imported under another
    name); the functions of the model's code it calls by a global name.) An
    attribute of that name of one of its arguments is not one (diffusers'
    PatchEmbed reads a flag `self.layer_norm`)."""
    wanted = {id(getattr(F, name)): name for name in names}
    calls, callees = set(), []
    for instructions, arguments in _code_and_nested(function.__code__):
        start = None  # the load a chain of attribute loads starts from
        for i in instructions:
            if i.opname in ("LOAD_ATTR", "LOAD_METHOD"):
                if i.argval in names and not (start is not None and start.opname.startswith("LOAD_FAST")
                                              and _last(start.argval) in arguments):
                    calls.add(i.argval)
                continue
            start = i
            if i.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
                value = function.__globals__.get(i.argval)
                if id(value) in wanted:
                    calls.add(wanted[id(value)])
                elif value is None and i.argval in names:  # not bound yet: taken as F's
                    calls.add(i.argval)
                elif isinstance(value, FunctionType) and not _torchs_or_ours(value.__module__):
                    callees.append(value)
                    if value.__module__ != function.__module__:
                        callees += _functions_of_module(value.__module__)
    return calls, callees


def _functions_of_module(name) -> list:
    """The functions a module of code defines. A function called from
    another module's code counts as calling what these call: a dispatcher
    may pick one of them from a table (diffusers' dispatch_attention_fn,
    Flux's attention), which no name in the code shows."""
    module = sys.modules.get(name)
    return [value for value in vars(module).values()
            if isinstance(value, FunctionType) and value.__module__ == name] if module is not None else []


def _code_and_nested(code):
    """(instructions, argument names) of `code` and of the code defined in it."""
    arguments = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
    yield [i for i in dis.get_instructions(code) if i.opname not in ("EXTENDED_ARG", "CACHE", "NOP")], arguments
    for c in code.co_consts:
        if isinstance(c, CodeType):
            yield from _code_and_nested(c)


def _last(argval):
    """The variable an instruction loads last (Python 3.13 loads two at once)."""
    return argval[-1] if isinstance(argval, tuple) else argval


class _ForwardWrapper:
    """A patched module's forward wrapping the forward it had. An object
    holding the module rather than a closure over its bound forward, so that
    copy.deepcopy and pickling of the model carry it along, bound to the copy
    (a closure would keep calling the original model). It holds the module
    weakly, as the module holds it (its forward): a strong reference both
    ways kept a deleted model's weights alive until the cycle collector ran;
    copied or pickled, it hands on the module itself, so that the copy's
    wrapper refers to the copy. The class's forward
    is looked up once: torch.compile cannot read it off type(module) where
    the class is one it is told to trace whole (torch._dynamo.allow_in_graph:
    diffusers' attention modules and blocks), and broke the graph there."""
    cls = cls_forward = None  # what a wrapper pickled before they were kept reads

    def __init__(self, model, previous=None):
        self._model, self.previous = weakref.ref(model), previous
        self.cls, self.cls_forward = type(model), type(model).forward

    @property
    def model(self):
        model = self._model()
        if model is None:
            raise ReferenceError("pyext.patch: the forward of a patched module called after the module was freed")
        return model

    def __getstate__(self):  # the module itself (copy.deepcopy and pickle map it to the copy's)
        return {**{k: v for k, v in self.__dict__.items() if k != "_model"}, "model": self.model}

    def __setstate__(self, state):  # a wrapper pickled before it held its module weakly has "model" too
        state = dict(state)
        self._model = weakref.ref(state.pop("model"))
        self.__dict__.update(state)

    def _forward(self, *args, **kwargs):
        if self.previous is not None:  # an instance forward set before the patch
            return self.previous(*args, **kwargs)
        forward = self.cls_forward if type(self.model) is self.cls else type(self.model).forward
        return forward(self.model, *args, **kwargs)

    @property
    def __signature__(self):  # what inspect.signature(model.forward) gives, as before the patch
        return inspect.signature(self.previous or type(self.model).forward.__get__(self.model))

    @property
    def __code__(self):  # the code it runs, which torch.export reads off model.forward to name the graph
        return getattr(self.previous or type(self.model).forward, "__code__", None)


class _RoutedForward(_ForwardWrapper):
    """The forward it had, run inside _RouteCalls, unless the mode this
    thread is in is one a routed forward of the same backend and flags
    entered (one mode however the routed modules nest: the mode costs per
    torch call). Read off torch's mode stack, not kept in a list beside it
    (strict torch.export reported such a list as a side effect to replay)."""

    def __init__(self, model, backend, flags, previous=None):
        super().__init__(model, previous)
        self.backend, self.flags = backend, flags

    def __call__(self, *args, **kwargs):
        key = (self.backend, self.flags)
        mode = torch.overrides._get_current_function_mode()
        if isinstance(mode, _RouteCalls) and mode.entered_by == key:
            return self._forward(*args, **kwargs)
        with _RouteCalls(self.backend, self.flags, entered_by=key):
            return self._forward(*args, **kwargs)


class _TorchFastPathForward(_ForwardWrapper):
    """nn.TransformerEncoder's or TransformerEncoderLayer's forward in eval
    mode with the routing mode set aside. torch takes its inference fast
    paths (the encoder's nested tensors: the padded rows of a
    src_key_padding_mask batch skipped, zeros in the output; the layer's
    one fused op, _transformer_encoder_layer_fwd) only where no
    torch-function mode is active; inside _RouteCalls the encoder took the
    slow path and gave the padded rows values, and a layer with
    activation="gelu" (whose code names F.gelu, so it is routed) lost its
    fused op. Where torch takes its slow path all the same, the layers'
    swapped modules (pyext.nn's attention and norms) and their GELU (the
    activation they hold, swapped to pyext.gelu) still run pyext's kernels:
    the mode only routes F calls, and their code makes none."""

    def __call__(self, *args, **kwargs):
        if self.model.training:
            return self._forward(*args, **kwargs)
        with outside_routing():
            return self._forward(*args, **kwargs)


@contextlib.contextmanager
def outside_routing():
    """Torch's own code run with a patched model's routing mode set aside:
    torch takes its inference fast paths (nn.TransformerEncoder's,
    nn.MultiheadAttention's) only where no torch-function mode is active.
    A routed forward inside routes its calls again."""
    if not isinstance(torch.overrides._get_current_function_mode(), _RouteCalls):
        yield
        return
    with torch.overrides._pop_mode_temporarily():
        yield
