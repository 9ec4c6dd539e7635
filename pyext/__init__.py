"""pyext: fused CUDA and Triton kernels for training transformers in PyTorch.

    import pyext
    y = pyext.gelu(x)                      # like torch.nn.functional.gelu
    y = pyext.layer_norm(x, (d,), w, b)    # like F.layer_norm; pyext.rms_norm like F.rms_norm
    y = pyext.layer_norm(q, (h, d), w, group_size=d)  # each head normalized alone, a weight per head
    y = pyext.rms_norm_gated(x, z, w)      # rms_norm(x) * w * silu(z), the norm of linear attention layers
    o = pyext.flash_attention(q, k, v, causal=True)  # (B, H, S, D); also scaled_dot_product_attention
    o = pyext.flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k)  # packed (total, H, D), no padding
    pyext.available_backends()             # what runs on this machine, and why not
    with pyext.use_backend("triton"): ...  # or backend="cuda" per call, or PYEXT_BACKEND
"""
from pyext._backend import (BackendUnavailable, available_backends, get_backend, set_backend,
                            use_backend)
from pyext.ops.gelu import gelu
from pyext.ops.layer_norm import layer_norm, rms_norm
from pyext.ops.rms_norm_gated import rms_norm_gated
from pyext.ops.attention import flash_attention, scaled_dot_product_attention
from pyext.ops.attention_varlen import flash_attention_varlen
from pyext.ops import attention_flops  # noqa: F401  (the attention ops' counts for torch's FlopCounterMode)
from pyext import nn, optim, reference
from pyext.patch import patch, patch_report, unpatch

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable", "available_backends", "get_backend", "set_backend", "use_backend",
    "gelu", "layer_norm", "rms_norm", "rms_norm_gated", "flash_attention", "flash_attention_varlen",
    "scaled_dot_product_attention",
    "nn", "optim", "reference", "patch", "patch_report", "unpatch",
]
