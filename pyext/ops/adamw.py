"""Fused AdamW: the ops adamw_step_{cuda,triton} and `step_bucket`, which
pyext.optim.AdamW calls once per (device, dtype) bucket of a param group.

Op contract (both backends): lists of params, grads, exp_avgs, exp_avg_sqs
and (amsgrad) max_exp_avg_sqs on one device; params and grads float32,
float16 or bfloat16, all of one dtype; moments float32; the tensors of one
parameter share one non-overlapping dense layout. state_steps: per-tensor
float32 step counts on the device, already counting this step. lr_tensor
(float32, 1 element, on the device) overrides `lr`. grad_scale / found_inf:
GradScaler's float32 scale and inf flag on the device, or None. Mutates
params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, and grads when grad_scale is
given (stored unscaled).
"""
from itertools import chain
from typing import List, Optional

import torch
from torch import Tensor

from pyext import _backend, reference
from pyext.ops._register import kernel_backends

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MUTATED = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")


def dense(t: Tensor) -> bool:
    """t's elements fill its memory span exactly once, in some dim order."""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _check_one(i, p, lists, state_steps, dtype, device):
    if p.dtype != dtype or p.device != device:
        raise RuntimeError(f"adamw_step: params[{i}] is {p.dtype} on {p.device}, "
                           f"params[0] is {dtype} on {device}")
    if not dense(p):
        raise RuntimeError(f"adamw_step: params[{i}] must be non-overlapping and dense")
    for name, lst in lists.items():
        t = lst[i]
        want = dtype if name == "grads" else torch.float32
        if t.dtype != want or t.device != device or t.shape != p.shape or t.stride() != p.stride():
            raise RuntimeError(
                f"adamw_step: {name}[{i}] must be {want} on {device} with params[{i}]'s shape "
                f"{tuple(p.shape)} and strides {p.stride()}, got {t.dtype} on {t.device}, "
                f"shape {tuple(t.shape)}, strides {t.stride()}")
    t = state_steps[i]
    if t.dtype != torch.float32 or t.numel() != 1 or t.device != device:
        raise RuntimeError(f"adamw_step: state_steps[{i}] must be a 1-element float32 tensor on "
                           f"{device}, got {t.dtype} with {t.numel()} elements on {t.device}")


def check_op_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr_tensor,
                  amsgrad, grad_scale, found_inf):
    """The op contract above (the CUDA op checks the same in C++)."""
    n = len(params)
    lists = {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    if amsgrad:
        lists["max_exp_avg_sqs"] = max_exp_avg_sqs
    for name, lst in {**lists, "state_steps": state_steps}.items():
        if len(lst) != n:
            raise RuntimeError(f"adamw_step: {name} has {len(lst)} tensors, params has {n}")
    if n == 0:
        return
    device, dtype = params[0].device, params[0].dtype
    if dtype not in KERNEL_DTYPES:
        raise RuntimeError(f"adamw_step: params must be float32, float16 or bfloat16, got {dtype}")
    # Fast path (the usual case, ~1 us per tensor): everything contiguous,
    # moments float32, each list of one dtype and one device; else per tensor.
    tensors = [*params, *grads, *exp_avgs, *exp_avg_sqs, *(max_exp_avg_sqs if amsgrad else ())]
    moments = [*exp_avgs, *exp_avg_sqs, *(max_exp_avg_sqs if amsgrad else ())]
    fine = (all(map(Tensor.is_contiguous, tensors))
            and all(p.shape == g.shape == m.shape == v.shape
                    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs))
            and (not amsgrad or all(p.shape == x.shape for p, x in zip(params, max_exp_avg_sqs)))
            and {t.dtype for t in params} == {t.dtype for t in grads} == {dtype}
            and {t.dtype for t in moments} == {t.dtype for t in state_steps} == {torch.float32}
            and {t.device for t in tensors} == {t.device for t in state_steps} == {device}
            and all(t.numel() == 1 for t in state_steps))
    if not fine:
        for i, p in enumerate(params):
            _check_one(i, p, lists, state_steps, dtype, device)
    for name, t in (("lr_tensor", lr_tensor), ("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None and (t.dtype != torch.float32 or t.numel() != 1 or t.device != device):
            raise RuntimeError(f"adamw_step: {name} must be a 1-element float32 tensor on {device}, "
                               f"got {t.dtype} with {t.numel()} elements on {t.device}")


@torch.library.custom_op("pyext::adamw_step_triton", mutates_args=_MUTATED)
def adamw_step_triton(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                      exp_avg_sqs: List[Tensor], max_exp_avg_sqs: List[Tensor],
                      state_steps: List[Tensor], lr: float, lr_tensor: Optional[Tensor],
                      beta1: float, beta2: float, weight_decay: float, eps: float, amsgrad: bool,
                      maximize: bool, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    check_op_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr_tensor,
                  amsgrad, grad_scale, found_inf)
    from pyext.triton_kernels import adamw as kernels
    kernels.adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr,
                       lr_tensor, beta1, beta2, weight_decay, eps, amsgrad, maximize, grad_scale,
                       found_inf)


def _fake_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, lr_tensor, beta1, beta2, weight_decay, eps, amsgrad, maximize, grad_scale, found_inf):
    return None


STEP = {}
for _name in kernel_backends():
    STEP[_name] = getattr(torch.ops.pyext, f"adamw_step_{_name}")
    torch.library.register_fake(f"pyext::adamw_step_{_name}")(_fake_step)


def why_not(backend: str, params: List[Tensor]):
    """Why `backend` cannot step these params (one device, one dtype), or None."""
    reason = _backend.device_reason(backend, *params)
    if reason is None and backend != "torch" and params and params[0].dtype not in KERNEL_DTYPES:
        reason = (f"parameter dtype {params[0].dtype} is not supported "
                  "(float32, float16, bfloat16 are)")
    return reason


def _scalar_on(t: Tensor, device) -> Tensor:
    return t.to(device=device, dtype=torch.float32).reshape(())


def step_bucket(backend, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *,
                lr, beta1, beta2, weight_decay, eps, amsgrad, maximize, grad_scale, found_inf):
    """One AdamW step of one bucket on `backend` ("torch" or a kernel backend).

    state_steps: on the params' device, already counting this step. lr: a
    float or a 1-element tensor.
    """
    if not params:
        return
    device = params[0].device
    if grad_scale is not None:
        grad_scale = _scalar_on(grad_scale, device)
    if found_inf is not None:
        found_inf = _scalar_on(found_inf, device)
    if backend == "torch":
        if isinstance(lr, Tensor) and lr.device.type != "cpu":
            lr = lr.to(device)
        reference.adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                             lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
                             amsgrad=amsgrad, maximize=maximize, grad_scale=grad_scale,
                             found_inf=found_inf)
        return
    lr_tensor = None
    if isinstance(lr, Tensor):
        if lr.device.type == "cpu" and device.type != "cpu":
            lr = lr.item()  # a host value: no sync
        else:  # read where the kernel runs (capturable: a scheduler may change it between replays)
            lr_tensor, lr = _scalar_on(lr, device), 0.0
    lists = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else []]
    staged = _stage_non_dense(*lists)
    if staged:
        lists = [list(lst) for lst in lists]
        for i, copies in staged.items():
            for lst, copy in zip(lists, copies):
                lst[i] = copy
    STEP[backend](*lists, state_steps, float(lr), lr_tensor, beta1, beta2, weight_decay, eps, amsgrad,
                  maximize, grad_scale, found_inf)
    for i, copies in staged.items():
        originals = (params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]) + (
            (max_exp_avg_sqs[i],) if amsgrad else ())
        for original, copy in zip(originals, copies):
            original.copy_(copy)


def _stage_non_dense(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs):
    """{index: contiguous copies} for the parameters whose tensors do not share
    one dense layout (a strided view as a parameter, a grad with other strides):
    the kernels step the copies, which are then written back."""
    staged = {}
    if all(map(Tensor.is_contiguous, chain(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs))):
        return staged
    for i, p in enumerate(params):
        group = (p, grads[i], exp_avgs[i], exp_avg_sqs[i]) + ((max_exp_avg_sqs[i],) if max_exp_avg_sqs else ())
        if all(t.is_contiguous() for t in group):
            continue
        if not dense(p) or any(t.stride() != p.stride() for t in group):
            staged[i] = tuple(t.contiguous() for t in group)
    return staged
