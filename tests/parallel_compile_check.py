"""chosen_configs on a pretend H100: Triton's JIT and autotuner run as on a
GPU, compiling real sm_90 cubins, with the launches no-ops.

Run as a script, without TRITON_INTERPRET (test_chosen_configs.py runs it
in a subprocess). Every compile is recorded with the thread it ran on:
- a plain first call of an autotuned kernel compiles its configs one by one
  on the calling thread (the control);
- the same kernel launched through ChosenConfigs compiles each config once,
  on the pool's threads, and the autotuner itself compiles none;
- so does pyext's descriptor attention forward, whose configs set the
  descriptors' boxes (part of the signature) in a pre_hook;
- the attention backward there takes its descriptor kernels;
- and the attention launches after a key's first, past the autotuner,
  compile nothing: they run the variant the autotuner chose.
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


def _benchmarks_module(name):
    """benchmarks/<name>.py alone: the benchmarks package turns the interpreter on where there is no GPU."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pretend_hopper = _benchmarks_module("pretend_hopper")

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
    pretend_hopper.install()
    from pyext.triton_kernels import chosen_configs, flash_attention
    assert chosen_configs.AsyncCompileMode is not None, f"Triton {triton.__version__} has no AsyncCompileMode"
    triton.compiler.compile = _recording_compile  # the JIT binds it at its first call

    call(torch.zeros(1024, dtype=torch.float16))
    assert sorted(w for _, w, _ in compiles) == [1, 2, 4, 8], compiles
    assert {t for *_, t in compiles} == {threading.current_thread().name}, compiles

    compiles.clear()
    chosen = chosen_configs.ChosenConfigs(doubled)
    for n in (1024, 2048):  # float32: a new variant of each config; then a new key, the same variants
        x = torch.zeros(n)
        chosen.launch(lambda meta: (triton.cdiv(x.numel(), meta["BLOCK"]),), (n,), x, x.numel())
    assert sorted(w for _, w, _ in compiles) == [1, 2, 4, 8], compiles
    assert all(t.startswith("pyext-triton-compile") for *_, t in compiles), compiles

    flash_attention.loads._has_tma = lambda t: True
    compiles.clear()
    q = torch.randn(1, 2, 256, 128, dtype=torch.bfloat16)
    flash_attention.flash_attn_fwd(q, q, q, 128 ** -0.5, False, 0)
    tuner = flash_attention.forward._fwd_tma_kernel.autotuned
    names = {name for name, *_ in compiles}
    assert names == {"_fwd_tma_kernel"}, compiles
    assert len(compiles) == len(tuner.configs_timings), (compiles, tuner.configs_timings)
    assert all(t.startswith("pyext-triton-compile") for *_, t in compiles), compiles
    print(f"parallel compiles: {len(compiles)} descriptor forward configs on the pool (Triton {triton.__version__})")

    # the next launches of the key, past the autotuner, run the variant it chose: nothing new compiles
    # (the descriptors' boxes and the config's warps and stages are part of the variant)
    out, lse = flash_attention.flash_attn_fwd(q, q, q, 128 ** -0.5, False, 0)
    compiles.clear()
    for deterministic in (True, False):  # the dK/dV and dQ kernels; the dK/dV kernel with atomic dQ
        flash_attention.flash_attn_bwd(q, q, q, q, out, lse, 128 ** -0.5, False, 0, deterministic)
    names = {name for name, *_ in compiles}
    assert names == {"_bwd_delta_kernel", "_bwd_kv_tma_kernel", "_bwd_dq_tma_kernel"}, names
    compiles.clear()
    for _ in range(2):
        flash_attention.flash_attn_fwd(q, q, q, 128 ** -0.5, False, 0)
        for deterministic in (True, False):
            flash_attention.flash_attn_bwd(q, q, q, q, out, lse, 128 ** -0.5, False, 0, deterministic)
    assert compiles == [], compiles
    print("past the autotuner: the chosen variants, none compiled anew")


if __name__ == "__main__":
    main()
