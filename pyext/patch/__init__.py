"""Swap pyext's kernels into a model that already exists.

    model = pyext.patch(model)            # in place; returns the model
    pyext.patch_report(model)             # what was swapped, what was left and why, notes
    pyext.unpatch(model)                  # back to the original classes and forward

- torch.nn.LayerNorm / RMSNorm / GELU / MultiheadAttention modules get pyext's
  subclass as their class: same object, same Parameter objects, same
  state_dict, so an optimizer built before the patch keeps working. The
  F.gelu function that nn.TransformerEncoderLayer / DecoderLayer hold with
  activation="gelu" becomes pyext.gelu.
- Calls to F.scaled_dot_product_attention made by the model go to
  pyext.scaled_dot_product_attention through a TorchFunctionMode entered by
  the model's forward, and by the forward of each module whose code names
  that function when it runs on its own (a block that torch.utils.checkpoint
  recomputes in the backward): other code, and other models, are untouched.
  So do calls to F.layer_norm, F.rms_norm and F.gelu that the model's own
  code makes (nanoGPT's LayerNorm module, a block written with torch's
  functions), each with its flag, in models outside transformers. The mode
  costs each torch call it sees (~1 us of host time), so a model whose code
  names none of these functions (routing.py reads it) runs without it. An
  nn.TransformerEncoder or TransformerEncoderLayer in eval mode runs with
  that routing set aside, so torch's inference fast paths (the fused
  encoder layer, nested tensors) stay torch's (a torch-function mode would
  turn them off); its swapped modules run pyext's kernels on the slow path.
- HuggingFace transformers models: pyext's attention is registered as the
  attention implementation "pyext" ("pyext-<backend>" for a named backend;
  with the SDPA mask function, so causal masking is kept) and selected on
  the model, or on each transformers model it holds (a LightningModule's,
  a wrapper's); the models' own GELU modules (BLOOM's too) and norm modules
  (any whose code is one of hf_modules._HF_NORMS: Llama's RMSNorm and its copies in
  Mistral, Qwen2/3, Phi-3, ...; OLMo 2's in OLMo 3, GPT-OSS, ...; Gemma's,
  x / rms * (1 + weight), in Gemma 1, 2 and 3; Gemma 3n's in Gemma 4; T5's
  in mT5, LongT5, Pix2Struct, IDEFICS, ...; Cohere's, OLMo's and
  Nemotron's LayerNorms; the gated RMSNorms of Qwen3-Next, GLM-5 Next,
  Mamba 2 and Falcon-H1 and their copies) are replaced by pyext modules
  sharing their parameters and hooks (unpatch puts them back with what
  was set meanwhile: replacing.py), each where it computes what its replacement
  does on a float64 probe (hf_modules._probe: a release may change a class's
  code under the same name). A logit soft cap (Gemma 2's attn_logit_softcapping) and
  attention sinks (GPT-OSS's), which transformers' SDPA integration
  refuses, go to pyext's kernels with each call.
- `backend=None` (the process default, normally "auto") lets each call fall
  back to torch where the kernels do not apply (float32 outside autocast) or
  are not yet measured faster: an attention mask (an HF model given a
  padding attention_mask) and attention dropout, which backend="triton" runs,
  a mask that requires grad too (a learned relative position bias, as BEiT's,
  MaxViT's and T5's attention pass it: the kernels give it its gradient).

A module whose forward is set on the instance (accelerate's hooks, a
wrapper library's) is left: what it runs is not its class's code.

This module holds patch, unpatch and the report; routing.py the routing of F
calls, hf_modules.py transformers' modules pyext replaces, replacing.py how
they are replaced and put back, hf_attention.py pyext's attention in
transformers' models, notes.py the report's notes.
"""
import functools
import logging
from dataclasses import dataclass, field
from typing import List, Tuple

import torch
import torch.nn.functional as F

from pyext import nn as pnn
from pyext.ops.gelu import gelu as pyext_gelu
from pyext.patch.hf_attention import _is_hf_model, _restore_hf_attention, _use_pyext_attention_in_hf
from pyext.patch.hf_modules import _hf_module_swaps, _hf_swap
from pyext.patch.notes import _attention_notes
from pyext.patch.replacing import _put_back, _rebased, _replace
from pyext.patch.routing import (_ROUTED_FUNCTIONS, _direct_callers, _ForwardWrapper, _named_in, _RoutedForward,
                                 _TorchFastPathForward)

log = logging.getLogger("pyext.patch")

# torch class -> (pyext subclass, the patch() flag that enables it)
_CLASS_SWAPS = {
    torch.nn.LayerNorm: (pnn.LayerNorm, "layer_norm"),
    torch.nn.RMSNorm: (pnn.RMSNorm, "rms_norm"),
    torch.nn.GELU: (pnn.GELU, "gelu"),
    torch.nn.MultiheadAttention: (pnn.MultiheadAttention, "attention"),
}


@dataclass
class PatchReport:
    swapped: List[Tuple[str, str, str]] = field(default_factory=list)  # (module path, from, to)
    left: List[Tuple[str, str, str]] = field(default_factory=list)     # (module path, class, why)
    attention: str = "not routed"
    functions: List[str] = field(default_factory=list)  # F functions whose calls in the model go to pyext's
    notes: List[str] = field(default_factory=list)  # calls that will still run torch's op, and why

    def __str__(self):
        lines = [f"pyext.patch: {len(self.swapped)} modules swapped; attention: {self.attention}"]
        if self.functions:
            lines.append(f"  routed  {', '.join(self.functions)} calls in the model's forward go to pyext")
        lines += [f"  swapped {path or '<root>'}: {old} -> {new}" for path, old, new in self.swapped]
        lines += [f"  left    {path or '<root>'}: {cls} ({why})" for path, cls, why in self.left]
        lines += [f"  note    {note}" for note in self.notes]
        if not self.swapped and self.attention.startswith("not routed") and not self.functions:
            lines.append("  nothing to swap in this model")
        return "\n".join(lines)


def patch(model: torch.nn.Module, *, layer_norm=True, rms_norm=True, gelu=True, attention=True,
          backend=None, verbose=False) -> torch.nn.Module:
    """Swap pyext's kernels into `model` in place and return it (see the module doc).

    Patching twice is harmless, and a module patched before on its own is
    patched anew as part of `model`; a module inside a patched model is
    refused (unpatch that model first). `backend` pins one backend for every
    swapped module (None: the process default, normally "auto").
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"pyext.patch: model must be a torch.nn.Module, got {type(model).__name__}")
    for module in list(model.modules()):  # patched before, on its own or as this model: patched anew as this model
        if getattr(module, "_pyext_patched", False):
            unpatch(module)
    inside = _patched_part(model)
    if inside is not None:
        raise ValueError(f"pyext.patch: {inside} was patched as part of a model holding it: pyext.unpatch that "
                         "model first, or patch that model again")
    enabled = {"layer_norm": layer_norm, "rms_norm": rms_norm, "gelu": gelu, "attention": attention}
    report = PatchReport()
    replaced = []  # (module, attribute name, original value) to put back on unpatch
    replaced_modules = []  # what _put_back takes for each module replaced by a pyext one
    unknown = []  # (path, class) of leaf modules named like a norm, a GELU or an attention
    hf_swaps = _hf_module_swaps()

    for path, module in list(model.named_modules()):
        cls = type(module)
        if module.__dict__.get("activation") is F.gelu:  # nn.Transformer*Layer(activation="gelu")
            where = f"{path}.activation" if path else "activation"
            if enabled["gelu"]:
                module.activation = functools.partial(pyext_gelu, backend=backend)
                replaced.append((module, "activation", F.gelu))
                report.swapped.append((where, "F.gelu", "pyext.gelu"))
            else:
                report.left.append((where, "F.gelu", "gelu=False"))
        if (torch_cls := _swappable_class(module)) is not None:
            new_cls, flag = _CLASS_SWAPS[torch_cls]
            why_not = _why_not(module, flag, enabled)
            if why_not:
                report.left.append((path, cls.__name__, why_not))
                continue
            module.__class__ = _rebased(cls, torch_cls, new_cls)
            module.backend = backend
            module._pyext_original_class = torch_cls
            report.swapped.append((path, cls.__name__, f"pyext.nn.{new_cls.__name__}"))
        elif (hf_swap := _hf_swap(cls, hf_swaps)) is not None:
            flag, make = hf_swap
            new = _why_not(module, flag, enabled) or ("the model itself" if module is model else make(module, backend))
            if isinstance(new, str):  # why not
                report.left.append((path, cls.__name__, new))
                continue
            replaced_modules.append(_replace(model, module, new))
            report.swapped.append((path, cls.__name__, f"pyext.nn.{type(new).__name__}"))
        elif cls.__module__.startswith("pyext."):
            continue
        elif _named_like_what_pyext_swaps(cls) and not list(module.children()) and \
                "parametrizations" not in path.split("."):  # weight_norm's _WeightNorm is no layer of the model
            unknown.append((path, cls))

    model._pyext_backend = backend
    model._pyext_replaced = replaced
    model._pyext_replaced_modules = replaced_modules
    hf_models = _hf_attention_in(model, backend) if attention else {}
    hf = "" in hf_models
    if hf_models:
        report.attention = hf_models[""] if hf else "; ".join(f"{path}: {line}" for path, line in hf_models.items())
    if attention:
        for path in hf_models or [""]:
            if not hf_models.get(path, "").startswith("left:"):
                report.notes += _attention_notes(model.get_submodule(path), backend)
        # calls of a transformers model's own code that its attention interface does not make
        direct = _direct_callers([(path, m) for path, m in model.named_modules() if _within(path, hf_models)],
                                 "scaled_dot_product_attention") if hf_models else []
        for path in direct:
            module = model.get_submodule(path)
            _wrap_forward(module, _RoutedForward(module, backend, frozenset({"attention"}),
                                                 module.__dict__.get("forward")))
        if direct:
            report.attention += ("; F.scaled_dot_product_attention calls of its own code go to pyext, in the "
                                 "forward of: " + ", ".join(direct))
    # Outside transformers' models, calls of F.layer_norm, F.rms_norm and
    # F.gelu in the model's own code (nanoGPT's LayerNorm module, say) go to
    # pyext too, as do its SDPA calls; transformers' models have modules for these.
    functions = set() if hf else {flag for flag in _ROUTED_FUNCTIONS if enabled[flag]}
    memo, sought = {}, frozenset(functions | {"scaled_dot_product_attention"})
    named = {path: set() if _within(path, hf_models) else _named_in(m, sought, memo)
             for path, m in model.named_modules()}
    functions &= set().union(*named.values())  # those some module's code names
    flags = frozenset(functions | ({"attention"} if attention and not hf else set()))
    report.functions = [f"F.{name}" for name in _ROUTED_FUNCTIONS if name in functions]
    # The routing mode costs each torch call of the forwards it is entered by
    # (~1 us on the host): none where no code of the model names a routed function.
    routed = functions | ({"scaled_dot_product_attention"} if "attention" in flags else set())
    callers = [path for path, names in named.items() if names & routed]
    if callers:
        for module in model.modules():  # inside the routed forwards below: torch's fast paths in eval
            if isinstance(module, (torch.nn.TransformerEncoder, torch.nn.TransformerEncoderLayer)):
                _wrap_forward(module, _TorchFastPathForward(module, module.__dict__.get("forward")))
        for module in [model] + [model.get_submodule(path) for path in callers if path]:
            _wrap_forward(module, _RoutedForward(module, backend, flags, module.__dict__.get("forward")))
    if attention and not hf and (callers or not hf_models):
        routed_line = _routed_attention_line(named, bool(callers),
                                             any(isinstance(m, pnn.MultiheadAttention) for m in model.modules()))
        report.attention = f"{report.attention}; {routed_line}" if hf_models else routed_line
    # torch's GroupNorm or BatchNorm has none; a class of the model's own may compute what pyext does
    report.left += [(path, cls.__name__, "no pyext equivalent" if cls.__module__.startswith("torch.")
                     else "code pyext does not recognise") for path, cls in unknown if not named[path] & functions]
    model._pyext_patched = True
    model._pyext_report = report
    (print if verbose else log.info)(str(report))
    return model


def _patched_part(model):
    """The path of a module of `model` that a patch of a model holding it
    changed ("this module" for `model` itself), or None."""
    return next((path or "this module" for path, m in model.named_modules() if "_pyext_original_class" in m.__dict__
                 or "_pyext_hf_attn" in m.__dict__ or isinstance(m.__dict__.get("forward"), _ForwardWrapper)), None)


def _hf_attention_in(model, backend) -> dict:
    """{path: the report's attention line} of the transformers models in
    `model`, the model itself or those it holds (a LightningModule's, a
    wrapper's), each given pyext's attention (or left, saying why); their
    code is not routed."""
    lines = {}
    for path, module in _outermost_hf_models(model):
        line = _use_pyext_attention_in_hf(module, backend)
        if line is not None:
            lines[path] = line
    return lines


def _outermost_hf_models(model) -> list:
    """(path, module) of the transformers models in `model`, itself
    included, not those inside another (a VLM's language model)."""
    found = []
    for path, module in model.named_modules():
        if not _within(path, [p for p, _ in found]) and _is_hf_model(module):
            found.append((path, module))
    return found


def _within(path: str, paths) -> bool:
    """Whether the module at `path` is one of `paths` or inside one."""
    return any(path == p or p == "" or path.startswith(p + ".") for p in paths)


def _routed_attention_line(named, routed, mha) -> str:
    """The report's attention line for a model outside transformers:
    `named` the routed functions each module's code names, `routed` whether
    its forward is routed, `mha` whether it has nn.MultiheadAttention modules."""
    if not routed:
        return ("the swapped nn.MultiheadAttention modules run pyext's; no other" if mha else "not routed: no") + \
            " code of the model names F.scaled_dot_product_attention"
    line = "F.scaled_dot_product_attention calls in the model's forward go to pyext"
    callers = [path for path, names in named.items() if "scaled_dot_product_attention" in names]
    if not callers and not mha:
        line += " (its code names none)"
    modules = [path for path in callers if path]  # the model's own forward is routed anyway
    if modules:
        line += (", and in the forward of the modules that make them, run on their own as torch.utils.checkpoint "
                 "recomputes them: " + ", ".join(modules))
    return line


def _swappable_class(module):
    """The torch class of _CLASS_SWAPS that `module` is one of: its class, or
    the one torch's parametrize derived its class from (weight_norm,
    spectral_norm or register_parametrization before the patch), else None."""
    cls = type(module)
    if cls not in _CLASS_SWAPS and torch.nn.utils.parametrize.is_parametrized(module):
        cls = cls.__bases__[0]
    return cls if cls in _CLASS_SWAPS else None


def _named_like_what_pyext_swaps(cls) -> bool:
    """Whether a class is named like a norm, a GELU or an attention and is not
    a torch layer of another kind (torchtune's GemmaNormEmbeddings is an
    Embedding): the leaf modules the report lists as left."""
    words = ("norm", "gelu", "attention")
    torch_layers = [k for k in cls.__mro__ if k.__module__.startswith("torch.nn.") and k is not torch.nn.Module]
    return all(any(w in k.__name__.lower() for w in words) for k in [cls] + torch_layers)


def _why_not(module, flag, enabled):
    """Why `module` is not swapped, or None."""
    if not enabled[flag]:
        return f"{flag}=False"
    if "forward" in module.__dict__:  # accelerate's hooks set one; it would call the module's own code
        return "a forward set on the instance, which pyext's module would not run"
    if isinstance(module, torch.nn.MultiheadAttention) and not pnn.MultiheadAttention._runs_pyexts_attention(module):
        return "bias_k and bias_v, add_zero_attn or keys and values of their own sizes: torch's forward runs it"
    return None


def _wrap_forward(module, wrapper):
    """Set the module's forward to the wrapper; torch.jit.script, which
    cannot compile the wrapper, then says why (a partial, which copies and
    pickles with the model)."""
    module.forward = wrapper
    module.__prepare_scriptable__ = functools.partial(
        pnn._refuse_torchscript, f"a {type(module).__name__} whose forward pyext.patch wraps")


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `patch`: original classes (a class derived from pyext's after
    the patch, as torch's parametrize derives one, rebuilt on the original),
    modules, attention and forward."""
    if not getattr(model, "_pyext_patched", False):
        inside = _patched_part(model)
        if inside is not None:
            raise ValueError(f"pyext.unpatch: {inside} was patched as part of a model holding it: pyext.unpatch "
                             "that model")
        return model
    for module in model.modules():
        original = module.__dict__.pop("_pyext_original_class", None)
        if original is not None:
            module.__class__ = _rebased(type(module), _CLASS_SWAPS[original][0], original)
            module.__dict__.pop("backend", None)
    for parent, name, old in model._pyext_replaced:
        setattr(parent, name, old)
    for replaced in model._pyext_replaced_modules:
        _put_back(model, *replaced)
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if isinstance(forward, _ForwardWrapper):
            del module.__prepare_scriptable__
            while isinstance(forward, _ForwardWrapper):
                forward = forward.previous
            if forward is not None:
                module.forward = forward
            else:
                del module.forward
    for module in model.modules():
        if "_pyext_hf_attn" in module.__dict__:
            _restore_hf_attention(module)
    for attr in ("_pyext_patched", "_pyext_replaced", "_pyext_replaced_modules", "_pyext_backend"):
        delattr(model, attr)
    return model


def patch_report(model: torch.nn.Module) -> PatchReport:
    """What the last `patch(model)` swapped and left (after an unpatch too)."""
    report = getattr(model, "_pyext_report", None)
    if report is None:
        raise ValueError(f"pyext.patch_report: this {type(model).__name__} was never given to pyext.patch")
    return report
