"""Backend registry: which implementation serves a call.

Backends: "auto" (default), "cuda" (csrc/, the extension pyext._C),
"triton" (triton_kernels/), "torch" (the reference, pyext.reference).

- "auto" never fails on valid input: the CUDA kernel when the extension is
  built and covers the case, else Triton on a GPU, else the reference.
- A backend named explicitly (per call, `set_backend`, `use_backend` or the
  environment variable PYEXT_BACKEND) runs or raises BackendUnavailable
  saying why; it never falls back silently.
"""
import contextlib
import importlib.util
import json
import os
import re
from typing import Callable, NamedTuple, Optional

import torch
from torch.autograd import forward_ad

BACKENDS = ("auto", "cuda", "triton", "torch")


class BackendUnavailable(RuntimeError):
    """A backend named explicitly cannot serve this call."""


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


_default = _check_name(os.environ.get("PYEXT_BACKEND", "auto"))


def set_backend(name: str) -> None:
    """Set the backend used by calls that pass no `backend=`."""
    global _default
    _default = _check_name(name)


def get_backend() -> str:
    return _default


@contextlib.contextmanager
def use_backend(name: str):
    """`with pyext.use_backend("triton"): ...` — the default backend inside the block."""
    global _default
    previous, _default = _default, _check_name(name)
    try:
        yield
    finally:
        _default = previous


BUILT_WITH = "_C_built_with.json"  # written by setup.py beside _C: the torch and CUDA it was compiled against


def _release(version: Optional[str]) -> Optional[tuple]:
    """(major, minor) of a version string such as "2.14.1+cu130", or None."""
    found = re.match(r"(\d+)\.(\d+)", version or "")
    return (int(found.group(1)), int(found.group(2))) if found else None


def built_with_problem(built_with: dict, torch_version: str, cuda_version: Optional[str]) -> Optional[str]:
    """Why an extension compiled against built_with's torch and CUDA must not
    load into this torch, or None. A C++ extension is bound to the torch
    release it was compiled against (no ABI is kept between releases, and a
    mismatched one may load and then fail or compute garbage), and to its
    CUDA major version; patch releases keep the ABI."""
    built_torch, built_cuda = built_with.get("torch"), built_with.get("cuda")
    same_torch = _release(built_torch) is not None and _release(built_torch) == _release(torch_version)
    same_cuda = _release(built_cuda) is not None and _release(cuda_version) is not None and \
        _release(built_cuda)[0] == _release(cuda_version)[0]
    if same_torch and same_cuda:
        return None
    built = f"torch {built_torch} (CUDA {built_cuda})"
    here = f"torch {torch_version} ({'CUDA ' + cuda_version if cuda_version else 'no CUDA'})"
    return (f"the CUDA extension pyext._C was compiled against {built}, and this is {here}; it runs only with "
            "the torch release it was compiled against. Rebuild it with this torch: `pip install -v "
            "--no-build-isolation .` (without that flag pip compiles against a torch it downloads for the build, "
            "not the one installed; upgrading torch after a build has the same effect)")


def _built_with_problem(folder: str) -> Optional[str]:
    """built_with_problem for the extension in `folder`, from its BUILT_WITH;
    None where there is no such file (an extension built another way)."""
    path = os.path.join(folder, BUILT_WITH)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            built_with = json.load(f)
    except (OSError, ValueError):
        built_with = {}  # unreadable: the versions are unknown, so not this torch's
    return built_with_problem(built_with if isinstance(built_with, dict) else {}, torch.__version__,
                              torch.version.cuda)


# What this machine can run, decided once at import.
def _extension_status():
    spec = importlib.util.find_spec("pyext._C")
    if spec is None:
        return False, ("the CUDA extension pyext._C is not built (pyext was installed without nvcc or a CUDA "
                       "build of torch, or with PYEXT_SKIP_CUDA_BUILD=1; `pip install -v --no-build-isolation .` "
                       "with both present builds it)")
    problem = _built_with_problem(os.path.dirname(spec.origin))
    if problem is not None:  # checked before loading: a mismatched _C may crash as it registers its ops
        return False, problem
    try:
        from pyext import _C  # noqa: F401  (registers torch.ops.pyext.*_cuda)
    except ImportError as e:
        return False, f"the CUDA extension pyext._C does not load ({e})"
    return True, "the CUDA extension pyext._C is built"


def _triton_status():
    try:
        import triton  # noqa: F401
    except ImportError as e:
        missing = getattr(e, "name", None)
        why = "is not installed" if missing == "triton" else f"cannot be imported ({e})"
        return False, f"triton {why}"
    if importlib.util.find_spec("pyext.triton_kernels") is None:
        return False, ("pyext.triton_kernels is missing: this is pyext's source folder, not an installed "
                       "pyext; install it with `pip install -e .` to run from here")
    return True, f"triton {triton.__version__}"


CUDA_BUILT, _CUDA_BUILD_NOTE = _extension_status()
TRITON_INSTALLED, _TRITON_NOTE = _triton_status()
# Triton's interpreter runs its kernels on CPU tensors (slowly): for tests.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


class BackendStatus(NamedTuple):
    available: bool
    reason: str


def available_backends() -> dict:
    """Each backend, whether it can run on this machine, and why (not)."""
    gpu = torch.cuda.is_available()
    no_gpu = "no CUDA GPU is visible to torch"
    if not CUDA_BUILT:
        cuda = BackendStatus(False, _CUDA_BUILD_NOTE)
    else:
        cuda = BackendStatus(gpu, _CUDA_BUILD_NOTE + ("" if gpu else f", but {no_gpu}"))
    if not TRITON_INSTALLED:
        triton_status = BackendStatus(False, _TRITON_NOTE)
    elif gpu:
        triton_status = BackendStatus(True, _TRITON_NOTE + " on the GPU")
    elif TRITON_INTERPRET:
        triton_status = BackendStatus(True, _TRITON_NOTE + " under TRITON_INTERPRET=1 (CPU tensors, slow)")
    else:
        triton_status = BackendStatus(False, f"{_TRITON_NOTE}, but {no_gpu} (TRITON_INTERPRET=1 runs it on CPU)")
    return {
        "auto": BackendStatus(True, "picks cuda, then triton, then torch, per call"),
        "cuda": cuda,
        "triton": triton_status,
        "torch": BackendStatus(True, "the PyTorch reference implementation"),
    }


PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)  # no __torch_dispatch__ of their own


def _tensor_kind_reason(tensors) -> Optional[str]:
    """Why the kernels, which index dense strided memory, cannot take one of
    these tensors, or None. A DTensor (tensor parallelism's activations) has
    no sharding rule for our ops; torch's own op has one."""
    for t in tensors:
        if t.is_nested or t.layout != torch.strided:
            return f"it takes dense strided tensors, got a {'nested' if t.is_nested else str(t.layout)} tensor"
        if type(t) not in PLAIN_TENSOR_TYPES and _is_dtensor(t):
            return "it takes local tensors, got a DTensor (torch's own op knows its sharding)"
    return None


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(t, DTensor)


def device_reason(backend: str, *tensors: torch.Tensor) -> Optional[str]:
    """Why `backend` cannot take these tensors at all, or None.

    The per-op checks (dtype, sizes, options) come on top of this.
    """
    if backend == "torch":
        return None
    reason = _tensor_kind_reason(tensors)
    if reason is not None:
        return reason
    if backend == "cuda":
        if not CUDA_BUILT:
            return _CUDA_BUILD_NOTE
        if not all(t.is_cuda for t in tensors):
            return "it needs CUDA tensors, got " + ", ".join(sorted({str(t.device) for t in tensors}))
        return None
    if backend == "triton":
        if not TRITON_INSTALLED:
            return _TRITON_NOTE
        if all(t.is_cuda for t in tensors):
            return None
        if TRITON_INTERPRET and not any(t.is_cuda for t in tensors):
            return None
        return ("it needs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got "
                + ", ".join(sorted({str(t.device) for t in tensors})))
    raise ValueError(f"unknown backend {backend!r}")


def is_auto(backend: Optional[str]) -> bool:
    """Whether a call passing `backend=` asks for "auto" (itself or by default)."""
    return (backend if backend is not None else _default) == "auto"


def _autograd_mode_reason() -> Optional[str]:
    """Why no kernel can serve a call made now, whatever its inputs: an
    autograd mode the kernels' autograd.Functions have no rules for, or None."""
    if torch._C._are_functorch_transforms_active():  # no setup_context/vmap rules
        return "torch.func transforms (vmap, grad, jacrev, ...) are active, and the kernels do not support them"
    if forward_ad._current_level >= 0:  # no jvp rules
        return ("forward-mode AD is active (torch.autograd.forward_ad.dual_level), and the kernels have no "
                "forward-mode (jvp) rules")
    return None


def select(op: str, backend: Optional[str], device: torch.device,
           why_not: Callable[[str], Optional[str]], auto_order=("cuda", "triton")) -> str:
    """The backend that serves one call of `op`.

    why_not(name) returns None when backend `name` can run this call, else the
    reason it cannot (used in the error when that backend was asked for).
    auto_order: the kernel backends "auto" tries, in order, before torch.
    """
    name = _check_name(backend) if backend is not None else _default
    reason = _autograd_mode_reason() if name != "torch" else None
    if reason is not None:
        if name == "auto":
            return "torch"
        raise BackendUnavailable(f"pyext.{op}: backend '{name}' cannot run this call: {reason}")
    if name == "auto":
        if device.type != "cuda":
            return "torch"
        for candidate in auto_order:
            if why_not(candidate) is None:
                return candidate
        return "torch"
    reason = why_not(name)
    if reason is not None:
        raise BackendUnavailable(f"pyext.{op}: backend '{name}' cannot run this call: {reason}")
    return name
