"""DTensor sharding rules for the kernels' ops, so that tensor parallelism's
activations run the kernels on each rank's part.

Norms: torch's SequenceParallel style hands them x sharded along the
sequence, the weight replicated, and the kernels then run on each rank's
rows. A row's statistics need the whole row, so x may be sharded along any
of its leading (batch) dims, never along normalized_shape (nor, for the
norms over groups of a row, along its groups); y, mean and rstd are sharded
as x is. In the backward dx is sharded as x, and dweight and dbias, each
rank's sum over its own rows, are Partial: the sum over ranks is the
gradient (what torch's own layer_norm rule gives).

Gated RMSNorm is a norm of whole rows (or groups of a row) too: the gate
placed as x, and in the backward dgate as x, dweight Partial.

GELU is elementwise: x (and the backward's grad) replicated or sharded
along any dim, the result as x. A Partial x is not: gelu(a + b) is not
gelu(a) + gelu(b).

Anything else (x sharded along a normalized dim, a sharded weight, a
Partial x) DTensor redistributes to one of these first, as for torch's op.
Registered by an op's public function when it first meets a DTensor:
importing torch.distributed.tensor costs about 0.25 s, which a process
without tensor parallelism should not pay at `import pyext`.
"""
import functools

import torch
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding


def _replicated_if(tensor):
    """A parameter's placement: Replicate, or None for an argument not given."""
    return None if tensor is None else Replicate()


def _rows(x, normalized_shape):
    """x's placements a norm takes: replicated, or sharded along a leading dim."""
    return [Replicate()] + [Shard(d) for d in range(x.ndim - len(normalized_shape))]


def _layer_norm_fwd(x, normalized_shape, weight, bias, eps, *group_size):
    """(y, mean, rstd) as x (the grouped op's group_size last, unplaced)."""
    params = [_replicated_if(weight), _replicated_if(bias), None, *[None for _ in group_size]]
    return [([place] * 3, [place, None, *params]) for place in _rows(x, normalized_shape)]


def _backward(leading_dims, row_outputs, needs, row_inputs, params):
    """A norm backward's strategies: everything replicated, or the rows
    sharded along one leading dim d: the row outputs (dx, dgate) and row
    inputs (grad, x, the statistics, the gate) Shard(d), each parameter's
    gradient Partial where sharded rows sum it (one not asked for is an
    empty tensor, replicated); params: the other arguments' placements."""
    strategies = [([Replicate()] * (row_outputs + len(needs)), [Replicate()] * row_inputs + params)]
    for d in range(leading_dims):
        sums = [Partial() if need else Replicate() for need in needs]
        strategies.append(([Shard(d)] * row_outputs + sums, [Shard(d)] * row_inputs + params))
    return strategies


def _layer_norm_bwd(grad, x, mean, rstd, weight, bias, need_dweight, need_dbias, *group_size):
    """(dx, dweight, dbias): dx as x, the parameters' Partial where sharded rows sum them."""
    params = [_replicated_if(weight), _replicated_if(bias), None, None, *[None for _ in group_size]]
    # mean has x's leading dims (and the grouped op's groups)
    return _backward(mean.ndim - len(group_size), row_outputs=1, needs=[need_dweight, need_dbias],
                     row_inputs=4, params=params)


def _rms_norm_fwd(x, normalized_shape, weight, eps, *group_size):
    """(y, rstd) as x."""
    params = [_replicated_if(weight), None, *[None for _ in group_size]]
    return [([place] * 2, [place, None, *params]) for place in _rows(x, normalized_shape)]


def _rms_norm_bwd(grad, x, rstd, weight, need_dweight, *group_size):
    """(dx, dweight): as _layer_norm_bwd's."""
    params = [_replicated_if(weight), None, *[None for _ in group_size]]
    return _backward(rstd.ndim - len(group_size), row_outputs=1, needs=[need_dweight], row_inputs=3, params=params)


def _rms_norm_gated_fwd(x, gate, weight, eps, activation, norm_before_gate, group_size):
    """(y, rstd) as x, the gate placed as x."""
    options = [_replicated_if(weight), None, None, None, None]
    return [([place] * 2, [place, place, *options]) for place in _rows(x, x.shape[-1:])]


def _rms_norm_gated_bwd(grad, x, gate, rstd, weight, activation, norm_before_gate, need_dweight, group_size):
    """(dx, dgate, dweight): dx and dgate as x, dweight Partial where
    sharded rows sum it."""
    options = [_replicated_if(weight), None, None, None, None]
    return _backward(x.ndim - 1, row_outputs=2, needs=[need_dweight], row_inputs=4, params=options)


def _elementwise(x):
    return [Replicate()] + [Shard(d) for d in range(x.ndim)]


def _gelu_fwd(x, approximate):
    """y as x: replicated, or sharded along any dim."""
    return [([place], [place, None]) for place in _elementwise(x)]


def _gelu_bwd(grad, x, approximate):
    """dx as x, grad placed as x."""
    return [([place], [place, place, None]) for place in _elementwise(x)]


_NORMS = {"layer_norm_fwd": _layer_norm_fwd, "layer_norm_bwd": _layer_norm_bwd,
          "rms_norm_fwd": _rms_norm_fwd, "rms_norm_bwd": _rms_norm_bwd}
_RULES = {"norm": _NORMS, "grouped_norm": {f"grouped_{stage}": rule for stage, rule in _NORMS.items()},
          "rms_norm_gated": {"rms_norm_gated_fwd": _rms_norm_gated_fwd, "rms_norm_gated_bwd": _rms_norm_gated_bwd},
          "gelu": {"gelu_fwd": _gelu_fwd, "gelu_bwd": _gelu_bwd}}


@functools.lru_cache(maxsize=None)
def register(family: str, backend: str) -> None:
    """The rules for a family's ops ("norm", "grouped_norm", "rms_norm_gated",
    "gelu") of a kernel backend, once."""
    for stage, rule in _RULES[family].items():
        register_sharding(getattr(torch.ops.pyext, f"{stage}_{backend}").default)(rule)
