"""FlashAttention's Python API (flash_attn 2.x) on pyext's kernels, so that
FlashAttention's own test file runs against ours (issues 4 and 5): run.sh
puts this folder first on the path of a pytest over that file.

The backend is PYEXT_FA_BACKEND ("triton", "cuda" or "auto", default
"triton"), named explicitly, so a call it cannot run raises
pyext.BackendUnavailable, which skips that test with the backend's own
reason. So do the features pyext does not have: ALiBi, a KV cache, and the
dropout pattern that return_attn_probs hands back (FlashAttention's tests
rebuild the reference from it). Layouts are FlashAttention's: q (B, Sq, H, D)
and k, v (B, Sk, Hkv, D), or packed (total, H, D) with cumulative lengths;
pyext takes the (B, H, S, D) view of the same memory, no copy.
"""
import os

import pytest

import pyext

BACKEND = os.environ.get("PYEXT_FA_BACKEND", "triton")


def _unsupported(alibi_slopes, dropout_p, return_attn_probs):
    if alibi_slopes is not None:
        pytest.skip("pyext has no ALiBi")
    if dropout_p > 0 and return_attn_probs:
        pytest.skip("pyext does not return the dropout pattern (S_dmask) the test rebuilds its reference from")


def _window(window_size):
    return tuple(int(w) for w in window_size)  # the tests draw it as a tensor of two


def _run(fn):
    try:
        return fn()
    except pyext.BackendUnavailable as e:
        pytest.skip(str(e))


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    _unsupported(alibi_slopes, dropout_p, return_attn_probs)
    out, lse = _run(lambda: pyext.flash_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal, scale=softmax_scale,
        window_size=_window(window_size), softcap=softcap, dropout_p=dropout_p, return_lse=True,
        deterministic=deterministic, backend=BACKEND))
    out = out.transpose(1, 2)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    k, v = kv.unbind(dim=2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    q, k, v = qkv.unbind(dim=2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    _unsupported(alibi_slopes, dropout_p, return_attn_probs)
    if block_table is not None:
        pytest.skip("pyext has no paged KV cache")
    out, lse = _run(lambda: pyext.flash_attention_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal, scale=softmax_scale,
        window_size=_window(window_size), softcap=softcap, dropout_p=dropout_p, return_lse=True,
        deterministic=deterministic, backend=BACKEND))
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    k, v = kv.unbind(dim=1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    q, k, v = qkv.unbind(dim=1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_with_kvcache(*args, **kwargs):
    pytest.skip("pyext has no KV cache")


__all__ = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache"]
