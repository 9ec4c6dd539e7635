"""benchmarks.parallel_compile on a pretend H100: Triton's JIT and autotuner
run as on a GPU, compiling real sm_90 cubins, with the launches no-ops.

Run as a script, without TRITON_INTERPRET (test_benchmark_smoke.py runs it
in a subprocess). Every compile is recorded with the thread it ran on:
- a plain first call of an autotuned kernel compiles its configs one by one
  on the calling thread (the control);
- inside parallel_autotune_compiles() the same call compiles each config
  once, on the pool's threads, and the autotuner itself compiles none;
- so does pyext's descriptor attention forward, whose configs set the
  descriptors' boxes (part of the signature) in a pre_hook.
"""
import importlib.util
import os
import sys
import threading

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.compiler  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

# The module alone: the benchmarks package turns the interpreter on where there is no GPU.
_spec = importlib.util.spec_from_file_location("parallel_compile",
                                               os.path.join(ROOT, "benchmarks", "parallel_compile.py"))
parallel_compile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(parallel_compile)


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
        return lambda kernel_call, quantiles: (kernel_call(), [1.0, 1.0, 1.0])[1]


compiles = []  # (kernel name, num_warps, thread name): each compile, as it starts
_compile = triton.compiler.compile


def _recording_compile(src, *args, **kwargs):
    compiles.append((src.fn.__name__, kwargs["options"]["num_warps"], threading.current_thread().name))
    return _compile(src, *args, **kwargs)


@triton.autotune(configs=[triton.Config({"BLOCK": 32 * w}, num_warps=w) for w in (1, 2, 4, 8)], key=["n"])
@triton.jit
def doubled(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, 2 * tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


def call(x):
    doubled[lambda meta: (triton.cdiv(x.numel(), meta["BLOCK"]),)](x, x.numel())


def main():
    assert parallel_compile.AsyncCompileMode is not None, f"Triton {triton.__version__} has no AsyncCompileMode"
    driver.set_active(PretendHopper())
    triton.compiler.compile = _recording_compile  # the JIT binds it at its first call

    call(torch.zeros(1024, dtype=torch.float16))
    assert sorted(w for _, w, _ in compiles) == [1, 2, 4, 8], compiles
    assert {t for *_, t in compiles} == {threading.current_thread().name}, compiles

    compiles.clear()
    with parallel_compile.parallel_autotune_compiles():
        call(torch.zeros(1024))  # float32: a new variant of each config
        call(torch.zeros(2048))  # a new autotune key, the same variants
    assert sorted(w for _, w, _ in compiles) == [1, 2, 4, 8], compiles
    assert all(t.startswith("triton-compile") for *_, t in compiles), compiles

    from pyext.triton_kernels import flash_attention
    flash_attention.forward._has_tma = lambda t: True
    compiles.clear()
    q = torch.randn(1, 2, 256, 128, dtype=torch.bfloat16)
    with parallel_compile.parallel_autotune_compiles():
        flash_attention.flash_attn_fwd(q, q, q, 0.1, False, 0)
    tuner = flash_attention.forward._fwd_tma_kernel
    names = {name for name, *_ in compiles}
    assert names == {"_fwd_tma_kernel"}, compiles
    assert len(compiles) == len(tuner.configs_timings), (compiles, tuner.configs_timings)
    assert all(t.startswith("triton-compile") for *_, t in compiles), compiles
    print(f"parallel compiles: {len(compiles)} descriptor forward configs on the pool (Triton {triton.__version__})")


if __name__ == "__main__":
    main()
