"""pyext.optim.AdamW against torch.optim.AdamW and a float64 reference."""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pyext
from conftest import BACKENDS, HAS_GPU, assert_close, device_for, run_on_ranks

SHAPES = [(), (1,), (7,), (33, 5), (0,), (1025,)]
OPTIONS = [
    dict(),
    dict(weight_decay=0.1, amsgrad=True),
    dict(maximize=True, betas=(0.8, 0.95), eps=1e-6),
]


def make_params(dtype, device):
    return [torch.randn(s, dtype=torch.float32, device=device).to(dtype) for s in SHAPES]


def run(opt_cls, params, grads_per_step, lr_schedule, **options):
    """Steps `opt_cls` over two param groups, with a changing lr."""
    groups = [{"params": params[:3]}, {"params": params[3:], "lr": 3e-3}]
    opt = opt_cls(groups, lr=1e-2, **options)
    for grads, lr in zip(grads_per_step, lr_schedule):
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.to(p.dtype)
        opt.param_groups[0]["lr"] = lr
        opt.step()
    return opt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(map(str, o)) or "defaults")
def test_steps_match_the_oracle(backend, dtype, options):
    device = device_for(backend)
    steps = 50 if backend == "torch" or HAS_GPU else 6
    start = make_params(dtype, device)
    # gradients in the parameters' dtype, so that the float64 run sees the same values
    grads = [[torch.randn(p.shape, device=device).to(dtype) if (i + j) % 5 else None for j, p in enumerate(start)]
             for i in range(steps)]  # some params have no grad on some steps
    lrs = [1e-2 * (1 - i / (2 * steps)) for i in range(steps)]
    check_steps(backend, dtype, options, start, grads, lrs)


def check_steps(backend, dtype, options, start, grads, lrs, optimizer=None):
    """Steps from the parameters `start` with grads[i] (None: no grad) at
    lrs[i]: the parameters and moments within the rule of the float64 run,
    step counts torch's. `optimizer` (param groups, **options) makes ours
    in place of pyext.optim.AdamW with `backend`."""
    ours = [p.clone() for p in start]
    make = optimizer or (lambda g, **kw: pyext.optim.AdamW(g, backend=backend, **kw))
    opt = run(make, ours, grads, lrs, **options)
    ref = [p.double() for p in start]
    ref_opt = run(lambda g, **kw: pyext.optim.AdamW(g, backend="torch", **kw), ref, grads, lrs, **options)
    # The yardstick: torch.optim.AdamW in the test dtype; but for float16 it
    # keeps the moments in float16, where (1 - beta2) g^2 underflows and eps
    # 1e-8 is 0, and its steps divide by zero. There it is the reference run
    # in float16 (moments in float32), as DESIGN.md section 4 puts the rule.
    if dtype == torch.float16:
        yardstick = lambda g, **kw: pyext.optim.AdamW(g, backend="torch", **kw)  # noqa: E731
    else:
        yardstick = lambda g, **kw: torch.optim.AdamW(g, foreach=False, **kw)  # noqa: E731
    pt = [p.clone() for p in start]
    pt_opt = run(yardstick, pt, grads, lrs, **options)

    # The rule's max error is taken over all parameters together: over a
    # one-element tensor it would compare single roundings, not the kernels.
    def flat(tensors):
        return torch.cat([t.reshape(-1) for t in tensors])

    assert_close(flat(ours), flat(ref), flat(pt), "params")
    if dtype == torch.bfloat16:  # torch keeps bfloat16 moments; the yardstick of ours (float32) is the reference's
        pt = [p.clone() for p in start]
        pt_opt = run(lambda g, **kw: pyext.optim.AdamW(g, backend="torch", **kw), pt, grads, lrs, **options)
    for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if options.get("amsgrad") else ()):
        assert_close(*(flat([o.state[q][key] for q in ps if q in o.state])
                       for o, ps in ((opt, ours), (ref_opt, ref), (pt_opt, pt))), key)
    assert [float(opt.state[q]["step"]) for q in ours if q in opt.state] == \
        [float(pt_opt.state[q]["step"]) for q in pt if q in pt_opt.state]


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_moments_take_one_minus_beta_as_exactly_as_float32_holds_it(backend):
    """1 - beta2 worked out in float32 from beta2 = 0.9999 as a float32 is
    1.7e-4 off (0.999: 1.3e-5), and so is every new term of the second
    moment: gradients of 1e3 show it past the rule. (The interpreter takes
    float arguments as float32 too: conftest.)"""
    device = device_for(backend)
    start = make_params(torch.float32, device)
    grads = [[1e3 * torch.randn(p.shape, device=device) for p in start] for _ in range(3)]
    check_steps(backend, torch.float32, dict(betas=(0.99, 0.9999)), start, grads, [1e-2] * 3)


def check_moments_rounded_once(make, device, betas):
    """Two steps of make([p], betas=betas, weight_decay=0) on 10,000 float32
    parameters; the second step's moments against that same step worked in
    float64 from the kernel's own first-step state and rounded: within half
    an ulp. In float32 the update is three or four roundings (two with an
    fma): over 10,000 elements some come out a whole ulp off, where torch's
    lerp_ / addcmul_ rarely do, and the moments then fail the rule now and
    then (adamw_fuzz: gradients of 1e2-1e4)."""
    p = torch.randn(10_000, device=device)
    opt = make([p], betas=betas, weight_decay=0.0)
    grads = [torch.randn(p.shape, device=device) * 10.0 ** torch.randint(-2, 5, p.shape, device=device)
             for _ in range(2)]
    p.grad = grads[0]
    opt.step()
    state = opt.state[p]
    m, v = state["exp_avg"].double(), state["exp_avg_sq"].double()
    p.grad = grads[1]
    opt.step()
    g = grads[1].double()
    b1, b2 = betas
    for name, exact in (("exp_avg", b1 * m + (1 - b1) * g), ("exp_avg_sq", b2 * v + (1 - b2) * g * g)):
        got = state[name].double()
        r = exact.float()
        # half the larger spacing either side of the rounded value (a power of two has two)
        up = torch.nextafter(r.abs(), torch.tensor(float("inf"), device=device)) - r.abs()
        down = r.abs() - torch.nextafter(r.abs(), torch.tensor(0.0, device=device))
        bound = 0.5 * torch.maximum(up, down).double() * (1 + 2.0 ** -20)
        worst = ((got - exact).abs() / bound).max().item()
        assert worst <= 1, f"{name}: {worst:.3f} half-ulps off the float64 update rounded once"


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.5, 0.5)], ids=str)
def test_moments_are_rounded_once(backend, betas):
    check_moments_rounded_once(lambda g, **kw: pyext.optim.AdamW(g, backend=backend, **kw), device_for(backend),
                               betas)


def decay_alone(device, lrs):
    """Parameters of 1e4 and a step of zero gradients at each of lrs: each
    step is p * (1 - lr * weight_decay) alone."""
    start = [1e4 * torch.randn(4096, device=device)]
    return start, [[torch.zeros(4096, device=device)] for _ in lrs], lrs


# (weight decay, lrs) whose factors 1 - lr * weight_decay float32 gets wrong: 1 - 80 * 0.01 rounds to
# 0.20000005 (no fma), 2.4e-7 off where float64 rounded once is 1.5e-8 off; lr 10 decaying to 1.67, three
# times, at weight decay 1 (factors -9 to -0.67), through lrs no float32 holds (8.333..., 4e-8 off as one)
DECAYS = {"factor": (0.01, [80.0] * 4), "lr": (1.0, [10 * (1 - i / 6) for i in range(6)] * 3)}


@pytest.mark.parametrize("case", DECAYS)
@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_weight_decay_factor_is_rounded_once(backend, case):
    """1 - lr * weight_decay worked out from lr and weight_decay in float64
    and rounded once, as torch's Python floats are: every step multiplies the
    parameters by it (decay_alone)."""
    weight_decay, lrs = DECAYS[case]
    check_steps(backend, torch.float32, dict(weight_decay=weight_decay), *decay_alone(device_for(backend), lrs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_corrections_keep_their_digits_in_the_first_steps(backend):
    """1 - 0.999^t is 0.001 at t = 1: worked out in float32 it keeps about four
    digits, and at a large lr the update shows it (about 6e-5 at lr 10)."""
    device = device_for(backend)
    start = torch.randn(4096, device=device)
    grads = [torch.randn(4096, device=device) for _ in range(3)]

    def train(make, dtype):
        p = start.to(dtype, copy=True)
        opt = make([p])
        for g in grads:
            p.grad = g.to(dtype)
            opt.step()
        return p

    ours = train(lambda ps: pyext.optim.AdamW(ps, lr=10.0, weight_decay=0.0, backend=backend), torch.float32)
    ref = train(lambda ps: pyext.optim.AdamW(ps, lr=10.0, weight_decay=0.0, backend="torch"), torch.float64)
    pt = train(lambda ps: torch.optim.AdamW(ps, lr=10.0, weight_decay=0.0, foreach=False), torch.float32)
    assert_close(ours, ref, pt, "params")


def laid_out(value: torch.Tensor, layout: str) -> torch.Tensor:
    """`value` in a memory layout: "contiguous", "strided" (every other element
    of a wider tensor: not dense), "transposed" or "channels_last" (dense,
    other strides)."""
    if layout == "strided":
        wide = torch.zeros(*value.shape[:-1], 2 * value.shape[-1], dtype=value.dtype, device=value.device)
        wide[..., ::2] = value
        return wide[..., ::2]
    if layout == "transposed":
        return value.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "channels_last":
        return value.contiguous(memory_format=torch.channels_last)
    return value.clone()


# (shape, parameter layout, gradient layout)
LAYOUTS = [((6, 8), "strided", "contiguous"), ((6, 8), "strided", "strided"),
           ((5, 9), "transposed", "contiguous"), ((5, 9), "transposed", "transposed"),
           ((2, 3, 4, 5), "channels_last", "channels_last"), ((2, 3, 4, 5), "contiguous", "channels_last"),
           ((7, 3), "contiguous", "strided")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_non_contiguous_parameters_and_gradients(backend, amsgrad):
    """Every layout autograd or a user can give a parameter and its gradient,
    stepped as torch.optim.AdamW steps them (the kernels step contiguous
    copies of what is not contiguous)."""
    device = device_for(backend)
    values = [torch.randn(shape, device=device) for shape, _, _ in LAYOUTS]
    grads = [[torch.randn(v.shape, device=device) for v in values] for _ in range(3)]

    def train(opt_cls, dtype):
        params = [laid_out(v.to(dtype), layout) for v, (_, layout, _) in zip(values, LAYOUTS)]
        opt = opt_cls(params, lr=0.1, weight_decay=0.1, amsgrad=amsgrad)
        for step in grads:
            for p, g, (_, _, layout) in zip(params, step, LAYOUTS):
                p.grad = laid_out(g.to(dtype), layout)
            opt.step()
        assert [p.stride() for p in params] == [laid_out(v, layout).stride()
                                                for v, (_, layout, _) in zip(values, LAYOUTS)]
        return torch.cat([p.reshape(-1) for p in params])

    ours = train(lambda ps, **kw: pyext.optim.AdamW(ps, backend=backend, **kw), torch.float32)
    ref = train(lambda ps, **kw: pyext.optim.AdamW(ps, backend="torch", **kw), torch.float64)
    pt = train(lambda ps, **kw: torch.optim.AdamW(ps, foreach=False, **kw), torch.float32)
    assert_close(ours, ref, pt, "params")


class _StepOpInputs(TorchDispatchMode):
    """The storages of the tensors each pyext AdamW step op is given."""

    def __init__(self):
        super().__init__()
        self.storages = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name().startswith("pyext::adamw_step"):
            self.storages.append({t.untyped_storage().data_ptr() for ts in args[:4] for t in ts})
        return func(*args, **(kwargs or {}))


def test_a_channels_last_parameter_is_stepped_in_place_not_through_copies():
    """A conv weight in channels_last, its grad and moments (zeros_like keeps
    the layout, as torch's AdamW makes them) share one dense layout: the
    kernels step that memory as it is, element by element, where they
    stepped contiguous copies of all four and wrote three back each step
    (four times the parameter's bytes a step; torch's fused AdamW makes
    none). The values: test_non_contiguous_parameters_and_gradients."""
    device = device_for("triton")
    p = torch.nn.Parameter(torch.randn(8, 3, 5, 5, device=device).contiguous(memory_format=torch.channels_last))
    p.grad = torch.randn(p.shape, device=device).contiguous(memory_format=torch.channels_last)
    opt = pyext.optim.AdamW([p], backend="triton")
    seen = _StepOpInputs()
    with seen:
        opt.step()
        opt.step()
    state = opt.state[p]
    own = {t.untyped_storage().data_ptr() for t in (p, p.grad, state["exp_avg"], state["exp_avg_sq"])}
    assert seen.storages == [own, own]


@pytest.mark.parametrize("layout", ["strided", "transposed"])
def test_triton_op_refuses_tensors_it_cannot_step_as_flat_memory(layout):
    device = device_for("triton")
    p = laid_out(torch.randn(4, 6, device=device), layout)
    g, m, v = (torch.zeros(4, 6, device=device) for _ in range(3))
    with pytest.raises(RuntimeError, match=r"params\[0\] must be contiguous"):
        torch.ops.pyext.adamw_step_triton([p], [g], [m], [v], [], torch.ones(1, device=device), 1e-3, None,
                                          0.9, 0.999, 1e-8, 0.0, False, False, None, None)
    with pytest.raises(RuntimeError, match=r"grads\[0\] must be contiguous"):
        torch.ops.pyext.adamw_step_triton([g], [p], [m], [v], [], torch.ones(1, device=device), 1e-3, None,
                                          0.9, 0.999, 1e-8, 0.0, False, False, None, None)


def check_state_moves_and_training_continues(backend, first, move):
    """Three steps with one optimizer (`first`'s kind), `move(model, before,
    make_other)` handing its state to a fresh one of the other kind, three
    more steps: the same parameters as six steps of torch's AdamW, under the
    rule (reference: six steps of the float64 reference)."""
    device = device_for(backend)
    start = make_params(torch.float32, device)
    grads = [[torch.randn(p.shape, device=device) for p in start] for _ in range(6)]
    make = {"torch": lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True, foreach=False),
            "pyext": lambda ps: pyext.optim.AdamW(ps, lr=1e-2, amsgrad=True, backend=backend)}
    second = "pyext" if first == "torch" else "torch"

    def train(opt, params, steps):
        for grad in steps:
            for p, g in zip(params, grad):
                p.grad = g.to(p.dtype)
            opt.step()

    model = torch.nn.ParameterList([torch.nn.Parameter(p.clone()) for p in start])
    moved = list(model.parameters())
    before = make[first](moved)
    train(before, moved, grads[:3])
    train(move(model, before, make[second]), moved, grads[3:])

    pt = [p.clone() for p in start]
    train(make["torch"](pt), pt, grads)
    ref = [p.double() for p in start]
    train(pyext.optim.AdamW(ref, lr=1e-2, amsgrad=True, backend="torch"), ref, grads)
    flat = lambda ts: torch.cat([t.detach().reshape(-1) for t in ts])  # noqa: E731
    assert_close(flat(moved), flat(ref), flat(pt), "params")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("first", ["torch", "pyext"])
def test_state_dict_moves_between_torch_and_pyext_and_training_continues(backend, first):
    def move(model, before, make_other):
        after = make_other(model.parameters())
        after.load_state_dict(before.state_dict())
        assert all(isinstance(after.state[p]["step"], torch.Tensor) for p in model.parameters())
        return after
    check_state_moves_and_training_continues(backend, first, move)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("first", ["torch", "pyext"])
def test_distributed_checkpoint_moves_state_between_torch_and_pyext(backend, first):
    """torch.distributed.checkpoint's optimizer state dicts, keyed by
    parameter name (how FSDP2 jobs checkpoint): the state saved (a copy, as a
    checkpoint on disk holds) and set into a fresh optimizer of the other
    kind, which DCP first steps at lr 0 with zero gradients to make its state
    (no parameter may move, weight decay included)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    def move(model, before, make_other):
        saved = copy.deepcopy(get_optimizer_state_dict(model, before))
        for p in model.parameters():
            p.grad = None
        after = make_other(model.parameters())
        set_optimizer_state_dict(model, after, saved)
        return after
    check_state_moves_and_training_continues(backend, first, move)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_of_torch_half_parameters_loads_as_this_optimizer_keeps_it(backend):
    """torch.optim.AdamW keeps bfloat16 moments for bfloat16 parameters and
    (unfused) its step on the CPU; loaded here the moments are float32 and
    the step a float32 tensor on the parameter's device, and it steps on as a
    freshly made optimizer would from those values."""
    device = device_for(backend)
    params = [p.bfloat16() for p in make_params(torch.float32, device)]
    for p in params:
        p.grad = torch.randn_like(p)
    torch_opt = torch.optim.AdamW(params, lr=1e-2, amsgrad=True, foreach=False)
    torch_opt.step()
    ours = pyext.optim.AdamW(params, lr=1e-2, amsgrad=True, backend=backend)
    ours.load_state_dict(torch_opt.state_dict())
    for p in params:
        state = ours.state[p]
        assert state["step"].device == p.device and state["step"].dtype == torch.float32
        assert {state[k].dtype for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")} == {torch.float32}
        assert all(state[k].shape == p.shape for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"))
    ours.step()
    assert [float(ours.state[p]["step"]) for p in params] == [2.0] * len(params)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_checkpoint_of_half_parameters_resumes_exactly(backend, dtype):
    """This optimizer's own state_dict, saved and loaded into a new one (a
    checkpoint resumed by HF Trainer, accelerate, Lightning, DCP): the
    float32 moments of half parameters come back bit for bit (torch's load
    casts them to the parameter's dtype), and training goes on as if never
    stopped, as torch.optim.AdamW's resumes."""
    import io
    device = device_for(backend)
    start = [p.to(dtype) for p in make_params(torch.float32, device)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(4)]

    def train(resume_after=None):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = pyext.optim.AdamW(params, lr=1e-2, amsgrad=True, backend=backend)
        for i, step_grads in enumerate(grads):
            for p, g in zip(params, step_grads):
                p.grad = g
            opt.step()
            if i == resume_after:
                buffer = io.BytesIO()
                torch.save(opt.state_dict(), buffer)
                buffer.seek(0)
                saved = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in params}
                opt = pyext.optim.AdamW(params, lr=1e-2, amsgrad=True, backend=backend)
                opt.load_state_dict(torch.load(buffer, weights_only=True))
                assert all(torch.equal(opt.state[p][k], v) for p in params for k, v in saved[p].items())
        return params
    assert all(torch.equal(a, b) for a, b in zip(train(), train(resume_after=1)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("copier", ["deepcopy", "pickle", "torch.save"])
def test_a_copied_optimizer_steps_on_with_its_backend(backend, copier):
    """copy.deepcopy, pickle and torch.save / torch.load of the optimizer
    (with its model, as training scripts checkpoint them) keep its backend
    (torch's Optimizer pickles only defaults, state and param_groups) and
    step on as the original does."""
    import io
    import pickle
    device = device_for(backend)
    model = torch.nn.ParameterList([torch.nn.Parameter(p) for p in make_params(torch.float32, device)])
    opt = pyext.optim.AdamW(model.parameters(), lr=1e-2, backend=backend)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()

    def saved_and_loaded(both):
        buffer = io.BytesIO()
        torch.save(both, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)
    copy_of = {"deepcopy": copy.deepcopy, "pickle": lambda both: pickle.loads(pickle.dumps(both)),
               "torch.save": saved_and_loaded}[copier]
    copied_model, copied = copy_of((model, opt))
    assert copied.backend == backend and copied.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    for p, q in zip(model.parameters(), copied_model.parameters()):
        q.grad = p.grad.clone()
    opt.step()
    copied.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), copied_model.parameters()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_state_dict_of_an_older_torch_loads_as_torch_loads_it(backend):
    """torch before 1.12 saved the step as a number, and its param groups
    lack the options added since (maximize, foreach, capturable,
    differentiable, fused, decoupled_weight_decay): loaded here, as
    torch.optim.AdamW loads it, it steps on as the same state saved today."""
    device = device_for(backend)
    params = make_params(torch.float32, device)
    for p in params:
        p.grad = torch.randn_like(p)
    torch_opt = torch.optim.AdamW(params, lr=1e-2)
    torch_opt.step()
    today = torch_opt.state_dict()
    old = copy.deepcopy(today)
    for state in old["state"].values():
        state["step"] = int(state["step"])
    for group in old["param_groups"]:
        for key in ("maximize", "foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay"):
            del group[key]
    results = []
    for state_dict in (today, old):
        start = [p.detach().clone() for p in params]
        for p, s in zip(start, params):
            p.grad = s.grad
        ours = pyext.optim.AdamW(start, lr=1e-2, backend=backend)
        ours.load_state_dict(state_dict)
        ours.step()
        results.append((start, ours.state_dict()))
    (today_params, today_state), (old_params, old_state) = results
    assert all(torch.equal(a, b) for a, b in zip(today_params, old_params))
    assert old_state["param_groups"] == today_state["param_groups"]
    assert all(old_state["state"][i]["step"].dtype == torch.float32 for i in old_state["state"])


def test_differentiable_param_groups_are_refused_however_they_come():
    """differentiable=True, which this optimizer cannot honour, raises
    whether it is the constructor's, a param group's (given to the
    constructor or to add_param_group) or a loaded state_dict's."""
    p, q = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    with pytest.raises(RuntimeError, match="differentiable"):
        pyext.optim.AdamW([{"params": [p], "differentiable": True}])
    opt = pyext.optim.AdamW([p])
    with pytest.raises(RuntimeError, match="differentiable"):
        opt.add_param_group({"params": [q], "differentiable": True})
    with pytest.raises(RuntimeError, match="differentiable"):
        opt.load_state_dict(torch.optim.AdamW([p], differentiable=True).state_dict())
    assert len(opt.param_groups) == 1 and not opt.param_groups[0]["differentiable"]


def test_triton_steps_each_dtype_group_in_one_launch(monkeypatch):
    """Not a launch per tensor: one per (device, dtype) of a param group,
    however many tensors that holds."""
    from pyext.triton_kernels import adamw as kernels
    launches, kernel = [], kernels._adamw_kernel

    class CountLaunches:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]
    monkeypatch.setattr(kernels, "_adamw_kernel", CountLaunches())
    device = device_for("triton")
    params = make_params(torch.float32, device) + make_params(torch.bfloat16, device)
    for p in params:
        p.grad = torch.randn_like(p)
    pyext.optim.AdamW(params, backend="triton").step()
    assert len(launches) == 2


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "under-a-dispatch-mode"])
def test_triton_step_bumps_the_version_of_what_it_writes(traced):
    """Eager, the optimizer calls the Triton op's body without the op's
    dispatch (its cost per tensor); it must still tell autograd what changed
    (not the grads, which only a GradScaler's step writes), and under a
    dispatch mode (a tracer, a FLOP counter) go through the op, whose schema
    declares the grads written, as torch's _fused_adamw_ declares them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class SeenOps(TorchDispatchMode):
        ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))
    device = device_for("triton")
    params = [torch.nn.Parameter(torch.randn(5, device=device)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = pyext.optim.AdamW(params, amsgrad=True, backend="triton")
    opt.step()
    written = params + [opt.state[p][k] for p in params for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")]
    versions = [t._version for t in written]
    grad_versions = [p.grad._version for p in params]
    if traced:
        with SeenOps():
            opt.step()
        assert torch.ops.pyext.adamw_step_triton.default in SeenOps.ops
    else:
        opt.step()
    assert all(t._version > v for t, v in zip(written, versions))
    assert all((g._version > v) == traced for g, v in zip([p.grad for p in params], grad_versions))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_step_matches_the_eager_step(backend):
    """torch.compile(opt.step, fullgraph=True): the kernel runs as the
    registered op inside one graph (the eager shortcut is not taken while compiling), the same
    bits; the reference backend's torch ops Inductor may fuse and reorder."""
    device = device_for(backend)
    start = [torch.randn(s, device=device) for s in ((5,), (3, 4), (0,))]
    grads = [[torch.randn_like(p) for p in start] for _ in range(3)]
    eager, compiled = ([torch.nn.Parameter(p.clone()) for p in start] for _ in range(2))
    opts = [pyext.optim.AdamW(ps, weight_decay=0.1, backend=backend) for ps in (eager, compiled)]
    step = torch.compile(opts[1].step, fullgraph=True)
    for grad in grads:
        for ps in (eager, compiled):
            for p, g in zip(ps, grad):
                p.grad = g.clone()
        opts[0].step()
        step()
    exact = dict(rtol=0, atol=0) if backend != "torch" else {}
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, **exact)


def test_a_compiled_step_under_an_lr_scheduler_is_one_graph():
    """torch.compile(opt.step) with a scheduler setting a new float lr each
    step: one graph after the first, as torch's AdamW gives (the lr went to
    the kernel as a float, a constant of the graph: one graph a step until
    the recompile limit), and the eager step's bits."""
    from torch._dynamo.utils import counters
    device = device_for("triton")
    eager, compiled = ([torch.nn.Parameter(torch.ones(5, device=device))] for _ in range(2))
    opts = [pyext.optim.AdamW(ps, lr=1e-2, backend="triton") for ps in (eager, compiled)]
    schedulers = [torch.optim.lr_scheduler.ExponentialLR(opt, 0.9) for opt in opts]
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(opts[1].step, backend="aot_eager")
    for _ in range(5):
        grad = torch.randn(5, device=device)
        eager[0].grad, compiled[0].grad = grad.clone(), grad.clone()
        opts[0].step()
        step()
        for scheduler in schedulers:
            scheduler.step()
    assert counters["stats"]["unique_graphs"] <= 2
    torch.testing.assert_close(compiled[0], eager[0], rtol=0, atol=0)


@pytest.mark.parametrize("wrong", ["moment dtype", "moment size", "grad dtype", "moment count"])
def test_triton_op_names_the_tensor_it_refuses(wrong):
    device = device_for("triton")
    p, g, m, v = (torch.zeros(4, 6, device=device) for _ in range(4))
    if wrong == "moment dtype":
        v, match = v.half(), r"exp_avg_sqs\[0\] must be torch.float32"
    elif wrong == "moment size":
        m, match = torch.zeros(25, device=device), r"exp_avgs\[0\] must be contiguous with params\[0\]'s 24"
    elif wrong == "grad dtype":
        g, match = g.bfloat16(), r"grads\[0\] must be torch.float32 on .*, got torch.bfloat16"
    else:
        m, match = [m, m], "exp_avgs has 2 tensors but params has 1"
    m = m if isinstance(m, list) else [m]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.pyext.adamw_step_triton([p], [g], m, [v], [], torch.ones(1, device=device), 1e-3, None,
                                          0.9, 0.999, 1e-8, 0.0, False, False, None, None)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "learning rate"), (dict(eps=-1e-8), "epsilon"), (dict(betas=(1.0, 0.9)), "index 0"),
    (dict(betas=(0.9, -0.1)), "index 1"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(betas=(0.9, torch.tensor(0.99))), "both floats or both Tensors"),
    (dict(betas=(torch.tensor(0.9), torch.tensor(0.99)), foreach=True), "capturable=False and foreach=True"),
    (dict(lr=torch.tensor(1e-3), foreach=True), "capturable=False and foreach=True"),
    (dict(lr=torch.tensor([1e-3, 1e-3])), "1-element"),
])
def test_constructor_validation_matches_torch(kwargs, match):
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match=match):
        torch.optim.AdamW(p, **kwargs)
    with pytest.raises(ValueError, match=match):
        pyext.optim.AdamW(p, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_lr_and_betas_step_as_their_values(backend):
    """torch's AdamW takes lr and betas as 1-element tensors (schedulers that
    keep them on a device); the steps are those of the same floats."""
    device = device_for(backend)
    start = make_params(torch.float32, device)
    grads = [[torch.randn(p.shape, device=device) for p in start] for _ in range(3)]
    lrs = [1e-2, 5e-3, 1e-3]

    def stepped(lr, betas):
        params = [p.clone() for p in start]
        run(lambda g, **kw: pyext.optim.AdamW(g, backend=backend, betas=betas, **kw), params, grads,
            [lr * x for x in lrs] if isinstance(lr, float) else [lr.new_tensor(x) for x in lrs])
        return params
    floats = stepped(1.0, (0.8, 0.95))
    f64 = dict(dtype=torch.float64)  # holding the floats' exact values
    tensors = stepped(torch.tensor(1.0, device=device, **f64), (torch.tensor([0.8], **f64), torch.tensor(0.95, **f64)))
    for a, b in zip(floats, tensors):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(map(str, o)) or "defaults")
def test_complex_parameters_step_as_their_real_views(backend, options):
    """torch.optim.AdamW steps a complex parameter as its real view (the real
    and imaginary parts two parameters, not |g|^2 in the second moment):
    within the rule of torch's own step in complex128, its complex64 step the
    yardstick; the moments complex, as torch keeps them."""
    device = device_for(backend)
    start = [torch.randn(s, dtype=torch.complex64, device=device) for s in [(7,), (33, 5)]]
    grads = [[torch.randn(p.shape, dtype=p.dtype, device=device) for p in start] for _ in range(6)]

    def stepped(make, dtype):
        params = [p.to(dtype, copy=True) for p in start]
        opt = make(params, lr=1e-2, **options)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.to(dtype)
            opt.step()
        return (torch.cat([torch.view_as_real(t).reshape(-1) for t in ts])
                for ts in (params, [opt.state[p]["exp_avg"] for p in params]))

    ours = stepped(lambda g, **kw: pyext.optim.AdamW(g, backend=backend, **kw), torch.complex64)
    ref = stepped(lambda g, **kw: torch.optim.AdamW(g, foreach=False, **kw), torch.complex128)
    pt = stepped(lambda g, **kw: torch.optim.AdamW(g, foreach=False, **kw), torch.complex64)
    for name, (o, r, y) in zip(("params", "exp_avg"), zip(ours, ref, pt)):
        assert_close(o, r, y, name)


def test_a_parameter_dtype_the_kernels_lack_is_named_by_the_triton_backend():
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.float64, device=device_for("triton")))
    p.grad = torch.ones_like(p)
    with pytest.raises(pyext.BackendUnavailable, match="parameter dtype torch.float64 is not supported"):
        pyext.optim.AdamW([p], backend="triton").step()


def test_a_backend_not_known_is_a_value_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        pyext.optim.AdamW([torch.nn.Parameter(torch.randn(3))], backend="cudnn")


def test_param_groups_hold_torchs_keys():
    p = [torch.nn.Parameter(torch.randn(3))]
    assert set(pyext.optim.AdamW(p).param_groups[0]) == set(torch.optim.AdamW(p).param_groups[0])


@pytest.mark.parametrize("kwargs", [dict(fused=True), dict(foreach=True), dict(fused=False, foreach=False)])
def test_torchs_implementation_flags_are_accepted_and_kept(kwargs):
    """A drop-in for torch.optim.AdamW(..., fused=True) and the like: the
    flags are kept in the param groups as torch keeps them."""
    p = [torch.nn.Parameter(torch.randn(3))]
    ours, theirs = pyext.optim.AdamW(p, **kwargs), torch.optim.AdamW(p, **kwargs)
    assert {k: ours.param_groups[0][k] for k in ("fused", "foreach")} == \
        {k: theirs.param_groups[0][k] for k in ("fused", "foreach")}


@pytest.mark.parametrize("kwargs,match", [(dict(fused=True, foreach=True), "cannot be `True` together"),
                                          (dict(differentiable=True), "differentiable")])
def test_flags_that_cannot_be_honoured_raise(kwargs, match):
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(RuntimeError, match=match):
        pyext.optim.AdamW(p, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_without_parameters_or_gradients_step_as_nothing(backend):
    """A param group with no parameters, and one whose parameters have no
    gradient this step: torch's AdamW steps neither, and neither do we."""
    device = device_for(backend)
    a, b = torch.randn(5, device=device), torch.randn(3, device=device)
    opt = pyext.optim.AdamW([{"params": [a]}, {"params": []}, {"params": [b]}], backend=backend)
    a.grad = torch.randn_like(a)
    before = b.clone()
    opt.step()
    assert torch.equal(b, before) and b not in opt.state and a in opt.state


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_evaluates_a_closure_with_autograd_on_and_returns_its_loss(backend):
    """optimizer.step(closure), as torch's: the closure recomputes the loss
    and its gradients (autograd on, though step runs under no_grad) before
    the update, and step returns that loss."""
    device = device_for(backend)
    start = torch.randn(7, device=device)
    results = []
    for make in (lambda p: torch.optim.AdamW([p], lr=0.1), lambda p: pyext.optim.AdamW([p], lr=0.1, backend=backend)):
        p = start.clone().requires_grad_()
        opt = make(p)

        def closure():
            opt.zero_grad()
            loss = (p * p).sum()
            loss.backward()
            return loss
        losses = [opt.step(closure) for _ in range(3)]
        results.append((p.detach(), torch.stack(losses)))
    (p_theirs, losses_theirs), (p_ours, losses_ours) = results
    assert losses_ours.requires_grad
    torch.testing.assert_close(losses_ours, losses_theirs)
    torch.testing.assert_close(p_ours, p_theirs)


def test_empty_parameter_list_is_torchs_error():
    with pytest.raises(ValueError, match="empty"):
        pyext.optim.AdamW([])


def test_sparse_gradients_are_rejected():
    p = torch.nn.Parameter(torch.randn(4, 3))
    p.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        pyext.optim.AdamW([p]).step()


def test_named_cuda_backend_on_cpu_tensors_says_why():
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    with pytest.raises(pyext.BackendUnavailable, match="cuda"):
        pyext.optim.AdamW([p], backend="cuda").step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused", [None, True])
def test_grad_scaler_skips_a_step_with_inf_and_unscales_the_others(backend, fused):
    """torch.amp.GradScaler, which with fused=True hands the optimizer its
    scale and found_inf (as torch's fused AdamW), and otherwise unscales
    and skips itself: the step with an inf gradient changes nothing and is
    not counted, the others equal torch's AdamW run on the unscaled
    gradients (reference: the same in float64) and leave the gradients
    unscaled, as torch's does."""
    check_grad_scaler(lambda ps: pyext.optim.AdamW(ps, lr=1e-2, fused=fused, backend=backend), device_for(backend))


@pytest.mark.parametrize("fused", [None, False, True])
def test_the_step_handles_amp_scaling_where_torchs_does(fused):
    """Whether GradScaler hands the step its scale (`_step_supports_amp_scaling`)
    is torch.optim.AdamW's answer: only with fused=True. Lightning reads it,
    and refuses to clip gradients under mixed precision where it is set:
    set always, a drop-in for the plain AdamW could not clip."""
    params = [torch.nn.Parameter(torch.randn(3))]
    ours, theirs = pyext.optim.AdamW(params, fused=fused), torch.optim.AdamW(params, fused=fused)
    assert getattr(ours, "_step_supports_amp_scaling", False) == getattr(theirs, "_step_supports_amp_scaling", False)


def check_grad_scaler(make_ours, device):
    """The GradScaler test's body; make_ours(params) gives our optimizer at lr 1e-2."""
    torch.manual_seed(0)
    start = torch.nn.Linear(8, 8).to(device)
    inputs = [torch.randn(4, 8, device=device) for _ in range(4)]

    def train(make_opt, dtype):
        model = copy.deepcopy(start).to(dtype)
        opt, scaler = make_opt(model.parameters()), torch.amp.GradScaler(device.type, init_scale=1024.0)
        for i, x in enumerate(inputs):
            opt.zero_grad()
            scaler.scale(model(x.to(dtype)).square().sum()).backward()
            before = [p.detach().clone() for p in model.parameters()]
            if i == 1:
                model.weight.grad[0, 0] = float("inf")
            scale, scaled = scaler.get_scale(), [p.grad.clone() for p in model.parameters()]
            scaler.step(opt)
            scaler.update()
            assert i == 1 or all(torch.equal(p.grad, g / scale) for p, g in zip(model.parameters(), scaled))
            assert (i == 1) == all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        assert [float(opt.state[p]["step"]) for p in model.parameters()] == [len(inputs) - 1] * 2
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    ours = train(make_ours, torch.float32)
    ref = train(lambda ps: pyext.optim.AdamW(ps, lr=1e-2, backend="torch"), torch.float64)
    pt = train(lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False), torch.float32)
    assert_close(ours, ref, pt, "params")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_a_scaled_step_leaves_the_gradients_unscaled(backend, dtype):
    """A step given GradScaler's grad_scale divides the gradients by it in
    place (in their dtype: exact for a power of two), a transposed one (the
    kernels step a contiguous copy) too, as torch's fused AdamW does; a
    skipped step (found_inf) leaves them as they were."""
    check_scaled_step_unscales(lambda ps: pyext.optim.AdamW(ps, backend=backend), device_for(backend), dtype)


def check_scaled_step_unscales(make_opt, device, dtype):
    """The scaled-step test's body; make_opt(params) gives our optimizer."""
    params = [torch.nn.Parameter(torch.randn(4, 6, device=device, dtype=dtype)),
              torch.nn.Parameter(torch.randn(6, 4, device=device, dtype=dtype).t())]
    scaled = [torch.randn_like(p) * 1024 for p in params]
    for p, g in zip(params, scaled):
        p.grad = g.clone()
    opt = make_opt(params)
    opt.grad_scale, opt.found_inf = torch.tensor([1024.0], device=device), torch.ones(1, device=device)
    opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(params, scaled))
    opt.found_inf.zero_()
    opt.step()
    assert all(torch.equal(p.grad, g / 1024) for p, g in zip(params, scaled))
    assert not params[1].grad.is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_skipped_step_is_not_counted_whatever_found_inf_sums_to(backend):
    """GradScaler hands the optimizer found_inf summed over the devices that
    hold gradients: 2.0 when two saw an inf. The step is skipped and its count
    stays where it was."""
    device = device_for(backend)
    p = torch.nn.Parameter(torch.randn(5, device=device))
    p.grad = torch.randn_like(p)
    opt = pyext.optim.AdamW([p], backend=backend)
    opt.step()
    before = p.detach().clone()
    opt.found_inf = torch.tensor([2.0], device=device)
    opt.step()
    del opt.found_inf
    assert torch.equal(p.detach(), before)
    assert float(opt.state[p]["step"]) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_grad_scaler_step_does_not_wait_for_the_gpu(backend):
    """With GradScaler and fused=True the kernels read found_inf on the
    device, as torch's fused AdamW does: no step synchronises the host with the GPU, skipped
    (an inf gradient) or not."""
    model = torch.nn.Linear(64, 64, device="cuda")
    opt, scaler = pyext.optim.AdamW(model.parameters(), fused=True, backend=backend), torch.amp.GradScaler("cuda")
    x = torch.randn(8, 64, device="cuda")
    for i in range(3):  # the first step makes the state and the launch tables
        opt.zero_grad()
        scaler.scale(model(x).square().sum()).backward()
        if i == 2:
            model.weight.grad[0, 0] = float("inf")
        torch.cuda.set_sync_debug_mode("error" if i else "default")
        try:
            scaler.step(opt)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        scaler.update()
    assert [float(opt.state[p]["step"]) for p in model.parameters()] == [2.0, 2.0]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_capturable_step_replays_in_a_cuda_graph(backend):
    params = [torch.randn(257, device="cuda"), torch.randn(3, 5, device="cuda")]
    expected = [p.clone() for p in params]
    grads = [torch.randn_like(p) for p in params]
    for p, e, g in zip(params, expected, grads):
        p.grad, e.grad = g, g.clone()
    lr = torch.tensor(1e-2, device="cuda")
    opt = pyext.optim.AdamW(params, lr=lr, capturable=True, backend=backend)
    ref = torch.optim.AdamW(expected, lr=1e-2, capturable=True)
    opt.step()
    ref.step()  # warm-up outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for _ in range(3):
        graph.replay()
        ref.step()
    for p, e in zip(params, expected):
        torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("scaler", [False, True])
def test_opcheck(backend, scaler):
    device = device_for(backend)
    params = [torch.randn(s, device=device) for s in [(5,), (3, 4)]]
    grad_scale, found_inf = (torch.full((1,), 2.0, device=device), torch.zeros(1, device=device)) if scaler \
        else (None, None)
    args = (params, [torch.randn_like(p) for p in params], [torch.randn_like(p) for p in params],
            [torch.rand_like(p) for p in params], [torch.rand_like(p) for p in params],
            torch.tensor([3.0, 3.0], device=device), 1e-2, None, 0.9, 0.99, 1e-8, 0.1, True, False,
            grad_scale, found_inf)
    torch.library.opcheck(getattr(torch.ops.pyext, f"adamw_step_{backend}"), args)


def at_offset(t, offset):
    """t's values in a view that starts `offset` elements into a buffer of its
    own (offset 1: no 16-byte alignment, so the kernels' scalar path)."""
    return torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)[offset:].copy_(t)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
def test_many_tensors_and_long_ones_across_launches(backend, dtype, offset):
    """More tensors than one launch takes, and one longer than a launch's blocks."""
    sizes = [1, 65536, 65537, 3, 320 * 65536 + 5] + [1000 + 37 * i for i in range(60)]
    start = [torch.randn(n, device="cuda").to(dtype) for n in sizes]
    grads = [[torch.randn(n, device="cuda") for n in sizes] for _ in range(3)]
    ours, ref, pt = [at_offset(p, offset) for p in start], [p.double() for p in start], [p.clone() for p in start]
    opts = [pyext.optim.AdamW(ours, backend=backend, amsgrad=True),
            pyext.optim.AdamW(ref, backend="torch", amsgrad=True),
            torch.optim.AdamW(pt, foreach=False, amsgrad=True)]
    for step_grads in grads:
        for params, opt in zip((ours, ref, pt), opts):
            for p, g in zip(params, step_grads):
                p.grad = g.to(p.dtype)
            opt.step()
    for i, (o, r, p) in enumerate(zip(ours, ref, pt)):
        if o.numel() > 1000:  # the rule's max over enough elements to be a statistic
            assert_close(o, r, p, f"param {i} ({o.numel()} elements)")


def _dtensor_rank(rank, world, mesh, backend, layout):
    """One rank of test_dtensor_parameters_are_stepped_locally."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    torch.manual_seed(0)  # the same full tensors on every rank
    full = [torch.randn(6, 5), torch.randn(7)]
    grads = [[torch.randn_like(p) for p in full] for _ in range(3)]
    # how a parameter and its gradient lie over the ranks: FSDP2's shards;
    # tensor parallelism's SequenceParallel norm weight (replicated, its
    # gradient each rank's unreduced part) and RowwiseParallel embedding
    # (sharded, its gradient replicated)
    placement, grad_placement = {"fsdp": (Shard(0), Shard(0)), "sequence-parallel": (Replicate(), Partial()),
                                 "rowwise": (Shard(0), Replicate())}[layout]

    def placed(g):  # a Partial gradient: each rank's part, the parts summing to g, not in proportion to it
        if isinstance(grad_placement, Partial):  # (Adam would step a part in proportion as it steps g)
            split = torch.randn(g.shape, generator=torch.Generator().manual_seed(g.numel()))
            return DTensor.from_local(g / world + split * (rank - (world - 1) / 2), mesh, [grad_placement])
        return distribute_tensor(g, mesh, [grad_placement])
    shards = [torch.nn.Parameter(distribute_tensor(p.clone(), mesh, [placement])) for p in full]
    opt = pyext.optim.AdamW(shards, lr=1e-2, weight_decay=0.1, backend=backend)
    ref = [p.clone() for p in full]
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, foreach=False)
    for step_grads in grads:
        for s, r, g in zip(shards, ref, step_grads):
            s.grad = placed(g)
            r.grad = g.clone()
        opt.step()
        ref_opt.step()
    return max((s.full_tensor() - r).abs().max().item() for s, r in zip(shards, ref))


@pytest.mark.parametrize("layout", ["fsdp", "sequence-parallel", "rowwise"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dtensor_parameters_are_stepped_locally(backend, layout, monkeypatch, tmp_path):
    """FSDP2's and tensor parallelism's parameters: a 2-process gloo run on
    CPU against a plain run (Triton's kernels run there under the
    interpreter, GPU or not). A gradient laid out otherwise than its
    parameter is laid out as it first (stepped as each rank's part, the
    replicated weights went apart; the sharded ones raised)."""
    results = run_on_ranks(_dtensor_rank, tmp_path, monkeypatch, backend, layout)
    assert all(err < 1e-5 for err in results.values()), results
