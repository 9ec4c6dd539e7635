"""A patched model through torch's graph tools: torch.compile in one graph,
torch.export and torch.fx with the kernels' ops in the graph, torch.jit.trace
and save, and torch.jit.script's refusal with a way out."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F

import pyext
from conftest import device_for
from patch_models import GELUFunction, LibraryAttention, build, encoder, nano_gpt, saved_and_loaded


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
    for patched in (model, copy.deepcopy(model), saved_and_loaded(model, io.BytesIO())):
        wrapped = patched if kind == "routed" else patched[0]
        refused = f"torch.jit.script cannot compile a {type(wrapped).__name__} whose forward pyext.patch wraps"
        with pytest.raises(RuntimeError, match=refused):
            torch.jit.script(wrapped)
    torch.testing.assert_close(torch.jit.script(pyext.unpatch(model))(x), expected, rtol=0, atol=0)
