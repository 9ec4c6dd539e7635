"""torch's tools see pyext's attention ops as they see torch's SDPA kernels.

torch.utils.flop_counter.FlopCounterMode counts them as torch counts its own
flash kernels (torch's sdpa_flop_count and sdpa_backward_flop_count are the
oracle): every op variant, GQA and a narrower value head dim, packed batches,
fake tensors; a patched model counts what the unpatched one does, so
utilisation figures do not change with the swap. Selective activation
checkpointing can save their outputs, as policies save torch's."""

import functools

import pytest
import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_backward_flop_count, sdpa_flop_count

import pyext
from conftest import device_for
from attention_checks import KERNEL_BACKENDS, qkv
from test_attention_varlen import packed


def forward_and_backward_flops(fn, inputs):
    """FLOPs FlopCounterMode counts for fn(*inputs), then for its backward."""
    with FlopCounterMode(display=False) as counter:
        out = fn(*inputs)
        forward = counter.get_total_flops()
        out.backward(torch.randn_like(out))
    return forward, counter.get_total_flops() - forward


def torch_counts(b, hq, sq, sk, d, dv):
    """What torch counts for its flash kernels on these shapes, forward and
    backward, K and V given q's heads (torch counts per query head)."""
    q, k, v, out = (b, hq, sq, d), (b, hq, sk, d), (b, hq, sk, dv), (b, hq, sq, dv)
    return sdpa_flop_count(q, k, v), sdpa_backward_flop_count(out, q, k, v)


# (shape as qkv takes it): GQA with Sq < Sk, a value head dim of its own
# (Triton only) with Sq > Sk, one query row
SHAPES = [(2, 4, 2, 5, 7, 16), (1, 2, 1, 9, 3, 32, 16), (1, 2, 2, 1, 6, 8)]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attention_counts_as_torch_counts_its_flash_kernels(backend, shape, causal):
    if backend == "cuda" and len(shape) == 7:
        pytest.skip("the CUDA kernels take v at q's head dim")
    q, k, v = qkv(shape, torch.bfloat16, device_for(backend))
    counted = forward_and_backward_flops(lambda *t: pyext.flash_attention(*t, causal=causal, backend=backend),
                                         (q, k, v))
    assert counted == torch_counts(q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3], v.shape[3])


# The Triton-only variants, each its own op: dropout, a mask, the extras
# (a window, a soft cap, sinks), each counted as dense attention.
VARIANTS = {
    "dropout": lambda q, k, v: pyext.scaled_dot_product_attention(q, k, v, dropout_p=0.3, enable_gqa=True,
                                                                  backend="triton"),
    "mask": lambda q, k, v: pyext.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.randn(q.shape[2], k.shape[2], device=q.device, dtype=q.dtype), enable_gqa=True,
        backend="triton"),
    "extras": lambda q, k, v: pyext.flash_attention(q, k, v, causal=True, window_size=(3, -1), softcap=20.0,
                                                    sinks=torch.randn(q.shape[1], device=q.device), backend="triton"),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_triton_variant_counts_as_dense_attention(variant):
    q, k, v = qkv((2, 4, 2, 5, 7, 16, 8), torch.bfloat16, device_for("triton"))
    assert forward_and_backward_flops(VARIANTS[variant], (q, k, v)) == torch_counts(2, 4, 5, 7, 16, 8)


def test_packed_batches_count_each_sequence():
    case = ([3, 5, 1], [4, 2, 6], 4, 2, 16)
    q, k, v, *sequences = packed(case, torch.bfloat16, device_for("triton"))
    counted = forward_and_backward_flops(
        lambda *t: pyext.flash_attention_varlen(*t, *sequences, causal=True, backend="triton"), (q, k, v))
    each = [torch_counts(1, 4, sq, sk, 16, 16) for sq, sk in zip(case[0], case[1])]
    assert counted == tuple(map(sum, zip(*each)))


def test_packed_batches_of_fake_tensors_count_each_sequence_at_the_maximum_lengths():
    """Where the offsets cannot be read (a fake or meta tensor, as when a
    model is traced), each sequence counts at max_seqlen_q x max_seqlen_k,
    as torch counts its own packed kernels."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    *tensors, max_q, max_k = packed(([3, 5, 1], [4, 2, 6], 4, 2, 16), torch.bfloat16, "cpu")
    mode = FakeTensorMode()
    q, k, v, cu_q, cu_k = (mode.from_tensor(t.detach()) for t in tensors)
    with mode:
        with FlopCounterMode(display=False) as counter:
            torch.ops.pyext.flash_attn_varlen_fwd_triton(q, k, v, cu_q, cu_k, max_q, max_k, 0.25, True, -1, -1, 0.0,
                                                         None, 0.0, None)
    assert counter.get_total_flops() == 3 * torch_counts(1, 4, max_q, max_k, 16, 16)[0]


def test_every_attention_op_has_a_flop_formula():
    """An op added without one would count as 0 in every model that runs it."""
    ops = [name for name in dir(torch.ops.pyext) if name.startswith("flash_attn_")]
    assert ops and [name for name in ops if getattr(torch.ops.pyext, name) not in flop_registry] == []


@pytest.mark.gpu
def test_a_patched_model_counts_what_the_unpatched_one_counts():
    """(torch counts its SDPA kernels on CUDA only: its CPU kernel counts 0.)"""
    from patch_models import build, loss_of
    model = build("nanogpt").cuda()

    def flops():
        with FlopCounterMode(display=False) as counter, torch.autocast("cuda", dtype=torch.bfloat16):
            loss_of(model, "nanogpt", "cuda", torch.float32).backward()
        return counter.get_total_flops()
    unpatched = flops()
    pyext.patch(model)
    assert flops() == unpatched


def save_attention(ctx, op, *args, **kwargs):
    """A selective activation checkpointing policy that keeps the attention
    forward's outputs (as torchtitan's keeps those of torch's SDPA kernels)
    and recomputes the rest."""
    keep = op.name().startswith("pyext::flash_attn") and "_fwd_" in op.name()
    return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("policy", [None, save_attention])
def test_selective_checkpointing_saves_the_attention_forward_when_its_policy_says_so(backend, policy):
    """The forward op runs again in the backward under plain checkpointing
    and once under a policy that saves it (FlopCounterMode counts each run);
    the gradient is the same bits as without checkpointing (the
    deterministic backward: the atomic one's last bits vary run to run)."""
    q = qkv((1, 2, 2, 16, 16, 16), torch.bfloat16, device_for(backend))[0]

    def block(q):
        return pyext.flash_attention(q * 2, q, q, causal=True, deterministic=True, backend=backend).sin()
    expected = torch.autograd.grad(block(q).sum(), q)[0]
    context = {"context_fn": functools.partial(create_selective_checkpoint_contexts, policy)} if policy else {}
    with FlopCounterMode(display=False) as counter:
        grad = torch.autograd.grad(checkpoint(block, q, use_reentrant=False, **context).sum(), q)[0]
    forward_op = getattr(torch.ops.pyext, f"flash_attn_fwd_{backend}")
    forward_runs = counter.get_flop_counts()["Global"][forward_op] / torch_counts(1, 2, 16, 16, 16, 16)[0]
    assert forward_runs == (1 if policy else 2)
    assert torch.equal(grad, expected)
