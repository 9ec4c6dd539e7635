"""How the attention kernels read their tiles: through pointers (masked
loads, any GPU) or through tensor descriptors (TMA copies on sm_90 and up),
and the choice between the two per call."""
import contextlib
import os

import torch
import triton

try:  # host-side tensor descriptors (Triton 3.4 on): TMA on sm_90 and up
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None


LOADS_ENV = "PYEXT_TRITON_ATTN_LOADS"
LOADS = ("auto", "pointer", "descriptor")
_loads = None  # set inside use_loads()


def loads_mode():
    """How the kernels read their tiles: use_loads()'s mode, else $PYEXT_TRITON_ATTN_LOADS, else "auto"."""
    mode = _loads or os.environ.get(LOADS_ENV) or "auto"
    if mode not in LOADS:
        raise ValueError(f"{LOADS_ENV}={mode!r}: expected one of {', '.join(LOADS)}")
    return mode


@contextlib.contextmanager
def use_loads(mode: str):
    """Within the block the forward and backward read tiles `mode`'s way: "auto" (descriptors
    on a GPU of compute capability 9 or more when Triton has them and the
    layouts allow, else pointers), "pointer" (always; the Ampere path), or
    "descriptor" (always; an error where the layouts do not allow; on CPU
    tensors under TRITON_INTERPRET=1 too, which is how the tests run it)."""
    global _loads
    if mode not in LOADS:
        raise ValueError(f"use_loads: mode {mode!r} is not one of {', '.join(LOADS)}")
    previous, _loads = _loads, mode
    try:
        yield
    finally:
        _loads = previous


def _has_tma(t):
    """Whether t lives on a GPU with the Tensor Memory Accelerator (compute capability 9.0 and up)."""
    return t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9


def shared_memory_limit(t):
    """Bytes of shared memory one program may use on t's GPU; None off a GPU."""
    return torch.cuda.get_device_properties(t.device).shared_memory_per_block_optin if t.is_cuda else None


def fitting(configs, t, need):
    """The configs whose need(config), bytes of shared memory a program, fits
    on t's GPU (if none does, the one that needs least); all of them off a GPU."""
    limit = shared_memory_limit(t)
    if limit is None:
        return configs
    return [c for c in configs if need(c) <= limit] or [min(configs, key=need)]


def _descriptor_problem(t):
    """Why TMA cannot address t as a (B, H, S, D) tensor, or None: it needs a
    16-byte aligned base, a unit last stride and the other strides positive
    multiples of 16 bytes (so no broadcast dimension)."""
    strides, size = t.stride(), t.element_size()
    if strides[-1] != 1:
        return f"last stride {strides[-1]} is not 1"
    if t.data_ptr() % 16:
        return "base address is not 16-byte aligned"
    if any(s <= 0 or s * size % 16 for s in strides[:-1]):
        return f"strides {strides} of {size}-byte elements are not positive multiples of 16 bytes"
    return None


def _choose(tensors):
    """"descriptor" or "pointer" for a launch whose tiles are these {name: tensor} (see use_loads)."""
    mode = loads_mode()
    if mode == "pointer" or (mode == "auto" and not (TensorDescriptor is not None and _has_tma(tensors["q"]))):
        return "pointer"
    problems = [f"{name}: {why}" for name, t in tensors.items() if (why := _descriptor_problem(t)) is not None]
    if mode == "auto":
        return "pointer" if problems else "descriptor"
    if TensorDescriptor is None:
        raise RuntimeError(f"{LOADS_ENV}=descriptor: Triton {triton.__version__} has no host tensor descriptors")
    if problems:
        raise ValueError(f"{LOADS_ENV}=descriptor: " + "; ".join(problems))
    return "descriptor"


def forward_loads(q, k, v, out):
    """How flash_attn_fwd reads q, k, v and writes out: "descriptor" or "pointer"."""
    return _choose({"q": q, "k": k, "v": v, "out": out})


def backward_loads(q, k, v, dout, dq, dk, dv):
    """How flash_attn_bwd reads q, k, v, dout and writes dq, dk, dv: "descriptor" or "pointer"."""
    return _choose({"q": q, "k": k, "v": v, "dout": dout, "dq": dq, "dk": dk, "dv": dv})


def descriptor(t):
    """Host descriptor over a (B, H, S, D) tensor; its box is set per config (_set_boxes)."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 16, 16])
