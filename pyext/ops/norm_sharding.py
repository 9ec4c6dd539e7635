"""DTensor sharding rules for the LayerNorm and RMSNorm ops: tensor
parallelism's sequence-parallel norms (torch's SequenceParallel style) hand
them x sharded along the sequence, the weight replicated, and the kernels
then run on each rank's rows.

A row's statistics need the whole row, so x may be sharded along any of its
leading (batch) dims, never along normalized_shape; y, mean and rstd are
sharded as x is. In the backward dx is sharded as x, and dweight and dbias,
each rank's sum over its own rows, are Partial: the sum over ranks is the
gradient (what torch's own layer_norm rule gives). Anything else (x sharded
along a normalized dim, a sharded weight, a Partial x) DTensor redistributes
to one of these first, as for torch's op.
Registered by layer_norm.py when a norm first meets a DTensor: importing
torch.distributed.tensor costs about 0.25 s, which a process without tensor
parallelism should not pay at `import pyext`.
"""
import functools

import torch
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding


def _replicated_if(tensor):
    """A parameter's placement: Replicate, or None for an argument not given."""
    return None if tensor is None else Replicate()


def _layer_norm_fwd(x, normalized_shape, weight, bias, eps):
    """(y, mean, rstd) as x: replicated, or sharded along a leading dim."""
    params = [_replicated_if(weight), _replicated_if(bias), None]
    return [([place] * 3, [place, None, *params])
            for place in [Replicate()] + [Shard(d) for d in range(x.ndim - len(normalized_shape))]]


def _layer_norm_bwd(grad, x, mean, rstd, weight, bias, need_dweight, need_dbias):
    """(dx, dweight, dbias): dx as x, the parameters' Partial where sharded
    rows sum them (a gradient not asked for is an empty tensor, replicated)."""
    params = [_replicated_if(weight), _replicated_if(bias), None, None]
    strategies = [([Replicate()] * 3, [Replicate()] * 4 + params)]
    for d in range(mean.ndim):  # mean has x's leading dims
        sums = [Partial() if need_dweight else Replicate(), Partial() if need_dbias else Replicate()]
        strategies.append(([Shard(d), *sums], [Shard(d)] * 4 + params))
    return strategies


def _rms_norm_fwd(x, normalized_shape, weight, eps):
    """(y, rstd) as x: replicated, or sharded along a leading dim."""
    return [([place] * 2, [place, None, _replicated_if(weight), None])
            for place in [Replicate()] + [Shard(d) for d in range(x.ndim - len(normalized_shape))]]


def _rms_norm_bwd(grad, x, rstd, weight, need_dweight):
    """(dx, dweight): as _layer_norm_bwd's."""
    params = [_replicated_if(weight), None]
    strategies = [([Replicate()] * 2, [Replicate()] * 3 + params)]
    for d in range(rstd.ndim):
        strategies.append(([Shard(d), Partial() if need_dweight else Replicate()], [Shard(d)] * 3 + params))
    return strategies


_RULES = {"layer_norm_fwd": _layer_norm_fwd, "layer_norm_bwd": _layer_norm_bwd, "rms_norm_fwd": _rms_norm_fwd,
          "rms_norm_bwd": _rms_norm_bwd}


@functools.lru_cache(maxsize=None)
def register(backends) -> None:
    """The rules for each kernel backend's norm ops (a tuple of names), once."""
    for name in backends:
        for stage, rule in _RULES.items():
            register_sharding(getattr(torch.ops.pyext, f"{stage}_{name}").default)(rule)
