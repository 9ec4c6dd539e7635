"""What every op module needs to register its stages.

CUDA stages are defined in C++ (csrc/<op>/<op>_api.cpp) and only get their
fake implementation and autograd in Python; Triton stages are defined in
Python with torch.library.custom_op. Both are reached as torch.ops.pyext.*.
"""
from pyext import _backend


def kernel_backends():
    """Kernel backends whose ops exist in this process: "triton" always (its
    ops import Triton lazily), "cuda" when the extension is built."""
    return ("cuda", "triton") if _backend.CUDA_BUILT else ("triton",)
