"""FLOP counts of the attention ops for torch.utils.flop_counter.FlopCounterMode,
so that a model's count (and a utilisation computed from it) is the same
whether its attention runs torch's SDPA kernels or pyext's: without a formula
the counter sees each op and counts it as 0.

torch's convention for its own flash and memory-efficient kernels, followed
here: the matrix products of dense attention, 2 FLOPs a multiply-add, per
batch entry and query head, whatever a mask, a window or the causal flag hides:
    forward   S = Q K^T, O = P V                              2 Sq Sk (D + Dv)
    backward  S again, dP = dO V^T, dV = P^T dO, dQ = dS K,
              dK = dS^T Q                                     2 Sq Sk (3 D + 2 Dv)
Dropout, a soft cap and sinks add no products. Packed (varlen) calls sum over
their sequences; where the offsets cannot be read (fake or meta tensors) each
sequence counts at the call's maximum lengths, as torch counts its own
packed kernels.
"""
import logging

import torch

# torch's flop_counter logs a warning on import where triton is not
# installed (its triton kernels' counts); importing pyext should not.
_flop_log = logging.getLogger("torch.utils.flop_counter")
_level = _flop_log.level
_flop_log.setLevel(logging.ERROR)
try:
    from torch.utils.flop_counter import register_flop_formula
finally:
    _flop_log.setLevel(_level)

# The ops on (B, H, S, D) tensors whose forward takes q, k, v first and whose
# backward takes dout, q, k, v first, for each kernel backend that has them.
_DENSE_OPS = ("flash_attn", "flash_attn_dropout", "flash_attn_masked", "flash_attn_extras")
_BACKENDS = ("triton", "cuda")


def _dense_flops(batch_heads: int, seqlen_q: int, seqlen_k: int, head_dim: int, value_dim: int,
                 backward: bool) -> int:
    products = 3 * head_dim + 2 * value_dim if backward else head_dim + value_dim
    return 2 * batch_heads * seqlen_q * seqlen_k * products


def _fwd_flops(q_shape, k_shape, v_shape, *_, out_shape=None, **__) -> int:
    b, h, s_q, d = q_shape
    return _dense_flops(b * h, s_q, k_shape[2], d, v_shape[3], backward=False)


def _bwd_flops(dout_shape, q_shape, k_shape, v_shape, *_, out_shape=None, **__) -> int:
    b, h, s_q, d = q_shape
    return _dense_flops(b * h, s_q, k_shape[2], d, v_shape[3], backward=True)


def _sequence_lengths(offsets: torch.Tensor, max_len: int):
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor
    if isinstance(offsets, (FakeTensor, FunctionalTensor)) or offsets.device.type == "meta":
        return [max_len] * (offsets.shape[0] - 1)
    return offsets.diff().tolist()


def _varlen_flops(backward: bool):
    """For the packed ops, on (total, H, D) tensors, whose forward takes q, k,
    v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k first and whose
    backward takes dout, q, k, v, out, out_lo, lse and then the same four."""
    def flops(*args, out_val=None, **_) -> int:
        if backward:
            args = args[1:4] + args[7:]
        q, k, v, cu_q, cu_k, max_q, max_k = args[:7]
        heads, d, dv = q.shape[1], q.shape[2], v.shape[2]
        return sum(_dense_flops(heads, s_q, s_k, d, dv, backward)
                   for s_q, s_k in zip(_sequence_lengths(cu_q, max_q), _sequence_lengths(cu_k, max_k)))
    return flops


def _reference_varlen_flops(backward: bool):
    """For the packed reference's ops (attention_varlen_reference.py), whose
    forward takes q, k, v, cu_seqlens_q, cu_seqlens_k first and whose
    backward takes dout, dlse and then the same; offsets that hold no values
    count each sequence as long as the whole batch (an upper bound)."""
    def flops(*args, out_val=None, **_) -> int:
        q, k, v, cu_q, cu_k = args[2:7] if backward else args[:5]
        heads, d, dv = q.shape[1], q.shape[2], v.shape[2]
        return sum(_dense_flops(heads, s_q, s_k, d, dv, backward) for s_q, s_k in
                   zip(_sequence_lengths(cu_q, q.shape[0]), _sequence_lengths(cu_k, k.shape[0])))
    return flops


def _ops(names):
    return [getattr(torch.ops.pyext, name) for name in names if hasattr(torch.ops.pyext, name)]


register_flop_formula(_ops(f"{op}_fwd_{b}" for op in _DENSE_OPS for b in _BACKENDS))(_fwd_flops)
register_flop_formula(_ops(f"{op}_bwd_{b}" for op in _DENSE_OPS for b in _BACKENDS))(_bwd_flops)
register_flop_formula(_ops(f"flash_attn_varlen_fwd_{b}" for b in _BACKENDS), get_raw=True)(_varlen_flops(False))
register_flop_formula(_ops(f"flash_attn_varlen_bwd_{b}" for b in _BACKENDS), get_raw=True)(_varlen_flops(True))
register_flop_formula(_ops(["flash_attn_varlen_reference"]), get_raw=True)(_reference_varlen_flops(False))
register_flop_formula(_ops(["flash_attn_varlen_reference_bwd"]), get_raw=True)(_reference_varlen_flops(True))
