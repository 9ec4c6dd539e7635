"""pyext.optim.AdamW: torch.optim.AdamW with a fused multi-tensor step.

Same constructor, validation, param groups, defaults and state keys as
torch.optim.AdamW, so checkpoints load both ways. Each step updates all the
tensors of one device and dtype in a few launches (CUDA or Triton), or runs
the per-tensor reference (backend "torch", and "auto" on CPU tensors).
"""
from itertools import chain

import torch
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from pyext import _backend
from pyext.ops import adamw as ops

__all__ = ["AdamW"]

_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
# torch.optim.Adam's message, so that code matching on it keeps working.
_SPARSE_ERROR = "Adam does not support sparse gradients, please consider SparseAdam instead"


def _moment_dtype(p: Tensor) -> torch.dtype:
    """Moments are float32 for float16/bfloat16 parameters, else the param's dtype."""
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return ()  # isinstance(x, ()) is False
    return DTensor


_DTensor = _dtensor_class()


class AdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter, decoupled weight decay), as torch.optim.AdamW.

    Args mirror torch.optim.AdamW; `backend` ("auto", "cuda", "triton",
    "torch", or None for pyext's default) picks the implementation.
    Parameters may be float32, float16 or bfloat16 (moments are kept in
    float32) or DTensors (their local shards are stepped); float64 and
    complex parameters go through the reference. As in torch's fused AdamW,
    the step counts live on the parameters' device and the kernels read them
    there, so a step never waits for the device; `capturable=True` also lets
    step() be captured in a CUDA graph (give `lr` as a device tensor to
    change it between replays).
    Works with torch.amp.GradScaler like torch's fused AdamW: gradients are
    unscaled inside the step and a step with inf/NaN gradients is skipped.
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

    def _init_state(self, p, local, group):
        """The state of p, made on p's first step; step counts moved where they belong."""
        state = self.state[p]
        if not state:
            # step: a float32 count on the param's device, as torch's fused AdamW keeps it
            state["step"] = torch.zeros((), dtype=torch.float32, device=local.device)
            state["exp_avg"] = torch.zeros_like(p, dtype=_moment_dtype(p), memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=_moment_dtype(p), memory_format=torch.preserve_format)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=_moment_dtype(p),
                                                       memory_format=torch.preserve_format)
        step = state["step"]
        if step.get_device() != local.get_device() or step.dtype != torch.float32:
            # a checkpoint of torch's unfused AdamW keeps its counts on the host
            state["step"] = step.to(device=local.device, dtype=torch.float32)
        return state

    def _collect(self, group):
        """`group`'s parameters that have a grad, bucketed by the (device, dtype)
        of their local tensors: [(backend that will step the bucket, params, locals)]."""
        params, locals_ = [], []
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError(_SPARSE_ERROR)
            if isinstance(p, _DTensor):
                if not isinstance(grad, _DTensor) or grad.placements != p.placements:
                    raise RuntimeError(
                        f"pyext.optim.AdamW: a DTensor parameter with placements {p.placements} has "
                        f"a grad with placements {getattr(grad, 'placements', 'none (a plain tensor)')}"
                        "; they must match (reduce the grad first)")
                locals_.append(p.to_local())
            else:
                locals_.append(p)
            params.append(p)
        if not params:
            return []
        buckets = []
        for (device, _), (bucket, idx) in _group_tensors_by_device_and_dtype([locals_], with_indices=True).items():
            bucket = bucket[0]
            backend = _backend.select("optim.AdamW", group["backend"], device,
                                      lambda name, bucket=bucket: ops.why_not(name, bucket))
            buckets.append((backend, [params[i] for i in idx], bucket))
        return buckets

    def _tensor_lists(self, group, params, locals_):
        """The local tensors that one step of `params` reads and writes."""
        grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], []
        amsgrad = group["amsgrad"]
        for p, local in zip(params, locals_):
            state = self._init_state(p, local, group)
            steps.append(state["step"])
            if not isinstance(p, _DTensor):
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                if amsgrad:
                    max_exp_avg_sqs.append(state["max_exp_avg_sq"])
            else:  # a DTensor: its shard, and its grad's and moments' shards
                grads.append(p.grad.to_local())
                exp_avgs.append(state["exp_avg"].to_local())
                exp_avg_sqs.append(state["exp_avg_sq"].to_local())
                if amsgrad:
                    max_exp_avg_sqs.append(state["max_exp_avg_sq"].to_local())
        return list(locals_), grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps

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
        for group, buckets in work:
            self._step_group(group, buckets, grad_scale, found_inf)
        return loss

    def _step_group(self, group, buckets, grad_scale, found_inf):
        beta1, beta2 = (float(b) for b in group["betas"])
        for backend, params, locals_ in buckets:
            lists = self._tensor_lists(group, params, locals_)
            steps = lists[-1]
            torch._foreach_add_(steps, 1.0)
            if found_inf is not None:  # the kernels skip this step: so does the count
                torch._foreach_sub_(steps, [found_inf.to(steps[0].device)] * len(steps))
            ops.step_bucket(backend, *lists, lr=group["lr"], beta1=beta1, beta2=beta2,
                            weight_decay=group["weight_decay"], eps=group["eps"],
                            amsgrad=group["amsgrad"], maximize=group["maximize"],
                            grad_scale=grad_scale, found_inf=found_inf)
