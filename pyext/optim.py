"""pyext.optim.AdamW: torch.optim.AdamW with a fused multi-tensor step.

Same constructor, validation, param groups, defaults and state keys as
torch.optim.AdamW, so checkpoints load both ways. Each step updates all the
tensors of one device and dtype in a few launches (CUDA or Triton), or runs
the per-tensor reference (backend "torch", and "auto" on CPU tensors).
"""
from itertools import chain

import torch
from torch import Tensor

from pyext import _backend
from pyext.ops import adamw as ops

__all__ = ["AdamW"]

_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
# torch.optim.Adam's message, so that code matching on it keeps working.
_SPARSE_ERROR = "Adam does not support sparse gradients, please consider SparseAdam instead"


def _moment_dtype(p: Tensor) -> torch.dtype:
    """Moments are float32 for float16/bfloat16 parameters, else the param's dtype."""
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


def _host_step_dtype() -> torch.dtype:
    # what torch.optim.AdamW uses for its host-side step count
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _local(t):
    """The local shard of a DTensor (FSDP2 parameters), else t itself."""
    return t.to_local() if _is_dtensor(t) else t


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


class AdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter, decoupled weight decay), as torch.optim.AdamW.

    Args mirror torch.optim.AdamW; `backend` ("auto", "cuda", "triton",
    "torch", or None for pyext's default) picks the implementation.
    Parameters may be float32, float16 or bfloat16 (moments are kept in
    float32) or DTensors (their local shards are stepped); float64 and
    complex parameters go through the reference. `capturable=True` keeps the
    step counts on the device and reads a tensor `lr` there, so the step can
    be captured in a CUDA graph and never syncs with the host.
    Works with torch.amp.GradScaler like torch's fused AdamW: gradients are
    unscaled inside the step and a step with inf/NaN gradients is skipped
    (without capturable, that costs one host sync per step to read found_inf).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, capturable=False, backend=None):
        # torch.optim.AdamW's checks and messages, in its order
        if isinstance(lr, Tensor) and lr.numel() != 1:
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
        if not ((isinstance(betas[0], float) and isinstance(betas[1], float))
                or (isinstance(betas[0], Tensor) and isinstance(betas[1], Tensor))):
            raise ValueError("betas must be either both floats or both Tensors")
        for i, beta in enumerate(betas):
            if isinstance(beta, Tensor) and beta.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")
        if backend is not None and backend not in _backend.BACKENDS:
            raise ValueError(f"backend must be one of {_backend.BACKENDS}, got {backend!r}")
        betas = tuple(b.squeeze() if isinstance(b, Tensor) else b for b in betas)
        # torch.optim.AdamW's defaults (foreach, differentiable and fused are
        # kept only so that checkpoints carry the same keys), plus `backend`.
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=None, capturable=capturable,
                        differentiable=False, fused=None, decoupled_weight_decay=True,
                        backend=backend)
        super().__init__(params, defaults)
        # torch.amp.GradScaler hands this optimizer grad_scale and found_inf
        # instead of unscaling and checking the grads itself.
        self._step_supports_amp_scaling = True

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
            group["decoupled_weight_decay"] = True
            group.setdefault("backend", self.defaults.get("backend"))

    def load_state_dict(self, state_dict):
        """torch.optim.Optimizer.load_state_dict, keeping float32 moments for
        float16/bfloat16 parameters (torch would cast them to the param dtype)."""
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id, {})
            for key in _MOMENTS:
                if key in saved and _moment_dtype(p) != p.dtype:
                    self.state[p][key] = saved[key].to(device=p.device, dtype=_moment_dtype(p))

    def _init_state(self, p, group):
        state = self.state[p]
        if "step" not in state:
            state["step"] = (torch.zeros((), dtype=torch.float32, device=_local(p).device)
                             if group["capturable"] else torch.tensor(0.0, dtype=_host_step_dtype()))
        for key in _MOMENTS[: 3 if group["amsgrad"] else 2]:
            if key not in state:
                state[key] = torch.zeros_like(p, dtype=_moment_dtype(p),
                                              memory_format=torch.preserve_format)
        # Step counts live where this group's mode wants them (a checkpoint
        # from another mode or from torch's fused AdamW may put them elsewhere).
        step, device = state["step"], _local(p).device
        if group["capturable"] and (step.device != device or step.dtype != torch.float32):
            state["step"] = step.to(device=device, dtype=torch.float32)
        elif not group["capturable"] and step.device.type != "cpu":
            state["step"] = step.to(device="cpu", dtype=_host_step_dtype())
        return state

    def _collect(self, group):
        """`group`'s parameters that have a grad, bucketed by the (device, dtype)
        of their local tensors: [(backend that will step the bucket, params)]."""
        buckets = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(_SPARSE_ERROR)
            if _is_dtensor(p) and (not _is_dtensor(p.grad) or p.grad.placements != p.placements):
                raise RuntimeError(
                    f"pyext.optim.AdamW: a DTensor parameter with placements {p.placements} has a "
                    f"grad with placements {getattr(p.grad, 'placements', 'none (a plain tensor)')}; "
                    "they must match (reduce the grad first)")
            local = _local(p)
            buckets.setdefault((local.device, local.dtype), []).append(p)
        return [(_backend.select("optim.AdamW", group["backend"], device,
                                 lambda name, params=params: ops.why_not(name, [_local(p) for p in params])),
                 params)
                for (device, _), params in buckets.items()]

    def _tensor_lists(self, group, params):
        """The local tensors that one step of `params` reads and writes."""
        lists = {key: [] for key in ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs",
                                     "state_steps")}
        for p in params:
            state = self._init_state(p, group)
            lists["params"].append(_local(p))
            lists["grads"].append(_local(p.grad))
            lists["exp_avgs"].append(_local(state["exp_avg"]))
            lists["exp_avg_sqs"].append(_local(state["exp_avg_sq"]))
            if group["amsgrad"]:
                lists["max_exp_avg_sqs"].append(_local(state["max_exp_avg_sq"]))
            lists["state_steps"].append(state["step"])
        return lists

    def _check_graph_capture(self):
        if (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
                and not all(group["capturable"] for group in self.param_groups)):
            raise RuntimeError("Attempting CUDA graph capture of step() for an instance of AdamW "
                               "but param_groups' capturable is False.")

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step over every parameter that has a grad."""
        self._check_graph_capture()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        # Every bucket's backend is chosen before anything runs: a backend
        # that cannot serve one of them raises with nothing changed.
        work = [(group, self._collect(group)) for group in self.param_groups]
        work = [(group, buckets) for group, buckets in work if buckets]
        if found_inf is not None and any(not group["capturable"] for group, _ in work):
            # Host-side step counts cannot wait for the device to say whether
            # this step is skipped: read found_inf once.
            if found_inf.item() != 0:
                return loss
            found_inf = None
        for group, buckets in work:
            self._step_group(group, buckets, grad_scale, found_inf)
        return loss

    def _step_group(self, group, buckets, grad_scale, found_inf):
        beta1, beta2 = (float(b) for b in group["betas"])
        hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                     eps=group["eps"], amsgrad=group["amsgrad"], maximize=group["maximize"],
                     grad_scale=grad_scale)
        for backend, params in buckets:
            lists = self._tensor_lists(group, params)
            steps = lists["state_steps"]
            torch._foreach_add_(steps, 1.0)
            if group["capturable"]:
                if found_inf is not None:  # the kernels skip this step: so does the count
                    torch._foreach_sub_(steps, [found_inf.to(steps[0].device)] * len(steps))
                ops.step_bucket(backend, *lists.values(), None, found_inf=found_inf, **hyper)
                continue
            # Host step counts: one launch per distinct count (usually one;
            # more when some parameters missed a grad on earlier steps).
            by_count = {}
            for i, count in enumerate(torch.stack(steps).tolist()):
                by_count.setdefault(count, []).append(i)
            for count, idx in by_count.items():
                picked = [[lst[i] for i in idx] if lst else [] for lst in lists.values()]
                ops.step_bucket(backend, *picked, count, found_inf=None, **hyper)
