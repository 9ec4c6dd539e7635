"""Drop-in modules: subclasses of torch.nn's, same constructor and state_dict,
whose forward runs pyext's kernels. `backend` (keyword only) pins a backend."""
import torch

from pyext.ops.gelu import gelu
from pyext.ops.layer_norm import layer_norm, rms_norm


class GELU(torch.nn.GELU):
    def __init__(self, approximate: str = "none", *, backend=None):
        super().__init__(approximate=approximate)
        self.backend = backend

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return gelu(input, self.approximate, backend=self.backend)


class LayerNorm(torch.nn.LayerNorm):
    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, *, backend=None):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                         device=device, dtype=dtype)
        self.backend = backend

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, backend=self.backend)


class RMSNorm(torch.nn.RMSNorm):
    def __init__(self, normalized_shape, eps=None, elementwise_affine: bool = True, device=None, dtype=None, *,
                 backend=None):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, device=device,
                         dtype=dtype)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.normalized_shape, self.weight, self.eps, backend=self.backend)
