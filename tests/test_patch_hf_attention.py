"""pyext.patch on HF transformers models' attention: padded batches, sliding windows, packed
documents, sinks, generation, and the models whose attention it leaves alone."""
import copy
import io
import itertools
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import pyext
from conftest import assert_close, device_for
from patch_models import build, check_all, decorate_forward


def sharp_hf_model(kind, device, layers=None):
    """build(kind) (with `layers` decoder layers) on `device`, its matrices
    drawn at std 0.3: HF's init (0.02) leaves attention near uniform, where
    a key seen or missed is within bf16 noise."""
    model = build(kind)
    if layers:
        config = copy.deepcopy(model.config)
        config.num_hidden_layers = layers
        model = type(model)(config)
    return sharpened(model.to(device))


def sharpened(model):
    """model with its matrices drawn at std 0.3 (see sharp_hf_model)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


def check_hf_training_step(original, patched, output, **batch):
    """output(model(**batch)) (the loss or the logits) and every parameter's
    gradient of the loss, patched in bf16, within the rule against the
    original in float64, with the original in bf16 as the yardstick."""
    def output_and_grads(model, dtype):
        model = model.to(dtype).train()
        result = model(**batch)
        return [output(result)] + list(torch.autograd.grad(result.loss, list(model.parameters()),
                                                            allow_unused=True))
    ref = output_and_grads(copy.deepcopy(original), torch.float64)
    pt = output_and_grads(original, torch.bfloat16)
    out = output_and_grads(patched, torch.bfloat16)
    check_all(["output"] + [n for n, _ in original.named_parameters()], out, ref, pt)


def count_triton_calls(monkeypatch, **tables):
    """{name: [1 per call]} of the Triton forward op in each named op table (e.g. masked=MASKED_FWD)."""
    calls = {name: [] for name in tables}
    for name, table in tables.items():
        monkeypatch.setitem(table, "triton", lambda *a, run=table["triton"], name=name: calls[name].append(1) or
                            run(*a))
    return calls


@pytest.mark.parametrize("kind", ["bert", "llama", "mistral", "gemma2"])
def test_an_hf_padded_batch_runs_the_masked_kernels(kind, monkeypatch):
    """A padded batch (attention_mask with lengths 12 and 7, or 9; labels -100 on
    the padding) gives SDPA HF's mask (for Mistral and Gemma 2's local layer,
    padding and a sliding window of 5 keys in one; Gemma 2's with its soft
    cap): patched with backend="triton" the masked kernels run it, given
    the key/value heads as they are (GQA: not repeated per query head, as
    transformers does for torch's SDPA with a mask), the loss and gradients
    as close to the float64 oracle as the unpatched model's in bf16."""
    from pyext.ops import attention_ops
    key_heads, forward = [], attention_ops.MASKED_FWD["triton"]
    monkeypatch.setitem(attention_ops.MASKED_FWD, "triton", lambda *a: key_heads.append(a[1].shape[1]) or forward(*a))
    device = device_for("triton")
    original = sharp_hf_model(kind, device)
    patched = pyext.patch(copy.deepcopy(original), backend="triton")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 12), generator=g).to(device)
    mask = torch.ones(2, 12, dtype=torch.long, device=device)
    # Gemma 2 runs transformers' eager attention only, which in float64 (the
    # oracle) turns a row its mask covers entirely into NaN (finfo(float64).min
    # is -inf in its float32 softmax): padding shorter than its window of 5
    mask[1, 9 if kind == "gemma2" else 7:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    check_hf_training_step(original, patched, lambda result: result.loss, input_ids=ids, attention_mask=mask,
                           labels=labels)
    config = original.config
    assert key_heads and set(key_heads) == {getattr(config, "num_key_value_heads", None) or
                                            config.num_attention_heads}, key_heads


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["mistral", "gemma2", "gemma3"])
def test_an_hf_sliding_window_over_an_unpadded_batch_runs_with_no_mask(kind, backend, monkeypatch):
    """No padding, 12 tokens, a window of 5: the sliding layers get no band
    mask (transformers' FlashAttention contract: the layer's sliding_window
    argument is its window); with backend="triton" the window kernels run
    them, with "torch" torch's SDPA gets the band as before. Logits and every
    gradient within the rule against the float64 original (its band mask);
    unpatched, the model is no longer trusted to pass its window."""
    from pyext.ops import attention_ops
    calls = count_triton_calls(monkeypatch, masked=attention_ops.MASKED_FWD, window=attention_ops.EXTRAS_FWD)
    device = device_for(backend)
    original = sharp_hf_model(kind, device)
    patched = pyext.patch(copy.deepcopy(original), backend=backend)
    assert "no mask" in pyext.patch_report(patched).attention
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1)).to(device)
    check_hf_training_step(original, patched, lambda result: result.logits, input_ids=ids, labels=ids)
    assert not calls["masked"] and bool(calls["window"]) == (backend == "triton")
    from pyext.patch.hf_attention import _native_windows
    assert patched.config in _native_windows and pyext.unpatch(patched).config not in _native_windows


@pytest.mark.parametrize("kind", ["smollm3", "qwen2_moe"])
def test_an_hf_model_whose_layers_do_not_pass_their_window_keeps_the_masks(kind, monkeypatch):
    """A sliding layer's mask a band of 5 keys, while its attention call
    carries no window (so FlashAttention would run it full): SmolLM3 given
    layer_types with a sliding layer but use_sliding_window False, whose
    layer holds no window; Qwen2-MoE, whose layer holds one but does not
    hand it to the attention interface. pyext keeps the masks and computes
    what the model did, the band (the masked kernels run it)."""
    from pyext.ops import attention_ops
    calls = count_triton_calls(monkeypatch, masked=attention_ops.MASKED_FWD)
    device = device_for("triton")
    original = sharp_hf_model(kind, device)
    patched = pyext.patch(copy.deepcopy(original), backend="triton")
    assert "sliding-window layers" not in pyext.patch_report(patched).attention
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1)).to(device)
    check_hf_training_step(original, patched, lambda result: result.logits, input_ids=ids, labels=ids)
    assert calls["masked"]


@pytest.mark.parametrize("kind", ["qwen2_moe", "gpt_oss"])
def test_a_decorated_hf_attention_forward_is_read_through_its_decorator(kind, monkeypatch):
    """pyext.patch reads the code an attention forward's decorator wraps:
    Qwen2-MoE's layers, which do not hand the interface their window, keep
    their masks (read from the wrapper, no forward would name the window and
    the windows would be lost), while GPT-OSS's, which do, run theirs in the
    kernels; and GPT-OSS's sinks take pyext's attention."""
    model = build(kind)
    for cls in {type(m) for m in model.modules() if type(m).__name__.endswith("Attention")}:
        decorate_forward(cls, monkeypatch)
    report = pyext.patch_report(pyext.patch(model, backend="triton")).attention
    assert report.startswith("transformers attention implementation 'pyext-triton'"), report
    assert ("sliding-window layers" in report) == (kind == "gpt_oss"), report


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_an_hf_sliding_window_given_no_mask_is_the_layers_band(causal, backend):
    """An HF attention call with no mask and a sliding window W, on a model
    whose windows pyext applies itself: key j seen by query i iff
    i - W < j <= i in a causal layer, |i - j| < W in a bidirectional one
    (ModernBERT's local attention; FlashAttention's window (W - 1, W - 1) in
    transformers' integration): within the rule against the band mask, in
    the kernels and in torch's SDPA given the window as that mask."""
    pytest.importorskip("transformers")
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from pyext.patch.hf_attention import _hf_attention
    model = pyext.patch(build("mistral"), backend="triton")  # a model whose windows pyext applies

    class Layer:
        num_key_value_groups, layer_idx, config, is_causal = 1, 0, model.config, causal
    device = device_for("triton")
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 12, 16, generator=g).to(device) for _ in range(3))
    i = torch.arange(12, device=device)
    band = (i[None, :] > i[:, None] - 3) & ((i[None, :] <= i[:, None]) if causal else (i[None, :] < i[:, None] + 3))
    out = _hf_attention(sdpa_attention_forward, backend, Layer(), *(t.bfloat16() for t in (q, k, v)), None,
                        sliding_window=3, scaling=0.25)[0]
    ref, pt = (F.scaled_dot_product_attention(*(t.to(dtype) for t in (q, k, v)), attn_mask=band,
                                              scale=0.25).transpose(1, 2) for dtype in (torch.float64, torch.bfloat16))
    assert_close(out, ref, pt, "out")


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_an_hf_bidirectional_sliding_window_model_matches_the_original(padded):
    """ModernBERT, a global layer and a local one (keys within 2 tokens
    either side), patched with the Triton kernels, over 12 tokens with and
    without padding: logits and every gradient within the rule against the
    float64 original."""
    device = device_for("triton")
    original = sharp_hf_model("modernbert", device)
    patched = pyext.patch(copy.deepcopy(original), backend="triton")
    ids = torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(1)).to(device)
    mask = torch.ones(2, 12, dtype=torch.long, device=device)
    if padded:
        mask[1, 8:] = 0
    check_hf_training_step(original, patched, lambda result: result.logits, input_ids=ids, attention_mask=mask,
                           labels=ids.masked_fill(mask == 0, -100))


def test_an_hf_model_without_sdpa_support_keeps_its_attention():
    """BigBird-Pegasus's decoder supports only transformers' eager attention
    (its self-attention layers are not marked causal: the mask alone makes
    them so, and the SDPA integration would drop it): pyext leaves its
    attention alone, says so, and the patched model computes as before."""
    tf = pytest.importorskip("transformers")
    cfg = tf.BigBirdPegasusConfig(d_model=32, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64,
                                  vocab_size=64, max_position_embeddings=32, dropout=0.0, attention_dropout=0.0)
    original = tf.BigBirdPegasusForCausalLM(cfg).double()
    patched = pyext.patch(copy.deepcopy(original), backend="torch")
    assert pyext.patch_report(patched).attention == ("left: BigBirdPegasusForCausalLM does not support "
                                                     "transformers' SDPA attention, on which pyext's is built")
    assert patched.config._attn_implementation == "eager"
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(patched(input_ids=ids).logits, original(input_ids=ids).logits)


class HoldsAnHFModel(torch.nn.Module):
    """A training wrapper holding a transformers model (a LightningModule's
    way), with code of its own around it: a head with F.gelu."""

    def __init__(self, model):
        super().__init__()
        self.model, self.head = model, torch.nn.Linear(64, 4)

    def forward(self, ids):
        return self.head(F.gelu(self.model(input_ids=ids).logits))


def test_an_hf_model_held_by_a_module_of_the_users_gets_pyexts_attention(monkeypatch):
    """patch(wrapper): the transformers model it holds gets pyext's attention
    implementation, as when patched itself (the report names where), the
    wrapper's own code its routing; its gradients are within the rule;
    unpatch gives the model its attention back; unpatch or patch of the held
    model alone is refused, naming what to unpatch."""
    from pyext.ops import attention_ops
    calls = count_triton_calls(monkeypatch, plain=attention_ops.FWD)
    device = device_for("triton")
    original = HoldsAnHFModel(sharp_hf_model("llama", device)).to(device)
    patched = pyext.patch(copy.deepcopy(original), backend="triton")
    report = pyext.patch_report(patched)
    assert report.attention.startswith("model: transformers attention implementation 'pyext-triton' (was 'sdpa')")
    assert report.functions == ["F.gelu"]
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1)).to(device)

    def output_and_grads(model, dtype):
        out = model.to(dtype)(ids)
        return [out] + list(torch.autograd.grad(out.float().square().sum(), list(model.parameters())))
    ref, pt = output_and_grads(copy.deepcopy(original), torch.float64), output_and_grads(original, torch.bfloat16)
    check_all(["output"] + [n for n, _ in original.named_parameters()], output_and_grads(patched, torch.bfloat16),
              ref, pt)
    assert len(calls["plain"]) == patched.model.config.num_hidden_layers
    for change in (pyext.unpatch, pyext.patch):
        with pytest.raises(ValueError, match="was patched as part of a model holding it"):
            change(patched.model)
    assert pyext.unpatch(patched).model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_model_that_ran_eager_attention_keeps_what_eager_gives_a_row_that_sees_no_key(backend):
    """Gemma 2 runs transformers' eager attention (its soft cap keeps it from
    SDPA's), whose additive finfo.min mask gives a left-padded row, which
    sees no key, the average of every value, where a boolean mask gives it 0.
    The last padding position's logits predict the first token, so that row
    is in the loss: patched, the model keeps eager's rows (its logits there
    were ~2 off, its loss 2% off)."""
    device = device_for(backend)
    original = sharp_hf_model("gemma2", device)
    dtype = torch.float32 if backend == "torch" else torch.bfloat16
    patched = pyext.patch(copy.deepcopy(original), backend=backend).to(dtype)
    assert "eager's additive masks" in pyext.patch_report(patched).attention
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(1)).to(device)
    padding = torch.ones_like(ids)
    padding[1, :3] = 0
    ids, labels = ids.masked_fill(padding == 0, 0), ids.masked_fill(padding == 0, -100)

    def run(model, dtype):
        with torch.no_grad():
            result = model.to(dtype)(input_ids=ids, attention_mask=padding, labels=labels)
        return result.logits.float(), result.loss.float()
    (got, loss), (want, want_loss) = run(patched, dtype), run(copy.deepcopy(original), torch.float32)
    same_dtype = run(original, dtype)[0]
    rows = slice(0, 3)  # the padded rows: a bound from torch's own error in the dtype, at least 1e-5
    bound = 2 * (same_dtype - want)[1, rows].abs().max().item() + 1e-5
    assert (got - want)[1, rows].abs().max().item() <= bound
    if backend == "torch":
        torch.testing.assert_close(loss, want_loss)


def test_unpatch_keeps_an_attention_implementation_set_while_patched():
    """set_attn_implementation("eager") on a patched model: unpatch keeps it,
    as it keeps what else was done to the model meanwhile."""
    model = pyext.patch(sharp_hf_model("llama", "cpu"), backend="torch")
    model.set_attn_implementation("eager")
    assert pyext.unpatch(model).config._attn_implementation == "eager"


GENERATION_CASES = [(kind, padded) for kind in ("gpt2", "llama", "mistral", "gemma2", "gemma3")
                    for padded in (False, True)
                    # Gemma 2's float64 eager oracle turns padded rows into NaN (see above), and their K, V with them
                    if not (kind == "gemma2" and padded)]


@pytest.mark.parametrize("kind,padded", GENERATION_CASES,
                         ids=[f"{kind}-{'left-padded' if padded else 'unpadded'}" for kind, padded in GENERATION_CASES])
def test_a_patched_hf_model_generates_as_the_original(kind, padded):
    """model.generate() with the KV cache (a 6-token prompt, then 8 tokens
    one at a time: one query against a growing cache, Mistral's and Gemma's
    windows of 5 passed), greedy, patched with the Triton kernels in bf16:
    the scores of each step within the rule against the float64 original's
    logits over the sequence it generated (no cache, the same positions)."""
    device = device_for("triton")
    original = sharp_hf_model(kind, device)
    original.generation_config.pad_token_id = 0
    patched = pyext.patch(copy.deepcopy(original), backend="triton").to(torch.bfloat16).eval()
    prompt = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(1)).to(device)
    mask = torch.ones_like(prompt)
    if padded:
        prompt[1, :2], mask[1, :2] = 0, 0
    out = patched.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=8, do_sample=False,
                           output_scores=True, return_dict_in_generate=True)
    mask = torch.cat([mask, mask.new_ones(2, out.sequences.shape[1] - prompt.shape[1])], 1)

    def logits(dtype):
        with torch.no_grad():
            result = copy.deepcopy(original).to(dtype).eval()(
                input_ids=out.sequences, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        return result.logits[:, prompt.shape[1] - 1:-1]
    assert_close(torch.stack(out.scores, 1), logits(torch.float64), logits(torch.bfloat16).float(), "scores")


def _packed_call(positions, mask, backend="triton", sliding_window=None, batch=1, **kwargs):
    """What _hf_packed_rows makes of an HF attention call over these positions
    (None: no position_ids) with this (T, T) mask (None: no mask) and kwargs."""
    from pyext.patch.hf_attention import _hf_packed_rows

    class Layer:
        is_causal = True
        config = None
    t = len(positions) if positions is not None else mask.shape[-1] if mask is not None else \
        int(kwargs["cu_seq_lens_q"][-1])
    query = torch.zeros(batch, 2, t, 8)
    mask = mask.expand(batch, 1, t, t) if mask is not None else None
    if positions is not None:
        kwargs["position_ids"] = torch.tensor([positions] * batch)
    return _hf_packed_rows(backend, Layer(), query, query, mask, sliding_window, kwargs)


def _block_causal(lengths, window=None):
    document = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    i = torch.arange(len(document))
    mask = (document[:, None] == document[None, :]) & (i[None, :] <= i[:, None])
    return mask & (i[None, :] > i[:, None] - window) if window else mask


def _flash_kwargs(lengths, longest=None):
    """FlashAttention's packed kwargs for documents of these lengths, as
    DataCollatorWithFlattening(return_flash_attn_kwargs=True) gives them."""
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    longest = longest or max(lengths)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def test_a_packed_row_is_taken_only_with_exactly_its_block_diagonal_causal_mask():
    """The documents are where position_ids do not rise by 1; the call is
    taken (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) only when
    its mask is exactly theirs (with the layer's window), for the Triton
    kernels, over one row."""
    positions, lengths = [*range(5), *range(4), *range(7)], [5, 4, 7]
    cu_q, cu_k, longest_q, longest_k = _packed_call(positions, _block_causal(lengths))
    assert cu_q.tolist() == cu_k.tolist() == [0, 5, 9, 16] and cu_q.dtype == torch.int32
    assert longest_q == longest_k == 7
    assert _packed_call(positions, _block_causal(lengths, 3), sliding_window=3)[2] == 7
    more = _block_causal(lengths).clone()
    more[1, 2] = True  # one bidirectional pair (an image's block, say): not a packed row's mask
    assert _packed_call(positions, more) is None
    assert _packed_call(positions, _block_causal(lengths, 3)) is None  # a window the layer does not have
    assert _packed_call(positions, _block_causal(lengths), sliding_window=3) is None  # the reverse
    assert _packed_call(list(range(16)), _block_causal([16])) is None  # one document: not packed
    assert _packed_call(positions, _block_causal(lengths), backend="torch") is None
    assert _packed_call(positions, _block_causal(lengths), batch=2) is None


def test_flash_attentions_packed_kwargs_must_match_the_mask_in_eager_and_are_taken_as_given_under_compile(
        monkeypatch):
    """FlashAttention's packed kwargs (cu_seq_lens_q, ...) name the documents
    where a call has them: in eager mode taken only when the mask is exactly
    theirs (whatever position_ids say), the offsets and longest lengths as
    given; while torch.compile traces, taken without reading the mask (none
    can be read there), but not with a sliding window the layer's config does
    not vouch for, nor with no mask at all (eager mode's one causal row); a
    call without them then goes to the mask path."""
    positions, lengths = [*range(5), *range(4), *range(7)], [5, 4, 7]
    given = _flash_kwargs(lengths, longest=8)
    taken = _packed_call(None, _block_causal(lengths), **given)
    assert taken[0] is given["cu_seq_lens_q"] and taken[1] is given["cu_seq_lens_k"] and taken[2:] == (8, 8)
    assert _packed_call(positions, _block_causal(lengths), **given)[0] is given["cu_seq_lens_q"]
    assert _packed_call(positions, _block_causal(lengths), **_flash_kwargs([9, 7])) is None  # not the mask's
    assert _packed_call(positions, _block_causal(lengths), **_flash_kwargs([5, 4, 6])) is None  # 15 of 16 tokens
    split_keys = dict(given, cu_seq_lens_k=torch.tensor([0, 9, 16], dtype=torch.int32))
    assert _packed_call(positions, _block_causal(lengths), **split_keys) is None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert _packed_call(None, _block_causal(lengths), **given)[0] is given["cu_seq_lens_q"]
    assert _packed_call(None, torch.ones(16, 16, dtype=torch.bool), **given)[0] is given["cu_seq_lens_q"]  # unread
    assert _packed_call(positions, _block_causal(lengths)) is None
    assert _packed_call(None, _block_causal(lengths, 3), sliding_window=3, **given) is None
    # no mask: a model that builds none from position_ids (GPT-OSS), run by eager mode as one causal row
    assert _packed_call(None, None, **given) is None
    # a learned bias beside the mask (T5's position_bias): the varlen kernels take none
    assert _packed_call(None, _block_causal(lengths), position_bias=torch.zeros(1, 2, 16, 16), **given) is None


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["llama", "mistral", "gemma2"])
def test_an_hf_row_of_packed_documents_runs_the_varlen_kernels(kind, backend, monkeypatch):
    """Padding-free training: three documents (5, 4 and 7 tokens) in one row,
    position_ids restarting at each, no cache; transformers builds the
    block-diagonal causal mask (with the window on sliding layers), one per
    layer type, shared by the layers of a type (two here). With
    backend="triton" pyext runs flash_attention_varlen and no masked kernel;
    with "torch" the mask goes to torch's SDPA. Logits and every gradient
    within the rule against the float64 original."""
    from pyext.ops import attention_ops, attention_varlen
    calls = count_triton_calls(monkeypatch, masked=attention_ops.MASKED_FWD, varlen=attention_varlen.VARLEN_FWD)
    device = device_for(backend)
    original = sharp_hf_model(kind, device, layers=None if kind == "gemma2" else 2)  # Gemma 2: local, global
    patched = pyext.patch(copy.deepcopy(original), backend=backend)
    assert ("packed documents" in pyext.patch_report(patched).attention) == (backend == "triton")
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(1)).to(device)
    positions = torch.tensor([[*range(5), *range(4), *range(7)]], device=device)
    check_hf_training_step(original, patched, lambda result: result.logits, input_ids=ids, position_ids=positions,
                           labels=ids, use_cache=False)
    assert not calls["masked"] and bool(calls["varlen"]) == (backend == "triton")


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_an_hf_row_of_packed_documents_with_flash_attentions_kwargs_runs_the_varlen_kernels(kind, monkeypatch):
    """The same row with FlashAttention's packed kwargs too (cu_seq_lens_q,
    ...: DataCollatorWithFlattening(return_flash_attn_kwargs=True)), which
    transformers' SDPA integration ignores: the offsets given go to the
    varlen kernels, the result within the rule against the float64 original."""
    from pyext.ops import attention_ops, attention_varlen
    calls = count_triton_calls(monkeypatch, masked=attention_ops.MASKED_FWD, varlen=attention_varlen.VARLEN_FWD)
    device = device_for("triton")
    original = sharp_hf_model(kind, device, layers=None if kind == "gemma2" else 2)
    patched = pyext.patch(copy.deepcopy(original), backend="triton")
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(1)).to(device)
    positions = torch.tensor([[*range(5), *range(4), *range(7)]], device=device)
    given = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in _flash_kwargs([5, 4, 7]).items()}
    check_hf_training_step(original, patched, lambda result: result.logits, input_ids=ids, position_ids=positions,
                           labels=ids, use_cache=False, **given)
    assert not calls["masked"] and calls["varlen"]


def test_the_documents_mask_of_a_model_that_ran_flashattention(monkeypatch):
    """_flash_documents_mask: the block-diagonal causal mask (the window within
    each document; built once per position_ids tensor and window) from
    position_ids, read on the host (while tracing, at a graph break), or
    from FlashAttention's packed kwargs (while tracing, on the device);
    none for one document, a batch of rows, or a model that did not run
    FlashAttention before."""
    from pyext.patch import hf_attention

    class Config:
        pass

    class Layer:
        is_causal, config = True, Config()
    layer, lengths = Layer(), [5, 4, 7]
    monkeypatch.setattr(hf_attention, "_flash_before", hf_attention._Configs([layer.config]))
    positions = torch.tensor([[*range(5), *range(4), *range(7)]])
    query = torch.zeros(1, 2, 16, 8)

    def mask(sliding_window=None, q=query, **kwargs):
        return hf_attention._flash_documents_mask(layer, q, q, sliding_window, kwargs)
    assert torch.equal(mask(position_ids=positions)[0, 0], _block_causal(lengths))
    assert torch.equal(mask(3, position_ids=positions)[0, 0], _block_causal(lengths, 3))
    # built once per position_ids tensor and window, however the layers alternate them
    assert mask(position_ids=positions) is mask(position_ids=positions) is not mask(3, position_ids=positions)
    assert torch.equal(mask(**_flash_kwargs(lengths))[0, 0], _block_causal(lengths))
    assert mask(position_ids=torch.arange(16)[None]) is None  # one document
    assert mask(q=torch.zeros(2, 2, 16, 8), position_ids=positions.expand(2, -1)) is None  # two rows
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert torch.equal(mask(3, **_flash_kwargs(lengths))[0, 0], _block_causal(lengths, 3))
    assert torch.equal(mask(position_ids=positions.clone())[0, 0], _block_causal(lengths))
    hf_attention._flash_before.discard(layer.config)
    assert mask(**_flash_kwargs(lengths)) is None


def test_a_mask_given_is_restricted_to_the_documents():
    """_within_documents: a boolean mask and'ed with the documents' mask, an
    additive one set to the dtype's minimum outside them; the same
    restricted mask for the same given mask and documents (the layers of a
    type share it), a new one for new documents."""
    from pyext.patch import hf_attention
    documents = _block_causal([2, 3])[None, None]
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    got = hf_attention._within_documents(causal, documents)
    assert torch.equal(got, documents) and hf_attention._within_documents(causal, documents) is got
    assert hf_attention._within_documents(causal, documents.clone()) is not got
    additive = torch.zeros(1, 1, 5, 5, dtype=torch.bfloat16).masked_fill(~causal, -1e4)
    restricted = hf_attention._within_documents(additive, documents)
    assert torch.equal(restricted == 0, documents) and restricted.dtype == torch.bfloat16


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("given", ["position_ids", "flash_kwargs"])
@pytest.mark.parametrize("kind", ["gpt_oss", "llama"])
def test_a_model_that_ran_flashattention_keeps_its_packed_documents_apart(kind, given, mode, monkeypatch):
    """FlashAttention's integration runs a row of packed documents per
    document whatever the masks say; GPT-OSS's masks ignore position_ids
    (eager and SDPA run the row as one causal sequence), so for a model that
    ran FlashAttention before the patch pyext builds the documents' mask
    itself (Llama's masks have them already). Three documents (5, 4, 7) in
    one row, by position_ids or by FlashAttention's packed kwargs, patched
    with backend="triton", eager or compiled (position_ids alone read at a
    graph break): the varlen or the masked kernels run, and the logits are
    within the rule of each document run on its own by the float64 original.
    (Compiled, torch 2.11's transformers hands the full-attention layers a
    plain causal mask: the documents restrict it.)"""
    from pyext.ops import attention_ops, attention_varlen
    calls = count_triton_calls(monkeypatch, masked=attention_ops.MASKED_FWD, varlen=attention_varlen.VARLEN_FWD)
    device = device_for("triton")
    original = sharp_hf_model(kind, device, layers=None if kind == "gpt_oss" else 2)
    ran = copy.deepcopy(original)
    ran.config._attn_implementation = "flash_attention_2"  # what it ran before (flash-attn is not installed here)
    patched = pyext.patch(ran, backend="triton")
    assert "packed documents kept apart as FlashAttention kept them" in pyext.patch_report(patched).attention
    lengths = [5, 4, 7]
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(1)).to(device)
    batch = dict(position_ids=torch.cat([torch.arange(n) for n in lengths])[None].to(device))
    if given == "flash_kwargs":
        batch.update({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in _flash_kwargs(lengths).items()})

    def each_document_alone(model, dtype):
        model = model.to(dtype)
        bounds = [0, *itertools.accumulate(lengths)]
        return torch.cat([model(input_ids=ids[:, a:b], use_cache=False).logits for a, b in zip(bounds, bounds[1:])], 1)
    run = patched.to(torch.bfloat16)
    if mode == "compiled":
        torch._dynamo.reset()
        run = torch.compile(run, backend="eager")
    with torch.no_grad():
        out = run(input_ids=ids, use_cache=False, **batch).logits
        check_all(["logits"], [out], [each_document_alone(copy.deepcopy(original), torch.float64)],
                  [each_document_alone(original, torch.bfloat16)])
    assert calls["varlen"] or calls["masked"]
    assert calls["varlen"] or mode == "compiled"  # eager: the documents read, so their varlen kernels


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_a_compiled_hf_model_runs_packed_rows_given_flash_attentions_kwargs(kind, monkeypatch):
    """torch.compile(fullgraph=True) of a patched model over rows of packed
    documents with FlashAttention's packed kwargs: the varlen kernels run
    them (no mask read, no masked kernel), the loss and gradients as in
    eager mode; three batches whose longest documents differ (max_length, an
    int, traced as a SymInt once it has changed)."""
    from pyext.ops import attention_ops, attention_varlen
    calls = count_triton_calls(monkeypatch, masked=attention_ops.MASKED_FWD, varlen=attention_varlen.VARLEN_FWD)
    device = device_for("triton")
    model = pyext.patch(sharp_hf_model(kind, device, layers=None if kind == "gemma2" else 2).to(torch.bfloat16),
                        backend="triton")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    g = torch.Generator().manual_seed(1)
    for lengths in ([5, 4, 7], [3, 8, 2, 3], [6, 6, 4]):
        ids = torch.randint(0, 64, (1, 16), generator=g).to(device)
        positions = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
        given = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in _flash_kwargs(lengths).items()}
        batch = dict(input_ids=ids, position_ids=positions, labels=ids, use_cache=False, **given)

        def loss_and_grads(run):
            loss = run(**batch).loss
            return [loss] + list(torch.autograd.grad(loss, list(model.parameters()), allow_unused=True))
        calls["varlen"].clear()
        got = loss_and_grads(compiled)
        assert calls["varlen"] and not calls["masked"], lengths
        for a, b in zip(got, loss_and_grads(model)):
            torch.testing.assert_close(a, b)


def test_an_hf_model_transformers_gives_no_sdpa_integration_keeps_its_attention():
    """A model whose attention transformers will not run through its SDPA
    integration, for a reason other than a soft cap or sinks: pyext.patch
    keeps its attention implementation, and says why."""
    llama = build("llama")
    config = copy.deepcopy(llama.config)
    config._attn_implementation = "eager"
    eager_only = type("EagerOnlyLlama", (type(llama),), {"_supports_sdpa": False})(config)
    patched = pyext.patch(eager_only)
    assert pyext.patch_report(patched).attention == (
        "left: EagerOnlyLlama does not support transformers' SDPA attention, on which pyext's is built")
    assert patched.config._attn_implementation == "eager"


def test_an_hf_model_with_sinks_whose_attention_rewrites_its_mask_keeps_its_attention():
    """DeepSeek-V4 has sinks, but its attention appends its compressed keys'
    bias to the eager (additive) mask it is given, which pyext's SDPA masks
    (boolean, or none for a plain causal batch) would not survive: pyext.patch
    keeps its attention, says why, and notes nothing about calls it does not take."""
    tf = pytest.importorskip("transformers")
    if not hasattr(tf, "DeepseekV4ForCausalLM"):
        pytest.skip("this transformers has no DeepSeek-V4")
    from hf_sweep import build as build_tiny  # every architecture's tiny build
    model = pyext.patch(build_tiny("deepseek_v4"))
    report = pyext.patch_report(model)
    assert report.attention == ("left: DeepseekV4ForCausalLM runs its attention eagerly only, and rewrites the "
                                "attention mask it is given")
    assert model.config._attn_implementation == "eager" and report.notes == []


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_an_hf_model_with_attention_sinks_runs_them_in_the_kernels(padded, monkeypatch):
    """GPT-OSS adds a learned logit per head to each softmax's denominator
    (attention sinks, transformers' s_aux), which torch's SDPA lacks, so
    transformers runs it eagerly (S x S scores). Patched with
    backend="triton", its attention runs the kernels with the sinks: the
    window kernels for its sliding layer over an unpadded batch, the masked
    ones for a padded batch (lengths 12 and 7, labels -100 on the padding).
    Its loss and every gradient (the sinks' too) are the eager model's in
    bf16 against the float64 oracle, within the rule."""
    from pyext.ops import attention_ops
    calls = count_triton_calls(monkeypatch, extras=attention_ops.EXTRAS_FWD, masked=attention_ops.MASKED_FWD)
    device = device_for("triton")
    original = sharp_hf_model("gpt_oss", device)
    patched = pyext.patch(copy.deepcopy(original), backend="triton")
    report = pyext.patch_report(patched)
    assert report.attention.startswith("transformers attention implementation 'pyext-triton' (was 'eager')")
    assert "attention sinks (the modules' s_aux)" not in " ".join(report.notes)  # triton named: nothing to note
    assert pyext.patch_report(pyext.patch(copy.deepcopy(original))).notes == [
        "attention sinks (the modules' s_aux): its calls run pyext's Triton kernels, with a mask or dropout too "
        "(torch's SDPA has no sinks)"]
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1)).to(device)
    mask = torch.ones(2, 12, dtype=torch.long, device=device)
    mask[1, 7:] = 0 if padded else 1
    check_hf_training_step(original, patched, lambda result: result.loss, input_ids=ids, attention_mask=mask,
                           labels=ids.masked_fill(mask == 0, -100))
    assert calls["masked" if padded else "extras"]


@pytest.mark.parametrize("kind", ["granite_swa", "mimo_v2_flash"])
def test_an_hf_row_of_packed_documents_with_attention_sinks_runs_the_varlen_kernels_with_them(kind, monkeypatch):
    """Padding-free training of a model with sinks that hands position_ids to
    its masks (Granite-SWA, sinks in every layer; MiMo-V2-Flash, in its
    sliding layers only): three documents (5, 4, 7 tokens) in one row go to
    flash_attention_varlen with each layer's sinks (no masked kernel), the
    logits and every gradient (the sinks' too) within the rule against the
    float64 original."""
    pytest.importorskip("transformers")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from hf_sweep import build as build_tiny  # every architecture's tiny build
    if kind not in CONFIG_MAPPING:
        pytest.skip(f"this transformers has no {kind}")
    from pyext.ops import attention_ops, attention_varlen
    calls = count_triton_calls(monkeypatch, masked=attention_ops.MASKED_FWD)
    sinks_given = []
    run = attention_varlen.VARLEN_FWD["triton"]
    monkeypatch.setitem(attention_varlen.VARLEN_FWD, "triton",
                        lambda *a: sinks_given.append(a[12] is not None) or run(*a))
    original = build_tiny(kind)
    with torch.no_grad():  # sinks that weigh: at HF's init they are all near 0
        for layer in original.model.layers:
            if layer.self_attn.sinks is not None:
                layer.self_attn.sinks.normal_(0, 2)
    patched = pyext.patch(copy.deepcopy(original), backend="triton")
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(1))
    positions = torch.tensor([[*range(5), *range(4), *range(7)]])
    check_hf_training_step(original, patched, lambda result: result.logits, input_ids=ids, position_ids=positions,
                           labels=ids, use_cache=False)
    layers_with_sinks = [layer.self_attn.sinks is not None for layer in original.model.layers]
    assert not calls["masked"] and sinks_given == layers_with_sinks and any(layers_with_sinks)


def test_an_hf_models_own_sdpa_calls_go_to_pyext(monkeypatch):
    """SAM's vision attention calls F.scaled_dot_product_attention itself,
    with its learned relative position bias as the mask, not through the
    attention interface pyext's HF attention replaces: those modules' calls
    are routed (the report names them), the bias gets its gradient from the
    kernels, and the model's outputs and gradients are within the rule."""
    from transformers import SamVisionConfig, SamVisionModel
    from pyext.ops import attention_ops
    config = SamVisionConfig(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                             image_size=32, patch_size=8, use_rel_pos=True, window_size=2, global_attn_indexes=[1],
                             mlp_dim=64, attn_implementation="sdpa")
    torch.manual_seed(0)
    original = sharpened(SamVisionModel(config))
    patched = pyext.patch(copy.deepcopy(original), backend="triton")
    assert "in the forward of: vision_encoder.layers.0.attn, vision_encoder.layers.1.attn" in \
        pyext.patch_report(patched).attention
    calls = count_triton_calls(monkeypatch, masked=attention_ops.MASKED_FWD)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def output_and_grads(model, dtype):
        model = model.to(dtype).train()
        out = model(pixel_values=pixels.to(dtype)).last_hidden_state
        return [out] + list(torch.autograd.grad(out.float().square().mean(), list(model.parameters()),
                                                allow_unused=True))
    ref = output_and_grads(copy.deepcopy(original), torch.float64)
    pt = output_and_grads(original, torch.bfloat16)
    out = output_and_grads(patched, torch.bfloat16)
    assert len(calls["masked"]) == 2  # one forward of each layer (the backward reuses its saved inputs)
    check_all(["output"] + [n for n, _ in original.named_parameters()], out, ref, pt)


def left_padded_logits(model):
    """An HF model's logits (no grad) for a fixed batch of two rows of 12
    tokens, the first left-padded by 5 (its padded rows see no key)."""
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    padding = torch.ones_like(ids)
    padding[0, :5] = 0
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=padding).logits


def copies_of(model):
    """A deep copy of `model` and a pickled one (torch.save and torch.load of the whole model)."""
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return [copy.deepcopy(model), torch.load(buffer, weights_only=False)]


def test_patched_hf_models_saved_whole_run_in_a_new_process(tmp_path):
    """torch.save of a whole patched HF model, torch.load in a process that
    imports pyext and never patched: transformers' registry there lacks
    "pyext-torch" until unpickling the model registers it (the forward
    raised KeyError). Each loaded model gives the saved one's logits, its
    attention still through pyext's SDPA."""
    kinds, ids = ["gpt2", "llama", "bert"], torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    for kind in kinds:
        model = pyext.patch(build(kind).eval(), backend="torch")
        with torch.no_grad():
            torch.save({"model": model, "logits": model(input_ids=ids).logits, "ids": ids}, tmp_path / f"{kind}.pt")
    child = textwrap.dedent(f"""
        import sys
        import torch
        import pyext.ops.attention as attention
        calls, real = [], attention._scaled_dot_product_attention
        attention._scaled_dot_product_attention = lambda *a, **k: calls.append(1) or real(*a, **k)
        for kind in {kinds!r}:
            saved = torch.load(f"{{sys.argv[1]}}/{{kind}}.pt", weights_only=False)
            with torch.no_grad():
                torch.testing.assert_close(saved["model"](input_ids=saved["ids"]).logits, saved["logits"])
            print(kind, saved["model"].config._attn_implementation, len(calls))
            calls.clear()
    """)
    out = subprocess.run([sys.executable, "-c", child, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.stdout.splitlines() == [f"{kind} pyext-torch 1" for kind in kinds], out.stderr[-2000:]


def test_copies_of_a_patched_hf_model_that_ran_eager_attention_keep_eagers_padded_rows():
    """What a patched HF model ran before the patch (eager attention here,
    FlashAttention below) is held by its config's identity, and a copy has
    a config of its own: a deep copy and a pickled copy of a patched GPT-2
    that ran eager attention give a left-padded batch eager's logits, its
    padded rows (which see no key: eager averages the values) included, as
    the patched model does (the copies' padded rows were 0.07 off).
    Unpatching one copy leaves the model and the other copy as they were."""
    original = build("gpt2").eval()
    original.set_attn_implementation("eager")
    want = left_padded_logits(original)
    patched = pyext.patch(copy.deepcopy(original), backend="torch")
    deep, pickled = copies_of(patched)
    for model in (patched, deep, pickled):
        torch.testing.assert_close(left_padded_logits(model), want)
    assert pyext.unpatch(deep).config._attn_implementation == "eager"
    for model in (deep, patched, pickled):
        torch.testing.assert_close(left_padded_logits(model), want)


@pytest.mark.parametrize("name", ["llava", "gemma3", "qwen2_vl"])
def test_a_composite_hf_model_that_ran_eager_attention_keeps_eagers_padded_rows_in_its_text_layers(name):
    """A vision-language model's text layers read its text config, not the
    model's: what the model ran before the patch is held for every config
    its modules read (the padded rows of its text tower were up to 7 off
    eager's: eager averaged the values there, the patch's SDPA gave 0)."""
    from hf_sweep import build as build_tiny
    original = build_tiny(name).eval()
    original.set_attn_implementation("eager")
    want = left_padded_logits(original)
    patched = pyext.patch(copy.deepcopy(original), backend="torch")
    for model in (patched, *copies_of(patched)):
        torch.testing.assert_close(left_padded_logits(model), want)


def test_copies_of_a_patched_hf_model_that_ran_flashattention_keep_its_packed_documents_apart():
    """GPT-OSS's masks ignore position_ids, so for a model that ran
    FlashAttention before the patch pyext builds the mask of a packed row's
    documents itself (test_a_model_that_ran_flashattention_keeps_its_packed_documents_apart):
    its deep copy and its pickled copy too, each document's logits those of
    the document run alone by the original (the copies ran the row as one
    causal sequence)."""
    original = build("gpt_oss").eval()
    ran = copy.deepcopy(original)
    ran.config._attn_implementation = "flash_attention_2"  # what it ran before (flash-attn is not installed here)
    patched = pyext.patch(ran, backend="torch")
    lengths = [5, 4, 7]
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(1))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        bounds = [0, *itertools.accumulate(lengths)]
        want = torch.cat([original(input_ids=ids[:, a:b]).logits for a, b in zip(bounds, bounds[1:])], 1)
        for model in (patched, *copies_of(patched)):
            torch.testing.assert_close(model(input_ids=ids, position_ids=positions).logits, want)


def test_a_patched_hf_model_and_its_copies_save_the_config_an_unpatched_one_saves(tmp_path):
    """save_pretrained of a patched HF model, and of its copies, writes the
    config.json an unpatched model writes, byte for byte, and the same
    weights: what patch holds on the model is no part of either."""
    model = build("gpt2")
    model.save_pretrained(tmp_path / "unpatched")
    patched = pyext.patch(model, backend="torch")
    saved = {"patched": patched, "deep copy": copies_of(patched)[0], "pickled copy": copies_of(patched)[1]}
    for name, model in saved.items():
        model.save_pretrained(tmp_path / name)
    for name in saved:
        assert (tmp_path / name / "config.json").read_bytes() == (tmp_path / "unpatched" / "config.json").read_bytes()
        assert (tmp_path / name / "model.safetensors").read_bytes() == \
            (tmp_path / "unpatched" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
def test_hf_attention_asks_for_gqa_only_where_the_keys_have_fewer_heads(kind, monkeypatch):
    """pyext's HF attention hands SDPA the key heads as they are, and
    enable_gqa only where they are fewer than the query heads (Llama's 2
    for 4), as transformers asks torch's SDPA: the legacy ONNX exporter
    (torch.onnx.export(dynamo=False)) refuses to convert a call with
    enable_gqa, and refused patched GPT-2 and BERT, which export unpatched.
    The logits are the unpatched model's."""
    import pyext.ops.attention as attention
    asked, real = [], attention._scaled_dot_product_attention

    def spy(query, key, *args, **kwargs):
        asked.append((kwargs.get("enable_gqa", False), key.shape[1] < query.shape[1]))
        return real(query, key, *args, **kwargs)
    monkeypatch.setattr(attention, "_scaled_dot_product_attention", spy)
    original = build(kind).eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    patched = pyext.patch(copy.deepcopy(original), backend="torch")
    with torch.no_grad():
        torch.testing.assert_close(patched(input_ids=ids).logits, original(input_ids=ids).logits)
    assert asked == [(kind == "llama", kind == "llama")]
