"""Every autotune config of every Triton attention kernel, forced in turn,
against the tolerance rule. The autotuner keeps the fastest config and never
looks at its result, so a config wrong only at its own block sizes (a box,
a partial last block, a rotated walk over more key blocks than one) would
pass every other test and give wrong gradients wherever it wins. On a GPU
the kernels' own (pruned) lists; on CPU, under the interpreter, the same
lists stand in for its single 16 x 16 config, block sizes 32-128 and all,
on lengths that leave each block size a partial last block."""

import pytest
import torch

from conftest import HAS_GPU, device_for
from attention_checks import check_flash, qkv
from pyext.triton_kernels.chosen_configs import ChosenConfigs
from pyext.triton_kernels.flash_attention import backward, backward_tma, forward, launch, use_loads

KINDS = {"_fwd_kernel": "fwd", "_fwd_tma_kernel": "fwd_tma", "_bwd_dkdv_kernel": "bwd", "_bwd_dkdv_dq_kernel": "bwd",
         "_bwd_dq_kernel": "bwd", "_bwd_dkdv_tma_kernel": "bwd_tma", "_bwd_dkdv_dq_tma_kernel": "bwd_tma",
         "_bwd_dq_tma_kernel": "bwd_tma"}


def _kernels():
    return {name: getattr(module, name) for module in (forward, backward, backward_tma) for name in KINDS
            if isinstance(getattr(module, name, None), ChosenConfigs)}


def _gpu_configs(kind, monkeypatch):
    """launch._configs(kind) as on a GPU (outside the interpreter)."""
    with monkeypatch.context() as m:
        m.setattr(launch, "_INTERPRET", False)
        return launch._configs(kind)


@pytest.fixture
def forced(monkeypatch):
    """A list holding the index of the config to force: every attention kernel
    launches config index % (its pruned configs) instead of asking its autotuner."""
    kernels = _kernels()
    assert set(kernels) == set(KINDS)
    if not HAS_GPU:
        for name, kernel in kernels.items():
            monkeypatch.setattr(kernel.autotuned, "configs", _gpu_configs(KINDS[name], monkeypatch))
    index = [0]

    def launch_forced(self, grid, key, *args, **kwargs):
        tuner = self.autotuned
        tuner.nargs = dict(zip(tuner.arg_names, args))  # what the prune reads
        configs = tuner.prune_configs(kwargs)
        config = configs[index[0] % len(configs)]
        launched = {**kwargs, **config.all_kwargs()}
        if config.pre_hook is not None:
            config.pre_hook({**tuner.nargs, **launched})
        tuner.fn[grid](*args, **launched)
    monkeypatch.setattr(ChosenConfigs, "launch", launch_forced)
    return index


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("loads", ["pointer", "descriptor"])
def test_every_config_of_every_attention_kernel_meets_the_rule(forced, loads, deterministic):
    if loads == "descriptor" and HAS_GPU and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the descriptor kernels run on compute capability 9.0 and up")
    # causal GQA, Sq > Sk and ragged for every block size: rows past the keys' end,
    # a partial last block of queries and of keys
    shape = (1, 4, 2, 300, 270, 128) if HAS_GPU else (1, 4, 2, 150, 135, 64)
    count = max(len(kernel.autotuned.configs) for kernel in _kernels().values())
    assert count >= 9
    for i in range(count):
        forced[0] = i
        q, k, v = qkv(shape, torch.bfloat16, device_for("triton"))
        with use_loads(loads):
            check_flash("triton", q, k, v, True, deterministic)
