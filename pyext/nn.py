"""Drop-in modules: subclasses of torch.nn's, same constructor and state_dict,
whose forward runs pyext's kernels. `backend` (keyword only) pins a backend."""
import functools

import torch
import torch.nn.functional as F

from pyext import _backend
from pyext.ops.gelu import gelu
from pyext.ops.layer_norm import layer_norm, rms_norm
from pyext.ops.rms_norm_gated import rms_norm_gated


def _refuse_torchscript(what: str):
    """torch.jit.script calls a module's __prepare_scriptable__ before it
    compiles the module: pyext's modules, and the modules whose forward
    pyext.patch wraps, raise there with a way out, rather than deep inside
    TorchScript's compiler."""
    raise RuntimeError(
        f"torch.jit.script cannot compile {what}: pyext chooses each call's kernel backend in Python, which "
        "TorchScript cannot compile. torch.compile and torch.export take pyext's kernels as ops; or script "
        "the model without them (pyext.unpatch(model) first).")


class _NotScriptable:
    def __prepare_scriptable__(self):
        _refuse_torchscript(f"pyext.nn.{type(self).__name__}")


class GELU(_NotScriptable, torch.nn.GELU):
    def __init__(self, approximate: str = "none", *, backend=None):
        super().__init__(approximate=approximate)
        self.backend = backend

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return gelu(input, self.approximate, backend=self.backend)


class LayerNorm(_NotScriptable, torch.nn.LayerNorm):
    """torch.nn.LayerNorm; group_size (keyword) normalizes each group of that
    many consecutive elements of normalized_shape separately (see
    pyext.layer_norm): LayerNorm((heads, head_dim), group_size=head_dim),
    bias=False, is Cohere's per-head QK norm."""

    group_size = None  # also on torch modules pyext.patch gives this class

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, *, group_size=None, backend=None):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                         device=device, dtype=dtype)
        self.group_size, self.backend = group_size, backend

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps,
                          group_size=self.group_size, backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", group_size={self.group_size}" if self.group_size else "")


class NemotronLayerNorm1P(LayerNorm):
    """Nemotron's LayerNorm (transformers' NemotronLayerNorm1P), its weight
    stored as an offset from one: y = (x - mean) / std * (1 + weight) + bias.
    The same parameters and state_dict as torch.nn.LayerNorm's. 1 + weight
    is taken in float32 (Nemotron rounds it to the weight's dtype first).
    As Nemotron does, it normalizes with autocast off, x first cast to
    autocast's dtype where CUDA autocast is on (torch.is_autocast_enabled(),
    which Nemotron checks, is CUDA's): y in that dtype there."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        device = input.device.type
        if torch.is_autocast_enabled():
            input = input.to(torch.get_autocast_dtype(device))
        with torch.autocast(device, enabled=False):
            return self._norm(input)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        weight = None if self.weight is None else 1.0 + self.weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return layer_norm(x, self.normalized_shape, weight, bias, self.eps, group_size=self.group_size,
                          backend=self.backend)


class DebertaLayerNorm(LayerNorm):
    """transformers' DebertaLayerNorm (DeBERTa v1): LayerNorm whose result
    has torch's promotion of x's dtype and its parameters' (x in bfloat16,
    the parameters in float32: y in float32). The same parameters and
    state_dict as torch.nn.LayerNorm's. A mixed call is computed in the
    wider dtype and rounded once (DeBERTa rounds x_hat to x's dtype first)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        params = [p for p in (self.weight, self.bias) if p is not None]
        wide = functools.reduce(torch.promote_types, [p.dtype for p in params], input.dtype)
        weight, bias = (None if p is None else p.to(wide) for p in (self.weight, self.bias))
        return layer_norm(input.to(wide), self.normalized_shape, weight, bias, self.eps, group_size=self.group_size,
                          backend=self.backend)


class RMSNorm(_NotScriptable, torch.nn.RMSNorm):
    """torch.nn.RMSNorm; group_size (keyword) as in pyext.nn.LayerNorm."""

    group_size = None  # also on torch modules pyext.patch gives this class

    def __init__(self, normalized_shape, eps=None, elementwise_affine: bool = True, device=None, dtype=None, *,
                 group_size=None, backend=None):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, device=device,
                         dtype=dtype)
        self.group_size, self.backend = group_size, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.normalized_shape, self.weight, self.eps, group_size=self.group_size,
                        backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", group_size={self.group_size}" if self.group_size else "")


class T5RMSNorm(RMSNorm):
    """transformers' T5LayerNorm (T5, mT5, LongT5, Pix2Struct, IDEFICS, ...):
    RMSNorm whose result has the weight's dtype where that is float16 or
    bfloat16, torch's promotion of x's and the weight's otherwise. The mix
    is no corner case: T5 run in half precision keeps its `wo` projections,
    and so its residual stream, in float32. A mixed call is computed in the
    wider dtype and rounded once (T5 rounds x / rms, then the product)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        wide = torch.promote_types(x.dtype, weight.dtype)
        out = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else wide
        options = dict(group_size=self.group_size, backend=self.backend)
        if x.dtype == out == weight.dtype:
            return rms_norm(x, self.normalized_shape, weight, self.eps, **options)
        y = rms_norm(x.to(wide), self.normalized_shape, weight.to(wide), self.eps, **options)
        return y.to(out)


class UnweightedRMSNorm(_NotScriptable, torch.nn.Module):
    """x / rms(x) over the last dim, whatever its size, with no weight:
    transformers' weightless RMSNorms (nanochat's; Gemma 3n's and 4's built
    with with_scale=False), statistics in float32, rounded once to x's dtype."""

    def __init__(self, eps: float = 1e-6, *, backend=None):
        super().__init__()
        self.eps = eps
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, x.shape[-1:], None, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class GemmaRMSNorm(_NotScriptable, torch.nn.Module):
    """Gemma's RMSNorm (transformers' GemmaRMSNorm, and Gemma 2's and 3's):
    y = x / rms(x) * (1 + weight), computed in float32 and rounded once to
    x's dtype, the weight stored as an offset from one (zeros at init). The
    same parameter and state_dict as transformers' module; pyext.rms_norm
    with the float32 weight 1 + weight. group_size (keyword): over each
    group of that many features (Qwen4-Exp's hyper-connection norms)."""

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None, *, group_size=None, backend=None):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))
        self.group_size, self.backend = group_size, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight.shape, 1.0 + self.weight.float(), self.eps, group_size=self.group_size,
                        backend=self.backend)

    def extra_repr(self) -> str:
        groups = f", group_size={self.group_size}" if self.group_size else ""
        return f"{tuple(self.weight.shape)}, eps={self.eps}{groups}"


class RMSNormGated(_NotScriptable, torch.nn.Module):
    """The gated RMSNorm of linear attention and Mamba layers, as
    transformers' modules hold it (a weight of the features, ones at init)
    and call it, forward(hidden_states, gate=None); see pyext.rms_norm_gated.
    norm_before_gate: norm(x) * weight * act(gate) (Qwen3-Next's); otherwise
    norm(x * act(gate)) * weight (Mamba 2's), over groups of group_size
    features. y is in x's dtype, or with promote in the promoted dtype of x
    and the weight (Mamba 2's, whose ungated norm, gate None, rounds
    norm(x) to x's dtype before the weight); gate None: norm(x) * weight."""

    def __init__(self, dim: int, eps: float = 1e-6, activation: str = "silu", norm_before_gate: bool = True,
                 group_size=None, promote: bool = False, device=None, dtype=None, *, backend=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.eps, self.activation, self.norm_before_gate = eps, activation, norm_before_gate
        self.group_size, self.promote = group_size, promote
        self.backend = backend

    def forward(self, hidden_states: torch.Tensor, gate=None) -> torch.Tensor:
        x, weight = hidden_states, self.weight
        if gate is None:
            groups = x.unflatten(-1, (-1, self.group_size or x.shape[-1]))
            if self.promote:
                return weight * rms_norm(groups, groups.shape[-1:], None, self.eps, backend=self.backend).flatten(-2)
            y = rms_norm(groups.float(), groups.shape[-1:], None, self.eps, backend=self.backend).flatten(-2)
            return (weight.float() * y).to(x.dtype)
        if self.promote:  # computed in the promoted dtype, so y's gradient comes back in it too
            x = x.to(torch.promote_types(x.dtype, weight.dtype))
        return rms_norm_gated(x, gate, weight, self.eps, activation=self.activation,
                              norm_before_gate=self.norm_before_gate, group_size=self.group_size,
                              backend=self.backend)

    def extra_repr(self) -> str:
        return (f"{tuple(self.weight.shape)}, eps={self.eps}, activation={self.activation}, "
                f"norm_before_gate={self.norm_before_gate}, group_size={self.group_size}, promote={self.promote}")


class MultiheadAttention(_NotScriptable, torch.nn.MultiheadAttention):
    """torch.nn.MultiheadAttention whose attention runs through
    pyext.scaled_dot_product_attention when `need_weights=False`: with no
    mask, with an attn_mask ((L, S) or (B * num_heads, L, S)) and/or a
    key_padding_mask ((B, S)), boolean (True: not attended) or additive, of
    one dtype, and with is_causal=True and the causal attn_mask (torch's own
    forward takes that as the hint that the mask is causal and attends
    causally without it, as nn.TransformerEncoder does; given a
    key_padding_mask too, it adds the two, and so does this one). Packed
    in-projection, batched input. Every other call (weights asked for, masks
    of other shapes or of two dtypes, bias_k/bias_v, add_zero_attn,
    separate q/k/v projection weights, inputs torch's forward refuses: an
    embedding size not the module's, keys and values of two shapes) is
    torch's own forward, unchanged, with its errors and warnings. So is,
    under backend "auto", a call in eval mode with no gradient to compute:
    torch's inference fast path (torch._native_multi_head_attention), as
    nn.TransformerEncoder keeps it in a patched model."""

    def __init__(self, *args, backend=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        sdpa_mask = None
        if not (need_weights or not self._runs_pyexts_attention() or self._torchs_inference(query, key, value)
                or query.dim() != 3 or query.shape[-1] != self.embed_dim or key.shape != value.shape):
            sdpa_mask = self._sdpa_mask(query, key, key_padding_mask, attn_mask, is_causal)
        if sdpa_mask is None:
            from pyext.patch.routing import outside_routing
            with outside_routing():  # in a patched model, torch's SDPA and fast path, as if unpatched
                return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                       average_attn_weights, is_causal)
        mask, causal = sdpa_mask
        from pyext.ops.attention import scaled_dot_product_attention
        self_attention = query is key is value
        if not self.batch_first:  # (L, B, E) -> (B, L, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, heads = query.shape[0], self.num_heads

        def split_heads(t):  # (B, S, E) -> (B, H, S, E / H), a view
            return t.view(batch, t.shape[1], heads, self.head_dim).transpose(1, 2)

        if self_attention:  # one packed projection, as torch's own forward does
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
            b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
            q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        q, k, v = split_heads(q), split_heads(k), split_heads(v)
        out = scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=causal, backend=self.backend)
        if self.batch_first:  # (B, H, L, D) -> (B, L, E)
            out = out.transpose(1, 2).reshape(batch, -1, self.embed_dim)
        else:  # -> (L, B, E), contiguous as torch's forward returns it
            out = out.permute(2, 0, 1, 3).reshape(-1, batch, self.embed_dim)
        return F.linear(out, self.out_proj.weight, self.out_proj.bias), None

    def _runs_pyexts_attention(self) -> bool:
        """Whether a call can run pyext's attention at all: not with bias_k /
        bias_v, add_zero_attn, or separate key and value sizes (kdim, vdim)."""
        return self.bias_k is None and not self.add_zero_attn and self._qkv_same_embed_dim

    def _torchs_inference(self, *inputs) -> bool:
        """Whether torch's forward takes this call: in eval mode, no gradient
        to compute, under backend "auto"."""
        return not self.training and _backend.is_auto(self.backend) and not (
            torch.is_grad_enabled() and any(t.requires_grad for t in (*inputs, *self.parameters())))

    def _sdpa_mask(self, query, key, key_padding_mask, attn_mask, is_causal):
        """(attn_mask, is_causal) for SDPA on (B, H, L, S) heads, meaning what
        torch's forward makes of the masks (F.multi_head_attention_forward),
        or None where the call is left to torch's forward. Boolean masks stay
        boolean, inverted (MHA's True is not attended, SDPA's attended): the
        kernels skip blocks a boolean mask hides; additive ones are added."""
        if is_causal and attn_mask is None:
            return None  # torch's forward raises
        if is_causal and key_padding_mask is None:
            return None, True  # the hint: causal, the mask unread
        if self.batch_first:
            batch, tgt_len, src_len = query.shape[0], query.shape[1], key.shape[1]
        else:
            batch, tgt_len, src_len = query.shape[1], query.shape[0], key.shape[0]
        masks = []
        if attn_mask is not None:
            if attn_mask.shape == (tgt_len, src_len):
                masks.append(attn_mask)
            elif attn_mask.shape == (batch * self.num_heads, tgt_len, src_len):
                masks.append(attn_mask.unflatten(0, (batch, self.num_heads)))
            else:
                return None
        if key_padding_mask is not None:
            if key_padding_mask.shape != (batch, src_len):
                return None
            masks.append(key_padding_mask.view(batch, 1, 1, src_len))
        if not masks:
            return None, False
        dtype = masks[0].dtype
        if any(m.dtype != dtype for m in masks) or not (dtype == torch.bool or dtype.is_floating_point):
            return None
        if dtype == torch.bool:
            return ~functools.reduce(torch.logical_or, masks), False
        return functools.reduce(torch.add, masks), False
