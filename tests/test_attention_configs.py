"""Every autotune config of every Triton attention kernel, forced in turn,
against the tolerance rule, for each feature the kernels have. The autotuner keeps the fastest config and never
looks at its result, so a config wrong only at its own block sizes (a box,
a partial last block, a rotated walk over more key blocks than one) would
pass every other test and give wrong gradients wherever it wins. On a GPU
the kernels' own (pruned) lists; on CPU, under the interpreter, the same
lists stand in for its single 16 x 16 config, block sizes 32-128 and all,
on lengths that leave each block size a partial last block, each block
shape once (the interpreter runs no warps or stages: configs that differ
only in those are one kernel there)."""

import pytest
import torch
from triton.runtime.errors import OutOfResources

from conftest import HAS_GPU, device_for
from attention_checks import check_dropout, check_flash, check_sinks, check_softcap, qkv
from test_attention_mask import check_masked, make_mask
from test_attention_varlen import check_varlen
from pyext.triton_kernels.chosen_configs import ChosenConfigs
from pyext.triton_kernels.flash_attention import backward, backward_tma, forward, launch, use_loads

KINDS = {"_fwd_kernel": "fwd", "_fwd_tma_kernel": "fwd_tma", "_bwd_dkdv_kernel": "bwd", "_bwd_dkdv_dq_kernel": "bwd",
         "_bwd_dq_kernel": "bwd", "_bwd_dkdv_tma_kernel": "bwd_tma", "_bwd_dkdv_dq_tma_kernel": "bwd_tma",
         "_bwd_dq_tma_kernel": "bwd_tma"}


def _kernels():
    return {name: getattr(module, name) for module in (forward, backward, backward_tma) for name in KINDS
            if isinstance(getattr(module, name, None), ChosenConfigs)}


def _gpu_configs(kind, monkeypatch):
    """launch._configs(kind) as on a GPU (outside the interpreter), one of each
    set of keyword arguments (block sizes): the interpreter runs them alike."""
    with monkeypatch.context() as m:
        m.setattr(launch, "_INTERPRET", False)
        configs = launch._configs(kind)
    return list({tuple(sorted(config.kwargs.items())): config for config in configs}.values())


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


def _case(feature, shape, deterministic, seeds):
    """One call of `feature` through the Triton kernels, checked against the rule."""
    device = device_for("triton")
    if feature == "plain":
        check_flash("triton", *qkv(shape, torch.bfloat16, device), True, deterministic)
    elif feature == "softcap":
        check_softcap("triton", deterministic, shape, True, (-1, -1), 20.0, None, torch.bfloat16)
    elif feature == "sinks":
        check_sinks("triton", deterministic, shape, True, (-1, -1), 2.0, torch.float32, torch.bfloat16)
    elif feature == "window":  # with a soft cap: the window's own check has no function of its own
        check_softcap("triton", deterministic, shape, True, (shape[4] // 3, 7), 20.0, None, torch.bfloat16)
    elif feature == "dropout":
        check_dropout(*qkv(shape, torch.bfloat16, device), True, deterministic, 0.3, seeds)
    elif feature == "mask":
        q, k, v = qkv(shape, torch.bfloat16, device)
        mask = make_mask("additive", None, torch.bfloat16, device, shape=(shape[3], shape[4]))
        check_masked(q, k, v, mask, deterministic)
    else:  # a packed batch of three sequences, one short of every block size
        b, hq, hk, sq, sk, d = shape
        check_varlen("triton", deterministic, ((sq, 17, sq // 2), (sk, 40, sk // 3), hq, hk, d), True)


# (feature, loads): the descriptor kernels take plain calls, soft caps and sinks; the rest run on pointers
CASES = [(f, loads) for f in ("plain", "softcap", "sinks") for loads in ("pointer", "descriptor")] + \
    [(f, "pointer") for f in ("window", "dropout", "mask", "varlen")]


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("feature,loads", CASES, ids=str)
def test_every_config_of_every_attention_kernel_meets_the_rule(forced, feature, loads, deterministic,
                                                               dropout_seeds):
    if loads == "descriptor" and HAS_GPU and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the descriptor kernels run on compute capability 9.0 and up")
    # causal GQA, Sq > Sk and ragged for every block size: rows past the keys' end,
    # a partial last block of queries and of keys
    shape = (1, 4, 2, 300, 270, 128) if HAS_GPU else (1, 2, 1, 150, 135, 64)
    # config i % (its own count) of each kernel the loads launch: every config of each, at least once
    count = max(len(kernel.autotuned.configs) for name, kernel in _kernels().items()
                if KINDS[name].endswith("_tma") == (loads == "descriptor"))
    assert count >= 5, "the GPU's config lists, not the interpreter's single config"
    launched = 0
    for i in range(count):
        forced[0] = i
        try:
            with use_loads(loads):
                _case(feature, shape, deterministic, dropout_seeds)
        except OutOfResources:  # a config this GPU cannot launch, which the autotuner skips too
            continue
        launched += 1
    assert launched > count // 2
