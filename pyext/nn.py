"""Drop-in modules: subclasses of torch.nn's, same constructor and state_dict,
whose forward runs pyext's kernels. `backend` (keyword only) pins a backend."""
import torch

from pyext.ops.gelu import gelu


class GELU(torch.nn.GELU):
    def __init__(self, approximate: str = "none", *, backend=None):
        super().__init__(approximate=approximate)
        self.backend = backend

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return gelu(input, self.approximate, backend=self.backend)
