"""pyext.patch on torch's own attention modules: nn.MultiheadAttention (its
masks, its inference fast path, what it leaves to torch's forward) and
nn.TransformerEncoder / TransformerEncoderLayer (the causal hint, the eval
fast paths, the GELU function a layer holds)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import pyext
from conftest import assert_close, device_for
from patch_models import encoder


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
