"""pyext.patch over every transformers architecture with a causal, masked or
seq2seq LM head, or an image-text-to-text one (fed text alone: the vision
tower is built and patched, the text path runs), each built tiny: the
patched model's logits and every gradient in bfloat16 against the original
in float64, by the rule (conftest.assert_close), the original in bfloat16
the yardstick.

    python tests/hf_sweep.py                      # all of them
    python tests/hf_sweep.py llama t5 --timeout 300
    python tests/hf_sweep.py qwen2_5_vl glm4v --images   # an image through the vision tower too

Not a pytest module: some 350 architectures, up to minutes each under
Triton's interpreter (TRITON_INTERPRET=1 where there is no GPU). Each runs
in its own process and prints one line:

    OK       within the rule
    FAIL     the outputs off the rule (the first three)
    ERROR    the stage and the exception: at "build" or "reference" the
             tiny config or the model in float64, not pyext; "patch" or
             "patched run" is pyext's (or a named backend refusing a call)
    TIMEOUT  past --timeout seconds

A FAIL can be the model amplifying rounding rather than a kernel error:
benchmarks/NOTES.md, "pyext.patch over transformers' architectures", says
how to tell.
"""
import argparse
import copy
import math
import os
import subprocess
import sys
import traceback
import warnings

# every dimension a config may name, small; the dropouts off
TINY = dict(num_hidden_layers=2, n_layer=2, num_layers=2, hidden_size=32, n_embd=32, d_model=32,
            intermediate_size=64, ffn_dim=64, d_ff=64, n_inner=64, num_attention_heads=4, n_head=4, num_heads=4,
            num_key_value_heads=2, vocab_size=64, head_dim=8, max_position_embeddings=64, n_positions=64,
            moe_intermediate_size=16, num_experts=4, num_local_experts=4, num_experts_per_tok=2, sliding_window=5,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attention_dropout=0.0, dropout=0.0,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            decoder_start_token_id=1, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, kv_channels=8,
            cross_attention_hidden_size=32, shared_expert_intermediate_size=16, n_routed_experts=4,
            n_shared_experts=1, first_k_dense_replace=2,
            kv_lora_rank=16, q_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_group=1,
            topk_group=1, indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=4,
            indexer_compress_ratio=2, hc_lowrank=8, rotary_dim=4, num_kv_shared_layers=0)

# Where TINY alone builds a model its own code cannot run (besides the MLA
# attentions, whose keys have every query head: build() sets those): the
# hybrids whose default layer kinds put no attention layer among two layers
# (or name none at all: LFM2-MoE, Granite 4, Bamba, Jamba, RecurrentGemma),
# Granite 4's, Bamba's and Mamba 2's Mamba sizes (set for their default
# width); Cohere with the QK norms of Command R+ (per head, a weight of
# (heads, head_dim))
OVERRIDES = {"cohere": dict(use_qk_norm=True),
             "lfm2_moe": dict(layer_types=["conv", "full_attention"]),
             "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"], mamba_n_heads=4,
                                      mamba_d_head=16, mamba_d_state=16),
             "bamba": dict(attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16),
             "jamba": dict(attn_layer_period=2, attn_layer_offset=1),
             "recurrent_gemma": dict(block_types=["recurrent", "attention"]),
             "mamba2": dict(num_heads=4, head_dim=16, n_groups=2, state_size=16)}


# Multimodal rotary embeddings (positions in time, height and width) whose
# sections of head_dim / 2 the model's code fixes for its default head_dim
MROPE = {"qwen2_vl", "qwen2_5_vl", "qwen2_5_omni_thinker", "paddleocr_vl", "glm4v", "glm46v", "glm4v_moe", "glm_ocr",
         "glmga"}


# --images: one image of 4 x 8 patches a row, for the models that take an
# image as Qwen2-VL does (pixel_values of flattened patches, image_grid_thw:
# the Qwen2-VL, Qwen3-VL and GLM-4V families); its tokens take the last ids
# of TINY's vocabulary
IMAGE_GRID = (1, 4, 8)
IMAGE_TOKEN, VISION_START, VIDEO_TOKEN = 63, 62, 61


def head_mappings():
    from transformers.models.auto import modeling_auto as auto
    return (auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
            auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES, auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


def _make_tiny(config):
    """TINY's values on the config and on every config inside it (a
    multimodal model's text, vision and audio towers: at their default
    sizes in float64 they need more memory than a CPU machine has)."""
    from transformers import PretrainedConfig
    for key, value in TINY.items():
        try:
            if hasattr(config, key):
                setattr(config, key, value)
        except Exception:  # a read or write the config refuses (Gemma 4's per-layer head_dim): left as it is
            pass
    for value in list(vars(config).values()):
        if isinstance(value, PretrainedConfig):
            _make_tiny(value)


def _one_layer_of_each_kind(config):
    """Two layers at least, one of each kind config.layer_types names (a
    local one and a global one where it has sliding windows; linear attention
    ones where the model has them)."""
    if not hasattr(config, "layer_types"):
        return
    kinds = list(dict.fromkeys(config.layer_types or []))
    if getattr(config, "sliding_window", None) and set(kinds) <= {"sliding_attention", "full_attention"}:
        kinds = ["sliding_attention", "full_attention"]
    try:
        if kinds:
            config.layer_types = kinds + kinds[-1:] * (2 - len(kinds))
            config.num_hidden_layers = len(config.layer_types)
    except (AttributeError, TypeError, ValueError):
        pass


def _mla_keys_per_head(config):
    """MLA (DeepSeek V2 and V3, Kimi Linear, ...): keys for every query head."""
    try:
        if getattr(config, "kv_lora_rank", None):
            config.num_key_value_heads = config.num_attention_heads
    except Exception:  # a read the config refuses (Dots3's per-layer attributes): left as it is
        pass


def _mrope_sections(config):
    """Sections of the rotary half of TINY's head_dim for MROPE's models."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = dict(config.rope_parameters or {})
    rotary_half = int(head_dim * rope.get("partial_rotary_factor", 1.0)) // 2
    rope["mrope_section"] = [rotary_half - 2 * (rotary_half // 4), rotary_half // 4, rotary_half // 4]
    config.rope_parameters = rope


def _for_images(config, text):
    """The vision tower's output as wide as the text's, a narrow tower
    (Qwen2-VL's embed_dim), and the image tokens' ids inside TINY's vocabulary."""
    vision = getattr(config, "vision_config", None)
    for key, value in (("out_hidden_size", text.hidden_size), ("embed_dim", TINY["hidden_size"])):
        if isinstance(getattr(vision, key, None), int):
            setattr(vision, key, value)
    for layered in (config, text):
        for key, value in (("image_token_id", IMAGE_TOKEN), ("vision_start_token_id", VISION_START),
                           ("video_token_id", VIDEO_TOKEN)):
            if hasattr(layered, key):
                setattr(layered, key, value)


def build(name, images=False):
    """The architecture's LM class on its default config made TINY, two
    layers (a local one and a global one where it has sliding windows; one
    of each kind its config.layer_types names, linear attention say), its
    experts run by a loop (transformers' "eager", which float64 runs), its
    matrices drawn at std 0.3 (HF's 0.02 leaves attention near uniform)."""
    import torch
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    cls = next(m[name] for m in head_mappings() if name in m)
    cls = getattr(transformers, cls[0] if isinstance(cls, (tuple, list)) else cls)
    config = CONFIG_MAPPING[name]()
    text = config.get_text_config(decoder=True)
    if not isinstance(config, cls.config_class) and isinstance(text, cls.config_class):
        config = text  # the text-only LM class of a multimodal model (Llama 4, Qwen3.5, MusicGen's decoder)
    _make_tiny(config)
    for key, value in OVERRIDES.get(name, {}).items():
        setattr(config, key, value)
    if getattr(config, "is_encoder_decoder", False):  # labels shift into the decoder's input after this token
        config.decoder_start_token_id = TINY["decoder_start_token_id"]
    for layered in [config] + ([text] if text is not config else []):  # a multimodal model's text tower too
        _mla_keys_per_head(layered)
        _one_layer_of_each_kind(layered)
    if name in MROPE:
        _mrope_sections(text)
    if images:
        _for_images(config, text)
    config._experts_implementation = "eager"  # grouped_mm, the default, has no float64
    torch.manual_seed(0)
    model = cls(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


def image_inputs(model, ids):
    """ids with one image's tokens a row after its start token, and the
    model's image inputs (IMAGE_GRID's patches, drawn)."""
    import inspect
    import torch
    takes = inspect.signature(model.forward).parameters
    vision = getattr(model.config, "vision_config", None)
    if "image_grid_thw" not in takes or not all(
            hasattr(vision, key) for key in ("in_channels", "temporal_patch_size", "patch_size", "spatial_merge_size")):
        raise TypeError(f"{type(model).__name__} takes no image as Qwen2-VL does (--images feeds that kind)")
    patches = math.prod(IMAGE_GRID)
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    ids = ids.clone()
    ids[:, 3] = VISION_START
    ids[:, 4:4 + patches // vision.spatial_merge_size ** 2] = IMAGE_TOKEN
    inputs = dict(pixel_values=torch.randn(len(ids) * patches, width, generator=torch.Generator().manual_seed(3)),
                  image_grid_thw=torch.tensor([IMAGE_GRID] * len(ids)))
    if "mm_token_type_ids" in takes:  # 1 where the image's tokens are, for the positions of multimodal RoPE
        inputs["mm_token_type_ids"] = (ids == IMAGE_TOKEN).long()
    return ids, inputs


def output_and_grads(model, dtype, images=False):
    import torch
    model = model.to(dtype).train()
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    inputs = {}
    if images:
        ids, inputs = image_inputs(model, ids)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    result = model(input_ids=ids, labels=ids, **inputs)
    params = [p for p in model.parameters() if p.requires_grad]
    return [result.logits] + list(torch.autograd.grad(result.loss, params, allow_unused=True))


def check(name, backend, images=False) -> str:
    """One architecture's line."""
    import torch
    import pyext
    from conftest import assert_close
    stage, refused = "build", ""
    try:
        original = build(name, images)
        stage = "reference"
        ref = output_and_grads(copy.deepcopy(original), torch.float64, images)
        pt = output_and_grads(copy.deepcopy(original), torch.bfloat16, images)
        stage = "patch"
        patched = pyext.patch(copy.deepcopy(original), backend=backend)
        report = pyext.patch_report(patched)
        stage = "patched run"
        try:
            out = output_and_grads(patched, torch.bfloat16, images)
        except pyext.BackendUnavailable as e:  # the named backend refuses its attention: the rest, unrouted
            refused = f"attention unpatched, {backend} refused it ({str(e).split(': ')[-1][:90]}); "
            patched = pyext.patch(copy.deepcopy(original), backend=backend, attention=False)
            report = pyext.patch_report(patched)
            out = output_and_grads(patched, torch.bfloat16, images)
    except Exception as e:
        where = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in traceback.extract_tb(e.__traceback__)
                 if "pyext" in f.filename]
        return f"ERROR at {stage}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:150]} {where[-2:]}"
    names = ["logits"] + [n for n, p in original.named_parameters() if p.requires_grad]
    off = []
    for n, o, r, p in zip(names, out, ref, pt):
        if r is None or p is None:
            continue
        try:
            assert o is not None, f"{n}: no gradient where the original has one"
            assert_close(o, r, p, n)
        except AssertionError as e:
            off.append(str(e).splitlines()[0][:160])
    left = sorted({f"{cls} ({why})" for _, cls, why in report.left})
    summary = f"swapped {len(report.swapped)}, left {left or 'none'}; attention: {report.attention[:70]}"
    return (f"FAIL {len(off)}: {off[:3]}; " if off else "OK; ") + refused + summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="config names (model_type); default: every one with an LM head")
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--timeout", type=float, default=150, help="seconds per architecture")
    parser.add_argument("--images", action="store_true", help="an image through the vision tower too (IMAGE_GRID)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the child process's own run
    args = parser.parse_args()
    if args.one:
        warnings.filterwarnings("ignore")
        import transformers
        transformers.logging.set_verbosity_error()
        print(check(args.names[0], args.backend, args.images), flush=True)
        return
    names = args.names or sorted(set().union(*head_mappings()))
    env = dict(os.environ)
    import torch
    if not torch.cuda.is_available():
        env.setdefault("TRITON_INTERPRET", "1")
    for name in names:
        try:
            child = subprocess.run([sys.executable, __file__, name, "--one", "--backend", args.backend]
                                   + ["--images"] * args.images,
                                   capture_output=True, text=True, timeout=args.timeout, env=env)
            lines = child.stdout.strip().splitlines()
            line = lines[-1] if child.returncode == 0 and lines else \
                f"ERROR: exit {child.returncode}: {(child.stderr.strip().splitlines() or [''])[-1][:150]}"
        except subprocess.TimeoutExpired:
            line = f"TIMEOUT after {args.timeout:.0f} s"
        print(f"{name}: {line}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
