"""pyext.optim.AdamW: the specification, as tests.

Each step-for-step test runs four optimizers on the same grads: ours (the
backend under test, in the test dtype), `pt` in the same dtype, `ref` =
pyext's reference in float64 (the oracle) and torch.optim.AdamW in float64,
which pins the oracle to torch's semantics.

float32: `pt` is torch.optim.AdamW(foreach=False) and the four trajectories
run side by side for the whole test. float16/bfloat16: `pt` is the reference
run in that dtype (float32 moments, one rounding of the param per step), and
`pt`, `ref` and torch's float64 run restart from ours before every step, so
the rule judges one step at a time. Over whole trajectories the params of
any low-precision AdamW stall whenever an update is under half an ulp and
drift from the float64 run by an ulp or more, at random; and torch's own
AdamW keeps float16/bfloat16 moments, whose error (inf in float16 once v
underflows) would make the bound meaningless.
"""
import io
import math
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

import pyext
from pyext.optim import AdamW
from conftest import (BACKENDS, HAS_GPU, assert_close, compute_sanitizer, device_for,
                      run_under_sanitizer)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# scalar, one element, odd and prime sizes, empty, one past a block (4096), 3-D
SHAPES = [(), (1,), (7,), (33, 5), (0,), (4097,), (2, 3, 129)]
SHAPES_INTERPRETED = [(), (7,), (33, 5), (0,), (4097,)]  # the Triton interpreter is slow
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

# Param groups: (which params, options). "groups" mixes amsgrad, maximize,
# betas, eps, weight decay and lr across two groups.
CONFIGS = {
    "one_group": lambda n: [(range(n), dict(lr=1e-2, weight_decay=1e-2))],
    "groups": lambda n: [
        (range(0, n, 2), dict(lr=2e-2, betas=(0.8, 0.99), weight_decay=0.1, amsgrad=True)),
        (range(1, n, 2), dict(lr=5e-3, eps=1e-6, weight_decay=0.0, maximize=True)),
    ],
}


def interpreted(backend):
    return backend == "triton" and not HAS_GPU


def make_init(shapes, dtype, device):
    """Random params in `dtype`, plus a transposed one (dense, not contiguous)."""
    init = [torch.randn(s, device=device).to(dtype) for s in shapes]
    init.append(torch.randn(5, 33, device=device).to(dtype).t())
    return init


class Runs:
    """Four optimizers over copies of the same params, stepped with the same grads."""

    def __init__(self, init, config, backend, capturable=False, tensor_lr=False):
        self.groups_spec = CONFIGS[config](len(init))
        self.low_precision = init[0].dtype in (torch.float16, torch.bfloat16)
        self.params = {
            "ours": [torch.nn.Parameter(t.clone()) for t in init],
            "pt": [torch.nn.Parameter(t.clone()) for t in init],
            "ref": [torch.nn.Parameter(t.double()) for t in init],
            "torch64": [torch.nn.Parameter(t.double()) for t in init],
        }
        ours_groups = self.groups("ours")
        if tensor_lr:  # a tensor lr on the params' device, changed in place
            for g in ours_groups:
                g["lr"] = torch.tensor(g["lr"], device=init[0].device)
        self.opt = {
            "ours": AdamW(ours_groups, backend=backend, capturable=capturable),
            "pt": (AdamW(self.groups("pt"), backend="torch") if self.low_precision
                   else torch.optim.AdamW(self.groups("pt"), foreach=False)),
            "ref": AdamW(self.groups("ref"), backend="torch"),
            "torch64": torch.optim.AdamW(self.groups("torch64"), foreach=False),
        }
        self.base_lr = [g["lr"] for _, g in self.groups_spec]
        self.k = 0

    def groups(self, name):
        return [dict(params=[self.params[name][i] for i in idx], **opts) for idx, opts in self.groups_spec]

    def restart_from_ours(self):
        """pt, ref and torch64 take ours' params and state (in their own dtypes)."""
        for i, p in enumerate(self.params["ours"]):
            state = self.opt["ours"].state.get(p, {})
            for name in ("pt", "ref", "torch64"):
                q = self.params[name][i]
                q.data.copy_(p.detach())
                for key, value in state.items():
                    self.opt[name].state[q][key] = (
                        value.detach().to("cpu", torch.float32, copy=True) if key == "step"
                        else value.detach().to(q.dtype if name != "pt" else torch.float32, copy=True))

    def step(self, skip=()):
        """One step; params in `skip` get no grad. The lr follows a cosine schedule."""
        if self.low_precision:
            self.restart_from_ours()
        for i, p in enumerate(self.params["ours"]):
            g = None if i in skip else torch.randn_like(p, dtype=torch.float32).to(p.dtype)
            for name, params in self.params.items():
                params[i].grad = None if g is None else g.to(params[i].dtype, copy=True)
        scale = 0.3 + 0.7 * math.cos(self.k / 7)
        for name, opt in self.opt.items():
            for group, base in zip(opt.param_groups, self.base_lr):
                if isinstance(group["lr"], torch.Tensor):
                    group["lr"].fill_(base * scale)
                else:
                    group["lr"] = base * scale
            opt.step()
        self.k += 1

    def check(self):
        for i, (ours, pt, ref, t64) in enumerate(zip(*self.params.values())):
            torch.testing.assert_close(ref, t64, rtol=1e-10, atol=1e-12, msg=f"oracle param {i}")
            assert_close(ours.detach(), ref.detach(), pt.detach(), f"step {self.k}: param {i}")
            s_ours, s_pt, s_ref = (self.opt[n].state[p] for n, p in (("ours", ours), ("pt", pt), ("ref", ref)))
            assert s_ours.keys() == s_pt.keys(), f"param {i}: state keys"
            if not s_pt:
                continue
            assert float(s_ours["step"]) == float(s_pt["step"]), f"param {i}: step count"
            for key in MOMENTS:
                if key in s_pt:
                    want = torch.float32 if ours.dtype in (torch.float16, torch.bfloat16) else ours.dtype
                    assert s_ours[key].dtype == want
                    assert_close(s_ours[key], s_ref[key], s_pt[key], f"step {self.k}: {key} {i}")


def skip_pattern(k):
    """Param 1 misses its grad every third step, so step counts differ."""
    return (1,) if k % 3 == 1 else ()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_matches_torch_step_for_step(backend, dtype, config):
    device = device_for(backend)
    shapes, steps = (SHAPES_INTERPRETED, 6) if interpreted(backend) else (SHAPES, 50)
    runs = Runs(make_init(shapes, dtype, device), config, backend)
    for k in range(steps):
        runs.step(skip=skip_pattern(k))
        runs.check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_lr_is_read_at_each_step(backend):
    device = device_for(backend)
    steps = 4 if interpreted(backend) else 20
    runs = Runs(make_init(SHAPES_INTERPRETED, torch.float32, device), "groups", backend,
                capturable=True, tensor_lr=True)
    for k in range(steps):
        runs.step(skip=skip_pattern(k))
        runs.check()


def test_auto_runs_the_reference_on_cpu_and_float64():
    runs = Runs(make_init(SHAPES, torch.float64, "cpu"), "groups", "auto")
    for k in range(5):
        runs.step()
        runs.check()


def test_complex_params_match_torch():
    init = [torch.randn(7, dtype=torch.complex64), torch.randn(3, 4, dtype=torch.complex64)]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    a = AdamW(ours, lr=1e-2, amsgrad=True)
    b = torch.optim.AdamW(theirs, lr=1e-2, amsgrad=True, foreach=False)
    for _ in range(5):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q)


# ---------------------------------------------------------------- checkpoints

def _train(opt, params, steps, grads_seed):
    gen = torch.Generator().manual_seed(grads_seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype)
        opt.step()


def _clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def _saved_and_loaded(state_dict):
    """The state dict through torch.save and torch.load (as a checkpoint):
    loading the live dict would share its tensors between two optimizers."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        assert sa["state"][k].keys() == sb["state"][k].keys()
        for key, value in sa["state"][k].items():
            other = sb["state"][k][key]
            assert torch.equal(value.cpu().to(other.dtype), other.cpu()), f"state {k} {key}"
    for ga, gb in zip(sa["param_groups"], sb["param_groups"]):
        for key in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "params"):
            assert ga[key] == gb[key], key


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_state_dict_round_trip_and_continued_training(backend, direction):
    """Train k steps, move the checkpoint to the other optimizer, train k more:
    the result tracks an uninterrupted float64 run as closely as torch does."""
    device = device_for(backend)
    k = 3 if interpreted(backend) else 10
    init = make_init(SHAPES_INTERPRETED, torch.float32, device)
    runs = Runs(init, "groups", backend)
    for step in range(k):
        runs.step(skip=skip_pattern(step))
    source = "pt" if direction == "torch_to_ours" else "ours"
    params = _clone_params(runs.params[source])
    groups = [dict(params=[params[i] for i in idx], **opts) for idx, opts in runs.groups_spec]
    if direction == "torch_to_ours":
        resumed = AdamW(groups, backend=backend)
    else:
        resumed = torch.optim.AdamW(groups, foreach=False)
    resumed.load_state_dict(_saved_and_loaded(runs.opt[source].state_dict()))
    _assert_same_state(resumed, runs.opt[source])
    # the resumed optimizer replaces the source in the four-way comparison
    runs.params["ours" if direction == "torch_to_ours" else "pt"] = params
    runs.opt["ours" if direction == "torch_to_ours" else "pt"] = resumed
    for step in range(k, 2 * k):
        runs.step(skip=skip_pattern(step))
        runs.check()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_checkpoints_keep_float32_moments(dtype):
    params = [torch.nn.Parameter(torch.randn(9, 4).to(dtype)) for _ in range(2)]
    ours = AdamW(params, amsgrad=True)
    _train(ours, params, 3, grads_seed=0)
    saved = _saved_and_loaded(ours.state_dict())
    # ours -> ours: the float32 moments come back bit for bit
    again = AdamW(_clone_params(params), amsgrad=True)
    again.load_state_dict(saved)
    _assert_same_state(again, ours)
    for state in again.state.values():
        assert all(state[key].dtype == torch.float32 for key in MOMENTS)
    # ours -> torch -> ours: torch keeps its moments in the param dtype
    theirs = torch.optim.AdamW(_clone_params(params), amsgrad=True, foreach=False)
    theirs.load_state_dict(saved)
    back = AdamW(_clone_params(params), amsgrad=True)
    back.load_state_dict(_saved_and_loaded(theirs.state_dict()))
    for p_back, p_theirs in zip(back.param_groups[0]["params"], theirs.param_groups[0]["params"]):
        for key in MOMENTS:
            assert back.state[p_back][key].dtype == torch.float32
            assert torch.equal(back.state[p_back][key], theirs.state[p_theirs][key].float())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_defaults_groups_and_state_keys_match_torch(device):
    p, q = (torch.nn.Parameter(torch.randn(3, device=device)) for _ in range(2))
    fused = torch.nn.Parameter(torch.randn(3, device=device))
    ours = AdamW([p], amsgrad=True)
    theirs = torch.optim.AdamW([q], amsgrad=True)
    theirs_fused = torch.optim.AdamW([fused], amsgrad=True, fused=True)
    assert ours.defaults.keys() == theirs.defaults.keys() | {"backend"}
    assert {k: v for k, v in ours.defaults.items() if k != "backend"} == {
        k: v for k, v in theirs.defaults.items()}
    assert ours.param_groups[0].keys() == theirs.param_groups[0].keys() | {"backend"}
    for param, opt in ((p, ours), (q, theirs), (fused, theirs_fused)):
        param.grad = torch.randn_like(param)
        opt.step()
    assert ours.state[p].keys() == theirs.state[q].keys()
    # the step count lives where torch's fused AdamW keeps it: a float32 tensor on the param's device
    step, their_step = ours.state[p]["step"], theirs_fused.state[fused]["step"]
    assert torch.is_tensor(step) and (step.dtype, step.device) == (their_step.dtype, their_step.device)
    assert ours._step_supports_amp_scaling


# ------------------------------------------------------------- validation

_BAD_ARGS = [
    dict(lr=-1e-3), dict(eps=-1e-8), dict(betas=(1.0, 0.999)), dict(betas=(-0.1, 0.999)),
    dict(betas=(0.9, 1.0)), dict(weight_decay=-0.1), dict(betas=(0, 0.999)),
    dict(lr=torch.tensor([1e-3, 2e-3])), dict(betas=(0.9, torch.tensor(0.999))),
]


@pytest.mark.parametrize("kwargs", _BAD_ARGS, ids=lambda kw: ",".join(kw))
def test_constructor_raises_torchs_value_errors(kwargs):
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError) as theirs:
        torch.optim.AdamW([p], **kwargs)
    with pytest.raises(ValueError) as ours:
        AdamW([p], **kwargs)
    assert str(ours.value) == str(theirs.value)


def test_empty_param_list_is_torchs_error():
    with pytest.raises(ValueError) as theirs:
        torch.optim.AdamW([])
    with pytest.raises(ValueError) as ours:
        AdamW([])
    assert str(ours.value) == str(theirs.value)


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="backend"):
        AdamW([torch.nn.Parameter(torch.randn(3))], backend="apex")


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_sparse_grad_is_torchs_error(backend):
    def sparse_grad(p):
        p.grad = torch.sparse_coo_tensor([[0, 2]], [1.0, 2.0], (4,))

    q = torch.nn.Parameter(torch.randn(4))
    sparse_grad(q)
    with pytest.raises(RuntimeError) as theirs:
        torch.optim.AdamW([q]).step()
    p = torch.nn.Parameter(torch.randn(4))
    sparse_grad(p)
    with pytest.raises(RuntimeError) as ours:
        AdamW([p], backend=backend).step()
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_params_without_grad_are_skipped_and_zero_size_params_work(backend):
    device = device_for(backend)
    no_grad = torch.nn.Parameter(torch.randn(5, device=device))
    empty = torch.nn.Parameter(torch.randn(0, 3, device=device))
    before = no_grad.detach().clone()
    opt = AdamW([no_grad, empty], backend=backend)
    opt.step()  # nothing has a grad: nothing happens
    assert not opt.state
    empty.grad = torch.randn(0, 3, device=device)
    opt.step()
    assert torch.equal(no_grad, before) and no_grad not in opt.state
    assert float(opt.state[empty]["step"]) == 1 and opt.state[empty]["exp_avg"].shape == (0, 3)


def test_named_cuda_backend_on_cpu_params_says_why():
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    with pytest.raises(pyext.BackendUnavailable, match="cuda.*(CUDA tensors|not built)"):
        AdamW([p], backend="cuda").step()


def test_named_kernel_backend_rejects_float64_before_changing_anything():
    device = device_for("triton")
    single = torch.nn.Parameter(torch.randn(4, device=device))
    double = torch.nn.Parameter(torch.randn(4, device=device, dtype=torch.float64))
    single.grad, double.grad = torch.randn_like(single), torch.randn_like(double)
    before = single.detach().clone()
    opt = AdamW([single, double], backend="triton")
    with pytest.raises(pyext.BackendUnavailable, match="triton.*float64"):
        opt.step()
    assert torch.equal(single, before) and not opt.state


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU message")
def test_named_triton_backend_without_gpu_or_interpreter_says_why(monkeypatch):
    monkeypatch.setattr(pyext._backend, "TRITON_INTERPRET", False)
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    with pytest.raises(pyext.BackendUnavailable, match="triton.*TRITON_INTERPRET"):
        AdamW([p], backend="triton").step()


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_non_dense_params_are_stepped_in_place(backend):
    """A strided view as a parameter and a grad with other strides: the
    kernels step contiguous copies and write back only the view's elements."""
    device = device_for(backend)
    base = torch.randn(6, 10, device=device)
    untouched = base[:, 1::2].clone()
    strided = torch.nn.Parameter(base[:, ::2])  # shares base's storage
    transposed = torch.nn.Parameter(torch.randn(4, 7, device=device).t())
    reference_params = [torch.nn.Parameter(p.detach().clone()) for p in (strided, transposed)]
    ours = AdamW([strided, transposed], lr=1e-2, backend=backend)
    theirs = torch.optim.AdamW(reference_params, lr=1e-2, foreach=False)
    for _ in range(3):
        for p, q in zip((strided, transposed), reference_params):
            p.grad = torch.randn(p.shape, device=device)  # contiguous: strides differ from p's
            q.grad = p.grad.clone()
        ours.step()
        theirs.step()
    for p, q in zip((strided, transposed), reference_params):
        torch.testing.assert_close(p, q)
    assert torch.equal(base[:, 1::2], untouched)


# ------------------------------------------------------------- GradScaler

@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_skips_an_inf_step_like_torch_fused(backend):
    device = device_for(backend)
    init = [torch.randn(s, device=device) for s in [(7,), (33, 5), (0,)]]
    ours_params, torch_params = _clone_params(init), _clone_params(init)
    ours = AdamW(ours_params, lr=1e-2, backend=backend)
    theirs = torch.optim.AdamW(torch_params, lr=1e-2, fused=True)
    scalers = [torch.amp.GradScaler(device.type, init_scale=1024.0) for _ in range(2)]
    for k in range(5):
        grads = [torch.randn_like(t) for t in init]
        if k == 2:
            grads[1][3, 2] = float("inf")
        for opt, params, scaler in zip((ours, theirs), (ours_params, torch_params), scalers):
            before = [p.detach().clone() for p in params]
            steps_before = [float(opt.state[p]["step"]) if p in opt.state else 0.0 for p in params]
            opt.zero_grad()
            scaler.scale(sum((p * g).sum() for p, g in zip(params, grads))).backward()
            scaler.step(opt)
            scaler.update()
            if k == 2:  # skipped: params, moments and step counts unchanged
                assert all(torch.equal(p, b) for p, b in zip(params, before))
                assert [float(opt.state[p]["step"]) for p in params] == steps_before
        assert scalers[0].get_scale() == scalers[1].get_scale()
        for p, q in zip(ours_params, torch_params):
            torch.testing.assert_close(p, q)
            torch.testing.assert_close(p.grad, q.grad)  # both leave the grads unscaled
            torch.testing.assert_close(ours.state[p]["exp_avg_sq"], theirs.state[q]["exp_avg_sq"])
    assert scalers[0].get_scale() == 1024.0 / 2


# ------------------------------------------------------------- the ops

def _op_args(device, dtype=torch.float32, amsgrad=True, n=(7, 4097, 0)):
    params = [torch.randn(k, device=device).to(dtype) for k in n]
    grads = [torch.randn_like(p) for p in params]
    moments = [[torch.rand(p.shape, device=device) for p in params] for _ in range(3 if amsgrad else 2)]
    if not amsgrad:
        moments.append([])
    steps = [torch.tensor(3.0, device=device) for _ in params]
    return (params, grads, *moments, steps, 1e-2, None, 0.9, 0.999, 1e-2, 1e-8, amsgrad, False,
            torch.tensor(2.0, device=device), torch.tensor(0.0, device=device))


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_opcheck(backend):
    op = getattr(torch.ops.pyext, f"adamw_step_{backend}")
    torch.library.opcheck(op, _op_args(device_for(backend)))


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compile_fullgraph(backend):
    op = getattr(torch.ops.pyext, f"adamw_step_{backend}")
    args = _op_args(device_for(backend))
    copy = [[t.clone() for t in a] if isinstance(a, list) else a for a in args]

    def step(params, grads, m, v, vmax, steps):
        op(params, grads, m, v, vmax, steps, *args[6:])

    torch._dynamo.reset()
    torch.compile(step, fullgraph=True, backend="aot_eager")(*args[:6])
    step(*copy[:6])
    for compiled, eager in zip(args[:5], copy[:5]):
        for a, b in zip(compiled, eager):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_triton_op_with_empty_lists_does_nothing():
    # (with no tensor at all the dispatcher cannot reach the CUDA op; the
    # optimizer never calls either op with an empty bucket)
    torch.ops.pyext.adamw_step_triton([], [], [], [], [], [], 1e-2, None, 0.9, 0.999, 1e-2, 1e-8, True,
                                      False, None, None)


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_op_rejects_mismatched_lists(backend):
    op = getattr(torch.ops.pyext, f"adamw_step_{backend}")
    params, grads, m, v, vmax, steps, *rest = _op_args(device_for(backend))
    with pytest.raises(RuntimeError, match=r"grads\[1\]"):
        op(params, [grads[0], grads[1].double(), grads[2]], m, v, vmax, steps, *rest)
    with pytest.raises(RuntimeError, match="exp_avgs"):
        op(params, grads, m[:1], v, vmax, steps, *rest)
    with pytest.raises(RuntimeError, match=r"state_steps\[0\]"):
        op(params, grads, m, v, vmax, [s.double() for s in steps], *rest)


_COMPILE_FOR_GPU = textwrap.dedent("""
    import re, sys
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from pyext.triton_kernels.adamw import BLOCK, adamw_kernel

    pointers = ("tensor_table", "block_table", "bias_corrections", "lr_ptr", "grad_scale_ptr",
                "found_inf_ptr")
    kinds = dict(tensor_table="*i64", block_table="*i32")
    flags = ("AMSGRAD", "MAXIMIZE", "LR_ON_DEVICE", "UNSCALE", "SKIP_ON_INF", "ALIGNED")
    for arch in (80, 90):
        for dtype, on, vectors in ((tl.float32, (), 16), (tl.bfloat16, flags, 16), (tl.float16, (), 0)):
            constexprs = {f: f in on for f in flags}
            if dtype == tl.float32:
                constexprs["ALIGNED"] = True
            constexprs.update(PARAM_DTYPE=dtype, BLOCK=BLOCK)
            signature = {name: "constexpr" if name in constexprs else
                         kinds.get(name, "*fp32" if name in pointers else "fp32")
                         for name in adamw_kernel.arg_names}
            constants = {(adamw_kernel.arg_names.index(k),): v for k, v in constexprs.items()}
            kernel = triton.compile(ASTSource(adamw_kernel, signature, constants),
                                    target=GPUTarget("cuda", arch, 32), options=dict(num_warps=8))
            found = len(re.findall(r"ld\\.global(\\.\\w+)*\\.v4", kernel.asm["ptx"]))
            # a full block of an aligned launch: every load 16 bytes wide
            assert found >= vectors, (arch, dtype, found)
    print("ok")
""")


def test_triton_kernel_compiles_for_sm80_and_sm90_without_a_gpu():
    """The interpreter accepts code that the compiler rejects (globals that are
    not constexpr, ...): compile for real targets, and check that full blocks
    of aligned launches use 16-byte loads."""
    import triton
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this Triton has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _COMPILE_FOR_GPU], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-4000:]


# ------------------------------------------------------------- DTensor

_DTENSOR_WORKER = textwrap.dedent("""
    import os, sys
    import torch, torch.distributed as dist
    import pyext
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)  # the same full tensors on both ranks
    full = [torch.randn(7, 3), torch.randn(10), torch.randn(4, 4)]  # 7 rows: uneven shards
    placements = [[Shard(0)], [Shard(0)], [Replicate()]]
    for backend in sys.argv[1:]:
        shards = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, pl))
                  for t, pl in zip(full, placements)]
        plain = [torch.nn.Parameter(t.clone()) for t in full]
        ours = pyext.optim.AdamW(shards, lr=1e-2, weight_decay=0.1, amsgrad=True, backend=backend)
        theirs = torch.optim.AdamW(plain, lr=1e-2, weight_decay=0.1, amsgrad=True, foreach=False)
        for _ in range(3):
            grads = [torch.randn_like(t) for t in full]
            for p, g, pl in zip(shards, grads, placements):
                p.grad = distribute_tensor(g, mesh, pl)
            for q, g in zip(plain, grads):
                q.grad = g.clone()
            ours.step()
            theirs.step()
        for p, q in zip(shards, plain):
            torch.testing.assert_close(p.full_tensor(), q.detach())
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                state = ours.state[p][key]
                assert isinstance(state, DTensor) and state.placements == p.placements, key
                torch.testing.assert_close(state.full_tensor(), theirs.state[q][key])

        # FSDP2: fully_shard's parameters are Shard(0) DTensors, its grads reduce-scattered
        from torch.distributed.fsdp import fully_shard
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.GELU(), torch.nn.Linear(5, 3))
        twin = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.GELU(), torch.nn.Linear(5, 3))
        twin.load_state_dict(model.state_dict())
        for layer in (model[0], model[2], model):
            fully_shard(layer, mesh=mesh)
        ours = pyext.optim.AdamW(model.parameters(), lr=1e-2, backend=backend)
        theirs = torch.optim.AdamW(twin.parameters(), lr=1e-2, foreach=False)
        for step in range(3):
            x = torch.randn(4, 7)  # the same on both ranks: FSDP's averaged grads are twin's
            for net, opt in ((model, ours), (twin, theirs)):
                net(x).square().sum().backward()
                opt.step()
                opt.zero_grad()
        for p, q in zip(model.parameters(), twin.parameters()):
            assert isinstance(p, DTensor)
            torch.testing.assert_close(p.full_tensor(), q.detach())
    dist.destroy_process_group()
    print("rank", dist.get_rank() if dist.is_initialized() else os.environ["RANK"], "ok")
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dtensor_and_fsdp2_params_step_their_local_shards_gloo(tmp_path):
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    try:
        import torch.distributed.tensor  # noqa: F401
    except ImportError as e:
        pytest.skip(f"DTensor is not available: {e}")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2",
               TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    script = tmp_path / "worker.py"
    script.write_text(_DTENSOR_WORKER)
    # CPU processes: Triton runs under its interpreter there, GPU or not
    workers = [subprocess.Popen([sys.executable, str(script), "torch", "triton"], env=dict(env, RANK=str(r)),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for r in range(2)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    for w, out in zip(workers, outputs):
        assert w.returncode == 0, out[-4000:]


# ------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_capturable_step_inside_a_cuda_graph(backend):
    """Capture optimizer.step() once, replay it with new grads and a new lr:
    it must track an eager torch AdamW(capturable=True) fed the same."""
    init = [torch.randn(s, device="cuda") for s in SHAPES]
    ours_params, torch_params = _clone_params(init), _clone_params(init)
    lr = torch.tensor(1e-2, device="cuda")
    ours = AdamW(ours_params, lr=lr, amsgrad=True, capturable=True, backend=backend)
    theirs = torch.optim.AdamW(torch_params, lr=1e-2, amsgrad=True, capturable=True, foreach=False)
    for p in ours_params:
        p.grad = torch.zeros_like(p)

    def feed(grads, value):
        for p, q, g in zip(ours_params, torch_params, grads):
            p.grad.copy_(g)
            q.grad = g.clone()
        lr.fill_(value)
        for group in theirs.param_groups:
            group["lr"] = value

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up steps (state, tables, compilation)
        for k in range(3):
            feed([torch.randn_like(t) for t in init], 1e-2 / (k + 1))
            ours.step()
            theirs.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ours.step()
    for k in range(5):
        feed([torch.randn_like(t) for t in init], 3e-3 * (k + 1))
        graph.replay()
        theirs.step()
    torch.cuda.synchronize()
    for p, q in zip(ours_params, torch_params):
        torch.testing.assert_close(p, q)
        torch.testing.assert_close(ours.state[p]["step"], theirs.state[q]["step"])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_whole_iteration_cuda_graph_with_grads_allocated_in_capture(backend):
    """zero_grad(set_to_none) + forward + backward + step captured together:
    the grads are new allocations inside the graph (Triton: its pointer table
    is built during the capture)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(33, 65), torch.nn.GELU(), torch.nn.Linear(65, 7)).cuda()
    twin = torch.nn.Sequential(torch.nn.Linear(33, 65), torch.nn.GELU(), torch.nn.Linear(65, 7)).cuda()
    twin.load_state_dict(model.state_dict())
    ours = AdamW(model.parameters(), lr=torch.tensor(1e-3, device="cuda"), capturable=True, backend=backend)
    theirs = torch.optim.AdamW(twin.parameters(), lr=1e-3, capturable=True, foreach=False)
    x = torch.randn(16, 33, device="cuda")

    def iteration(m, opt):
        opt.zero_grad(set_to_none=True)
        m(x).square().mean().backward()
        opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            iteration(model, ours)
            iteration(twin, theirs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        iteration(model, ours)
    for _ in range(5):
        x.copy_(torch.randn_like(x))
        graph.replay()
        iteration(twin, theirs)
    torch.cuda.synchronize()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.gpu
def test_capture_requires_capturable():
    p = torch.nn.Parameter(torch.randn(3, device="cuda"))
    p.grad = torch.randn_like(p)
    opt = AdamW([p])
    opt.step()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="capturable is False"):
        with torch.cuda.graph(graph):
            opt.step()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_int64_indexing_past_2_31_elements(backend):
    """A bf16 parameter of 2^31 + 5 elements (24 GB with grad and fp32
    moments): the elements at both ends match the reference."""
    n = 2 ** 31 + 5
    p = torch.nn.Parameter(torch.randn(n, device="cuda", dtype=torch.bfloat16))
    p.grad = torch.randn_like(p)
    opt = AdamW([p], lr=1e-2, backend=backend)
    ends = (slice(0, 4099), slice(n - 4099, n))
    expect = []
    for s in ends:
        q = p.detach()[s].float().double()
        m, v = torch.zeros_like(q), torch.zeros_like(q)
        pyext.reference.adamw_step([q], [p.grad[s].double()], [m], [v], [], [torch.tensor(1.0)],
                                   lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=1e-2, eps=1e-8,
                                   amsgrad=False, maximize=False)
        expect.append((q, m, v))
    opt.step()
    for s, (q, m, v) in zip(ends, expect):
        # `pt` here: the float64 result rounded once to the stored dtype
        assert_close(p.detach()[s], q, q.to(torch.bfloat16), "param ends")
        assert_close(opt.state[p]["exp_avg"][s], m, m.float(), "exp_avg ends")
        assert_close(opt.state[p]["exp_avg_sq"][s], v, v.float(), "exp_avg_sq ends")


@pytest.mark.gpu
@pytest.mark.skipif(compute_sanitizer() is None, reason="compute-sanitizer is not on PATH")
def test_cuda_step_under_memcheck():
    code = ("import torch, pyext\n"
            "for dt in (torch.float32, torch.bfloat16):\n"
            "  for ams in (False, True):\n"
            "    ps = [torch.randn(n + 1, device='cuda', dtype=dt)[1:] for n in (1, 7, 4097)]\n"  # misaligned
            "    ps += [torch.randn(n, device='cuda', dtype=dt) for n in (0, 3, 4099, 70000)]\n"
            "    ps = [torch.nn.Parameter(p) for p in ps]\n"
            "    opt = pyext.optim.AdamW(ps, amsgrad=ams, backend='cuda')\n"
            "    for p in ps: p.grad = torch.randn_like(p)\n"
            "    opt.grad_scale = torch.tensor(4.0, device='cuda')\n"
            "    opt.found_inf = torch.tensor(0.0, device='cuda')\n"
            "    opt.step(); del opt.grad_scale, opt.found_inf; opt.step()\n"
            "torch.cuda.synchronize()\n")
    result = run_under_sanitizer("memcheck", code)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
