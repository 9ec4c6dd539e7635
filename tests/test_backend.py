"""Backend selection: auto, named backends, set_backend, use_backend, PYEXT_BACKEND."""
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pyext
from pyext import _backend, _extension_build
from conftest import HAS_GPU, assert_close, hessian_vector_product, hvp_directions


def test_available_backends_lists_every_backend_with_a_reason():
    status = pyext.available_backends()
    assert set(status) == {"auto", "cuda", "triton", "torch"}
    assert status["torch"].available and status["auto"].available
    for name, (ok, reason) in status.items():
        assert isinstance(ok, bool) and reason, name
    if not HAS_GPU:
        assert not status["cuda"].available


def test_python_m_pyext_reports_versions_gpus_build_and_backends():
    out = subprocess.run([sys.executable, "-m", "pyext"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert f"torch {torch.__version__}" in lines[1]
    assert lines[2] == ("GPU: none visible to torch" if not HAS_GPU else
                        f"GPU 0: {torch.cuda.get_device_name(0)}, compute capability "
                        f"{'.'.join(map(str, torch.cuda.get_device_capability(0)))}")
    built = [line for line in lines if line.startswith("CUDA extension built against")]
    assert len(built) == int(bool(pyext._backend._BUILD_RECORD))
    for name, status in pyext.available_backends().items():
        assert f"backend {name}: {'available' if status.available else 'unavailable'}, {status.reason}" in lines


def test_auto_on_cpu_tensors_uses_the_reference(monkeypatch):
    calls = []
    monkeypatch.setattr(pyext.reference, "gelu", lambda x, a: calls.append(a) or x)
    pyext.gelu(torch.randn(3), "tanh", backend="auto")
    assert calls == ["tanh"]


def test_set_backend_and_use_backend(restore_backend):
    pyext.set_backend("torch")
    assert pyext.get_backend() == "torch"
    with pyext.use_backend("triton"):
        assert pyext.get_backend() == "triton"
        with pytest.raises(pyext.BackendUnavailable):
            with pyext.use_backend("cuda"):
                pyext.gelu(torch.randn(2))
        assert pyext.get_backend() == "triton"
    assert pyext.get_backend() == "torch"
    with pytest.raises(ValueError, match="backend"):
        pyext.set_backend("fastest")


def test_use_backend_holds_in_its_own_thread_alone(restore_backend):
    """As torch's no_grad and autocast: a block in one thread leaves the
    others' backend as it was, and blocks that overlap in two threads each
    restore their own (the process default stayed "triton" when the first
    thread's block ended first)."""
    import threading
    entered, leave = [threading.Event() for _ in range(2)], [threading.Event() for _ in range(2)]
    seen = {}
    pyext.set_backend("auto")

    def block(i, name):
        with pyext.use_backend(name):
            entered[i].set()
            leave[i].wait()
            seen[name] = pyext.get_backend()
    threads = [threading.Thread(target=block, args=(i, name)) for i, name in enumerate(("triton", "torch"))]
    threads[0].start()
    entered[0].wait()
    assert pyext.get_backend() == "auto"  # this thread's, while the other's block runs
    threads[1].start()
    entered[1].wait()
    for i in (0, 1):  # the first block ends first
        leave[i].set()
        threads[i].join()
    assert seen == {"triton": "triton", "torch": "torch"} and pyext.get_backend() == "auto"
    pyext.set_backend("torch")  # the process default, seen in every thread
    other = []
    thread = threading.Thread(target=lambda: other.append(pyext.get_backend()))
    thread.start()
    thread.join()
    assert other == ["torch"]


def test_per_call_backend_overrides_the_default(restore_backend):
    pyext.set_backend("cuda")
    pyext.gelu(torch.randn(2), backend="torch")  # no error: the call names torch


def test_environment_variable_sets_the_default():
    code = "import pyext; print(pyext.get_backend())"
    env = dict(os.environ, PYEXT_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "torch", out.stderr
    env["PYEXT_BACKEND"] = "bogus"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    error = out.stderr.strip().splitlines()[-1]  # the exception's own line, not the traceback's source
    assert out.returncode != 0 and "PYEXT_BACKEND" in error and "bogus" in error, out.stderr


# (built against: torch, CUDA; running: torch, CUDA; may it load)
BUILDS = [("2.14.1+cu130", "13.0", "2.14.1+cu130", "13.0", True),
          ("2.14.0", "13.0", "2.14.1+cu130", "13.0", True),  # patch releases keep the ABI
          ("2.14.1+cu130", "13.0", "2.14.1+cu132", "13.2", True),  # CUDA minor versions too
          ("2.15.0+cu132", "13.2", "2.14.1+cu130", "13.0", False),  # what pip's isolated build gives
          ("2.14.1+cu130", "13.0", "2.15.0+cu130", "13.0", False),  # torch upgraded after the build
          ("2.14.1+cu128", "12.8", "2.14.1+cu130", "13.0", False),
          ("2.14.1+cu130", "13.0", "2.14.1+cpu", None, False),
          (None, None, "2.14.1+cu130", "13.0", False)]  # a record that says nothing


@pytest.mark.parametrize("built_torch, built_cuda, torch_version, cuda_version, loads", BUILDS)
def test_an_extension_loads_only_into_the_torch_release_it_was_compiled_against(
        built_torch, built_cuda, torch_version, cuda_version, loads):
    problem = _extension_build.version_problem({"torch": built_torch, "cuda": built_cuda}, torch_version,
                                               cuda_version)
    if loads:
        assert problem is None
    else:
        assert f"compiled against torch {built_torch}" in problem and f"this is torch {torch_version}" in problem
        assert "--no-build-isolation" in problem


def test_a_mismatched_extension_is_refused_before_it_is_loaded(tmp_path):
    """A copy of the package whose _C cannot load at all (not a shared
    object) beside a record of another torch release: importing pyext names
    the mismatch, so it never tried to load _C. Without the record, the
    load fails as before."""
    import importlib.machinery
    import json
    import shutil
    package = tmp_path / "pyext"
    shutil.copytree(os.path.dirname(pyext.__file__), package,
                    ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    (package / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}").write_bytes(b"not a shared object")
    code = "import pyext; print(pyext.available_backends()['cuda'].reason)"
    env = dict(os.environ, PYTHONPATH=str(tmp_path))

    def reason():
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout
    (package / _extension_build.BUILT_WITH).write_text(json.dumps({"torch": "1.13.1+cu117", "cuda": "11.7"}))
    assert "compiled against torch 1.13.1+cu117 (CUDA 11.7)" in reason()
    (package / _extension_build.BUILT_WITH).unlink()
    assert "does not load" in reason()


# (TORCH_CUDA_ARCH_LIST of the build, a GPU's compute capability, whether it has kernels for it)
ARCHS = [("8.0;9.0a", (8, 0), True), ("8.0;9.0a", (8, 6), True), ("8.0;9.0a", (8, 9), True),  # A100, A10, L4
         ("8.0;9.0a", (9, 0), True), ("8.0;9.0a", (10, 0), False), ("8.0;9.0a", (12, 0), False),  # H100, B200
         ("8.0;9.0a", (7, 5), False), ("9.0a", (8, 6), False),  # T4; an "a" target runs on itself alone
         ("8.0 9.0+PTX", (10, 0), True), ("9.0a+PTX", (10, 0), False), ("10.0f", (10, 3), True),
         ("10.0a", (10, 3), False), ("8.6", (8, 0), False), ("Ampere;Hopper", (9, 0), None)]


@pytest.mark.parametrize("archs, capability, runs", ARCHS)
def test_which_gpus_a_build_has_kernels_for(archs, capability, runs):
    assert _extension_build.runs_on(archs, capability) is runs
    problem = _extension_build.arch_problem({"archs": archs}, capability, "a GPU")
    if runs is False:
        assert f"built for compute capabilities {archs}" in problem
        assert f"compute capability {capability[0]}.{capability[1]}" in problem
        assert ("TORCH_CUDA_ARCH_LIST=" in problem) == (capability >= (8, 0))
    else:  # runs, or nothing known against it
        assert problem is None
    assert _extension_build.arch_problem({}, capability, "a GPU") is None  # a record without archs
    assert _extension_build.arch_problem({"archs": ""}, capability, "a GPU") is None  # torch found the GPUs


def test_each_kernel_backend_names_the_gpus_it_cannot_run_on(monkeypatch):
    """GPUs pretended: a B200 under the build's default 8.0;9.0a (no kernel
    of the build runs there), an H100, a T4 (older than the Triton kernels'
    floor). Asked once per backend and device."""
    import ctypes
    backend = pyext._backend
    gpus = {0: ((10, 0), "B200"), 1: ((9, 0), "H100"), 2: ((7, 5), "T4")}

    def capability(index=None):  # asks the driver, as torch's does: code torch.compile cannot trace
        ctypes.CDLL(None)
        return gpus[index][0]
    monkeypatch.setattr(backend, "_BUILD_RECORD", {"archs": "8.0;9.0a"})
    monkeypatch.setattr(backend, "_gpu_problems", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: gpus[index][1])
    assert "B200, compute capability 10.0" in backend.gpu_problem("cuda", torch.device("cuda", 0))
    assert backend.gpu_problem("triton", torch.device("cuda", 0)) is None
    assert backend.gpu_problem("cuda", torch.device("cuda", 1)) is None
    assert backend.gpu_problem("triton", torch.device("cuda", 1)) is None
    assert "(T4) is 7.5" in backend.gpu_problem("triton", torch.device("cuda", 2))
    assert "need compute capability 8.0 or newer" in backend.gpu_problem("cuda", torch.device("cuda", 2))
    assert len(backend._gpu_problems) == 6
    monkeypatch.setattr(torch.version, "hip", "7.0")
    monkeypatch.setattr(backend, "_gpu_problems", {})
    assert "under ROCm" in backend.gpu_problem("triton", torch.device("cuda", 1))
    # traced by torch.compile (the op's backend choice is) as a constant, even when first asked there
    monkeypatch.setattr(backend, "_gpu_problems", {})
    compiled = torch.compile(lambda x: x + (1 if backend.gpu_problem("cuda", torch.device("cuda", 0)) else 2),
                             fullgraph=True)
    assert compiled(torch.zeros(3)).tolist() == [1, 1, 1]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.skipif(not pyext._backend.CUDA_BUILT, reason="needs the CUDA extension")
def test_on_a_gpu_without_kernels_of_the_build_auto_goes_on_and_cuda_raises(monkeypatch):
    """The current GPU marked as one the build has no kernels for: a call
    naming cuda raises that reason before any launch, available_backends
    says it, and auto serves the call with the next backend."""
    x = torch.randn(1000, device="cuda")
    index = torch.cuda.current_device()
    monkeypatch.setitem(pyext._backend._gpu_problems, ("cuda", index), "no kernel of the build runs on this GPU")
    with pytest.raises(pyext.BackendUnavailable, match="no kernel of the build runs on this GPU"):
        pyext.gelu(x, backend="cuda")
    assert not pyext.available_backends()["cuda"].available
    assert torch.equal(pyext.gelu(x), pyext.gelu(x, backend="triton"))


def _jagged(*tail, dtype=torch.float32):
    """A (2, j, *tail) nested tensor with rows of 3 and 5."""
    device = "cuda" if HAS_GPU else "cpu"
    return torch.nested.nested_tensor([torch.randn(n, *tail, dtype=dtype, device=device) for n in (3, 5)],
                                      layout=torch.jagged)


# op -> (pyext call, torch's call, input); attention as (B, H, j, D)
NESTED = {
    "gelu": (pyext.gelu, torch.nn.functional.gelu, lambda: _jagged(8)),
    "layer_norm": (lambda x, **kw: pyext.layer_norm(x, (8,), **kw),
                   lambda x: torch.nn.functional.layer_norm(x, (8,)), lambda: _jagged(8)),
    "rms_norm": (lambda x, **kw: pyext.rms_norm(x, (8,), **kw),
                 lambda x: torch.nn.functional.rms_norm(x, (8,)), lambda: _jagged(8)),
    "scaled_dot_product_attention": (
        lambda x, **kw: pyext.scaled_dot_product_attention(x, x, x, **kw),
        lambda x: torch.nn.functional.scaled_dot_product_attention(x, x, x),
        lambda: _jagged(2, 16, dtype=torch.bfloat16).transpose(1, 2)),
}


@pytest.mark.parametrize("op", sorted(NESTED))
def test_nested_tensors_go_to_torch_and_named_kernel_backends_refuse_them(op):
    """The kernels index dense strided memory: a nested (ragged) input is
    torch's work under auto, and a clear refusal from a named kernel backend,
    not a dispatch error from inside an op."""
    ours, theirs, make = NESTED[op]
    x = make()
    for got, want in zip(ours(x).unbind(), theirs(x).unbind()):
        torch.testing.assert_close(got, want)
    for backend in ("cuda", "triton"):
        with pytest.raises(pyext.BackendUnavailable, match="dense strided tensors, got a nested tensor"):
            ours(x, backend=backend)


def test_flash_attention_refuses_nested_tensors_by_name():
    x = _jagged(2, 16, dtype=torch.bfloat16).transpose(1, 2)
    with pytest.raises(RuntimeError, match=r"nested .*scaled_dot_product_attention takes them"):
        pyext.flash_attention(x, x, x)


def test_dtensors_go_to_torch_and_named_kernel_backends_refuse_them(tmp_path):
    """Tensor parallelism's activations: torch's op has a sharding rule, ours
    (but the norms' and GELU's: the tensor-parallel tests of
    test_layer_norm.py, test_rms_norm_gated.py and test_gelu.py) have none, so auto leaves a DTensor to torch and
    a named backend says so; a norm given a DTensor beside a plain tensor
    says that.
    On CPU (one gloo process): the DTensor reason comes before any device
    check, which is what makes auto pass CUDA DTensors over too."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        x = distribute_tensor(torch.randn(4, 8), init_device_mesh("cpu", (1,)), [Shard(0)])
        y = pyext.layer_norm(x, (8,))
        assert isinstance(y, DTensor)
        torch.testing.assert_close(y.full_tensor(), torch.nn.functional.layer_norm(x.full_tensor(), (8,)))
        heads = distribute_tensor(torch.randn(2, 4, 8, 8), init_device_mesh("cpu", (1,)), [Shard(1)])
        for backend in ("cuda", "triton"):
            with pytest.raises(pyext.BackendUnavailable, match="got a DTensor"):
                pyext.scaled_dot_product_attention(heads, heads, heads, backend=backend)
            with pytest.raises(pyext.BackendUnavailable, match="got a mix"):
                pyext.layer_norm(x, (8,), torch.ones(8), backend=backend)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sharded_dim", [0, 1], ids=["batch", "heads"])
def test_flash_attention_runs_the_reference_on_dtensors(sharded_dim, tmp_path):
    """flash_attention has no torch op to leave DTensors to: the reference
    takes them, through DTensor's own ops, its causal and window masks
    DTensors too. Sharded along the heads it needs a torch whose DTensor
    multiplies 4-D tensors so sharded (torch 2.11's cannot: "Attempted to
    flatten multiple dimensions, with dimension 1 being sharded"; 2.14's can)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        q = torch.randn(2, 4, 8, 8)
        sharded = distribute_tensor(q, init_device_mesh("cpu", (1,)), [Shard(sharded_dim)])
        try:
            sharded @ sharded.transpose(-2, -1)
        except RuntimeError as error:
            pytest.skip(f"this torch's DTensor cannot multiply these: {error}")
        for options in (dict(causal=True), dict(window_size=(2, 0))):
            out = pyext.flash_attention(sharded, sharded, sharded, **options)
            assert out.placements == (Shard(sharded_dim),)
            torch.testing.assert_close(out.full_tensor(), pyext.flash_attention(q, q, q, **options), rtol=0, atol=0)
    finally:
        dist.destroy_process_group()


def _attention_inputs():
    return [torch.randn(1, 2, 16, 8, dtype=torch.bfloat16) for _ in range(3)]


# Each public function on small inputs of the dtypes its Triton kernels take, called with backend="triton".
INFERENCE_CALLS = {
    "gelu": (lambda b: pyext.gelu(*b, "tanh", backend="triton"), lambda: [torch.randn(4, 33)]),
    "layer_norm": (lambda b: pyext.layer_norm(b[0], (33,), *b[1:], backend="triton"),
                   lambda: [torch.randn(4, 33), torch.randn(33), torch.randn(33)]),
    "rms_norm": (lambda b: pyext.rms_norm(b[0], (33,), b[1], backend="triton"),
                 lambda: [torch.randn(4, 33), torch.randn(33)]),
    "rms_norm groups": (lambda b: pyext.rms_norm(b[0], (2, 16), b[1], group_size=16, backend="triton"),
                        lambda: [torch.randn(4, 2, 16), torch.randn(2, 16)]),
    "rms_norm_gated": (lambda b: pyext.rms_norm_gated(*b, backend="triton"),
                       lambda: [torch.randn(4, 32), torch.randn(4, 32), torch.randn(32)]),
    "scaled_dot_product_attention": (lambda b: pyext.scaled_dot_product_attention(*b, is_causal=True,
                                                                                   backend="triton"),
                                     _attention_inputs),
    "flash_attention": (lambda b: pyext.flash_attention(*b, causal=True, backend="triton"), _attention_inputs),
    "flash_attention_varlen": (
        lambda b: pyext.flash_attention_varlen(*b, torch.tensor([0, 5, 16], dtype=torch.int32),
                                               torch.tensor([0, 5, 16], dtype=torch.int32), 11, 11, causal=True,
                                               backend="triton"),
        lambda: [torch.randn(16, 2, 8, dtype=torch.bfloat16) for _ in range(3)]),
}


@pytest.mark.skipif(HAS_GPU, reason="the CPU interpreter's check; on a GPU the op tests compile the kernels")
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "plain tensors"])
@pytest.mark.parametrize("op", sorted(INFERENCE_CALLS))
def test_compiled_inference_runs_each_function_in_one_graph(op, mode):
    """torch.compile(fullgraph=True) of a call whose inputs need no gradient
    (generation, evaluation): one graph, the eager result. GELU's two
    arguments were taken for forward's (ctx, *args) by dynamo, which then
    left ctx out ("expected a Tensor for x, found str"); varlen's offsets
    made under inference_mode, which keep no version counter, failed its
    offsets cache, eager too."""
    call, inputs = INFERENCE_CALLS[op]
    args = inputs()
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
               "plain tensors": torch.enable_grad}[mode]
    torch._dynamo.reset()
    with context():
        compiled = torch.compile(call, fullgraph=True, backend="aot_eager")(args)
        eager = call(args)
    assert torch.equal(compiled, eager)


TRANSFORMED = {
    "gelu": (lambda t, **kw: pyext.gelu(t, **kw), lambda t: torch.nn.functional.gelu(t)),
    "layer_norm": (lambda t, **kw: pyext.layer_norm(t, (8,), **kw),
                   lambda t: torch.nn.functional.layer_norm(t, (8,))),
    "scaled_dot_product_attention": (
        lambda t, **kw: pyext.scaled_dot_product_attention(t, t, t, is_causal=True, **kw),
        lambda t: torch.nn.functional.scaled_dot_product_attention(t, t, t, is_causal=True)),
}


@pytest.mark.parametrize("transform", ["vmap", "grad", "forward_ad"])
@pytest.mark.parametrize("op", sorted(TRANSFORMED))
def test_torch_func_transforms_go_to_torch_and_named_kernel_backends_refuse_them(op, transform):
    """torch.func.vmap / grad over a pyext call, or forward-mode AD (dual
    tensors): auto computes it with torch (the kernels' autograd has no
    functorch or jvp rules); a named kernel backend says why it cannot."""
    import torch.autograd.forward_ad as fwAD
    ours, theirs = TRANSFORMED[op]
    device = "cuda" if HAS_GPU else "cpu"
    x = torch.randn(3, 2, 4, 8, device=device)

    def run(fn):
        if transform == "vmap":
            return torch.vmap(fn)(x)
        if transform == "forward_ad":
            with fwAD.dual_level():
                return fwAD.unpack_dual(fn(fwAD.make_dual(x, torch.ones_like(x)))).tangent
        return torch.func.grad(lambda t: fn(t).square().sum())(x)
    if not (transform == "forward_ad" and op == "scaled_dot_product_attention"):  # torch's SDPA kernels have none
        torch.testing.assert_close(run(ours), run(theirs))
    for backend in ("cuda", "triton"):
        with pytest.raises(pyext.BackendUnavailable, match="forward-mode AD" if transform == "forward_ad"
                           else "torch.func transforms"):
            run(lambda t: ours(t, backend=backend))


class SeenOps(TorchDispatchMode):
    """The names of the ops a block of code runs, as the dispatcher sees them."""
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def _math_sdpa(q, k, v):
    """torch's SDPA by its math backend, the one whose backward is differentiable."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


# op -> (pyext call, torch's call, input shapes, dtype): second derivatives
SECOND_ORDER = {
    "gelu": (lambda x, **kw: pyext.gelu(x, "tanh", **kw),
             lambda x: torch.nn.functional.gelu(x, approximate="tanh"), [(6, 40)], torch.float32),
    "layer_norm": (lambda x, w, b, **kw: pyext.layer_norm(x, (40,), w, b, **kw),
                   lambda x, w, b: torch.nn.functional.layer_norm(x, (40,), w, b), [(6, 40), (40,), (40,)],
                   torch.float32),
    "rms_norm": (lambda x, w, **kw: pyext.rms_norm(x, (40,), w, **kw),
                 lambda x, w: torch.nn.functional.rms_norm(x, (40,), w), [(6, 40), (40,)], torch.float32),
    "scaled_dot_product_attention": (
        lambda q, k, v, **kw: pyext.scaled_dot_product_attention(q, k, v, is_causal=True, **kw),
        _math_sdpa, [(1, 2, 24, 16)] * 3, torch.float16),
}


@pytest.mark.parametrize("op", sorted(SECOND_ORDER))
def test_double_backward_under_auto_differentiates_the_gradients(op, auto_runs_the_triton_kernels):
    """Gradient penalties, Hessian-vector products and physics-informed losses
    differentiate a backward run with create_graph=True. The kernels' backward
    is not differentiable, so under auto that backward is torch's, on the
    kernel's saved inputs, and the second backward runs the kernel's backward
    through the output: second derivatives within the DESIGN.md rule."""
    ours, theirs, shapes, dtype = SECOND_ORDER[op]
    device = "cuda" if HAS_GPU else "cpu"
    inputs = [torch.randn(s, device=device).to(dtype) for s in shapes]
    c, r = hvp_directions(ours(*inputs).shape, inputs)
    ran = type(ours(*[t.clone().requires_grad_() for t in inputs]).grad_fn).__name__
    assert any(kernel in ran for kernel in ("triton", "cuda", "FlashAttention")), f"auto ran {ran}, not a kernel"
    with SeenOps() as mode:
        got = hessian_vector_product(ours, inputs, c, r)
    assert any(n.startswith("pyext::") and "_bwd_" in n for n in mode.names), "the second backward skipped the kernel's"
    want = hessian_vector_product(theirs, [t.double() for t in inputs], c, r)
    same_dtype = hessian_vector_product(theirs, inputs, c, r)
    for i, (g, w, pt) in enumerate(zip(got, want, same_dtype)):
        assert_close(g, w, pt, name=f"Hessian-vector product, input {i}")


@pytest.mark.parametrize("op", sorted(SECOND_ORDER))
def test_double_backward_with_a_named_kernel_backend_raises(op):
    ours, _, shapes, dtype = SECOND_ORDER[op]
    backend = "cuda" if HAS_GPU and op != "scaled_dot_product_attention" else "triton"
    inputs = [torch.randn(s, device="cuda" if HAS_GPU else "cpu").to(dtype) for s in shapes]
    c, r = torch.ones(ours(*inputs).shape), [torch.ones(t.shape) for t in inputs]
    with pytest.raises(pyext.BackendUnavailable, match=f"pyext.{op}: a backward with create_graph=True"):
        hessian_vector_product(lambda *t: ours(*t, backend=backend), inputs, c, r)


# op -> (its call on the Triton kernels, input shapes with n a length of the
# caller's choice, dtype, the kernel ops' stem)
TRITON_CALLS = {
    "gelu": (lambda x: pyext.gelu(x, backend="triton"), [("n", 24)], torch.float32, "gelu"),
    "layer_norm": (lambda x, w, b: pyext.layer_norm(x, (24,), w, b, backend="triton"), [("n", 24), (24,), (24,)],
                   torch.float32, "layer_norm"),
    "rms_norm": (lambda x, w: pyext.rms_norm(x, (24,), w, backend="triton"), [("n", 24), (24,)], torch.float32,
                 "rms_norm"),
    "scaled_dot_product_attention": (
        lambda q, k, v: pyext.scaled_dot_product_attention(q, k, v, is_causal=True, backend="triton"),
        [(1, 2, "n", 16)] * 3, torch.float16, "flash_attn"),
    "flash_attention": (lambda q, k, v: pyext.flash_attention(q, k, v, causal=True, backend="triton"),
                        [(1, 2, "n", 16)] * 3, torch.float16, "flash_attn"),
}


def _triton_call_inputs(op: str, n: int):
    _, shapes, dtype, _ = TRITON_CALLS[op]
    device = "cuda" if HAS_GPU else "cpu"
    return [torch.randn([n if d == "n" else d for d in s], device=device).to(dtype).requires_grad_() for s in shapes]


@pytest.mark.parametrize("op", sorted(TRITON_CALLS))
def test_a_dispatch_mode_sees_the_kernel_ops_of_a_call_and_its_backward(op):
    """The public functions call their kernel ops past the ops' own autograd
    kernels (host time), not past the dispatcher: a TorchDispatchMode (a FLOP
    counter, a memory tracker) still sees the forward and backward ops, and
    what they compute is the same under it (up to the order of the attention
    backward's atomic adds on a GPU)."""
    ours, _, _, stem = TRITON_CALLS[op]
    inputs = _triton_call_inputs(op, 24)
    grad = torch.randn_like(ours(*inputs))
    plain = torch.autograd.grad(ours(*inputs), inputs, grad)
    with SeenOps() as mode:
        seen = torch.autograd.grad(ours(*inputs), inputs, grad)
    assert f"pyext::{stem}_fwd_triton" in mode.names and f"pyext::{stem}_bwd_triton" in mode.names, mode.names
    for got, want in zip(seen, plain):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("op", sorted(TRITON_CALLS))
def test_compile_fullgraph_with_dynamic_shapes(op):
    """torch.compile(dynamic=True), as a model of varying sequence length is
    compiled: one graph, no break, for every length; forward and gradients
    those of the eager call. (torch 2.14's dynamo could not trace the soft
    cap check's math.isfinite there.)"""
    ours = TRITON_CALLS[op][0]
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, dynamic=True, backend="aot_eager")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # the attention backward without atomic adds: the same bits twice
    try:
        for n in (5, 11):
            inputs = _triton_call_inputs(op, n)
            got, want = compiled(*inputs), ours(*inputs)
            assert torch.equal(got, want)
            grad = torch.randn_like(want)
            for g, e in zip(torch.autograd.grad(got, inputs, grad), torch.autograd.grad(want, inputs, grad)):
                assert torch.equal(g, e)
    finally:
        torch.use_deterministic_algorithms(previous)


# public function -> (a call of it, its inputs' shapes (or the input) and dtype)
FX_CALLS = {
    "gelu": (lambda x: pyext.gelu(x, "tanh"), [(4, 24)], torch.float32),
    "layer_norm": (lambda x, w, b: pyext.layer_norm(x=x, normalized_shape=(24,), weight=w, bias=b),  # by keyword
                   [(4, 24), (24,), (24,)], torch.float32),
    "rms_norm": (lambda x, w: pyext.rms_norm(x, (24,), w), [(4, 24), (24,)], torch.float32),
    "rms_norm_gated": (lambda x, z, w: pyext.rms_norm_gated(x, z, w), [(4, 24), (4, 24), (24,)], torch.float32),
    "scaled_dot_product_attention": (lambda q, k, v: pyext.scaled_dot_product_attention(q, k, v, is_causal=True),
                                     [(1, 2, 8, 16)] * 3, torch.float16),
    "flash_attention": (lambda q, k, v: pyext.flash_attention(q, k, v, causal=True, return_lse=True),
                        [(1, 2, 8, 16)] * 3, torch.float16),
    "flash_attention_varlen": (lambda q, k, v, cu: pyext.flash_attention_varlen(q, k, v, cu, cu, 5, 5, causal=True),
                               [(8, 2, 16)] * 3 + [torch.tensor([0, 3, 8], dtype=torch.int32)], torch.float16),
}


@pytest.mark.parametrize("op", sorted(FX_CALLS))
def test_fx_symbolic_trace_records_each_public_function_as_one_node(op):
    """torch.fx.symbolic_trace (torchvision's and timm's feature extraction,
    FX quantization) records a pyext call as it records torch's F calls: one
    node calling the public function, which the traced module runs, rather
    than pyext's checks failing on the tracer's Proxy."""
    call, shapes, dtype = FX_CALLS[op]
    device = "cuda" if HAS_GPU else "cpu"
    inputs = [s.to(device) if isinstance(s, torch.Tensor) else torch.randn(s, device=device).to(dtype) for s in shapes]
    traced = torch.fx.symbolic_trace(call)
    calls = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    assert calls == [getattr(pyext, op)], calls
    got, want = traced(*inputs), call(*inputs)
    for g, w in zip(*(t if isinstance(t, tuple) else (t,) for t in (got, want))):
        assert torch.equal(g, w)


def test_an_extension_built_without_an_ops_sources_says_so():
    """An extension built from sources lacking an op (a partial build, or one
    from an older checkout) registers no stages for it: the cuda backend says
    so; auto goes on."""
    from pyext.ops._register import missing_reason
    stages = {"triton": object()}
    assert "pyext._C has no gelu kernels" in missing_reason("cuda", stages, "gelu")
    assert missing_reason("triton", stages, "gelu") is None
    assert missing_reason("torch", {}, "gelu") is None


def test_a_source_folder_without_its_extension_says_how_to_build_it_there(monkeypatch):
    """pyext imported from its checkout (an editable install, or python run
    there, which puts the checkout first on the path) whose pyext._C is not
    built: the reason names the folder and builds it in place (`-e .`, or
    the installed pyext is replaced), not "installed without nvcc"."""
    real = _backend.importlib.util.find_spec
    monkeypatch.setattr(_backend.importlib.util, "find_spec",
                        lambda name, *a: None if name == "pyext._C" else real(name, *a))
    built, why, record = _backend._extension_status()
    source = os.path.dirname(os.path.dirname(os.path.abspath(pyext.__file__)))
    assert not built and record == {}
    assert f"the source folder {source}" in why and "pip install -v --no-build-isolation -e ." in why


def test_importing_pyext_without_triton_logs_nothing():
    """torch's flop counter, which pyext registers its attention counts with,
    logs a warning on import where triton is missing; `import pyext` does not."""
    code = "import sys; sys.modules['triton'] = None; import pyext; print(pyext.available_backends()['triton'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "triton is not installed" in out.stdout, out.stderr
    assert "triton not found" not in out.stderr, out.stderr
