"""Pure PyTorch reference implementations.

They are the "torch" backend and, run in float64, the test oracle. Each
mirrors the torch function whose semantics pyext promises.
"""
import torch
import torch.nn.functional as F


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    return F.gelu(x, approximate=approximate)


def layer_norm(x: torch.Tensor, normalized_shape, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    # float16/bfloat16 x with float32 weight and bias: fp32 math, output in x's
    # dtype. torch does this on CPU; its CUDA kernel refuses the mix, so spell it out.
    if any(p is not None and p.dtype != x.dtype for p in (weight, bias)):
        return F.layer_norm(x.float(), normalized_shape, weight, bias, eps).to(x.dtype)
    return F.layer_norm(x, normalized_shape, weight, bias, eps)


def rms_norm(x: torch.Tensor, normalized_shape, weight=None, eps=None) -> torch.Tensor:
    return F.rms_norm(x, normalized_shape, weight, eps)
