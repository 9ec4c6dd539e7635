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
  functions), each with its flag, in models outside transformers. An
  nn.TransformerEncoder in eval mode runs with that routing set aside, so
  torch's inference fast path stays torch's (a torch-function mode would
  turn it off); its swapped modules run pyext's kernels on the slow path.
- HuggingFace transformers models: pyext's attention is registered as the
  attention implementation "pyext" ("pyext-<backend>" for a named backend;
  with the SDPA mask function, so causal masking is kept) and selected on
  the model; the models' own GELU modules (BLOOM's too) and norm modules
  (any whose code is one of _HF_NORMS: Llama's RMSNorm and its copies in
  Mistral, Qwen2/3, Phi-3, ...; OLMo 2's in OLMo 3, GPT-OSS, ...; Gemma's,
  x / rms * (1 + weight), in Gemma 1, 2 and 3; Gemma 3n's in Gemma 4; T5's
  in mT5, LongT5, Pix2Struct, IDEFICS, ...; Cohere's, OLMo's and
  Nemotron's LayerNorms) are replaced by pyext modules sharing their
  parameters. A logit soft cap (Gemma 2's attn_logit_softcapping, which
  transformers' SDPA integration refuses) goes to pyext's kernels with each
  call.
- `backend=None` (the process default, normally "auto") lets each call fall
  back to torch where the kernels do not apply (float32 outside autocast) or
  are not yet measured faster: an attention mask (an HF model given a
  padding attention_mask) and attention dropout, which backend="triton" runs.
  A backend named here raises BackendUnavailable on such calls instead, as a
  named backend does everywhere in pyext.
"""
import dis
import functools
import importlib
import inspect
import logging
import threading
import weakref
from dataclasses import dataclass, field
from types import CodeType
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from pyext import _backend
from pyext import nn as pnn
from pyext._weak import WeakTensorCache
from pyext.ops import attention as attention_ops
from pyext.ops.attention_varlen import flash_attention_varlen
from pyext.ops.gelu import gelu as pyext_gelu
from pyext.ops.layer_norm import layer_norm as pyext_layer_norm, rms_norm as pyext_rms_norm

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
        if not self.swapped and self.attention == "not routed" and not self.functions:
            lines.append("  nothing to swap in this model")
        return "\n".join(lines)


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
                not getattr(attention_ops.calling_torch_sdpa, "active", False):
            if self.gqa:
                kwargs["enable_gqa"] = True
            return attention_ops._scaled_dot_product_attention(*args, **kwargs, backend=self.backend,
                                                               softcap=self.softcap, window=self.window,
                                                               sinks=self.sinks)
        call = self.calls.get(func)
        if call is not None:
            return call(self.backend, *args, **kwargs)
        return func(*args, **kwargs)


def _hf_module_swaps():
    """HuggingFace module classes -> a factory of the pyext module replacing one."""
    try:
        from transformers import activations
    except ImportError:
        return {}
    swaps = {}
    # the tanh approximation, however each class writes it, and the exact (erf) GELU
    for name in ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "FastGELUActivation",
                 "AccurateGELUActivation", "GELUActivation"):
        cls = getattr(activations, name, None)
        if cls is not None:
            approx = "none" if name == "GELUActivation" else "tanh"
            swaps[cls] = ("gelu", functools.partial(_gelu_module, approx))
    try:  # BLOOM's: the tanh approximation, its derivative written out in a torch.autograd.Function
        from transformers.models.bloom.modeling_bloom import BloomGelu
        swaps[BloomGelu] = ("gelu", functools.partial(_gelu_module, "tanh"))
    except ImportError:
        pass
    for norm, flag, factory in _hf_norms():
        swaps[norm] = (flag, factory)
    return swaps


# transformers' norm computations that pyext's modules compute: (module,
# class holding the code, eps: the attribute holding it or the value its code
# fixes, pyext's module). The statistics in float32 in each; pyext's one
# rounding at the end is within the rule of all (Llama's rounds x / rms
# before the weight product too, T5's and Cohere's cast before returning).
_HF_NORMS = (
    ("llama", "LlamaRMSNorm", "variance_epsilon", "RMSNorm"),  # Mistral, Qwen2 and 3, Phi-3, ...
    ("olmo2", "Olmo2RMSNorm", "variance_epsilon", "RMSNorm"),  # weight * x / rms in fp32: OLMo 2 and 3, GPT-OSS, ...
    ("helium", "HeliumRMSNorm", "variance_epsilon", "RMSNorm"),  # the same, weight cast first: Nemotron-H, ...
    ("llama4", "Llama4TextRMSNorm", "eps", "RMSNorm"),  # Llama's, through its _norm
    ("gemma3n", "Gemma3nRMSNorm", "eps", "RMSNorm"),  # all in fp32, the weight optional: Gemma 3n and 4
    ("moshi", "MoshiRMSNorm", "eps", "RMSNorm"),  # all in fp32: Moshi, Kyutai speech-to-text
    ("nanochat", "NanoChatRMSNorm", "eps", "RMSNorm"),  # no weight
    ("deepseek_v4", "DeepseekV4UnweightedRMSNorm", "eps", "RMSNorm"),  # no weight, x * rsqrt rounded: GLM-5-Next, ...
    ("gemma", "GemmaRMSNorm", "eps", "GemmaRMSNorm"),  # x / rms * (1 + weight): Gemma 1, 2 and 3
    ("qwen4_exp", "Qwen4ExpTextRMSNorm", "eps", "GemmaRMSNorm"),  # Gemma's, or over groups of the features
    ("t5", "T5LayerNorm", "variance_epsilon", "T5RMSNorm"),  # an RMSNorm: T5, mT5, LongT5, Pix2Struct, IDEFICS, ...
    ("cohere", "CohereLayerNorm", "variance_epsilon", "LayerNorm"),  # no bias: Command R, Command A
    ("deberta", "DebertaLayerNorm", "variance_epsilon", "DebertaLayerNorm"),  # y in the promoted dtype: DeBERTa v1
    ("olmo", "OlmoLayerNorm", 1e-5, "LayerNorm"),  # no weight, no bias: OLMo 1
    ("nemotron", "NemotronLayerNorm1P", "eps", "NemotronLayerNorm1P"),  # (1 + weight), its autocast casts: Nemotron
)


@functools.lru_cache(maxsize=1)
def _hf_norms():
    """(transformers' class, the patch() flag, factory of the pyext module
    replacing one) for each of _HF_NORMS this transformers has."""
    norms = []
    for model, name, eps, pyext_class in _HF_NORMS:
        try:
            module = importlib.import_module(f"transformers.models.{model}.modeling_{model}")
        except ImportError:
            continue
        if hasattr(module, name):
            pyext_class = getattr(pnn, pyext_class)
            flag = "layer_norm" if issubclass(pyext_class, torch.nn.LayerNorm) else "rms_norm"
            factory = functools.partial(_norm_module, pyext_class, eps)
            norms.append((getattr(module, name), flag, factory))
    return norms


def _hf_swap(cls, swaps):
    """The (flag, factory) of an HF module class, or None. Besides the classes
    named in `swaps`, any norm class that computes as one of _HF_NORMS, the
    same bytecode reading the same attributes: the many models whose code
    copies one."""
    if cls in swaps:
        return swaps[cls]
    if cls.__name__.endswith("Norm"):
        for norm, _, _ in _hf_norms():
            if all(_same_code(getattr(cls, f, None), getattr(norm, f, None)) for f in ("forward", "_norm")):
                return swaps[norm]
    return None


def _same_code(f, g) -> bool:
    """Whether f and g run the same code, or are both absent."""
    if f is None or g is None:
        return f is g
    a, b = getattr(f, "__code__", None), getattr(g, "__code__", None)
    return (a is not None and b is not None and a.co_code == b.co_code and a.co_consts == b.co_consts
            and a.co_names == b.co_names and a.co_varnames == b.co_varnames)


def _gelu_module(approximate, old, backend):
    """pyext.nn.GELU, or why not."""
    if approximate == "none" and getattr(old, "act", F.gelu) is not F.gelu:
        return "not a function pyext implements"  # a GELUActivation built on another function
    return pnn.GELU(approximate, backend=backend)


def _norm_module(pyext_class, eps, old, backend):
    """pyext_class (a pyext.nn norm) holding `old`'s weight and bias
    Parameters themselves (optimizers and state_dict see no change), or why not."""
    weight, bias = old._parameters.get("weight"), old._parameters.get("bias")
    eps = getattr(old, eps) if isinstance(eps, str) else eps
    if weight is None and hasattr(old, "weight"):  # Falcon Mamba's: a buffer its fused kernels read
        return "a weight that is not a Parameter"
    if weight is not None and weight.dim() != 1:  # Cohere's QK-norm: (heads, head_dim), over head_dim alone
        return f"a weight of shape {tuple(weight.shape)}: pyext's modules normalize over the weight's dims"
    group = getattr(old, "group_size", None)
    if weight is not None and group not in (None, weight.shape[0]):  # Qwen4-Exp's hyper-connection norms
        return f"statistics over groups of {group} of its {weight.shape[0]} features"
    if issubclass(pyext_class, pnn.LayerNorm):
        shape = weight.shape if weight is not None else getattr(old, "normalized_shape", None)
        if shape is None:
            return "no weight and no normalized_shape: pyext.nn.LayerNorm's is fixed"
        new = pyext_class(shape, eps=eps, elementwise_affine=weight is not None, bias=bias is not None,
                          device="meta", backend=backend)
    elif weight is None:  # nanochat's, or Gemma 3n's value norm: over the input's last dim
        new = pnn.UnweightedRMSNorm(eps, backend=backend)
    else:
        new = pyext_class(weight.shape[0], eps=eps, device="meta", backend=backend)
    if weight is not None:
        new.weight = weight
    if bias is not None:
        new.bias = bias
    if old.state_dict().keys() != new.state_dict().keys():
        missing = sorted(old.state_dict().keys() - new.state_dict().keys())
        return f"state pyext's module would not hold: {', '.join(missing)}"
    return new


def _hf_attention(sdpa_attention_forward, backend, module, query, key, value, attention_mask, softcap=None,
                  sliding_window=None, s_aux=None, **kwargs):
    """transformers' own SDPA integration (GQA, causal flag, masks), with its
    F.scaled_dot_product_attention call routed to pyext; a logit soft cap
    (Gemma 2's attn_logit_softcapping) and attention sinks (s_aux, GPT-OSS's),
    which torch's SDPA and so transformers' integration lack, go to pyext's
    kernels with it, and so does the layer's sliding window where _hf_mask
    gave no mask for it. A packed row (_hf_packed_rows) goes to
    flash_attention_varlen instead, its mask not read by the kernels."""
    packed = _hf_packed_rows(backend, module, query, key, attention_mask, sliding_window, kwargs)
    if packed is not None:
        out = flash_attention_varlen(*(t[0].transpose(0, 1) for t in (query, key, value)), *packed, causal=True,
                                     scale=kwargs.get("scaling"),
                                     window_size=(sliding_window - 1, -1) if sliding_window else (-1, -1),
                                     softcap=softcap or 0.0, sinks=s_aux, dropout_p=kwargs.get("dropout", 0.0),
                                     backend=backend)
        return out[None], None  # (1, T, H, Dv), as transformers' integration returns it
    window = None
    if attention_mask is None and sliding_window and query.shape[2] == key.shape[2] and \
            _windows_trusted(getattr(module, "config", None)):
        # key j seen by query i iff i - W < j (<= i, causal): the mask's band;
        # |i - j| < W in a bidirectional layer (ModernBERT's local attention),
        # FlashAttention's window (W - 1, W - 1) in transformers' integration
        window = (sliding_window - 1, -1 if getattr(module, "is_causal", True) else sliding_window - 1)
    with _RouteCalls(backend, {"attention"}, softcap=softcap or 0.0, window=window, gqa=True, sinks=s_aux):
        return sdpa_attention_forward(_KeyHeadsUnrepeated(module), query, key, value, attention_mask,
                                      sliding_window=sliding_window, **kwargs)


# The masks _hf_packed_rows has read: mask -> (sliding window, the packed
# kwargs' offsets or None, what it made of them). transformers builds one
# mask per forward and layer type and hands it to every layer of that type,
# so it is read once per forward.
_packed_masks = WeakTensorCache()


def _hf_packed_rows(backend, module, query, key, attention_mask, sliding_window, kwargs):
    """flash_attention_varlen's (cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
    max_seqlen_k) when this HF attention call is over one row of documents
    packed end to end (padding-free training), for the Triton kernels
    (backend "triton", or auto on a GPU); else None.

    The documents are those of FlashAttention's packed kwargs where the call
    has them (cu_seq_lens_q/k and max_length_q/k, as
    DataCollatorWithFlattening(return_flash_attn_kwargs=True) gives them),
    else where position_ids do not rise by 1 (transformers' rule, from which
    it builds a block-diagonal causal mask). In eager mode the call's mask
    must be exactly theirs, causal (and the layer's sliding window) within
    each: a mask with anything more (an image's bidirectional block, padding)
    is left to the mask path. While torch.compile traces, no mask can be read
    without a graph break: the packed kwargs are then taken at their word, as
    transformers' FlashAttention integration takes them (they are its
    "kwargs for Flash Attention with Compile"), and a call without them
    goes to the mask path; so does a call with no mask at all, which eager
    mode runs as one causal row (GPT-OSS builds its masks without
    position_ids: transformers' SDPA and eager attention and pyext's in
    eager mode run its packed rows so, and a compiled model must agree)."""
    name = backend or _backend.get_backend()
    if not (name == "triton" or name == "auto" and query.is_cuda) or not getattr(module, "is_causal", False) or \
            query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return None
    declared = _flash_packed_kwargs(kwargs)
    if torch.compiler.is_compiling():
        window_known = not sliding_window or _windows_trusted(getattr(module, "config", None))
        return declared if window_known and attention_mask is not None else None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dtype != torch.bool or \
            attention_mask.shape != (1, 1, query.shape[2], key.shape[2]):
        return None
    offsets = declared[0] if declared is not None else None
    known = _packed_masks.get(attention_mask)
    if known is not None and known[0] == sliding_window and known[1] is offsets:
        return known[2]
    document = _documents(offsets, kwargs.get("position_ids"), query.shape[2], attention_mask.device)
    if declared is not None and not (declared[1] is offsets or torch.equal(declared[1], offsets)):
        document = None  # keys split otherwise than queries: not what the (square, causal) mask says
    packed = None
    if document is not None and int(document[-1]) > 0:  # more than one document: build their mask (T x T) only then
        i = torch.arange(len(document), device=document.device)
        expected = (document[:, None] == document[None, :]) & (i[None, :] <= i[:, None])
        if sliding_window:
            expected &= i[None, :] > i[:, None] - sliding_window
        if torch.equal(attention_mask[0, 0], expected):
            lengths = torch.bincount(document)
            cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
            packed = declared or (cu_seqlens, cu_seqlens, int(lengths.max()), int(lengths.max()))
    _packed_masks[attention_mask] = (sliding_window, offsets, packed)
    return packed


def _flash_packed_kwargs(kwargs):
    """(cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k) where an HF
    call has all four (FlashAttention's packed-batch kwargs), else None."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    if isinstance(cu_q, torch.Tensor) and isinstance(cu_k, torch.Tensor) and max_q is not None and max_k is not None:
        return cu_q, cu_k, max_q, max_k
    return None


def _documents(offsets, positions, tokens, device):
    """Each of a row's `tokens` tokens' document number (0, 1, ...) on
    `device`: from the packed kwargs' offsets when given (None unless they
    split exactly these tokens), else from position_ids (None without them)."""
    if tokens < 2:
        return None
    if offsets is not None:
        bounds = offsets.tolist() if offsets.dim() == 1 else []
        lengths = [b - a for a, b in zip(bounds, bounds[1:])]
        if not bounds or bounds[0] != 0 or bounds[-1] != tokens or min(lengths, default=0) < 0:
            return None
        return torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                       torch.tensor(lengths, device=device))
    if not isinstance(positions, torch.Tensor) or positions.numel() != tokens:
        return None
    positions = positions.reshape(-1).to(device)
    return (torch.diff(positions, prepend=positions[:1] - 1) != 1).cumsum(0)


class _KeyHeadsUnrepeated:
    """An attention module as transformers' SDPA integration reads it
    (num_key_value_groups, is_causal, layer_idx), with one query head per key
    head: so it never copies K and V once per query head (repeat_kv, which
    it does for a masked GQA call, as torch's fused SDPA kernels take no mask
    with enable_gqa) nor folds query heads into rows (pack_gqa, one query
    token). pyext's SDPA takes the heads as they are (enable_gqa), the
    kernels reading key head h // group for query head h; its fallback to
    torch's SDPA repeats them itself where a mask is given."""
    num_key_value_groups = 1

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)


# Patched HF models whose sliding-window layers pyext runs with no mask over
# an unpadded batch: those transformers can run with FlashAttention, whose
# integration takes each layer's window from its `sliding_window` argument
# alone (FlashAttention has no mask), so that argument is the layer's window.
# id(config) -> a weak reference to it (configs are not hashable).
_native_windows = {}


def _native_windows_apply(model) -> bool:
    """Whether `model` is one whose sliding windows pyext takes from its layers
    (see _native_windows): one transformers runs with FlashAttention, each
    layer holding a window where config.layer_types gives it a window mask.
    SmolLM3's layers hold none unless config.use_sliding_window, while its
    masks follow config.layer_types alone: a model whose layers disagree
    with their masks so keeps the masks. So does one whose attention
    modules (those reading config._attn_implementation) do not all hand
    their interface a `sliding_window` (Qwen2-MoE's, PhiMoE's): where the
    argument is missing, so is the window."""
    config = model.config
    if not (getattr(model, "_supports_flash_attn", False) and getattr(config, "sliding_window", None)):
        return False
    layer_types = getattr(config, "layer_types", None) or []
    return all(_names_keyword(code, "sliding_window") for code in _hf_attention_forwards(model)) and \
        all(bool(m.sliding_window) == (layer_types[m.layer_idx] == "sliding_attention")
            for m in model.modules() if "sliding_window" in m.__dict__
            and isinstance(getattr(m, "layer_idx", None), int) and m.layer_idx < len(layer_types))


def _hf_attention_forwards(model) -> list:
    """The code of an HF model's attention modules' forwards: those that read
    config._attn_implementation to pick the attention interface."""
    forwards = {getattr(type(m).forward, "__code__", None) for m in model.modules()}
    return [code for code in forwards if code is not None and "_attn_implementation" in code.co_names]


def _rebinds(code, name: str) -> bool:
    """Whether `code` assigns to its variable `name`."""
    return any(i.opname.startswith("STORE") and i.argval == name for i in dis.get_instructions(code))


def _names_keyword(code, name: str) -> bool:
    """Whether `code` names a keyword or key `name` (a string constant, alone
    or in a call's tuple of keyword names)."""
    return any(c == name or isinstance(c, tuple) and name in c for c in code.co_consts)


def _windows_trusted(config) -> bool:
    ref = _native_windows.get(id(config))
    return ref is not None and ref() is config


def _hf_mask(sdpa_mask, *args, **kwargs):
    """transformers' SDPA mask, except none for a sliding-window layer (it
    passes local_size) of a model in _native_windows, over an unpadded batch
    with no cache offset and no other pattern (packed sequences, custom masks:
    allow_is_causal_skip False): its attention then applies the window itself
    (_hf_attention), rather than read a (B, 1, S, S) band built per forward."""
    padding = kwargs.get("attention_mask")
    if args or kwargs.get("local_size") is None or not kwargs.get("allow_is_causal_skip", True) or \
            not _windows_trusted(kwargs.get("config")) or kwargs.get("q_offset", 0) or \
            kwargs.get("kv_offset", 0) or kwargs.get("q_length") != kwargs.get("kv_length"):
        return sdpa_mask(*args, **kwargs)
    if padding is not None and (torch.compiler.is_compiling() or padding.shape[-1] != kwargs["kv_length"]
                                or not bool(padding.all())):
        return sdpa_mask(*args, **kwargs)
    return None


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
            code = getattr(getattr(member, "__func__", member), "__code__", None)
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


def _use_pyext_attention_in_hf(model, report) -> bool:
    """Register and select the "pyext" attention implementation on an HF
    model ("pyext-<backend>" for a named backend); False where the model
    has no AttentionInterface to select it through. A model that does not
    support transformers' SDPA integration, on which pyext's is built, keeps
    its attention (unless a logit soft cap or attention sinks are why)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        return False
    try:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False

    can_set = getattr(model, "_can_set_attn_implementation", None)
    if callable(can_set) and not can_set():
        return False  # a model that calls torch's SDPA itself (Falcon): routed as any other model's calls are
    # transformers refuses its SDPA integration to a model whose attention
    # holds only eagerly (causal by its mask alone, say), and to one with a
    # logit soft cap (Gemma 2) or sinks (GPT-OSS), which torch's SDPA lacks
    # and pyext's kernels apply: those take pyext's, unless their attention
    # rewrites the (eager, additive) mask it is given (DeepSeek-V4 appends its
    # compressed keys' bias), which pyext's SDPA masks would not survive
    if not getattr(model, "_supports_sdpa", False):
        why = None
        if not (_hf_softcap(model) or _hf_sinks(model)):
            why = "does not support transformers' SDPA attention, on which pyext's is built"
        elif any(_rebinds(code, "attention_mask") for code in _hf_attention_forwards(model)):
            why = "runs its attention eagerly only, and rewrites the attention mask it is given"
        if why is not None:
            report.attention = f"left: {type(model).__name__} {why}"
            return True
    # one implementation name per backend, each function holding only its
    # backend: the registry is global, shared by every patched model (and copy)
    impl = "pyext" if model._pyext_backend is None else f"pyext-{model._pyext_backend}"
    AttentionInterface.register(impl, functools.partial(_hf_attention, sdpa_attention_forward, model._pyext_backend))
    AttentionMaskInterface.register(impl, functools.partial(_hf_mask, sdpa_mask))
    previous = config._attn_implementation
    model.set_attn_implementation(impl)
    if config._attn_implementation != impl:
        return False
    model._pyext_hf_attn = previous
    report.attention = f"transformers attention implementation '{impl}' (was '{model._pyext_hf_attn}')"
    if _native_windows_apply(model):
        _native_windows[id(config)] = weakref.ref(config, lambda _, key=id(config): _native_windows.pop(key, None))
        report.attention += ("; sliding-window layers over an unpadded batch: the window in the kernels, no "
                             "mask")
    if model._pyext_backend not in ("torch", "cuda"):
        report.attention += ("; a row of packed documents (position_ids restarting, no cache): "
                             "flash_attention_varlen (the Triton kernels, when they run), no mask read; under "
                             "torch.compile, where the call has FlashAttention's packed kwargs (cu_seq_lens_q, ...)")
    return True


def patch(model: torch.nn.Module, *, layer_norm=True, rms_norm=True, gelu=True, attention=True,
          backend=None, verbose=False) -> torch.nn.Module:
    """Swap pyext's kernels into `model` in place and return it (see the module doc).

    Patching twice is harmless; `backend` pins one backend for every swapped
    module (None: the process default, normally "auto").
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"pyext.patch: model must be a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, "_pyext_patched", False):
        unpatch(model)
    enabled = {"layer_norm": layer_norm, "rms_norm": rms_norm, "gelu": gelu, "attention": attention}
    report = PatchReport()
    replaced = []  # (parent, attribute name, original module) to put back on unpatch
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
        if cls in _CLASS_SWAPS:
            new_cls, flag = _CLASS_SWAPS[cls]
            if not enabled[flag]:
                report.left.append((path, cls.__name__, f"{flag}=False"))
                continue
            module.__class__ = new_cls
            module.backend = backend
            module._pyext_original_class = cls
            report.swapped.append((path, cls.__name__, f"pyext.nn.{new_cls.__name__}"))
        elif (hf_swap := _hf_swap(cls, hf_swaps)) is not None:
            flag, make = hf_swap
            new = make(module, backend) if enabled[flag] else f"{flag}=False"
            if isinstance(new, str):  # why not
                report.left.append((path, cls.__name__, new))
                continue
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            setattr(parent, name, new)
            replaced.append((parent, name, module))
            report.swapped.append((path, cls.__name__, f"pyext.nn.{type(new).__name__}"))
        elif cls.__module__.startswith("pyext."):
            continue
        elif any(k in cls.__name__.lower() for k in ("norm", "gelu", "attention")) and \
                not list(module.children()):
            unknown.append((path, cls))

    model._pyext_backend = backend
    model._pyext_replaced = replaced
    hf = attention and _use_pyext_attention_in_hf(model, report)
    if attention and not report.attention.startswith("left:"):
        report.notes += _attention_notes(model, backend)
    # Outside transformers' models, calls of F.layer_norm, F.rms_norm and
    # F.gelu in the model's own code (nanoGPT's LayerNorm module, say) go to
    # pyext too, as do its SDPA calls; transformers' models have modules for these.
    functions = set() if hf else {flag for flag in _ROUTED_FUNCTIONS if enabled[flag]}
    named = {path: _named_in(type(m), functions | {"scaled_dot_product_attention"})
             for path, m in model.named_modules()}
    functions &= set().union(*named.values())  # those some module's code names
    flags = frozenset(functions | ({"attention"} if attention and not hf else set()))
    report.functions = [f"F.{name}" for name in _ROUTED_FUNCTIONS if name in functions]
    if flags:
        for module in model.modules():
            if isinstance(module, torch.nn.TransformerEncoder):
                module.forward = _TorchFastPathForward(module, module.__dict__.get("forward"))
        routed = functions | ({"scaled_dot_product_attention"} if "attention" in flags else set())
        callers = [path for path, names in named.items() if path and names & routed]
        for module in [model] + [model.get_submodule(path) for path in callers]:
            module.forward = _RoutedForward(module, backend, flags, module.__dict__.get("forward"))
    if attention and not hf:
        report.attention = "F.scaled_dot_product_attention calls in the model's forward go to pyext"
        sdpa_callers = [path for path in callers if "scaled_dot_product_attention" in named[path]]
        if sdpa_callers:
            report.attention += (", and in the forward of the modules that make them, run on their own as "
                                 "torch.utils.checkpoint recomputes them: " + ", ".join(sdpa_callers))
    report.left += [(path, cls.__name__, "no pyext equivalent") for path, cls in unknown
                    if not named[path] & functions]
    model._pyext_patched = True
    model._pyext_report = report
    (print if verbose else log.info)(str(report))
    return model


# the attention dropout probability in HF configs, by the names models give it
_HF_ATTENTION_DROPOUT = ("attn_pdrop", "attention_probs_dropout_prob", "attention_dropout")


def _triton_only_outcome(backend, auto_order, theirs: str, feature: str):
    """What attention calls with a feature that the Triton kernels have and
    the CUDA ones do not will do: run torch's SDPA under auto while the
    Triton kernels are not in its `auto_order` (until measured faster), raise
    under backend "cuda"; None (nothing to note) otherwise."""
    if _backend.is_auto(backend) and "triton" not in auto_order:
        return f"run torch's SDPA (pyext's {theirs} the Triton kernels', backend='triton')"
    if backend == "cuda":
        return f"raise (the CUDA kernels have no {feature})"
    return None


def _attention_dropout_notes(model, backend) -> List[str]:
    """Attention with dropout, which the Triton kernels have and the CUDA ones
    do not: in training those calls run torch's SDPA under auto (until the
    Triton dropout is measured faster: SDPA_DROPOUT_AUTO_ORDER), and raise
    under backend "cuda". GPT-2's and BERT's HF configs default to 0.1."""
    outcome = _triton_only_outcome(backend, attention_ops.SDPA_DROPOUT_AUTO_ORDER, "dropout is", "dropout")
    if outcome is None:
        return []
    config = getattr(model, "config", None)
    settings = config.to_dict() if hasattr(config, "to_dict") else {}
    notes = [f"attention dropout {settings[k]} ({k} in the config): in training its calls {outcome}"
             for k in _HF_ATTENTION_DROPOUT if (settings.get(k) or 0) > 0]
    notes += [f"{path or '<root>'}: dropout {m.dropout}: in training its calls {outcome}"
              for path, m in model.named_modules() if isinstance(m, torch.nn.MultiheadAttention) and m.dropout > 0]
    return notes


def _attention_mask_notes(model, backend) -> List[str]:
    """Attention with a mask, which the Triton kernels have and the CUDA ones
    do not: transformers' models give SDPA one for a padded batch (and for
    sliding-window layers), MultiheadAttention for a key_padding_mask or an
    attn_mask. Under auto those calls run torch's SDPA until the Triton masks
    are measured faster (SDPA_MASK_AUTO_ORDER); under backend "cuda" they raise."""
    outcome = _triton_only_outcome(backend, attention_ops.SDPA_MASK_AUTO_ORDER, "masks are", "mask")
    if outcome is None:
        return []
    notes = []
    if hasattr(getattr(model, "config", None), "_attn_implementation"):
        windows = "; sliding windows over an unpadded batch need none" if _native_windows_apply(model) else \
            ", a sliding window"
        notes.append(f"attention with a mask (a padded batch's attention_mask{windows}): its calls {outcome}")
    notes += [f"{path or '<root>'}: calls with a key_padding_mask or an attn_mask (not the causal hint) {outcome}"
              for path, m in model.named_modules() if isinstance(m, torch.nn.MultiheadAttention)]
    return notes


def _hf_softcap(model) -> float:
    """An HF model's attention logit soft cap (Gemma 2's attn_logit_softcapping), 0 for none."""
    return getattr(getattr(model, "config", None), "attn_logit_softcapping", None) or 0.0


def _attention_notes(model, backend) -> List[str]:
    """What the attention calls pyext takes will do, where it is not plain:
    a soft cap's or sinks' (torch's SDPA has neither), else dropout's and masks'."""
    softcap = _hf_softcap(model)
    if softcap:
        return _attention_extras_notes(f"attention logit soft cap {softcap} (attn_logit_softcapping in the config)",
                                       "soft cap", backend)
    if _hf_sinks(model):
        return _attention_extras_notes("attention sinks (the modules' s_aux)", "sinks", backend)
    return _attention_dropout_notes(model, backend) + _attention_mask_notes(model, backend)


def _hf_sinks(model) -> bool:
    """Whether an HF model's attention has sinks (GPT-OSS's): an attention
    forward hands its interface `s_aux`."""
    return any(_names_keyword(code, "s_aux") for code in _hf_attention_forwards(model))


def _attention_extras_notes(what: str, feature: str, backend) -> List[str]:
    """Attention with a logit soft cap or sinks (`what`), which torch's SDPA
    does not have: under auto its calls run the Triton kernels, with a mask
    or dropout too (the fallback is the reference, S x S); under backend
    "cuda" they raise."""
    where = f"{what}: its calls"
    if _backend.is_auto(backend):
        return [f"{where} run pyext's Triton kernels, with a mask or dropout too (torch's SDPA has no {feature})"]
    if backend == "cuda":
        return [f"{where} raise (the CUDA kernels have no {feature})"]
    if backend == "torch":
        return [f"{where} run pyext's reference, the S x S scores in float32 (torch's SDPA has no {feature})"]
    return []


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `patch`: original classes, modules, attention and forward."""
    if not getattr(model, "_pyext_patched", False):
        return model
    for module in model.modules():
        original = module.__dict__.pop("_pyext_original_class", None)
        if original is not None:
            module.__class__ = original
            module.__dict__.pop("backend", None)
    for parent, name, old in model._pyext_replaced:
        setattr(parent, name, old)
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if isinstance(forward, _ForwardWrapper):
            while isinstance(forward, _ForwardWrapper):
                forward = forward.previous
            if forward is not None:
                module.forward = forward
            else:
                del module.forward
    if hasattr(model, "_pyext_hf_attn"):
        model.set_attn_implementation(model._pyext_hf_attn)
        del model._pyext_hf_attn
        _native_windows.pop(id(model.config), None)
    for attr in ("_pyext_patched", "_pyext_replaced", "_pyext_backend"):
        delattr(model, attr)
    return model


def patch_report(model: torch.nn.Module) -> PatchReport:
    """What the last `patch(model)` swapped and left."""
    return model._pyext_report
