"""pyext.gelu and pyext.nn.GELU: the specification, as tests."""
import pytest
import torch
import torch.nn.functional as F

import pyext
from pyext import reference
from conftest import (BACKENDS, COMPILERS, HAS_GPU, assert_close, compute_sanitizer, device_for, make_tensor,
                      poison_cuda_allocator, poisoned_like, run_on_ranks, run_under_sanitizer)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
APPROX = ["none", "tanh"]
# Odd, prime, one past a block (4096), a 16-byte vector plus one, empty, scalar.
SHAPES = [(), (1,), (7,), (4097,), (3, 33), (2, 5, 127), (0, 5)]


def check_gelu(backend, x, approximate, fn=None):
    """Output and input gradient of `backend` (or of fn, called as F.gelu is)
    against the float64 oracle."""
    x = x.detach().requires_grad_()
    out = fn(x, approximate) if fn else pyext.gelu(x, approximate, backend=backend)
    grad = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, x, grad) if out.numel() else (torch.zeros_like(x),)

    x64 = x.detach().double().requires_grad_()
    ref = reference.gelu(x64, approximate)
    xpt = x.detach().clone().requires_grad_()
    pt = reference.gelu(xpt, approximate)
    if out.numel():
        (dref,) = torch.autograd.grad(ref, x64, grad.double())
        (dpt,) = torch.autograd.grad(pt, xpt, grad)
    else:
        dref, dpt = x64.detach(), xpt.detach()
    assert_close(out, ref, pt, "y")
    assert_close(dx, dref, dpt, "dx")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_oracle(backend, dtype, approximate, shape):
    x = make_tensor(shape, dtype, device_for(backend), scale=3.0)
    check_gelu(backend, x, approximate)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["strided", "transposed"])
def test_non_contiguous(backend, layout):
    x = make_tensor((37, 19), torch.float32, device_for(backend), layout=layout, scale=3.0)
    check_gelu(backend, x, "none")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("approximate", APPROX)
def test_nan_and_inf_match_torch(backend, approximate):
    x = make_tensor((64,), torch.float32, device_for(backend))
    x[3], x[10], x[20], x[30] = float("nan"), float("inf"), float("-inf"), -40.0
    if backend == "torch" and F.gelu(x, approximate=approximate)[10].isnan():
        # torch's vectorised float32 CPU kernel (AVX-512 at least) gives NaN for
        # gelu(+inf), its scalar path and float64 give inf; the torch backend is torch.
        pytest.skip("torch's own float32 gelu gives NaN at +inf on this CPU")
    check_gelu(backend, x, approximate)


@pytest.mark.parametrize("approximate", APPROX)
def test_triton_kernels_write_every_element(approximate):
    from pyext.triton_kernels import gelu as kernels
    x = make_tensor((4096 + 9,), torch.bfloat16, device_for("triton"))
    dy = torch.randn_like(x)
    y = kernels.gelu_fwd(x, approximate, out=poisoned_like(x))
    dx = kernels.gelu_bwd(dy, x, approximate, out=poisoned_like(x))
    assert not y.isnan().any() and not dx.isnan().any()


@pytest.mark.parametrize("bad", ["shape", "dtype", "strides"])
def test_triton_kernels_refuse_an_out_they_cannot_fill(bad):
    """The launch functions take an out (the tests' poisoned ones) only of
    the result's shape and dtype, contiguous: never one they would write
    past or in another layout."""
    from pyext.triton_kernels import gelu as kernels
    x = make_tensor((4, 6), torch.float32, device_for("triton"))
    out = {"shape": x.new_empty(4, 5), "dtype": x.new_empty(4, 6, dtype=torch.float16),
           "strides": x.new_empty(6, 4).t()}[bad]
    with pytest.raises(ValueError, match="out must be contiguous"):
        kernels.gelu_fwd(x, "none", out=out)
    with pytest.raises(ValueError, match="out must be contiguous"):
        kernels.gelu_bwd(x, x, "none", out=out)


@pytest.mark.gpu
@pytest.mark.parametrize("approximate", APPROX)
def test_cuda_kernels_write_every_element(approximate):
    x = make_tensor(((1 << 20) + 3,), torch.bfloat16, "cuda")
    poison_cuda_allocator(2 * x.numel() * 4)
    y = torch.ops.pyext.gelu_fwd_cuda(x, approximate)
    poison_cuda_allocator(2 * x.numel() * 4)
    dx = torch.ops.pyext.gelu_bwd_cuda(torch.randn_like(x), x, approximate)
    assert not y.isnan().any() and not dx.isnan().any()


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_gradcheck_float64(backend):
    x = make_tensor((13,), torch.float64, device_for(backend), requires_grad=True)
    for approximate in APPROX:
        assert torch.autograd.gradcheck(lambda t: pyext.gelu(t, approximate, backend=backend), (x,))


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_opcheck(backend):
    x = make_tensor((5, 9), torch.float32, device_for(backend), requires_grad=True)
    fwd = getattr(torch.ops.pyext, f"gelu_fwd_{backend}")
    bwd = getattr(torch.ops.pyext, f"gelu_bwd_{backend}")
    for approximate in APPROX:
        torch.library.opcheck(fwd, (x, approximate))
        torch.library.opcheck(bwd, (torch.randn_like(x), x.detach(), approximate))


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("compiler", COMPILERS)
def test_compile_fullgraph(backend, compiler):
    x = make_tensor((4, 33), torch.float32, device_for(backend), requires_grad=True)

    def f(t):
        return pyext.gelu(t * 2, "tanh", backend=backend).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=compiler)
    (g,) = torch.autograd.grad(compiled(x), x)
    (g_eager,) = torch.autograd.grad(f(x), x)
    torch.testing.assert_close(g, g_eager)


def test_module_is_drop_in():
    torch_mod, ours = torch.nn.GELU(approximate="tanh"), pyext.nn.GELU(approximate="tanh")
    assert isinstance(ours, torch.nn.GELU)
    assert ours.state_dict().keys() == torch_mod.state_dict().keys()
    assert repr(ours) == repr(torch_mod)
    x = make_tensor((3, 8), torch.float32, "cpu")
    torch.testing.assert_close(ours(x), torch_mod(x))


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_bad_approximate_raises_torchs_error_naming_it(backend):
    x = torch.randn(3)
    with pytest.raises(Exception) as torch_error:
        F.gelu(x, approximate="erf")
    with pytest.raises(Exception) as our_error:
        pyext.gelu(x, "erf", backend=backend)
    assert type(our_error.value) is type(torch_error.value), (our_error.value, torch_error.value)
    assert "approximate" in str(our_error.value)
    with pytest.raises(type(torch_error.value), match="approximate"):
        pyext.nn.GELU(approximate="erf")(x)


def test_a_dtype_the_kernels_lack_is_named_by_the_triton_backend():
    x = torch.randn(3, 6).to(torch.float8_e4m3fn)
    with pytest.raises(pyext.BackendUnavailable, match="dtype torch.float8_e4m3fn is not supported"):
        pyext.gelu(x.to(device_for("triton")), backend="triton")


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_x_not_a_tensor_is_torchs_type_error(backend):
    with pytest.raises(TypeError):
        F.gelu([1.0, 2.0])
    with pytest.raises(TypeError, match="x must be a Tensor"):
        pyext.gelu([1.0, 2.0], backend=backend)


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_integer_input_is_rejected(backend):
    with pytest.raises(NotImplementedError, match="dtype"):
        pyext.gelu(torch.arange(4), backend=backend)


def test_named_cuda_backend_on_cpu_tensor_says_why():
    with pytest.raises(pyext.BackendUnavailable, match="cuda.*(CUDA tensors|not built)"):
        pyext.gelu(torch.randn(3), backend="cuda")


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU message")
def test_named_triton_backend_without_gpu_or_interpreter_says_why(monkeypatch):
    monkeypatch.setattr(pyext._backend, "TRITON_INTERPRET", False)
    with pytest.raises(pyext.BackendUnavailable, match="triton.*TRITON_INTERPRET"):
        pyext.gelu(torch.randn(3), backend="triton")


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="backend"):
        pyext.gelu(torch.randn(3), backend="cudnn")


def _tensor_parallel_rank(rank, world, mesh):
    """One rank of test_tensor_parallel_gelu_runs_the_kernels_on_each_ranks_part."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    torch.manual_seed(0)  # the same full tensors on every rank
    x, dy = torch.randn(2, 6, 16), torch.randn(2, 6, 16)
    errors = {}
    for name, placement in (("colwise output", Shard(2)), ("batch", Shard(0)), ("replicated", Replicate()),
                            ("partial", Partial())):
        runs = []
        for gelu in (lambda t: pyext.gelu(t, "tanh", backend="triton"), lambda t: F.gelu(t, approximate="tanh")):
            if name == "partial":  # each rank holds a part of x's sum (exactly x): gelu needs the whole
                x_dt = DTensor.from_local(x.round() if rank == 0 else x - x.round(), mesh, [placement])
            else:
                x_dt = distribute_tensor(x, mesh, [placement])
            x_dt.requires_grad_()
            y = gelu(x_dt)
            y.backward(distribute_tensor(dy, mesh, y.placements))
            runs.append((y.placements, x_dt.grad.placements, y.full_tensor(), x_dt.grad.full_tensor()))
        (ours, theirs) = runs
        if name != "partial":  # which sharding a Partial x becomes is DTensor's choice of the cheapest
            assert ours[:2] == theirs[:2], (name, ours[:2], theirs[:2])  # placed as torch's own rules place them
        errors[name] = max((ours[2] - theirs[2]).abs().max().item(), (ours[3] - theirs[3]).abs().max().item())
    return errors


def test_tensor_parallel_gelu_runs_the_kernels_on_each_ranks_part(monkeypatch, tmp_path):
    """Tensor parallelism's activations (2 gloo processes on CPU, the Triton
    kernels under the interpreter): x sharded along any dim (a colwise
    projection's output, a batch), replicated, or Partial (summed first).
    The kernels run on each rank's part (DTensor rules, pyext/ops/sharding.py;
    a named backend refused DTensors before): y and dx placed, and valued, as
    torch's F.gelu on the same DTensors."""
    results = run_on_ranks(_tensor_parallel_rank, tmp_path, monkeypatch)
    assert all(err < 1e-6 for errors in results.values() for err in errors.values()), results


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_and_deterministic(backend, dtype):
    x = make_tensor((64 * 1024 * 1024 + 5,), dtype, "cuda", scale=3.0)  # 256 MB in fp32
    check_gelu(backend, x, "none")
    dy = torch.randn_like(x)
    fwd, bwd = getattr(torch.ops.pyext, f"gelu_fwd_{backend}"), getattr(torch.ops.pyext, f"gelu_bwd_{backend}")
    assert torch.equal(fwd(x, "tanh"), fwd(x, "tanh"))
    assert torch.equal(bwd(dy, x, "tanh"), bwd(dy, x, "tanh"))


@pytest.mark.gpu
@pytest.mark.skipif(compute_sanitizer() is None, reason="compute-sanitizer is not on PATH")
def test_cuda_kernels_under_memcheck():
    code = ("import torch, pyext\n"
            "for n in (1, 7, 4097):\n"
            "  for dt in (torch.float32, torch.bfloat16):\n"
            "    x = torch.randn(n + 1, device='cuda', dtype=dt)[1:]\n"  # misaligned: scalar path
            "    for t in (x, x.clone()):\n"
            "      y = torch.ops.pyext.gelu_fwd_cuda(t, 'none')\n"
            "      d = torch.ops.pyext.gelu_bwd_cuda(torch.randn_like(t), t, 'tanh')\n"
            "torch.cuda.synchronize()\n")
    result = run_under_sanitizer("memcheck", code)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
