"""CUDA kernels run on the CPU: the Stage 1 FlashAttention kernels (mma.sync,
sm_80+), the LayerNorm / RMSNorm forward and backward, the fused AdamW and
GELU.

tests/cuda_emulation compiles the kernels' own source as host C++ (with a
stand-in for the PTX wrappers written from the PTX ISA), runs each thread of a
block as a fiber, and launches them with the real launchers' grids, threads
and shared memory (see simt.h and common/mma.cuh there for what it checks and
what it cannot). Outputs meet the rule as the GPU tests' do; every output
sits between guards that must come back untouched, and every attention copy
must read inside its input. No GPU needed: g++ and the CUDA toolkit's
headers (nvcc's own; the nvidia wheels lack crt/)."""
import ctypes
import fcntl
import glob
import functools
import hashlib
import itertools
import os
import re
import shutil
import subprocess
import tempfile

import pytest
import torch

import pyext
import test_adamw
import test_gelu
import test_layer_norm
from attention_checks import assert_flash_close, qkv
from conftest import assert_close, make_tensor
from pyext import reference
from pyext.triton_kernels.flash_attention import peaky_scale

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EMULATION = os.path.join(HERE, "cuda_emulation")
# emu::Mode: warps in lockstep, copies done at issue / cp.async at its wait, TMA when nothing else can move /
# warps one at a time / threads in a random order and pace, TMA copies in any order (seeded by emulator_seed)
MODES = ["eager", "lazy", "serial", "random"]
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
    """What the emulators are built from: their own files and csrc/."""
    return [f for d in (EMULATION, os.path.join(ROOT, "csrc"))
            for f in sorted(glob.glob(os.path.join(d, "**", "*.*"), recursive=True))]


def build(name):
    """tests/cuda_emulation/<name>.cpp compiled and loaded, once per version of the sources and command (~20 s)."""
    include, compiler = cuda_include_dir(), shutil.which("g++")
    if include is None or compiler is None:
        pytest.skip("needs g++ and the CUDA toolkit's headers to compile the kernels as host code")
    # -Bsymbolic: the library's own stand-ins for CUDA runtime calls (runtime.h), not a libcudart torch loaded
    command = [compiler, "-std=c++17", "-O2", "-shared", "-fPIC", "-Wl,-Bsymbolic", "-Wno-attributes",
               "-Wno-unknown-pragmas", "-I", EMULATION, "-I", os.path.join(ROOT, "csrc"), "-I", include,
               os.path.join(EMULATION, f"{name}.cpp")]
    digest = hashlib.sha256(b"".join(open(f, "rb").read() for f in sources()) + " ".join(command).encode())
    path = os.path.join(tempfile.gettempdir(), f"pyext-{name}-{digest.hexdigest()[:16]}.so")
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # pytest-xdist workers: one builds, the others wait for it
        if not os.path.exists(path):
            partial = path + f".{os.getpid()}"
            out = subprocess.run(command + ["-o", partial], capture_output=True, text=True, timeout=600)
            assert out.returncode == 0, out.stderr[-5000:]
            os.replace(partial, path)
            for stale in glob.glob(os.path.join(tempfile.gettempdir(), f"pyext-{name}-*.so*")):
                if not stale.startswith(path):  # builds of older sources
                    os.remove(stale)
    return ctypes.CDLL(path)


def flash_library(stage):
    """The attention emulator of a stage ("" Stage 1, "_sm90" Stage 2), built and loaded."""
    lib = build("flash_attention_sm90_emulated" if stage else "flash_attention_emulated")
    for name in ("emulate_flash_fwd" + stage, "emulate_flash_bwd" + stage):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_char_p
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    assert lib.flash_attn_params_size() == ctypes.sizeof(FlashAttnParams)
    if not stage:
        lib.take_ldmatrix_extra_passes.restype = ctypes.c_long
    return lib


@pytest.fixture(scope="module")
def emulator():
    return flash_library("")


# The multiprocessors of the emulated sm_90 device: the persistent forward
# runs one CTA each, so on most test shapes a CTA takes two or more tiles.
SM90_SMS = 2


@pytest.fixture(scope="module")
def sm90_emulator():
    lib = flash_library("_sm90")
    lib.emulator_sms(SM90_SMS)
    return lib


class FlashAttnParams(ctypes.Structure):
    """csrc/flash_attention/flash_attention.h's struct, field for field."""
    _fields_ = ([(n, ctypes.c_void_p) for n in ("q", "k", "v")]
                + [(f"{t}_{s}_stride", ctypes.c_int64) for t in "qkv" for s in ("batch", "head", "row")]
                + [(n, ctypes.c_void_p)
                   for n in ("out", "out_lo", "lse", "dout", "delta", "dq", "dk", "dv", "dq_accum")]
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


def assert_guards_untouched(outputs):
    """outputs: {name: guarded(...)}; no kernel wrote past either end of one."""
    for name, (buffer, _) in outputs.items():
        assert (buffer[:GUARD] == SENTINEL).all() and (buffer[-GUARD:] == SENTINEL).all(), \
            f"{name}: a kernel wrote outside it"


def call(fn, p, dtype, mode, inputs, outputs):
    readable = (ctypes.c_void_p * (2 * len(inputs)))(*[a for t in inputs for a in span(t)])
    fault = fn(ctypes.byref(p), int(dtype == torch.bfloat16), MODES.index(mode), readable, len(inputs)).decode()
    assert not fault, fault
    assert_guards_untouched(outputs)


def emulated(lib, q, k, v, dout, scale, causal, offset, mode, stage="", deterministic=True, with_out_lo=False):
    """out, lse, dq, dk, dv from the emulated kernels (lib's emulate_flash_fwd{stage}
    and emulate_flash_bwd{stage}), as flash_attn_fwd_cuda and flash_attn_bwd_cuda give them,
    out_lo too where that forward stores it (peaky_scale: flash_attention_api.cpp's
    stores_out_lo is the Triton rule), and after them out_lo or None
    if with_out_lo; deterministic=False: Stage 2's backward that adds dQ up in an fp32 buffer."""
    b, hq, sq, d = q.shape
    out, lse = guarded(q.shape, q.dtype), guarded((b, hq, sq), torch.float32)
    p = params(q, k, v, scale, causal, offset)
    p.out, p.lse = out[1].data_ptr(), lse[1].data_ptr()
    forward_outputs = {"out": out, "lse": lse}
    if peaky_scale(scale, d):
        forward_outputs["out_lo"] = guarded(q.shape, q.dtype)
        p.out_lo = forward_outputs["out_lo"][1].data_ptr()
    call(getattr(lib, "emulate_flash_fwd" + stage), p, q.dtype, mode, (q, k, v), forward_outputs)
    read_back = [out[1]] + ([forward_outputs["out_lo"][1]] if p.out_lo else [])

    delta = guarded((b, hq, sq), torch.float32)
    grads = {"dq": guarded(q.shape, q.dtype), "dk": guarded(k.shape, k.dtype), "dv": guarded(v.shape, v.dtype)}
    p.dout, p.delta = dout.data_ptr(), delta[1].data_ptr()
    p.dq, p.dk, p.dv = (grads[n][1].data_ptr() for n in ("dq", "dk", "dv"))
    scratch = {"delta": delta}
    if not deterministic:
        scratch["dq_accum"] = guarded(q.shape, torch.float32)
        p.dq_accum = scratch["dq_accum"][1].data_ptr()
    call(getattr(lib, "emulate_flash_bwd" + stage), p, q.dtype, mode, (q, k, v, dout, *read_back),
         {**scratch, **grads})
    outs = [out[1], lse[1]] + [grads[n][1] for n in ("dq", "dk", "dv")]
    return outs + [read_back[1] if p.out_lo else None] if with_out_lo else outs


# (batch, query heads, key heads, Sq, Sk, head dim): every head-dim kernel
# (32 ... 256, and dims padded up to one), GQA, Sq != Sk, Sq = 1, blocks
# of 64 or 128 queries and 16-64 keys with rows and keys past them.
SHAPES = [
    (1, 2, 1, 140, 200, 64),
    (2, 2, 2, 1, 33, 40),
    (1, 1, 1, 65, 47, 128),
    (1, 3, 1, 19, 70, 96),
    (1, 2, 2, 33, 17, 256),
    (1, 1, 1, 40, 70, 160),
    (1, 2, 1, 17, 33, 200),
    (1, 1, 1, 9, 130, 24),
]


def check_stage(lib, shape, dtype, causal, mode, layout, stage="", offset=None, deterministic=True, scale=None):
    """flash_attention's semantics (bottom-right causal, offset Sk - Sq, unless
    another offset is given; scale 1/sqrt(D) unless another is given): out,
    lse, dq, dk, dv of the emulated kernels by the rule."""
    b, hq, hk, sq, sk, d = shape
    q, k, v = (t.detach() for t in qkv(shape, dtype, "cpu", layout))
    dout = torch.randn(b, hq, sq, d).to(dtype)
    scale = d ** -0.5 if scale is None else scale
    offset = sk - sq if offset is None else offset
    outs = emulated(lib, q, k, v, dout, scale, causal, offset, mode, stage, deterministic)
    assert_flash_close(outs, q, k, v, dout, scale, causal, offset)


# The backward in both modes: deterministic (dK/dV, then dQ in its own
# kernel) and not (dK/dV adding dQ up in fp32 with atomics, then rounded).
BACKWARDS = [pytest.param(True, id="deterministic"), pytest.param(False, id="dq-atomic")]


@pytest.mark.parametrize("deterministic", BACKWARDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_stage1_kernels_match_oracle(emulator, shape, dtype, causal, deterministic):
    """By the rule, and every ldmatrix reading its matrices without a bank
    conflict (the padded tiles' purpose; unpadded ones give thousands)."""
    emulator.take_ldmatrix_extra_passes()
    check_stage(emulator, shape, dtype, causal, "eager", "contiguous", deterministic=deterministic)
    assert emulator.take_ldmatrix_extra_passes() == 0, "ldmatrix bank conflicts"


@pytest.mark.parametrize("deterministic", BACKWARDS)
@pytest.mark.parametrize("mode", ["lazy", "serial"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[4], SHAPES[5]], ids=str)
def test_stage1_kernels_under_other_schedules(emulator, shape, causal, mode, deterministic):
    """Copies landing only at their wait, or each warp run alone to its next
    barrier (what shows a missing __syncthreads or cp.async wait), on the
    shapes with the most key tiles and the 8-warp dK/dV; inputs as (B, S, H,
    D) views, so strides are read."""
    check_stage(emulator, shape, torch.bfloat16, causal, mode, "bshd", deterministic=deterministic)


class NormFwdParams(ctypes.Structure):
    """csrc/layer_norm/layer_norm.h's struct, field for field."""
    _fields_ = ([(n, ctypes.c_void_p) for n in ("x", "weight", "bias", "y", "mean", "rstd")]
                + [("rows", ctypes.c_int64), ("cols", ctypes.c_int64), ("eps", ctypes.c_double),
                   ("rms", ctypes.c_bool)])


class NormBwdParams(ctypes.Structure):
    """csrc/layer_norm/layer_norm.h's struct, field for field."""
    _fields_ = ([(n, ctypes.c_void_p) for n in ("dy", "x", "mean", "rstd", "weight", "dx", "dweight_partial",
                                                "dbias_partial", "dweight", "dbias")]
                + [("rows", ctypes.c_int64), ("cols", ctypes.c_int64), ("partial_rows", ctypes.c_int),
                   ("rms", ctypes.c_bool)])


NORM_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def load_norm_emulator():
    """The LayerNorm / RMSNorm kernels' emulator (also tests/norm_fuzz.py --backend emulated)."""
    lib = build("layer_norm_emulated")
    lib.emulate_norm_fwd.restype = ctypes.c_char_p
    lib.emulate_norm_fwd.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.emulate_norm_bwd.restype = ctypes.c_char_p
    lib.emulate_norm_bwd.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_bool,
                                     ctypes.c_int]
    lib.set_smem_optin.argtypes = [ctypes.c_int]
    assert lib.norm_params_size(0) == ctypes.sizeof(NormFwdParams)
    assert lib.norm_params_size(1) == ctypes.sizeof(NormBwdParams)
    return lib


@pytest.fixture(scope="module")
def norm_emulator():
    return load_norm_emulator()


def address(t):
    return t.data_ptr() if t is not None else None


def norm_dtypes(x, *params):
    """The dtype codes of x and of its parameters (x's when it has none)."""
    param_dtype = next((t.dtype for t in params if t is not None), x.dtype)
    return NORM_DTYPES.index(x.dtype), NORM_DTYPES.index(param_dtype)


def emulated_norm(lib, kind, x, weight, bias, eps, mode):
    """y, mean (None for RMSNorm) and rstd as norm_fwd writes them, x (rows, cols) contiguous."""
    rows, cols = x.shape
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    y, mean, rstd = guarded(x.shape, x.dtype), guarded((rows,), stat), guarded((rows,), stat)
    p = NormFwdParams(x=x.data_ptr(), weight=address(weight), bias=address(bias), y=y[1].data_ptr(),
                      rstd=rstd[1].data_ptr(), rows=rows, cols=cols, eps=eps, rms=kind == "rms_norm")
    p.mean = mean[1].data_ptr() if kind == "layer_norm" else None
    fault = lib.emulate_norm_fwd(ctypes.byref(p), *norm_dtypes(x, weight, bias), MODES.index(mode)).decode()
    assert not fault, fault
    assert_guards_untouched({"y": y, "mean": mean, "rstd": rstd})
    return y[1], (mean[1] if kind == "layer_norm" else None), rstd[1]


def emulated_norm_bwd(lib, dy, x, mean, rstd, weight, bias, mode, sms):
    """dx, dweight, dbias (None where there is no parameter) as norm_bwd gives
    them on a GPU of `sms` multiprocessors; the partial sums NaN-poisoned, so
    stage two reading a row stage one did not write shows."""
    rows, cols = x.shape
    dtypes = norm_dtypes(x, weight, bias)
    p = NormBwdParams(dy=dy.data_ptr(), x=x.data_ptr(), mean=address(mean), rstd=rstd.data_ptr(),
                      weight=address(weight), rows=rows, cols=cols, rms=mean is None)
    fault = lib.emulate_norm_bwd(ctypes.byref(p), *dtypes, MODES.index(mode), True, sms).decode()
    assert not fault, fault
    outputs = {"dx": guarded(x.shape, x.dtype)}
    p.dx = outputs["dx"][1].data_ptr()
    for name, param in (("dweight", weight), ("dbias", bias)):
        if param is not None:
            outputs[name] = guarded((cols,), param.dtype)
            outputs[name + "_partial"] = guarded((p.partial_rows, cols), rstd.dtype)
            setattr(p, name, outputs[name][1].data_ptr())
            setattr(p, name + "_partial", outputs[name + "_partial"][1].data_ptr())
    fault = lib.emulate_norm_bwd(ctypes.byref(p), *dtypes, MODES.index(mode), False, sms).decode()
    assert not fault, fault
    assert_guards_untouched(outputs)
    return [outputs[n][1] if n in outputs else None for n in ("dx", "dweight", "dbias")]


class EmulatedNorm(torch.autograd.Function):
    """layer_norm (bias may be None) or rms_norm (mean is None) over the last
    dim of a contiguous 2-D x, forward and backward on the emulated kernels."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, kind, lib, mode, sms):
        y, mean, rstd = emulated_norm(lib, kind, x, weight, bias, eps, mode)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.lib, ctx.mode, ctx.sms = lib, mode, sms
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        grads = emulated_norm_bwd(ctx.lib, dy.contiguous(), x, mean, rstd, weight, bias, ctx.mode, ctx.sms)
        return (*grads, None, None, None, None, None)


def emulated_norm_fn(kind, lib, mode, sms):
    """EmulatedNorm called as F.layer_norm / F.rms_norm are (for test_layer_norm.check)."""
    if kind == "layer_norm":
        return lambda x, shape, w, b, eps: EmulatedNorm.apply(x, w, b, eps, kind, lib, mode, sms)
    return lambda x, shape, w, eps: EmulatedNorm.apply(x, w, None, eps, kind, lib, mode, sms)


# Row lengths that take each of the forward's launches: one warp a row with
# one vector or several, 64 ... 1024 threads a row, and the chunked kernel
# (past 1024 threads of 16 fp32 / 32 fp16 elements); odd lengths take the
# unvectorized kernels.
NORM_HIDDEN = [1, 7, 64, 256, 1000, 1023, 4096, 8200, 16384 + 8, 40000]


@pytest.mark.parametrize("mode", ["eager", "serial"])
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtypes", [(torch.float32,) * 2, (torch.bfloat16,) * 2, (torch.float16, torch.float32),
                                    (torch.float64,) * 2], ids=str)
@pytest.mark.parametrize("hidden", NORM_HIDDEN)
def test_norm_forward_matches_oracle(norm_emulator, hidden, dtypes, kind, mode):
    """y against the float64 oracle by the rule, on 5 rows with a nonzero
    mean; and rows of one value at 1e3 give the bias exactly (LayerNorm)."""
    dtype, param_dtype = dtypes
    x = test_layer_norm.inputs(5, hidden, dtype, "cpu")
    x[3] = 1000.0 * (3 + torch.randn(()))
    w, b = test_layer_norm.params(kind, (hidden,), param_dtype, "cpu")
    eps = 1e-6
    y, mean, rstd = emulated_norm(norm_emulator, kind, x, w, b, eps, mode)
    fn = getattr(reference, kind)
    args = (w.double(), b.double(), eps) if kind == "layer_norm" else (w.double(), eps)
    ref = fn(x.double(), (hidden,), *args)
    pt = fn(x, (hidden,), *((w, b, eps) if kind == "layer_norm" else (w, eps)))
    assert_close(y, ref, pt, "y")
    if kind == "layer_norm":
        assert mean[3] == x[3, 0].to(mean.dtype) and torch.equal(y[3], b.to(dtype))


# Row lengths that take each of the backward's launches (16 fp32 or 8 fp64
# elements a thread): 32 threads a row (16 rows a block, their partial sums
# added in shared memory) with one vector or several, 64 ... 512 threads a
# row (one row a block at 512, fp32 5000 and fp64 3000 not filling it), and
# the chunked kernel past 8192 (fp32) or 4096 (fp64) elements.
NORM_BWD_HIDDEN = [1, 7, 64, 1000, 1023, 2000, 3000, 5000, 8192, 8200, 12345]


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtypes", [(torch.float32,) * 2, (torch.bfloat16,) * 2, (torch.float16, torch.float32),
                                    (torch.float64,) * 2], ids=str)
@pytest.mark.parametrize("hidden", NORM_BWD_HIDDEN)
def test_norm_backward_matches_oracle(norm_emulator, hidden, dtypes, kind):
    """y, dx, dweight, dbias by the rule (test_layer_norm.check) on 37 rows
    and a GPU of 2 multiprocessors: stage one's blocks loop over the rows,
    the last row group partly past the end."""
    dtype, param_dtype = dtypes
    x = test_layer_norm.inputs(37, hidden, dtype, "cpu")
    w, b = test_layer_norm.params(kind, (hidden,), param_dtype, "cpu")
    test_layer_norm.check(kind, None, x, (hidden,), w, b, eps=1e-6,
                          fn=emulated_norm_fn(kind, norm_emulator, "eager", sms=2))


# Shared memory a block may opt in to: an H100's (every 16-byte-vector row
# prefetched) and an RTX 4090's (fp32 and fp64 rows of 512 threads not: 128 KB).
SMEM_OPTIN = {"sm_90": 232448, "sm_89": 101376}


@pytest.mark.parametrize("optin", sorted(SMEM_OPTIN))
@pytest.mark.parametrize("mode", ["eager", "lazy", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hidden", [256, 4096, 8192])
def test_norm_backward_prefetch(norm_emulator, hidden, dtype, mode, optin):
    """The backward's prefetch of each next row (cp.async into two buffers
    taking turns), where the device grants its shared memory, and the plain
    loads where not: copies landing as soon as issued (eager), as late as
    allowed (lazy), threads interleaved at random; 37 rows on 3 SMs, so
    each block walks several rows and the last row group runs past the end."""
    x = test_layer_norm.inputs(37, hidden, dtype, "cpu")
    w, b = test_layer_norm.params("layer_norm", (hidden,), dtype, "cpu")
    norm_emulator.set_smem_optin(SMEM_OPTIN[optin])
    try:
        test_layer_norm.check("layer_norm", None, x, (hidden,), w, b, eps=1e-6,
                              fn=emulated_norm_fn("layer_norm", norm_emulator, mode, sms=3))
    finally:
        norm_emulator.set_smem_optin(SMEM_OPTIN["sm_90"])


@pytest.mark.parametrize("sms", [1, 3, 1000])
@pytest.mark.parametrize("affine", ["none", "weight", "bias", "both"])
@pytest.mark.parametrize("hidden", [96, 8200])
def test_norm_backward_on_any_grid(norm_emulator, hidden, affine, sms):
    """Stage-one grids from one block to one per row group (17 rows), each
    warp run alone to its next barrier, with and without each parameter."""
    x = test_layer_norm.inputs(17, hidden, torch.bfloat16, "cpu")
    w, b = test_layer_norm.params("layer_norm", (hidden,), torch.float32, "cpu", weight=affine in ("weight", "both"),
                                  bias=affine in ("bias", "both"))
    test_layer_norm.check("layer_norm", None, x, (hidden,), w, b, fn=emulated_norm_fn("layer_norm", norm_emulator,
                                                                                      "serial", sms))


@pytest.mark.parametrize("dtype,offset", test_layer_norm.FAR_FROM_ZERO, ids=str)
@pytest.mark.parametrize("hidden", [131, 8200, 16392])
def test_norm_rows_far_from_zero_are_centered_to_their_spread(norm_emulator, dtype, offset, hidden):
    """test_layer_norm's check on 16 rows: 8200 takes the chunked backward,
    16392 the chunked forward too (float32; float16 rows of it still fit)."""
    test_layer_norm.check_far_from_zero(emulated_norm_fn("layer_norm", norm_emulator, "eager", sms=2), "cpu",
                                        dtype, offset, 16, hidden)


# Stage 2 (forward: tiles of 128 query rows, CTAs looping over them, key
# tiles of 128 in a ring of 3 that goes on from tile to tile;
# dK/dV: 128 keys a block, steps of 64 queries of each head of the group in a
# ring of 2; dQ: 128 query rows, key tiles of 64 in a ring of 2): GQA with a
# partial second query block and 4 key blocks (every ring wraps); D 128 (two
# TMA boxes a tile) with a last tile of one key; Sq = 1 at D 40 (padded to
# 64, TMA zero-filling the columns past d); Sq > Sk (causal rows that see no
# key) at D 120.
SM90_SHAPES = [
    (1, 2, 1, 200, 400, 64),
    (1, 1, 1, 130, 257, 128),
    (2, 1, 1, 1, 70, 40),
    (1, 2, 2, 150, 100, 120),
]


@pytest.mark.parametrize("deterministic", BACKWARDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SM90_SHAPES, ids=str)
def test_stage2_kernels_match_oracle(sm90_emulator, shape, dtype, causal, deterministic):
    check_stage(sm90_emulator, shape, dtype, causal, "eager", "contiguous", stage="_sm90", deterministic=deterministic)


@pytest.mark.parametrize("stage, shape", [("", SHAPES[0]), ("", SHAPES[4]), ("_sm90", SM90_SHAPES[0]),
                                          ("_sm90", SM90_SHAPES[2])], ids=str)
def test_dq_atomic_backward_changes_nothing_but_dq(request, stage, shape):
    """deterministic=False changes how dQ is summed and nothing else: dK and
    dV are the deterministic backward's bit for bit (the same code, in the
    same order); dQ meets the rule (the tests above)."""
    lib = request.getfixturevalue("sm90_emulator" if stage else "emulator")
    b, hq, hk, sq, sk, d = shape
    q, k, v = (t.detach() for t in qkv(shape, torch.bfloat16, "cpu"))
    dout = torch.randn(b, hq, sq, d).to(torch.bfloat16)
    runs = [emulated(lib, q, k, v, dout, d ** -0.5, True, sk - sq, "eager", stage, deterministic)
            for deterministic in (True, False)]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][3:], runs[1][3:]))


@pytest.mark.parametrize("stage", ["", "_sm90"])
def test_a_scale_twice_the_default_stores_out_lo_for_the_backward(request, stage):
    """At 4.0 (25x the default at d 40) rows of P are nearly one-hot, and D =
    rowsum(dO * O) from the rounded out put this seed's dk past the rule
    (1.04x, dq 0.91x): the forward stores out_lo, every element of it, what
    rounding out left out (at most half an ulp of out, and not all zero),
    and the backward that reads both meets the rule (dk 0.74x as the Triton
    path's)."""
    lib = request.getfixturevalue("sm90_emulator" if stage else "emulator")
    shape, scale = (2, 2, 1, 19, 33, 40), 4.0
    torch.manual_seed(88)
    q, k, v = (t.detach() for t in qkv(shape, torch.bfloat16, "cpu"))
    dout = torch.randn(2, 2, 19, 40).to(torch.bfloat16)
    *outs, out_lo = emulated(lib, q, k, v, dout, scale, False, 14, "eager", stage, False, with_out_lo=True)
    assert not out_lo.isnan().any() and out_lo.count_nonzero() > out_lo.numel() // 2
    out = outs[0].float()
    half_ulp = torch.ldexp(torch.ones_like(out), torch.frexp(out).exponent - 9)  # bf16: 8 significant bits
    assert (out_lo.float().abs() <= half_ulp).all()
    assert_flash_close(outs, q, k, v, dout, scale, False, 14)


@pytest.mark.parametrize("deterministic", BACKWARDS)
@pytest.mark.parametrize("mode", ["lazy", "serial"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [SM90_SHAPES[0], SM90_SHAPES[1]], ids=str)
def test_stage2_kernels_under_other_schedules(sm90_emulator, shape, causal, mode, deterministic):
    """TMA copies landing only when no thread can move, or each warp alone
    as far as it can go, the producer last (a consumer that reads a buffer
    before its bytes have landed sees NaN; in the dq-atomic backward, a
    warpgroup that reads the dS^T buffer before the other has written its
    half), on (B, S, H, D) views (the tensor maps' strides)."""
    check_stage(sm90_emulator, shape, torch.bfloat16, causal, mode, "bshd", stage="_sm90",
                deterministic=deterministic)


@pytest.mark.parametrize("mode", ["eager", "serial", "random"])
def test_stage2_forward_warpgroups_take_turns(sm90_emulator, mode):
    """Ping-pong: in every CTA the two consumer warpgroups (1 and 2) issue
    their wgmmas in turns, warpgroup 1 first, whatever the schedule (the
    serial one runs the last warp first), tile after tile: n_blocks + 1 turns
    each a tile, S(0), then S(nb) with P V(nb - 1), then the last P V."""
    shape = SM90_SHAPES[0]
    sm90_emulator.emulator_seed(0)
    check_stage(sm90_emulator, shape, torch.bfloat16, False, mode, "contiguous", stage="_sm90")
    n = sm90_emulator.forward_wgmma_commits(None, None, 0)
    blocks, warpgroups = (ctypes.c_int * n)(), (ctypes.c_int * n)()
    sm90_emulator.forward_wgmma_commits(blocks, warpgroups, n)
    b, hq, _, sq, sk, _ = shape
    tiles, n_blocks = b * hq * -(-sq // 128), -(-sk // 128)
    assert sorted(set(blocks)) == list(range(SM90_SMS)) and tiles > SM90_SMS
    turns_per_cta = []
    for block in set(blocks):
        order = [wg for blk, wg in zip(blocks, warpgroups) if blk == block]
        turns = [wg for wg, _ in itertools.groupby(order)]
        assert turns == [1, 2] * (len(turns) // 2), f"CTA {block}: warpgroups issue in the order {order}"
        turns_per_cta.append(len(turns) // 2)
    assert sum(turns_per_cta) == tiles * (n_blocks + 1) and all(t % (n_blocks + 1) == 0 for t in turns_per_cta)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sms", [1, 4, 7, "one-a-tile"])
def test_stage2_forward_on_any_grid(sm90_emulator, monkeypatch, sms, causal):
    """The persistent forward gives every query tile to one CTA whatever the
    number of CTAs: all in one; 4 and 7, taking 2 or 3 tiles each in the
    forward and backward rounds of the schedule; one a tile
    (PYEXT_FLASH_SM90_PERSISTENT=0). Two shapes of 9 tiles: 3 key tiles
    each, and (causal) 100 keys for 300 queries, so that the first tile
    sees no key (out 0, lse -inf) and loads nothing; the ring and Q's
    barriers go on across the tiles of a CTA."""
    if sms == "one-a-tile":
        monkeypatch.setenv("PYEXT_FLASH_SM90_PERSISTENT", "0")
    else:
        sm90_emulator.emulator_sms(sms)
    try:
        shape = (1, 3, 1, 300, 100 if causal else 260, 64)
        check_stage(sm90_emulator, shape, torch.bfloat16, causal, "random", "contiguous", stage="_sm90")
        n = sm90_emulator.forward_wgmma_commits(None, None, 0)
        blocks, warpgroups = (ctypes.c_int * n)(), (ctypes.c_int * n)()
        sm90_emulator.forward_wgmma_commits(blocks, warpgroups, n)
        ctas = 9 if sms == "one-a-tile" else sms
        assert set(blocks) <= set(range(ctas)) and (causal or set(blocks) == set(range(ctas)))
    finally:
        sm90_emulator.emulator_sms(SM90_SMS)


@pytest.mark.parametrize("offset", [0, -30], ids=["top-left", "30-rows-see-nothing"])
@pytest.mark.parametrize("shape", [SM90_SHAPES[0], SM90_SHAPES[3]], ids=str)
@pytest.mark.parametrize("stage, deterministic", [("", True), ("", False), ("_sm90", True), ("_sm90", False)],
                         ids=["stage1", "stage1-dq-atomic", "stage2", "stage2-dq-atomic"])
def test_causal_offsets(request, stage, deterministic, shape, offset):
    """Causal masks at other alignments than bottom-right: SDPA's top-left
    (offset 0) and one where the first 30 query rows see no key (out 0,
    lse -inf, no gradient), with Sq < Sk and Sq > Sk."""
    lib = request.getfixturevalue("sm90_emulator" if stage else "emulator")
    check_stage(lib, shape, torch.bfloat16, True, "eager", "contiguous", stage, offset, deterministic)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape, seed", [(SM90_SHAPES[0], seed) for seed in range(3)] +
                         [((2, 2, 2, 43, 2, 128), seed) for seed in range(10)], ids=str)
@pytest.mark.parametrize("stage, deterministic", [("", True), ("", False), ("_sm90", True), ("_sm90", False)],
                         ids=["stage1", "stage1-dq-atomic", "stage2", "stage2-dq-atomic"])
def test_random_schedules(request, stage, deterministic, shape, seed, causal):
    """Threads run in a seeded random order and pace, and (Stage 2) TMA
    copies land in any order at random moments, (B, S, H, D) views: on the
    shape where every ring wraps (3 seeds), and on one of a single key tile
    (10 seeds, fast), where a thread often passes one barrier wait only to
    poll at the next: the scheduler must count that as a move, not a
    deadlock (seeds 3, 4 and 7 fail when it does not)."""
    lib = request.getfixturevalue("sm90_emulator" if stage else "emulator")
    lib.emulator_seed(seed)
    check_stage(lib, shape, torch.bfloat16, causal, "random", "bshd", stage, deterministic=deterministic)


class AdamWTensorList(ctypes.Structure):
    """csrc/adamw/adamw.h's struct, field for field."""
    _fields_ = ([(n, ctypes.c_void_p) for n in ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq",
                                                "numel")] + [("count", ctypes.c_int)])


class AdamWHyper(ctypes.Structure):
    """csrc/adamw/adamw.h's struct, field for field."""
    _fields_ = ([("steps", ctypes.c_void_p), ("lr", ctypes.c_double)]
                + [(n, ctypes.c_void_p) for n in ("lr_ptr", "grad_scale", "found_inf")]
                + [("beta1", ctypes.c_double), ("beta2", ctypes.c_double), ("eps", ctypes.c_float),
                   ("weight_decay", ctypes.c_double), ("amsgrad", ctypes.c_bool), ("maximize", ctypes.c_bool)])


ADAMW_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def load_adamw_emulator():
    """The fused AdamW kernel's emulator (also tests/adamw_fuzz.py --backend emulated)."""
    lib = build("adamw_emulated")
    lib.emulate_adamw_step.restype = ctypes.c_char_p
    lib.emulate_adamw_step.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    assert lib.adamw_struct_sizes(0) == ctypes.sizeof(AdamWTensorList)
    assert lib.adamw_struct_sizes(1) == ctypes.sizeof(AdamWHyper)
    return lib


@pytest.fixture(scope="module")
def adamw_emulator():
    return load_adamw_emulator()


def emulated_adamw_step(lib, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, lr_tensor,
                        beta1, beta2, eps, weight_decay, amsgrad, maximize, grad_scale, found_inf):
    """The op adamw_step_cuda, its arguments as pyext.optim stages them, on the emulated kernel."""
    n = len(params)
    if n == 0:
        return

    def pointers(tensors):
        return (ctypes.c_void_p * n)(*[t.data_ptr() for t in tensors] if tensors else [None] * n)
    arrays = [pointers(params), pointers(grads), pointers(exp_avgs), pointers(exp_avg_sqs),
              pointers(max_exp_avg_sqs if amsgrad else None)]
    numel = (ctypes.c_int64 * n)(*[p.numel() for p in params])
    tensor_list = AdamWTensorList(*[ctypes.cast(a, ctypes.c_void_p) for a in arrays],
                                  ctypes.cast(numel, ctypes.c_void_p), n)

    hyper = AdamWHyper(steps.data_ptr(), lr, address(lr_tensor), address(grad_scale), address(found_inf),
                       beta1, beta2, eps, weight_decay, amsgrad, maximize)
    fault = lib.emulate_adamw_step(ADAMW_DTYPES.index(params[0].dtype), ctypes.byref(tensor_list),
                                   ctypes.byref(hyper)).decode()
    assert not fault, fault


class EmulatedAdamW(pyext.optim.AdamW):
    """pyext.optim.AdamW with its kernel backend's staging (steps, lr, GradScaler
    arguments, contiguous copies), stepping through the emulated CUDA kernel."""

    def __init__(self, params, lib, **options):
        super().__init__(params, backend="triton", **options)
        self.lib = lib

    def step(self, closure=None):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(pyext.optim, "_eager_step", lambda name, staged: functools.partial(emulated_adamw_step, self.lib))
            return super().step(closure)


@pytest.mark.parametrize("dtype", ADAMW_DTYPES, ids=str)
@pytest.mark.parametrize("options", test_adamw.OPTIONS, ids=lambda o: "-".join(map(str, o)) or "defaults")
def test_adamw_steps_match_the_oracle(adamw_emulator, dtype, options):
    """test_adamw's step test (shapes from a scalar to 1025 elements, a 0-size
    one, two param groups, a changing lr, params without grads) on the kernel;
    1 - beta2 at 0.9999 with gradients of 1e3, and test_adamw.DECAYS, besides."""
    start = test_adamw.make_params(dtype, "cpu")
    steps = 8
    grads = [[torch.randn(p.shape).to(dtype) if (i + j) % 5 else None for j, p in enumerate(start)]
             for i in range(steps)]
    lrs = [1e-2 * (1 - i / (2 * steps)) for i in range(steps)]
    ours = functools.partial(EmulatedAdamW, lib=adamw_emulator)
    test_adamw.check_steps("cuda", dtype, options, start, grads, lrs, optimizer=ours)
    if dtype == torch.float32 and not options:
        grads = [[1e3 * torch.randn(p.shape) for p in start] for _ in range(3)]
        test_adamw.check_steps("cuda", dtype, dict(betas=(0.99, 0.9999)), start, grads, [1e-2] * 3, optimizer=ours)
        for weight_decay, decay_lrs in test_adamw.DECAYS.values():
            test_adamw.check_steps("cuda", dtype, dict(weight_decay=weight_decay),
                                   *test_adamw.decay_alone("cpu", decay_lrs), optimizer=ours)


@pytest.mark.parametrize("sizes,launches", [(list(range(1, 41)), 2), ([5, 3, 65536 * 320 + 7], 2)],
                         ids=["40-tensors", "321-chunks"])
def test_adamw_launches_split_where_tensors_or_blocks_run_out(adamw_emulator, sizes, launches):
    """40 tensors (36 a launch); a tensor of 321 chunks of 65536 after two
    small ones (320 blocks a launch: its last chunk goes on in a launch of
    its own slot). Every element steps within the rule."""
    start = [torch.randn(n) for n in sizes]
    grads = [[torch.randn(n) for n in sizes] for _ in range(2)]
    ours = functools.partial(EmulatedAdamW, lib=adamw_emulator)
    test_adamw.check_steps("cuda", torch.float32, dict(weight_decay=0.1), start, grads, [1e-2] * 2, optimizer=ours)
    assert adamw_emulator.adamw_launch_count() == launches


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.5, 0.5)], ids=str)
def test_adamw_moments_are_rounded_once(adamw_emulator, betas):
    """test_adamw's check: the moments formed in double, rounded once to float."""
    test_adamw.check_moments_rounded_once(functools.partial(EmulatedAdamW, lib=adamw_emulator),
                                          torch.device("cpu"), betas)


def test_adamw_grad_scaler_skips_the_step_with_inf(adamw_emulator):
    """GradScaler's scale and found_inf, read by the kernel from memory: the
    step with an inf gradient writes nothing, the others unscale (test_adamw's
    GradScaler check)."""
    test_adamw.check_grad_scaler(lambda ps: EmulatedAdamW(ps, adamw_emulator, lr=1e-2, fused=True),
                                 torch.device("cpu"))


@pytest.mark.parametrize("dtype", ADAMW_DTYPES, ids=str)
def test_adamw_scaled_step_leaves_the_gradients_unscaled(adamw_emulator, dtype):
    """test_adamw's check on the kernel: the gradients written back divided
    by the scale, in their dtype (the vector path and the one-at-a-time tail)."""
    test_adamw.check_scaled_step_unscales(lambda ps: EmulatedAdamW(ps, adamw_emulator), torch.device("cpu"), dtype)


class GeluParams(ctypes.Structure):
    """csrc/gelu/gelu.h's struct, field for field."""
    _fields_ = ([(n, ctypes.c_void_p) for n in ("x", "dy", "out")]
                + [("n", ctypes.c_int64), ("tanh_approx", ctypes.c_bool)])


@pytest.fixture(scope="module")
def gelu_emulator():
    lib = build("gelu_emulated")
    lib.emulate_gelu.restype = ctypes.c_char_p
    lib.emulate_gelu.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_bool, ctypes.c_int]
    assert lib.gelu_params_size() == ctypes.sizeof(GeluParams)
    return lib


def emulated_gelu(lib, x, dy, approximate, sms):
    """y (dy None) or dx as gelu_fwd / gelu_bwd write them on a GPU of `sms` multiprocessors."""
    assert x.is_contiguous() and (dy is None or dy.is_contiguous())
    out = guarded(x.shape, x.dtype)
    p = GeluParams(x=x.data_ptr(), dy=address(dy), out=out[1].data_ptr(), n=x.numel(),
                   tanh_approx=approximate == "tanh")
    fault = lib.emulate_gelu(ctypes.byref(p), NORM_DTYPES.index(x.dtype), dy is not None, sms).decode()
    assert not fault, fault
    assert_guards_untouched({"out": out})
    return out[1]


class EmulatedGelu(torch.autograd.Function):
    """F.gelu, forward and backward on the emulated kernels."""

    @staticmethod
    def forward(ctx, x, approximate, lib, sms):
        ctx.save_for_backward(x)
        ctx.approximate, ctx.lib, ctx.sms = approximate, lib, sms
        return emulated_gelu(lib, x, None, approximate, sms)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return emulated_gelu(ctx.lib, x, dy.contiguous(), ctx.approximate, ctx.sms), None, None, None


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", NORM_DTYPES, ids=str)
@pytest.mark.parametrize("aligned", [True, False], ids=["vector", "scalar"])
@pytest.mark.parametrize("n", [1, 7, 4097, 40003])
def test_gelu_matches_oracle(gelu_emulator, n, aligned, dtype, approximate):
    """y and dx by the rule (test_gelu.check_gelu) on a GPU of one
    multiprocessor, whose 8 blocks of 256 threads take several grid-stride
    turns over 40003 elements; an x 16-byte aligned takes the vector kernel
    and its scalar tail, one element past that the scalar kernel."""
    sms = 1
    x = make_tensor((n + 1,), dtype, "cpu", scale=3.0)[(1 - aligned):][:n]
    test_gelu.check_gelu(None, x, approximate,
                         fn=lambda x, approximate: EmulatedGelu.apply(x, approximate, gelu_emulator, sms))
    per_item = 16 // x.element_size() if aligned else 1
    work = n // per_item + 1 if aligned else n
    for dy in (None, torch.ones_like(x)):
        emulated_gelu(gelu_emulator, x, dy, approximate, sms)
        assert gelu_emulator.gelu_last_blocks() == min(8 * sms, -(-work // 256)), "not the kernel expected"
