"""pyext.optim.AdamW: torch.optim.AdamW's interface, stepped by fused kernels.

Same constructor, validation, param groups, defaults and state keys (`step`
a tensor, `exp_avg`, `exp_avg_sq`, `max_exp_avg_sq` with amsgrad) as
torch.optim.AdamW, so a state_dict moves between the two both ways. Moments
are kept in float32 for float16/bfloat16 parameters, and the kernels form
each new moment in float64 and round it once (torch's lerp_ and addcmul_
round two or three times). One launch steps every tensor of a (device,
dtype) group.
"""
import itertools
from typing import List, Optional

import torch
from torch import Tensor

from pyext import _backend, reference
from pyext.ops._register import kernel_backends, missing_reason

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MUTATED = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")  # grads: with grad_scale


def _check_lists(op: str, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad: bool):
    """The kernels read every tensor as flat memory, element i of a parameter
    beside element i of its grad and moments: each must be contiguous, of its
    parameter's size, on its device; grads in the parameters' dtype, moments
    float32. One pass per list when all is well (this runs every step);
    the first bad tensor is looked for only to name it."""
    if not params:
        return
    device, dtype = params[0].device, params[0].dtype
    numels = [p.numel() for p in params]
    lists = [("params", params, dtype), ("grads", grads, dtype), ("exp_avgs", exp_avgs, torch.float32),
             ("exp_avg_sqs", exp_avg_sqs, torch.float32)]
    if amsgrad:
        lists.append(("max_exp_avg_sqs", max_exp_avg_sqs, torch.float32))
    for name, tensors, want in lists:
        if len(tensors) != len(params):
            raise RuntimeError(f"{op}: {name} has {len(tensors)} tensors but params has {len(params)}")
        if ([t.numel() for t in tensors] == numels
                and all(t.dtype == want and t.is_contiguous() and t.device == device for t in tensors)):
            continue
        for i, (t, n) in enumerate(zip(tensors, numels)):
            if t.device != device or t.dtype != want:
                raise RuntimeError(f"{op}: {name}[{i}] must be {want} on {device}, got {t.dtype} on {t.device}")
            if t.numel() != n or not t.is_contiguous():
                raise RuntimeError(f"{op}: {name}[{i}] must be contiguous with params[{i}]'s {n} "
                                   f"elements, got shape {list(t.shape)}, strides {list(t.stride())}")


def _adamw_step_triton(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                       exp_avg_sqs: List[Tensor], max_exp_avg_sqs: List[Tensor], steps: Tensor, lr: float,
                       lr_tensor: Optional[Tensor], beta1: float, beta2: float, eps: float, weight_decay: float,
                       amsgrad: bool, maximize: bool, grad_scale: Optional[Tensor],
                       found_inf: Optional[Tensor]) -> None:
    from pyext.triton_kernels import adamw as kernels
    _check_lists("adamw_step_triton", params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad)
    kernels.adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, lr_tensor,
                       beta1, beta2, eps, weight_decay, amsgrad, maximize, grad_scale, found_inf)


adamw_step_triton = torch.library.custom_op("pyext::adamw_step_triton", _adamw_step_triton, mutates_args=_MUTATED)

STEP = {}
for _name in kernel_backends("adamw_step"):
    STEP[_name] = getattr(torch.ops.pyext, f"adamw_step_{_name}")
    torch.library.register_fake(f"pyext::adamw_step_{_name}")(lambda *args: None)


def _eager_step(name: str, staged: List[List[Tensor]]):
    """What steps the staged lists: the backend's op, or, for Triton on plain
    tensors outside any tracing, its Python body called directly. A Python
    op's dispatch converts its five tensor lists at every layer (autograd,
    version counters, backend): 0.8 ms a step for 148 tensors on a 2-core
    host, more than the kernel of a 124M-parameter model takes on an H100.
    The direct call bumps the version counters of what it writes itself
    (the grads too where it unscales them)."""
    if (name != "triton" or torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or any(type(t) not in _backend.PLAIN_TENSOR_TYPES for tensors in staged for t in tensors)):
        return STEP[name]

    def step(*args):
        _adamw_step_triton(*args)
        torch.autograd.graph.increment_version([t for k in _written(args[14]) for t in args[k]])
    return step


def _staged(args):
    """The step's tensor lists (params, grads, moments) as the kernels read
    them, flat memory with element i of a parameter beside element i of its
    grad and moments, and the indices of the parameters staged in copies
    (to write back). A parameter whose tensors are all contiguous goes as it
    is; one whose tensors all share one dense layout of other strides (a
    channels_last conv weight, its grad and moments, which zeros_like keeps
    in that layout) as flat views of that memory; any other (a strided view,
    a grad laid out unlike its parameter) through contiguous copies."""
    staged, copied = [list(tensors) for tensors in args], []
    if all(map(Tensor.is_contiguous, itertools.chain.from_iterable(args))):  # the common case, in one pass
        return staged, copied
    for i in range(len(args[0])):
        tensors = [ts[i] for ts in args if ts]
        if all(t.is_contiguous() for t in tensors):
            continue
        flat = _dense(tensors[0]) and all(t.stride() == tensors[0].stride() for t in tensors)
        if not flat:
            copied.append(i)
        for ts in staged:
            if ts:
                ts[i] = ts[i].as_strided((ts[i].numel(),), (1,)) if flat else ts[i].contiguous()
    return staged, copied


def _dense(t: Tensor) -> bool:
    """Whether t fills its memory span without gaps or overlaps, its dims in
    some order of strides (channels_last), the smallest stride 1."""
    span = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != span:
            return False
        span *= size
    return True


def _written(grad_scale: Optional[Tensor]):
    """Which of the step's five tensor lists it writes: params and moments,
    and with a GradScaler's grad_scale the grads, left unscaled as torch's
    fused AdamW leaves them (GradScaler unscales them before other optimizers' steps)."""
    return (0, 1, 2, 3, 4) if grad_scale is not None else (0, 2, 3, 4)


_NOT_DIFFERENTIABLE = ("pyext.optim.AdamW does not support `differentiable`: its kernels step the parameters "
                       "in place, outside autograd")

# The options a param group saved by an older torch may lack, as torch.optim.Adam fills them in.
_OPTIONS_OF_OLDER_RELEASES = dict(amsgrad=False, maximize=False, foreach=None, capturable=False,
                                  differentiable=False, fused=None)

# The moments' dtype of a parameter's dtype where it is not the parameter's own.
_WIDER_MOMENTS = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.complex32: torch.complex64}


_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _moment_dtype(p: Tensor) -> torch.dtype:
    return _WIDER_MOMENTS.get(p.dtype, p.dtype)


class AdamW(torch.optim.Optimizer):
    """torch.optim.AdamW with fused steps: its arguments (lr and betas floats or
    1-element tensors, validated as torch validates them), `foreach` and `fused`
    accepted and kept in the param groups as torch keeps them (the step here
    is fused either way), `differentiable=True` refused. `backend` (keyword only): "auto"
    (default: the CUDA kernel, else Triton, on GPUs; the reference elsewhere),
    "cuda", "triton" or "torch". With torch.amp.GradScaler and fused=True, as with torch's fused
    AdamW, the step unscales the gradients and skips a step whose gradients hold inf/NaN itself:
    the kernels read found_inf on the device (no host sync) and the step counts do not advance
    (the reference reads it on the host). Otherwise, as with torch.optim.AdamW, GradScaler
    unscales and skips (one host sync a step), which is what lets Lightning clip gradients under
    mixed precision. Either way a step taken leaves the gradients unscaled.
    Complex parameters step as their real views, as torch's AdamW steps them
    (complex32 ones with complex64 moments, as half ones keep float32).
    The kernels step flat memory: a parameter whose gradient and moments
    share its dense layout (contiguous, transposed, channels_last) is
    stepped in place; one that is not dense (a strided view) or whose
    gradient is laid out otherwise goes through contiguous copies, written
    back after the launch."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None, backend=None):
        if isinstance(lr, Tensor):
            if foreach and not capturable:
                raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
            if lr.numel() != 1:
                raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not (all(isinstance(b, float) for b in betas) or all(isinstance(b, Tensor) for b in betas)):
            raise ValueError("betas must be either both floats or both Tensors")
        for i, beta in enumerate(betas):  # (the range checks above refused Tensors of several elements)
            if isinstance(beta, Tensor) and foreach and not capturable:
                raise ValueError(f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True")
        betas = tuple(b.reshape(()) if isinstance(b, Tensor) else b for b in betas)  # as torch keeps them
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if differentiable:
            raise RuntimeError(_NOT_DIFFERENTIABLE)
        if backend is not None and backend not in _backend.BACKENDS:
            raise ValueError(f"backend must be one of {_backend.BACKENDS}, got {backend!r}")
        self.backend = backend
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable, differentiable=False,
                        fused=fused, decoupled_weight_decay=True)
        super().__init__(params, defaults)
        if fused:  # GradScaler hands the step its scale and found_inf, as it hands torch's fused AdamW
            self._step_supports_amp_scaling = True

    def _states(self, params: List[Tensor], group: dict) -> List[dict]:
        """The parameters' states, made on their first step: the step on the
        parameter's device, where torch's fused AdamW keeps it (one launch
        increments every step and the kernel reads them in place)."""
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, dtype=_moment_dtype(p), memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
        return states

    def add_param_group(self, param_group: dict) -> None:
        if param_group.get("differentiable"):
            raise RuntimeError(_NOT_DIFFERENTIABLE)
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a state_dict of this class or of torch.optim.AdamW (of an
        older torch too, and of torch.optim.Adam, made decoupled as
        torch.optim.AdamW makes it), whose moments are in the parameter's
        dtype (float32 here for float16/bfloat16 parameters) and whose step
        is on the CPU unless it is fused or capturable (here on the
        parameter's device), or a number (torch before 1.12): __setstate__
        converts them. torch's load casts each moment to its parameter's
        dtype: a float32 moment of this class's for a half parameter is
        taken from the state_dict itself, not from that rounding."""
        if any(group.get("differentiable") for group in state_dict["param_groups"]):
            raise RuntimeError(_NOT_DIFFERENTIABLE)
        super().load_state_dict(state_dict)
        saved_ids = (i for group in state_dict["param_groups"] for i in group["params"])
        params = (p for group in self.param_groups for p in group["params"])
        for i, p in zip(saved_ids, params):  # matched by order, as torch matches them
            for key, value in state_dict["state"].get(i, {}).items():
                if key in _MOMENTS and isinstance(value, Tensor) and value.dtype == _moment_dtype(p) != p.dtype:
                    self.state[p][key] = value.to(device=p.device, copy=True)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "backend": self.backend}

    def __setstate__(self, state: dict) -> None:
        """Where copy.deepcopy, pickle and torch.load of the optimizer, and
        load_state_dict, end: the backend kept (a pickle without one: the
        process default); as torch.optim.AdamW's, the options a group of an
        older torch lacks and decoupled weight decay; each state as this
        class keeps it: moments in float32 for half parameters, the step a
        float32 tensor on the parameter's device."""
        state = dict(state)
        self.backend = state.pop("backend", getattr(self, "backend", None))
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in _OPTIONS_OF_OLDER_RELEASES.items():
                group.setdefault(key, value)
            group["decoupled_weight_decay"] = True
        for p, p_state in self.state.items():
            for key in _MOMENTS:
                if key in p_state:
                    p_state[key] = p_state[key].to(_moment_dtype(p))
            if "step" in p_state:
                p_state["step"] = torch.as_tensor(p_state["step"], dtype=torch.float32, device=p.device)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            groups = {}  # (device, dtype) -> ([params], [their grads])
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
                params, grads = groups.setdefault((p.device, p.dtype), ([], []))
                params.append(p)
                grads.append(grad)
            for params, grads in groups.values():
                self._step_group(group, params, grads, grad_scale, found_inf)
        return loss

    def _step_group(self, group: dict, params: List[Tensor], grads: List[Tensor], grad_scale: Optional[Tensor],
                    found_inf: Optional[Tensor]):
        from torch.distributed.tensor import DTensor  # FSDP2 shards: step the local shards
        states = self._states(params, group)
        # Plain real parameters (the common case, one pass to tell) step as they are.
        plain = not params[0].is_complex() and all(type(p) in _backend.PLAIN_TENSOR_TYPES for p in params)

        def local_real(ts):  # complex tensors step as their real views, as in torch's AdamW
            if plain:
                return list(ts)
            ts = [t.to_local() if isinstance(t, DTensor) else t for t in ts]
            if not any(map(Tensor.is_complex, ts)):
                return ts
            return [torch.view_as_real(t) if t.is_complex() else t for t in ts]

        def placed_as(grad, p):
            # grad laid out over the devices as p is, for the local pieces to
            # match. Under tensor parallelism they may differ: a SequenceParallel
            # norm's replicated weight gets a Partial (unreduced) gradient, a
            # RowwiseParallel embedding's sharded weight a replicated one (torch's
            # AdamW meets this in its DTensor ops, which redistribute it).
            if isinstance(p, DTensor) and isinstance(grad, DTensor) and \
                    (grad.placements != p.placements or grad.device_mesh != p.device_mesh):
                grad = grad.redistribute(p.device_mesh, p.placements)
            return grad

        local = local_real(params)
        grads = grads if plain else local_real(map(placed_as, grads, params))

        def moments(key):
            return local_real(s[key] for s in states) if key in states[0] else []

        steps = [s["step"] for s in states]
        beta1, beta2 = (float(b) for b in group["betas"])  # Tensor betas too, as torch's fused step reads them
        lr = group["lr"]
        lr_tensor = lr if isinstance(lr, Tensor) else None
        kw = dict(beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                  amsgrad=group["amsgrad"], maximize=group["maximize"])
        name = _backend.select("optim.AdamW", self.backend, local[0].device,
                               lambda b: self._why_not(b, local, grads))
        args = (local, grads, moments("exp_avg"), moments("exp_avg_sq"), moments("max_exp_avg_sq"))
        if name == "torch":
            if found_inf is None or not found_inf.item():
                torch._foreach_add_(steps, 1)
                reference.adamw_step(*args, steps, lr=lr, grad_scale=grad_scale, **kw)
            return
        device = local[0].device
        torch._foreach_add_(steps, 1)
        found_arg = None
        if found_inf is not None:  # a skipped step does not count, as in torch's fused AdamW
            # GradScaler sums found_inf over the devices' gradients: 0, 1, 2, ...
            found_arg = found_inf.to(device=device, dtype=torch.float32).reshape(()).clamp(max=1.0)
            torch._foreach_sub_(steps, [found_arg] * len(steps))
        staged, copied = _staged(args)
        step_values = torch.stack(steps)
        if lr_tensor is None and torch.compiler.is_compiling():
            # traced, float(lr) is a constant of the graph, guarded: one graph per value an LR scheduler
            # sets. A tensor computed from it is an input of one graph (torch.full would keep the constant).
            lr_tensor = torch.ones((), dtype=torch.float32, device=device) * lr
        lr_value = 0.0 if lr_tensor is not None else float(lr)
        lr_arg = lr_tensor.to(device=device, dtype=torch.float32) if lr_tensor is not None else None
        scale_arg = grad_scale.to(device=device, dtype=torch.float32) if grad_scale is not None else None
        _eager_step(name, staged)(*staged, step_values, lr_value, lr_arg, kw["beta1"], kw["beta2"], kw["eps"],
                                  kw["weight_decay"], kw["amsgrad"], kw["maximize"], scale_arg, found_arg)
        for k in _written(grad_scale):  # written back where staged in a copy
            for i in copied:
                if args[k]:
                    args[k][i].copy_(staged[k][i])

    @staticmethod
    def _why_not(backend: str, params: List[Tensor], grads: List[Tensor]):
        """Why `backend` cannot step these parameters (of one dtype) and gradients, or None."""
        reason = _backend.device_reason(backend, *params, *grads) or missing_reason(backend, STEP, "AdamW")
        if reason is None and backend != "torch":
            dtype = params[0].dtype
            if dtype not in _KERNEL_DTYPES:
                reason = f"parameter dtype {dtype} is not supported (float32, float16, bfloat16 are)"
            elif any(g.dtype != dtype for g in grads):
                reason = "gradients must have their parameters' dtype"
        return reason
