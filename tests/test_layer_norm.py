"""pyext.layer_norm, pyext.rms_norm, pyext.nn.LayerNorm and pyext.nn.RMSNorm:
the specification, as tests. Each check covers y, dx, dweight and dbias."""
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pyext
from pyext import reference
from pyext.ops.layer_norm import default_rms_eps
from conftest import (BACKENDS, COMPILERS, assert_close, compute_sanitizer, device_for, make_tensor,
                      poison_cuda_allocator, poisoned_like, run_on_ranks, run_under_sanitizer)

KINDS = ["layer_norm", "rms_norm"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
KERNELS = ["triton", pytest.param("cuda", marks=pytest.mark.gpu)]
# One, odd, a warp's worth, one short of and at 1024, one past a 4096 block,
# the end of the backward's fast path, and one past 64K (the chunked path).
HIDDEN = [1, 7, 64, 1023, 1024, 4097, 8192, 65537]
ROWS = [1, 3]
# On a GPU also every edge of the CUDA configurations (rows of 128/512/1024/
# 2048/4096/8192/16384 elements) and one past each.
GPU_HIDDEN = [127, 128, 129, 512, 513, 2048, 2049, 16384, 16385, 131072 + 3]


def run(kind, x, normalized_shape, weight, bias, eps, grad, fn):
    """y and the gradients of x, weight and bias (None where absent)."""
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_() if weight is not None else None
    bias = bias.detach().requires_grad_() if bias is not None else None
    if kind == "layer_norm":
        y = fn(x, normalized_shape, weight, bias, eps)
    else:
        y = fn(x, normalized_shape, weight, eps)
    leaves = [t for t in (x, weight, bias) if t is not None]
    grads = iter(torch.autograd.grad(y, leaves, grad))
    return [y] + [next(grads) if t is not None else None for t in (x, weight, bias)]


def pyext_fn(kind, backend):
    f = getattr(pyext, kind)
    return lambda *args: f(*args, backend=backend)


def check(kind, backend, x, normalized_shape, weight=None, bias=None, eps=None, grad=None, fn=None):
    """pyext's y, dx, dweight, dbias (or fn's, called as F.layer_norm / F.rms_norm)
    against the float64 oracle (conftest rule)."""
    if kind == "rms_norm":
        bias = None
    if eps is None and kind == "layer_norm":
        eps = 1e-5
    # eps=None (rms_norm) must mean the same in float64 as in x's dtype.
    eps64 = eps if eps is not None else default_rms_eps(x.dtype)
    grad = torch.randn(x.shape, device=x.device).to(x.dtype) if grad is None else grad
    out = run(kind, x, normalized_shape, weight, bias, eps, grad, fn or pyext_fn(kind, backend))
    double = [t.double() if t is not None else None for t in (x, weight, bias, grad)]
    ref = run(kind, double[0], normalized_shape, double[1], double[2], eps64, double[3], getattr(reference, kind))
    pt = run(kind, x, normalized_shape, weight, bias, eps, grad, getattr(reference, kind))
    for name, o, r, p in zip(("y", "dx", "dweight", "dbias"), out, ref, pt):
        if o is not None:
            assert_close(o, r, p, name)
    return out


def params(kind, normalized_shape, dtype, device, weight=True, bias=True):
    w = make_tensor(normalized_shape, dtype, device) if weight else None
    b = make_tensor(normalized_shape, dtype, device) if bias and kind == "layer_norm" else None
    return w, b


def inputs(rows, hidden, dtype, device, layout="contiguous"):
    """Random rows with a nonzero mean (LayerNorm must subtract it accurately)."""
    return make_tensor((rows, hidden), dtype, device, layout=layout, scale=2.0) + 1.5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_matches_oracle(backend, kind, dtype, rows, hidden):
    device = device_for(backend)
    x = inputs(rows, hidden, dtype, device)
    w, b = params(kind, (hidden,), dtype, device)
    check(kind, backend, x, (hidden,), w, b)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("hidden", HIDDEN + GPU_HIDDEN)
def test_matches_oracle_gpu_sizes(backend, kind, dtype, hidden):
    x = inputs(37, hidden, dtype, "cuda")
    w, b = params(kind, (hidden,), dtype, "cuda")
    check(kind, backend, x, (hidden,), w, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_float32_parameters_with_half_input(backend, kind, dtype):
    device = device_for(backend)
    x = inputs(5, 96, dtype, device)
    w, b = params(kind, (96,), torch.float32, device)
    y, _, dw, db = check(kind, backend, x, (96,), w, b)
    assert y.dtype == dtype and dw.dtype == torch.float32
    assert db is None or db.dtype == torch.float32


def check_autocast(kind, backend, to_float32):
    """Inside a bf16 autocast region, bf16 x with float32 parameters: the same
    y as a call outside it with x, weight, bias cast to float32 (to_float32)
    or left as they are; gradients in the inputs' own dtypes."""
    device = device_for(backend)
    x = inputs(5, 96, torch.bfloat16, device).requires_grad_()
    w, b = (p.requires_grad_() if p is not None else None
            for p in params(kind, (96,), torch.float32, device))
    args = (x, (96,), w, b) if kind == "layer_norm" else (x, (96,), w)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = getattr(pyext, kind)(*args, backend=backend)
    assert y.dtype == (torch.float32 if to_float32 else torch.bfloat16)
    cast = [a.detach().float() if isinstance(a, torch.Tensor) and to_float32 else a for a in args]
    assert torch.equal(y, getattr(pyext, kind)(*cast, backend=backend))
    leaves = [a for a in args if isinstance(a, torch.Tensor)]
    grads = torch.autograd.grad(y.float().sum(), leaves)
    assert [g.dtype for g in grads] == [a.dtype for a in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_autocast_gives_torchs_dtype(backend, kind):
    """torch's autocast casts layer_norm's inputs to float32 on CUDA (and
    rms_norm's in recent torch) but not on CPU; pyext's functions do the same."""
    device = device_for(backend)
    x = inputs(2, 8, torch.bfloat16, device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        theirs = getattr(F, kind)(x, (8,))
    check_autocast(kind, backend, to_float32=theirs.dtype == torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_autocast_float32_cast_on_a_device_torch_casts_on(backend, kind, monkeypatch):
    """The float32 cast torch's CUDA autocast makes, exercised on whatever
    device the tests run on (CPU autocast leaves layer_norm alone)."""
    from pyext import _autocast
    op = f"aten::{kind}"
    monkeypatch.setitem(_autocast.POLICY, op, (frozenset({device_for(backend).type}), True))
    check_autocast(kind, backend, to_float32=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("affine", ["none", "weight", "bias"])
def test_without_weight_or_bias(backend, kind, affine):
    if kind == "rms_norm" and affine == "bias":
        pytest.skip("rms_norm has no bias")
    device = device_for(backend)
    x = inputs(3, 65, torch.float32, device)
    w, b = params(kind, (65,), torch.float32, device, weight=affine == "weight", bias=affine == "bias")
    check(kind, backend, x, (65,), w, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape,normalized_shape", [((2, 3, 5, 7), (5, 7)), ((5, 7), (5, 7)),
                                                    ((3, 4, 9), (9,))], ids=str)
def test_multi_dim_shapes(backend, kind, shape, normalized_shape):
    device = device_for(backend)
    x = make_tensor(shape, torch.float32, device, scale=2.0)
    w, b = params(kind, normalized_shape, torch.float32, device)
    check(kind, backend, x, normalized_shape, w, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["strided", "transposed"])
def test_non_contiguous_input_and_grad(backend, kind, layout):
    device = device_for(backend)
    x = make_tensor((6, 37), torch.float32, device, layout=layout, scale=2.0)
    grad = make_tensor((6, 37), torch.float32, device, layout=layout)
    w, b = params(kind, (37,), torch.float32, device)
    check(kind, backend, x, (37,), w, b, grad=grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_non_contiguous_weight(backend, kind):
    device = device_for(backend)
    x = make_tensor((4, 19), torch.float32, device)
    w = make_tensor((19,), torch.float32, device, layout="strided")
    b = make_tensor((19,), torch.float32, device, layout="strided")
    check(kind, backend, x, (19,), w, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape,normalized_shape", [((0, 7), (7,)), ((2, 0, 7), (7,)), ((3, 0), (0,))],
                         ids=str)
def test_zero_size(backend, kind, shape, normalized_shape):
    device = device_for(backend)
    x = make_tensor(shape, torch.float32, device)
    w, b = params(kind, normalized_shape, torch.float32, device)
    y, dx, dw, _ = check(kind, backend, x, normalized_shape, w, b)
    assert y.shape == x.shape and dx.shape == x.shape and dw.shape == normalized_shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("hidden", [33, 1024])
def test_nan_stays_in_its_row(backend, kind, hidden):
    device = device_for(backend)
    x = inputs(5, hidden, torch.float32, device)
    x[2, hidden // 2] = float("nan")
    w, b = params(kind, (hidden,), torch.float32, device)
    y, dx, dw, db = check(kind, backend, x, (hidden,), w, b)
    others = [0, 1, 3, 4]
    assert y[2].isnan().all() and dx[2].isnan().all()
    assert y[others].isfinite().all() and dx[others].isfinite().all()
    assert db is None or db.isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hidden", [131, 65537])
def test_a_row_of_one_value_gives_the_bias(backend, hidden):
    """float32 rows each of one value, 3 + N times 1e-2 ... 1e3: x - mean
    must be 0 exactly, as torch's Welford mean makes it, so y is the bias
    exactly. A mean taken as sum(x) / n is an ulp of the value off, and
    rstd = 1 / sqrt(eps) magnifies that (y ~1 off at 1e3 with eps 1e-6).
    65537: the chunked kernels."""
    device = device_for(backend)
    values = (3 + torch.randn(6, 1)) * 10.0 ** torch.arange(-2, 4).view(6, 1)
    x = values.expand(6, hidden).to(device).contiguous()
    w, b = params("layer_norm", (hidden,), torch.float32, device)
    y, *_ = check("layer_norm", backend, x, (hidden,), w, b, eps=1e-6)
    assert torch.equal(y, b.expand_as(y))


def check_far_from_zero(fn, device, dtype, offset, rows, hidden):
    """LayerNorm does not move when x moves: rows of offset + s, s of spread
    ~2, judged against torch's error on s itself. A kernel that takes
    x - mean with the mean rounded at the offset is that far off in y, dx
    and dweight, as torch's kernels are."""
    x = (offset + torch.randn(rows, hidden) * 2).to(dtype).to(device)
    s = x - offset  # exact: x and offset within a factor of two
    w, b = params("layer_norm", (hidden,), torch.float32, device)
    dy = torch.randn(x.shape, device=device).to(dtype)
    out = run("layer_norm", x, (hidden,), w, b, 1e-5, dy, fn)
    ref = run("layer_norm", x.double(), (hidden,), w.double(), b.double(), 1e-5, dy.double(), reference.layer_norm)
    pt = run("layer_norm", s, (hidden,), w, b, 1e-5, dy, reference.layer_norm)
    for name, o, r, p in zip(("y", "dx", "dweight", "dbias"), out, ref, pt):
        assert_close(o, r, p, name)


# float32 at 3000 (the mean's own rounding there is 1.2e-4); float16 at 1500
# with a float32 weight (dweight, in float32, sees it).
FAR_FROM_ZERO = [(torch.float32, 3000.0), (torch.float16, 1500.0)]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype,offset", FAR_FROM_ZERO, ids=str)
@pytest.mark.parametrize("hidden", [131, 65537])
def test_rows_far_from_zero_are_centered_to_their_spread(backend, dtype, offset, hidden):
    """64 rows; 65537: the chunked kernels."""
    check_far_from_zero(pyext_fn("layer_norm", backend), device_for(backend), dtype, offset, 64, hidden)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rms_norm_default_eps_is_torchs(backend, dtype):
    # Tiny values: there eps decides the output. torch's eps=None is the
    # epsilon of float32 (its math type), not of bfloat16. 1024 rows: dx is
    # ~1000 here and both errors are an ulp or two, so over a few rows the rule
    # compares two noisy maxima (Triton, fp32, 3 rows: past 2x torch's in 54 of
    # 2000 runs; 1024 rows: in none of 2000).
    device = device_for(backend)
    x = make_tensor((1024, 16), dtype, device, scale=1e-3)
    y = pyext.rms_norm(x, (16,), backend=backend)
    expected = F.rms_norm(x.cpu(), (16,), eps=torch.finfo(torch.float32).eps)
    torch.testing.assert_close(F.rms_norm(x.cpu(), (16,)), expected, rtol=0, atol=0)
    check("rms_norm", backend, x, (16,))
    torch.testing.assert_close(y.cpu(), expected)


def take_the_chunked_path(monkeypatch):
    """Rows of more than 64 elements take the Triton chunked kernels (long
    rows), in chunks of 128: several chunks with a ragged tail, several rows
    per program, cheap under the interpreter."""
    from pyext.triton_kernels import layer_norm as kernels
    monkeypatch.setattr(kernels, "FWD_FUSED_COLS", 64)
    monkeypatch.setattr(kernels, "BWD_FUSED_COLS", 64)
    monkeypatch.setattr(kernels, "CHUNK", 128)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_weight_no_bias"])
@pytest.mark.parametrize("kind", KINDS)
def test_chunked_path_on_short_rows(kind, affine, monkeypatch):
    """The Triton chunked kernels on rows made 'long' by lowering the fast-path limits."""
    take_the_chunked_path(monkeypatch)
    device = device_for("triton")
    for dtype in DTYPES:
        x = inputs(11, 300, dtype, device)
        w, b = params(kind, (300,), dtype, device, weight=affine, bias=affine)
        check(kind, "triton", x, (300,), w, b)


@pytest.mark.parametrize("bad", ["shape", "dtype", "strides"])
def test_triton_kernels_refuse_an_out_they_cannot_fill(bad):
    """The launch functions take outs (the tests' poisoned ones) only of
    each result's shape and dtype, contiguous."""
    from pyext.triton_kernels import layer_norm as kernels
    x = make_tensor((4, 6), torch.float32, device_for("triton"))
    y = {"shape": x.new_empty(4, 5), "dtype": x.new_empty(4, 6, dtype=torch.float16),
         "strides": x.new_empty(6, 4).t()}[bad]
    with pytest.raises(ValueError, match=r"out\[0\] must be contiguous"):
        kernels.layer_norm_fwd(x, (6,), None, None, 1e-5, out=(y, None, None))
    with pytest.raises(ValueError, match=r"out\[0\] must be contiguous"):
        kernels.rms_norm_fwd(x, (6,), None, 1e-5, out=(y, None))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("hidden", [1023, 4096 + 9])
def test_triton_kernels_write_every_element(kind, hidden):
    from pyext.triton_kernels import layer_norm as kernels
    device = device_for("triton")
    x = inputs(7, hidden, torch.bfloat16, device)
    dy = torch.randn_like(x)
    w, b = params(kind, (hidden,), torch.bfloat16, device)
    if kind == "layer_norm":
        clean = kernels.layer_norm_fwd(x, (hidden,), w, b, 1e-5)
        out = kernels.layer_norm_fwd(x, (hidden,), w, b, 1e-5, out=tuple(poisoned_like(t) for t in clean))
        grads = kernels.layer_norm_bwd(dy, x, clean[1], clean[2], w, b, True, True)
        poisoned = tuple(poisoned_like(t) for t in grads)
        out += kernels.layer_norm_bwd(dy, x, clean[1], clean[2], w, b, True, True, out=poisoned)
    else:
        clean = kernels.rms_norm_fwd(x, (hidden,), w, 1e-6)
        out = kernels.rms_norm_fwd(x, (hidden,), w, 1e-6, out=tuple(poisoned_like(t) for t in clean))
        grads = kernels.rms_norm_bwd(dy, x, clean[1], w, True)
        out += kernels.rms_norm_bwd(dy, x, clean[1], w, True, out=tuple(poisoned_like(t) for t in grads))
    for got, want in zip(out, clean + grads):
        assert not got.isnan().any()
        assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("hidden", [7, 1024, 4097, 65537])
def test_cuda_kernels_write_every_element(kind, hidden):
    x = inputs(33, hidden, torch.bfloat16, "cuda")
    dy = torch.randn_like(x)
    w, b = params(kind, (hidden,), torch.bfloat16, "cuda")
    nbytes = 4 * x.numel() * 4
    if kind == "layer_norm":
        poison_cuda_allocator(nbytes)
        y, mean, rstd = torch.ops.pyext.layer_norm_fwd_cuda(x, [hidden], w, b, 1e-5)
        poison_cuda_allocator(nbytes)
        outs = (y, mean, rstd) + torch.ops.pyext.layer_norm_bwd_cuda(dy, x, mean, rstd, w, b, True, True)
    else:
        poison_cuda_allocator(nbytes)
        y, rstd = torch.ops.pyext.rms_norm_fwd_cuda(x, [hidden], w, 1e-6)
        poison_cuda_allocator(nbytes)
        outs = (y, rstd) + torch.ops.pyext.rms_norm_bwd_cuda(dy, x, rstd, w, True)
    for t in outs:
        assert not t.isnan().any()


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(backend, kind):
    device = device_for(backend)
    x = make_tensor((5, 7), torch.float64, device, requires_grad=True)
    w = make_tensor((7,), torch.float64, device, requires_grad=True)
    b = make_tensor((7,), torch.float64, device, requires_grad=True)
    if kind == "layer_norm":
        assert torch.autograd.gradcheck(lambda *t: pyext.layer_norm(t[0], (7,), t[1], t[2], backend=backend),
                                        (x, w, b))
    else:
        assert torch.autograd.gradcheck(lambda *t: pyext.rms_norm(t[0], (7,), t[1], backend=backend), (x, w))


def detach(t):
    return t.detach() if t is not None else None


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(backend, kind, affine, dtype):
    """The ops' registrations (schema, fake, autograd), and the statistics
    they save for the backward in float32 whatever x's dtype."""
    device = device_for(backend)
    x = make_tensor((3, 5, 9), dtype, device, requires_grad=True)
    w, b = params(kind, (9,), torch.float32, device, weight=affine, bias=affine)
    if w is not None:
        w.requires_grad_()
    if b is not None:
        b.requires_grad_()
    fwd = getattr(torch.ops.pyext, f"{kind}_fwd_{backend}")
    bwd = getattr(torch.ops.pyext, f"{kind}_bwd_{backend}")
    grad = torch.randn(3, 5, 9, device=device).to(dtype)
    if kind == "layer_norm":
        torch.library.opcheck(fwd, (x, [9], w, b, 1e-5))
        _, mean, rstd = fwd(x.detach(), [9], w, b, 1e-5)
        assert mean.dtype == torch.float32
        torch.library.opcheck(bwd, (grad, x.detach(), mean, rstd, detach(w), detach(b), affine, affine))
    else:
        torch.library.opcheck(fwd, (x, [9], w, 1e-6))
        _, rstd = fwd(x.detach(), [9], w, 1e-6)
        torch.library.opcheck(bwd, (grad, x.detach(), rstd, detach(w), affine))
    assert rstd.dtype == torch.float32


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("compiler", COMPILERS)
def test_compile_fullgraph(backend, kind, compiler):
    device = device_for(backend)
    x = make_tensor((4, 33), torch.float32, device, requires_grad=True)
    w = make_tensor((33,), torch.float32, device, requires_grad=True)
    b = make_tensor((33,), torch.float32, device, requires_grad=True)

    def f(t, w, b):
        if kind == "layer_norm":
            return (pyext.layer_norm(t * 2, (33,), w, b, backend=backend) ** 2).sum()
        return (pyext.rms_norm(t * 2, [33], w, backend=backend) ** 2).sum() + b.sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=compiler)
    grads = torch.autograd.grad(compiled(x, w, b), (x, w, b))
    grads_eager = torch.autograd.grad(f(x, w, b), (x, w, b))
    for g, e in zip(grads, grads_eager):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("kind", KINDS)
def test_a_compiled_norm_keeps_the_hidden_size_symbolic(kind):
    """Hidden sizes that vary (automatic dynamic shapes, mark_dynamic, an
    export's Dim): one graph after the first, as F.layer_norm gives, not one
    per size. normalized_shape's check pinned a symbolic size to its value
    (operator.index), so mark_dynamic and a strict export raised."""
    from torch._dynamo.utils import counters
    norm = getattr(pyext, kind)

    def f(x, w):
        return norm(x, (x.shape[-1],), w, backend="triton")
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for n in (12, 20, 28):
        x, w = torch.randn(3, n, requires_grad=True), torch.randn(n, requires_grad=True)
        compiled(x, w).sum().backward()
    assert counters["stats"]["unique_graphs"] == 2
    x, w = torch.randn(3, 36), torch.randn(36)
    torch._dynamo.reset()
    torch._dynamo.mark_dynamic(x, 1)
    torch._dynamo.mark_dynamic(w, 0)
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(x, w), f(x, w), rtol=0, atol=0)
    hidden = torch.export.Dim("hidden", min=2)
    program = torch.export.export(_Wrapped(f), (x, w), dynamic_shapes=({1: hidden}, {0: hidden}), strict=True)
    x, w = torch.randn(3, 20), torch.randn(20)
    torch.testing.assert_close(program.module()(x, w), f(x, w), rtol=0, atol=0)


class _Wrapped(torch.nn.Module):
    """fn(x, w) as a module, for torch.export."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, w):
        return self.fn(x, w)


@pytest.mark.parametrize("kwargs", [{}, {"elementwise_affine": False}, {"bias": False}, {"eps": 1e-3}], ids=str)
def test_layer_norm_module_is_drop_in(kwargs):
    torch_mod, ours = torch.nn.LayerNorm((4, 6), **kwargs), pyext.nn.LayerNorm((4, 6), **kwargs)
    assert isinstance(ours, torch.nn.LayerNorm)
    assert repr(ours) == repr(torch_mod)
    check_state_dict_round_trip(torch_mod, ours)


@pytest.mark.parametrize("kwargs", [{}, {"elementwise_affine": False}, {"eps": 1e-6}], ids=str)
def test_rms_norm_module_is_drop_in(kwargs):
    torch_mod, ours = torch.nn.RMSNorm(6, **kwargs), pyext.nn.RMSNorm(6, **kwargs)
    assert isinstance(ours, torch.nn.RMSNorm)
    assert repr(ours) == repr(torch_mod)
    check_state_dict_round_trip(torch_mod, ours)


def check_state_dict_round_trip(torch_mod, ours):
    assert ours.state_dict().keys() == torch_mod.state_dict().keys()
    with torch.no_grad():
        for p in torch_mod.parameters():
            p.copy_(torch.randn_like(p))
    ours.load_state_dict(torch_mod.state_dict())
    x = make_tensor((3, 4, 6), torch.float32, "cpu")
    torch.testing.assert_close(ours(x), torch_mod(x))
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn_like(p))
    torch_mod.load_state_dict(ours.state_dict())
    torch.testing.assert_close(torch_mod(x), ours(x))
    device = device_for("triton")  # the module runs pyext's kernels
    ours.backend = "triton"
    torch.testing.assert_close(ours.to(device)(x.to(device)), torch_mod.to(device)(x.to(device)))


@pytest.mark.parametrize("backend", ["auto", "torch", "triton", "cuda"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", ["x_a_list", "int_shape", "tensor_shape", "empty_shape", "bool_shape", "float_shape",
                                  "input_shape", "weight_shape", "bias_shape", "weight_device", "bias_device",
                                  "integer_input", "weight_dtype", "bias_dtype", "none_eps", "string_eps"])
def test_bad_input_raises_torchs_error_naming_the_argument(backend, kind, case):
    """Same exception type as F.layer_norm / F.rms_norm for the same call, a
    message naming the argument, raised before any backend is chosen (so a
    backend that could not run the call says the input is wrong, not that)."""
    x, ns, w, b, eps = torch.randn(2, 3), (3,), torch.randn(3), torch.randn(3), 1e-5
    named = {"none_eps": "eps", "string_eps": "eps", "x_a_list": "x", "input_shape": "x", "integer_input": "x",
             "weight_shape": "weight",
             "weight_device": "weight", "weight_dtype": "weight", "bias_shape": "bias", "bias_device": "bias",
             "bias_dtype": "bias"}.get(case, "normalized_shape")
    if case == "x_a_list":
        x = x.tolist()
    elif case == "int_shape":
        ns = 3
    elif case == "tensor_shape":
        ns = torch.tensor([3])
    elif case == "empty_shape":
        ns, w, b = (), None, None
    elif case == "bool_shape":
        x, ns, w, b = torch.randn(2, 1), (True,), None, None
    elif case == "float_shape":
        ns = (3.0,)
    elif case == "input_shape":
        ns = (4,)
        w, b = torch.randn(4), torch.randn(4)
    elif case == "weight_shape":
        w = torch.randn(4)
    elif case == "bias_shape":
        b = torch.randn(4)
    elif case == "weight_device":
        w = torch.randn(3, device="meta")
    elif case == "bias_device":
        b = torch.randn(3, device="meta")
    elif case == "integer_input":
        x, w, b = torch.arange(6).view(2, 3), None, None
    elif case == "weight_dtype":
        w = torch.randn(3, dtype=torch.float64)
    elif case == "bias_dtype":
        x, w, b = x.bfloat16(), w.bfloat16(), b
    elif case == "none_eps":
        eps = None
    elif case == "string_eps":
        eps = "1e-5"
    if kind == "rms_norm":
        if case in ("bias_shape", "bias_device", "bias_dtype", "weight_dtype", "none_eps"):
            pytest.skip("rms_norm has no bias, promotes any weight dtype, and takes eps None")
        ours = lambda: pyext.rms_norm(x, ns, w, eps, backend=backend)  # noqa: E731
        theirs = lambda: F.rms_norm(x, ns, w, eps)  # noqa: E731
    else:
        ours = lambda: pyext.layer_norm(x, ns, w, b, eps, backend=backend)  # noqa: E731
        theirs = lambda: F.layer_norm(x, ns, w, b, eps)  # noqa: E731
    with pytest.raises(Exception) as torch_error:
        theirs()
    with pytest.raises(Exception) as our_error:
        ours()
    assert type(our_error.value) is type(torch_error.value), (our_error.value, torch_error.value)
    assert re.search(rf"\b{named}\b", str(our_error.value)), our_error.value


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dim", [np.int64(6), torch.tensor(6), torch.tensor([6])],
                         ids=["numpy", "tensor0d", "tensor1d"])
def test_normalized_shape_takes_the_integers_torch_takes(backend, kind, dim):
    """torch's int lists take any integer (NumPy's, one-element integer
    tensors): a model built with nn.LayerNorm(np.prod(shape)) keeps such a
    normalized_shape, and our module, swapped in by pyext.patch, runs it."""
    device = device_for(backend)
    x = make_tensor((3, 6), torch.float32, device)
    w = make_tensor((6,), torch.float32, device)
    check(kind, backend, x, (dim,), w)
    module = {"layer_norm": pyext.nn.LayerNorm, "rms_norm": pyext.nn.RMSNorm}[kind]((dim,), device=device)
    module.backend = backend
    assert module(x).shape == x.shape


@pytest.mark.parametrize("kind", KINDS)
def test_a_dtype_the_kernels_lack_is_named_by_the_triton_backend(kind):
    x = torch.randn(3, 6).to(torch.float8_e4m3fn).to(device_for("triton"))
    with pytest.raises(pyext.BackendUnavailable, match="dtype torch.float8_e4m3fn is not supported"):
        pyext_fn(kind, "triton")(x, (6,))


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_ops_called_directly_refuse_inconsistent_arguments(backend):
    """The ops validate too (they can be called without the public function):
    nothing reads or writes out of bounds."""
    device = device_for(backend)
    x = make_tensor((4, 8), torch.float32, device)
    w = make_tensor((8,), torch.float32, device)
    fwd = getattr(torch.ops.pyext, f"layer_norm_fwd_{backend}")
    bwd = getattr(torch.ops.pyext, f"layer_norm_bwd_{backend}")
    _, mean, rstd = fwd(x, [8], w, None, 1e-5)
    with pytest.raises(RuntimeError, match="normalized_shape"):
        fwd(x, [9], None, None, 1e-5)
    with pytest.raises(RuntimeError, match="weight"):
        fwd(x, [8], w[:7], None, 1e-5)
    with pytest.raises(RuntimeError, match="rstd"):
        bwd(x, x, mean, rstd[:3], w, None, True, False)
    with pytest.raises(RuntimeError, match="grad"):
        bwd(x[:, :7], x, mean, rstd, w, None, True, False)
    with pytest.raises(RuntimeError, match="need_dbias"):
        bwd(x, x, mean, rstd, w, None, True, True)
    with pytest.raises(RuntimeError, match="need_dweight"):
        bwd(x, x, mean, rstd, None, None, True, False)
    with pytest.raises(RuntimeError, match="x dtype|x must be float32"):  # the Triton op's words, the CUDA op's
        fwd(x.to(torch.float8_e4m3fn), [8], None, None, 1e-5)
    rms_fwd = getattr(torch.ops.pyext, f"rms_norm_fwd_{backend}")
    with pytest.raises(RuntimeError, match="weight dtype|weight must be"):  # F.rms_norm would promote it
        rms_fwd(x.bfloat16(), [8], w.double(), 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                             (torch.float64, torch.float32)], ids=str)
@pytest.mark.parametrize("path", ["fused", "chunked"])
def test_rms_norm_weight_narrower_than_x(backend, x_dtype, w_dtype, path, monkeypatch):
    """A weight narrower than x (Mamba's float32 residual stream through its
    bfloat16 RMSNorms): y in x's dtype and dweight in the weight's, as torch
    promotes; the Triton kernels run it, fused or chunked, the CUDA ones
    refuse it by name."""
    if path == "chunked":
        take_the_chunked_path(monkeypatch)
    device = device_for(backend)
    x = inputs(5, 300, x_dtype, device)
    w, _ = params("rms_norm", (300,), w_dtype, device)
    if backend == "cuda":
        with pytest.raises(pyext.BackendUnavailable, match="weight dtype"):
            pyext.rms_norm(x, (300,), w, backend=backend)
        return
    y, _, dw, _ = check("rms_norm", backend, x, (300,), w)
    assert y.dtype == x_dtype and dw.dtype == w_dtype


def test_layer_norm_refuses_a_weight_of_another_dtype_as_torch_does():
    """float32 x with bfloat16 weight: F.layer_norm refuses the mix (rms_norm promotes: above)."""
    x, w = torch.randn(2, 3, device=device_for("triton")), torch.randn(3, device=device_for("triton")).bfloat16()
    with pytest.raises(RuntimeError, match="weight"):
        pyext.layer_norm(x, (3,), w)


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float64], ids=str)
def test_rms_norm_weight_dtype_the_kernels_lack(w_dtype):
    """float16 x with bfloat16 weight, or with a wider float64 one: torch
    promotes to float32 / float64, a dtype other than x's; auto runs the
    reference, a named kernel backend refuses it saying why."""
    device = device_for("triton")
    x, w = torch.randn(2, 3, device=device).half(), torch.randn(3, device=device).to(w_dtype)
    torch.testing.assert_close(pyext.rms_norm(x, (3,), w), F.rms_norm(x, (3,), w))
    with pytest.raises(pyext.BackendUnavailable, match="weight dtype"):
        pyext.rms_norm(x, (3,), w, backend="triton")


@pytest.mark.parametrize("kind", KINDS)
def test_named_cuda_backend_on_cpu_tensor_says_why(kind):
    with pytest.raises(pyext.BackendUnavailable, match="cuda.*(CUDA tensors|not built)"):
        getattr(pyext, kind)(torch.randn(2, 3), (3,), backend="cuda")


# ------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(8, 1024, 768), (4096, 1024), (16384, 8192), (3, 262147)], ids=str)
def test_large(backend, kind, dtype, shape):
    x = make_tensor(shape, dtype, "cuda", scale=2.0) + 1.5
    w, b = params(kind, shape[-1:], dtype, "cuda")
    check(kind, backend, x, shape[-1:], w, b)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("hidden", [768, 1023, 8192, 65537])
def test_deterministic(backend, kind, hidden):
    """Bitwise the same y, dx, dweight and dbias on every run (no atomics)."""
    x = make_tensor((2053, hidden), torch.bfloat16, "cuda")
    w, b = params(kind, (hidden,), torch.float32, "cuda")
    grad = torch.randn_like(x)
    first = run(kind, x, (hidden,), w, b, None if kind == "rms_norm" else 1e-5, grad, pyext_fn(kind, backend))
    for _ in range(3):
        again = run(kind, x, (hidden,), w, b, None if kind == "rms_norm" else 1e-5, grad, pyext_fn(kind, backend))
        for a, c in zip(first, again):
            assert (a is None and c is None) or torch.equal(a, c)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_misaligned_input_takes_the_scalar_path(kind):
    # A contiguous view one element into its storage: not 16-byte aligned.
    for hidden in (1024, 65536):
        x = (make_tensor((5 * hidden + 1,), torch.bfloat16, "cuda") + 1.5)[1:].view(5, hidden)
        w, b = params(kind, (hidden,), torch.bfloat16, "cuda")
        check(kind, "cuda", x, (hidden,), w, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rms_norm_default_eps_matches_torch_on_gpu(dtype):
    x = make_tensor((3, 64), dtype, "cuda", scale=1e-3)
    w = make_tensor((64,), dtype, "cuda")
    for backend in ("cuda", "triton"):
        torch.testing.assert_close(pyext.rms_norm(x, (64,), w, backend=backend), F.rms_norm(x, (64,), w))


@pytest.mark.gpu
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
@pytest.mark.skipif(compute_sanitizer() is None, reason="compute-sanitizer is not on PATH")
def test_cuda_kernels_under_sanitizer(tool):
    # Every configuration (fast path edges, chunked), vector and scalar paths
    # (odd sizes, a misaligned view), with and without weight/bias, small rows.
    # racecheck, far slower (gpu-check gives a test 180 s), one size per
    # configuration and the two reduction types (float32, float64).
    sizes, dtypes = (((1, 7, 128, 129, 1024, 1025, 4096, 8193, 16384, 16385, 40000),
                      "(torch.float32, torch.float32), (torch.bfloat16, torch.float32), "
                      "(torch.float16, torch.float16), (torch.float64, torch.float64)") if tool == "memcheck" else
                     ((7, 1025, 8193, 40000), "(torch.bfloat16, torch.float32), (torch.float64, torch.float64)"))
    code = ("import torch\n"
            "import pyext\n"
            f"for n in {sizes}:\n"
            f"  for dt, wt in ({dtypes}):\n"
            "    base = torch.randn(5 * n + 1, device='cuda', dtype=dt)\n"
            "    for x in (base[:5 * n].view(5, n), base[1:].view(5, n)):\n"
            "      g = torch.randn_like(x)\n"
            "      for w in (None, torch.randn(n, device='cuda', dtype=wt)):\n"
            "        b = None if w is None else torch.randn_like(w)\n"
            "        y, m, r = torch.ops.pyext.layer_norm_fwd_cuda(x, [n], w, b, 1e-5)\n"
            "        torch.ops.pyext.layer_norm_bwd_cuda(g, x, m, r, w, b, w is not None, b is not None)\n"
            "        y, r = torch.ops.pyext.rms_norm_fwd_cuda(x, [n], w, 1e-6)\n"
            "        torch.ops.pyext.rms_norm_bwd_cuda(g, x, r, w, w is not None)\n"
            "torch.cuda.synchronize()\n")
    result = run_under_sanitizer(tool, code)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


def _sequence_parallel_rank(rank, world, mesh, backend):
    """One rank of test_sequence_parallel_norms_run_the_kernels_on_each_ranks_rows."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module

    torch.manual_seed(0)  # the same full tensors on every rank
    x, dy = torch.randn(2, 6, 16), torch.randn(2, 6, 16)
    rows = slice(rank * 6 // world, (rank + 1) * 6 // world)  # this rank's part of the sequence
    errors = {}
    cases = (("layer_norm", pyext.nn.LayerNorm(16, backend=backend),
              lambda x, p: F.layer_norm(x, (16,), p["weight"], p["bias"])),
             ("rms_norm", pyext.nn.RMSNorm(16, eps=1e-6, backend=backend),
              lambda x, p: F.rms_norm(x, (16,), p["weight"], 1e-6)),
             ("grouped_layer_norm", pyext.nn.LayerNorm(16, group_size=4, backend=backend),
              lambda x, p: reference.grouped_layer_norm(x, (16,), p["weight"], p["bias"], 1e-5, 4)),
             ("grouped_rms_norm", pyext.nn.RMSNorm(16, eps=1e-6, group_size=4, backend=backend),
              lambda x, p: reference.grouped_rms_norm(x, (16,), p["weight"], 1e-6, 4)))
    for name, norm, norm_ref in cases:
        with torch.no_grad():
            for p in norm.parameters():
                p.normal_()
        ref = {n: p.detach().clone().requires_grad_() for n, p in norm.named_parameters()}
        x_ref = x.clone().requires_grad_()
        y_ref = norm_ref(x_ref, ref)
        y_ref.backward(dy)
        # SequenceParallel: x sharded along the sequence (dim 1), the parameters replicated
        parallelize_module(norm, mesh, SequenceParallel())
        x_local = x[:, rows].clone().requires_grad_()
        y = norm(x_local)
        y.backward(DTensor.from_local(dy[:, rows], mesh, [Shard(1)]))
        errors[name] = max([(y.full_tensor() - y_ref).abs().max().item(),
                            (x_local.grad - x_ref.grad[:, rows]).abs().max().item()] +
                           [(p.grad.full_tensor() - ref[n].grad).abs().max().item()
                            for n, p in norm.named_parameters()])
    return errors


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sequence_parallel_norms_run_the_kernels_on_each_ranks_rows(backend, monkeypatch, tmp_path):
    """Tensor parallelism's sequence-parallel norms (torch's SequenceParallel
    over pyext.nn.LayerNorm and RMSNorm, whole rows and groups of a row; 2
    gloo processes on CPU, the Triton kernels under the interpreter): x
    sharded along the sequence, the weights replicated. The kernels run on
    each rank's rows (DTensor rules, pyext/ops/sharding.py; a named backend
    refused DTensors before), the weights' gradients each rank's part,
    summed: torch's full run's."""
    results = run_on_ranks(_sequence_parallel_rank, tmp_path, monkeypatch, backend)
    assert all(err < 1e-5 for errors in results.values() for err in errors.values()), results
