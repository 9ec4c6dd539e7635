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
import contextvars
import importlib.util
import os
from typing import Callable, NamedTuple, Optional

import torch
from torch.autograd import forward_ad

from pyext import _extension_build

BACKENDS = ("auto", "cuda", "triton", "torch")


class BackendUnavailable(RuntimeError):
    """A backend named explicitly cannot serve this call."""


def _check_name(name: str, what: str = "backend") -> str:
    if name not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS}, got {name!r}")
    return name


_default = _check_name(os.environ.get("PYEXT_BACKEND", "auto"), "PYEXT_BACKEND (in the environment)")
# use_backend's choice, in the thread (or asyncio task) that made it, over the process's _default
_scoped: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("pyext_use_backend", default=None)


def set_backend(name: str) -> None:
    """Set the backend used by calls that pass no `backend=`, in every thread
    (a use_backend block still decides inside it)."""
    global _default
    _default = _check_name(name)


def get_backend() -> str:
    """The backend of calls that pass no `backend=`, here and now."""
    return _scoped.get() or _default


@contextlib.contextmanager
def use_backend(name: str):
    """`with pyext.use_backend("triton"): ...` — the default backend inside
    the block, for this thread (or asyncio task) alone, as torch's no_grad
    and autocast are: other threads keep theirs, and blocks that overlap in
    several threads each restore their own."""
    token = _scoped.set(_check_name(name))
    try:
        yield
    finally:
        _scoped.reset(token)


# What this machine can run, decided once at import.
def _extension_status():
    """(built and loaded, why (not), what setup.py recorded of the build)."""
    spec = importlib.util.find_spec("pyext._C")
    if spec is None:
        source = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if os.path.exists(os.path.join(source, "setup.py")) and os.path.isdir(os.path.join(source, "csrc")):
            # an editable install, or Python run from the checkout (python -m puts it first on the path)
            return False, (f"this pyext is the source folder {source}, whose CUDA extension pyext._C is not "
                           "built: `make ext` or `pip install -v --no-build-isolation -e .` there builds it (an "
                           "installed pyext is the one imported from other folders)"), {}
        return False, ("the CUDA extension pyext._C is not built (pyext was installed without nvcc or a CUDA "
                       "build of torch, or with PYEXT_SKIP_CUDA_BUILD=1; `pip install -v --no-build-isolation .` "
                       "with both present builds it)"), {}
    record = _extension_build.read_record(os.path.dirname(spec.origin))
    problem = None if record is None else \
        _extension_build.version_problem(record, torch.__version__, torch.version.cuda)
    if problem is not None:  # checked before loading: a mismatched _C may crash as it registers its ops
        return False, problem, {}
    try:
        from pyext import _C  # noqa: F401  (registers torch.ops.pyext.*_cuda)
    except ImportError as e:
        return False, f"the CUDA extension pyext._C does not load ({e})", {}
    return True, "the CUDA extension pyext._C is built", record or {}


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


CUDA_BUILT, _CUDA_BUILD_NOTE, _BUILD_RECORD = _extension_status()
TRITON_INSTALLED, _TRITON_NOTE = _triton_status()
# Triton's interpreter runs its kernels on CPU tensors (slowly): for tests.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


_gpu_problems = {}  # (backend, device index) -> why its kernels cannot run on that GPU, or None


def _triton_gpu_problem(capability: tuple, gpu: str) -> Optional[str]:
    """Why pyext's Triton kernels cannot run on a GPU, or None: they are
    written and tested for NVIDIA GPUs of compute capability 8.0 and newer."""
    if torch.version.hip is not None:
        return f"pyext's Triton kernels are written for NVIDIA GPUs (PTX math, TMA), and this is {gpu} under ROCm"
    if capability < (8, 0):
        return (f"pyext's Triton kernels need compute capability 8.0 or newer (bf16 tensor cores, cp.async), "
                f"and this GPU ({gpu}) is {capability[0]}.{capability[1]}")
    return None


@torch.compiler.assume_constant_result  # torch.compile calls it at trace time, its answer a constant
def gpu_problem(backend: str, device: torch.device) -> Optional[str]:
    """Why kernel backend "cuda" or "triton" cannot run on this CUDA device,
    or None: for cuda, the built extension's architectures against the
    device's compute capability; for triton, the GPUs its kernels are for.
    Asked of the driver once per backend and device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if (backend, index) not in _gpu_problems:
        capability, gpu = torch.cuda.get_device_capability(index), torch.cuda.get_device_name(index)
        _gpu_problems[backend, index] = _extension_build.arch_problem(_BUILD_RECORD, capability, gpu) \
            if backend == "cuda" else _triton_gpu_problem(capability, gpu)
    return _gpu_problems[backend, index]


class BackendStatus(NamedTuple):
    available: bool
    reason: str


def available_backends() -> dict:
    """Each backend, whether it can run on this machine, and why (not)."""
    gpu = torch.cuda.is_available()
    no_gpu = "no CUDA GPU is visible to torch"
    cuda_gpu_problem = gpu_problem("cuda", torch.device("cuda")) if gpu and CUDA_BUILT else None
    triton_gpu_problem = gpu_problem("triton", torch.device("cuda")) if gpu and TRITON_INSTALLED else None
    if not CUDA_BUILT:
        cuda = BackendStatus(False, _CUDA_BUILD_NOTE)
    elif cuda_gpu_problem is not None:
        cuda = BackendStatus(False, cuda_gpu_problem)
    else:
        cuda = BackendStatus(gpu, _CUDA_BUILD_NOTE + ("" if gpu else f", but {no_gpu}"))
    if not TRITON_INSTALLED:
        triton_status = BackendStatus(False, _TRITON_NOTE)
    elif triton_gpu_problem is not None:
        triton_status = BackendStatus(False, triton_gpu_problem)
    elif gpu:
        triton_status = BackendStatus(True, _TRITON_NOTE + " on the GPU")
    elif TRITON_INTERPRET:
        triton_status = BackendStatus(True, _TRITON_NOTE + " under TRITON_INTERPRET=1 (CPU tensors, slow)")
    else:
        triton_status = BackendStatus(False, f"{_TRITON_NOTE}, but {no_gpu} (TRITON_INTERPRET=1 runs it on CPU)")
    return {
        "auto": BackendStatus(True, "picks, per call, the first of cuda, triton, torch that runs it "
                                    "(attention skips cuda until its kernels pass a GPU run)"),
        "cuda": cuda,
        "triton": triton_status,
        "torch": BackendStatus(True, "the PyTorch reference implementation"),
    }


PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)  # no __torch_dispatch__ of their own


def _tensor_kind_reason(tensors, dtensors: bool = False) -> Optional[str]:
    """Why the kernels, which index dense strided memory, cannot take one of
    these tensors, or None. A DTensor (tensor parallelism's activations)
    goes to an op only where it has sharding rules (dtensors: the norms' and
    GELU's, ops/sharding.py), and then every tensor must be one, on one mesh
    (DTensor's dispatch refuses a mix); torch's own ops have rules for all."""
    meshes = set()
    for t in tensors:
        if t.is_nested or t.layout != torch.strided:
            return f"it takes dense strided tensors, got a {'nested' if t.is_nested else str(t.layout)} tensor"
        if type(t) not in PLAIN_TENSOR_TYPES and is_dtensor(t):
            if not dtensors:
                return "it takes local tensors, got a DTensor (torch's own op knows its sharding)"
            meshes.add(t.device_mesh)
    if meshes and (len(meshes) > 1 or not all(is_dtensor(t) for t in tensors)):
        return ("it takes DTensors on one mesh for every tensor argument or for none, got a mix (torch's own op "
                "knows how to place them)")
    return None


def is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(t, DTensor)


def device_reason(backend: str, *tensors: torch.Tensor, dtensors: bool = False) -> Optional[str]:
    """Why `backend` cannot take these tensors at all, or None. dtensors:
    the op has sharding rules, so DTensors are fine (all on one mesh).

    The per-op checks (dtype, sizes, options) come on top of this.
    """
    if backend == "torch":
        return None
    reason = _tensor_kind_reason(tensors, dtensors)
    if reason is not None:
        return reason
    if backend == "cuda":
        if not CUDA_BUILT:
            return _CUDA_BUILD_NOTE
        if not all(t.is_cuda for t in tensors):
            return "it needs CUDA tensors, got " + ", ".join(sorted({str(t.device) for t in tensors}))
        return gpu_problem("cuda", tensors[0].device) if tensors else None
    if backend == "triton":
        if not TRITON_INSTALLED:
            return _TRITON_NOTE
        if all(t.is_cuda for t in tensors):
            return gpu_problem("triton", tensors[0].device) if tensors else None
        if TRITON_INTERPRET and not any(t.is_cuda for t in tensors):
            return None
        return ("it needs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got "
                + ", ".join(sorted({str(t.device) for t in tensors})))
    raise ValueError(f"unknown backend {backend!r}")


def is_auto(backend: Optional[str]) -> bool:
    """Whether a call passing `backend=` asks for "auto" (itself or by default)."""
    return (backend if backend is not None else get_backend()) == "auto"


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
    name = _check_name(backend) if backend is not None else get_backend()
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
