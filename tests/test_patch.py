"""pyext.patch / pyext.unpatch on models users already have."""
import copy
import inspect
import itertools

import pytest
import torch
import torch.nn.functional as F

import pyext
from benchmarks.train_gpt import GPT, TINY
from conftest import BACKENDS, assert_close, device_for



def nano_gpt():
    return GPT(**dict(TINY, layers=1))


def encoder():
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True,
                                             activation=torch.nn.GELU())
    return torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


def hf_model(kind):
    tf = pytest.importorskip("transformers")
    if kind == "gpt2":
        cfg = tf.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=32,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return tf.GPT2LMHeadModel(cfg)
    if kind == "llama":
        cfg = tf.LlamaConfig(num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                             hidden_size=32, intermediate_size=64, vocab_size=64)
        return tf.LlamaForCausalLM(cfg)
    if kind == "deepseek_v3":  # MLA: query/key heads of 24, value heads of 16; one layer, dense (no experts)
        cfg = tf.DeepseekV3Config(num_hidden_layers=1, first_k_dense_replace=1, num_attention_heads=2,
                                  num_key_value_heads=2, hidden_size=32, intermediate_size=64, vocab_size=64,
                                  kv_lora_rank=16, q_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                  v_head_dim=16, n_group=1, topk_group=1)
        return tf.DeepseekV3ForCausalLM(cfg)
    if kind == "mistral":  # a sliding window of 5 keys: SDPA gets the causal band as a boolean mask
        cfg = tf.MistralConfig(num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                               intermediate_size=64, vocab_size=64, sliding_window=5)
        return tf.MistralForCausalLM(cfg)
    if kind == "gemma2":  # a logit soft cap, which weights of 0.3 make bite (scores of spread ~3); local, global layers
        # eager attention, Gemma 2's own: transformers 5.17 defaults it to SDPA, which drops the cap unsaid
        cfg = tf.Gemma2Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                              head_dim=8, intermediate_size=64, vocab_size=64, sliding_window=5,
                              attn_logit_softcapping=2.0, query_pre_attn_scalar=8, initializer_range=0.3,
                              attn_implementation="eager")
        return tf.Gemma2ForCausalLM(cfg)
    if kind == "gemma3":  # Gemma's RMSNorm on the hidden states and on q and k (QK-norm); local, global layers
        cfg = tf.Gemma3TextConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                                  head_dim=8, intermediate_size=64, vocab_size=64, sliding_window=5,
                                  query_pre_attn_scalar=8, layer_types=["sliding_attention", "full_attention"])
        return tf.Gemma3ForCausalLM(cfg)
    if kind == "qwen2":  # its own RMSNorm class, a copy of Llama's; biases on q, k, v
        cfg = tf.Qwen2Config(num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                             hidden_size=32, intermediate_size=64, vocab_size=64)
        return tf.Qwen2ForCausalLM(cfg)
    if kind == "modernbert":  # bidirectional; layer 1 a local one, keys within 2 tokens either side
        cfg = tf.ModernBertConfig(num_hidden_layers=2, global_attn_every_n_layers=2, local_attention=4,
                                  num_attention_heads=2, hidden_size=32, intermediate_size=64, vocab_size=64,
                                  pad_token_id=0, embedding_dropout=0.0, mlp_dropout=0.0, attention_dropout=0.0)
        return tf.ModernBertForMaskedLM(cfg)
    if kind == "smollm3":  # a sliding layer type without use_sliding_window: a band mask of 5, no window in the layer
        cfg = tf.SmolLM3Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                               intermediate_size=64, vocab_size=64, pad_token_id=0, sliding_window=5,
                               use_sliding_window=False, layer_types=["sliding_attention", "full_attention"])
        return tf.SmolLM3ForCausalLM(cfg)
    if kind == "qwen2_moe":  # a band mask of 5 and the window held by the layer, not handed to the interface
        cfg = tf.Qwen2MoeConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                                intermediate_size=64, vocab_size=64, use_sliding_window=True, sliding_window=5,
                                layer_types=["sliding_attention", "full_attention"], mlp_only_layers=[0, 1])
        return tf.Qwen2MoeForCausalLM(cfg)
    if kind == "gpt_oss":  # attention sinks; a sliding (5) and a full layer; one expert (no routing to flip)
        cfg = tf.GptOssConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                              head_dim=8, intermediate_size=64, vocab_size=64, num_local_experts=1,
                              num_experts_per_tok=1, sliding_window=5, experts_implementation="eager")
        model = tf.GptOssForCausalLM(cfg)
        with torch.no_grad():  # sinks that weigh: at HF's init (std 0.02) they are all near 0
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0, 2)
        return model
    if kind == "qwen3_next":  # a linear-attention layer (its gated RMSNorm over each value head), then a full one
        cfg = tf.Qwen3NextConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                                 head_dim=8, intermediate_size=64, vocab_size=64, moe_intermediate_size=16,
                                 shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                                 linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                                 linear_value_head_dim=8, layer_types=["linear_attention", "full_attention"],
                                 experts_implementation="eager")  # float64 (the oracle): no grouped_mm
        return tf.Qwen3NextForCausalLM(cfg)
    if kind == "falcon":  # no AttentionInterface: its own F.scaled_dot_product_attention call; one key head (MQA)
        cfg = tf.FalconConfig(num_hidden_layers=1, num_attention_heads=4, hidden_size=32, vocab_size=64)
        return tf.FalconForCausalLM(cfg)
    cfg = tf.BertConfig(num_hidden_layers=1, num_attention_heads=2, hidden_size=32, intermediate_size=64,
                        vocab_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return tf.BertForMaskedLM(cfg)


def outputs_of(model, kind, device, dtype):
    """(output, scalar loss) of `model` on fixed random input of the model's
    kind: an HF model's logits, the encoder's output, nanoGPT's loss (all its
    forward returns)."""
    g = torch.Generator().manual_seed(1)
    if kind == "nanogpt":
        idx = torch.randint(0, 256, (2, 16), generator=g).to(device)
        loss = model(idx, idx)
        return loss, loss
    if kind == "encoder":
        out = model(torch.randn(2, 9, 32, generator=g).to(device, dtype))
        return out, out.square().mean()
    ids = torch.randint(0, 64, (2, 12), generator=g).to(device)
    out = model(input_ids=ids, labels=ids)
    return out.logits, out.loss


def loss_of(model, kind, device, dtype):
    return outputs_of(model, kind, device, dtype)[1]


KINDS = ["nanogpt", "encoder", "gpt2", "llama", "qwen2", "bert", "deepseek_v3", "gemma2", "gemma3", "qwen3_next",
         "falcon"]


def build(kind):
    torch.manual_seed(0)
    return {"nanogpt": nano_gpt, "encoder": encoder}.get(kind, lambda: hf_model(kind))()


def output_and_grads(model, kind, device, dtype, autocast):
    """The output (outputs_of) and every parameter's gradient of the loss
    (None where unused), with the model in `dtype`, inside a bf16 autocast
    region or not. The rule judges the output element by element, not the
    mean loss: one scalar is one sample of rounding noise (benchmarks/NOTES.md,
    "Logit soft cap")."""
    model = model.to(dtype).train()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        output, loss = outputs_of(model, kind, device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    return [output] + list(torch.autograd.grad(loss, params, allow_unused=True))


def check_all(names, out, ref, pt):
    """The rule for each named output or gradient; None (a parameter the loss
    does not reach) where the reference has None."""
    for name, o, r, p in zip(names, out, ref, pt, strict=True):
        if r is None:
            assert o is None, name
            continue
        assert_close(o, r, p, name)


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


def sharp_hf_model(kind, device, layers=None):
    """build(kind) (with `layers` decoder layers) on `device`, its matrices
    drawn at std 0.3: HF's init (0.02) leaves attention near uniform, where
    a key seen or missed is within bf16 noise."""
    model = build(kind)
    if layers:
        config = copy.deepcopy(model.config)
        config.num_hidden_layers = layers
        model = type(model)(config)
    model = model.to(device)
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
    from pyext.patch.hf_attention import _windows_trusted
    assert _windows_trusted(patched.config) and not _windows_trusted(pyext.unpatch(patched).config)


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


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_an_hf_sliding_window_given_no_mask_is_the_layers_band(causal):
    """An HF attention call with no mask and a sliding window W, on a model
    whose windows pyext applies itself: key j seen by query i iff
    i - W < j <= i in a causal layer, |i - j| < W in a bidirectional one
    (ModernBERT's local attention; FlashAttention's window (W - 1, W - 1) in
    transformers' integration): within the rule against the band mask."""
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
    out = _hf_attention(sdpa_attention_forward, "triton", Layer(), *(t.bfloat16() for t in (q, k, v)), None,
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
    import weakref
    from pyext.patch import hf_attention

    class Config:
        pass

    class Layer:
        is_causal, config = True, Config()
    layer, lengths = Layer(), [5, 4, 7]
    monkeypatch.setitem(hf_attention._flash_before, id(layer.config), weakref.ref(layer.config))
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
    monkeypatch.delitem(hf_attention._flash_before, id(layer.config))
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
    torch.testing.assert_close(mha(x, memory, memory, need_weights=False)[0], expected_cross)
    assert calls == [1, 1]
    mha(x, x, x, need_weights=True)  # weights asked for: torch's own path
    assert calls == [1, 1]


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
    torch's forward refuses, and an integer mask are torch's forward's:
    its results, warnings and errors."""
    mha = pyext.patch(torch.nn.MultiheadAttention(16, 2, batch_first=True), backend="triton")
    x = torch.randn(2, 5, 16)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    with pytest.warns(UserWarning, match="mismatched key_padding_mask and attn_mask"):
        mha(x, x, x, need_weights=False, key_padding_mask=padding, attn_mask=torch.zeros(5, 5))
    with pytest.raises(RuntimeError, match="attn_mask"):
        mha(x, x, x, need_weights=False, attn_mask=torch.zeros(4, 5, dtype=torch.bool))
    with pytest.raises(AssertionError, match="only bool and floating types of key_padding_mask"):
        mha(x, x, x, need_weights=False, key_padding_mask=padding.int())
    assert pyext_sdpa_calls == []


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
    encoder is the patched model or inside it. With grad enabled torch takes
    its slow path, and its attention goes through pyext's, as before."""
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(
                32, 4, dim_feedforward=64, dropout=0.0, batch_first=True), num_layers=2)

        def forward(self, x, src_key_padding_mask):
            return self.encoder(x, src_key_padding_mask=src_key_padding_mask)
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


def test_a_checkpointed_block_recomputes_its_functions_through_pyext(pyext_function_calls):
    """The module calling F.layer_norm is routed on its own too, so a block
    that torch.utils.checkpoint recomputes in the backward (outside the
    model's forward) calls pyext again, as its forward did."""
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


def test_a_model_with_nothing_to_swap_says_so(capsys):
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
    pyext.patch(model, attention=False, verbose=True)
    assert "nothing to swap" in capsys.readouterr().out


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


def hf_class(model, name):
    """transformers.models.<model>.modeling_<model>.<name> (skipping where
    this transformers lacks the model or the class: transformers 5.17's
    Nemotron-H has no gated norm class of its own)."""
    module = pytest.importorskip(f"transformers.models.{model}.modeling_{model}")
    if not hasattr(module, name):
        pytest.skip(f"this transformers' {model} has no {name}")
    return getattr(module, name)


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
             "other": (OtherRMSNorm(), "no pyext equivalent"),
             "other_norm": (OtherNormRMSNorm(8), "no pyext equivalent")}
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
            ("llama4", "Llama4TextRMSNorm", (96,)), ("gemma3n", "Gemma3nRMSNorm", (96,)),
            ("moshi", "MoshiRMSNorm", (96,)), ("nanochat", "NanoChatRMSNorm", ()),
            ("deepseek_v4", "DeepseekV4UnweightedRMSNorm", ()), ("gemma", "GemmaRMSNorm", (96,)),
            ("qwen4_exp", "Qwen4ExpTextRMSNorm", (96,)), ("t5", "T5LayerNorm", (96,)),
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
                  ("mamba2", "MambaRMSNormGated", (96, 96)), ("nemotron_h", "NemotronHRMSNormGated", (96, 12)),
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
@pytest.mark.parametrize("model,norm", [("t5", "T5LayerNorm"), ("deberta", "DebertaLayerNorm")], ids=["t5", "deberta"])
def test_a_swapped_norm_matches_its_own_on_mixed_dtypes(model, norm, x_dtype, weight_dtype, backend):
    """x and the parameters of two dtypes. T5's norm: its result in the
    weight's dtype where that is a half one (T5 in half precision, its
    residual stream in float32), in float32 where the weight is. DeBERTa's:
    in float32 either way (torch's promotion)."""
    check_swapped_hf_norm(model, norm, (96,), backend, x_dtype, weight_dtype)


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
