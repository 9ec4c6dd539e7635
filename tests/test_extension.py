"""The CUDA extension pyext._C: built, loadable, its ops registered.

`make test` sets PYEXT_REQUIRE_CUDA_EXT=1 where nvcc is present, so a CUDA
build that silently failed fails here instead of being skipped.
"""
import os

import pytest
import torch

from pyext import _backend

REQUIRED = os.environ.get("PYEXT_REQUIRE_CUDA_EXT") == "1"

if not _backend.CUDA_BUILT and not REQUIRED:
    pytest.skip(f"extension not built: {_backend._CUDA_BUILD_NOTE}", allow_module_level=True)

CUDA_OPS = {
    "gelu_fwd_cuda": "pyext::gelu_fwd_cuda(Tensor x, str approximate) -> Tensor",
    "gelu_bwd_cuda": "pyext::gelu_bwd_cuda(Tensor grad, Tensor x, str approximate) -> Tensor",
    "adamw_step_cuda": (
        "pyext::adamw_step_cuda(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
        "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor[] state_steps, float lr, "
        "Tensor? lr_tensor, float beta1, float beta2, float weight_decay, float eps, bool amsgrad, "
        "bool maximize, Tensor? grad_scale, Tensor? found_inf) -> ()"),
}


def test_extension_is_built():
    assert _backend.CUDA_BUILT, _backend._CUDA_BUILD_NOTE


@pytest.mark.parametrize("name", sorted(CUDA_OPS))
def test_op_is_registered_with_the_dispatcher(name):
    op = getattr(torch.ops.pyext, name).default
    assert str(op._schema) == CUDA_OPS[name]
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA")


def test_fake_implementations_give_shapes_without_a_gpu():
    x = torch.empty(3, 5, device="meta", dtype=torch.bfloat16)
    assert torch.ops.pyext.gelu_fwd_cuda(x, "none").shape == x.shape
    assert torch.ops.pyext.gelu_bwd_cuda(x, x, "tanh").dtype == x.dtype


def test_adamw_fake_implementation_runs_without_a_gpu():
    p = torch.empty(3, 5, device="meta")
    m, step = torch.empty(3, 5, device="meta"), torch.empty((), device="meta")
    assert torch.ops.pyext.adamw_step_cuda([p], [p], [m], [m], [], [step], 1e-3, None, 0.9, 0.999,
                                           0.01, 1e-8, False, False, None, None) is None
