"""pyext.rms_norm_gated: the gated RMSNorm of linear attention and Mamba
layers, the specification. Each check covers y, dx, dgate and dweight."""
import pytest
import torch

import pyext
from pyext import reference
from pyext.ops.layer_norm import default_rms_eps
from conftest import COMPILERS, assert_close, device_for, make_tensor, poisoned_like, run_on_ranks

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACTIVATIONS = ["silu", "sigmoid"]
ORDERS = [pytest.param(True, id="norm_before_gate"), pytest.param(False, id="gate_before_norm")]
# one, odd, a head's worth (Qwen3-Next's 128), one past a 1024 block, the
# end of the rows held whole (8192)
HIDDEN = [1, 37, 128, 1025, 8192]


def models_code(x, gate, weight, eps, activation, norm_before_gate, group_size):
    """The yardstick: the models' own gated norm in x's dtype (torch has
    none). Norm before gate as Qwen3-Next's Qwen3NextRMSNormGated (the
    normalized x rounded to the dtype, times the weight, times act(gate) in
    float32, rounded again); gate before norm as Mamba 2's MambaRMSNormGated
    (x * silu(gate) in float32, normalized, rounded, times the weight)."""
    dtype = x.dtype
    z = gate.float()
    act = z * torch.sigmoid(z) if activation == "silu" else torch.sigmoid(z)
    h = x.float() if norm_before_gate else x.float() * act
    groups = h.unflatten(-1, (-1, group_size or h.shape[-1]))
    h = (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2).to(dtype)
    if weight is not None:
        h = weight * h
    if norm_before_gate:
        h = h * act
    return h.to(dtype)  # Mamba 2's is in the promoted dtype (float32 with a float32 weight); pyext's in x's


def run(fn, x, gate, weight, dy):
    """y and the gradients of x, gate and weight (None without a weight)."""
    leaves = [t.detach().requires_grad_() for t in (x, gate)]
    weight = weight.detach().requires_grad_() if weight is not None else None
    y = fn(*leaves, weight)
    grads = torch.autograd.grad(y, leaves + ([weight] if weight is not None else []), dy)
    return [y, *grads] + ([None] if weight is None else [])


def check(backend, x, gate, weight=None, eps=1e-6, activation="silu", norm_before_gate=True, group_size=None):
    """pyext's y, dx, dgate, dweight against the float64 oracle (conftest
    rule), the models' code in x's dtype the yardstick."""
    options = dict(activation=activation, norm_before_gate=norm_before_gate, group_size=group_size)
    dy = torch.randn(x.shape, device=x.device).to(x.dtype)
    out = run(lambda x, g, w: pyext.rms_norm_gated(x, g, w, eps, backend=backend, **options), x, gate, weight, dy)
    eps64 = default_rms_eps(x.dtype) if eps is None else eps  # eps=None: x's dtype's meaning, in float64 too
    ref = run(lambda x, g, w: reference.rms_norm_gated(x, g, w, eps64, **options),
              *(t.double() if t is not None else None for t in (x, gate, weight, dy)))
    pt = run(lambda x, g, w: models_code(x, g, w, eps64, **options), x, gate, weight, dy)
    for name, o, r, p in zip(("y", "dx", "dgate", "dweight"), out, ref, pt):
        if o is not None:
            assert_close(o, r, p, name)
    return out


def inputs(rows, hidden, dtype, device, layout="contiguous"):
    """x with a nonzero mean, a gate across silu's bend, a weight near 1."""
    x = make_tensor((rows, hidden), dtype, device, layout=layout, scale=2.0) + 0.5
    gate = make_tensor((rows, hidden), dtype, device, layout=layout, scale=3.0)
    weight = (1 + 0.3 * make_tensor((hidden,), torch.float32, device)).to(dtype)
    return x, gate, weight


@pytest.mark.parametrize("backend", ["torch", "triton"])  # no CUDA kernels (a named "cuda" raises, below)
@pytest.mark.parametrize("norm_before_gate", ORDERS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_matches_oracle(backend, norm_before_gate, activation, dtype, hidden):
    check(backend, *inputs(3, hidden, dtype, device_for(backend)), activation=activation,
          norm_before_gate=norm_before_gate)


@pytest.mark.gpu
@pytest.mark.parametrize("norm_before_gate", ORDERS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("rows,hidden,group_size", [(16384 * 4, 128, None), (4097, 4096, None), (1025, 8192, None),
                                                    (2049, 8192, 1024), (1025, 16384, 2048), (513, 20480, None)],
                         ids=str)
def test_matches_oracle_gpu_sizes(norm_before_gate, dtype, rows, hidden, group_size):
    """Qwen3-Next's rows of a head (many short rows: the batched tiles and
    the persistent backward's long walks), Mamba 2's widths, Nemotron-H's 8
    groups of 1024 (8B) and of 2048 (56B), a row of
    20480 (chunked, ragged)."""
    check("triton", *inputs(rows, hidden, dtype, "cuda"), norm_before_gate=norm_before_gate, group_size=group_size)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("norm_before_gate", ORDERS)
@pytest.mark.parametrize("case", ["no_weight", "float32_weight", "bfloat16_gate_and_weight", "eps_none",
                                  "leading_dims", "transposed"])
def test_options_and_layouts(backend, norm_before_gate, case):
    """Without a weight; a float32 weight on bfloat16 x (y in x's dtype); a
    bfloat16 gate and weight on float32 x (Granite 4's Mamba layers; dgate
    and dweight in bf16); eps=None (F.rms_norm's default); (B, S, H, D)
    rows; transposed x and gate."""
    device = device_for(backend)
    x, gate, weight = inputs(6, 40, torch.bfloat16, device, "transposed" if case == "transposed" else "contiguous")
    if case == "bfloat16_gate_and_weight":
        x = x.float()
    eps = None if case == "eps_none" else 1e-6
    if case == "no_weight":
        weight = None
    if case == "float32_weight":
        weight = weight.float()
    if case == "leading_dims":
        x, gate = x.view(2, 3, 1, 40), gate.view(2, 3, 1, 40)
    y = check(backend, x, gate, weight, eps, norm_before_gate=norm_before_gate)[0]
    assert y.dtype == x.dtype and y.shape == x.shape


# (hidden, group size): Mamba 2's groups of the features: 2 of 3, 8 of 16
# (Nemotron-H's 8), 3 of 16 and 96 of 2 (not powers of two), 4 of a block
# and one (1025 in a 2048 block)
GROUPS = [(6, 3), (128, 16), (48, 16), (192, 2), (4100, 1025)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("norm_before_gate", ORDERS)
@pytest.mark.parametrize("hidden,group_size", GROUPS, ids=str)
def test_groups_match_oracle(backend, norm_before_gate, hidden, group_size):
    check(backend, *inputs(5, hidden, torch.bfloat16, device_for(backend)), norm_before_gate=norm_before_gate,
          group_size=group_size)


def test_more_groups_than_the_grid_takes_are_torchs_under_auto_and_named_by_the_kernels(monkeypatch,
                                                                                      auto_runs_the_triton_kernels):
    """Groups beyond the fused kernels' grid axis (65535, lowered to 4 here)."""
    from pyext.ops import layer_norm
    monkeypatch.setattr(layer_norm, "MAX_GROUPS", 4)
    x, gate, weight = inputs(3, 10, torch.bfloat16, device_for("triton"))
    y = check("auto", x, gate, weight, group_size=2)[0]
    assert "triton" not in type(y.grad_fn).__name__
    assert "triton" in type(check("auto", x, gate, weight, group_size=5)[0].grad_fn).__name__  # 2 groups
    with pytest.raises(pyext.BackendUnavailable, match="5 groups a row, more than the 4"):
        pyext.rms_norm_gated(x, gate, weight, group_size=2, backend="triton")


@pytest.fixture
def chunked_path(monkeypatch):
    """Rows of more than 64 features take the chunked kernels, 32 at a
    time: several chunks with a ragged tail, cheap under the interpreter."""
    from pyext.triton_kernels import rms_norm_gated as kernels
    monkeypatch.setattr(kernels, "FUSED_COLS", 64)
    monkeypatch.setattr(kernels, "CHUNK", 32)


@pytest.mark.parametrize("norm_before_gate", ORDERS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype,hidden,group_size", [(dtype, 100, None) for dtype in DTYPES] + [
    (torch.bfloat16, 300, 100), (torch.bfloat16, 260, 65)], ids=str)
def test_chunked_path_matches_oracle(chunked_path, norm_before_gate, activation, dtype, hidden, group_size):
    """Long rows (made long by lowering the limits), in each dtype; in bf16,
    long groups: 3 of 100, 4 of 65 (two chunks and one element); 5 rows, so
    several a backward program (4 of them)."""
    check("triton", *inputs(5, hidden, dtype, device_for("triton")), activation=activation,
          norm_before_gate=norm_before_gate, group_size=group_size)


@pytest.mark.parametrize("norm_before_gate", ORDERS)
@pytest.mark.parametrize("hidden,group_size", [(8193, None), (65537, None), (2 * 65537, 65537)], ids=str)
def test_rows_past_8192_take_the_chunked_kernels(norm_before_gate, hidden, group_size):
    """Past 8192 and past 64K, a whole row or groups of 65537 (odd: the last chunk one element)."""
    x, gate, weight = inputs(2, hidden, torch.bfloat16, device_for("triton"))
    check("triton", x, gate, weight, norm_before_gate=norm_before_gate, group_size=group_size)


def _tensor_parallel_rank(rank, world, mesh):
    """One rank of test_tensor_parallel_gated_norm_runs_the_kernels_on_each_ranks_rows."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    torch.manual_seed(0)  # the same full tensors on every rank
    x, gate, weight, dy = torch.randn(2, 6, 16), torch.randn(2, 6, 16), torch.randn(16), torch.randn(2, 6, 16)
    errors, placed_as_x = {}, {}
    for norm_before_gate, group_size in ((True, None), (False, 4)):
        full = [t.clone().requires_grad_() for t in (x, gate, weight)]
        y_ref = reference.rms_norm_gated(*full, 1e-6, "silu", norm_before_gate, group_size)
        y_ref.backward(dy)
        # the sequence, the batch, replicated; a gate placed otherwise than x and x sharded along its
        # features each go through DTensor's redistribution first
        for x_place, gate_place in ((Shard(1), Shard(1)), (Shard(0), Shard(0)), (Replicate(), Replicate()),
                                    (Shard(1), Replicate()), (Shard(2), Shard(1))):
            case = f"{norm_before_gate} {group_size} {x_place} {gate_place}"
            parts = [distribute_tensor(t, mesh, [place]).requires_grad_()
                     for t, place in ((x, x_place), (gate, gate_place), (weight, Replicate()))]
            y = pyext.rms_norm_gated(*parts, 1e-6, norm_before_gate=norm_before_gate, group_size=group_size,
                                     backend="triton")
            y.backward(distribute_tensor(dy, mesh, y.placements))
            if x_place != Shard(2):  # rows sharded stay sharded: no gather around the kernels
                placed_as_x[case] = y.placements == (x_place,)
            errors[case] = max([(y.full_tensor() - y_ref).abs().max().item()] +
                               [(p.grad.full_tensor() - r.grad).abs().max().item() for p, r in zip(parts, full)])
    return errors, placed_as_x


def test_tensor_parallel_gated_norm_runs_the_kernels_on_each_ranks_rows(monkeypatch, tmp_path):
    """Tensor parallelism's activations (2 gloo processes on CPU, the Triton
    kernels under the interpreter): x and the gate sharded along the
    sequence or the batch, or replicated, the weight replicated. The
    kernels run on each rank's rows (DTensor rules, pyext/ops/sharding.py; a
    named backend refused DTensors before); y as x, dx, dgate and the summed
    dweight torch's full run's."""
    for errors, placed_as_x in run_on_ranks(_tensor_parallel_rank, tmp_path, monkeypatch).values():
        assert all(err < 1e-5 for err in errors.values()), errors
        assert all(placed_as_x.values()), placed_as_x


def test_no_cuda_kernels_and_a_named_cuda_backend_says_so():
    x, gate, weight = inputs(2, 8, torch.float32, "cpu")
    with pytest.raises(pyext.BackendUnavailable, match="backend 'cuda'"):
        pyext.rms_norm_gated(x, gate, weight, backend="cuda")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape", [(0, 7), (2, 0, 7), (3, 0)], ids=str)
def test_zero_size(backend, shape):
    device = device_for(backend)
    x, gate = (make_tensor(shape, torch.float32, device, requires_grad=True) for _ in range(2))
    weight = make_tensor(shape[-1:], torch.float32, device, requires_grad=True)
    y = pyext.rms_norm_gated(x, gate, weight, backend=backend)
    grads = torch.autograd.grad(y.sum(), (x, gate, weight))
    assert y.shape == x.shape and [g.shape for g in grads] == [x.shape, x.shape, weight.shape]
    assert not grads[2].isnan().any() and not grads[2].any()  # a sum over no rows


@pytest.mark.parametrize("norm_before_gate", ORDERS)
def test_nan_stays_in_its_row(norm_before_gate):
    x, gate, weight = inputs(3, 33, torch.float32, device_for("triton"))
    x[1, 5] = float("nan")
    y = pyext.rms_norm_gated(x, gate, weight, norm_before_gate=norm_before_gate, backend="triton")
    assert y[1].isnan().all() and not y[[0, 2]].isnan().any()


@pytest.mark.parametrize("norm_before_gate", ORDERS)
@pytest.mark.parametrize("hidden,group_size", [(37, None), (1025, None), (128, 16), (8193, None), (9000, 3000),
                                               (16386, 8193)],
                         ids=str)
def test_triton_kernels_write_every_element(norm_before_gate, hidden, group_size):
    from pyext.triton_kernels import rms_norm_gated as kernels
    x, gate, weight = inputs(7, hidden, torch.bfloat16, device_for("triton"))
    dy = torch.randn_like(x)
    options = ("silu", not norm_before_gate)
    clean = kernels.rms_norm_gated_fwd(x, gate, weight, 1e-6, *options, group_size)
    out = kernels.rms_norm_gated_fwd(x, gate, weight, 1e-6, *options, group_size,
                                     out=tuple(poisoned_like(t) for t in clean))
    grads = kernels.rms_norm_gated_bwd(dy, x, gate, clean[1], weight, *options, True, group_size)
    out += kernels.rms_norm_gated_bwd(dy, x, gate, clean[1], weight, *options, True, group_size,
                                      out=tuple(poisoned_like(t) for t in grads))
    for got, want in zip(out, clean + grads):
        assert not got.isnan().any()
        assert torch.equal(got, want)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("norm_before_gate", ORDERS)
@pytest.mark.parametrize("hidden,group_size", [(7, None), (8, 4)], ids=str)
def test_gradcheck_float64(activation, norm_before_gate, hidden, group_size):
    x, gate, weight = (make_tensor(s, torch.float64, device_for("triton"), requires_grad=True)
                       for s in ((5, hidden), (5, hidden), (hidden,)))
    assert torch.autograd.gradcheck(
        lambda *t: pyext.rms_norm_gated(*t, activation=activation, norm_before_gate=norm_before_gate,
                                        group_size=group_size, backend="triton"), (x, gate, weight))


def test_double_backward_is_torchs_under_auto_and_named_by_the_kernels():
    x, gate, weight = (make_tensor(s, torch.float64, device_for("triton"), requires_grad=True)
                       for s in ((3, 5), (3, 5), (5,)))
    with pyext.use_backend("auto"):
        assert torch.autograd.gradgradcheck(lambda *t: pyext.rms_norm_gated(*t), (x, gate, weight))
    y = pyext.rms_norm_gated(x, gate, weight, backend="triton")
    with pytest.raises(pyext.BackendUnavailable, match="create_graph=True"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("group_size", [None, 3])
def test_opcheck(affine, dtype, group_size):
    """The ops' registrations (schema, fake, autograd); rstd in float32,
    of x's leading shape, with the groups last where there are groups."""
    device = device_for("triton")
    x, gate = (make_tensor((3, 5, 12), dtype, device, requires_grad=True) for _ in range(2))
    weight = make_tensor((12,), torch.float32, device, requires_grad=True) if affine else None
    fwd, bwd = torch.ops.pyext.rms_norm_gated_fwd_triton, torch.ops.pyext.rms_norm_gated_bwd_triton
    torch.library.opcheck(fwd, (x, gate, weight, 1e-6, "silu", True, group_size))
    _, rstd = fwd(x.detach(), gate.detach(), weight, 1e-6, "silu", True, group_size)
    assert rstd.dtype == torch.float32 and rstd.shape == ((3, 5) if group_size is None else (3, 5, 4))
    grad = torch.randn(3, 5, 12, device=device).to(dtype)
    plain = weight.detach() if affine else None
    torch.library.opcheck(bwd, (grad, x.detach(), gate.detach(), rstd, plain, "sigmoid", False, affine, group_size))


@pytest.mark.parametrize("compiler", COMPILERS)
def test_compile_fullgraph(compiler):
    device = device_for("triton")
    x, gate = (make_tensor((4, 33), torch.float32, device, requires_grad=True) for _ in range(2))
    weight = make_tensor((33,), torch.float32, device, requires_grad=True)

    def f(x, gate, weight):
        return (pyext.rms_norm_gated(x * 2, gate, weight, backend="triton") ** 2).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=compiler)
    for got, want in zip(torch.autograd.grad(compiled(x, gate, weight), (x, gate, weight)),
                         torch.autograd.grad(f(x, gate, weight), (x, gate, weight))):
        torch.testing.assert_close(got, want)


BAD = {  # case: (exception, what the message names)
    "gate_shape": (RuntimeError, "gate must have x's shape"),
    "integer_gate": (NotImplementedError, "gate must be a floating-point"),
    "weight_shape": (RuntimeError, "weight must have shape"),
    "weight_device": (RuntimeError, "weight is on meta"),
    "integer_input": (NotImplementedError, "x must be a floating-point"),
    "activation": (ValueError, "activation must be one of"),
    "group_size": (ValueError, "group_size must be a positive divisor"),
    "scalar": (RuntimeError, "x must have at least one dimension"),
    "list_weight": (TypeError, "weight must be a Tensor, got list"),
    "string_eps": (TypeError, "eps must be a float, got str"),
}


@pytest.mark.parametrize("backend", ["auto", "torch", "triton", "cuda"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_naming_the_argument(backend, case):
    """Raised before any backend is chosen, whichever was asked for."""
    x, gate, weight, kwargs = torch.randn(2, 6), torch.randn(2, 6), torch.randn(6), {}
    if case == "gate_shape":
        gate = gate[:, :5]
    elif case == "integer_gate":
        gate = gate.long()
    elif case == "weight_shape":
        weight = weight[:5]
    elif case == "weight_device":
        weight = weight.to("meta")
    elif case == "integer_input":
        x, gate = x.long(), gate.long()
    elif case == "activation":
        kwargs["activation"] = "gelu"
    elif case == "group_size":
        kwargs["group_size"] = 4
    elif case == "list_weight":
        weight = weight.tolist()
    elif case == "scalar":
        x, gate, weight = x[0, 0], gate[0, 0], None
    elif case == "string_eps":
        kwargs["eps"] = "1e-5"
    error, message = BAD[case]
    with pytest.raises(error, match=message):
        pyext.rms_norm_gated(x, gate, weight, backend=backend, **kwargs)


@pytest.mark.parametrize("which", ["x", "gate"])
def test_a_dtype_the_kernels_lack_is_named_by_the_triton_backend(which):
    x, gate, weight = inputs(3, 8, torch.float32, device_for("triton"))
    x, gate = (t.to(torch.float8_e4m3fn) if name == which else t for name, t in (("x", x), ("gate", gate)))
    with pytest.raises(pyext.BackendUnavailable, match=f"{which} dtype torch.float8_e4m3fn is not supported"):
        pyext.rms_norm_gated(x, gate, weight, backend="triton")


def test_ops_called_directly_refuse_inconsistent_arguments(monkeypatch):
    """The ops validate too (they can be called without the public function):
    nothing reads or writes out of bounds."""
    x, gate, weight = inputs(3, 8, torch.float32, device_for("triton"))
    fwd, bwd = torch.ops.pyext.rms_norm_gated_fwd_triton, torch.ops.pyext.rms_norm_gated_bwd_triton
    y, rstd = fwd(x, gate, weight, 1e-5, "silu", True, None)
    with pytest.raises(RuntimeError, match="weight dtype"):  # rms_norm_gated would promote it; the kernels do not
        fwd(x.bfloat16(), gate.bfloat16(), weight.double(), 1e-5, "silu", True, None)
    with pytest.raises(RuntimeError, match="weight dtype"):
        bwd(y.bfloat16(), x.bfloat16(), gate.bfloat16(), rstd, weight.double(), "silu", True, True, None)
    with pytest.raises(RuntimeError, match="grad must match x"):
        bwd(y[:, :7], x, gate, rstd, weight, "silu", True, True, None)
    with pytest.raises(RuntimeError, match="rstd must be"):
        bwd(y, x, gate, rstd[:2], weight, "silu", True, True, None)
    with pytest.raises(RuntimeError, match="need_dweight"):
        bwd(y, x, gate, rstd, None, "silu", True, True, None)
    from pyext.ops import layer_norm
    monkeypatch.setattr(layer_norm, "MAX_GROUPS", 1)
    with pytest.raises(RuntimeError, match="2 groups a row"):
        fwd(x, gate, weight, 1e-5, "silu", True, 4)
