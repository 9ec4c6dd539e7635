"""An autotuned Triton kernel's configs, compiled all at once.

On its first call with a new key, Triton's autotuner compiles the configs it
times one after another, so on a fresh machine a case's first call is mostly
compiling: about 0.5 s a config on our CPU, 1.5 s on the GPU machine's, where
the attention backward times 8-16 configs a kernel (benchmarks/NOTES.md,
"Triton compiles on a thread each"). Inside `parallel_autotune_compiles()`
an autotuner first hands every config it will time to a thread pool as a
compile job (Triton's AsyncCompileMode: its LLVM passes give up the GIL and
ptxas is a process of its own), waits for them, and then runs as it always
does, finding each config compiled. What it times and picks is unchanged.
"""
import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

from triton.runtime.autotuner import Autotuner

try:
    from triton.runtime._async_compile import AsyncCompileMode
except ImportError:  # a Triton without it: the configs compile one at a time, as before
    AsyncCompileMode = None


@lru_cache(maxsize=None)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="triton-compile")


def _compile_configs(tuner: Autotuner, args: tuple, kwargs: dict) -> None:
    """Compiles, without running, each config that `tuner.run(*args, **kwargs)`
    would time: the configs its prune keeps, each with its pre_hook applied
    first, as the autotuner applies it before each timed run (our descriptor
    forward's sets the tensor descriptors' boxes, which are part of the
    kernel's signature)."""
    tuner.nargs = dict(zip(tuner.arg_names, args))
    for config in tuner.prune_configs(kwargs):
        current = dict(kwargs, **config.all_kwargs(), warmup=True)
        if config.pre_hook is not None:
            config.pre_hook({**tuner.nargs, **current})
        tuner.fn.run(*args, **current)


@contextlib.contextmanager
def parallel_autotune_compiles():
    """While active, an autotuned kernel's call compiles all its configs on the
    pool before the autotuner runs (a no-op where they are compiled already).
    A config that fails to compile is left to the autotuner, which skips it
    as it always has."""
    if AsyncCompileMode is None:
        yield
        return
    run = Autotuner.run

    def compile_then_run(self, *args, **kwargs):
        if len(self.configs) > 1:
            with AsyncCompileMode(_pool(), ignore_errors=True):
                _compile_configs(self, args, kwargs)
        return run(self, *args, **kwargs)

    Autotuner.run = compile_then_run
    try:
        yield
    finally:
        Autotuner.run = run
