"""The oracle, the tolerance rule and the input makers every test uses.

Rule (DESIGN.md section 4): for an output or gradient `out` of a kernel run in
dtype d, with `ref` the reference computed in float64 and `pt` the reference
computed in d,

    max|out - ref| <= 2 * max|pt - ref| + FLOOR[d]

and NaN exactly where the reference has NaN. FLOOR is fixed per dtype, a few
units in the last place at magnitude 1; never raise it to make a test pass.

How near the rule each check comes: PYEXT_MARGIN_LOG=FILE appends, for every
check, the test, the name and error / bound (above 1 fails) to FILE, so the
cases whose fresh data now and then lands past the rule can be found before
a CI run does (sort -t$'\t' -k3 -g FILE | tail).
"""
import atexit
import math
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    # Triton kernels run on CPU tensors under the interpreter; it is read when
    # the kernels are defined, so before pyext is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Inductor's FX graph cache keys a compiled graph on the graph, not on the
# custom ops' fake implementations: after an op's outputs change it hands
# back graphs compiled for the old ones (a saved tensor of the wrong rank).
# The compile tests judge the code as it is, with a cache of their own.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="pyext-tests-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import pyext  # noqa: E402
from pyext import _backend  # noqa: E402


def _interpret_float_arguments_as_float32():
    """A GPU launch passes a kernel's Python float argument as float32; the
    interpreter hands the kernel the Python float, so arithmetic on it runs
    in float64 and hides what float32 does there (1.0 - beta2 from 0.9999
    is 1.7e-4 off in float32). Here the interpreter passes it as a float32
    scalar, as the GPU does (every Triton from 3.6 to 3.9 converts its
    arguments in interpreter._implicit_cvt)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    convert = interpreter._implicit_cvt

    def implicit_cvt(arg):
        if type(arg) is float:
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return convert(arg)
    interpreter._implicit_cvt = implicit_cvt


def _patch_the_language_once_a_launch():
    """The interpreter runs a launch with triton.language's builtins swapped
    for interpreted ones (interpreter._patch_lang: inspect.getmembers over
    tl, tl.tensor, tl.math and more, 1.5-2 ms here), then swaps them again
    at every call of a @triton.jit function inside the kernel (our helpers:
    round_to, dot, the attention loads; Triton's: tl.sum, tl.max, which see
    triton.language.core), never undoing that: wrappers already in place
    are left as they are, and the launch's own undo restores tl. A masked
    attention backward makes thousands of such calls. Here a call inside a
    launch skips the swap where the language modules its function sees are
    patched already in this launch: the same interpreted builtins run, and
    an attention test takes a third less time (benchmarks/NOTES.md, "`make
    test`'s time, session 69"). Triton 3.6 to 3.9 call _patch_lang from
    GridExecutor.__call__ (a launch) and InterpretedFunction.__call__ (a
    call inside it); where a Triton does not, every call patches, as before."""
    import inspect
    import triton.language as tl
    from triton.runtime import interpreter

    patch_lang, run_launch = interpreter._patch_lang, interpreter.GridExecutor.__call__
    patched = []  # per launch running, innermost last: the language modules patched in it
    seen = {}  # function -> the language modules among its globals

    def languages(fn):
        if fn not in seen:
            seen[fn] = frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))
        return seen[fn]

    def patch_lang_once(fn):
        if patched and languages(fn) <= patched[-1]:
            return interpreter._LangPatchScope()  # nothing to undo
        scope = patch_lang(fn)
        if patched:
            patched[-1] |= languages(fn)
        return scope

    def launch(self, *args, **kwargs):
        patched.append(set())
        try:
            return run_launch(self, *args, **kwargs)
        finally:
            patched.pop()

    interpreter._patch_lang, interpreter.GridExecutor.__call__ = patch_lang_once, launch


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpret_float_arguments_as_float32()
    _patch_the_language_once_a_launch()

MARGIN_LOG = os.environ.get("PYEXT_MARGIN_LOG")

FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}

# Each backend with the device its tests run on: on a machine with no GPU the
# Triton kernels run under the interpreter on CPU tensors.
BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("triton", id="triton"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]


# The torch.compile backends of the compile tests: aot_eager traces the ops
# through AOTAutograd; Inductor also generates code for the graph around them.
COMPILERS = ["aot_eager", "inductor"]


def device_for(backend: str) -> torch.device:
    if backend == "cuda":
        return torch.device("cuda")
    return torch.device("cuda" if HAS_GPU else "cpu")


# The probes of .ci/gpu_smoke.py (make gpu-check runs it before the tests)
# whose first call hung or crashed, from $PYEXT_SMOKE_FAILED, and the tests
# each one would take down: (file, parameters). Those tests skip saying so,
# rather than spend the run's GPU time on timeouts and broken CUDA contexts.
SMOKE_FAILED = set(os.environ.get("PYEXT_SMOKE_FAILED", "").split())
SMOKE_SCOPE = {
    "cuda-attention-sm80": ("test_attention.py", {"backend": "cuda"}),
    "cuda-attention-sm90": ("test_attention.py", {"cuda_stage": "sm90"}),
    "cuda-adamw": ("test_adamw.py", {"backend": "cuda"}),
    "cuda-layer-norm": ("test_layer_norm.py", {"backend": "cuda"}),
}


def smoke_failure(item):
    """The failed smoke probe that covers this test, or None."""
    params = item.callspec.params if hasattr(item, "callspec") else {}
    for probe in sorted(SMOKE_FAILED):
        file, wanted = SMOKE_SCOPE.get(probe, ("", {}))
        if item.path.name == file and all(params.get(k) == v for k, v in wanted.items()):
            return probe
    return None


# Run first: pytest-xdist hands each worker consecutive tests in this order, and
# a worker busy with a test of minutes near the end keeps the whole run waiting
# (the compile check takes about 5 minutes with an empty Triton cache).
LONGEST_FIRST = ("test_triton_compiles.py", "test_packaging.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in LONGEST_FIRST)  # stable: the rest keep their order
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is visible to torch")
    for item in items:
        if not HAS_GPU and "gpu" in item.keywords:
            item.add_marker(no_gpu)
        probe = smoke_failure(item)
        if probe:
            item.add_marker(pytest.mark.skip(
                reason=f"{probe} hung or crashed on its first call in .ci/gpu_smoke.py (see stages.txt)"))


def assert_close(out, ref, pt, name="output"):
    """The tolerance rule above; `ref` in float64, `pt` in out's dtype."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == pt.dtype, f"{name}: dtype {out.dtype} != {pt.dtype}"
    # compared where the reference lives (the GPU for large cases: no copies back)
    ref = ref.double()
    out64, pt64 = out.double().to(ref.device), pt.double().to(ref.device)
    nan = ref.isnan()
    assert torch.equal(out64.isnan(), nan), f"{name}: NaN where the reference has none, or the reverse"
    if out64.numel() == 0:
        return
    assert torch.equal(out64.isinf() & ~nan, ref.isinf()), f"{name}: inf pattern differs"
    finite = ref.isfinite()
    assert torch.equal(out64[ref.isinf()], ref[ref.isinf()]), f"{name}: infinities differ in sign"
    assert pt64[finite].isfinite().all(), (f"{name}: torch's own result in {pt.dtype} is not finite where the "
                                           "reference is: the rule cannot judge this case")
    err = (out64[finite] - ref[finite]).abs().max().item() if finite.any() else 0.0
    pt_err = (pt64[finite] - ref[finite]).abs().max().item() if finite.any() else 0.0
    bound = 2 * pt_err + FLOOR[out.dtype]
    if MARGIN_LOG:
        with open(MARGIN_LOG, "a") as log:
            log.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]}\t{name}\t{err / bound:.4f}\n")
    assert err <= bound, (f"{name}: max error {err:.3g} > 2 * torch's {pt_err:.3g} + floor "
                          f"{FLOOR[out.dtype]:.0e} = {bound:.3g} ({out.dtype}); "
                          + where_wrong(((out64 - ref).abs() > bound) & finite))


def rule_margin(out, ref, pt) -> float:
    """assert_close's judgement as a number: max error / the rule's bound over
    the elements where `ref` is finite (above 1 fails; a NaN there is
    infinitely far). For the tools that record how near the rule cases come
    (oracle_margins.py, attention_fuzz.py)."""
    ref = ref.double()
    finite = ref.isfinite()
    err = (out.double() - ref)[finite].abs().max().item() if finite.any() else 0.0
    pt_err = (pt.double() - ref)[finite].abs().max().item() if finite.any() else 0.0
    return math.inf if math.isnan(err) else err / (2 * pt_err + FLOOR[out.dtype])


def where_wrong(bad: torch.Tensor) -> str:
    """Where the elements over the bound sit, to point at the kernel code that
    wrote them: how many, the first, the range of each index, and for 2-D and
    up how they fall in 16 x 16 tiles (rows, columns < 8 or >= 8), the unit of
    the mma fragments."""
    idx = bad.nonzero()
    ranges = ", ".join(f"{lo}..{hi}" for lo, hi in zip(idx.min(0).values.tolist(), idx.max(0).values.tolist()))
    text = f"{len(idx)} of {bad.numel()} elements wrong, first at {tuple(idx[0].tolist())}, index ranges ({ranges})"
    if bad.dim() >= 2:
        halves = torch.stack([idx[:, -2] % 16 >= 8, idx[:, -1] % 16 >= 8], 1).long()
        kinds, counts = halves.unique(dim=0, return_counts=True)
        text += ", by (row%16>=8, col%16>=8): " + ", ".join(
            f"{tuple(k.tolist())}: {c}" for k, c in zip(kinds, counts.tolist()))
    return text


def make_tensor(shape, dtype, device, layout="contiguous", scale=1.0, requires_grad=False):
    """Fresh random normal data (never zeros) in one of three layouts.

    "contiguous"; "strided": every other element of the last dim of a larger
    tensor; "transposed": the last two dims swapped in memory.
    """
    shape = tuple(shape)

    def randn(*size):  # drawn in fp32, converted before any view so the layout survives
        return (torch.randn(size, dtype=torch.float32, device=device) * scale).to(dtype)

    if layout == "contiguous":
        t = randn(*shape)
    elif layout == "strided":
        t = randn(*shape[:-1], 2 * shape[-1])[..., ::2]
    elif layout == "transposed":
        assert len(shape) >= 2
        t = randn(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)
    else:
        raise ValueError(layout)
    assert layout == "contiguous" or not t.is_contiguous() or t.numel() <= 1
    return t.requires_grad_(requires_grad)


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor shaped like t, full of NaN: an unwritten element fails."""
    return torch.full(t.shape, float("nan"), dtype=t.dtype, device=t.device)


def poison_cuda_allocator(nbytes: int) -> None:
    """Fill the caching allocator's free blocks with NaN bytes, so that a kernel
    output allocated next starts out poisoned rather than zero."""
    if HAS_GPU and nbytes:
        torch.full((nbytes // 2 + 1,), float("nan"), dtype=torch.float16, device="cuda")


def compute_sanitizer():
    """Path of compute-sanitizer, or None."""
    return shutil.which("compute-sanitizer")


def run_under_sanitizer(tool: str, code: str) -> subprocess.CompletedProcess:
    """Run python code under `compute-sanitizer --tool <tool>`; errors fail."""
    cmd = [compute_sanitizer(), "--tool", tool, "--error-exitcode", "1",
           sys.executable, "-c", code]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different seed per test (fresh data), printed with a failure; the
    failure comes back with PYEXT_TEST_SEED set to it."""
    seed = int(os.environ.get("PYEXT_TEST_SEED") or int.from_bytes(os.urandom(4), "little") % 2 ** 31)
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    seeds = [value for name, value in item.user_properties if name == "seed"]
    if report.failed and seeds:
        report.sections.append(("fresh seed", f"PYEXT_TEST_SEED={seeds[0]} reruns this test on the same data"))


@pytest.fixture(autouse=True)
def _fresh_worker_after_a_broken_cuda_context():
    """After a test whose kernel faulted (an illegal address, a trap), every
    later CUDA call in the process fails too. Under pytest-xdist the worker
    exits instead, and xdist reports this test as crashed and starts a fresh
    one, so the tests after it still say something about their own kernels."""
    yield
    if not (HAS_GPU and torch.cuda.is_initialized() and os.environ.get("PYTEST_XDIST_WORKER")):
        return
    try:
        torch.cuda.synchronize()
    except RuntimeError as e:
        sys.stderr.write(f"CUDA context unusable after this test ({e}); this worker exits\n")
        os._exit(1)


def hessian_vector_product(fn, inputs, c, r):
    """The gradient of <dL/d(inputs), r>, L = <fn(inputs), c> + mean(fn^2)/2: a
    backward run with create_graph=True, then one through its graph (the
    square makes the second one pass through fn's own backward too). c and
    r from hvp_directions; made on any device, they are moved to the inputs'."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*inputs)
    loss = (y * c.to(y.device, y.dtype)).sum() + y.float().square().mean() / 2
    first = torch.autograd.grad(loss, inputs, create_graph=True)
    return torch.autograd.grad(sum((g * d.to(g.device, g.dtype)).sum() for g, d in zip(first, r)), inputs)


def hvp_directions(out_shape, inputs):
    """Random cotangents for hessian_vector_product: c (out_shape) of order
    one, r (one per input) a quarter of that, so that the products stay of
    order one, where the rule's floor is a few ulp. With r of order one an
    attention product (a sum over keys and head dims) reaches 4 to 8, where a
    float16 ulp is four times the floor, and pyext's double backward rounds
    once more than torch's math SDPA: the reference's part and the kernel's
    part of an input's gradient meet in the input's dtype (see
    pyext.ops._register.create_graph_grads), where torch's meet in float32."""
    return torch.randn(out_shape), [torch.randn(t.shape) / 4 for t in inputs]


@pytest.fixture
def auto_runs_the_triton_kernels(monkeypatch):
    """Without a GPU, "auto" would give CPU tensors to the reference: here it
    runs the Triton kernels (interpreter) instead, as it does on a GPU."""
    if not HAS_GPU:
        select = _backend.select
        monkeypatch.setattr(_backend, "select", lambda op, backend, device, why_not, *rest, **options: (
            "triton" if _backend.is_auto(backend) and why_not("triton") is None
            else select(op, backend, device, why_not, *rest, **options)))


@pytest.fixture
def pyext_sdpa_calls(monkeypatch):
    """One entry per call of pyext.scaled_dot_product_attention (or of what it
    calls, with a soft cap, as pyext.patch's routing does)."""
    import pyext.ops.attention as attention
    calls, real = [], attention._scaled_dot_product_attention
    monkeypatch.setattr(attention, "_scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.fixture
def dropout_seeds(monkeypatch):
    """The attention dropout seeds the kernel calls draw, in order."""
    from pyext.ops import attention
    seeds, draw = [], attention._dropout_seed
    monkeypatch.setattr(attention, "_dropout_seed", lambda device: seeds.append(draw(device)) or seeds[-1])
    return seeds


@pytest.fixture
def restore_backend():
    previous = _backend.get_backend()
    yield
    pyext.set_backend(previous)


class ShapesMade(TorchDispatchMode):
    """While on: the shapes of the tensors the given aten ops (overload
    packets) return, outside ops' own bodies (a pyext op is one call)."""

    def __init__(self, *ops):
        super().__init__()
        self.ops, self.shapes = ops, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in self.ops:
            self.shapes.append(tuple(out.shape))
        return out


def run_on_ranks(rank_fn, tmp_path, monkeypatch, *args, world: int = 2) -> dict:
    """rank_fn(rank, world, mesh, *args) in `world` spawned processes of one
    gloo group on the CPU (a 1-D mesh of them; the Triton kernels under the
    interpreter, GPU or not): {rank: what each returned}. Skips where torch
    has no gloo."""
    import torch.multiprocessing as mp
    pytest.importorskip("torch.distributed.tensor")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read by the spawned processes' imports
    results = mp.get_context("spawn").Manager().dict()
    mp.start_processes(_rank_main, args=(world, tmp_path / "store", rank_fn, args, results), nprocs=world,
                       join=True, start_method="spawn")
    assert sorted(results.keys()) == list(range(world))
    return dict(results)


def _rank_main(rank, world, store, rank_fn, args, results):
    """One spawned rank of run_on_ranks. A file store: no TCP store server
    in rank 0 and no port to race for. A rank whose work passed exits at
    once, without the interpreter's teardown, where a rank once died of
    "terminate called without an active exception" (a thread of gloo's
    still joinable; benchmarks/NOTES.md, "A gloo rank aborted once in CI");
    a rank that fails raises first."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        results[rank] = rank_fn(rank, world, init_device_mesh("cpu", (world,)), *args)
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
