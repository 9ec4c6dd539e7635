"""The notes of a patch report about attention calls: what those pyext takes
will do where it is not plain (dropout, masks, a soft cap, sinks)."""
from typing import List

import torch

from pyext import _backend
from pyext.ops import attention
from pyext.patch.hf_attention import _hf_sinks, _hf_softcap, _native_windows_apply


# the attention dropout probability in HF configs, by the names models give it
_HF_ATTENTION_DROPOUT = ("attn_pdrop", "attention_probs_dropout_prob", "attention_dropout")


def _triton_only_outcome(backend, auto_order, theirs: str, feature: str):
    """What attention calls with a feature that the Triton kernels have and
    the CUDA ones do not will do: run torch's SDPA under auto while the
    Triton kernels are not in its `auto_order` (until measured faster), raise
    under backend "cuda"; None (nothing to note) otherwise."""
    if _backend.is_auto(backend) and "triton" not in auto_order:
        return f"run torch's SDPA (pyext's {theirs} the Triton kernels', backend='triton')"
    if backend == "cuda":
        return f"raise (the CUDA kernels have no {feature})"
    return None


def _attention_dropout_notes(model, backend) -> List[str]:
    """Attention with dropout, which the Triton kernels have and the CUDA ones
    do not: in training those calls run torch's SDPA under auto (until the
    Triton dropout is measured faster: SDPA_DROPOUT_AUTO_ORDER), and raise
    under backend "cuda". GPT-2's and BERT's HF configs default to 0.1."""
    outcome = _triton_only_outcome(backend, attention.SDPA_DROPOUT_AUTO_ORDER, "dropout is", "dropout")
    if outcome is None:
        return []
    config = getattr(model, "config", None)
    settings = config.to_dict() if hasattr(config, "to_dict") else {}
    notes = [f"attention dropout {settings[k]} ({k} in the config): in training its calls {outcome}"
             for k in _HF_ATTENTION_DROPOUT if (settings.get(k) or 0) > 0]
    notes += [f"{path or '<root>'}: dropout {m.dropout}: in training its calls {outcome}"
              for path, m in model.named_modules() if isinstance(m, torch.nn.MultiheadAttention) and m.dropout > 0]
    return notes


def _attention_mask_notes(model, backend) -> List[str]:
    """Attention with a mask, which the Triton kernels have and the CUDA ones
    do not: transformers' models give SDPA one for a padded batch (and for
    sliding-window layers), MultiheadAttention for a key_padding_mask or an
    attn_mask. Under auto those calls run torch's SDPA until the Triton masks
    are measured faster (SDPA_MASK_AUTO_ORDER); under backend "cuda" they raise."""
    outcome = _triton_only_outcome(backend, attention.SDPA_MASK_AUTO_ORDER, "masks are", "mask")
    if outcome is None:
        return []
    notes = []
    if hasattr(getattr(model, "config", None), "_attn_implementation"):
        windows = "; sliding windows over an unpadded batch need none" if _native_windows_apply(model) else \
            ", a sliding window"
        notes.append(f"attention with a mask (a padded batch's attention_mask{windows}): its calls {outcome}")
    notes += [f"{path or '<root>'}: calls with a key_padding_mask or an attn_mask (not the causal hint) {outcome}"
              for path, m in model.named_modules() if isinstance(m, torch.nn.MultiheadAttention)]
    return notes


def _attention_notes(model, backend) -> List[str]:
    """What the attention calls pyext takes will do, where it is not plain:
    a soft cap's or sinks' (torch's SDPA has neither), else dropout's and masks'."""
    softcap = _hf_softcap(model)
    if softcap:
        return _attention_extras_notes(f"attention logit soft cap {softcap} (attn_logit_softcapping in the config)",
                                       "soft cap", backend)
    if _hf_sinks(model):
        return _attention_extras_notes("attention sinks (the modules' s_aux)", "sinks", backend)
    return _attention_dropout_notes(model, backend) + _attention_mask_notes(model, backend)


def _attention_extras_notes(what: str, feature: str, backend) -> List[str]:
    """Attention with a logit soft cap or sinks (`what`), which torch's SDPA
    does not have: under auto its calls run the Triton kernels, with a mask
    or dropout too (the fallback is the reference, S x S); under backend
    "cuda" they raise."""
    where = f"{what}: its calls"
    if _backend.is_auto(backend):
        return [f"{where} run pyext's Triton kernels, with a mask or dropout too (torch's SDPA has no {feature})"]
    if backend == "cuda":
        return [f"{where} raise (the CUDA kernels have no {feature})"]
    if backend == "torch":
        return [f"{where} run pyext's reference, the S x S scores in float32 (torch's SDPA has no {feature})"]
    return []
