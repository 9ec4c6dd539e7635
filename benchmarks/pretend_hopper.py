"""A pretend H100 as Triton's active driver, for work on Triton's host side
without a GPU: its JIT compiles real sm_90 kernels (PTX and cubin, no device
needed), and its launcher, autotuner and pyext's launch functions run as on
the GPU, on CPU tensors; loading a cubin and launching it do nothing.
Used by triton_launch_cost.py and tests/parallel_compile_check.py; run
without TRITON_INTERPRET (the kernels must be real @triton.jit functions)."""
import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver


class PretendHopper:
    """What Triton's JIT and autotuner ask of the active driver: device 0,
    stream 0, an sm_90 target with its shared memory; a cubin "loads" as a
    placeholder and a launch does nothing; every config times the same."""

    def __init__(self):
        self.utils = self
        self.launcher_cls = lambda src, metadata: (lambda *args, **kwargs: None)

    def is_active(self):
        return True

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}

    def load_binary(self, name, kernel, shared, device):
        return object(), object(), 32, 0, 1024  # module, function, registers, spills, max threads

    def get_benchmarker(self):
        return lambda kernel_call, quantiles, warmup=25, rep=100: (kernel_call(), [1.0, 1.0, 1.0])[1]


def install():
    """Makes the pretend H100 Triton's active driver."""
    driver.set_active(PretendHopper())
