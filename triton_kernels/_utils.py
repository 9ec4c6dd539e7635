"""Host-side helpers shared by the launch functions."""
import contextlib

import torch


def on_device(t: torch.Tensor):
    """Launch on t's GPU (Triton launches on the current device); no-op on CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def poisonable_out(out, like: torch.Tensor) -> torch.Tensor:
    """`out` if given (tests pass a NaN-filled one), else a new contiguous tensor."""
    if out is None:
        return torch.empty_like(like, memory_format=torch.contiguous_format)
    if out.shape != like.shape or out.dtype != like.dtype or not out.is_contiguous():
        raise ValueError(f"out must be contiguous {like.dtype} of shape {tuple(like.shape)}, "
                         f"got {out.dtype} {tuple(out.shape)}")
    return out
