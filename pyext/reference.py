"""Pure PyTorch reference implementations.

They are the "torch" backend and, run in float64, the test oracle. Each
mirrors the torch function whose semantics pyext promises.
"""
import torch
import torch.nn.functional as F


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    return F.gelu(x, approximate=approximate)
