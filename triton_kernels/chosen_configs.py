"""An autotuned kernel launched past triton.autotune once it has chosen.

triton.autotune times every config on the first launch of a key and keeps
the fastest, but every later launch works the key out again in Python: a
dict of all the kernel's arguments, filtered through the list of their
names, and str() of each tensor's dtype. For the attention kernels (20-60
arguments) that is about 30 us a launch on this project's CPU machine, and
2.5-3x that on the H200 machine's, three launches a forward and backward
(benchmarks/NOTES.md, "Host cost of a call"). The launch functions hold
that key already (the constexprs they pass, the sequence buckets, the
inputs' dtypes), so each kernel remembers its choice per key here, and a
later launch of the key goes straight to the jitted kernel with it.
"""
import threading


class ChosenConfigs:
    """launch(grid, key, *args, **kwargs) of an autotuned kernel: the first
    launch of a key runs the autotuner, which chooses (timing each config on
    a GPU); the next ones launch its choice directly, its pre_hook applied
    (the descriptor forward's boxes) as the autotuner would."""

    def __init__(self, autotuned):
        self.autotuned = autotuned
        self._chosen = {}  # key -> (config, its launch kwargs)
        self._choosing = threading.Lock()  # best_config is the autotuner's last choice, whichever thread made it

    def launch(self, grid, key, *args, **kwargs):
        """key: what the autotuner's key holds besides kwargs (the constexprs,
        added here): the sequence buckets and the dtypes of the tensor
        arguments. It may be finer than the autotuner's, never coarser: a
        config chosen for another key can be one that does not fit this one."""
        key = (key, tuple(kwargs.items()))
        chosen = self._chosen.get(key)
        if chosen is None:
            with self._choosing:
                self.autotuned[grid](*args, **kwargs)
                config = self.autotuned.best_config
            self._chosen[key] = config, config.all_kwargs()
            return
        config, config_kwargs = chosen
        if config.pre_hook is not None:
            config.pre_hook({**dict(zip(self.autotuned.arg_names, args)), **kwargs, **config_kwargs})
        self.autotuned.fn[grid](*args, **kwargs, **config_kwargs)
