"""Pure PyTorch reference implementations.

They are the "torch" backend and, run in float64, the test oracle. Each
mirrors the torch function whose semantics pyext promises.
"""
import torch
import torch.nn.functional as F


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    return F.gelu(x, approximate=approximate)


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr, beta1,
               beta2, weight_decay, eps, amsgrad, maximize, grad_scale=None, found_inf=None):
    """One AdamW step, tensor by tensor (Loshchilov & Hutter, "Decoupled Weight
    Decay Regularization", with torch.optim.AdamW's bias corrections):

        g     = grad / grad_scale                (unscaled; -g when maximize)
        theta = theta * (1 - lr * weight_decay)  (decoupled weight decay)
        m     = beta1 * m + (1 - beta1) * g      (first moment)
        v     = beta2 * v + (1 - beta2) * g^2    (second moment; amsgrad: vmax = max(vmax, v))
        theta = theta - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    `state_steps` are tensors that already count this step (t). The math runs
    in the moments' dtype: float32 for float16/bfloat16/float32 parameters,
    float64 for float64 ones (the test oracle); complex parameters as real
    views. `lr` is a float or a 1-element tensor. With `grad_scale` the grads
    are written back unscaled, as torch's fused AdamW does; where `found_inf`
    is nonzero nothing changes.
    """
    keep = None if found_inf is None else found_inf.ne(0)

    def commit(dst, new):
        dst.copy_(new if keep is None else torch.where(keep, dst, new))

    for i, param in enumerate(params):
        grad, exp_avg, exp_avg_sq = grads[i], exp_avgs[i], exp_avg_sqs[i]
        max_exp_avg_sq = max_exp_avg_sqs[i] if amsgrad else None
        if torch.is_complex(param):
            param, grad, exp_avg, exp_avg_sq = (torch.view_as_real(t) for t in (param, grad, exp_avg, exp_avg_sq))
            if amsgrad:
                max_exp_avg_sq = torch.view_as_real(max_exp_avg_sq)
        acc = exp_avg.dtype
        g = grad.to(acc)
        if grad_scale is not None:
            g = g / grad_scale.to(acc)
            commit(grad, g)
        if maximize:
            g = -g
        step = state_steps[i].to(torch.float64)
        bias_correction1 = 1 - beta1 ** step
        bias_correction2_sqrt = (1 - beta2 ** step).sqrt()

        theta = param.to(acc) * (1 - lr * weight_decay)
        m = exp_avg * beta1 + g * (1 - beta1)
        v = exp_avg_sq * beta2 + g * g * (1 - beta2)
        if amsgrad:
            v_max = torch.maximum(max_exp_avg_sq, v)
            commit(max_exp_avg_sq, v_max)
        denom = (v_max if amsgrad else v).sqrt() / bias_correction2_sqrt + eps
        theta = theta - (lr / bias_correction1) * m / denom
        commit(param, theta)
        commit(exp_avg, m)
        commit(exp_avg_sq, v)
