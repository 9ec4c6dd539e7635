"""An autotuned kernel launched past its autotuner once it has chosen
(triton_kernels/chosen_configs.py), on a kernel that writes which config ran:
the first launch of a key lets the autotuner time and choose, the next ones
launch its choice without it, pre_hook applied, and a new key chooses anew.
Under the Triton interpreter, with a stand-in for the autotuner's timer.
And the configs of a first launch compiled on a thread each, on a pretend
H100 (tests/parallel_compile_check.py); and the attention launches' keys,
each of which must map to one key of the autotuner's own."""
import inspect
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

import pyext  # noqa: E402
from conftest import device_for  # noqa: E402
from pyext.triton_kernels.chosen_configs import ChosenConfigs  # noqa: E402
from pyext.triton_kernels.flash_attention import use_loads  # noqa: E402

hooked = []  # (BLOCK, names of the arguments) of each pre_hook call


def _record_hook(nargs):
    hooked.append((nargs["BLOCK"], sorted(nargs)))


@triton.jit
def _write_block(out_ptr, n, PLUS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.zeros([BLOCK], tl.int32) + BLOCK + PLUS, mask=offs < n)


fastest = {"BLOCK": 16}  # the block the stand-in timer reports as the fastest


def _timer(kernel_call, quantiles):
    """Runs the config's call and times it from what it wrote: 1 for the fastest block, 2 for another."""
    out.zero_()
    kernel_call()
    return [1.0 if int(out[0]) % 100 == fastest["BLOCK"] else 2.0] * 3


out = torch.zeros(64, dtype=torch.int32)


def _tuned():
    configs = [triton.Config({"BLOCK": b}, num_warps=1, pre_hook=_record_hook) for b in (16, 32, 64)]
    return ChosenConfigs(triton.autotune(configs=configs, key=["n", "PLUS"], do_bench=_timer)(_write_block))


def _launch(tuned, n, plus=0):
    """What a launch wrote: its config's BLOCK (+ plus); the caller's key is n, the constexpr PLUS a keyword."""
    out.zero_()
    tuned.launch(lambda meta: (1,), (n,), out, n, PLUS=plus)
    return int(out[0])


def test_a_key_chooses_once_and_its_next_launches_skip_the_autotuner(monkeypatch):
    tuned = _tuned()
    runs = []
    run = tuned.autotuned.run
    monkeypatch.setattr(tuned.autotuned, "run", lambda *args, **kwargs: (runs.append(1), run(*args, **kwargs))[1])
    fastest["BLOCK"] = 32
    assert _launch(tuned, 20) == 32 and len(runs) == 1  # timed 16, 32 and 64, ran 32
    fastest["BLOCK"] = 64  # what the timer says now changes nothing for a key already chosen
    for _ in range(3):
        hooked.clear()
        assert _launch(tuned, 20) == 32
        assert len(runs) == 1
        assert [block for block, _ in hooked] == [32], hooked  # the chosen config's pre_hook, once
    assert _launch(tuned, 40) == 64 and len(runs) == 2  # a new key: the autotuner times again
    assert _launch(tuned, 20) == 32 and _launch(tuned, 40) == 64 and len(runs) == 2
    assert _launch(tuned, 20, plus=100) == 164 and len(runs) == 3  # so does the same key with other constexprs


def test_each_choice_is_recorded_with_every_configs_time():
    tuned = _tuned()
    fastest["BLOCK"] = 64
    _launch(tuned, 20)
    _launch(tuned, 20)
    ((key, config, timed),) = tuned.choices  # the second launch of the key chose nothing
    assert config.kwargs == {"BLOCK": 64}
    assert {c.kwargs["BLOCK"]: ms for c, ms in timed.items()} == {16: 2.0, 32: 2.0, 64: 1.0}
    _launch(tuned, 40)
    assert len(tuned.choices) == 2 and tuned.choices[1][0] != key
    # a finer key of ours than the autotuner's: it reuses its own choice for n 40, and times nothing
    tuned.launch(lambda meta: (1,), ("finer", 40), out, 40, PLUS=0)
    assert tuned.choices[2][1].kwargs == {"BLOCK": 64} and tuned.choices[2][2] == {}
    # an autotuner whose timer gives a bare median (not [median, 20th, 80th]) is recorded as well
    bare = ChosenConfigs(triton.autotune(configs=tuned.autotuned.configs, key=["n", "PLUS"],
                                         do_bench=lambda call, quantiles: _timer(call, quantiles)[0])(_write_block))
    _launch(bare, 20)
    assert {c.kwargs["BLOCK"]: ms for c, ms in bare.choices[0][2].items()} == {16: 2.0, 32: 2.0, 64: 1.0}


def test_the_pre_hook_sees_the_arguments_by_name_as_under_the_autotuner():
    tuned = _tuned()
    fastest["BLOCK"] = 16
    hooked.clear()
    _launch(tuned, 8)
    _launch(tuned, 8)
    (first_block, under_autotuner), (block, past_it) = hooked[-2:]
    assert block == first_block == 16
    named = {"out_ptr", "n", "PLUS", "BLOCK", "num_warps"}  # the kernel's arguments and the config's
    assert named <= set(under_autotuner) and named <= set(past_it), hooked


def test_autotune_configs_compile_on_a_thread_each(tmp_path):
    """tests/parallel_compile_check.py, without the interpreter: real sm_90 compiles, each config
    once, on the pool's threads; the autotuner compiles none itself."""
    pytest.importorskip("triton.backends.nvidia")
    async_compile = pytest.importorskip("triton.runtime._async_compile")
    if "ignore_errors" not in inspect.signature(async_compile.AsyncCompileMode).parameters:
        pytest.skip(f"Triton {triton.__version__}'s AsyncCompileMode cannot leave a config that fails to compile "
                    "to the autotuner: pyext compiles the configs one at a time there")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # every compile a real one
    out = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "parallel_compile_check.py")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "parallel compiles:" in out.stdout and "none compiled anew" in out.stdout


def _autotuners():
    """Every autotuned Triton kernel of pyext's, by name: triton.autotune's
    Autotuner objects, alone or inside ChosenConfigs."""
    from pyext.triton_kernels import adamw, gelu, layer_norm, rms_norm_gated
    from pyext.triton_kernels.flash_attention import backward, backward_tma, forward
    found = {}
    for module in (adamw, gelu, layer_norm, rms_norm_gated, backward, backward_tma, forward):
        for name, value in vars(module).items():
            value = getattr(value, "autotuned", value)
            if isinstance(value, triton.runtime.Autotuner):
                found.setdefault(id(value), (f"{module.__name__.split('.')[-1]}.{name}", value))
    return dict(found.values())


def test_every_autotuner_times_its_configs_with_the_short_timer(monkeypatch):
    """Each config over 25 ms of runs after 5 ms of warm-up (Triton's own: 100 after 25),
    and the quantiles the autotuner asks for."""
    from pyext.triton_kernels.chosen_configs import tuning_timer
    tuners = _autotuners()
    assert len(tuners) >= 8, sorted(tuners)  # the attention forwards (2), dK/dV and dQ kernels (6)

    def timer(tuner):
        try:
            return tuner.do_bench
        except RuntimeError:  # Triton's own timer, which wants a GPU driver to be found
            return triton.testing.do_bench
    slow = [name for name, tuner in tuners.items() if timer(tuner) is not tuning_timer]
    assert not slow, slow
    asked = []

    class Driver:  # what the timer asks of Triton's active driver
        def get_benchmarker(self):
            return lambda fn, **kwargs: (fn(), asked.append(kwargs))[0]
    monkeypatch.setattr(triton.runtime.driver, "_active", Driver())
    tuning_timer(lambda: asked.append("ran"), quantiles=(0.5, 0.2, 0.8))
    assert asked == ["ran", {"warmup": 5, "rep": 25, "quantiles": (0.5, 0.2, 0.8)}]


def _autotuner_key(autotuned, args, kwargs):
    """The key triton.autotune computes for a launch: its key arguments' values, then the dtype of
    each tensor argument, in the order of the arguments."""
    named = {k: v for k, v in {**dict(zip(autotuned.arg_names, args)), **kwargs}.items()
             if k in autotuned.arg_names}
    return (tuple(named[k] for k in autotuned.keys if k in named)
            + tuple(str(v.dtype) for v in named.values() if hasattr(v, "dtype")))


def _attention_calls():
    """Attention calls through the Triton kernels that differ in what an autotune key may hold:
    dtypes, causal, head dims, sequence buckets, GQA, a value head dim of its own, masks of two
    kinds and dtypes (learned too: D from the tiles, dS written), dropout, a window, a soft cap,
    sinks of two dtypes, a packed batch, the descriptor kernels; each forward and both backwards."""
    device = device_for("triton")

    def qkv(dtype=torch.bfloat16, sq=20, sk=20, hq=2, hk=2, d=32, dv=None):
        return [torch.randn(1, h, s, e, dtype=dtype, device=device, requires_grad=True)
                for h, s, e in ((hq, sq, d), (hk, sk, d), (hk, sk, dv or d))]
    flash = pyext.flash_attention
    sdpa = pyext.scaled_dot_product_attention
    yield lambda t: flash(*qkv(), deterministic=t, backend="triton")
    yield lambda t: flash(*qkv(torch.float16), deterministic=t, backend="triton")
    yield lambda t: flash(*qkv(), causal=True, deterministic=t, backend="triton")
    yield lambda t: flash(*qkv(sq=40), deterministic=t, backend="triton")
    yield lambda t: flash(*qkv(sk=70, d=64), deterministic=t, backend="triton")
    yield lambda t: flash(*qkv(hq=4, hk=2, dv=16), deterministic=t, backend="triton")
    for mask in (torch.ones(20, 20, dtype=torch.bool, device=device).tril(), torch.zeros(20, 20, device=device),
                 torch.zeros(20, 20, dtype=torch.bfloat16, device=device)):
        yield lambda t, mask=mask: sdpa(*qkv(), attn_mask=mask, backend="triton")
    for dtype in (torch.float32, torch.bfloat16):
        yield lambda t, dt=dtype: sdpa(*qkv(), attn_mask=torch.zeros(2, 20, 20, dtype=dt, device=device,
                                                                     requires_grad=True), backend="triton")
    yield lambda t: flash(*qkv(), dropout_p=0.1, deterministic=t, backend="triton")
    yield lambda t: flash(*qkv(), window_size=(4, 4), deterministic=t, backend="triton")
    yield lambda t: flash(*qkv(), softcap=5.0, deterministic=t, backend="triton")
    for sinks_dtype in (torch.float32, torch.bfloat16):
        yield lambda t, dt=sinks_dtype: flash(*qkv(), sinks=torch.zeros(2, dtype=dt, device=device), deterministic=t,
                                              backend="triton")
    cu = torch.tensor([0, 7, 20], dtype=torch.int32, device=device)
    yield lambda t: pyext.flash_attention_varlen(*(x[0].transpose(0, 1) for x in qkv()), cu, cu, 13, 13,
                                                 deterministic=t, backend="triton")

    def descriptors(t):  # the descriptor kernels, forward and backward: plain, GQA, a soft cap, sinks
        with use_loads("descriptor"):
            for extra in ({}, {"softcap": 5.0}, {"sinks": torch.zeros(2, device=device)}):
                flash(*qkv(), deterministic=t, backend="triton", **extra).sum().backward()
            # returned: its backward, past the block, takes the pointer kernels
            return flash(*qkv(hq=4, hk=2, dv=16), causal=True, deterministic=t, backend="triton")
    yield descriptors


def test_the_attention_launch_keys_are_no_coarser_than_the_autotuners(monkeypatch):
    """Each attention launch's key (launch._tuning_key and the constexprs) maps to one key of the
    autotuner's own: a coarser one would launch a config chosen, and pruned, for another."""
    seen = {}  # (autotuned kernel, our key) -> the autotuner's keys
    launch = ChosenConfigs.launch

    def recording_launch(self, grid, key, *args, **kwargs):
        ours = (id(self.autotuned), key, tuple(kwargs.items()))
        seen.setdefault(ours, set()).add(_autotuner_key(self.autotuned, args, kwargs))
        return launch(self, grid, key, *args, **kwargs)
    monkeypatch.setattr(ChosenConfigs, "launch", recording_launch)
    for call in _attention_calls():
        for deterministic in (False, True):
            out = call(deterministic)
            out.sum().backward()
    from pyext.triton_kernels.flash_attention import backward, backward_tma, forward
    kernels = {name: k for m in (forward, backward, backward_tma) for name, k in vars(m).items()
               if isinstance(k, ChosenConfigs)}
    assert {name for name, k in kernels.items() if any(id(k.autotuned) == ours[0] for ours in seen)} == set(kernels)
    assert len(kernels) == 9 and len(seen) >= 72, (sorted(kernels), len(seen))
    assert all(len(theirs) == 1 for theirs in seen.values()), [t for t in seen.values() if len(t) > 1]
