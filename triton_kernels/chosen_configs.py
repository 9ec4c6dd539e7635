"""An autotuned kernel launched past triton.autotune once it has chosen, its
configs compiled all at once before it chooses.

triton.autotune times every config on the first launch of a key and keeps
the fastest, but every later launch works the key out again in Python: a
dict of all the kernel's arguments, filtered through the list of their
names, and str() of each tensor's dtype. For the attention kernels (20-60
arguments) that is about 30 us a launch on this project's CPU machine, and
about 3.5x that on the H200 machine's, three launches a forward and backward
(benchmarks/NOTES.md, "Host cost of a call"). The launch functions hold
that key already (the constexprs they pass, the sequence buckets, the
inputs' dtypes), so each kernel remembers its choice per key here, and a
later launch of the key goes straight to the jitted kernel with it.

On a fresh machine (no Triton cache) the autotuner's first launch is mostly
compiling, one config after another: about 0.5 s a config on our CPU, 1.5 s
on the GPU machine's, 5-9 configs a kernel. So before it times them, every
config it will time is handed to a thread pool as a compile job (Triton's
AsyncCompileMode: its LLVM passes give up the GIL, ptxas is a process of
its own), and the autotuner finds them compiled (benchmarks/NOTES.md,
"Triton compiles on a thread each"). What it times and picks is unchanged.

The autotuners built by `autotune` below time each config over 25 ms of
runs after 5 of warm-up (`tuning_timer`), not Triton's 100 after 25: at
training sizes (0.1-1 ms a launch) a config's median still comes from
dozens to hundreds of runs, and a process tunes once per kernel, head dim,
sequence bucket and feature set, 5-9 configs each: the benchmark suite's
full grid some 330 times (benchmarks/NOTES.md, "Tuning time"), a user's
first training step a few times.
"""
import functools
import inspect
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import triton
from triton.runtime import driver

try:
    from triton.runtime._async_compile import AsyncCompileMode
except ImportError:  # a Triton without it: the autotuner compiles the configs one at a time
    AsyncCompileMode = None
if AsyncCompileMode is not None and "ignore_errors" not in inspect.signature(AsyncCompileMode).parameters:
    # Triton 3.5's raises at the end of the block for a config that fails to compile, which the
    # autotuner would have skipped: there too the autotuner compiles them one at a time
    AsyncCompileMode = None


def tuning_timer(kernel_call, quantiles):
    """The autotuners' timer: the active driver's (triton.testing.do_bench on
    a GPU) over 25 ms of runs after 5 ms of warm-up."""
    return driver.active.get_benchmarker()(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def autotune(configs, key, **kwargs):
    """triton.autotune timing with `tuning_timer`."""
    return triton.autotune(configs=configs, key=key, do_bench=tuning_timer, **kwargs)


@functools.lru_cache(maxsize=None)
def _compile_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="pyext-triton-compile")


def _compile_configs(autotuned, grid, args, kwargs):
    """Compiles, on the pool and without running, each config the autotuner
    will time for this launch: those its prune keeps, each with its pre_hook
    applied first, as the autotuner applies it before a timed run (the
    descriptor forward's sets the descriptors' boxes, part of the kernel's
    signature). A config that fails to compile is left to the autotuner,
    which skips it as it always has."""
    autotuned.nargs = dict(zip(autotuned.arg_names, args))  # what the prune reads
    with AsyncCompileMode(_compile_pool(), ignore_errors=True):
        for config in autotuned.prune_configs(kwargs):
            current = dict(kwargs, **config.all_kwargs())
            if config.pre_hook is not None:
                config.pre_hook({**autotuned.nargs, **current})
            autotuned.fn.run(*args, grid=grid, warmup=True, **current)


class ChosenConfigs:
    """launch(grid, key, *args, **kwargs) of an autotuned kernel: the first
    launch of a key compiles every config at once and runs the autotuner,
    which chooses (timing each config on a GPU); the next ones launch its
    choice directly, its pre_hook applied (the descriptor forward's boxes)
    as the autotuner would. `choices` records each key's choice and the
    median ms of every config timed for it (none where the autotuner had one
    config, or had chosen for its own, coarser key), for the benchmark reports."""

    def __init__(self, autotuned):
        self.autotuned = autotuned
        self._chosen = {}  # key -> (config, its launch kwargs)
        self._choosing = threading.Lock()  # best_config is the autotuner's last choice, whichever thread made it
        self.choices = []  # (key, config, {config timed: median ms}), in the order chosen

    def launch(self, grid, key, *args, **kwargs):
        """key: what the autotuner's key holds besides kwargs (the constexprs,
        added here): the sequence buckets and the dtypes of the tensor
        arguments. It may be finer than the autotuner's, never coarser: a
        config chosen for another key can be one that does not fit this one."""
        key = (key, tuple(kwargs.items()))
        chosen = self._chosen.get(key)
        if chosen is None:
            with self._choosing:
                if AsyncCompileMode is not None and len(self.autotuned.configs) > 1:
                    _compile_configs(self.autotuned, grid, args, kwargs)
                self.autotuned.configs_timings = None  # set again only if this launch times the configs
                self.autotuned[grid](*args, **kwargs)
                config = self.autotuned.best_config
                # [median, 20th, 80th percentile] from tuning_timer; a bare median from another timer
                timed = {c: ms[0] if isinstance(ms, (list, tuple)) else ms
                         for c, ms in (self.autotuned.configs_timings or {}).items()}
            self._chosen[key] = config, config.all_kwargs()
            self.choices.append((key, config, timed))
            return
        config, config_kwargs = chosen
        if config.pre_hook is not None:
            config.pre_hook({**dict(zip(self.autotuned.arg_names, args)), **kwargs, **config_kwargs})
        self.autotuned.fn[grid](*args, **kwargs, **config_kwargs)
