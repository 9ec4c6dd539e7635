"""transformers' own modules that pyext replaces: their GELU activations and
the norms whose code computes what one of pyext.nn's modules computes."""
import functools
import importlib

import torch
import torch.nn.functional as F

from pyext import nn as pnn
from pyext.patch.routing import _code_of


def _hf_module_swaps():
    """HuggingFace module classes -> (the patch() flag, a factory of the pyext
    module replacing one, checked by _probe)."""
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
    return {cls: (flag, functools.partial(_probed, factory)) for cls, (flag, factory) in swaps.items()}


def _probed(factory, old, backend):
    """factory's pyext module for `old`, or why not: also where it computes
    something else than `old` on a probe."""
    new = factory(old, backend)
    return new if isinstance(new, str) else (_probe(old, new) or new)


def _probe(old, new):
    """Why `new` cannot replace `old`, or None. The classes above are taken
    by name, and a transformers release may change what one computes under
    the same name: a module that computes something else is left, not
    swapped. Both run, through their own forward (no hooks), on the same
    float64 values on the CPU: parameters and buffers drawn for the probe,
    rows of x at scales 1e-3 (a mean square near eps), 1, 30 and 0.3, and
    torch's backend for `new`. Their outputs must agree to fp32 rounding
    (the honest ones stay under 0.3 of the tolerance up to 32768 features)."""
    generator = torch.Generator().manual_seed(0)  # the probe draws nothing from torch's global generator

    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64, device="cpu")
    values = {name: draw(*t.shape) * 0.5 + 1 for name, t in {**old._buffers, **old._parameters}.items()
              if t is not None and t.is_floating_point()}
    weight = old._parameters.get("weight")
    features = tuple(weight.shape) if weight is not None else tuple(getattr(old, "normalized_shape", (24,)))
    scale = torch.tensor([1e-3, 1.0, 30.0, 0.3], dtype=torch.float64, device="cpu").view(-1, *[1] * len(features))
    inputs = [draw(4, *features) * scale + scale]
    if isinstance(new, pnn.RMSNormGated):
        inputs.append(draw(4, *features) * 2)
    try:
        with torch.no_grad():
            theirs = _run_on(old, values, inputs, None)
            ours = _run_on(new, values, inputs, "torch")
    except Exception as e:  # whatever a model's code raises on the CPU
        return f"its computation could not be checked on the CPU ({type(e).__name__}: {str(e)[:80]})"
    if ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6):
        return (f"computes something else than pyext.nn.{type(new).__name__} on a probe "
                "(has this transformers changed its code?)")
    return None


def _run_on(module, values, inputs, backend):
    """type(module).forward on a shallow copy of `module` holding `values`
    (by name) as its parameters and floating buffers, in float64."""
    probe = object.__new__(type(module))
    probe.__dict__.update(module.__dict__, _parameters={}, _buffers={})
    for name, t in module._parameters.items():
        probe._parameters[name] = None if t is None else torch.nn.Parameter(values[name], requires_grad=False)
    for name, t in module._buffers.items():
        probe._buffers[name] = values.get(name, t)
    if backend is not None:
        probe.backend = backend
    return type(module).forward(probe, *inputs).double()


# transformers' norm computations that pyext's modules compute: (module,
# class holding the code, eps: the value its code fixes or None where it reads
# one (_eps_attribute), pyext's module). The statistics in float32 in each;
# pyext's one rounding at the end is within the rule of all (Llama's rounds
# x / rms before the weight product too, T5's and Cohere's cast before returning).
_HF_NORMS = (
    ("llama", "LlamaRMSNorm", None, "RMSNorm"),  # Mistral, Qwen2 and 3, Phi-3, ...
    ("olmo2", "Olmo2RMSNorm", None, "RMSNorm"),  # weight * x / rms in fp32: OLMo 2 and 3, GPT-OSS, ...
    ("helium", "HeliumRMSNorm", None, "RMSNorm"),  # the same, weight cast first: Nemotron-H, ...
    ("ergo", "ErgoRMSNorm", None, "RMSNorm"),  # the same through F.rms_norm, its weight float32: Ergo
    ("llama4", "Llama4TextRMSNorm", None, "RMSNorm"),  # Llama's, through its _norm
    ("gemma3n", "Gemma3nRMSNorm", None, "RMSNorm"),  # all in fp32, the weight optional: Gemma 3n and 4
    ("moshi", "MoshiRMSNorm", None, "RMSNorm"),  # all in fp32: Moshi, Kyutai speech-to-text
    ("nanochat", "NanoChatRMSNorm", None, "RMSNorm"),  # no weight
    ("inkling2", "Inkling2UnweightedRMSNorm", None, "RMSNorm"),  # nanochat's, written out: Inkling 2's query norm
    ("deepseek_v4", "DeepseekV4UnweightedRMSNorm", None, "RMSNorm"),  # no weight, x * rsqrt rounded: GLM-5-Next, ...
    ("gemma", "GemmaRMSNorm", None, "GemmaRMSNorm"),  # x / rms * (1 + weight): Gemma 1, 2 and 3
    ("qwen4_exp", "Qwen4ExpTextRMSNorm", None, "GemmaRMSNorm"),  # Gemma's, or over groups of the features
    ("muse_spark", "MuseSparkTextCenteredRMSNorm", None, "GemmaRMSNorm"),  # Gemma's, 1 + weight in its dtype
    ("t5", "T5LayerNorm", None, "T5RMSNorm"),  # an RMSNorm: T5, mT5, LongT5, Pix2Struct, IDEFICS, ...
    ("cohere", "CohereLayerNorm", None, "LayerNorm"),  # no bias, per head too: Command R, Command A
    ("chameleon", "ChameleonLayerNorm", 1e-5, "LayerNorm"),  # per head, a weight and bias of (heads, head_dim)
    ("deberta", "DebertaLayerNorm", None, "DebertaLayerNorm"),  # y in the promoted dtype: DeBERTa v1
    ("olmo", "OlmoLayerNorm", 1e-5, "LayerNorm"),  # no weight, no bias: OLMo 1
    ("nemotron", "NemotronLayerNorm1P", None, "NemotronLayerNorm1P"),  # (1 + weight), its autocast casts: Nemotron
)

# transformers' gated RMSNorms (pyext.nn.RMSNormGated): (module, class,
# norm_before_gate or None where each module holds its own, y in the
# promoted dtype of x and the weight); a class renamed by a release under
# each of its names. Their eps is the attribute their code reads, the
# activation their `activation` (silu where they hold none), the groups of
# features their group_size or n_groups.
_HF_GATED_NORMS = (
    ("qwen3_next", "Qwen3NextRMSNormGated", True, False),  # normalized x rounded first: Qwen3.5, OLMo hybrid, ...
    ("glm5_next", "Glm5NextTextRMSNormGated", True, False),  # all in fp32, sigmoid: Kimi Linear, Bailing hybrid, ...
    # over groups, y promoted: Bamba, Nemotron-H, Granite 4, ... (transformers 5.25 renamed it)
    ("mamba2", ("Mamba2RMSNormGated", "MambaRMSNormGated"), False, True),
    ("falcon_h1", "FalconH1RMSNormGated", None, False),  # its own order and n_groups, all in fp32
)


@functools.lru_cache(maxsize=1)
def _hf_norms():
    """(transformers' class, the patch() flag, factory of the pyext module
    replacing one) for each of _HF_NORMS this transformers has."""
    norms = []
    for model, name, eps, pyext_class in _HF_NORMS:
        if (cls := _transformers_class(model, name)) is not None:
            pyext_class = getattr(pnn, pyext_class)
            flag = "layer_norm" if issubclass(pyext_class, torch.nn.LayerNorm) else "rms_norm"
            norms.append((cls, flag, functools.partial(_norm_module, pyext_class, eps)))
    for model, name, norm_before_gate, promote in _HF_GATED_NORMS:
        if (cls := _transformers_class(model, name)) is not None:
            norms.append((cls, "rms_norm", functools.partial(_gated_norm_module, norm_before_gate, promote)))
    return norms


def _transformers_class(model, names):
    """transformers.models.<model>.modeling_<model>.<name>, the first of
    `names` (one name or a tuple) this transformers has, or None."""
    try:
        module = importlib.import_module(f"transformers.models.{model}.modeling_{model}")
    except ImportError:
        return None
    names = (names,) if isinstance(names, str) else names
    return next((getattr(module, name) for name in names if hasattr(module, name)), None)


def _hf_swap(cls, swaps):
    """The (flag, factory) of an HF module class, or None. Besides the classes
    named in `swaps`, any norm class that computes as one of _HF_NORMS, the
    same bytecode reading the same attributes: the many models whose code
    copies one."""
    if cls in swaps:
        return swaps[cls]
    if cls.__name__.endswith(("Norm", "NormGated")):
        for norm, _, _ in _hf_norms():
            if all(_same_code(getattr(cls, f, None), getattr(norm, f, None)) for f in ("forward", "_norm")):
                return swaps[norm]
    return None


def _same_code(f, g) -> bool:
    """Whether f and g run the same code, or are both absent."""
    if f is None or g is None:
        return f is g
    a, b = _code_of(f), _code_of(g)
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
    if eps is None:
        if (attribute := _eps_attribute(type(old))) is None:
            return "no eps attribute its code reads"
        eps = getattr(old, attribute)
    buffer = old._buffers.get("weight")  # Falcon Mamba's: ones its fused kernels read, its own code does not
    if weight is None and hasattr(old, "weight") and (
            buffer is None or issubclass(pyext_class, pnn.LayerNorm) or _reads(type(old), "weight")):
        return "a weight that is not a Parameter"
    group = getattr(old, "group_size", None)  # Qwen4-Exp's hyper-connection norms: groups of the features
    if weight is not None and weight.dim() != 1:  # Cohere's QK-norm: (heads, head_dim), over head_dim alone
        if not issubclass(pyext_class, pnn.LayerNorm):
            return f"a weight of shape {tuple(weight.shape)}"
        group = weight.shape[-1]
    if issubclass(pyext_class, pnn.LayerNorm):
        shape = weight.shape if weight is not None else getattr(old, "normalized_shape", None)
        if shape is None:
            return "no weight and no normalized_shape: pyext.nn.LayerNorm's is fixed"
        new = pyext_class(shape, eps=eps, elementwise_affine=weight is not None, bias=bias is not None,
                          device="meta", group_size=group, backend=backend)
    elif weight is None:  # nanochat's, Gemma 3n's value norm, Falcon Mamba's: over the input's last dim
        new = pnn.UnweightedRMSNorm(eps, backend=backend)
        if buffer is not None:  # kept where the model's fused path looks for it
            new.register_buffer("weight", buffer, persistent="weight" not in old._non_persistent_buffers_set)
    else:
        new = pyext_class(weight.shape[0], eps=eps, device="meta", group_size=group, backend=backend)
    if weight is not None:
        new.weight = weight
    if bias is not None:
        new.bias = bias
    if old.state_dict().keys() != new.state_dict().keys():
        missing = sorted(old.state_dict().keys() - new.state_dict().keys())
        return f"state pyext's module would not hold: {', '.join(missing)}"
    return new


def _reads(cls, name: str) -> bool:
    """Whether cls's forward (or _norm) reads an attribute `name`."""
    codes = (_code_of(cls.forward), _code_of(getattr(cls, "_norm", None)))
    return any(name in code.co_names for code in codes if code is not None)


def _eps_attribute(cls):
    """The attribute holding eps that cls's code reads, or None. Not fixed per
    class: transformers renames them (5.25: Llama 4's, Gemma 3n's, nanochat's
    and DeepSeek-V4's eps became variance_epsilon)."""
    return next((name for name in ("variance_epsilon", "eps", "epsilon") if _reads(cls, name)), None)


def _gated_norm_module(norm_before_gate, promote, old, backend):
    """pyext.nn.RMSNormGated holding `old`'s weight Parameter, or why not."""
    weight = old._parameters.get("weight")
    if weight is None or weight.dim() != 1:
        return "no weight Parameter of the features"
    activation = getattr(old, "activation", "silu")
    if activation not in ("silu", "sigmoid"):
        return f"a gate activation {activation!r} (pyext's are silu and sigmoid)"
    if norm_before_gate is None:  # Falcon-H1's: the order, and groups as a count
        norm_before_gate = old.norm_before_gate
    if (eps := _eps_attribute(type(old))) is None:
        return "no eps attribute its code reads"
    groups = getattr(old, "n_groups", None)
    group = weight.shape[0] // groups if groups else getattr(old, "group_size", None)
    new = pnn.RMSNormGated(weight.shape[0], getattr(old, eps), activation, norm_before_gate, group, promote,
                           device="meta", backend=backend)
    new.weight = weight
    if old.state_dict().keys() != new.state_dict().keys():
        missing = sorted(old.state_dict().keys() - new.state_dict().keys())
        return f"state pyext's module would not hold: {', '.join(missing)}"
    return new
