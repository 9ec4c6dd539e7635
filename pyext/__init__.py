"""pyext: fused CUDA and Triton kernels for training transformers in PyTorch.

    import pyext
    y = pyext.gelu(x)                      # like torch.nn.functional.gelu
    opt = pyext.optim.AdamW(model.parameters(), lr=1e-3)  # like torch.optim.AdamW, fused
    pyext.available_backends()             # what runs on this machine, and why not
    with pyext.use_backend("triton"): ...  # or backend="cuda" per call, or PYEXT_BACKEND
"""
from pyext._backend import (BackendUnavailable, available_backends, get_backend, set_backend,
                            use_backend)
from pyext.ops.gelu import gelu
from pyext import nn, optim, reference

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable", "available_backends", "get_backend", "set_backend", "use_backend",
    "gelu", "nn", "optim", "reference",
]
