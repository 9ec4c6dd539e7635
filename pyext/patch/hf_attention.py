"""pyext's attention in transformers' models: the attention implementation
"pyext" ("pyext-<backend>") registered and selected on a model, its calls
sent to pyext's SDPA (masks, windows, soft caps, sinks) or, for a row of
packed documents, to flash_attention_varlen."""
import dis
import functools
import weakref
from typing import Optional

import torch

from pyext import _backend
from pyext._weak import WeakTensorCache
from pyext.ops.attention_varlen import flash_attention_varlen
from pyext.patch.routing import _code_of, _RouteCalls


def _hf_attention(sdpa_attention_forward, backend, module, query, key, value, attention_mask, softcap=None,
                  sliding_window=None, s_aux=None, **kwargs):
    """transformers' own SDPA integration (GQA, causal flag, masks), with its
    F.scaled_dot_product_attention call routed to pyext; a logit soft cap
    (Gemma 2's attn_logit_softcapping) and attention sinks (s_aux, GPT-OSS's),
    which torch's SDPA and so transformers' integration lack, go to pyext's
    kernels with it, and so does the layer's sliding window where _hf_mask
    gave no mask for it. A packed row (_hf_packed_rows) goes to
    flash_attention_varlen instead, its mask not read by the kernels; given
    no mask, one is built for it where the model ran FlashAttention before
    (_flash_documents_mask), and a mask given is restricted to the documents;
    where it ran eager attention before, its masks are made additive, as
    eager's (_eager_before)."""
    documents = _flash_documents_mask(module, query, key, sliding_window, kwargs)
    if documents is not None:
        attention_mask = documents if attention_mask is None else _within_documents(attention_mask, documents)
    packed = _hf_packed_rows(backend, module, query, key, attention_mask, sliding_window, kwargs)
    if packed is not None:
        out = flash_attention_varlen(*(t[0].transpose(0, 1) for t in (query, key, value)), *packed, causal=True,
                                     scale=kwargs.get("scaling"),
                                     window_size=(sliding_window - 1, -1) if sliding_window else (-1, -1),
                                     softcap=softcap or 0.0, sinks=s_aux, dropout_p=kwargs.get("dropout", 0.0),
                                     backend=backend)
        return out[None], None  # (1, T, H, Dv), as transformers' integration returns it
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool and \
            getattr(module, "config", None) in _eager_before:
        attention_mask = _as_eager_mask(attention_mask, query.dtype)
    window = None
    if attention_mask is None and sliding_window and query.shape[2] == key.shape[2] and \
            getattr(module, "config", None) in _native_windows:
        # key j seen by query i iff i - W < j (<= i, causal): the mask's band;
        # |i - j| < W in a bidirectional layer (ModernBERT's local attention),
        # FlashAttention's window (W - 1, W - 1) in transformers' integration
        window = (sliding_window - 1, -1 if getattr(module, "is_causal", True) else sliding_window - 1)
    with _RouteCalls(backend, {"attention"}, softcap=softcap or 0.0, window=window, gqa=True, sinks=s_aux):
        return sdpa_attention_forward(_KeyHeadsUnrepeated(module), query, key, value, attention_mask,
                                      sliding_window=sliding_window, **kwargs)


class _Configs:
    """A set of HF models' configs, by identity (configs are not hashable),
    holding none alive: id(config) -> a weak reference to it."""

    def __init__(self, configs=()):
        self._refs = {}
        for config in configs:
            self.add(config)

    def add(self, config) -> None:
        key = id(config)
        self._refs[key] = weakref.ref(config, lambda _, key=key: self._refs.pop(key, None))

    def discard(self, config) -> None:
        self._refs.pop(id(config), None)

    def __contains__(self, config) -> bool:
        ref = self._refs.get(id(config))
        return ref is not None and ref() is config


# Patched HF models that ran a FlashAttention implementation before the patch.
# FlashAttention's integration runs a row
# of packed documents (position_ids restarting, or its packed kwargs) per
# document whatever the masks say, while transformers' SDPA masks follow the
# documents only in models whose mask functions read position_ids. GPT-OSS's
# and Granite 4 hybrid's (among others) do not: given no mask, pyext would
# run such a row as one causal sequence, which the model did not compute before.
_flash_before = _Configs()

# Patched HF models that ran transformers' eager attention before the patch
# (Gemma 2's soft cap, which transformers' SDPA integration lacks, makes it
# eager-only). Eager adds finfo.min to the scores a mask hides: a query row
# that sees no key (left padding) gets the plain average of every value, where
# SDPA's boolean mask (pyext's kernels, torch's) gives it 0. That row is
# not ignored in training: the last padding position predicts the first
# token. _hf_attention gives such a model's masked calls eager's additive
# mask (after a packed row, which needs the boolean one, is ruled out).
_eager_before = _Configs()

# The masks _flash_documents_mask has built: position_ids or offsets ->
# {sliding window: mask or None}, once per forward and window rather than
# per layer (GPT-OSS's layers alternate a window and none).
_documents_masks = WeakTensorCache()


def _flash_documents_mask(module, query, key, sliding_window, kwargs):
    """The (1, 1, T, T) boolean causal mask of the packed documents of a call,
    for a model that ran FlashAttention before the patch
    (_flash_before), the layer's sliding window within each: the documents
    of FlashAttention's packed kwargs where the call has them, else where
    position_ids do not rise by 1 (in eager mode: reading them is a host
    sync). None elsewhere: one document, a batch of rows, a cache."""
    tokens = query.shape[2]
    if getattr(module, "config", None) not in _flash_before or not getattr(module, "is_causal", False) or \
            query.shape[0] != 1 or key.shape[2] != tokens or tokens < 2:
        return None
    declared = _flash_packed_kwargs(kwargs)
    source = declared[0] if declared is not None else kwargs.get("position_ids")
    if not isinstance(source, torch.Tensor):
        return None
    if not torch.compiler.is_compiling():
        return _read_documents_mask(declared, source, kwargs.get("position_ids"), sliding_window, tokens, query.device)
    if declared is None:  # position_ids alone: read them at a graph break, as FlashAttention's integration does
        return _read_documents_mask_at_a_graph_break(None, source, source, sliding_window, tokens, query.device)
    # the offsets taken as given, read on the device: token t's document, the offsets past 0 up to t
    i = torch.arange(tokens, device=query.device, dtype=source.dtype)
    return _block_causal(torch.searchsorted(source[1:].to(query.device), i, right=True), sliding_window)


def _read_documents_mask(declared, source, positions, sliding_window, tokens, device):
    """_flash_documents_mask in eager mode: the documents read on the host
    (one sync per forward), the mask cached on `source` per window; None for
    one document (the plain causal row it is)."""
    known = _documents_masks.get(source)
    if known is None:
        known = {}
        _documents_masks[source] = known
    if sliding_window not in known:
        document = _documents(declared and declared[0], positions, tokens, device)
        several = document is not None and bool(document[-1])
        known[sliding_window] = _block_causal(document, sliding_window) if several else None
    return known[sliding_window]


# Traced, a model given position_ids alone cannot see its documents without
# reading them: torch.compile breaks its graph here (fullgraph=True raises),
# where FlashAttention's integration breaks it too (its packed-sequence test
# branches on their values).
_read_documents_mask_at_a_graph_break = torch.compiler.disable(_read_documents_mask)


# Masks given to a call and restricted to its documents: the given mask ->
# (the documents' mask, the restricted one), so that the layers sharing a
# mask share the restricted one too (and _hf_packed_rows reads it once).
_restricted_masks = WeakTensorCache()


# The additive masks _as_eager_mask has made: a boolean mask -> its additive one, once per forward
_eager_masks = WeakTensorCache()


def _as_eager_mask(mask, dtype):
    """A boolean mask as transformers' eager mask: 0 where seen, finfo.min
    where hidden (see _eager_before)."""
    known = None if torch.compiler.is_compiling() else _eager_masks.get(mask)
    if known is None or known.dtype != dtype:
        known = torch.where(mask, torch.zeros((), device=mask.device, dtype=dtype), torch.finfo(dtype).min)
        if not torch.compiler.is_compiling():
            _eager_masks[mask] = known
    return known


def _within_documents(mask, documents):
    """`mask` (boolean, or additive) where it lets a query see a key of its
    own document, else masked: transformers hands a compiled model (torch
    2.11's) a plain causal mask where, in eager mode, it hands none."""
    if torch.compiler.is_compiling():
        return _restricted(mask, documents)
    known = _restricted_masks.get(mask)
    if known is None or known[0] is not documents:
        known = (documents, _restricted(mask, documents))
        _restricted_masks[mask] = known
    return known[1]


def _restricted(mask, documents):
    if mask.dtype == torch.bool:
        return mask & documents
    return mask.masked_fill(~documents, torch.finfo(mask.dtype).min)


def _block_causal(document, sliding_window):
    """(1, 1, T, T) boolean: token i sees token j in its own document
    (document[t], each token's) at or before it, within the sliding window."""
    i = torch.arange(len(document), device=document.device)
    mask = (document[:, None] == document[None, :]) & (i[None, :] <= i[:, None])
    if sliding_window:
        mask &= i[None, :] > i[:, None] - sliding_window
    return mask[None, None]


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
            query.shape[0] != 1 or query.shape[2] != key.shape[2] or kwargs.get("position_bias") is not None:
        return None  # (T5's learned position_bias: flash_attention_varlen takes no bias, the mask path does)
    declared = _flash_packed_kwargs(kwargs)
    if torch.compiler.is_compiling():
        window_known = not sliding_window or getattr(module, "config", None) in _native_windows
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
        if torch.equal(attention_mask, _block_causal(document, sliding_window)):
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
_native_windows = _Configs()

# the sets above by the names a _PatchedAttention holds
_FLAGGED = {"flash_before": _flash_before, "eager_before": _eager_before, "native_windows": _native_windows}


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
    forwards = {_code_of(type(m).forward) for m in model.modules()}
    return [code for code in forwards if code is not None and "_attn_implementation" in code.co_names]


def _rebinds(code, name: str) -> bool:
    """Whether `code` assigns to its variable `name`."""
    return any(i.opname.startswith("STORE") and i.argval == name for i in dis.get_instructions(code))


def _names_keyword(code, name: str) -> bool:
    """Whether `code` names a keyword or key `name` (a string constant, alone
    or in a call's tuple of keyword names)."""
    return any(c == name or isinstance(c, tuple) and name in c for c in code.co_consts)


def _hf_mask(sdpa_mask, *args, **kwargs):
    """transformers' SDPA mask, except none for a sliding-window layer (it
    passes local_size) of a model in _native_windows, over an unpadded batch
    with no cache offset and no other pattern (packed sequences, custom masks:
    allow_is_causal_skip False): its attention then applies the window itself
    (_hf_attention), rather than read a (B, 1, S, S) band built per forward."""
    padding = kwargs.get("attention_mask")
    if args or kwargs.get("local_size") is None or not kwargs.get("allow_is_causal_skip", True) or \
            kwargs.get("config") not in _native_windows or kwargs.get("q_offset", 0) or \
            kwargs.get("kv_offset", 0) or kwargs.get("q_length") != kwargs.get("kv_length"):
        return sdpa_mask(*args, **kwargs)
    if padding is not None and (torch.compiler.is_compiling() or padding.shape[-1] != kwargs["kv_length"]
                                or not bool(padding.all())):
        return sdpa_mask(*args, **kwargs)
    return None


def _is_hf_model(module) -> bool:
    """Whether `module` is a transformers model (a PeftModel passes on its
    model's config and methods): one with an attention implementation to set."""
    return hasattr(getattr(module, "config", None), "_attn_implementation") and \
        callable(getattr(module, "set_attn_implementation", None))


def _use_pyext_attention_in_hf(model, backend) -> Optional[str]:
    """Register and select the "pyext" attention implementation on an HF
    model ("pyext-<backend>" for a named backend) and say so, the report's
    attention line; None where the model has no AttentionInterface to
    select it through. A model that does not support transformers' SDPA
    integration, on which pyext's is built, keeps its attention (unless a
    logit soft cap or attention sinks are why): "left: ..."."""
    if not _is_hf_model(model):
        return None
    config = model.config
    try:
        import transformers.masking_utils  # noqa: F401 (the registries _register_attention fills)
    except ImportError:
        return None

    can_set = getattr(model, "_can_set_attn_implementation", None)
    if callable(can_set) and not can_set():
        return None  # a model that calls torch's SDPA itself (Falcon): routed as any other model's calls are
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
            return f"left: {type(model).__name__} {why}"
    impl = _register_attention(backend)
    ran = [(c, c._attn_implementation) for c in _configs_of(model)]
    previous = config._attn_implementation
    model.set_attn_implementation(impl)
    if config._attn_implementation != impl:
        return None
    line = f"transformers attention implementation '{impl}' (was '{previous}')"
    windows = _native_windows_apply(model)  # the model's own config's layers
    flagged = tuple((c, frozenset(_flags(before, windows and c is config))) for c, before in ran)
    said = frozenset().union(*(flags for _, flags in flagged))
    if "flash_before" in said:
        line += "; rows of packed documents kept apart as FlashAttention kept them"
    if "eager_before" in said:
        line += "; eager's additive masks (a row that sees no key averages the values, as eager's did)"
    if "native_windows" in said:
        line += "; sliding-window layers over an unpadded batch: the window in the kernels, no mask"
    model._pyext_hf_attn = _patched_attention(previous, backend, tuple(f for f in flagged if f[1]))
    if backend not in ("torch", "cuda"):
        line += ("; a row of packed documents (position_ids restarting, no cache): flash_attention_varlen (the "
                 "Triton kernels, when they run), no mask read; under torch.compile, where the call has "
                 "FlashAttention's packed kwargs (cu_seq_lens_q, ...)")
    return line


def _configs_of(model) -> list:
    """The configs an HF model's modules read, by identity, its own first:
    a composite model's (LLaVA, Gemma 3, Qwen2-VL) text and vision layers
    read their sub-configs, each with its own _attn_implementation."""
    configs = {id(model.config): model.config}
    for module in model.modules():
        config = getattr(module, "config", None)
        if hasattr(config, "_attn_implementation"):
            configs.setdefault(id(config), config)
    return list(configs.values())


def _flags(before, native_windows: bool) -> set:
    """Which of _flash_before, _eager_before, _native_windows a config that
    ran attention `before` goes in."""
    flags = {"native_windows"} if native_windows else set()
    if "flash" in str(before):  # flash_attention_2/3, kernels-community's FlashAttention builds
        flags.add("flash_before")
    if before == "eager":
        flags.add("eager_before")
    return flags


def _register_attention(backend) -> str:
    """Register pyext's attention implementation for `backend` in
    transformers' registries and return its name: one name per backend,
    each function holding only its backend, as the registries are global,
    shared by every patched model (and copy)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    impl = "pyext" if backend is None else f"pyext-{backend}"
    AttentionInterface.register(impl, functools.partial(_hf_attention, sdpa_attention_forward, backend))
    AttentionMaskInterface.register(impl, functools.partial(_hf_mask, sdpa_mask))
    return impl


class _PatchedAttention:
    """What patch did to an HF model's attention, held by the model (an
    attribute: state_dict and save_pretrained do not see it): the
    implementation it had before, the backend, and the configs (the
    model's, a composite model's sub-configs) that _flash_before,
    _eager_before and _native_windows hold, each with the names of those
    sets. These hold configs by identity, and a model's copy
    (copy.deepcopy, torch.save and load, in another process too) has
    configs of its own, in a process whose registries may not have pyext's
    implementation: the copy's is made by _patched_attention with the
    copy's configs (deepcopy and pickle copy the arguments of __reduce__ as
    the model's)."""

    def __init__(self, previous, backend, flagged):
        self.previous, self.backend, self.flagged = previous, backend, flagged

    def __reduce__(self):
        return _patched_attention, (self.previous, self.backend, self.flagged)


def _patched_attention(previous, backend, flagged) -> _PatchedAttention:
    """The _PatchedAttention of a patched model (or of its copy), its
    backend's implementation registered, each config in the sets its flags name."""
    _register_attention(backend)
    for config, flags in flagged:
        for flag in flags:
            _FLAGGED[flag].add(config)
    return _PatchedAttention(previous, backend, flagged)


def _restore_hf_attention(model) -> None:
    """Undo _use_pyext_attention_in_hf on `model`: its attention
    implementation back, unless another was set since the patch."""
    patched = model.__dict__.pop("_pyext_hf_attn")
    previous = getattr(patched, "previous", patched)  # a str in a model pickled before it held a _PatchedAttention
    if str(model.config._attn_implementation).startswith("pyext"):
        model.set_attn_implementation(previous)
    for config in [model.config] + [c for c, _ in getattr(patched, "flagged", ())]:
        for configs in _FLAGGED.values():
            configs.discard(config)


def _hf_softcap(model) -> float:
    """An HF model's attention logit soft cap (Gemma 2's attn_logit_softcapping), 0 for none."""
    return getattr(getattr(model, "config", None), "attn_logit_softcapping", None) or 0.0


def _hf_sinks(model) -> bool:
    """Whether an HF model's attention has sinks (GPT-OSS's): an attention
    forward hands its interface `s_aux`."""
    return any(_names_keyword(code, "s_aux") for code in _hf_attention_forwards(model))
