"""Pure PyTorch reference implementations.

They are the "torch" backend and, run in float64, the test oracle. Each
mirrors the torch function whose semantics pyext promises. GELU and the
norms call torch's ops below torch.nn.functional (the same ops F.gelu,
F.layer_norm and F.rms_norm call), which pyext.patch's routing of a model's
F calls to pyext leaves alone: pyext's fallbacks are never sent back to it.
"""
import contextlib
import math

import torch


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    return torch.ops.aten.gelu(x, approximate=approximate)


def layer_norm(x: torch.Tensor, normalized_shape, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    # float16/bfloat16 x with float32 weight and bias: fp32 math, output in x's
    # dtype. torch does this on CPU; its CUDA kernel refuses the mix, so spell it out.
    if any(p is not None and p.dtype != x.dtype for p in (weight, bias)):
        return torch.layer_norm(x.float(), normalized_shape, weight, bias, eps).to(x.dtype)
    return torch.layer_norm(x, normalized_shape, weight, bias, eps)


def rms_norm(x: torch.Tensor, normalized_shape, weight=None, eps=None) -> torch.Tensor:
    return torch.rms_norm(x, normalized_shape, weight, eps)


def _grouped_norm(norm, x, normalized_shape, weight, bias, group_size):
    """norm(groups) over each group of group_size consecutive elements of a
    row of prod(normalized_shape), times weight plus bias, both of
    normalized_shape: computed in float32 (float64 for float64 x), rounded
    once to x's dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    lead = x.dim() - len(normalized_shape)
    groups = x.to(compute).reshape(*x.shape[:lead], math.prod(normalized_shape) // group_size, group_size)
    y = norm(groups).reshape(x.shape)
    if weight is not None:
        y = y * weight.to(compute)
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype)


def grouped_layer_norm(x, normalized_shape, weight, bias, eps, group_size) -> torch.Tensor:
    """LayerNorm over each group of group_size elements of a row (see _grouped_norm)."""
    return _grouped_norm(lambda g: torch.layer_norm(g, g.shape[-1:], None, None, eps), x, normalized_shape, weight,
                         bias, group_size)


def grouped_rms_norm(x, normalized_shape, weight, eps, group_size) -> torch.Tensor:
    """RMSNorm over each group of group_size elements of a row; eps None as in F.rms_norm."""
    return _grouped_norm(lambda g: torch.rms_norm(g, g.shape[-1:], None, eps), x, normalized_shape, weight, None,
                         group_size)



def rms_norm_gated(x: torch.Tensor, gate: torch.Tensor, weight=None, eps=None, activation: str = "silu",
                   norm_before_gate: bool = True, group_size=None) -> torch.Tensor:
    """RMSNorm over x's last dim fused with a gate of x's shape, act(gate)
    with act silu or sigmoid: norm(x) * weight * act(gate) (norm before
    gate, Qwen3-Next's) or norm(x * act(gate)) * weight (Mamba 2's); the
    norm over groups of group_size features (None: the whole row). eps None
    as in F.rms_norm. Computed in float32 (float64 for float64 x) and
    rounded once to x's dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    eps = torch.finfo(compute).eps if eps is None else eps
    h, z = x.to(compute), gate.to(compute)
    act = z * torch.sigmoid(z) if activation == "silu" else torch.sigmoid(z)
    if not norm_before_gate:
        h = h * act
    groups = h.unflatten(-1, (-1, group_size or h.shape[-1])) if h.shape[-1] else h.unsqueeze(-1)
    y = (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2)
    if weight is not None:
        y = y * weight.to(compute)
    if norm_before_gate:
        y = y * act
    return y.to(x.dtype)

def attention(q, k, v, *, scale=None, causal=False, causal_offset=0, dropout_p=0.0, keep=None, mask=None,
              window=None, softcap=0.0, sinks=None):
    """Attention by its definition, returning (out, lse).

    q (B, Hq, Sq, D), k and v (B, Hkv, Sk, D), Hq a multiple of Hkv (GQA).
    Causal: key j visible to query i iff j <= i + causal_offset. window
    (left, right), a local window: key j visible iff i + causal_offset - left
    <= j <= i + causal_offset + right, -1 for no bound on that side. softcap
    c > 0: the scores s become c tanh(s / c) before any mask. mask, as
    SDPA's attn_mask (broadcastable to (B, Hq, Sq, Sk)): boolean (False: not
    visible) or added to the scores. sinks (Hq,), attention sinks (GPT-OSS's):
    one more logit per head in each row's softmax, with no value (P over the
    keys sums to below 1), and in lse. Rows that see
    no key: out 0, lse -inf (with sinks, the sink's logit). Dropout: P is multiplied by keep / (1 - dropout_p),
    keep the (B, Hq, Sq, Sk) bool mask of kept elements (drawn here from
    torch's generator when not given); lse is that of the undropped P.
    Computed in float32 for float16/bfloat16 inputs (as torch's fused SDPA
    kernels accumulate), float64 for float64; out in the inputs' dtype, lse
    in the computing one.
    """
    dtype = q.dtype
    # its precision is its own, as a fused kernel's (the meta device has no autocast to turn off)
    with torch.autocast(q.device.type, enabled=False) if torch.amp.is_autocast_available(q.device.type) \
            else contextlib.nullcontext():
        q, k, v = (t.to(torch.float64 if dtype == torch.float64 else torch.float32) for t in (q, k, v))
        groups = q.shape[1] // k.shape[1] if k.shape[1] else 1  # no heads at all: nothing to repeat
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        s = (q @ k.transpose(-2, -1)) * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        i = torch.arange(q.shape[2], device=q.device)[:, None] + causal_offset  # the diagonal's key
        j = torch.arange(k.shape[2], device=q.device)[None, :]
        if causal:
            s = s.masked_fill(_placed_as(s, j > i), float("-inf"))
        if window is not None and window[0] >= 0:
            s = s.masked_fill(_placed_as(s, j < i - window[0]), float("-inf"))
        if window is not None and window[1] >= 0:
            s = s.masked_fill(_placed_as(s, j > i + window[1]), float("-inf"))
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(s.dtype)
        # P = exp(s - m) / l with m the row max and l the row sum, not exp(s - lse):
        # a row masked everywhere by finfo.min has m near -3.4e38, where m + log(l) is m
        m = s.detach().amax(-1, keepdim=True) if s.shape[-1] else s.new_full((*s.shape[:-1], 1), float("-inf"))
        if sinks is not None:
            sink = sinks.to(s.dtype).view(1, -1, 1, 1)
            m = torch.maximum(m, sink.detach())
        e = torch.exp(s - torch.where(torch.isneginf(m), 0.0, m))
        total = e.sum(-1, keepdim=True)
        if sinks is not None:
            total = total + torch.exp(sink - m)
        p = e / torch.where(total > 0, total, 1.0)  # rows that see no key: 0
        lse = (m + total.log()).squeeze(-1)
        if dropout_p > 0:
            if keep is None:
                keep = torch.rand(p.shape, device=p.device) >= dropout_p
            p = p * keep / (1 - dropout_p)
        return (p @ v).to(dtype), lse


def _placed_as(s: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The (Sq, Sk) keys each query does not see, made alike on every rank,
    as a replicated DTensor where the scores are one (a tensor-parallel
    model's heads), for DTensor ops, which refuse plain tensors beside theirs."""
    from torch.distributed.tensor import DTensor, Replicate
    if not isinstance(s, DTensor):
        return hidden
    return DTensor.from_local(hidden, s.device_mesh, [Replicate()] * s.device_mesh.ndim, run_check=False)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, scale=None, causal=False, dropout_p=0.0, keeps=None,
                     window=None, softcap=0.0, sinks=None):
    """attention() of each sequence of a packed batch, returning (out, lse):
    q (total_q, Hq, D), k and v (total_k, Hkv, D), sequence b being rows
    cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1 of q (of k and v: cu_seqlens_k);
    causal bottom-right in each sequence. out (total_q, Hq, Dv), lse
    (Hq, total_q). keeps: sequence b's dropout mask (1, Hq, Sq_b, Sk_b) per
    sequence, or None to draw them. sinks (Hq,): every sequence's, as attention()'s.
    The offsets may be lists of ints, read off their tensors already (torch
    2.9 cannot read a captured tensor's values inside torch.func.vjp)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    offsets_q, offsets_k = (c if isinstance(c, list) else c.tolist() for c in (cu_seqlens_q, cu_seqlens_k))
    outs, lses = [], []  # the sequences' rows, which run from 0 to the rows given; joined, not written in
    for b, (q0, q1, k0, k1) in enumerate(zip(offsets_q, offsets_q[1:], offsets_k, offsets_k[1:])):
        o, row_lse = attention(*(t.transpose(0, 1)[None] for t in (q[q0:q1], k[k0:k1], v[k0:k1])), scale=scale,
                         causal=causal, causal_offset=(k1 - k0) - (q1 - q0), dropout_p=dropout_p,
                         keep=None if keeps is None else keeps[b], window=window, softcap=softcap, sinks=sinks)
        outs.append(o[0].transpose(0, 1))
        lses.append(row_lse[0])
    if not outs:  # no sequences at all
        return q.new_zeros((q.shape[0], q.shape[1], v.shape[2])), \
            torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float64 if q.dtype == torch.float64
                       else torch.float32, device=q.device)
    return torch.cat(outs), torch.cat(lses, dim=-1)


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr, beta1, beta2, eps,
               weight_decay, amsgrad, maximize, grad_scale=None):
    """One AdamW step per tensor, in place, in the moments' dtype (float32 for
    half parameters, the parameter's own dtype otherwise); `steps` hold t,
    already incremented; with grad_scale, the grads are left divided by it.
    The update is written out in triton_kernels/adamw.py."""
    for i, p in enumerate(params):
        m, v = exp_avgs[i], exp_avg_sqs[i]
        g = grads[i].to(m.dtype)
        if grad_scale is not None:
            g = g / grad_scale.to(m.dtype)
            grads[i].copy_(g)
        if maximize:
            g = -g
        t = float(steps[i])
        lr_ = float(lr)
        x = p.to(m.dtype) * (1 - lr_ * weight_decay)
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if amsgrad:
            torch.maximum(max_exp_avg_sqs[i], v, out=max_exp_avg_sqs[i])
            v = max_exp_avg_sqs[i]
        denom = v.sqrt() / math.sqrt(1 - beta2 ** t) + eps
        p.copy_(x - (lr_ / (1 - beta1 ** t)) * m / denom)
