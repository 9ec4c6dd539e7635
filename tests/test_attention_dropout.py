"""Dropout in the Triton attention kernels: the mask they draw, from
torch's seed, and out and gradients given that mask."""

import pytest
import torch

import pyext
from pyext import reference
from conftest import assert_close, device_for, hessian_vector_product, hvp_directions, make_tensor, poisoned_like
from attention_checks import attention_with_dropout, check_dropout, compiled_and_eager, qkv


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 2, 1, 19, 33, 40), (1, 4, 2, 33, 20, 16), (1, 2, 2, 1, 23, 16),
                                   (1, 4, 2, 21, 18, 32, 16)], ids=str)
def test_dropout_matches_the_oracle_with_the_kernels_mask(deterministic, causal, shape, dropout_seeds):
    """Dropout in the Triton kernels: out, dq, dk, dv against the float64
    oracle given the mask the kernels drew, within the rule
    (attention_checks.check_dropout); lse is that of the undropped P."""
    q, k, v = qkv(shape, torch.bfloat16, device_for("triton"))
    lse = check_dropout(q, k, v, causal, deterministic, 0.3, dropout_seeds)
    offset, scale = k.shape[2] - q.shape[2], q.shape[-1] ** -0.5
    undropped = reference.attention(q.double(), k.double(), v.double(), scale=scale, causal=causal,
                                    causal_offset=offset)[1]
    torch.testing.assert_close(lse.double(), undropped, rtol=0, atol=1e-2)


def _one_sequence(t):
    """A (1, H, S, D) tensor as a packed batch's (S, H, D)."""
    return t[0].transpose(0, 1)


DROPOUT_CALLS = {
    "dropout": lambda q, k, v, **kw: pyext.flash_attention(q, k, v, **kw),
    "window": lambda q, k, v, **kw: pyext.flash_attention(q, k, v, window_size=(2, 0), **kw),
    "varlen": lambda q, k, v, **kw: _one_sequence(pyext.flash_attention_varlen(
        *(_one_sequence(t) for t in (q, k, v)), *[torch.tensor([0, q.shape[2]], device=q.device)] * 2,
        q.shape[2], q.shape[2], **kw)[None]),
}


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("call", DROPOUT_CALLS)
def test_a_row_that_sees_one_key_gets_no_dq_through_dropout(call, deterministic):
    """Row 0 of causal attention sees key 0 alone: P = 1, so its dS = dP - D
    is 0 and its dq is 0, whether the mask keeps the key or not (torch's
    math SDPA gets that 0 exactly). Kept, out is v0 / (1 - p), which bf16
    rounds where v0 it would not; D = rowsum(dO * O) from the rounded out
    alone put this dq at several times the rule's floor. The forward's
    out_lo (what rounding out left out) restores it, in every op that
    takes dropout."""
    q, k, v = qkv((1, 8, 2, 5, 5, 64), torch.bfloat16, device_for("triton"))
    v = (v.detach() * 8).requires_grad_()  # a large out: a large rounding
    out = DROPOUT_CALLS[call](q, k, v, causal=True, dropout_p=0.3, deterministic=deterministic, backend="triton")
    dq, = torch.autograd.grad(out, q, torch.randn_like(out))
    zero = torch.zeros_like(dq[:, :, 0])
    assert_close(dq[:, :, 0], zero.double(), zero, "dq of the row that sees one key")


@pytest.mark.parametrize("seq_k", [20, 0], ids=["keys", "no-keys"])
def test_dropout_forward_writes_out_and_out_lo_everywhere(seq_k):
    """out, lse and out_lo poisoned with NaN: every element written, those of
    the rows that see no key (causal, Sq > Sk; or no keys at all) as zeros;
    out_lo is what rounding left out: at most half a unit in out's last
    place, and out + out_lo the exact result to 8 more bits than out alone.
    q = 0 makes every score 0 and P exact in bf16, so the kernel's fp32
    accumulator is exact to fp32 rounding (with random q, P's rounding to
    bf16 for the PV product costs about as much as out's own rounding)."""
    from pyext.triton_kernels import flash_attention as kernels
    q, k, v = (t.detach() for t in qkv((1, 4, 2, 33, seq_k, 16), torch.bfloat16, device_for("triton")))
    q = torch.zeros_like(q)
    seed = torch.tensor([11], device=q.device)
    out, lse, out_lo = kernels.flash_attn_fwd(q, k, v, 0.25, True, seq_k - 33, out=poisoned_like(q),
                                              lse=poisoned_like(q[..., 0].float()), out_lo=poisoned_like(q),
                                              dropout_p=0.3, seed=seed)
    for name, t in (("out", out), ("lse", lse), ("out_lo", out_lo)):
        assert not t.isnan().any(), f"{name}: an element was never written"
    blind = slice(0, 33 - seq_k if seq_k else 33)  # the rows that see no key
    assert not out[:, :, blind].any() and not out_lo[:, :, blind].any()
    if seq_k:
        keep = kernels.dropout_keep_mask(seed, 1, 4, 33, seq_k, 0.3)
        exact = reference.attention(q.double(), k.double(), v.double(), scale=0.25, causal=True,
                                    causal_offset=seq_k - 33, dropout_p=0.3, keep=keep)[0]
        assert out_lo.any() and (out_lo.double().abs() <= out.double().abs() * 2 ** -8).all()
        two_part = out.double() + out_lo.double()
        assert (two_part - exact).abs().max() < (out.double() - exact).abs().max() / 64


def test_dropout_keeps_each_weight_with_probability_one_minus_p_in_streams_of_its_own():
    """The mask: about 1 - p of it kept (5 standard deviations), another
    stream per (batch, head), the same for the same seed, another for another."""
    from pyext.triton_kernels.flash_attention import dropout_keep_mask
    seed = torch.tensor([2026], device=device_for("triton"))
    keep = dropout_keep_mask(seed, 2, 3, 40, 50, 0.25)
    n = keep.numel()
    assert abs(keep.float().mean().item() - 0.75) < 5 * (0.75 * 0.25 / n) ** 0.5
    heads = keep.reshape(6, -1)
    assert all(not torch.equal(heads[i], heads[j]) for i in range(6) for j in range(i))
    assert torch.equal(keep, dropout_keep_mask(seed.clone(), 2, 3, 40, 50, 0.25))
    assert not torch.equal(keep, dropout_keep_mask(seed + 6, 2, 3, 40, 50, 0.25))


def test_dropout_follows_torch_manual_seed_and_draws_anew_each_call():
    q, k, v = qkv((1, 2, 2, 13, 13, 16), torch.bfloat16, device_for("triton"))

    def run():
        return pyext.scaled_dot_product_attention(q, k, v, dropout_p=0.2, is_causal=True, backend="triton")
    torch.manual_seed(5)
    first, second = run(), run()
    torch.manual_seed(5)
    assert torch.equal(run(), first) and not torch.equal(first, second)


def test_flash_attention_dropout_on_the_reference_scales_what_it_keeps():
    """backend="torch" (what auto runs on the CPU) draws its own mask: with
    v the identity, out is the dropped weights themselves, each kept one
    P / (1 - p), about 1 - p of them kept (5 standard deviations), the
    same for the same seed; the gradient goes through the same mask."""
    q, k = (make_tensor((2, 2, 48, 8), torch.float64, "cpu") for _ in range(2))
    v = torch.eye(48, dtype=torch.float64).expand(2, 2, 48, 48).requires_grad_()
    p = 0.3
    torch.manual_seed(11)
    out = pyext.flash_attention(q, k, v, dropout_p=p, backend="torch")
    torch.manual_seed(11)
    assert torch.equal(pyext.flash_attention(q, k, v, dropout_p=p, backend="torch"), out)
    weights = torch.softmax((q @ k.transpose(-2, -1)) * 8 ** -0.5, -1)
    kept = out != 0
    n = kept.numel()
    assert abs(kept.double().mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    torch.testing.assert_close(out[kept], weights[kept] / (1 - p))
    dout = torch.randn_like(out)
    (dv,) = torch.autograd.grad(out, v, dout)
    torch.testing.assert_close(dv, out.detach().transpose(-2, -1) @ dout)


def test_dropout_double_backward_under_auto_uses_the_kernels_mask(dropout_seeds, auto_runs_the_triton_kernels):
    """A backward with create_graph=True through dropout attention (auto):
    the reference differentiates the same mask the kernels drew."""
    from pyext.triton_kernels.flash_attention import dropout_keep_mask
    q, k, v = (t.detach() for t in qkv((1, 2, 2, 24, 24, 16), torch.float16, device_for("triton")))
    c, r = hvp_directions(q.shape, (q, k, v))
    got = hessian_vector_product(lambda *t: pyext.flash_attention(*t, dropout_p=0.25), (q, k, v), c, r)
    keep = dropout_keep_mask(dropout_seeds[0], 1, 2, 24, 24, 0.25)
    assert len(dropout_seeds) == 1  # the kernels ran, once

    def theirs(*t):
        return reference.attention(*t, dropout_p=0.25, keep=keep)[0]
    want = hessian_vector_product(theirs, [t.double() for t in (q, k, v)], c, r)
    same_dtype = hessian_vector_product(lambda *t: attention_with_dropout(*t, 16 ** -0.5, False, 0, keep, 0.25),
                                        (q, k, v), c, r)
    for name, g, w, pt in zip(("q", "k", "v"), got, want, same_dtype):
        assert_close(g, w, pt, f"Hessian-vector product, {name}")


@pytest.mark.parametrize("call", ["flash_attention", "scaled_dot_product_attention"])
def test_dropout_compiles_in_one_graph_drawing_as_eager_draws(call):
    """torch.compile(fullgraph=True) of a call with dropout: no graph break
    (the seed is drawn on the device, not read on the host), and the same
    torch.manual_seed gives the compiled call eager's mask: its gradients
    equal eager's bit for bit (the deterministic backward)."""
    q, k, v = qkv((1, 2, 2, 9, 11, 16), torch.bfloat16, device_for("triton"))

    def loss(q, k, v):
        if call == "flash_attention":
            out = pyext.flash_attention(q, k, v, causal=True, dropout_p=0.3, deterministic=True, backend="triton")
        else:
            out = pyext.scaled_dot_product_attention(q, k, v, dropout_p=0.3, backend="triton")
        return out.float().square().sum()

    def grads(f):
        torch.manual_seed(0)
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        return torch.autograd.grad(f(*leaves), leaves)
    compiled, eager = compiled_and_eager(loss, grads)
    assert all(torch.equal(c, e) for c, e in zip(compiled, eager))


@pytest.mark.gpu
def test_dropout_draws_a_new_mask_at_each_cuda_graph_replay():
    q, k, v = (torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    run = lambda: pyext.scaled_dot_product_attention(q, k, v, dropout_p=0.3, backend="triton")  # noqa: E731
    run()  # autotune outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    graph.replay()
    first = out.clone()
    graph.replay()
    assert not torch.equal(out, first)


def test_dropout_past_its_random_counter_is_refused_before_any_launch(monkeypatch):
    """The keep mask's counter numbers a head's scores (row * Sk + key) in
    int32, so Sq * Sk must stay below 2^31: past it the Triton backend named
    raises saying so (auto takes torch's dropout), for dense and packed
    batches, and so does the kernels' launch function called directly. The
    bound is lowered to 8 x 8 here, so that a missing check runs a small
    kernel rather than 2^31 scores."""
    from pyext.triton_kernels import flash_attention as kernels
    from pyext.triton_kernels.flash_attention import launch
    assert kernels.MAX_DROPOUT_SCORES == launch.MAX_DROPOUT_SCORES == 2 ** 31
    monkeypatch.setattr(kernels, "MAX_DROPOUT_SCORES", 64)
    monkeypatch.setattr(launch, "MAX_DROPOUT_SCORES", 64)
    device = device_for("triton")
    q = make_tensor((1, 1, 8, 16), torch.bfloat16, device)
    assert pyext.flash_attention(q[:, :, :7], q, q, dropout_p=0.1, backend="triton").shape == (1, 1, 7, 16)
    with pytest.raises(pyext.BackendUnavailable, match=r"Sq \* Sk below 2\^31"):
        pyext.flash_attention(q, q, q, dropout_p=0.1, backend="triton")
    offsets = torch.tensor([0, 8], dtype=torch.int32, device=device)
    with pytest.raises(pyext.BackendUnavailable, match=r"Sq \* Sk below 2\^31"):
        pyext.flash_attention_varlen(*[q[0].transpose(0, 1)] * 3, offsets, offsets, 8, 8, dropout_p=0.1,
                                     backend="triton")
    with pytest.raises(ValueError, match=r"Sq \* Sk below 2\^31"):
        kernels.flash_attn_fwd(q, q, q, 0.3, False, 0, dropout_p=0.1, seed=torch.tensor([7], device=device))


@pytest.mark.gpu
def test_cuda_kernels_name_dropout_as_what_they_lack():
    q = torch.randn(1, 2, 8, 16, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(pyext.BackendUnavailable, match="cuda kernels have no dropout"):
        pyext.scaled_dot_product_attention(q, q, q, dropout_p=0.1, backend="cuda")


@pytest.mark.parametrize("layout", ["contiguous", "bshd"])
def test_opcheck_dropout(layout):
    q, k, v = qkv((1, 2, 1, 9, 12, 16), torch.bfloat16, device_for("triton"), layout)
    seed = torch.tensor([7], device=q.device)
    torch.library.opcheck(torch.ops.pyext.flash_attn_dropout_fwd_triton, (q, k, v, 0.25, True, 3, 0.2, seed))
    out, lse, out_lo = torch.ops.pyext.flash_attn_dropout_fwd_triton(q.detach(), k.detach(), v.detach(), 0.25, True,
                                                                     3, 0.2, seed)
    for deterministic in (False, True):
        torch.library.opcheck(torch.ops.pyext.flash_attn_dropout_bwd_triton,
                              (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, out_lo, lse, 0.25,
                               True, 3, 0.2, seed, deterministic))
