"""pyext.flash_attention and pyext.scaled_dot_product_attention: the
specification of the core op. Windows, caps and sinks: test_attention_extras.py;
dropout: test_attention_dropout.py; masks: test_attention_mask.py; packed
batches: test_attention_varlen.py; the Hopper Triton forward:
test_attention_descriptor.py. The shared checks: attention_checks.py."""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import pyext
from pyext import _backend, reference
from pyext.ops import attention_ops
from conftest import (COMPILERS, HAS_GPU, ShapesMade, assert_close, compute_sanitizer, device_for, make_tensor,
                      poison_cuda_allocator, run_under_sanitizer)
from attention_checks import (DTYPES, FLASH_BACKENDS, FLASH_KERNELS, KERNEL_BACKENDS, TRITON_AND_REFERENCE,
                              check_flash, check_softcap, qkv, sdpa)


# (batch, query heads, key heads, Sq, Sk, head dim): odd lengths one past a
# block, Sq != Sk both ways, GQA and MQA, head dims 40 and 80, Sq = 1.
SHAPES = [
    (1, 2, 2, 17, 17, 64),
    (2, 2, 1, 19, 33, 40),
    (1, 4, 2, 33, 20, 80),
    (1, 3, 3, 1, 23, 16),
    (1, 2, 2, 24, 9, 32),
]


@pytest.fixture(autouse=True)
def _cuda_kernels_built(request):
    """Cases of the cuda backend need the CUDA attention kernels (issue 5) in
    the built extension; where it has none they are skipped, saying so."""
    callspec = getattr(request.node, "callspec", None)
    if callspec and callspec.params.get("backend") == "cuda" and "cuda" not in attention_ops.FWD:
        pytest.skip("pyext._C has no CUDA attention kernels (issue 5)")


@pytest.mark.parametrize("backend,deterministic", FLASH_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_flash_attention_matches_oracle(backend, deterministic, dtype, causal, shape):
    check_flash(backend, *qkv(shape, dtype, device_for(backend)), causal, deterministic)


@pytest.mark.parametrize("backend,deterministic", FLASH_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale", [0.37, 2.0])
def test_custom_scale(backend, deterministic, causal, scale):
    check_flash(backend, *qkv((2, 2, 1, 19, 33, 40), torch.bfloat16, device_for(backend)), causal, deterministic,
                scale)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_a_scale_twice_the_default_gives_the_backward_out_lo(backend):
    """A scale of 2/sqrt(D) or more spreads the logits: rows of P nearly one-hot,
    where the backward's D = rowsum(dO * O) from the rounded output costs
    dq and dk the rule, as a mask's bias does. There the forward op also
    returns out_lo (what rounding the output left out; empty below), and the
    backward reads it. The case and seed were past the rule before (dk 1.04x
    the bound; benchmarks/NOTES.md, "a tail of test_custom_scale")."""
    q, k, v = qkv((2, 2, 1, 19, 33, 40), torch.bfloat16, device_for(backend))
    forward = attention_ops.FWD[backend]
    for scale, stored in ((None, False), (0.3, False), (0.32, True), (4.0, True)):  # 1.9x, 2.02x
        out, _, out_lo = forward(q, k, v, scale or 40 ** -0.5, False, 14)
        assert out_lo.shape == (out.shape if stored else (0,)), scale
        fake = torch._subclasses.FakeTensorMode()
        with fake:
            fake_out_lo = forward(*map(fake.from_tensor, (q, k, v)), scale or 40 ** -0.5, False, 14)[2]
        assert fake_out_lo.shape == out_lo.shape, scale
    torch.manual_seed(88)
    check_flash(backend, *qkv((2, 2, 1, 19, 33, 40), torch.bfloat16, device_for(backend)), False, False, 4.0)


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
@pytest.mark.parametrize("shape", [(0, 2, 2, 5, 7, 16), (0, 4, 2, 5, 7, 16), (1, 0, 0, 5, 7, 16), (1, 2, 1, 0, 7, 16),
                                   (1, 2, 1, 5, 0, 16)], ids=str)
def test_empty_inputs_give_torchs_empty_or_zero_results(backend, shape):
    """No batch, no heads, no queries or no keys: torch's SDPA gives an empty
    output, or zeros where no key is seen, and zero gradients; so do we."""
    q, k, v = qkv(shape, torch.bfloat16, device_for("triton"))
    for causal in (False, True):
        out = pyext.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True, backend=backend)
        theirs = None
        if shape[1] > 0 or torch.__version__ >= "2.14":  # torch 2.11's SDPA dies of SIGFPE on no heads
            theirs = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        if theirs is None:  # and gives an empty batch None on CUDA
            theirs = torch.empty(q.shape, dtype=q.dtype)
        assert out.shape == theirs.shape and torch.equal(out, torch.zeros_like(out))
        grads = torch.autograd.grad(out.float().sum(), (q, k, v), allow_unused=True)
        assert all(g is None or not g.any() for g in grads)
        out = pyext.flash_attention(q, k, v, causal=causal, backend=backend)
        assert out.shape == q.shape and not out.any()


@pytest.mark.parametrize("mask_dtype,causal", [(torch.bool, True), (torch.int64, False), (torch.float64, False),
                                               (torch.float16, False)], ids=str)
def test_an_empty_batch_raises_the_argument_errors_of_torchs_sdpa(mask_dtype, causal):
    """Under "torch" and "auto" an empty batch gets its empty result without
    torch's SDPA (which has none there): the arguments it refuses for a full
    batch (a mask with is_causal, a mask of another dtype than bool, float32
    or the query's) are refused alike."""
    q = make_tensor((1, 2, 4, 8), torch.bfloat16, "cpu")
    mask = torch.zeros(4, 4, dtype=mask_dtype)
    try:
        F.scaled_dot_product_attention(q, q, q, attn_mask=mask, is_causal=causal)
    except RuntimeError as e:
        assert "attn_mask" in str(e)
    else:  # torch 2.11's CPU SDPA (its flash kernel) takes a mask with is_causal=True; later releases refuse it
        assert causal, f"torch {torch.__version__}'s SDPA took an attn_mask of {mask_dtype}"
    for backend in ("torch", "auto"):
        with pytest.raises(RuntimeError, match="attn_mask"):
            pyext.scaled_dot_product_attention(q[:0], q[:0], q[:0], attn_mask=mask, is_causal=causal, backend=backend)


# (as SHAPES, then the value head dim, below the query/key head dim), with
# GQA and MQA; DeepSeek's MLA (192, 128), as (B, S, H, D) views.
VALUE_HEAD_DIM_SHAPES = [
    ((2, 2, 1, 19, 33, 40, 24), "contiguous"),
    ((1, 4, 2, 17, 12, 64, 32), "contiguous"),
    ((1, 2, 2, 21, 18, 192, 128), "bshd"),
]


@pytest.mark.parametrize("backend,deterministic", TRITON_AND_REFERENCE)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape,layout", VALUE_HEAD_DIM_SHAPES, ids=str)
def test_value_head_dim_may_differ_from_the_query_head_dim(backend, deterministic, causal, shape, layout):
    """As in torch's SDPA, v's head dim is its own (out has it): the Triton
    kernels take any below the query/key head dim."""
    check_flash(backend, *qkv(shape, torch.bfloat16, device_for(backend), layout), causal, deterministic)


def test_a_value_head_dim_above_the_query_head_dim_goes_to_torch_under_auto_and_is_named_otherwise():
    """The kernels' dq and dk lose too much there (benchmarks/NOTES.md, "Value head dim")."""
    q, k, v = (t.detach() for t in qkv((1, 2, 2, 9, 11, 16, 24), torch.bfloat16, device_for("triton")))
    assert torch.equal(pyext.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    with pytest.raises(pyext.BackendUnavailable, match="value head dim 24"):
        pyext.scaled_dot_product_attention(q, k, v, backend="triton")


@pytest.mark.gpu
def test_cuda_kernels_name_a_value_head_dim_they_do_not_take():
    q, k, v = qkv((1, 2, 2, 16, 16, 64, 32), torch.bfloat16, "cuda")
    with pytest.raises(pyext.BackendUnavailable, match="value head dim 32"):
        pyext.flash_attention(q, k, v, backend="cuda")


# Head dims that are not a multiple of 8 (torch's SDPA takes them, and so
# do the Triton kernels; the CUDA ones' 16-byte loads need multiples of 8):
# 1, 4 (below one 16-wide block), 59 and 100 with a value head dim of 36,
# as (B, S, H, D) views too; GQA, Sq != Sk both ways, Sq = 1.
UNALIGNED_HEAD_DIM_SHAPES = [
    ((1, 2, 2, 17, 23, 59), "contiguous"),
    ((2, 4, 2, 9, 30, 4), "bshd"),
    ((1, 2, 1, 19, 12, 100, 36), "contiguous"),
    ((1, 3, 1, 1, 7, 1), "contiguous"),
]


@pytest.mark.parametrize("backend,deterministic", TRITON_AND_REFERENCE)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape,layout", UNALIGNED_HEAD_DIM_SHAPES, ids=str)
def test_head_dims_not_a_multiple_of_8_run_the_triton_kernels(backend, deterministic, causal, shape, layout):
    check_flash(backend, *qkv(shape, torch.bfloat16, device_for(backend), layout), causal, deterministic)


def test_a_head_dim_below_16_gives_the_backward_ds_in_two_parts():
    """Below 16 (the kernels' smallest head block) dK and dQ are sums of few
    large terms, and one rounding of dS to bf16 was enough to put dk past
    the rule: this case and seed were (1.03x the bound, one element of 480;
    benchmarks/NOTES.md, "A dk tail at head dim 4"). dS goes to the products
    as hi + lo there."""
    torch.manual_seed(1035036661)
    check_flash("triton", *qkv((2, 4, 2, 9, 30, 4), torch.bfloat16, device_for("triton"), "bshd"), False, False)


def test_sdpa_with_a_head_dim_not_a_multiple_of_8_goes_to_torch_under_auto(monkeypatch):
    """Until a GPU run measures the Triton kernels there (SDPA_UNALIGNED_HEAD_AUTO_ORDER);
    flash_attention, whose fallback is the S x S reference, runs them. ("auto"
    chooses here as on a GPU: CPU tensors would always go to torch.)"""
    chosen, select = [], _backend.select
    monkeypatch.setattr(_backend, "select", lambda op, backend, device, *rest: chosen.append(
        select(op, backend, torch.device("cuda"), *rest)) or chosen[-1])
    q, k, v = (t.detach() for t in qkv((1, 2, 2, 9, 11, 59), torch.bfloat16, device_for("triton")))
    assert torch.equal(pyext.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    pyext.flash_attention(q, k, v)
    pyext.scaled_dot_product_attention(q, k, v[..., :56])  # q's head dim alone not a multiple of 8
    assert chosen == ["torch", "triton", "torch"]


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_head_dim_0_gives_torchs_empty_result_or_names_the_kernels_limit(backend):
    """torch's SDPA gives (B, H, Sq, 0); its default scale is 1 / sqrt(0), inf."""
    q, k, v = qkv((1, 2, 2, 5, 7, 0), torch.bfloat16, device_for("triton"))
    if backend == "triton":
        for call in (pyext.scaled_dot_product_attention, pyext.flash_attention):
            with pytest.raises(pyext.BackendUnavailable, match="head dim 0"):
                call(q, k, v, backend=backend)
        return
    for call in (pyext.scaled_dot_product_attention, pyext.flash_attention):
        out = call(q, k, v, backend=backend)
        assert out.shape == (1, 2, 5, 0)
        assert all(g.shape == t.shape for g, t in zip(torch.autograd.grad(out.sum(), (q, k, v)), (q, k, v)))


@pytest.mark.gpu
def test_cuda_kernels_name_the_head_dims_they_do_not_take():
    q, k, v = qkv((1, 2, 2, 16, 16, 59), torch.bfloat16, "cuda")
    with pytest.raises(pyext.BackendUnavailable, match="multiples of 8"):
        pyext.flash_attention(q, k, v, backend="cuda")


@pytest.mark.parametrize("backend,deterministic", FLASH_KERNELS)
def test_transposed_bshd_views_need_no_copy_to_be_right(backend, deterministic):
    check_flash(backend, *qkv((2, 2, 1, 21, 18, 48), torch.bfloat16, device_for(backend), "bshd"), True,
                deterministic)


@pytest.mark.parametrize("layout", ["qkv_split", "bshd", "contiguous"])
def test_triton_output_keeps_the_query_memory_order_as_torch_flash_does(layout):
    """As with torch's flash SDPA, out of a query in (B, S, H, D) memory is in
    (B, S, H, D) memory too, so a model's out.transpose(1, 2).contiguous()
    copies nothing; its gradient, in that order, goes to the backward
    uncopied (check_flash's dout, randn_like(out), is in out's order), and
    dq, dk, dv come back in their inputs' order, so a model's reshape of them
    to (B, S, H D) is a view."""
    b, h, s, d = 2, 3, 10, 16
    if layout == "qkv_split":  # nanoGPT: one Linear's (B, S, 3 H D) output split and viewed per head
        qkv_out = make_tensor((b, s, 3 * h * d), torch.bfloat16, device_for("triton"))
        q, k, v = (t.view(b, s, h, d).transpose(1, 2).requires_grad_() for t in qkv_out.split(h * d, -1))
    else:
        q, k, v = qkv((b, h, h, s, s, d), torch.bfloat16, device_for("triton"), layout)
    out = pyext.scaled_dot_product_attention(q, k, v, is_causal=True, backend="triton")
    bshd = out.transpose(1, 2).is_contiguous()
    assert out.is_contiguous() != bshd and bshd == (layout != "contiguous")
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert all(g.transpose(1, 2).is_contiguous() == bshd for g in grads)


@pytest.mark.gpu
@pytest.mark.parametrize("backend,deterministic", FLASH_KERNELS)
def test_batch_times_heads_may_pass_65535(backend, deterministic):
    """The grids are (blocks, heads, batch) in both backends (the Stage 2
    forward's is one CTA an SM): 33,000 x 2 (query heads and key heads) passes
    a 2-D grid's y limit of 65535 and runs right."""
    check_flash(backend, *qkv((33000, 2, 2, 5, 7, 64), torch.bfloat16, "cuda"), True, deterministic)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", [(65536, 1, 1, 8), (1, 65536, 1, 8)], ids=["batch", "heads"])
def test_kernels_name_their_grid_limit(backend, shape):
    """The grids are (blocks, heads, batch) in both backends: a batch or
    head count past 65535 is refused before any launch, naming the limit."""
    q = torch.zeros(shape, dtype=torch.bfloat16, device=device_for(backend))
    with pytest.raises(pyext.BackendUnavailable, match="65535"):
        pyext.flash_attention(q, q, q, backend=backend)


@pytest.mark.parametrize("backend,deterministic", FLASH_KERNELS)
def test_rows_that_see_no_key_are_zero(backend, deterministic):
    q, k, v = qkv((1, 2, 2, 20, 6, 32), torch.bfloat16, device_for(backend))
    out, lse = pyext.flash_attention(q, k, v, causal=True, return_lse=True, deterministic=deterministic,
                                     backend=backend)
    blind = q.shape[2] - k.shape[2]  # bottom-right: the first Sq - Sk queries see nothing
    assert torch.equal(out[:, :, :blind], torch.zeros_like(out[:, :, :blind]))
    assert torch.isneginf(lse[:, :, :blind]).all() and torch.isfinite(lse[:, :, blind:]).all()
    (dq,) = torch.autograd.grad(out.sum(), (q,))
    assert torch.equal(dq[:, :, :blind], torch.zeros_like(dq[:, :, :blind]))


def _poisoned_with_a_tail(t):
    """(a NaN tensor shaped like t, the 64 elements of its buffer past it, set to 7)."""
    buffer = torch.full((t.numel() + 64,), float("nan"), dtype=t.dtype, device=t.device)
    buffer[t.numel():] = 7
    return buffer[:t.numel()].view(t.shape), buffer[t.numel():]


@pytest.mark.parametrize("scale", ["default", 0.5])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("head_dim", [40, 59])
def test_triton_kernels_write_every_element_and_nothing_past_them(deterministic, head_dim, scale):
    """Outputs poisoned with NaN, each at the head of a longer buffer: every
    element written, and the buffer past them untouched (a head dim below
    its block, 64: the padded columns of the last row stay unstored); at a
    scale over twice the default, out_lo too."""
    from pyext.triton_kernels import flash_attention as kernels
    scale = head_dim ** -0.5 if scale == "default" else scale
    q, k, v = (t.detach() for t in qkv((1, 4, 2, 19, 22, head_dim), torch.bfloat16, device_for("triton")))
    (out, out_tail), (lse, lse_tail), (out_lo, lo_tail) = (_poisoned_with_a_tail(t) for t in (q, q[..., 0].float(), q))
    out, lse, *stored = kernels.flash_attn_fwd(q, k, v, scale, True, 3, out=out, lse=lse, out_lo=out_lo)
    assert len(stored) == (scale == 0.5)
    assert not any(t.isnan().any() for t in (out, lse, *stored))
    (dq, dq_tail), (dk, dk_tail), (dv, dv_tail) = (_poisoned_with_a_tail(t) for t in (q, k, v))
    kernels.flash_attn_bwd(torch.randn_like(out), q, k, v, out, lse, scale, True, 3, deterministic, dq=dq, dk=dk, dv=dv,
                           out_lo=stored[0] if stored else None)
    assert not any(g.isnan().any() for g in (dq, dk, dv))
    assert all((tail == 7).all() for tail in (out_tail, lse_tail, lo_tail, dq_tail, dk_tail, dv_tail))


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("extra", ["window", "softcap", "dropout", "narrower value"])
def test_each_features_kernels_write_every_element_and_nothing_past_them(extra, deterministic):
    """As above, through the pointer kernels' feature paths: a window
    narrow enough that key blocks see no query row of some query blocks
    (their dk, dv must still be written, as zeros where no row sees them),
    a soft cap, dropout, and a value head dim below q's (DeepSeek's MLA);
    causal with Sq > Sk, so the first rows see no key (zeros); with a cap
    or dropout the forward stores out_lo too."""
    from pyext.triton_kernels import flash_attention as kernels
    dims = (40, 24) if extra == "narrower value" else (40,)
    q, k, v = (t.detach() for t in qkv((1, 4, 2, 37, 30, *dims), torch.bfloat16, device_for("triton")))
    options = {"window": dict(window=(3, 0)), "softcap": dict(softcap=5.0), "narrower value": {},
               "dropout": dict(dropout_p=0.3, seed=torch.tensor([5], device=q.device))}[extra]
    like_out = q[..., :dims[-1]]
    (out, out_tail), (lse, lse_tail), (out_lo, lo_tail) = (_poisoned_with_a_tail(t)
                                                           for t in (like_out, q[..., 0].float(), like_out))
    out, lse, *stored = kernels.flash_attn_fwd(q, k, v, 0.3, True, -7, out=out, lse=lse, out_lo=out_lo, **options)
    assert not any(t.isnan().any() for t in (out, lse, *stored))
    (dq, dq_tail), (dk, dk_tail), (dv, dv_tail) = (_poisoned_with_a_tail(t) for t in (q, k, v))
    kernels.flash_attn_bwd(torch.randn_like(out), q, k, v, out, lse, 0.3, True, -7, deterministic, dq=dq, dk=dk,
                           dv=dv, out_lo=stored[0] if stored else None, **options)
    assert not any(g.isnan().any() for g in (dq, dk, dv))
    assert not out[:, :, :7].any() and not dq[:, :, :7].any()  # the rows that see no key
    assert all((tail == 7).all() for tail in (out_tail, lse_tail, lo_tail, dq_tail, dk_tail, dv_tail))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda"])
def test_cuda_kernels_write_every_element(backend):
    q, k, v = (t.detach() for t in qkv((2, 4, 2, 77, 90, 72), torch.bfloat16, "cuda"))
    poison_cuda_allocator(8 * q.numel() * q.element_size())
    out, lse, out_lo = torch.ops.pyext.flash_attn_fwd_cuda(q, k, v, 0.3, True, 13)  # 2.5x the default: out_lo too
    poison_cuda_allocator(8 * q.numel() * q.element_size())
    grads = torch.ops.pyext.flash_attn_bwd_cuda(torch.randn_like(out), q, k, v, out, out_lo, lse, 0.3, True, 13, True)
    assert out_lo.shape == out.shape
    assert not any(t.isnan().any() for t in (out, lse, out_lo, *grads))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda"])
def test_cuda_backward_op_names_a_wrong_saved_tensor(backend):
    """The backward op called directly with out_lo, lse or dout of the wrong
    shape or dtype raises naming it, before any launch."""
    q, k, v = (t.detach() for t in qkv((1, 2, 1, 9, 12, 32), torch.bfloat16, "cuda"))
    out, lse, out_lo = torch.ops.pyext.flash_attn_fwd_cuda(q, k, v, 1.0, False, 0)  # 5.7x the default
    saved = {"dout": torch.randn_like(out), "out_lo": out_lo, "lse": lse}
    for name, bad, match in (("out_lo", out_lo[..., :16], "out_lo must have shape"),
                             ("out_lo", out_lo.float(), "out_lo must be"),
                             ("lse", lse[..., :4], "lse must have shape"),
                             ("dout", saved["dout"].half(), "dout must be")):
        given = {**saved, name: bad}
        with pytest.raises(RuntimeError, match=match):
            torch.ops.pyext.flash_attn_bwd_cuda(given["dout"], q, k, v, out, given["out_lo"], given["lse"], 1.0, False,
                                                0, True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda"])
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
@pytest.mark.skipif(compute_sanitizer() is None, reason="compute-sanitizer is not on PATH")
def test_cuda_kernels_under_sanitizer(backend, tool):
    # Ragged lengths, GQA, causal both ways, a (B, S, H, D) view, forward and
    # backward (both modes): memcheck over every head-dim instantiation,
    # racecheck (far slower) over the smallest and the largest tile shapes.
    dims = (8, 40, 64, 96, 128, 160, 200, 256) if tool == "memcheck" else (40, 256)
    code = ("import torch\n"
            "import pyext\n"  # loads pyext._C, which defines the ops
            "fwd, bwd = torch.ops.pyext.flash_attn_fwd_cuda, torch.ops.pyext.flash_attn_bwd_cuda\n"
            f"for d in {dims}:\n"
            # the middle case at 3x the default scale: the forward stores out_lo, the backward reads it
            "  for sq, sk, causal, off, scale in ((1, 70, True, 69, 0.1), (70, 33, True, 0, 3 / d ** 0.5),\n"
            "                                     (130, 65, False, 0, 0.1)):\n"
            "    q = torch.randn(1, sq, 4, d, device='cuda', dtype=torch.bfloat16).transpose(1, 2)\n"
            "    k, v = (torch.randn(1, 2, sk, d, device='cuda', dtype=torch.bfloat16) for _ in range(2))\n"
            "    out, lse, out_lo = fwd(q, k, v, scale, causal, off)\n"
            "    for deterministic in (True, False):\n"
            "      bwd(torch.randn_like(out), q, k, v, out, out_lo, lse, scale, causal, off, deterministic)\n"
            "torch.cuda.synchronize()\n")
    result = run_under_sanitizer(tool, code)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(1, 4, 1, 37, 29, 64), (2, 4, 2, 19, 40, 40)], ids=str)
def test_deterministic_backward_gives_the_same_bits_every_run(backend, causal, shape):
    q, k, v = qkv(shape, torch.bfloat16, device_for(backend))
    dout = torch.randn(q.shape, dtype=q.dtype, device=q.device)
    runs = 20 if HAS_GPU else 2
    first = None
    for _ in range(runs):
        out = pyext.flash_attention(q, k, v, causal=causal, deterministic=True, backend=backend)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        if first is None:
            first = grads
        assert all(torch.equal(a, b) for a, b in zip(first, grads))


@pytest.fixture
def deterministic_algorithms():
    """torch.use_deterministic_algorithms, its setting restored after the test."""
    previous = torch.are_deterministic_algorithms_enabled()
    yield torch.use_deterministic_algorithms
    torch.use_deterministic_algorithms(previous)


@pytest.fixture
def triton_backward_flags(monkeypatch):
    """The `deterministic` argument of every Triton backward launch, in order."""
    from pyext.triton_kernels import flash_attention as kernels
    launch, flags = kernels.flash_attn_bwd, []

    def spy(*args, **kwargs):
        flags.append(args[9])
        return launch(*args, **kwargs)
    monkeypatch.setattr(kernels, "flash_attn_bwd", spy)
    return flags


def _sdpa_causal(q, k, v):
    return pyext.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, backend="triton")


ATTENTION_CALLS = {
    "flash_attention": lambda q, k, v: pyext.flash_attention(q, k, v, causal=True, backend="triton"),
    "flash_attention(deterministic=True)": lambda q, k, v: pyext.flash_attention(
        q, k, v, causal=True, deterministic=True, backend="triton"),
    "flash_attention(deterministic=False)": lambda q, k, v: pyext.flash_attention(
        q, k, v, causal=True, deterministic=False, backend="triton"),
    "scaled_dot_product_attention": _sdpa_causal,
    "compiled scaled_dot_product_attention": torch.compile(_sdpa_causal, fullgraph=True, backend="aot_eager"),
    "the forward op": lambda q, k, v: torch.ops.pyext.flash_attn_fwd_triton(q, k, v, 0.25, True, 3)[0],
}


@pytest.mark.parametrize("call,use_deterministic_algorithms,expected", [
    ("flash_attention", False, False),
    ("flash_attention", True, True),
    ("flash_attention(deterministic=True)", False, True),
    ("flash_attention(deterministic=False)", True, False),
    ("scaled_dot_product_attention", False, False),
    ("scaled_dot_product_attention", True, True),
    ("compiled scaled_dot_product_attention", False, False),
    ("compiled scaled_dot_product_attention", True, True),
    ("the forward op", False, True),
])
def test_the_backward_is_deterministic_when_asked(call, use_deterministic_algorithms, expected,
                                                  deterministic_algorithms, triton_backward_flags):
    # flash_attention's `deterministic` when given; otherwise, and always for
    # the SDPA drop-in, torch.use_deterministic_algorithms, as torch's ops do.
    q, k, v = qkv((1, 2, 1, 9, 12, 16), torch.bfloat16, device_for("triton"))
    deterministic_algorithms(use_deterministic_algorithms)
    out = ATTENTION_CALLS[call](q, k, v)
    torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert triton_backward_flags == [expected]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("scale", [None, 0.2])
@pytest.mark.parametrize("shape", [(1, 2, 2, 13, 21, 32), (2, 4, 2, 21, 13, 64), (1, 2, 1, 1, 9, 16)], ids=str)
def test_sdpa_drop_in_matches_torch(backend, dtype, is_causal, scale, shape):
    """out, dq, dk, dv against torch's SDPA in float64, with torch's own in
    `dtype` as the yardstick: top-left causal with Sq != Sk both ways, GQA, Sq = 1."""
    q, k, v = qkv(shape, dtype, device_for(backend))
    kwargs = dict(is_causal=is_causal, scale=scale, enable_gqa=shape[1] != shape[2])
    out = pyext.scaled_dot_product_attention(q, k, v, **kwargs, backend=backend)
    dout = torch.randn_like(out)

    def torch_sdpa(dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        o = F.scaled_dot_product_attention(*leaves, **kwargs)
        return [o] + list(torch.autograd.grad(o, leaves, dout.to(dtype)))

    ours = [out] + list(torch.autograd.grad(out, (q, k, v), dout))
    for name, o, r, p in zip(["out", "dq", "dk", "dv"], ours, torch_sdpa(torch.float64), torch_sdpa(dtype)):
        assert_close(o, r, p, name)


@pytest.mark.parametrize("case", ["dropout_1", "float32", "head_dim_320", "broadcast_batch"])
def test_sdpa_falls_back_to_torch_under_auto_and_names_the_reason_otherwise(case):
    """Both on torch's math backend, which takes every case (on a GPU its flash
    kernel refuses dropout_p=1). (Masks the kernels do not take:
    tests/test_attention_mask.py.)"""
    device = device_for("triton")
    dtype = torch.float32 if case == "float32" else torch.bfloat16
    d = 320 if case == "head_dim_320" else 16
    q_batch = 2 if case == "broadcast_batch" else 1
    q, k, v = (make_tensor((b, 2, 7, d), dtype, device) for b in (q_batch, 1, 1))
    kwargs = {"dropout_1": dict(dropout_p=1.0)}.get(case, {})
    with sdpa_kernel(SDPBackend.MATH):
        torch.manual_seed(7)
        got = pyext.scaled_dot_product_attention(q, k, v, **kwargs, backend="auto")
        torch.manual_seed(7)
        assert torch.equal(got, F.scaled_dot_product_attention(q, k, v, **kwargs))
    reason = {"dropout_1": r"not in \(0, 1\)", "float32": "float32", "head_dim_320": "head dim",
              "broadcast_batch": "batch"}[case]
    with pytest.raises(pyext.BackendUnavailable, match=reason):
        pyext.scaled_dot_product_attention(q, k, v, **kwargs, backend="triton")


@pytest.mark.parametrize("backend", ["auto", "torch"] + KERNEL_BACKENDS)
@pytest.mark.parametrize("fn", ["sdpa", "flash_attention"])
def test_autocast_casts_inputs_as_torchs_sdpa_does(backend, fn):
    """Inside torch.autocast, float32 (and mixed) q, k, v are cast to the
    region's dtype as torch's SDPA casts them: the call gives torch's dtype,
    the same bits as a call with the cast inputs, so a named kernel backend
    runs rather than refusing float32, and gradients in the inputs' dtypes."""
    device = device_for("cuda" if backend == "cuda" else "triton")
    q, k = (make_tensor((1, 2, 19, 16), torch.float32, device, requires_grad=True) for _ in range(2))
    v = make_tensor((1, 2, 19, 16), torch.bfloat16, device, requires_grad=True)
    call = (pyext.scaled_dot_product_attention if fn == "sdpa" else pyext.flash_attention)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = call(q, k, v, backend=backend)
        theirs = F.scaled_dot_product_attention(q, k, v)
    assert out.dtype == theirs.dtype == torch.bfloat16
    cast = [t.detach().bfloat16() for t in (q, k, v)]
    assert torch.equal(out, call(*cast, backend=backend))
    dq, dk, dv = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert (dq.dtype, dk.dtype, dv.dtype) == (torch.float32, torch.float32, torch.bfloat16)


def test_flash_attention_float32_goes_to_the_reference_under_auto():
    q, k, v = (make_tensor((1, 2, 5, 8), torch.float32, "cpu") for _ in range(3))
    out = pyext.flash_attention(q, k, v, causal=True)
    torch.testing.assert_close(out, reference.attention(q, k, v, causal=True, causal_offset=0)[0])


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_flash_attention_on_the_meta_device_gives_the_shapes_torch_gives(backend, softcap):
    """A model built on the meta device (its shapes traced, no memory taken)
    runs pyext's reference as torch runs its SDPA: the meta device has no
    autocast for the reference to turn off (a patched Gemma 2, whose soft
    cap goes to pyext, raised "unsupported scalarType")."""
    q = torch.empty(1, 2, 5, 8, dtype=torch.bfloat16, device="meta")
    out = pyext.flash_attention(q, q, q, causal=True, softcap=softcap, backend=backend)
    assert out.is_meta and out.shape == F.scaled_dot_product_attention(q, q, q, is_causal=True).shape


@pytest.mark.parametrize("bad,error", [
    ("dtype", "same dtype"), ("device", "same device"), ("rank", "rank at least 2"), ("head_dim", "head dim"),
    ("heads", "heads"), ("batch", "broadcast"), ("length", "length"),
])
def test_bad_inputs_raise_torchs_error_type_with_a_clear_message(bad, error):
    q, k, v = (make_tensor((1, 4, 6, 16), torch.bfloat16, "cpu") for _ in range(3))
    if bad == "dtype":
        k = k.half()
    elif bad == "device":
        k = torch.empty(k.shape, dtype=k.dtype, device="meta")
    elif bad == "rank":
        q, k, v = q[0, 0, 0], k[0, 0, 0], v[0, 0, 0]
    elif bad == "head_dim":
        k = make_tensor((1, 4, 6, 8), torch.bfloat16, "cpu")
    elif bad == "heads":
        k = v = make_tensor((1, 3, 6, 16), torch.bfloat16, "cpu")
    elif bad == "batch":
        q = make_tensor((2, 4, 6, 16), torch.bfloat16, "cpu")
        k = v = make_tensor((3, 4, 6, 16), torch.bfloat16, "cpu")
    else:
        v = make_tensor((1, 4, 5, 16), torch.bfloat16, "cpu")
    if bad != "length":  # torch's CPU SDPA computes something for key length 6, value length 5
        with pytest.raises(Exception) as theirs:
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    expected = RuntimeError if bad == "length" else type(theirs.value)
    with pytest.raises(expected, match=error):
        pyext.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    with pytest.raises(RuntimeError, match=error):
        pyext.flash_attention(q, k, v)


def test_flash_attentions_layout_mistaken_for_ours_is_named_where_the_heads_do_not_fit():
    """FlashAttention's (B, S, H, D) tensors read as (B, H, S, D) take S as
    heads; where the query's no longer divide the keys', the error says
    which layout pyext takes."""
    q, kv = make_tensor((1, 6, 4, 16), torch.bfloat16, "cpu"), make_tensor((1, 4, 4, 16), torch.bfloat16, "cpu")
    for call in (pyext.flash_attention, functools.partial(pyext.scaled_dot_product_attention, enable_gqa=True)):
        with pytest.raises(RuntimeError, match=r"the layout is \(B, H, S, D\).*transpose\(1, 2\)"):
            call(q, kv, kv)


@pytest.mark.parametrize("bad,error,match", [
    ("nested", RuntimeError, "nested"), ("three_dims", RuntimeError, "4-D"),
    ("broadcast_batch", RuntimeError, "batch sizes"), ("key_value_heads", RuntimeError, "key/value heads"),
    ("dropout_1", ValueError, "dropout_p"), ("key_a_list", TypeError, "key must be a Tensor"),
    ("integers", RuntimeError, "floating-point"), ("sinks_elsewhere", RuntimeError, "sinks"),
])
def test_flash_attention_refuses_what_it_does_not_define(bad, error, match):
    """flash_attention takes (B, H, S, D) tensors of one batch size, key and
    value heads alike and dividing the query heads: what SDPA would broadcast
    or take as another rank is an error here, as are a dropout_p outside
    [0, 1), inputs that are not floating-point tensors and sinks elsewhere,
    each raised before any backend is chosen and naming what is wrong."""
    q, k, v = (make_tensor((1, 2, 6, 16), torch.bfloat16, "cpu") for _ in range(3))
    kwargs = {}
    if bad == "nested":
        q = torch.nested.nested_tensor([q[0], q[0, :, :5]], layout=torch.jagged)
    elif bad == "three_dims":
        q, k, v = q[0], k[0], v[0]
    elif bad == "broadcast_batch":
        q = make_tensor((2, 2, 6, 16), torch.bfloat16, "cpu")
    elif bad == "key_value_heads":
        k = k[:, :1]
    elif bad == "dropout_1":
        kwargs["dropout_p"] = 1.0
    elif bad == "key_a_list":
        k = k.tolist()
    elif bad == "integers":
        q, k, v = (torch.ones(1, 2, 6, 16, dtype=torch.int64) for _ in range(3))
    else:
        kwargs["sinks"] = torch.zeros(2, device="meta")
    with pytest.raises(error, match=match):
        pyext.flash_attention(q, k, v, **kwargs)


# (query, key, value shapes): leading dims that broadcast, as torch's SDPA allows
BROADCAST = [((1, 4, 6, 16), (4, 6, 16), (4, 6, 16)), ((2, 4, 6, 16), (1, 4, 6, 16), (1, 4, 6, 16)),
             ((1, 4, 6, 16), (1, 1, 6, 16), (1, 1, 6, 16)), ((2, 3, 2, 5, 16), (2, 3, 2, 7, 16), (2, 3, 2, 7, 16)),
             ((3, 5, 16), (3, 7, 16), (3, 7, 16)), ((3, 5, 16), (1, 7, 16), (1, 7, 16)),
             ((2, 3, 2, 5, 16), (1, 3, 2, 7, 16), (1, 3, 2, 7, 16)), ((5, 16), (7, 16), (7, 16)),
             ((1, 2, 6, 16), (1, 1, 6, 16), (1, 2, 6, 16))]


def _sdpa_on_bhsd_views(q, k, v):
    """torch's SDPA of q, k, v whose leading dims agree, run on their
    (B, H, S, D) views: the yardstick of the rule is torch's fused kernel
    (attention_checks.sdpa), which takes 4-D inputs only. At ranks 2 and 5
    torch runs its math backend, fp32 inside, whose gradients carry one
    final rounding where a fused kernel's carry dS's rounding too (NOTES,
    "The yardstick of the broadcast test")."""
    def bhsd(t):
        return t.reshape(-1, *t.shape[-3:]) if t.dim() >= 3 else t.reshape(1, 1, *t.shape)
    return sdpa(bhsd(q), bhsd(k), bhsd(v), enable_gqa=True).reshape(*q.shape[:-1], v.shape[-1])


@pytest.mark.parametrize("shapes", BROADCAST, ids=str)
def test_sdpa_broadcasts_leading_dims_like_torch(shapes):
    """Broadcast batch and head dims are torch's SDPA semantics: "auto" gives
    its result; a kernel backend runs the cases it covers (one key/value head
    broadcast is MQA; ranks 2, 3 and 5 whose leading dims agree) and names
    why not for the others."""
    device = device_for("triton")
    q, k, v = (make_tensor(s, torch.bfloat16, device) for s in shapes)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    pt = F.scaled_dot_product_attention(q, k, v)
    assert_close(pyext.scaled_dot_product_attention(q, k, v), ref, pt, "sdpa out")
    kernel_runs = len(shapes[0]) == len(shapes[1]) and shapes[0][:-3] == shapes[1][:-3] and \
        shapes[1][:-2] == shapes[2][:-2]
    if kernel_runs:
        dout = make_tensor(pt.shape, torch.bfloat16, device)

        def out_and_grads(attention, dtype):
            leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
            out = attention(*leaves)
            return [out] + list(torch.autograd.grad(out, leaves, dout.to(dtype)))
        ours = out_and_grads(lambda *t: pyext.scaled_dot_product_attention(*t, backend="triton"), q.dtype)
        refs = out_and_grads(F.scaled_dot_product_attention, torch.float64)
        pts = out_and_grads(_sdpa_on_bhsd_views, q.dtype)
        for name, o, r, p in zip(("triton out", "dq", "dk", "dv"), ours, refs, pts):
            assert_close(o, r, p, name)
    else:
        with pytest.raises(pyext.BackendUnavailable, match="leading dims|batch|as many key as value heads"):
            pyext.scaled_dot_product_attention(q, k, v, backend="triton")


def test_sdpa_without_enable_gqa_refuses_fewer_key_heads_like_torch():
    q = make_tensor((1, 4, 6, 16), torch.bfloat16, "cpu")
    k = v = make_tensor((1, 2, 6, 16), torch.bfloat16, "cpu")
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v)
    with pytest.raises(RuntimeError, match="enable_gqa"):
        pyext.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("kind", ["plain", "learned mask", "soft cap", "dropout", "packed"])
def test_the_backward_makes_no_zero_gradients_for_the_statistics(backend, kind):
    """lse (or the masked path's row stats) and out_lo are returned but not
    differentiable: autograd passes their gradients as None rather than
    making an out-sized tensor of zeros each backward (it did: 268 MB a
    layer at B 8, H 32, S 4096, D 128 for the masked, dropout, capped and
    sinks calls)."""
    if backend == "cuda" and kind != "plain":
        pytest.skip("the CUDA kernels take plain calls only (the other kinds are the Triton ones)")
    device = device_for(backend)
    q, k, v = qkv((2, 2, 2, 16, 16, 16), torch.bfloat16, device)
    if kind == "packed":
        offsets = torch.tensor([0, 5, 32], dtype=torch.int32, device=device)
        q, k, v = (t.detach().transpose(1, 2).reshape(32, 2, 16).requires_grad_() for t in (q, k, v))
        out = pyext.flash_attention_varlen(q, k, v, offsets, offsets, 27, 27, backend=backend)
    elif kind == "learned mask":
        bias = torch.randn(1, 2, 16, 16, device=device, requires_grad=True)
        out = pyext.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), backend=backend)
    else:
        out = pyext.flash_attention(q, k, v, softcap=30.0 if kind == "soft cap" else 0.0,
                                    dropout_p=0.1 if kind == "dropout" else 0.0, backend=backend)
    zeros = ShapesMade(torch.ops.aten.zeros, torch.ops.aten.zeros_like, torch.ops.aten.new_zeros)
    with zeros:
        out.backward(torch.randn_like(out))
    assert zeros.shapes == []


@pytest.mark.parametrize("extra", ["plain", "window, cap and sinks", "mask and dropout"])
def test_gradcheck_of_the_reference_in_float64(extra):
    """Finite differences against the reference's gradients (backend "torch",
    which takes float64), GQA and Sq > Sk under causality (rows that see no
    key); the sinks' and a learned mask's gradients too. With dropout the
    mask is drawn once (the kernels' draw, as their backward replays it)."""
    q, k, v = (torch.randn(*shape, dtype=torch.float64, requires_grad=True)
               for shape in ((1, 4, 5, 8), (1, 2, 3, 8), (1, 2, 3, 8)))
    if extra == "mask and dropout":
        mask = torch.randn(1, 1, 5, 3, dtype=torch.float64, requires_grad=True)
        keep = torch.rand(1, 4, 5, 3, generator=torch.Generator().manual_seed(0)) > 0.3
        assert torch.autograd.gradcheck(lambda q, k, v, m: reference.attention(
            q, k, v, scale=0.4, mask=m, dropout_p=0.3, keep=keep)[0], (q, k, v, mask))
        return
    extras = [] if extra == "plain" else [torch.randn(4, dtype=torch.float64, requires_grad=True)]  # sinks
    options = {} if extra == "plain" else dict(window_size=(1, 0), softcap=3.0)

    def f(q, k, v, *sinks):
        return pyext.flash_attention(q, k, v, causal=True, sinks=(sinks or [None])[0], backend="torch", **options)
    assert torch.autograd.gradcheck(f, (q, k, v, *extras))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "bshd"])
def test_opcheck(backend, layout):
    # (B, S, H, D) views: the fake implementation must give out the strides the kernel gives it
    q, k, v = qkv((1, 2, 1, 9, 12, 16), torch.bfloat16, device_for(backend), layout)
    fwd = getattr(torch.ops.pyext, f"flash_attn_fwd_{backend}")
    bwd = getattr(torch.ops.pyext, f"flash_attn_bwd_{backend}")
    for scale in (0.25, 0.5):  # 0.5 is twice the default at d 16: out_lo stored
        torch.library.opcheck(fwd, (q, k, v, scale, True, 3))
        out, lse, out_lo = fwd(q.detach(), k.detach(), v.detach(), scale, True, 3)
        for deterministic in (False, True):
            torch.library.opcheck(bwd, (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, out_lo, lse,
                                        scale, True, 3, deterministic))


@pytest.mark.parametrize("scale", [0.25, 0.75])  # 0.75: 4.2x the default, out_lo stored (the value head dim's)
@pytest.mark.parametrize("layout", ["contiguous", "bshd"])
def test_opcheck_with_a_value_head_dim_of_its_own(layout, scale):
    q, k, v = qkv((1, 2, 1, 9, 12, 32, 16), torch.bfloat16, device_for("triton"), layout)
    torch.library.opcheck(torch.ops.pyext.flash_attn_fwd_triton, (q, k, v, scale, True, 3))
    out, lse, out_lo = torch.ops.pyext.flash_attn_fwd_triton(q.detach(), k.detach(), v.detach(), scale, True, 3)
    assert out.shape == (1, 2, 9, 16) and out.transpose(1, 2).is_contiguous() == (layout == "bshd")
    assert out_lo.shape == (out.shape if scale == 0.75 else (0,))
    torch.library.opcheck(torch.ops.pyext.flash_attn_bwd_triton,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, out_lo, lse, scale, True, 3,
                           True))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("use_deterministic_algorithms", [False, True])
@pytest.mark.parametrize("compiler", COMPILERS)
def test_compile_fullgraph(backend, use_deterministic_algorithms, compiler, deterministic_algorithms):
    # Deterministic: the compiled gradients are eager's, bit for bit. Atomic
    # dQ: no two runs need agree to the bit, so each meets the oracle.
    q, k, v = qkv((1, 2, 2, 9, 9, 16), torch.bfloat16, device_for(backend))
    deterministic_algorithms(use_deterministic_algorithms)

    def f(q, k, v, backend=backend):
        return pyext.scaled_dot_product_attention(q * 2, k, v, is_causal=True, backend=backend).float().sum()

    def grads(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        return torch.autograd.grad(fn(*leaves), leaves)

    torch._dynamo.reset()
    compiled = grads(torch.compile(f, fullgraph=True, backend=compiler), q.dtype)
    eager = grads(f, q.dtype)
    deterministic_algorithms(False)  # for the references' matmuls: cuBLAS refuses them otherwise
    if use_deterministic_algorithms:
        assert all(torch.equal(g, e) for g, e in zip(compiled, eager))
    ref64, pt = (grads(lambda *t: f(*t, backend="torch"), dtype) for dtype in (torch.float64, q.dtype))
    for name, g, r, p in zip(("dq", "dk", "dv"), compiled, ref64, pt):
        assert_close(g, r, p, name)


def test_compile_fullgraph_with_a_cap_a_scale_gqa_and_a_narrower_value(deterministic_algorithms):
    """The extras op compiled: a soft cap, a custom scale, 4 query heads on 2
    key heads and a value head dim of 8 under q's 16; the compiled gradients
    eager's bit for bit (deterministic backward), and eager's within the
    rule on these inputs (check_softcap: Gemma 2's eager attention the
    yardstick; the reference run in bf16 computes in float32, one rounding,
    which put dv past twice its error in 1 of 150 seeds)."""
    q, k, v = qkv((1, 4, 2, 9, 11, 16, 8), torch.bfloat16, device_for("triton"))

    def f(q, k, v):
        return pyext.flash_attention(q, k, v, causal=True, scale=0.3, softcap=5.0, deterministic=True,
                                     backend="triton").float().square().sum()

    def grads(fn):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        return torch.autograd.grad(fn(*leaves), leaves)
    deterministic_algorithms(True)
    torch._dynamo.reset()
    compiled = grads(torch.compile(f, fullgraph=True, backend="aot_eager"))
    assert all(torch.equal(c, e) for c, e in zip(compiled, grads(f)))
    check_softcap("triton", True, None, True, (-1, -1), 5.0, 0.3, inputs=(q, k, v))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("op", ["flash_attention", "scaled_dot_product_attention"])
def test_compile_fullgraph_self_attention_on_one_tensor(backend, op, deterministic_algorithms):
    """q, k and v one tensor (attention(x, x, x)) compile with no graph
    break (an autograd.Function given one tensor twice does not trace), and
    the compiled gradient of x is eager's, bit for bit (deterministic)."""
    x = make_tensor((1, 2, 9, 16), torch.bfloat16, device_for(backend))
    causal = {"causal": True} if op == "flash_attention" else {"is_causal": True}

    def f(x):
        return getattr(pyext, op)(x, x, x, **causal, backend=backend).float().square().sum()

    def grad(fn):
        leaf = x.detach().requires_grad_()
        return torch.autograd.grad(fn(leaf), leaf)[0]
    deterministic_algorithms(True)
    torch._dynamo.reset()
    compiled = grad(torch.compile(f, fullgraph=True, backend="aot_eager"))
    assert torch.equal(compiled, grad(f))


@pytest.mark.gpu
@pytest.mark.parametrize("backend,deterministic", FLASH_KERNELS)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("seqlen", [1024, 8192])
def test_large(backend, deterministic, head_dim, seqlen):
    check_flash(backend, *qkv((1, 2, 1, seqlen, seqlen, head_dim), torch.bfloat16, "cuda"), True, deterministic)


@pytest.mark.gpu
@pytest.mark.parametrize("backend,deterministic", FLASH_KERNELS)
@pytest.mark.parametrize("head_dim", [8, 24, 96, 160, 192, 256])
def test_every_head_dim_on_gpu(backend, deterministic, head_dim):
    check_flash(backend, *qkv((2, 4, 2, 300, 257, head_dim), torch.bfloat16, "cuda"), True, deterministic)


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("head_dim", [1, 59, 111, 250])
def test_triton_head_dims_not_a_multiple_of_8_on_gpu(deterministic, head_dim):
    check_flash("triton", *qkv((2, 4, 2, 300, 257, head_dim), torch.bfloat16, "cuda"), True, deterministic)


# ---- CUDA forward and backward, Stage 2 (sm_90a) and Stage 1 (mma.sync) ----
# On compute capability 9.x the CUDA forward and backward for head dims
# that pad to 64 or 128 run the sm_90a kernels unless
# PYEXT_FLASH_SM90=0 (read per call): these cases run each path, set through
# the environment (check_flash runs the forward and the backward). Head dims
# 64, 128 and ones that pad to them (40, 120; 72 pads to 96, Stage 1 either
# way), 128-row query tiles and 128-key blocks ragged both ways, GQA, Sq = 1,
# rows that see no key (causal, Sq > Sk).
SM90_SHAPES = SHAPES + [
    (2, 4, 2, 129, 257, 128),
    (1, 2, 1, 300, 131, 72),
    (1, 3, 1, 1, 200, 120),
    (1, 2, 2, 255, 64, 64),
    (1, 2, 2, 128, 128, 128),
]


@pytest.fixture(params=["sm90", "stage1"])
def cuda_stage(request, monkeypatch):
    if request.param == "sm90" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the sm_90a kernels need a device of compute capability 9.x")
    monkeypatch.setenv("PYEXT_FLASH_SM90", "1" if request.param == "sm90" else "0")
    return request.param


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["dq-atomic", "deterministic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SM90_SHAPES, ids=str)
def test_cuda_stages_match_oracle(backend, cuda_stage, deterministic, dtype, causal, shape):
    check_flash(backend, *qkv(shape, dtype, "cuda"), causal, deterministic)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["dq-atomic", "deterministic"])
def test_cuda_stages_on_bshd_views(backend, cuda_stage, deterministic):
    check_flash(backend, *qkv((2, 4, 2, 150, 140, 128), torch.bfloat16, "cuda", "bshd"), True, deterministic)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda"])
@pytest.mark.parametrize("head_dim", [40, 64, 128])
def test_cuda_forward_runs_the_stage_asked_for(backend, cuda_stage, head_dim):
    """The sm_90a kernel is what runs when it should (no silent fall-back to
    Stage 1, e.g. a tensor map the driver refused: at d 40 its 64-column box
    is wider than the tensor), and never when it is off."""
    q, k, v = (t.detach() for t in qkv((1, 2, 2, 200, 200, head_dim), torch.float16, "cuda"))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        torch.ops.pyext.flash_attn_fwd_cuda(q, k, v, 0.125, True, 0)
        torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages()]
    assert any("flash_fwd_sm90_kernel" in n for n in names) == (cuda_stage == "sm90"), names


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["dq-atomic", "deterministic"])
@pytest.mark.parametrize("head_dim", [40, 128])
def test_cuda_backward_runs_the_stage_asked_for(backend, cuda_stage, deterministic, head_dim):
    """The sm_90a kernels exactly when asked, Stage 1's otherwise: dK/dV,
    then dQ (deterministic), or dK/dV adding dQ up (its template's last
    argument true), then the pass that rounds it."""
    q, k, v = (t.detach() for t in qkv((1, 4, 2, 200, 300, head_dim), torch.bfloat16, "cuda"))
    out, lse, out_lo = torch.ops.pyext.flash_attn_fwd_cuda(q, k, v, 0.125, True, 100)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        torch.ops.pyext.flash_attn_bwd_cuda(torch.randn_like(out), q, k, v, out, out_lo, lse, 0.125, True, 100,
                                            deterministic)
        torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages()]
    ran = {kernel: any(kernel in n for n in names) for kernel in (
        "flash_bwd_dkdv_kernel", "flash_bwd_dq_kernel", "flash_bwd_dkdv_sm90_kernel", "flash_bwd_dq_sm90_kernel",
        "flash_bwd_dq_convert_kernel")}
    adds_dq = any("flash_bwd_dkdv" in n and "true>" in n for n in names)
    stage = "" if cuda_stage == "stage1" else "_sm90"
    expected = {f"flash_bwd_dkdv{stage}_kernel": True, f"flash_bwd_dq{stage}_kernel": deterministic,
                "flash_bwd_dq_convert_kernel": not deterministic}
    assert ran == {kernel: expected.get(kernel, False) for kernel in ran}, names
    assert adds_dq == (not deterministic), names


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda"])
def test_cuda_dq_atomic_backward_writes_every_element_and_the_same_dk_dv(backend, cuda_stage):
    """deterministic=False changes how dQ is summed, nothing else: dK and dV
    are the deterministic backward's bit for bit, dQ within the rule (the
    stage tests above); no element left unwritten in poisoned memory."""
    q, k, v = (t.detach() for t in qkv((2, 4, 2, 77, 300, 120), torch.bfloat16, "cuda", "bshd"))
    out, lse, out_lo = torch.ops.pyext.flash_attn_fwd_cuda(q, k, v, 0.3, True, 13)
    dout = torch.randn_like(out)
    _, dk, dv = torch.ops.pyext.flash_attn_bwd_cuda(dout, q, k, v, out, out_lo, lse, 0.3, True, 13, True)
    for _ in range(3):
        poison_cuda_allocator(8 * q.numel() * q.element_size())
        grads = torch.ops.pyext.flash_attn_bwd_cuda(dout, q, k, v, out, out_lo, lse, 0.3, True, 13, False)
        assert not any(g.isnan().any() for g in grads)
        assert torch.equal(grads[1], dk) and torch.equal(grads[2], dv)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda"])
def test_cuda_stages_backward_is_deterministic_and_writes_every_element(backend, cuda_stage):
    q, k, v = (t.detach() for t in qkv((2, 4, 2, 77, 300, 120), torch.bfloat16, "cuda", "bshd"))
    out, lse, out_lo = torch.ops.pyext.flash_attn_fwd_cuda(q, k, v, 0.3, True, 13)
    dout = torch.randn_like(out)
    first = None
    for _ in range(10):
        poison_cuda_allocator(8 * k.numel() * k.element_size())
        grads = torch.ops.pyext.flash_attn_bwd_cuda(dout, q, k, v, out, out_lo, lse, 0.3, True, 13, True)
        assert not any(g.isnan().any() for g in grads)
        if first is None:
            first = grads
        assert all(torch.equal(a, b) for a, b in zip(first, grads))
