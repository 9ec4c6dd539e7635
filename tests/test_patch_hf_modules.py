"""pyext.patch on HF transformers models' own norm and activation classes: each swapped by what
it computes, and matching transformers' own."""
import copy
import inspect

import pytest
import torch

import pyext
from conftest import BACKENDS, assert_close, device_for
from patch_models import check_all


def hf_class(model, name):
    """transformers.models.<model>.modeling_<model>.<name>, or the class
    under any of the names `name` joins with "|" (a release renamed it),
    skipping where this transformers lacks the model or the class
    (transformers 5.17's Nemotron-H has no gated norm class of its own)."""
    module = pytest.importorskip(f"transformers.models.{model}.modeling_{model}")
    found = [getattr(module, n) for n in name.split("|") if hasattr(module, n)]
    if not found:
        pytest.skip(f"this transformers' {model} has no {name}")
    return found[0]


def test_hf_norms_are_swapped_by_what_they_compute():
    """transformers' norm computations that pyext computes, and their copies
    in other models, become pyext's modules holding the same Parameters and
    eps: pyext.nn.RMSNorm (Llama's: x / rms, rounded, times weight; OLMo 2's
    and Helium's: weight * x / rms in float32, rounded once; Llama 4's;
    Gemma 3n's; Moshi's), UnweightedRMSNorm (nanochat's; Gemma 3n's with no
    weight), GemmaRMSNorm (Gemma's: x / rms * (1 + weight); Qwen4-Exp's,
    also over groups of the features), T5RMSNorm (T5's), LayerNorm (Cohere's,
    no bias, also per head with a weight of (heads, head_dim); Chameleon's
    per head; OLMo's, no parameters) or DebertaLayerNorm (DeBERTa's). A norm computing something
    else, or whose code reads a weight that is not a Parameter, is left,
    saying why; Falcon Mamba's, whose weight is a buffer only its fused
    kernels read, becomes UnweightedRMSNorm holding that buffer."""
    class OtherRMSNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(8))

        def forward(self, x):
            return x * self.weight

    class OtherNormRMSNorm(hf_class("gemma3n", "Gemma3nRMSNorm")):  # Gemma 3n's forward, another _norm
        def _norm(self, x):
            return x

    buffer_weight = hf_class("llama", "LlamaRMSNorm")(8)  # Llama's code, its weight a buffer
    del buffer_weight.weight
    buffer_weight.register_buffer("weight", torch.ones(8))
    norms = {"qwen2": (hf_class("qwen2", "Qwen2RMSNorm")(8, eps=1e-5), "RMSNorm"),  # a copy of Llama's
             "olmo2": (hf_class("olmo2", "Olmo2RMSNorm")(8), "RMSNorm"),
             "gpt_oss": (hf_class("gpt_oss", "GptOssRMSNorm")(8, eps=1e-5), "RMSNorm"),  # a copy of OLMo 2's
             "nemotron_h": (hf_class("nemotron_h", "NemotronHRMSNorm")(8), "RMSNorm"),  # a copy of Helium's
             "llama4": (hf_class("llama4", "Llama4TextRMSNorm")(8), "RMSNorm"),
             "gemma4": (hf_class("gemma4", "Gemma4RMSNorm")(8), "RMSNorm"),  # a copy of Gemma 3n's
             "kyutai": (hf_class("kyutai_speech_to_text", "KyutaiSpeechToTextRMSNorm")(8), "RMSNorm"),  # Moshi's
             "unscaled": (hf_class("gemma4", "Gemma4RMSNorm")(8, with_scale=False), "UnweightedRMSNorm"),
             "nanochat": (hf_class("nanochat", "NanoChatRMSNorm")(eps=1e-5), "UnweightedRMSNorm"),
             "gemma": (hf_class("gemma", "GemmaRMSNorm")(8, eps=1e-5), "GemmaRMSNorm"),
             "gemma2": (hf_class("gemma2", "Gemma2RMSNorm")(8), "GemmaRMSNorm"),  # a copy of Gemma's
             "qwen4_exp": (hf_class("qwen4_exp", "Qwen4ExpTextRMSNorm")(8), "GemmaRMSNorm"),  # Gemma's, no groups
             "umt5": (hf_class("umt5", "UMT5LayerNorm")(8, eps=1e-5), "T5RMSNorm"),  # a copy of T5's
             "idefics": (hf_class("idefics", "IdeficsRMSNorm")(8), "T5RMSNorm"),  # a copy of T5's
             "cohere2": (hf_class("cohere2", "Cohere2LayerNorm")(8, eps=1e-4), "LayerNorm"),  # a copy of Cohere's
             "olmo": (hf_class("olmo", "OlmoLayerNorm")(8), "LayerNorm"),
             "deberta": (hf_class("deberta", "DebertaLayerNorm")(8), "DebertaLayerNorm"),
             "cohere_qk": (hf_class("cohere", "CohereLayerNorm")((2, 4)), "LayerNorm"),  # over each head's 4
             "chameleon": (hf_class("chameleon", "ChameleonLayerNorm")((2, 4)), "LayerNorm"),  # the same, a bias
             "qwen4_exp_groups": (hf_class("qwen4_exp", "Qwen4ExpTextRMSNorm")(8, group_size=4), "GemmaRMSNorm"),
             "falcon_mamba": (hf_class("falcon_mamba", "FalconMambaWeightlessRMSNorm")(8),  # a buffer it never
                              "UnweightedRMSNorm"),  # reads, kept: its fused kernels read it
             "buffer_weight": (buffer_weight, "a weight that is not a Parameter"),
             "other": (OtherRMSNorm(), "code pyext does not recognise"),
             "other_norm": (OtherNormRMSNorm(8), "code pyext does not recognise"),
             "group_norm": (torch.nn.GroupNorm(2, 8), "no pyext equivalent")}
    model = torch.nn.ModuleDict({name: old for name, (old, _) in norms.items()})
    pyext.patch(model, attention=False)
    report = pyext.patch_report(model)
    swapped = {name: new for name, (_, new) in norms.items() if hasattr(pyext.nn, new)}
    assert [(path, new) for path, _, new in report.swapped] == [(n, f"pyext.nn.{new}") for n, new in swapped.items()]
    assert [(path, why) for path, _, why in report.left] == [(n, why) for n, (_, why) in norms.items()
                                                            if n not in swapped]
    for name in swapped:
        old, new = norms[name][0], model[name]
        eps = old.variance_epsilon if hasattr(old, "variance_epsilon") else getattr(old, "eps", 1e-5)
        assert new.eps == eps, name
        groups = {"cohere_qk": 4, "chameleon": 4, "qwen4_exp_groups": 4}
        assert getattr(new, "group_size", None) == groups.get(name), name
        assert new.state_dict().keys() == old.state_dict().keys(), name
        assert all(new.get_parameter(key) is old.get_parameter(key) for key in old.state_dict()), name
    assert model["falcon_mamba"].weight is norms["falcon_mamba"][0].weight


def _norm_reading_eps(self, x):  # Llama 4's computation, its eps as transformers 5.24 names it
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def _norm_reading_variance_epsilon(self, x):  # as 5.25 names it
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


@pytest.mark.parametrize("name,norm", [("eps", _norm_reading_eps),
                                       ("variance_epsilon", _norm_reading_variance_epsilon)], ids=["eps", "variance"])
def test_an_hf_norm_keeps_its_eps_whatever_its_code_calls_it(monkeypatch, name, norm):
    """transformers renames the attribute holding a norm's eps between
    releases (5.25: Llama 4's, Gemma 3n's, nanochat's and DeepSeek-V4's eps
    became variance_epsilon): pyext.patch takes the one the class's code
    reads, under either name."""
    cls = hf_class("llama4", "Llama4TextRMSNorm")
    monkeypatch.setattr(cls, "_norm", norm)
    old = cls(8)
    for attribute in ("eps", "variance_epsilon"):
        old.__dict__.pop(attribute, None)
    setattr(old, name, 3e-4)
    new = pyext.patch(torch.nn.ModuleDict({"norm": old}), attention=False)["norm"]
    assert type(new) is pyext.nn.RMSNorm and new.eps == 3e-4 and new.weight is old.weight

def _gemma_without_the_one(self, x):  # Gemma's norm, the weight as Llama's (not 1 + weight)
    return self._norm(x.float()).type_as(x) * self.weight


def _llama_with_eps_outside_the_root(self, x):  # Llama's norm, x / (rms + eps)
    return self.weight * (x / (x.pow(2).mean(-1, keepdim=True).sqrt() + self.variance_epsilon))


def _gelu_as_relu(self, x):
    return torch.relu(x)


def _llama_with_a_leading_dim(self, x):  # Llama's norm's values, in another shape
    return (self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).unsqueeze(0)


@pytest.mark.parametrize("model,name,forward,args,ours", [
    ("gemma", "GemmaRMSNorm", _gemma_without_the_one, (8,), "GemmaRMSNorm"),
    ("llama", "LlamaRMSNorm", _llama_with_eps_outside_the_root, (8,), "RMSNorm"),
    ("llama", "LlamaRMSNorm", _llama_with_a_leading_dim, (8,), "RMSNorm"),
    (None, "GELUActivation", _gelu_as_relu, (), "GELU")], ids=["gemma", "llama", "llama-shape", "gelu"])
def test_an_hf_module_whose_code_changed_under_its_name_is_left(monkeypatch, model, name, forward, args, ours):
    """pyext.patch takes transformers' classes by name (and their copies by
    their code), and a release may change what a class computes under the
    same name: a module computing something else than the pyext module that
    would replace it, on a probe of float64 values, is left, saying so.
    Llama's with eps outside the root differs only where the mean square is
    near eps, which the probe has a row of; its values in another shape
    would pass a comparison that broadcasts."""
    tf = pytest.importorskip("transformers")
    cls = hf_class(model, name) if model else tf.activations.GELUActivation
    monkeypatch.setattr(cls, "forward", forward)
    old = cls(*args)
    model_dict = pyext.patch(torch.nn.ModuleDict({"m": old}), attention=False)
    assert model_dict["m"] is old
    assert [why for _, _, why in pyext.patch_report(model_dict).left] == [
        f"computes something else than pyext.nn.{ours} on a probe "
        "(has this transformers changed its code?)"]


def test_hf_modules_pyext_cannot_stand_for_are_left_saying_why():
    """An HF norm whose weight is not over the features, one holding state
    pyext's module would not, a gated norm with a gate activation pyext
    lacks or a 2-D weight, a GELU on another function (HF's Python gelu):
    each left in place, the report saying why; the plain one beside them swapped."""
    tf = pytest.importorskip("transformers")
    llama_norm, gated_norm = hf_class("llama", "LlamaRMSNorm"), hf_class("qwen3_next", "Qwen3NextRMSNormGated")
    two_d, extra, gelu_gate, gated_two_d = llama_norm(8), llama_norm(8), gated_norm(8), gated_norm(8)
    two_d.weight = gated_two_d.weight = torch.nn.Parameter(torch.ones(2, 8))
    extra.register_buffer("scale", torch.ones(1))
    gelu_gate.activation = "gelu"
    model = torch.nn.Sequential(two_d, extra, gelu_gate, gated_two_d,
                                tf.activations.GELUActivation(use_gelu_python=True), llama_norm(8))
    left = list(model)
    report = pyext.patch_report(pyext.patch(model, attention=False))
    assert report.left == [
        ("0", "LlamaRMSNorm", "a weight of shape (2, 8)"),
        ("1", "LlamaRMSNorm", "state pyext's module would not hold: scale"),
        ("2", "Qwen3NextRMSNormGated", "a gate activation 'gelu' (pyext's are silu and sigmoid)"),
        ("3", "Qwen3NextRMSNormGated", "no weight Parameter of the features"),
        ("4", "GELUActivation", "not a function pyext implements")]
    assert list(model)[:5] == left[:5] and report.swapped == [("5", "LlamaRMSNorm", "pyext.nn.RMSNorm")]


def test_hf_norms_whose_attributes_have_gone_are_left_saying_why(monkeypatch):
    """transformers renames what its norms read between releases (5.25:
    eps became variance_epsilon in four of them). A norm class pyext swaps
    whose code reads no eps attribute pyext knows, or an OLMo LayerNorm
    with no normalized_shape (and no weight to take it from), is left,
    the report saying why, rather than given a default."""
    llama_norm, gated_norm = hf_class("llama", "LlamaRMSNorm"), hf_class("qwen3_next", "Qwen3NextRMSNormGated")
    olmo_norm = hf_class("olmo", "OlmoLayerNorm")

    def forward(self, hidden_states, gate=None):  # an eps under a name pyext does not know
        return hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.renamed) * self.weight
    for cls in (llama_norm, gated_norm):
        monkeypatch.setattr(cls, "forward", forward)
    shapeless = olmo_norm(8)
    del shapeless.normalized_shape
    model = pyext.patch(torch.nn.Sequential(llama_norm(8), gated_norm(8), shapeless), attention=False)
    assert pyext.patch_report(model).left == [
        ("0", "LlamaRMSNorm", "no eps attribute its code reads"),
        ("1", "Qwen3NextRMSNormGated", "no eps attribute its code reads"),
        ("2", "OlmoLayerNorm", "no weight and no normalized_shape: pyext.nn.LayerNorm's is fixed")]
    assert all(type(m).__module__.startswith("transformers") for m in model)


def test_pyexts_modules_for_hf_norms_print_what_they_compute_with():
    """print(model) of a patched model names each of these norms' shape,
    eps and options, as torch's norm modules do."""
    assert [repr(m) for m in (pyext.nn.GemmaRMSNorm(8, eps=1e-6), pyext.nn.GemmaRMSNorm(8, group_size=4),
                              pyext.nn.UnweightedRMSNorm(1e-5),
                              pyext.nn.RMSNormGated(8, 1e-5, "sigmoid", False, 4, True))] == [
        "GemmaRMSNorm((8,), eps=1e-06)", "GemmaRMSNorm((8,), eps=1e-06, group_size=4)",
        "UnweightedRMSNorm(eps=1e-05)",
        "RMSNormGated((8,), eps=1e-05, activation=sigmoid, norm_before_gate=False, group_size=4, promote=True)"]


def test_patching_an_hf_model_draws_nothing_from_torchs_generator():
    """The probe of each swapped module draws its values from a generator of
    its own: patching leaves torch's global random state as it was."""
    tf = pytest.importorskip("transformers")
    config = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=64)
    model = tf.LlamaForCausalLM(config)
    state = torch.get_rng_state()
    pyext.patch(model)
    assert len(pyext.patch_report(model).swapped) == 5
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("model,norm,groups", [
    ("qwen3_5", "Qwen3_5RMSNormGated", None),  # a copy of Qwen3-Next's
    ("kimi_linear", "KimiLinearRMSNormGated", None),  # of GLM-5 Next's
    ("bamba", "BambaRMSNormGated", 8),  # of Mamba 2's, one group
    ("nemotron_h", "NemotronHRMSNormGated", 4)], ids=lambda v: v if isinstance(v, str) else None)
def test_hf_gated_norms_are_swapped_by_what_they_compute(model, norm, groups):
    """Copies of transformers' gated RMSNorms in other models become
    pyext.nn.RMSNormGated holding the same weight, eps, activation and
    groups (Nemotron-H's). The group size is passed where the class takes
    one (transformers 5.17's Bamba norm has none)."""
    cls = hf_class(model, norm)
    takes_groups = "group_size" in inspect.signature(cls).parameters
    old = cls(8, group_size=groups) if takes_groups else cls(8)
    model_dict = pyext.patch(torch.nn.ModuleDict({"norm": old}), attention=False)
    new = model_dict["norm"]
    assert type(new) is pyext.nn.RMSNormGated and pyext.patch_report(model_dict).left == []
    assert new.eps == old.variance_epsilon and new.weight is old.weight
    assert new.activation == getattr(old, "activation", "silu")
    assert new.group_size == (groups if takes_groups else None)

# (model, class, its constructor's arguments) of each computation in pyext.patch's _HF_NORMS, and Falcon
# Mamba's copy of nanochat's (a weight buffer its fused kernels read, kept)
HF_NORMS = [("llama", "LlamaRMSNorm", (96,)), ("olmo2", "Olmo2RMSNorm", (96,)), ("helium", "HeliumRMSNorm", (96,)),
            ("ergo", "ErgoRMSNorm", (96, 1e-6)),
            ("llama4", "Llama4TextRMSNorm", (96,)), ("gemma3n", "Gemma3nRMSNorm", (96,)),
            ("moshi", "MoshiRMSNorm", (96,)), ("nanochat", "NanoChatRMSNorm", ()),
            ("deepseek_v4", "DeepseekV4UnweightedRMSNorm", ()), ("inkling2", "Inkling2UnweightedRMSNorm", ()),
            ("gemma", "GemmaRMSNorm", (96,)), ("qwen4_exp", "Qwen4ExpTextRMSNorm", (96,)),
            ("muse_spark", "MuseSparkTextCenteredRMSNorm", (96,)), ("t5", "T5LayerNorm", (96,)),
            ("cohere", "CohereLayerNorm", (96,)), ("olmo", "OlmoLayerNorm", (96,)),
            ("deberta", "DebertaLayerNorm", (96,)), ("nemotron", "NemotronLayerNorm1P", (96,)),
            ("falcon_mamba", "FalconMambaWeightlessRMSNorm", (96,))]


def check_swapped_module(ours, theirs, inputs, x_dtype, weight_dtype, names):
    """ours (what pyext.patch made of transformers' module `theirs`) against
    it: the output and the gradients of the inputs and parameters within the
    rule against the float64 oracle (theirs in float64), theirs in the same
    dtypes (inputs in x_dtype, parameters in weight_dtype) the yardstick.
    Every run sees the same values: the inputs, parameters and output
    gradient rounded to the test's dtypes first, so the oracle computes on
    what the kernels were given, not on values they never saw."""
    with torch.no_grad():
        for module in (ours, theirs):
            for p in module.parameters():
                p.copy_(p.to(weight_dtype))
    inputs = [t.to(x_dtype) for t in inputs]

    def run(module, x_dt, weight_dt, dy=None):
        module = copy.deepcopy(module).to(weight_dt)
        leaves = [t.to(x_dt).requires_grad_() for t in inputs]
        y = module(*leaves)
        if dy is None:
            dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y.device, y.dtype)
        return [y] + list(torch.autograd.grad(y, leaves + list(module.parameters()), dy.to(y.dtype))), dy
    out, dy = run(ours, x_dtype, weight_dtype)
    check_all(names, out, run(theirs, torch.float64, torch.float64, dy)[0], run(theirs, x_dtype, weight_dtype, dy)[0])


def check_swapped_hf_norm(model, norm, args, backend, x_dtype, weight_dtype):
    """What pyext.patch makes of transformers' norm `norm` against it
    (check_swapped_module): y, dx and each parameter's gradient; y in its dtype."""
    device = device_for(backend)
    theirs = hf_class(model, norm)(*args).to(device)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.5)
    ours = pyext.patch(torch.nn.ModuleDict({"norm": copy.deepcopy(theirs)}), attention=False, backend=backend)["norm"]
    assert type(ours).__module__ == "pyext.nn"
    weight = theirs._parameters.get("weight")
    x = torch.randn(7, *(weight.shape if weight is not None else (96,)), device=device) * 3 + 1
    names = ["y", "dx"] + [name for name, _ in theirs.named_parameters()]
    check_swapped_module(ours, theirs, [x], x_dtype, weight_dtype, names)


# bfloat16 with backend "torch" runs torch's own bf16 ops, looser than these modules' float32 math (torch's
# CPU LayerNorm backward left Cohere's dweight 1.25 ulp off where Cohere's own is 0.5): the rule judges kernels
NORM_BACKEND_DTYPES = [pytest.param(b.values[0], dtype, marks=b.marks, id=f"{b.values[0]}-{str(dtype)[6:]}")
                       for b in BACKENDS for dtype in (torch.bfloat16, torch.float32)
                       if not (b.values[0] == "torch" and dtype == torch.bfloat16)]


@pytest.mark.parametrize("backend,dtype", NORM_BACKEND_DTYPES)
@pytest.mark.parametrize("model,norm,args", HF_NORMS, ids=[name for name, _, _ in HF_NORMS])
def test_a_swapped_hf_norm_matches_transformers_own(model, norm, args, backend, dtype):
    check_swapped_hf_norm(model, norm, args, backend, dtype, dtype)


# the norms over groups of a row: Cohere's and Chameleon's QK norms (3 heads of 32: a weight of
# (heads, head_dim); Chameleon's a bias too) and Qwen4-Exp's hyper-connection norm (4 streams of 24)
HF_GROUPED_NORMS = [pytest.param("cohere", "CohereLayerNorm", ((3, 32),), id="cohere_qk"),
                    pytest.param("chameleon", "ChameleonLayerNorm", ((3, 32),), id="chameleon_qk"),
                    pytest.param("qwen4_exp", "Qwen4ExpTextRMSNorm", (96, 24), id="qwen4_exp_groups")]


@pytest.mark.parametrize("backend,dtype", NORM_BACKEND_DTYPES)
@pytest.mark.parametrize("model,norm,args", HF_GROUPED_NORMS)
def test_a_swapped_hf_grouped_norm_matches_transformers_own(model, norm, args, backend, dtype):
    check_swapped_hf_norm(model, norm, args, backend, dtype, dtype)


# (model, class, its constructor's arguments) of each gated norm in pyext.patch's _HF_GATED_NORMS, and a copy
# (Nemotron-H's in 8 groups, as its config has them; Falcon-H1's in 4, gate before norm, and its default)
HF_GATED_NORMS = [("qwen3_next", "Qwen3NextRMSNormGated", (96,)), ("glm5_next", "Glm5NextTextRMSNormGated", (96,)),
                  ("mamba2", "Mamba2RMSNormGated|MambaRMSNormGated", (96, 96)),  # renamed in transformers 5.25
                  ("nemotron_h", "NemotronHRMSNormGated", (96, 12)),
                  ("falcon_h1", "FalconH1RMSNormGated", (96, 1e-6, 4, False)),
                  ("falcon_h1_default", "FalconH1RMSNormGated", (96,))]


@pytest.mark.parametrize("backend,dtype", NORM_BACKEND_DTYPES + [pytest.param("triton", "mixed", id="triton-mixed")])
@pytest.mark.parametrize("model,norm,args", HF_GATED_NORMS, ids=[name for name, _, _ in HF_GATED_NORMS])
def test_a_swapped_hf_gated_norm_matches_transformers_own(model, norm, args, backend, dtype):
    """transformers' gated RMSNorms become pyext.nn.RMSNormGated: y, dx,
    dgate and dweight within the rule against the float64 oracle (the module
    in float64), transformers' module in the same dtypes the yardstick, y in
    its dtype; "mixed": bfloat16 x and gate, a float32 weight (Mamba 2's y
    then float32). Mamba 2's called without a gate too."""
    x_dtype, weight_dtype = (torch.bfloat16, torch.float32) if dtype == "mixed" else (dtype, dtype)
    device = device_for(backend)
    theirs = hf_class(model.removesuffix("_default"), norm)(*args).to(device)
    with torch.no_grad():
        theirs.weight.normal_(1, 0.3)
    ours = pyext.patch(torch.nn.ModuleDict({"norm": copy.deepcopy(theirs)}), attention=False, backend=backend)["norm"]
    assert type(ours) is pyext.nn.RMSNormGated
    x, gate = torch.randn(7, 96, device=device) * 3 + 1, torch.randn(7, 96, device=device) * 3
    for inputs in ([x, gate], [x]) if model in ("mamba2", "nemotron_h", "falcon_h1") else ([x, gate],):
        names = ["y", "dx"] + (["dgate"] if len(inputs) == 2 else []) + ["dweight"]
        check_swapped_module(ours, theirs, inputs, x_dtype, weight_dtype, names)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_dtype,weight_dtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                                  (torch.bfloat16, torch.float32)], ids=str)
@pytest.mark.parametrize("model,norm,args", [("t5", "T5LayerNorm", (96,)), ("deberta", "DebertaLayerNorm", (96,)),
                                        ("ergo", "ErgoRMSNorm", (96, 1e-6))], ids=["t5", "deberta", "ergo"])
def test_a_swapped_norm_matches_its_own_on_mixed_dtypes(model, norm, args, x_dtype, weight_dtype, backend):
    """x and the parameters of two dtypes. T5's norm: its result in the
    weight's dtype where that is a half one (T5 in half precision, its
    residual stream in float32), in float32 where the weight is. DeBERTa's:
    in float32 either way (torch's promotion). Ergo's (a float32 weight in a
    bf16 model): in x's dtype."""
    check_swapped_hf_norm(model, norm, args, backend, x_dtype, weight_dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_swapped_nemotron_norm_under_autocast_normalizes_in_autocasts_dtype(backend):
    """Nemotron's LayerNorm under bf16 autocast normalizes with autocast
    off, x and its parameters cast to bf16 first where CUDA autocast is on
    (not CPU autocast: it checks CUDA's): pyext's gives y in the same dtype,
    within the rule against the float64 oracle on the x it normalized."""
    device = device_for(backend)
    theirs = hf_class("nemotron", "NemotronLayerNorm1P")(96).to(device)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.5)
    ours = pyext.patch(torch.nn.ModuleDict({"norm": copy.deepcopy(theirs)}), attention=False, backend=backend)["norm"]
    assert type(ours) is pyext.nn.NemotronLayerNorm1P
    x = torch.randn(7, 96, device=device) * 3 + 1
    with torch.autocast(device.type, dtype=torch.bfloat16):
        got, pt = ours(x), theirs(x)
    assert pt.dtype == (torch.bfloat16 if device.type == "cuda" else torch.float32)
    assert_close(got, copy.deepcopy(theirs).double()(x.to(pt.dtype).double()), pt, "y")


# the model's dtypes flow through T5RMSNorm alike on each backend; float16 under Triton's interpreter takes minutes
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.gpu),
                                     pytest.param("cuda", marks=pytest.mark.gpu)])
def test_t5_in_half_precision_keeping_wo_in_float32_runs_patched(backend):
    """T5 as from_pretrained loads it in float16: its `wo` projections kept in
    float32 (_keep_in_fp32_modules), so float32 residuals reach float16
    norms. Patched, its logits and gradients are the original's, within the
    rule; a norm that returned float32 there would break the next Linear."""
    tf = pytest.importorskip("transformers")
    cfg = tf.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, dropout_rate=0.0,
                      decoder_start_token_id=0)
    torch.manual_seed(0)
    original = tf.T5ForConditionalGeneration(cfg).to(device_for(backend))
    kept = [name for name, m in original.named_modules() if name.endswith(".wo")]
    assert kept and set(original._keep_in_fp32_modules) == {"wo"}
    patched = pyext.patch(copy.deepcopy(original), attention=False, backend=backend)
    assert {new for _, old, new in pyext.patch_report(patched).swapped if old == "T5LayerNorm"} == {
        "pyext.nn.T5RMSNorm"}
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1)).to(original.device)

    def output_and_grads(model, dtype):
        model = copy.deepcopy(model).to(dtype).train()
        for name in kept:
            model.get_submodule(name).float()
        result = model(input_ids=ids, labels=ids)
        return [result.logits] + list(torch.autograd.grad(result.loss, list(model.parameters())))
    names = ["logits"] + [name for name, _ in original.named_parameters()]
    check_all(names, output_and_grads(patched, torch.float16), output_and_grads(original, torch.float64),
              output_and_grads(original, torch.float16))


def test_a_replaced_hf_norm_keeps_what_is_done_to_the_model_while_patched():
    """An HF norm replaced by a pyext module shares its hooks: one registered
    before the patch runs while patched, one registered on pyext's module
    stays after unpatch. unpatch puts the HF module back holding what was
    set on pyext's meanwhile: the mode (model.eval()), the Parameters that
    load_state_dict(assign=True) put in place (a model built on the meta
    device is loaded so), the buffers that .to() made anew. An unpatched
    model treated alike computes the same."""
    llama_norm = hf_class("llama", "LlamaRMSNorm")
    weightless = hf_class("falcon_mamba", "FalconMambaWeightlessRMSNorm")  # a buffer its code never reads

    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 8), llama_norm(8), weightless(8))
    model, unpatched = build(), build()
    calls = []
    before = model[1].register_forward_hook(lambda module, args, out: calls.append("before"))
    pyext.patch(model, attention=False)
    assert type(model[1]) is pyext.nn.RMSNorm and type(model[2]) is pyext.nn.UnweightedRMSNorm
    during = model[1].register_forward_pre_hook(lambda module, args: calls.append("during"))
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    for m in (model, unpatched):
        m.load_state_dict(state, assign=True)
        m.to(torch.float64).eval()
    x = torch.randn(3, 8, dtype=torch.float64)
    model(x)
    assert calls == ["during", "before"]
    pyext.unpatch(model)
    assert [type(m) for m in model] == [torch.nn.Linear, llama_norm, weightless]
    assert not any(m.training for m in model.modules())
    assert model[1].weight is model.state_dict(keep_vars=True)["1.weight"]
    assert model[2].weight.dtype == torch.float64 and torch.equal(model[2].weight, unpatched[2].weight)
    calls.clear()
    torch.testing.assert_close(model(x), unpatched(x), rtol=0, atol=0)
    assert calls == ["during", "before"]
    during.remove()
    before.remove()
    model(x)
    assert calls == ["during", "before"]


def test_unpatch_puts_an_hf_norm_back_in_every_place_that_holds_its_replacement():
    """One HF norm held in two places becomes one pyext module in both;
    unpatch puts the HF norm back wherever pyext's module is then, inside
    a wrapper added while patched (PEFT's LN tuning wraps norms so) too."""
    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) + 1
    norm = hf_class("llama", "LlamaRMSNorm")(8)
    model = pyext.patch(torch.nn.Sequential(norm, torch.nn.Linear(8, 8), norm), attention=False)
    assert model[0] is model[2] and type(model[0]) is pyext.nn.RMSNorm
    model[2] = Wrapper(model[2])
    pyext.unpatch(model)
    assert model[0] is norm and model[2].inner is norm


def test_unpatch_keeps_a_parametrization_of_a_replaced_hf_norm():
    """A parametrization registered on pyext's module standing for an HF
    norm stays on the HF norm unpatch puts back (its class derived from the
    HF one), computing as the same parametrization of an unpatched norm."""
    import torch.nn.utils.parametrize as parametrize
    llama_norm = hf_class("llama", "LlamaRMSNorm")
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), llama_norm(8))
    unpatched = copy.deepcopy(model)
    parametrize.register_parametrization(unpatched[1], "weight", Doubled())
    pyext.patch(model, attention=False)
    parametrize.register_parametrization(model[1], "weight", Doubled())
    x = torch.randn(3, 8)
    pyext.unpatch(model)
    assert type(model[1]).__name__ == "ParametrizedLlamaRMSNorm"
    assert parametrize.type_before_parametrizations(model[1]) is llama_norm
    assert model.state_dict().keys() == unpatched.state_dict().keys()
    torch.testing.assert_close(model(x), unpatched(x), rtol=0, atol=0)
    parametrize.remove_parametrizations(model[1], "weight")
    assert type(model[1]) is llama_norm


class Doubled(torch.nn.Module):  # a parametrization: the weight used is twice the one stored
    def forward(self, weight):
        return 2 * weight


def test_modules_whose_forward_is_set_on_the_instance_are_left_saying_why():
    """accelerate's hooks (a model loaded with device_map over several
    devices) set a forward on each module instance, which calls the
    module's own code: such a module, torch's or transformers', is left as
    it is, the report saying why, rather than reported swapped and not run."""
    torch_norm, hf_norm = torch.nn.LayerNorm(8), hf_class("llama", "LlamaRMSNorm")(8)
    for m in (torch_norm, hf_norm):
        m.forward = m.forward
    model = pyext.patch(torch.nn.Sequential(torch_norm, hf_norm, torch.nn.LayerNorm(8)), attention=False)
    why = "a forward set on the instance, which pyext's module would not run"
    assert pyext.patch_report(model).left == [("0", "LayerNorm", why), ("1", "LlamaRMSNorm", why)]
    assert type(model[0]) is torch.nn.LayerNorm and model[1] is hf_norm and type(model[2]) is pyext.nn.LayerNorm


def test_gemma_rms_norm_state_dict_loads_both_ways():
    """pyext.nn.GemmaRMSNorm, built on its own, and transformers' GemmaRMSNorm: one state_dict."""
    theirs = hf_class("gemma", "GemmaRMSNorm")(96)
    ours = pyext.nn.GemmaRMSNorm(96)
    with torch.no_grad():
        theirs.weight.normal_(0, 0.5)
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.weight, theirs.weight)
    with torch.no_grad():
        ours.weight.normal_(0, 0.5)
    theirs.load_state_dict(ours.state_dict())
    assert torch.equal(ours.weight, theirs.weight)


# Each against pyext's tanh GELU in float64, y and dy/dx, within what the constants it writes allow: exact
# in New and Accurate; sqrt(2 / pi) to 10 digits in Fast (3e-12 off: up to 1.1e-12 apart over 40,000 draws);
# BLOOM's to 8 and 10 digits (0.79788456, 1e-10 off; its backward's 3 * 0.044715 * sqrt(2 / pi) as
# 0.1070322243): up to 3e-10 apart
@pytest.mark.parametrize("name,rtol,atol", [("FastGELUActivation", 1e-10, 1e-11),
                                            ("AccurateGELUActivation", 1e-10, 1e-12),
                                            ("NewGELUActivation", 1e-10, 1e-12), ("BloomGelu", 1e-7, 2e-9)])
def test_hf_tanh_gelu_classes_become_pyext_tanh_gelu(name, rtol, atol):
    pytest.importorskip("transformers")
    from transformers import activations
    cls = hf_class("bloom", name) if name == "BloomGelu" else getattr(activations, name)
    model = torch.nn.ModuleDict({"act": cls()})
    x = torch.randn(4, 33, dtype=torch.float64, requires_grad=True)
    expected = model["act"](x)
    expected_grad, = torch.autograd.grad(expected.sum(), x)
    pyext.patch(model, attention=False, backend="torch")
    assert type(model["act"]) is pyext.nn.GELU and model["act"].approximate == "tanh"
    out = model["act"](x)
    torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), x)[0], expected_grad, rtol=rtol, atol=atol)


def test_an_hf_norm_patched_as_the_model_itself_is_left_saying_why():
    """patch replaces an HF module in the places of the model that hold it;
    the model itself has none (pyext.nn's modules stand for one directly)."""
    norm = hf_class("llama", "LlamaRMSNorm")(8)
    assert pyext.patch_report(pyext.patch(norm, attention=False)).left == [("", "LlamaRMSNorm", "the model itself")]
    assert type(pyext.unpatch(norm)) is hf_class("llama", "LlamaRMSNorm")
