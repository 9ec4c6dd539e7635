"""The models the pyext.patch tests patch, and how they compare one patched with its original."""
import functools

import pytest
import torch
import torch.nn.functional as F

from benchmarks.train_gpt import GPT, TINY
from conftest import assert_close


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


def decorate_forward(cls, monkeypatch):
    """Wrap cls.forward in a decorator that keeps it as __wrapped__
    (functools.wraps), as transformers 5.24's deprecate_kwarg does its
    attention modules': the forward's own code is then the wrapper's."""
    forward = cls.forward

    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        return forward(*args, **kwargs)
    monkeypatch.setattr(cls, "forward", wrapper)


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


class GELUFunction(torch.nn.Module):
    """A module whose own code calls F.gelu: patch routes its forward."""

    def forward(self, x):
        return F.gelu(x)


class LibraryAttention(torch.nn.Module):
    """Its code in a library whose name starts with "torch" (torchvision's, torchtune's)."""
    __module__ = "torchtune.modules.attention"

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = self.qkv(x).view(*x.shape[:2], 3, 2, 8).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


def saved_and_loaded(model, buffer):
    """The model through torch.save and torch.load, as a checkpoint of the whole module."""
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)
