"""The Stage 1 CUDA FlashAttention kernels (mma.sync, sm_80+), run on the CPU.

tests/cuda_emulation compiles the kernels' own source as host C++ with a
stand-in for the PTX wrappers written from the PTX ISA, runs each thread of a
block as a fiber, and launches them with the real launchers' grids and shared
memory (see simt.h and common/mma.cuh there for what it checks and what it
cannot). Out, lse, dq, dk and dv meet the rule as check_flash's do on a GPU;
every output sits between guards that must come back untouched, and every
copy must read inside its input. No GPU needed: g++ and the CUDA toolkit's
headers (nvcc's own; the nvidia wheels lack crt/)."""
import ctypes
import fcntl
import glob
import hashlib
import os
import re
import shutil
import subprocess
import tempfile

import pytest
import torch

from attention_checks import assert_all_close, torch_attention
from conftest import make_tensor
from pyext import reference

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EMULATION = os.path.join(HERE, "cuda_emulation")
MODES = ["eager", "lazy", "serial"]  # emu::Mode: cp.async done at issue / at its wait; warps one at a time
GUARD = 64  # elements each side of every output
SENTINEL = 1234.0


def cuda_include_dir():
    """The toolkit's include folder (cuda_runtime.h, cuda_fp16.h and the crt/ they include): CUDA_HOME's,
    else the one nvcc says it runs from (its dry run prints _HERE_=<toolkit>/bin, as setup.py reads it)."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if shutil.which("nvcc"):
        dry = subprocess.run(["nvcc", "--dryrun", "-x", "cu", "-E", os.devnull], capture_output=True, text=True)
        homes += [os.path.dirname(os.path.normpath(m)) for m in re.findall(r"_HERE_=(\S+)", dry.stdout + dry.stderr)]
    dirs = [os.path.join(h, "include") for h in homes if h]
    return next((d for d in dirs if os.path.exists(os.path.join(d, "crt", "host_config.h"))), None)


def sources():
    """What the emulator is built from: its own files and the kernels' folders."""
    folders = [EMULATION, os.path.join(ROOT, "csrc", "flash_attention"), os.path.join(ROOT, "csrc", "common")]
    return [f for d in folders for f in sorted(glob.glob(os.path.join(d, "**", "*.*"), recursive=True))]


@pytest.fixture(scope="module")
def emulator():
    """The compiled emulator (tests/cuda_emulation), built once per source version (~15 s)."""
    include, compiler = cuda_include_dir(), shutil.which("g++")
    if include is None or compiler is None:
        pytest.skip("needs g++ and the CUDA toolkit's headers to compile the kernels as host code")
    digest = hashlib.sha256(b"".join(open(f, "rb").read() for f in sources()) + include.encode()).hexdigest()[:16]
    path = os.path.join(tempfile.gettempdir(), f"pyext-cuda-emulation-{digest}.so")
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # pytest-xdist workers: one builds, the others wait for it
        if not os.path.exists(path):
            partial = path + f".{os.getpid()}"
            out = subprocess.run([compiler, "-std=c++17", "-O2", "-shared", "-fPIC", "-Wno-attributes",
                                  "-Wno-unknown-pragmas", "-I", EMULATION, "-I", os.path.join(ROOT, "csrc"),
                                  "-I", include, os.path.join(EMULATION, "flash_attention_emulated.cpp"),
                                  "-o", partial], capture_output=True, text=True, timeout=600)
            assert out.returncode == 0, out.stderr[-5000:]
            os.replace(partial, path)
    lib = ctypes.CDLL(path)
    for name in ("emulate_flash_fwd", "emulate_flash_bwd"):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_char_p
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    assert lib.flash_attn_params_size() == ctypes.sizeof(FlashAttnParams)
    return lib


class FlashAttnParams(ctypes.Structure):
    """csrc/flash_attention/flash_attention.h's struct, field for field."""
    _fields_ = ([(n, ctypes.c_void_p) for n in ("q", "k", "v")]
                + [(f"{t}_{s}_stride", ctypes.c_int64) for t in "qkv" for s in ("batch", "head", "row")]
                + [(n, ctypes.c_void_p) for n in ("out", "lse", "dout", "delta", "dq", "dk", "dv")]
                + [(n, ctypes.c_int) for n in ("batch", "heads_q", "heads_kv", "seq_q", "seq_k", "head_dim")]
                + [("scale", ctypes.c_float), ("causal", ctypes.c_bool), ("causal_offset", ctypes.c_int)])


def params(q, k, v, scale, causal, offset):
    """As make_params in flash_attention_api.cpp fills it."""
    p = FlashAttnParams(q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr())
    for name, t in zip("qkv", (q, k, v)):
        for i, s in enumerate(("batch", "head", "row")):
            setattr(p, f"{name}_{s}_stride", t.stride(i))
    p.batch, p.heads_q, p.seq_q, p.head_dim = q.shape
    p.heads_kv, p.seq_k = k.shape[1], k.shape[2]
    p.scale, p.causal = scale, causal
    p.causal_offset = max(-p.seq_q, min(offset, p.seq_k))
    return p


def guarded(shape, dtype):
    """A NaN-poisoned tensor of `shape` inside a buffer whose GUARD elements each side hold SENTINEL."""
    n = torch.Size(shape).numel()
    buffer = torch.full((n + 2 * GUARD,), SENTINEL, dtype=dtype)
    inside = buffer[GUARD:GUARD + n].view(shape)
    inside.fill_(float("nan"))
    return buffer, inside


def span(t):
    """[first, one past the last) byte address of the elements of view t."""
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return [t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()]


def call(fn, p, dtype, mode, inputs, outputs):
    readable = (ctypes.c_void_p * (2 * len(inputs)))(*[a for t in inputs for a in span(t)])
    fault = fn(ctypes.byref(p), int(dtype == torch.bfloat16), MODES.index(mode), readable, len(inputs)).decode()
    assert not fault, fault
    for name, (buffer, _) in outputs.items():
        assert (buffer[:GUARD] == SENTINEL).all() and (buffer[-GUARD:] == SENTINEL).all(), \
            f"{name}: a kernel wrote outside it"


def emulated(lib, q, k, v, dout, scale, causal, offset, mode):
    """out, lse, dq, dk, dv from the emulated kernels, as flash_attn_fwd_cuda and flash_attn_bwd_cuda give them."""
    b, hq, sq, d = q.shape
    out, lse = guarded(q.shape, q.dtype), guarded((b, hq, sq), torch.float32)
    p = params(q, k, v, scale, causal, offset)
    p.out, p.lse = out[1].data_ptr(), lse[1].data_ptr()
    call(lib.emulate_flash_fwd, p, q.dtype, mode, (q, k, v), {"out": out, "lse": lse})

    delta = guarded((b, hq, sq), torch.float32)
    grads = {"dq": guarded(q.shape, q.dtype), "dk": guarded(k.shape, k.dtype), "dv": guarded(v.shape, v.dtype)}
    p.dout, p.delta = dout.data_ptr(), delta[1].data_ptr()
    p.dq, p.dk, p.dv = (grads[n][1].data_ptr() for n in ("dq", "dk", "dv"))
    call(lib.emulate_flash_bwd, p, q.dtype, mode, (q, k, v, dout, out[1]), {"delta": delta, **grads})
    return [out[1], lse[1]] + [grads[n][1] for n in ("dq", "dk", "dv")]


# (batch, query heads, key heads, Sq, Sk, head dim): every head-dim kernel
# (32 ... 256, and dims padded up to one), GQA, Sq != Sk, Sq = 1, blocks
# of 64 queries and 16-64 keys with rows and keys past them.
SHAPES = [
    (1, 2, 1, 70, 200, 64),
    (2, 2, 2, 1, 33, 40),
    (1, 1, 1, 65, 47, 128),
    (1, 3, 1, 19, 70, 96),
    (1, 2, 2, 33, 17, 256),
    (1, 1, 1, 40, 70, 160),
    (1, 2, 1, 17, 33, 200),
    (1, 1, 1, 9, 130, 24),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_stage1_kernels_match_oracle(emulator, shape, dtype, causal, mode):
    """flash_attention's semantics (bottom-right causal, offset Sk - Sq); the
    inputs as (B, S, H, D) views for two of the modes, so strides are read."""
    b, hq, hk, sq, sk, d = shape
    layout = "bshd" if mode != "eager" else "contiguous"
    q = make_tensor((b, sq, hq, d), dtype, "cpu").transpose(1, 2) if layout == "bshd" else \
        make_tensor((b, hq, sq, d), dtype, "cpu")
    k, v = ((make_tensor((b, sk, hk, d), dtype, "cpu").transpose(1, 2) if layout == "bshd" else
             make_tensor((b, hk, sk, d), dtype, "cpu")) for _ in range(2))
    dout = torch.randn(b, hq, sq, d).to(dtype)
    scale, offset = d ** -0.5, sk - sq
    outs = emulated(emulator, q, k, v, dout, scale, causal, offset, mode)

    def run(attention, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        o, lse = attention(*leaves, scale, causal, offset)
        return [o, lse] + list(torch.autograd.grad(o, leaves, dout.to(dtype)))

    ref = run(lambda *a: reference.attention(*a[:3], scale=a[3], causal=a[4], causal_offset=a[5]), torch.float64)
    pt = run(torch_attention, dtype)
    assert_all_close(["out", "lse", "dq", "dk", "dv"], outs, ref, pt)
