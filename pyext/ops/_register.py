"""What every op module needs to register its stages.

CUDA stages are defined in C++ (csrc/<op>/<op>_api.cpp) and only get their
fake implementation and autograd in Python; Triton stages are defined in
Python with torch.library.custom_op. Both are reached as torch.ops.pyext.*.
"""
import torch

from pyext import _backend


def kernel_backends(*ops: str):
    """Kernel backends ("cuda", "triton") whose stages `<op>_<backend>` all
    exist in this process: Triton's always (its ops import Triton lazily), the
    CUDA ones when the extension is built and carries them."""
    names = ("cuda", "triton") if _backend.CUDA_BUILT else ("triton",)
    return [b for b in names if all(hasattr(torch.ops.pyext, f"{op}_{b}") for op in ops)]


def missing_reason(backend: str, table: dict, op: str):
    """Why a kernel backend has no stages for `op` here, or None."""
    if backend != "torch" and backend not in table:
        return f"the CUDA extension pyext._C has no {op} kernels (not in the sources it was built from)"
    return None


def register_stages(op: str, fake_fwd, fake_bwd, setup_context, make_backward):
    """Fake implementations and autograd for `<op>_fwd_<backend>` and
    `<op>_bwd_<backend>` of every kernel backend here; returns the forward
    and backward ops by backend name."""
    fwd, bwd = {}, {}
    for name in kernel_backends(f"{op}_fwd", f"{op}_bwd"):
        fwd[name] = getattr(torch.ops.pyext, f"{op}_fwd_{name}")
        bwd[name] = getattr(torch.ops.pyext, f"{op}_bwd_{name}")
        torch.library.register_fake(f"pyext::{op}_fwd_{name}")(fake_fwd)
        torch.library.register_fake(f"pyext::{op}_bwd_{name}")(fake_bwd)
        torch.library.register_autograd(f"pyext::{op}_fwd_{name}", make_backward(bwd[name]),
                                        setup_context=setup_context)
    return fwd, bwd
