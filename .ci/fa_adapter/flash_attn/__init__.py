"""A stand-in for FlashAttention's `flash_attn` package that runs pyext, so
that FlashAttention's own tests/test_flash_attn.py can test pyext's kernels
(.ci/fa_adapter/run.sh). Layout as FlashAttention's: (batch, seqlen, heads,
head dim), causal aligned bottom-right (pyext.flash_attention's too). What
pyext does not do (dropout, ALiBi, softcap, a local window, head dims that are
not a multiple of 8, variable lengths, the KV cache) skips the test saying so.
The backend: $PYEXT_FA_BACKEND (auto, cuda or triton; auto when unset)."""
import os

import pytest

import pyext

BACKEND = os.environ.get("PYEXT_FA_BACKEND", "auto")
# .ci/gpu-check's first calls found pyext's CUDA attention hanging or crashing.
CUDA_BROKEN = "cuda-attention-sm80" in os.environ.get("PYEXT_SMOKE_FAILED", "").split()


def unsupported(what):
    pytest.skip(f"pyext does not support {what}")


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    if BACKEND == "cuda" and CUDA_BROKEN:
        pytest.skip("pyext's CUDA attention hung or crashed on its first call in .ci/gpu_smoke.py")
    if dropout_p > 0:
        unsupported("dropout")
    if softcap > 0:
        unsupported("softcap")
    if alibi_slopes is not None:
        unsupported("ALiBi")
    if tuple(int(w) for w in window_size) != (-1, -1):
        unsupported("a local window")
    if q.shape[-1] % 8:
        unsupported(f"head dim {q.shape[-1]} (a multiple of 8 only)")
    out, lse = pyext.flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                                     scale=softmax_scale, return_lse=True, deterministic=deterministic,
                                     backend=BACKEND)
    out = out.transpose(1, 2)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_kvpacked_func(q, kv, *args, **kwargs):
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], *args, **kwargs)


def flash_attn_qkvpacked_func(qkv, *args, **kwargs):
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], *args, **kwargs)


def flash_attn_varlen_func(*args, **kwargs):
    unsupported("variable-length batches")


flash_attn_varlen_kvpacked_func = flash_attn_varlen_qkvpacked_func = flash_attn_varlen_func


def flash_attn_with_kvcache(*args, **kwargs):
    unsupported("a KV cache")
