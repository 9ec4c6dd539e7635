"""pyext.layer_norm and pyext.rms_norm with group_size: each group of
group_size consecutive elements of a row normalized separately, the weight
and bias over the whole row (Cohere's per-head QK norm, Qwen4-Exp's norm
over its hyper-connection streams). The specification; each check covers
y, dx, dweight and dbias."""
import pytest
import torch

import pyext
from pyext import reference
from pyext.ops.layer_norm import default_rms_eps
from conftest import COMPILERS, assert_close, device_for, make_tensor, poisoned_like

KINDS = ["layer_norm", "rms_norm"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["torch", "triton"]  # no CUDA kernels (a named "cuda" raises, below)
# (normalized_shape, group_size): 3 groups of 4; Cohere's QK norm, 3 heads
# of 40 and 4 of 32; groups of one; 2 streams of 1025 (a 2048 block, ragged);
# groups of 20 across the dims of (5, 8)
SHAPES = [((12,), 4), ((3, 40), 40), ((4, 32), 32), ((6,), 1), ((2, 1025), 1025), ((5, 8), 20)]


def run(kind, fn, x, normalized_shape, weight, bias, eps, group_size, grad):
    """y and the gradients of x, weight and bias (None where absent)."""
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_() if weight is not None else None
    bias = bias.detach().requires_grad_() if bias is not None else None
    if kind == "layer_norm":
        y = fn(x, normalized_shape, weight, bias, eps, group_size)
    else:
        y = fn(x, normalized_shape, weight, eps, group_size)
    leaves = [t for t in (x, weight, bias) if t is not None]
    grads = iter(torch.autograd.grad(y, leaves, grad))
    return [y] + [next(grads) if t is not None else None for t in (x, weight, bias)]


def check(kind, backend, x, weight, bias, normalized_shape, group_size, eps=1e-5):
    """pyext's y, dx, dweight, dbias against the float64 oracle (conftest
    rule), the reference in x's dtype (float32 math, one rounding: the
    models' code) the yardstick."""
    f = getattr(pyext, kind)
    if kind == "layer_norm":
        ours = lambda x, s, w, b, eps, g: f(x, s, w, b, eps, group_size=g, backend=backend)  # noqa: E731
    else:
        ours = lambda x, s, w, eps, g: f(x, s, w, eps, group_size=g, backend=backend)  # noqa: E731
        bias = None
    theirs = getattr(reference, f"grouped_{kind}")
    eps64 = default_rms_eps(x.dtype) if eps is None else eps
    grad = torch.randn(x.shape, device=x.device).to(x.dtype)
    out = run(kind, ours, x, normalized_shape, weight, bias, eps, group_size, grad)
    double = [t.double() if t is not None else None for t in (x, weight, bias, grad)]
    ref = run(kind, theirs, double[0], normalized_shape, *double[1:3], eps64, group_size, double[3])
    pt = run(kind, theirs, x, normalized_shape, weight, bias, eps, group_size, grad)
    for name, o, r, p in zip(("y", "dx", "dweight", "dbias"), out, ref, pt):
        if o is not None:
            assert_close(o, r, p, name)
    return out


def inputs(rows, normalized_shape, dtype, device, layout="contiguous"):
    """x with a nonzero mean; weight and bias of normalized_shape."""
    x = make_tensor((rows, *normalized_shape), dtype, device, layout=layout, scale=2.0) + 1.5
    return x, make_tensor(normalized_shape, dtype, device), make_tensor(normalized_shape, dtype, device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalized_shape,group_size", SHAPES, ids=str)
def test_matches_oracle(backend, kind, dtype, normalized_shape, group_size):
    check(kind, backend, *inputs(3, normalized_shape, dtype, device_for(backend)), normalized_shape, group_size)


@pytest.mark.parametrize("kind", KINDS)
def test_groups_past_64k(kind):
    """Two groups of 65537 a row (the chunked kernels, the last chunk one element)."""
    check(kind, "triton", *inputs(2, (2, 65537), torch.bfloat16, device_for("triton")), (2, 65537), 65537)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("rows,normalized_shape,group_size", [
    (8192, (96, 128), 128), (8192, (8, 128), 128), (4096, (4 * 4096,), 4096), (1025, (2, 16385), 16385)], ids=str)
def test_matches_oracle_gpu_sizes(kind, dtype, rows, normalized_shape, group_size):
    """Command R+'s QK norms over 8192 tokens (96 query heads, 8 key heads,
    of 128), Qwen4-Exp's norm of 4 streams of 4096, and groups past the
    rows held whole (the chunked kernels)."""
    check(kind, "triton", *inputs(rows, normalized_shape, dtype, "cuda"), normalized_shape, group_size)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", ["no_weight", "no_bias", "float32_params", "eps_none", "leading_dims",
                                  "transposed", "narrower_rms_weight"])
def test_options_and_layouts(backend, kind, case):
    """Without a weight or a bias; float32 parameters on bfloat16 x (y in x's
    dtype); eps None (F.rms_norm's default); (B, S, H, D) x, a weight of
    (H, D); transposed x; a bfloat16 RMSNorm weight on float32 x."""
    if (case == "eps_none" or case == "narrower_rms_weight") and kind == "layer_norm":
        pytest.skip("rms_norm's")
    device = device_for(backend)
    shape = (6, 8)
    x, w, b = inputs(6, shape, torch.bfloat16, device, "transposed" if case == "transposed" else "contiguous")
    w = None if case == "no_weight" else w
    b = None if case == "no_bias" else b
    if case == "float32_params":
        w, b = w.float(), b.float()
    if case == "leading_dims":
        x = x.view(2, 3, 6, 8)
    if case == "narrower_rms_weight":
        x = x.float()
    y = check(kind, backend, x, w, b, shape, 8, eps=None if case == "eps_none" else 1e-5)[0]
    assert y.dtype == x.dtype and y.shape == x.shape


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("normalized_shape,group_size", [((300,), 100), ((2, 130), 130), ((195,), 65)], ids=str)
def test_chunked_path_matches_oracle(kind, normalized_shape, group_size, monkeypatch):
    """Groups longer than the rows held whole (the limits lowered to 64,
    chunks of 32): 3 groups of 100, 2 heads of 130, 3 groups of 65; 11 rows,
    several a backward program."""
    from pyext.triton_kernels import layer_norm as kernels
    monkeypatch.setattr(kernels, "FWD_FUSED_COLS", 64)
    monkeypatch.setattr(kernels, "BWD_FUSED_COLS", 64)
    monkeypatch.setattr(kernels, "CHUNK", 32)
    for dtype in DTYPES:
        check(kind, "triton", *inputs(11, normalized_shape, dtype, device_for("triton")), normalized_shape,
              group_size)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("normalized_shape,group_size", [((3, 40), 40), ((2, 8193), 8193), ((2, 16385), 16385)],
                         ids=str)
def test_triton_kernels_write_every_element(kind, normalized_shape, group_size):
    """Poisoned outputs: fused both ways, chunked backward, chunked both ways."""
    from pyext.triton_kernels import layer_norm as kernels
    x, w, b = inputs(7, normalized_shape, torch.bfloat16, device_for("triton"))
    dy = torch.randn_like(x)
    if kind == "layer_norm":
        fwd = lambda out=None: kernels.layer_norm_fwd(x, normalized_shape, w, b, 1e-5, out, group_size)  # noqa: E731
        bwd = lambda s, out=None: kernels.layer_norm_bwd(dy, x, s[1], s[2], w, b, True, True, out,  # noqa: E731
                                                         group_size)
    else:
        fwd = lambda out=None: kernels.rms_norm_fwd(x, normalized_shape, w, 1e-6, out, group_size)  # noqa: E731
        bwd = lambda s, out=None: kernels.rms_norm_bwd(dy, x, s[1], w, True, out, group_size)  # noqa: E731
    clean = fwd()
    grads = bwd(clean)
    out = fwd(tuple(poisoned_like(t) for t in clean)) + bwd(clean, tuple(poisoned_like(t) for t in grads))
    for got, want in zip(out, clean + grads):
        assert not got.isnan().any()
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_statistics_are_per_group(backend, kind):
    """The forward op's statistics: x's leading shape, then the groups."""
    x, w, b = inputs(5, (3, 40), torch.bfloat16, device_for(backend))
    op = getattr(torch.ops.pyext, f"grouped_{kind}_fwd_triton")
    out = op(x, [3, 40], w, b, 1e-5, 40) if kind == "layer_norm" else op(x, [3, 40], w, 1e-5, 40)
    for stat in out[1:]:
        assert stat.shape == (5, 3) and stat.dtype == torch.float32
    rstd = torch.rsqrt(x.float().var(-1, unbiased=False) + 1e-5 if kind == "layer_norm" else
                       x.float().pow(2).mean(-1) + 1e-5)
    torch.testing.assert_close(out[-1], rstd)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_nan_stays_in_its_group(backend, kind):
    x, w, b = inputs(4, (3, 40), torch.float32, device_for(backend))
    x[2, 1, 7] = float("nan")
    y, dx, dw, db = check(kind, backend, x, w, b, (3, 40), 40)
    for t in (y, dx):
        assert t[2, 1].isnan().all()
        t[2, 1] = 0
        assert t.isfinite().all()
    assert db is None or db.isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape,normalized_shape,group_size", [((0, 3, 8), (3, 8), 8), ((4, 0), (0,), 4)], ids=str)
def test_zero_size(backend, kind, shape, normalized_shape, group_size):
    device = device_for(backend)
    x = make_tensor(shape, torch.float32, device)
    w, b = make_tensor(normalized_shape, torch.float32, device), make_tensor(normalized_shape, torch.float32, device)
    y, dx, dw, _ = check(kind, backend, x, w, b, normalized_shape, group_size)
    assert y.shape == x.shape and dx.shape == x.shape and dw.shape == normalized_shape


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(kind):
    x, w, b = (t.double().requires_grad_() for t in inputs(3, (2, 5), torch.float64, device_for("triton")))
    if kind == "layer_norm":
        f = lambda x, w, b: pyext.layer_norm(x, (2, 5), w, b, group_size=5, backend="triton")  # noqa: E731
        assert torch.autograd.gradcheck(f, (x, w, b))
    else:
        f = lambda x, w: pyext.rms_norm(x, (2, 5), w, group_size=5, backend="triton")  # noqa: E731
        assert torch.autograd.gradcheck(f, (x, w))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("affine", [True, False])
def test_opcheck(kind, affine):
    device = device_for("triton")
    x, w, b = inputs(3, (4, 6), torch.bfloat16, device)
    x.requires_grad_()
    w, b = (w.float().requires_grad_(), b.float().requires_grad_()) if affine else (None, None)
    fwd = getattr(torch.ops.pyext, f"grouped_{kind}_fwd_triton")
    bwd = getattr(torch.ops.pyext, f"grouped_{kind}_bwd_triton")
    grad = torch.randn(x.shape, device=device).to(x.dtype)
    detach = lambda t: t.detach() if t is not None else None  # noqa: E731
    if kind == "layer_norm":
        torch.library.opcheck(fwd, (x, [4, 6], w, b, 1e-5, 6))
        _, mean, rstd = fwd(x.detach(), [4, 6], w, b, 1e-5, 6)
        torch.library.opcheck(bwd, (grad, x.detach(), mean, rstd, detach(w), detach(b), affine, affine, 6))
    else:
        torch.library.opcheck(fwd, (x, [4, 6], w, 1e-6, 6))
        _, rstd = fwd(x.detach(), [4, 6], w, 1e-6, 6)
        torch.library.opcheck(bwd, (grad, x.detach(), rstd, detach(w), affine, 6))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("compiler", COMPILERS)
def test_compile_fullgraph(kind, compiler):
    x, w, b = (t.requires_grad_() for t in inputs(4, (3, 11), torch.float32, device_for("triton")))

    def f(x, w, b):
        if kind == "layer_norm":
            return (pyext.layer_norm(x * 2, (3, 11), w, b, group_size=11, backend="triton") ** 2).sum()
        return (pyext.rms_norm(x * 2, (3, 11), w, group_size=11, backend="triton") ** 2).sum() + b.sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=compiler)
    for got, want in zip(torch.autograd.grad(compiled(x, w, b), (x, w, b)), torch.autograd.grad(f(x, w, b), (x, w, b))):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_module_holds_torchs_state(kind):
    """pyext.nn.LayerNorm / RMSNorm with group_size load torch's modules'
    state_dict and give theirs back: the groups change the computation, not
    the parameters."""
    cls = {"layer_norm": torch.nn.LayerNorm, "rms_norm": torch.nn.RMSNorm}[kind]
    theirs = cls((3, 8))
    ours = getattr(pyext.nn, cls.__name__)((3, 8), group_size=8, backend="triton")
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    x = make_tensor((5, 3, 8), torch.float32, device_for("triton"))
    want = reference.grouped_layer_norm(x, (3, 8), theirs.weight, theirs.bias, 1e-5, 8) if kind == "layer_norm" \
        else reference.grouped_rms_norm(x, (3, 8), theirs.weight, None, 8)
    torch.testing.assert_close(ours(x), want)
    assert "group_size=8" in repr(ours)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("group_size", [0, 5, -4, 4.0, True], ids=str)
def test_a_group_size_not_dividing_the_row_raises(kind, group_size):
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="group_size must be a positive divisor of prod\\(normalized_shape\\) = 12"):
        getattr(pyext, kind)(x, (3, 4), group_size=group_size)


@pytest.mark.parametrize("kind", KINDS)
def test_the_cuda_backend_named_raises_saying_why(kind):
    with pytest.raises(pyext.BackendUnavailable, match="no CUDA kernels for norms over groups"):
        getattr(pyext, kind)(torch.randn(2, 3, 4), (3, 4), group_size=4, backend="cuda")


@pytest.mark.parametrize("kind", KINDS)
def test_a_group_of_the_whole_row_is_the_plain_norm(kind):
    """group_size equal to the row: the plain op, its CUDA kernels too."""
    x, w, b = inputs(3, (12,), torch.float32, device_for("triton"))
    f = getattr(pyext, kind)
    args = (w, b) if kind == "layer_norm" else (w,)
    torch.testing.assert_close(f(x, (12,), *args, group_size=12, backend="triton"), f(x, (12,), *args, backend="torch"))


def test_ops_called_directly_refuse_inconsistent_statistics():
    x, w, b = inputs(4, (2, 8), torch.float32, device_for("triton"))
    _, mean, rstd = torch.ops.pyext.grouped_layer_norm_fwd_triton(x, [2, 8], w, b, 1e-5, 8)
    bwd = torch.ops.pyext.grouped_layer_norm_bwd_triton
    with pytest.raises(RuntimeError, match="rstd must be torch.float32 of x's leading shape, then the groups"):
        bwd(x, x, mean, rstd[:, :1].contiguous(), w, b, True, True, 8)
    with pytest.raises(ValueError, match="group_size"):
        bwd(x, x, mean, rstd, w, b, True, True, 5)


@pytest.mark.parametrize("kind", KINDS)
def test_auto_runs_the_kernels_and_double_backward_is_the_references(kind, auto_runs_the_triton_kernels):
    """"auto" runs the Triton ops (as on a GPU); a backward with
    create_graph=True is torch's from the saved inputs, as for the plain
    norms; a named kernel backend raises there."""
    x, w, b = (t.double().requires_grad_() for t in inputs(3, (2, 5), torch.float64, device_for("triton")))
    args = (w, b) if kind == "layer_norm" else (w,)

    def norm(backend):
        return getattr(pyext, kind)(x, (2, 5), *args, group_size=5, backend=backend)
    assert f"grouped_{kind}_fwd_triton" in type(norm("auto").grad_fn).__name__
    leaves = (x, *args)
    twice = []
    for backend in ("auto", "torch"):
        grads = torch.autograd.grad(norm(backend).pow(2).sum(), leaves, create_graph=True)
        twice.append(torch.autograd.grad(sum(g.pow(2).sum() for g in grads), leaves))
    for got, want in zip(*twice):
        torch.testing.assert_close(got, want)
    with pytest.raises(pyext.BackendUnavailable, match="create_graph=True"):
        torch.autograd.grad(norm("triton").pow(2).sum(), leaves, create_graph=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_autocast_casts_as_for_the_plain_norm(backend, kind, monkeypatch):
    """Under autocast the inputs are cast as torch casts them for
    F.layer_norm / F.rms_norm: float32 where its policy says (CUDA's; here
    made to say so for the tests' device), the groups unchanged."""
    from pyext import _autocast
    device = device_for(backend)
    monkeypatch.setitem(_autocast.POLICY, f"aten::{kind}", (frozenset({device.type}), True))
    x, w, b = inputs(3, (2, 8), torch.bfloat16, device)
    args = (w, b) if kind == "layer_norm" else (w,)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = getattr(pyext, kind)(x, (2, 8), *args, group_size=8, backend=backend)
    want = getattr(reference, f"grouped_{kind}")(x.float(), (2, 8), *(t.float() for t in args),
                                                 *((1e-5,) if kind == "layer_norm" else (None,)), 8)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, want)


@pytest.mark.parametrize("kind", KINDS)
def test_more_groups_than_the_grid_takes_are_torchs_under_auto_and_named_by_the_kernels(kind, monkeypatch,
                                                                                      auto_runs_the_triton_kernels):
    """Groups beyond the fused kernels' grid axis (65535, lowered to 4
    here): "auto" runs torch, a named "triton" raises saying why, and so
    do the ops called directly."""
    from pyext.ops import layer_norm
    monkeypatch.setattr(layer_norm, "MAX_GROUPS", 4)
    x, w, _ = inputs(2, (10,), torch.float32, device_for("triton"))
    f = getattr(pyext, kind)
    y = f(x.requires_grad_(), (10,), w, group_size=2)
    assert "triton" not in type(y.grad_fn).__name__
    torch.testing.assert_close(y, f(x, (10,), w, group_size=2, backend="torch"))
    with pytest.raises(pyext.BackendUnavailable, match="5 groups a row, more than the 4"):
        f(x, (10,), w, group_size=2, backend="triton")
    op = getattr(torch.ops.pyext, f"grouped_{kind}_fwd_triton")
    with pytest.raises(RuntimeError, match="5 groups a row"):
        op(x, [10], w, None, 1e-5, 2) if kind == "layer_norm" else op(x, [10], w, 1e-5, 2)
    assert f(x, (10,), w, group_size=5, backend="triton").shape == x.shape  # 2 groups: the kernels'
