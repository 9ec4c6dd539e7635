"""pyext.patch / pyext.unpatch on models users already have: whole models
against their originals, state and parameters, where attention and function
calls go, the report, compile and export. HF models' attention and modules:
test_patch_hf_attention.py and test_patch_hf_modules.py."""
import copy
import functools
import gc
import io
import sys
import textwrap
import types
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.nn.functional import scaled_dot_product_attention as sdpa_by_another_name
from torch.utils._python_dispatch import TorchDispatchMode

import pyext
from conftest import BACKENDS, assert_close, device_for
from patch_models import KINDS, build, check_all, decorate_forward, encoder, loss_of, nano_gpt, output_and_grads


def check_patched(kind, backend, dtype, autocast):
    """The patched model's loss and gradients against the float64 oracle, with
    the unpatched model run the same way as torch's own error."""
    device = device_for(backend)
    original = build(kind).to(device)
    # the CUDA attention kernels are issue 5's: until they are built, cuda patches the rest
    attention = backend != "cuda" or "cuda" in pyext.ops.attention_ops.FWD
    patched = pyext.patch(copy.deepcopy(original), attention=attention, backend=backend)
    assert pyext.patch_report(patched).swapped, str(pyext.patch_report(patched))
    ref = output_and_grads(copy.deepcopy(original), kind, device, torch.float64, autocast=False)
    pt = output_and_grads(original, kind, device, dtype, autocast)
    out = output_and_grads(patched, kind, device, dtype, autocast)
    names = ["output"] + [n for n, p in original.named_parameters() if p.requires_grad]
    check_all(names, out, ref, pt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_patched_model_matches_the_original(kind, backend):
    # bfloat16, as models train: the attention kernels take half types only
    check_patched(kind, backend, torch.bfloat16, autocast=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_patched_model_matches_the_original_under_autocast(kind, backend):
    """float32 parameters in a bf16 autocast region, the other way models
    train: every loss and gradient in the unpatched model's dtype, as close."""
    check_patched(kind, backend, torch.float32, autocast=True)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_and_parameters_are_untouched(kind):
    model = build(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    pyext.patch(model, backend="torch")
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(a is b for a, b in zip(model.parameters(), params))
    loss_of(model, kind, "cpu", torch.float32).backward()
    opt.step()  # the optimizer built before the patch updates the model's tensors
    assert any(not torch.equal(model.state_dict()[k], before[k]) for k in before)


ATTENTION_LAYERS = {"nanogpt": 1, "encoder": 2, "gpt2": 1, "llama": 1, "qwen2": 1, "bert": 1, "deepseek_v3": 1,
                    "gemma2": 2, "gemma3": 2, "qwen3_next": 1, "falcon": 1}


@pytest.fixture
def pyext_sdpa_calls(monkeypatch):
    """One entry per call of pyext.scaled_dot_product_attention (or of what it
    calls, with a soft cap, as pyext.patch's routing does)."""
    import pyext.ops.attention as attention
    calls, real = [], attention._scaled_dot_product_attention
    monkeypatch.setattr(attention, "_scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("kind", KINDS)
def test_attention_goes_through_pyext_until_unpatched(kind, pyext_sdpa_calls):
    """Every attention layer of a patched model calls pyext's SDPA once per
    forward (HF models through the "pyext-torch" attention implementation), patched
    twice as well; unpatched, none does and the loss is the original's."""
    model = build(kind).train()
    expected = loss_of(model, kind, "cpu", torch.float32)
    assert pyext_sdpa_calls == []
    pyext.patch(pyext.patch(model, backend="torch"), backend="torch")
    if kind in ("gpt2", "llama", "qwen2", "bert", "deepseek_v3", "gemma2", "gemma3", "qwen3_next"):
        assert model.config._attn_implementation == "pyext-torch"
    loss_of(model, kind, "cpu", torch.float32)
    assert len(pyext_sdpa_calls) == ATTENTION_LAYERS[kind]
    pyext.unpatch(model)
    pyext_sdpa_calls.clear()
    assert torch.equal(loss_of(model, kind, "cpu", torch.float32), expected)
    assert pyext_sdpa_calls == []


@pytest.mark.parametrize("kind", KINDS)
def test_unpatch_restores_classes_and_forward(kind):
    model = build(kind)
    classes = {n: type(m) for n, m in model.named_modules()}
    pyext.patch(model, backend="torch")
    pyext.patch(model, backend="torch")  # twice is harmless
    assert any(type(m).__module__.startswith("pyext") for m in model.modules())
    pyext.unpatch(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert "forward" not in model.__dict__
    assert not [n for n, m in model.named_modules() if "__prepare_scriptable__" in m.__dict__]


class Doubled(torch.nn.Module):  # a parametrization: the weight used is twice the one stored
    def forward(self, weight):
        return 2 * weight


def test_unpatch_keeps_a_parametrization_registered_after_the_patch():
    """torch's parametrize gives a module a class of its own, derived on the
    spot from the module's class, pyext's after a patch: unpatch rebuilds
    that class on torch's, so the parametrization stays and the module
    computes as the same parametrization on an unpatched model."""
    import torch.nn.utils.parametrize as parametrize
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    unpatched = copy.deepcopy(model)
    parametrize.register_parametrization(unpatched[1], "weight", Doubled())
    pyext.patch(model, backend="torch")
    parametrize.register_parametrization(model[1], "weight", Doubled())
    x = torch.randn(3, 8)
    torch.testing.assert_close(model(x), unpatched(x), rtol=0, atol=0)
    pyext.unpatch(model)
    assert type(model[1]).__name__ == "ParametrizedLayerNorm" and parametrize.is_parametrized(model[1], "weight")
    assert parametrize.type_before_parametrizations(model[1]) is torch.nn.LayerNorm
    torch.testing.assert_close(model(x), unpatched(x), rtol=0, atol=0)
    parametrize.remove_parametrizations(model[1], "weight")
    assert type(model[1]) is torch.nn.LayerNorm


@pytest.mark.parametrize("how", ["register_parametrization", "weight_norm"])
def test_a_norm_parametrized_before_the_patch_is_swapped_keeping_it(how):
    """A norm whose weight torch's parametrize reparametrized before the
    patch (its class Parametrized<name>, derived from torch's) is swapped,
    the parametrization kept, and computes as the unpatched one; unpatch
    gives it back on torch's class. (It was left unreported, torch's kernel
    running under a named backend, and weight_norm's _WeightNorm listed as
    a norm left.)"""
    import torch.nn.utils.parametrize as parametrize
    from torch.nn.utils.parametrizations import weight_norm
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.RMSNorm(8))
    for norm in model[1:]:
        if how == "weight_norm":
            weight_norm(norm, "weight", dim=None)
        else:
            parametrize.register_parametrization(norm, "weight", Doubled())
    unpatched, x = copy.deepcopy(model), torch.randn(3, 8)
    pyext.patch(model, backend="torch")
    report = pyext.patch_report(model)
    assert [(path, new) for path, _, new in report.swapped] == [("1", "pyext.nn.LayerNorm"), ("2", "pyext.nn.RMSNorm")]
    assert report.left == []
    assert isinstance(model[1], pyext.nn.LayerNorm) and isinstance(model[2], pyext.nn.RMSNorm)
    assert all(parametrize.is_parametrized(norm, "weight") for norm in model[1:])
    torch.testing.assert_close(model(x), unpatched(x), rtol=0, atol=0)
    pyext.unpatch(model)
    assert [parametrize.type_before_parametrizations(norm) for norm in model[1:]] == \
        [torch.nn.LayerNorm, torch.nn.RMSNorm]
    torch.testing.assert_close(model(x), unpatched(x), rtol=0, atol=0)


@pytest.mark.parametrize("how", ["register_parametrization", "weight_norm"])
def test_patch_and_unpatch_over_and_over_give_a_parametrized_norm_its_own_class_back(how):
    """unpatch gives a norm parametrized before the patch the class object
    it had (torch's Parametrized<name>), not one rebuilt on torch's class,
    a deep copy made while patched or not, so patching and unpatching over
    and over keeps no class per cycle (two a cycle were kept for good: 2000
    after 1000 cycles). A parametrization of another tensor while patched
    is kept by unpatch as before."""
    import torch.nn.utils.parametrize as parametrize
    from torch.nn.utils.parametrizations import weight_norm

    def built():  # (not a deep copy, whose norm would share the class parametrize made)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
        if how == "weight_norm":
            weight_norm(model[1], "weight", dim=None)
        else:
            parametrize.register_parametrization(model[1], "weight", Doubled())
        return model
    model, unpatched, x = built(), built(), torch.randn(3, 8)
    original = type(model[1])

    def classes():  # those alive that derive from torch's LayerNorm or pyext's
        gc.collect()
        return {*torch.nn.LayerNorm.__subclasses__(), *pyext.nn.LayerNorm.__subclasses__()}
    pyext.unpatch(pyext.patch(model, backend="torch"))
    assert type(model[1]) is original
    before = classes()
    for _ in range(20):
        copy.deepcopy(pyext.patch(model, backend="torch"))
        pyext.unpatch(model)
    assert type(model[1]) is original and classes() == before
    torch.testing.assert_close(model(x), unpatched(x), rtol=0, atol=0)
    pyext.patch(model, backend="torch")
    parametrize.register_parametrization(model[1], "bias", Doubled())
    parametrize.register_parametrization(unpatched[1], "bias", Doubled())
    pyext.unpatch(model)
    assert parametrize.is_parametrized(model[1], "bias") and isinstance(model[1], original.__bases__[0])
    torch.testing.assert_close(model(x), unpatched(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["nanogpt", "gpt2"])
def test_a_copy_of_a_patched_model_computes_with_its_own_weights(kind, pyext_sdpa_calls):
    """copy.deepcopy and torch.save / torch.load of a whole patched model: the
    copy runs its own parameters, still through pyext (EMA models, evaluation
    copies and checkpoints of whole models are made this way)."""
    import io
    model = pyext.patch(build(kind), backend="torch")
    for copied in (copy.deepcopy(model), _saved_and_loaded(model, io.BytesIO())):
        with torch.no_grad():
            for p in copied.parameters():
                p.mul_(0.5)
        pyext_sdpa_calls.clear()
        assert not torch.equal(loss_of(copied, kind, "cpu", torch.float32), loss_of(model, kind, "cpu", torch.float32))
        assert len(pyext_sdpa_calls) == 2 * ATTENTION_LAYERS[kind]
        halved = pyext.unpatch(copy.deepcopy(copied))
        assert torch.equal(loss_of(copied, kind, "cpu", torch.float32), loss_of(halved, kind, "cpu", torch.float32))


def _saved_and_loaded(model, buffer):
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("kind", ["nanogpt", "encoder", "gpt2"])
def test_a_deleted_patched_model_is_freed_at_once_as_an_unpatched_one_is(kind):
    """A patched model's forward (and its blocks', and a TransformerEncoder's
    in a routed model) is a wrapper the module holds, which holds the module
    weakly: deleted, a patched model (its weights and gradients) is freed by
    reference counting, as an unpatched one is, not kept until the cycle
    collector runs (a 64 MiB weight stayed). Its deep copy, whose wrappers
    hold the copy, runs on after the model is gone."""
    def built():  # the encoder in a model whose code names F.gelu, so routed
        return torch.nn.Sequential(encoder(), GELUFunction()) if kind == "encoder" else build(kind)
    collecting = gc.isenabled()
    gc.disable()
    try:
        for patched in (False, True):
            model = pyext.patch(built(), backend="torch") if patched else built()
            loss_of(model, kind, "cpu", torch.float32).backward()
            copied, weight = copy.deepcopy(model), weakref.ref(next(model.parameters()))
            with torch.no_grad():
                expected = loss_of(copied, kind, "cpu", torch.float32)
                del model
                assert weight() is None, f"patched={patched}"
                torch.testing.assert_close(loss_of(copied, kind, "cpu", torch.float32), expected, rtol=0, atol=0)
            weight = weakref.ref(next(copied.parameters()))
            del copied
            assert weight() is None, f"patched={patched}, its copy"
    finally:
        if collecting:
            gc.enable()


def test_models_patched_with_different_backends_keep_their_own(monkeypatch):
    """The attention routing of each patched model uses that model's backend,
    HF models (one global registry of attention implementations) included."""
    import pyext.ops.attention as attention
    seen, real = [], attention._scaled_dot_product_attention
    monkeypatch.setattr(attention, "_scaled_dot_product_attention",
                        lambda *a, backend=None, **k: seen.append(backend) or real(*a, backend=backend, **k))
    for kind in ("nanogpt", "gpt2"):
        first, second = pyext.patch(build(kind), backend="torch"), pyext.patch(build(kind), backend="auto")
        seen.clear()
        loss_of(first, kind, "cpu", torch.float32)
        loss_of(second, kind, "cpu", torch.float32)
        assert seen == ["torch"] * ATTENTION_LAYERS[kind] + ["auto"] * ATTENTION_LAYERS[kind], kind


def test_unpatch_keeps_an_instance_forward_set_before_the_patch(pyext_sdpa_calls):
    model = nano_gpt()
    block, outer = model.blocks[0], []
    wrapped = block.forward

    def forward(*args, **kwargs):  # as a wrapper library sets one on the instance
        outer.append(1)
        return wrapped(*args, **kwargs)
    block.forward = forward
    pyext.patch(model, backend="torch")
    loss_of(model, "nanogpt", "cpu", torch.float32)
    assert outer == [1] and len(pyext_sdpa_calls) == 1
    pyext.unpatch(model)
    assert block.forward is forward


def test_checkpointed_blocks_recompute_through_pyext(pyext_sdpa_calls):
    """torch.utils.checkpoint recomputes a block in the backward, outside the
    model's forward: the routing is on the modules that call SDPA, so the
    recomputation takes the same kernel (torch's would save other tensors,
    which checkpoint refuses) and gives the same gradients."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, idx, targets):
            m = self.model
            x = m.tok(idx) + m.pos(torch.arange(idx.shape[1], device=idx.device))
            for block in m.blocks:
                x = checkpoint(block, x, use_reentrant=False)
            return F.cross_entropy(m.head(m.ln_f(x)).float().flatten(0, 1), targets.flatten())
    device = device_for("triton")
    model = nano_gpt().to(device)
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1)).to(device)
    grads = []
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # the attention backward's dQ without atomics
    try:
        for run in (model, Checkpointed(model)):
            pyext.patch(run, backend="triton")
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = run(idx, idx)
            grads.append(torch.autograd.grad(loss, list(model.parameters())))
            pyext.unpatch(run)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert len(pyext_sdpa_calls) == 3  # the forward twice, and the recomputation
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain)


def attend(q, k, v):  # a helper in the model's file that the attention module calls
    return F.scaled_dot_product_attention(q, k, v)


def _attention_dispatch_module():
    """A module of code as diffusers' attention_dispatch: its dispatcher picks
    the attention function from a table, so no name in the caller's code or
    the dispatcher's is the one that calls SDPA."""
    module = types.ModuleType("attention_dispatch_of_a_library")
    exec(textwrap.dedent("""
        import torch.nn.functional as F

        def _native_attention(q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

        BACKENDS = {"native": _native_attention}

        def dispatch_attention(q, k, v, backend="native"):
            return BACKENDS[backend](q, k, v)
    """), vars(module))
    sys.modules[module.__name__] = module
    return module


dispatch_attention = _attention_dispatch_module().dispatch_attention


class AttentionProcessor:  # not a module; as diffusers' AttnProcessor2_0, the attention's forward calls it
    def __call__(self, attn, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


class AttentionProcessorModule(torch.nn.Module):  # diffusers' processors that hold weights: a __call__ of their own
    def __call__(self, attn, q, k, v):
        return sdpa_by_another_name(q, k, v)


class AttentionCallingOut(torch.nn.Module):
    """Self-attention whose SDPA call is made elsewhere than in its forward's
    code: by what `call_attention` of a class below calls, each its own
    code, so that each way of making the call is what patch has to find."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = self.qkv(x).view(*x.shape[:2], 3, 2, 8).permute(2, 0, 3, 1, 4)
        return self.call_attention(q, k, v).transpose(1, 2).flatten(2)


class ByProcessor(AttentionCallingOut):
    def __init__(self, processor=AttentionProcessor):
        super().__init__()
        self.processor = processor()

    def call_attention(self, q, k, v):
        return self.processor(self, q, k, v)


class ByProcessorModule(ByProcessor):
    def __init__(self):
        super().__init__(AttentionProcessorModule)


class ByHelper(AttentionCallingOut):
    def call_attention(self, q, k, v):
        return attend(q, k, v)


class ByAnotherName(AttentionCallingOut):
    def call_attention(self, q, k, v):
        return sdpa_by_another_name(q, k, v)


class ByHeldFunction(AttentionCallingOut):
    def __init__(self):
        super().__init__()
        self.attention_function = attend

    def call_attention(self, q, k, v):
        return self.attention_function(q, k, v)


class ByDispatcher(AttentionCallingOut):
    def call_attention(self, q, k, v):
        return dispatch_attention(q, k, v)


class LibraryAttention(torch.nn.Module):
    """Its code in a library whose name starts with "torch" (torchvision's, torchtune's)."""
    __module__ = "torchtune.modules.attention"

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = self.qkv(x).view(*x.shape[:2], 3, 2, 8).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


@pytest.mark.parametrize("how", ["processor", "processor module", "helper", "another name", "held function",
                                 "dispatched", "another library"])
def test_a_checkpointed_block_recomputes_attention_called_outside_its_forward_through_pyext(how, pyext_sdpa_calls):
    """A module whose forward has SDPA called by an object it holds (diffusers'
    attention processors), a helper function, a function held as an
    attribute, F's function imported under another name, or a function
    another module's dispatcher picks from a table (diffusers' attention
    dispatch: Flux, Wan, HunyuanVideo), or whose code is
    another library's: a block of them that torch.utils.checkpoint
    recomputes in the backward calls pyext again, as its forward did
    (torch's SDPA would save other tensors, which checkpoint refuses with
    the Triton kernels)."""
    attention = {"processor": ByProcessor, "processor module": ByProcessorModule, "helper": ByHelper,
                 "another name": ByAnotherName, "held function": ByHeldFunction, "dispatched": ByDispatcher,
                 "another library": LibraryAttention}[how]

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([attention(), attention()])

        def forward(self, x):
            for block in self.blocks:
                x = x + torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            return x
    torch.manual_seed(0)
    model, x = Model(), torch.randn(2, 5, 16)
    expected = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
    pyext.patch(model, backend="torch")
    got = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
    assert len(pyext_sdpa_calls) == 4  # each block's forward and its recomputation
    assert {"blocks.0", "blocks.1"} <= set(pyext.patch_report(model).attention.split(": ")[-1].split(", "))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_an_attribute_named_like_a_function_is_not_a_call_of_it():
    """A module that reads a flag `self.layer_norm` (diffusers' PatchEmbed)
    makes no F.layer_norm call: patch neither routes its forward nor reports
    the function routed."""
    class PatchEmbed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer_norm, self.gelu, self.proj = False, True, torch.nn.Linear(4, 4)

        def forward(self, x):
            x = self.proj(x)
            return F.gelu(x) if self.gelu and not self.layer_norm else x
    model = pyext.patch(torch.nn.Sequential(PatchEmbed()), attention=False)
    assert pyext.patch_report(model).functions == ["F.gelu"]
    assert "forward" in model[0].__dict__
    model = pyext.patch(torch.nn.Sequential(PatchEmbed()), attention=False, gelu=False)
    assert pyext.patch_report(model).functions == [] and "forward" not in model[0].__dict__


def test_a_held_function_that_unwraps_to_itself_is_not_read():
    """patch reads the code of functions a module holds through their
    decorators (__wrapped__); one whose __wrapped__ is itself has none to
    read, and the patch goes on."""
    def looping(x):
        return x
    looping.__wrapped__ = looping
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    model[0].hook = looping
    pyext.patch(model, backend="torch")
    assert model(torch.ones(1, 2)).shape == (1, 2)


def test_a_module_patched_on_its_own_is_patched_anew_with_the_model_holding_it(pyext_sdpa_calls):
    """patch(block) then patch(model holding it): the model's patch takes the
    block over (its backend, its report); unpatch of the model undoes both.
    patch or unpatch of a block inside a patched model is refused, saying
    what to do (unpatch did nothing, saying nothing)."""
    model = nano_gpt()
    block = model.blocks[0]
    pyext.patch(block, backend="triton")
    pyext.patch(model, backend="torch")
    assert not hasattr(block, "_pyext_patched") and block.ln_1.backend == "torch"
    assert "blocks.0.ln_1" in [path for path, _, _ in pyext.patch_report(model).swapped]
    loss_of(model, "nanogpt", "cpu", torch.float32)  # torch's backend: float32 runs
    for change in (functools.partial(pyext.patch, backend="triton"), pyext.unpatch):
        with pytest.raises(ValueError, match="was patched as part of a model holding it: pyext.unpatch that model"):
            change(block)
    pyext.unpatch(model)
    assert type(block.ln_1) is torch.nn.LayerNorm and "forward" not in block.__dict__


def test_the_report_lists_norm_like_leaves_and_no_other_layers_named_so():
    """Leaf modules named like a norm that patch does not swap are listed
    as left; a torch layer of another kind named so (torchtune's
    GemmaNormEmbeddings, an Embedding) is not. The attention line says when
    the model's code names no SDPA call."""
    class ScaledNormEmbeddings(torch.nn.Embedding):
        pass
    model = torch.nn.Sequential(ScaledNormEmbeddings(4, 8), torch.nn.GroupNorm(2, 8))
    report = pyext.patch_report(pyext.patch(model))
    assert [(path, why) for path, _, why in report.left] == [("1", "no pyext equivalent")]
    assert report.attention == "not routed: no code of the model names F.scaled_dot_product_attention"
    assert "nothing to swap" in str(report)
    calls_gelu = torch.nn.Sequential(torch.nn.Linear(8, 8), GELUFunction())
    assert pyext.patch_report(pyext.patch(calls_gelu)).attention.endswith("(its code names none)")
    assert not pyext.patch_report(pyext.patch(nano_gpt())).attention.endswith("(its code names none)")


class GELUFunction(torch.nn.Module):
    def forward(self, x):
        return F.gelu(x)


def test_a_model_whose_code_names_no_routed_function_runs_outside_the_routing_mode():
    """The routing mode costs each torch call of the forward it is entered
    by: a model whose code calls none of the functions patch routes (LeViT:
    BatchNorm, its own attention) runs its forward as it was; one whose code
    calls one runs in the mode, SDPA calls included."""
    from pyext.patch.routing import _RouteCalls

    class RecordsTheMode(torch.nn.Module):
        def forward(self, x):
            self.mode = torch.overrides._get_current_function_mode()
            return x

    plain = pyext.patch(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), RecordsTheMode()))
    calling = pyext.patch(torch.nn.Sequential(torch.nn.Linear(8, 8), GELUFunction(), RecordsTheMode()))
    for model, routed in ((plain, False), (calling, True)):
        model(torch.randn(2, 8))
        assert isinstance(model[2].mode, _RouteCalls) is routed
        assert ("forward" in model.__dict__) is routed


def test_routed_modules_inside_a_routed_model_share_its_one_mode():
    """The routing mode costs each torch call made inside it, once for each
    mode on torch's stack: a routed module inside a routed model runs in the
    model's mode rather than one more; called alone, it enters its own."""
    from pyext.patch.routing import _RouteCalls

    class Block(torch.nn.Module):
        def forward(self, x):
            self.modes = [m for m in torch.overrides._get_current_function_mode_stack() if isinstance(m, _RouteCalls)]
            return F.gelu(x)

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x):
            return F.gelu(self.block(x))

    model = pyext.patch(Outer(), backend="torch")
    assert "forward" in model.__dict__ and "forward" in model.block.__dict__  # both routed
    model(torch.randn(2, 8))
    assert len(model.block.modes) == 1
    model.block(torch.randn(2, 8))
    assert len(model.block.modes) == 1


def test_flags_leave_modules_alone():
    model = nano_gpt()
    pyext.patch(model, layer_norm=False, backend="torch")
    assert all(type(m) is torch.nn.LayerNorm for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    assert any(path.endswith("ln_1") and why == "layer_norm=False"
               for path, _, why in pyext.patch_report(model).left)


def test_attention_routing_is_scoped_to_the_model(pyext_sdpa_calls):
    calls = pyext_sdpa_calls
    model = pyext.patch(nano_gpt(), backend="torch")
    loss_of(model, "nanogpt", "cpu", torch.float32)
    assert calls == [1]
    q = torch.randn(1, 2, 4, 8)
    F.scaled_dot_product_attention(q, q, q)  # outside the model: torch's own
    assert calls == [1]


def test_multihead_attention_goes_through_pyext(pyext_sdpa_calls):
    calls = pyext_sdpa_calls
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=False)
    x, memory = torch.randn(5, 3, 16), torch.randn(7, 3, 16)
    expected, _ = mha(x, x, x, need_weights=False)  # self-attention: one packed projection
    expected_cross, _ = mha(x, memory, memory, need_weights=False)  # three projections
    pyext.patch(mha, backend="torch")
    got, weights = mha(x, x, x, need_weights=False)
    assert calls == [1] and weights is None
    torch.testing.assert_close(got, expected)
    assert got.is_contiguous() == expected.is_contiguous()  # (L, B, E): code that views it as torch's works
    torch.testing.assert_close(mha(x, memory, memory, need_weights=False)[0], expected_cross)
    assert calls == [1, 1]
    mha(x, x, x, need_weights=True)  # weights asked for: torch's own path
    assert calls == [1, 1]


@pytest.mark.parametrize("built", ["patched", "pyext.nn"])
def test_multihead_attention_inference_under_auto_is_torchs_fast_path(built, pyext_sdpa_calls, monkeypatch):
    """In eval mode with no gradient to compute, under auto, MultiheadAttention
    is torch's own forward, which takes torch's inference fast path
    (torch._native_multi_head_attention; a patched model's routing mode would
    turn it off): the same bits as the unpatched module, as
    nn.TransformerEncoder keeps them. With gradients to compute, pyext's."""
    fast = []
    native = torch._native_multi_head_attention
    monkeypatch.setattr(torch, "_native_multi_head_attention", lambda *a, **k: fast.append(1) or native(*a, **k))
    torch.manual_seed(0)
    original = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()

    class Block(torch.nn.Module):
        def __init__(self, attn):
            super().__init__()
            self.attn = attn

        def forward(self, x, mask=None):
            return self.attn(x, x, x, need_weights=False, key_padding_mask=mask)[0]
    if built == "patched":
        model = pyext.patch(Block(copy.deepcopy(original)))
    else:
        model = Block(pyext.nn.MultiheadAttention(32, 4, batch_first=True).eval())
        model.attn.load_state_dict(original.state_dict())
    x, padding = torch.randn(2, 8, 32), torch.arange(8) >= torch.tensor([[8], [5]])
    with torch.no_grad():
        for mask in (None, padding):
            expected = Block(original)(x, mask)
            fast.clear()
            assert torch.equal(model(x, mask), expected) and fast == [1]
    assert pyext_sdpa_calls == []
    model(x).sum().backward()
    assert len(pyext_sdpa_calls) == 1


def test_multihead_attention_that_torchs_forward_runs_is_left_saying_why():
    """bias_k / bias_v, add_zero_attn and keys and values of their own sizes
    are torch's forward's: patch leaves such a module, saying so."""
    model = torch.nn.ModuleDict({"kdim": torch.nn.MultiheadAttention(16, 2, kdim=6, vdim=10),
                                 "bias_kv": torch.nn.MultiheadAttention(16, 2, add_bias_kv=True),
                                 "zero_attn": torch.nn.MultiheadAttention(16, 2, add_zero_attn=True),
                                 "plain": torch.nn.MultiheadAttention(16, 2)})
    report = pyext.patch_report(pyext.patch(model))
    assert [path for path, _, _ in report.swapped] == ["plain"]
    assert [(path, why.endswith("torch's forward runs it")) for path, _, why in report.left] == \
        [("kdim", True), ("bias_kv", True), ("zero_attn", True)]
    assert type(model["kdim"]) is torch.nn.MultiheadAttention


MHA_MASKS = ["key_padding", "key_padding_additive", "attn_2d", "attn_3d_additive", "attn_2d_and_key_padding",
             "causal_and_key_padding"]


def mha_masks(kind, batch, heads, length):
    """The mask arguments of a MultiheadAttention call of `kind`, torch's
    conventions (boolean True: not attended), additive ones in float64 with
    values that bfloat16 holds exactly (each run converts them to its dtype,
    so that the oracle sees the bf16 runs' masks). Keys padded to lengths
    `length`, 4 and 0 (a batch element all padding); a random boolean 2-D
    mask that leaves each row a key; a random additive 3-D one."""
    padding = torch.arange(length) >= torch.tensor([length, 4, 0])[:batch, None]
    hidden = (torch.rand(length, length) < 0.3).fill_diagonal_(False)
    bias = torch.randn(batch * heads, length, length).bfloat16().double()

    def additive(m):
        return torch.zeros(m.shape, dtype=torch.float64).masked_fill(m, float("-inf"))
    return {"key_padding": dict(key_padding_mask=padding),
            "key_padding_additive": dict(key_padding_mask=additive(padding)),
            "attn_2d": dict(attn_mask=hidden),
            "attn_3d_additive": dict(attn_mask=bias),
            "attn_2d_and_key_padding": dict(attn_mask=hidden, key_padding_mask=padding),
            # as nn.TransformerEncoder passes them: the causal mask as the hint, both additive
            "causal_and_key_padding": dict(attn_mask=torch.nn.Transformer.generate_square_subsequent_mask(
                length, dtype=torch.float64), is_causal=True, key_padding_mask=additive(padding))}[kind]


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", MHA_MASKS)
def test_multihead_attention_masks_go_through_pyext(kind, backend, batch_first, pyext_sdpa_calls):
    """key_padding_mask and attn_mask, boolean or additive, alone or
    together, go to pyext's SDPA as one mask (Triton's masked kernels with
    backend="triton"): outputs and the gradients of input and parameters as
    close to the float64 oracle as torch's own module in bfloat16, with the
    padded keys and the all-padding batch element given as torch gives them."""
    batch, heads, length, embed = 3, 4, 9, 32
    original = torch.nn.MultiheadAttention(embed, heads, batch_first=batch_first)
    patched = pyext.patch(copy.deepcopy(original), backend=backend)
    x = torch.randn((batch, length, embed) if batch_first else (length, batch, embed))
    masks = mha_masks(kind, batch, heads, length)  # drawn once: every run sees the same

    def out_and_grads(mha, dtype):
        mha = mha.to(device_for(backend), dtype)
        xd = x.to(device_for(backend), dtype).requires_grad_()
        given = {n: m.to(xd.device, dtype if m.is_floating_point() else m.dtype) for n, m in masks.items()
                 if isinstance(m, torch.Tensor)}
        out, _ = mha(xd, xd, xd, need_weights=False, is_causal=kind.startswith("causal"), **given)
        c = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out)
        return [out] + list(torch.autograd.grad(out, [xd] + list(mha.parameters()), c))
    ref = out_and_grads(copy.deepcopy(original), torch.float64)
    pt = out_and_grads(original, torch.bfloat16)
    got = out_and_grads(patched, torch.bfloat16)
    assert len(pyext_sdpa_calls) == 1
    names = ["out", "dx"] + [n for n, _ in original.named_parameters()]
    for name, o, r, p in zip(names, got, ref, pt):
        assert_close(o, r, p, name)


def test_multihead_attention_masks_torch_forward_takes(pyext_sdpa_calls):
    """Masks of two dtypes (torch's forward warns, and converts), of a shape
    torch's forward refuses, an integer mask, inputs of another embedding
    size, keys and values of two lengths are torch's forward's: its
    results, warnings and errors."""
    mha = pyext.patch(torch.nn.MultiheadAttention(16, 2, batch_first=True), backend="triton")
    x = torch.randn(2, 5, 16)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    with pytest.warns(UserWarning, match="mismatched key_padding_mask and attn_mask"):
        mha(x, x, x, need_weights=False, key_padding_mask=padding, attn_mask=torch.zeros(5, 5))
    with pytest.raises(RuntimeError, match="attn_mask"):
        mha(x, x, x, need_weights=False, attn_mask=torch.zeros(4, 5, dtype=torch.bool))
    with pytest.raises(AssertionError, match="only bool and floating types of key_padding_mask"):
        mha(x, x, x, need_weights=False, key_padding_mask=padding.int())
    with pytest.raises(AssertionError, match="key_padded_mask.shape"):
        mha(x, x, x, need_weights=False, key_padding_mask=padding[:, :4])
    with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint"):
        mha(x, x, x, need_weights=False, is_causal=True)
    with pytest.raises(AssertionError, match="was expecting embedding dimension of 16, but got 8"):
        mha(x[..., :8], x[..., :8], x[..., :8], need_weights=False)
    with pytest.raises(AssertionError, match="does not match value shape"):
        mha(x, x, x[:, :4], need_weights=False)
    assert pyext_sdpa_calls == []


def test_multihead_attention_built_directly_is_torchs_module_on_pyexts_attention(pyext_sdpa_calls):
    """pyext.nn.MultiheadAttention(...), made by hand rather than by patch:
    torch's constructor and state_dict, its calls through pyext's SDPA with
    the backend given."""
    ours = pyext.nn.MultiheadAttention(16, 2, batch_first=True, backend="torch")
    theirs = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    theirs.load_state_dict(ours.state_dict())
    assert isinstance(ours, torch.nn.MultiheadAttention) and ours.backend == "torch"
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(ours(x, x, x, need_weights=False)[0], theirs(x, x, x, need_weights=False)[0])
    assert len(pyext_sdpa_calls) == 1
    ours.backend = "cuda"  # the backend given is the one asked for: here, on the CPU, refused
    with pytest.raises(pyext.BackendUnavailable, match="'cuda'"):
        ours(x, x, x, need_weights=False)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_a_causal_transformer_encoder_goes_through_pyext(padded, pyext_sdpa_calls):
    """nn.TransformerEncoder given the causal mask (GPT-style models built from
    torch's layers) passes it with is_causal=True, which torch's attention
    takes as a hint to attend causally without the mask: so does pyext's,
    with the same outputs and gradients, one kernel call per layer. With a
    src_key_padding_mask too, both add up to one mask, in torch and in pyext."""
    model = encoder()
    x = torch.randn(2, 9, 32, requires_grad=True)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(9)
    padding = torch.zeros(2, 9).masked_fill(torch.arange(9) >= torch.tensor([[9], [5]]), float("-inf"))
    padding = padding if padded else None  # additive, as the causal mask: torch warns of mixed types

    def out_and_grads():
        out = model(x, mask=mask, is_causal=True, src_key_padding_mask=padding)
        return [out] + list(torch.autograd.grad(out.square().sum(), [x] + list(model.parameters())))
    expected = out_and_grads()
    pyext.patch(model, backend="torch")
    for got, want in zip(out_and_grads(), expected):
        torch.testing.assert_close(got, want)
    assert len(pyext_sdpa_calls) == 2


@pytest.mark.parametrize("wrapped", [False, True], ids=["encoder", "inside-a-model"])
def test_a_transformer_encoder_in_eval_keeps_torchs_fast_path(wrapped, pyext_sdpa_calls):
    """nn.TransformerEncoder in eval mode under no_grad, given a padded
    batch: torch's inference fast path (nested tensors, zeros in the padded
    rows) runs as before the patch, the same output bit for bit, whether the
    encoder is the patched model or inside one whose forward is routed (its
    code calls F.gelu). With grad enabled torch takes its slow path, and its
    attention goes through pyext's, as before."""
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(
                32, 4, dim_feedforward=64, dropout=0.0, batch_first=True), num_layers=2)

        def forward(self, x, src_key_padding_mask):
            return F.gelu(self.encoder(x, src_key_padding_mask=src_key_padding_mask))
    torch.manual_seed(0)
    original = (Model() if wrapped else Model().encoder).eval()
    patched = pyext.patch(copy.deepcopy(original), backend="torch")
    x = torch.randn(2, 9, 32)
    padding = torch.arange(9) >= torch.tensor([[9], [5]])
    with torch.no_grad():
        expected, got = (m(x, src_key_padding_mask=padding) for m in (original, patched))
    assert torch.equal(got, expected) and not got[1, 5:].any() and pyext_sdpa_calls == []
    expected, got = (m(x, src_key_padding_mask=padding) for m in (original, patched))
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1, :5], expected[1, :5])
    assert len(pyext_sdpa_calls) == 2


def test_a_gelu_transformer_encoder_layer_in_eval_keeps_torchs_fused_layer():
    """An encoder layer with activation="gelu" names F.gelu, so its forward
    is routed; in eval under no_grad torch's one fused op for the layer
    (aten._transformer_encoder_layer_fwd) still runs as before the patch,
    bit for bit (the routing mode turned that fast path off: MHA's alone
    ran fused), and again after unpatch."""
    class FusedOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func))
            return func(*args, **(kwargs or {}))
    torch.manual_seed(0)
    encoder = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(
        16, 2, 32, batch_first=True, activation="gelu"), 1, enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 16)
    runs = []
    for step in (lambda: None, lambda: pyext.patch(encoder, backend="torch"), lambda: pyext.unpatch(encoder)):
        step()
        with torch.no_grad(), FusedOps() as seen:
            runs.append(encoder(x))
        assert "aten._transformer_encoder_layer_fwd.default" in seen.ops
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_the_gelu_function_of_a_transformer_layer_is_swapped_and_restored():
    """nn.TransformerEncoderLayer(activation="gelu") holds F.gelu itself, not a module."""
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, activation="gelu",
                                             batch_first=True)
    x = torch.randn(2, 9, 32)
    expected = layer(x)
    pyext.patch(layer, attention=False, backend="triton")  # float32: the attention kernels take half types
    assert ("activation", "F.gelu", "pyext.gelu") in pyext.patch_report(layer).swapped
    assert layer.activation.func is pyext.gelu and layer.activation.keywords == {"backend": "triton"}
    torch.testing.assert_close(layer(x), expected)
    pyext.unpatch(layer)
    assert layer.activation is F.gelu and torch.equal(layer(x), expected)
    pyext.patch(layer, gelu=False)
    assert ("activation", "F.gelu", "gelu=False") in pyext.patch_report(layer).left


class FunctionalLayerNorm(torch.nn.Module):
    """nanoGPT's own LayerNorm (a bias that may be off, which torch's once
    lacked): a module that is not torch's, calling F.layer_norm."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(ndim))
        self.bias = torch.nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input):
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


class FunctionalBlock(torch.nn.Module):
    """A transformer block written with torch's functions rather than its
    modules: F.layer_norm (through FunctionalLayerNorm), F.rms_norm,
    F.scaled_dot_product_attention and F.gelu, keyword arguments too."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.ln, self.qkv, self.proj = FunctionalLayerNorm(dim, bias=False), torch.nn.Linear(dim, 3 * dim), \
            torch.nn.Linear(dim, dim)
        self.rms_weight, self.up, self.down = torch.nn.Parameter(torch.ones(dim)), torch.nn.Linear(dim, 2 * dim), \
            torch.nn.Linear(2 * dim, dim)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d))
        h = F.rms_norm(x, normalized_shape=(d,), weight=self.rms_weight, eps=1e-6)
        return x + self.down(F.gelu(self.up(h), approximate="tanh"))


@pytest.fixture
def pyext_function_calls(monkeypatch):
    """The names of pyext.layer_norm, rms_norm and gelu as patch's routing calls them."""
    from pyext.patch import routing
    calls = []
    for flag, (fn, call) in list(routing._ROUTED_FUNCTIONS.items()):
        monkeypatch.setitem(routing._ROUTED_FUNCTIONS, flag,
                            (fn, lambda *a, _call=call, _flag=flag, **k: calls.append(_flag) or _call(*a, **k)))
    return calls


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_functions_a_model_calls_itself_go_to_pyext(backend, pyext_function_calls, pyext_sdpa_calls):
    """F.layer_norm, F.rms_norm, F.gelu and SDPA called in the model's own code
    (not torch's modules) go to pyext: loss and every gradient within the
    rule; the report says so, and a flag turned off leaves its function to torch."""
    torch.manual_seed(0)
    original = FunctionalBlock().to(device_for(backend))
    patched = pyext.patch(copy.deepcopy(original), backend=backend)
    report = pyext.patch_report(patched)
    assert report.functions == ["F.layer_norm", "F.rms_norm", "F.gelu"] and report.left == []
    x = torch.randn(2, 9, 32, device=device_for(backend))

    def loss_and_grads(model, dtype):
        model = model.to(dtype)
        xd = x.to(dtype).requires_grad_()
        loss = model(xd).square().mean()
        return [loss] + list(torch.autograd.grad(loss, [xd] + list(model.parameters())))
    ref = loss_and_grads(copy.deepcopy(original), torch.float64)
    pt = loss_and_grads(original, torch.bfloat16)
    assert pyext_function_calls == [] and pyext_sdpa_calls == []
    got = loss_and_grads(patched, torch.bfloat16)
    assert sorted(pyext_function_calls) == ["gelu", "layer_norm", "rms_norm"] and pyext_sdpa_calls == [1]
    for name, o, r, p in zip(["loss", "dx"] + [n for n, _ in original.named_parameters()], got, ref, pt):
        assert_close(o, r, p, name)
    pyext_function_calls.clear()
    pyext.patch(patched, layer_norm=False, gelu=False, backend=backend)
    assert pyext.patch_report(patched).functions == ["F.rms_norm"]
    patched(x.bfloat16())
    assert pyext_function_calls == ["rms_norm"]
    pyext.unpatch(patched)
    pyext_function_calls.clear()
    patched(x.bfloat16())
    assert pyext_function_calls == []


@pytest.mark.parametrize("decorated", [False, True], ids=["plain", "decorated"])
def test_a_checkpointed_block_recomputes_its_functions_through_pyext(decorated, pyext_function_calls, monkeypatch):
    """The module calling F.layer_norm is routed on its own too, so a block
    that torch.utils.checkpoint recomputes in the backward (outside the
    model's forward) calls pyext again, as its forward did; also when the
    block's forward is under a decorator (the code it wraps is read)."""
    if decorated:
        decorate_forward(FunctionalBlock, monkeypatch)
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = FunctionalBlock()

        def forward(self, x):
            return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)
    model = pyext.patch(Model(), backend="torch")
    model(torch.randn(2, 9, 32, requires_grad=True)).sum().backward()
    assert sorted(pyext_function_calls) == ["gelu", "gelu", "layer_norm", "layer_norm", "rms_norm", "rms_norm"]


def test_patch_refuses_what_is_not_a_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        pyext.patch("a model")


def test_the_report_of_a_model_never_patched_is_an_error_saying_so():
    with pytest.raises(ValueError, match="Sequential was never given to pyext.patch"):
        pyext.patch_report(torch.nn.Sequential())


def test_a_model_with_nothing_to_swap_says_so(capsys):
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
    pyext.patch(model, attention=False, verbose=True)
    assert "nothing to swap" in capsys.readouterr().out


def test_pyexts_own_modules_are_left_be_and_not_reported_as_unknown():
    """A model built with pyext.nn's modules already: patch neither swaps
    them nor lists them as norms it has no equivalent for; unpatch of a
    model never patched changes nothing."""
    model = torch.nn.Sequential(pyext.nn.LayerNorm(8), torch.nn.Linear(8, 8), pyext.nn.GELU())
    assert pyext.unpatch(model) is model and type(model[0]) is pyext.nn.LayerNorm
    report = pyext.patch_report(pyext.patch(model))
    assert [type(m) for m in model] == [pyext.nn.LayerNorm, torch.nn.Linear, pyext.nn.GELU]
    assert not [entry for entry in report.swapped + report.left if entry[0] in ("0", "2")]
    pyext.unpatch(model)
    assert [type(m) for m in model] == [pyext.nn.LayerNorm, torch.nn.Linear, pyext.nn.GELU]


def test_attention_dropout_and_masks_are_noted_in_the_report():
    """Attention dropout and masks are the Triton kernels' only, named: the
    report says which attention will run torch's SDPA under auto (in
    training, for dropout; with a padded batch or a MultiheadAttention
    mask, for masks), or raise under backend "cuda" (GPT-2's and BERT's HF
    defaults are 0.1); with backend "triton", nothing to note."""
    tf = pytest.importorskip("transformers")
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=32))
    notes = pyext.patch_report(pyext.patch(gpt2)).notes
    assert notes == ["attention dropout 0.1 (attn_pdrop in the config): in training its calls run torch's SDPA "
                     "(pyext's dropout is the Triton kernels', backend='triton')",
                     "attention with a mask (a padded batch's attention_mask, a sliding window): its calls run "
                     "torch's SDPA (pyext's masks are the Triton kernels', backend='triton')"]
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True)  # dropout=0.1
    notes = pyext.patch_report(pyext.patch(layer, backend="cuda")).notes
    assert notes == ["self_attn: dropout 0.1: in training its calls raise (the CUDA kernels have no dropout)",
                     "self_attn: calls with a key_padding_mask or an attn_mask (not the causal hint) raise (the "
                     "CUDA kernels have no mask)"]
    assert pyext.patch_report(pyext.patch(layer, backend="triton")).notes == []
    assert pyext.patch_report(pyext.patch(build("nanogpt"))).notes == []  # no dropout, no mask
    assert pyext.patch_report(pyext.patch(build("mistral"))).notes == [  # its windows need no mask unpadded
        "attention with a mask (a padded batch's attention_mask; sliding windows over an unpadded batch need "
        "none): its calls run torch's SDPA (pyext's masks are the Triton kernels', backend='triton')"]


def test_a_soft_cap_is_noted_in_the_report_with_where_its_calls_go():
    """Gemma 2's attention soft cap, which torch's SDPA lacks: under auto its
    calls run the Triton kernels, masked and dropped out too, so the report
    names that in place of the mask and dropout notes."""
    gemma2 = build("gemma2")
    where = "attention logit soft cap 2.0 (attn_logit_softcapping in the config): its calls "
    assert pyext.patch_report(pyext.patch(gemma2)).notes == [
        where + "run pyext's Triton kernels, with a mask or dropout too (torch's SDPA has no soft cap)"]
    assert pyext.patch_report(pyext.patch(gemma2, backend="cuda")).notes == [
        where + "raise (the CUDA kernels have no soft cap)"]
    assert pyext.patch_report(pyext.patch(gemma2, backend="torch")).notes == [
        where + "run pyext's reference, the S x S scores in float32 (torch's SDPA has no soft cap)"]
    assert pyext.patch_report(pyext.patch(gemma2, backend="triton")).notes == []


def test_patched_model_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) of a patched model: the routing of its
    attention and the swapped modules trace into one graph (aot_eager: the
    same kernels as eager, so the same loss and gradients)."""
    device = device_for("triton")
    model = pyext.patch(nano_gpt().to(device), backend="triton")
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1)).to(device)

    def loss_and_grads(run):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = run(idx, idx)
        return [loss] + list(torch.autograd.grad(loss, list(model.parameters())))
    torch._dynamo.reset()
    compiled = loss_and_grads(torch.compile(model, fullgraph=True, backend="aot_eager"))
    for got, want in zip(compiled, loss_and_grads(model)):
        torch.testing.assert_close(got, want)


class InGraphAttention(LibraryAttention):
    """Self-attention whose class torch.compile is told to trace whole, as
    diffusers marks its attention modules and blocks (maybe_allow_in_graph)."""


torch._dynamo.allow_in_graph(InGraphAttention)


def test_a_patched_module_that_torch_compile_traces_whole_breaks_no_graph():
    """A routed module whose class is torch._dynamo.allow_in_graph'd (diffusers'
    Attention, BasicTransformerBlock): the patched model compiles into one
    graph, as unpatched, with the same output and gradients."""
    model = torch.nn.Sequential(torch.nn.LayerNorm(16), InGraphAttention())
    x = torch.randn(2, 5, 16)
    pyext.patch(model, backend="torch")
    torch._dynamo.reset()
    assert torch._dynamo.explain(model)(x).graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got, want = (run(x) for run in (compiled, model))
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got.sum(), list(model.parameters())),
                    torch.autograd.grad(want.sum(), list(model.parameters()))):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("kind", ["llama", "mistral", "gemma2"])
def test_a_patched_hf_model_compiles_without_graph_breaks(kind):
    """The same for HF models: the attention function and its routing (the
    GQA view, Mistral's window with no mask, Gemma 2's cap) and the mask
    function trace into one graph, computing what eager computes."""
    device = device_for("triton")
    model = pyext.patch(build(kind).to(device, torch.bfloat16), backend="triton")
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1)).to(device)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(compiled, model(input_ids=ids, labels=ids).loss)


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_a_patched_model_exports_with_the_kernels_in_its_graph(strict):
    """torch.export of a patched model (the deployment path): the graph holds
    the kernels' ops and the exported program computes as the model does."""
    device = device_for("triton")
    model = pyext.patch(nano_gpt().to(device, torch.bfloat16).eval(), backend="triton")
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1)).to(device)
    program = torch.export.export(model, (idx, idx), strict=strict)
    ops = {str(node.target) for graph in program.graph_module.modules() if isinstance(graph, torch.fx.GraphModule)
           for node in graph.graph.nodes}  # strict export nests grad-mode regions in submodules
    for op in ("flash_attn_fwd_triton", "layer_norm_fwd_triton", "gelu_fwd_triton"):
        assert f"pyext.{op}.default" in ops, f"{op} is not in the exported graph"
    torch.testing.assert_close(program.module()(idx, idx), model(idx, idx), rtol=0, atol=0)


def test_a_patched_model_traces_with_torch_fx_into_pyexts_functions():
    """torch.fx.symbolic_trace of a patched model: its norm modules, GELU
    and routed SDPA calls become nodes calling pyext's functions, and the
    traced module computes what the model computes."""
    model = pyext.patch(nano_gpt(), backend="torch")
    traced = torch.fx.symbolic_trace(model)
    called = {n.target for n in traced.graph.nodes if n.op == "call_function"}
    assert {pyext.layer_norm, pyext.gelu, pyext.ops.attention._scaled_dot_product_attention} <= called, called
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(traced(idx, idx), model(idx, idx), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_a_traced_patched_model_records_the_kernels_ops_and_saves():
    """torch.jit.trace of a model patched with the Triton kernels: the trace
    records their ops (pyext::..._fwd_triton), not an autograd.Function,
    which torch.jit.save refused ("Could not export Python function call");
    saved and loaded, it computes what the model computes; a masked SDPA
    call and a packed batch's call too."""
    device = device_for("triton")
    model = pyext.patch(nano_gpt().to(device, torch.bfloat16).eval(), backend="triton")
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1)).to(device)
    q = torch.randn(2, 2, 9, 16, dtype=torch.bfloat16, device=device)
    mask = torch.rand(9, 9, device=device) > 0.3
    offsets = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)

    class Calls(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, idx, q):
            packed = q[0].transpose(0, 1)
            return (self.model(idx, idx),
                    pyext.scaled_dot_product_attention(q, q, q, attn_mask=mask, backend="triton"),
                    pyext.flash_attention_varlen(packed, packed, packed, offsets, offsets, 5, 5, backend="triton"))
    calls = Calls()
    traced = torch.jit.trace(calls, (idx, q), check_trace=False)
    recorded = {node.kind() for node in traced.inlined_graph.nodes()}
    assert {"pyext::flash_attn_fwd_triton", "pyext::layer_norm_fwd_triton", "pyext::gelu_fwd_triton",
            "pyext::flash_attn_masked_fwd_triton", "pyext::flash_attn_varlen_fwd_triton"} <= recorded
    assert "prim::PythonOp" not in recorded
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    for got, want in zip(torch.jit.load(buffer)(idx, q), calls(idx, q)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


class ScriptableAttention(torch.nn.Module):  # torch.jit.script compiles it as it is
    def forward(self, x):
        return F.scaled_dot_product_attention(x, x, x, is_causal=True)


PYEXT_MODULES = [pyext.nn.LayerNorm(8), pyext.nn.RMSNorm(8), pyext.nn.GELU(), pyext.nn.UnweightedRMSNorm(),
                 pyext.nn.GemmaRMSNorm(8), pyext.nn.RMSNormGated(8), pyext.nn.MultiheadAttention(8, 2),
                 pyext.nn.NemotronLayerNorm1P(8), pyext.nn.DebertaLayerNorm(8), pyext.nn.T5RMSNorm(8)]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("module", PYEXT_MODULES, ids=lambda m: type(m).__name__)
def test_torchscript_refuses_pyext_modules_with_a_way_out(module):
    """torch.jit.script (deprecated, still a deployment path) cannot compile
    the Python that chooses a backend: it says so and what to use instead,
    rather than failing inside TorchScript's compiler."""
    with pytest.raises(RuntimeError, match=f"torch.jit.script cannot compile pyext.nn.{type(module).__name__}: "
                                           ".*torch.export.*pyext.unpatch"):
        torch.jit.script(module)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("kind", ["routed", "encoder"])
def test_a_patched_model_refuses_torchscript_and_scripts_again_unpatched(kind):
    """A module whose forward pyext.patch wraps refuses too (a routed model;
    a TransformerEncoder in one, its eval forward set outside the routing),
    its copies as well; unpatched, it scripts and computes as before the
    patch."""
    model, x = ((ScriptableAttention(), torch.randn(2, 3, 5, 8)) if kind == "routed"
                else (torch.nn.Sequential(encoder(), GELUFunction()), torch.randn(2, 5, 32)))
    expected = model(x)
    pyext.patch(model, backend="torch")
    for patched in (model, copy.deepcopy(model), _saved_and_loaded(model, io.BytesIO())):
        wrapped = patched if kind == "routed" else patched[0]
        refused = f"torch.jit.script cannot compile a {type(wrapped).__name__} whose forward pyext.patch wraps"
        with pytest.raises(RuntimeError, match=refused):
            torch.jit.script(wrapped)
    torch.testing.assert_close(torch.jit.script(pyext.unpatch(model))(x), expected, rtol=0, atol=0)


def test_blocks_in_a_wrapper_class_are_routed_too():
    """FSDP2's fully_shard gives each sharded module a subclass of its own,
    defined in torch: the block's own forward under it still gets routed."""
    from benchmarks.train_gpt import Block
    model = torch.nn.Sequential(Block(32, 2))
    model[0].__class__ = type("FSDPBlock", (Block,), {"__module__": "torch.distributed.fsdp"})
    pyext.patch(model, backend="torch")
    assert pyext.patch_report(model).attention.endswith("recomputes them: 0")


def test_a_threads_call_of_torchs_sdpa_does_not_unroute_another_threads_model(pyext_sdpa_calls):
    """While one thread is inside torch's SDPA on pyext's behalf, a patched
    model running in another thread still routes its own calls."""
    import threading

    import pyext.ops.attention as attention
    from torch.overrides import TorchFunctionMode
    inside, release = threading.Event(), threading.Event()

    class HoldInsideSDPA(TorchFunctionMode):  # torch's modes are per thread: this one is the holder's
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.scaled_dot_product_attention:
                inside.set()
                release.wait(10)
            return func(*args, **(kwargs or {}))

    def hold():
        with HoldInsideSDPA():
            q = torch.randn(1, 2, 4, 8)
            attention.torch_sdpa(q, q, q)
    holder = threading.Thread(target=hold)
    holder.start()
    assert inside.wait(10)
    try:
        model = pyext.patch(nano_gpt(), backend="torch")
        loss_of(model, "nanogpt", "cpu", torch.float32)
    finally:
        release.set()
        holder.join()
    assert len(pyext_sdpa_calls) == 1


def test_attention_called_outside_its_modules_forward_is_routed(pyext_sdpa_calls):
    """A module whose SDPA call is made from another method, called by its
    parent: routed by the model's forward."""
    class Attention(torch.nn.Module):
        def attend(self, q):
            return F.scaled_dot_product_attention(q, q, q)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = Attention()

        def forward(self, q):
            return self.attention.attend(q)
    model = pyext.patch(Model(), backend="torch")
    model(torch.randn(1, 2, 4, 8))
    assert len(pyext_sdpa_calls) == 1
