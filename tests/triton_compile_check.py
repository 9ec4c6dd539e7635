"""Compile every Triton kernel that pyext launches, for sm_80 and sm_90, with
no GPU: Triton builds PTX and cubins from a target description alone. The
check stops at PTX (ptxas's cubin is a third of the time, and every check
here reads what comes before it); --spills builds the cubins too.

Run as a script (the test runs it in a subprocess, without TRITON_INTERPRET,
so the kernels are real @triton.jit functions). The launch functions are
called on CPU tensors with Triton's launcher replaced by a recorder; each
recorded launch (and every autotune config) is then compiled, each argument
specialized as Triton's launcher specializes it (pointers and ints that 16
divides, ints equal to 1), so each variant is the kernel such a launch gets
on the device: a row width that 16 divides gets vector loads, another not,
and the two are different kernels with different register needs. This catches
what the interpreter cannot: Python globals the compiler refuses, illegal
dot shapes, type errors in code paths the interpreter takes differently.

The attention launchers run once per target, as if on that GPU: sm_80 must
get the pointer forward and backward, sm_90 the tensor-descriptor (TMA)
ones (and the pointer ones too, forced, as their fallback there). Autotune
configs are pruned with that GPU's shared memory, as on the device; where a
kernel has such a prune, each config it keeps must compile to a kernel that fits.
A descriptor kernel must compile to TMA copies (cp.async.bulk.tensor), not
to the plain loads Triton falls back to where it cannot use them. Every launch
must ask for fused multiply-adds by name (`FMA`), as the kernels are written
for them and Triton 3.10 stops fusing by default.

--spills also lists the variants whose registers spill to local memory, as
ptxas reports them when it builds the cubin (the same ptxas and options as
on the device, so the same count). Either way the check compiles into a
Triton cache of its own, removed at the end: every variant is compiled, and
no kernel built without its cubin lands in the cache real launches read.
"""
import concurrent.futures
import contextlib
import io
import itertools
import multiprocessing
import os
import re
import shutil
import sys
import tempfile

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGETS = [GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32)]
# Shared memory per block (opt-in) of an A100 and an H100, bytes.
SHARED_MEMORY = {80: 166912, 90: 232448}
launches = []  # (JITFunction, bound arguments, options, configs, targets, pruned)
all_configs = False  # compile every autotune config (pruned) of the launches recorded while True
targets = TARGETS  # the targets of the launches recorded now


def _record_jit(self, *args, grid, warmup, **kwargs):
    launches.append((self, args, kwargs, [None], targets, False))


def _record_autotuned(self, *args, **kwargs):
    self.nargs = dict(zip(self.arg_names, args))
    configs = self.prune_configs(kwargs) if all_configs else self.configs[:1]
    launches.append((self.fn, args, kwargs, list(configs), targets, self.early_config_prune is not None))


def _signature(fn, args, kwargs, config):
    """The signature, constexprs, attributes and options of this launch, as
    Triton's launcher makes them: its own specialization of each argument, so
    an int equal to 1 becomes a constexpr and a pointer or int that 16 divides
    gets tt.divisibility (which lets loads and stores vectorize)."""
    names = fn.arg_names
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k in names})
    options = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages", "enable_fp_fusion")}
    if config is not None:
        values.update(config.kwargs)
        options.update(num_warps=config.num_warps, num_stages=config.num_stages)
        if config.pre_hook is not None:  # sets the descriptors' boxes
            config.pre_hook(values)
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
            continue
        kind, key = native_specialize_impl(BaseBackend, value, False, not param.do_not_specialize,
                                           not param.do_not_specialize_on_alignment)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = key
        elif isinstance(key, str):
            attrs[(index,)] = BaseBackend.parse_attr(key)
    return signature, constexprs, attrs, options


def exercise_launchers():
    """One call of every launch function on small CPU tensors: each kernel and
    constexpr branch once, every autotune config (sm_90) of a few attention shapes."""
    global all_configs, targets
    from pyext.triton_kernels import adamw, flash_attention, gelu, layer_norm, rms_norm_gated
    for dtype in (torch.bfloat16, torch.float64):  # float64 computes in float64
        x = torch.randn(3, 40, dtype=dtype)
        for approx in ("none", "tanh"):
            gelu.gelu_fwd(x, approx)
            gelu.gelu_bwd(x, x, approx)
        stat = torch.float64 if dtype == torch.float64 else torch.float32
        for cols in (40, 128, 20000):  # fused at a width 16 divides and at one it does not, and chunked
            xc, wc = torch.randn(2, cols, dtype=dtype), torch.randn(cols, dtype=dtype)
            mean, rstd = torch.randn(2, dtype=stat), torch.rand(2, dtype=stat)
            layer_norm.layer_norm_fwd(xc, (cols,), wc, wc, 1e-5)
            layer_norm.layer_norm_bwd(xc, xc, mean, rstd, wc, wc, True, True)
            layer_norm.rms_norm_fwd(xc, (cols,), wc, 1e-6)
            layer_norm.rms_norm_bwd(xc, xc, rstd, wc, True)
            groups = 2  # over groups of a row (Cohere's per-head QK norm), fused and chunked
            stats = torch.rand(2, groups, dtype=stat)
            xg, wg = xc.repeat(1, groups), wc.repeat(groups)
            layer_norm.layer_norm_fwd(xg, (groups * cols,), wg, wg, 1e-5, group_size=cols)
            layer_norm.layer_norm_bwd(xg, xg, stats, stats, wg, wg, True, True, group_size=cols)
            layer_norm.rms_norm_fwd(xg, (groups * cols,), wg, 1e-6, group_size=cols)
            layer_norm.rms_norm_bwd(xg, xg, stats, wg, True, group_size=cols)
        for activation in ("silu", "sigmoid"):  # the gated RMSNorm's two activations and two orders
            for gate_first in (False, True):
                rms_norm_gated.rms_norm_gated_fwd(x, x, x[0], 1e-6, activation, gate_first)
                rms_norm_gated.rms_norm_gated_bwd(x, x, x, torch.rand(3, dtype=stat), x[0], activation, gate_first,
                                                  True)
        xa = torch.randn(3, 128, dtype=dtype)  # a width 16 divides (vector loads)
        rms_norm_gated.rms_norm_gated_fwd(xa, xa, xa[0], 1e-6, "silu", False)
        rms_norm_gated.rms_norm_gated_bwd(xa, xa, xa, torch.rand(3, dtype=stat), xa[0], "silu", False, True)
        rms_norm_gated.rms_norm_gated_fwd(x, x, x[0], 1e-6, "silu", True, 10)  # in 4 groups (Mamba 2's)
        rms_norm_gated.rms_norm_gated_bwd(x, x, x, torch.rand(3, 4, dtype=stat), x[0], "silu", True, True, 10)
        xc = torch.randn(2, 9000, dtype=dtype)  # the chunked kernels, in 3 groups
        for gate_first in (False, True):
            rms_norm_gated.rms_norm_gated_fwd(xc, xc, xc[0], 1e-6, "silu", gate_first, 3000)
            rms_norm_gated.rms_norm_gated_bwd(xc, xc, xc, torch.rand(2, 3, dtype=stat), xc[0], "silu", gate_first,
                                              True, 3000)
    xc = torch.randn(2, 8192, dtype=torch.bfloat16)  # the fused backwards' widest tile, on 32 warps
    layer_norm.layer_norm_bwd(xc, xc, torch.randn(2), torch.rand(2), xc[0], xc[0], True, True)
    rms_norm_gated.rms_norm_gated_bwd(xc, xc, xc, torch.rand(2), xc[0], "silu", False, True)
    x, w = torch.randn(3, 40, dtype=torch.bfloat16), torch.randn(40)  # a float32 weight on bfloat16 x,
    rms_norm_gated.rms_norm_gated_fwd(x, x, w, 1e-6, "silu", False)
    rms_norm_gated.rms_norm_gated_bwd(x, x, x, torch.rand(3), w, "silu", False, True)
    x32 = w.expand(3, 40)  # and a bfloat16 gate and weight on float32 x
    rms_norm_gated.rms_norm_gated_fwd(x32, x, x[0], 1e-6, "silu", False)
    rms_norm_gated.rms_norm_gated_bwd(x32, x32, x, torch.rand(3), x[0], "silu", False, True)
    for cols in (40, 20000):  # an RMSNorm weight narrower than x: bfloat16 on float32 (Mamba's)
        xc, wc = torch.randn(2, cols), torch.randn(cols, dtype=torch.bfloat16)
        rstd = torch.rand(2)
        layer_norm.rms_norm_fwd(xc, (cols,), wc, 1e-6)
        layer_norm.rms_norm_bwd(xc, xc, rstd, wc, True)
    for target in TARGETS:  # the launchers as they run on an A100, then on an H100
        targets = [target]
        flash_attention.loads._has_tma = lambda t: target.arch >= 90
        flash_attention.loads.shared_memory_limit = lambda t: SHARED_MEMORY[target.arch]
        # head dims 64 (a 64-wide block) to 256; value head dim dv: the query/key one, or below it
        # (DeepSeek's MLA, 192 and 128). Every config on sm_90 from head dim 128 (the GPUs the tests
        # run on; the descriptor forward's shared memory prune counts them), the first of each launch
        # on sm_80 (CI's time)
        for d, dv, causal in ((64, 64, False), (80, 80, False), (128, 128, True), (256, 256, True), (192, 128, True)):
            all_configs = target.arch >= 90 and d >= 128
            q = torch.randn(1, 4, 33, d, dtype=torch.bfloat16)
            k, v = torch.randn(1, 2, 40, d, dtype=torch.bfloat16), torch.randn(1, 2, 40, dv, dtype=torch.bfloat16)
            out, lse = flash_attention.flash_attn_fwd(q, k, v, d ** -0.5, causal, 7)
            for deterministic in (False, True):  # atomic dQ, then the dK/dV and dQ kernels
                flash_attention.flash_attn_bwd(out, q, k, v, out, lse, d ** -0.5, causal, 7, deterministic)
        for direction, expected in (("fwd", {"_fwd_kernel"}), ("bwd", {"_bwd_kv_kernel", "_bwd_dq_kernel"})):
            if target.arch >= 90:
                expected = {name.replace("_kernel", "_tma_kernel") for name in expected}
            launched = {fn.__name__ for fn, *_, ts, _ in launches if ts == targets and direction in fn.__name__}
            launched.discard("_bwd_delta_kernel")
            assert launched == expected, f"sm_{target.arch} launched {launched}, expected {expected}"
        all_configs = False
        # head dims that are not a multiple of 8 (rows that are not 16-byte aligned): the pointer kernels
        # on every GPU; a value head dim of its own too
        first = len(launches)
        for d, dv in ((59, 59), (100, 36)):
            q = torch.randn(1, 4, 33, d, dtype=torch.bfloat16)
            k, v = torch.randn(1, 2, 40, d, dtype=torch.bfloat16), torch.randn(1, 2, 40, dv, dtype=torch.bfloat16)
            out, lse = flash_attention.flash_attn_fwd(q, k, v, d ** -0.5, True, 7)
            for deterministic in (False, True):
                flash_attention.flash_attn_bwd(out, q, k, v, out, lse, d ** -0.5, True, 7, deterministic)
        unaligned = {fn.__name__ for fn, *_ in launches[first:]}
        assert not any("tma" in name for name in unaligned), f"sm_{target.arch}: {unaligned} at unaligned rows"
        # dropout: the pointer forward on every GPU, and the backward kernels with its mask
        seed = torch.tensor([1])
        for d in (80, 128):
            q = torch.randn(1, 4, 33, d, dtype=torch.bfloat16)
            out, lse, out_lo = flash_attention.flash_attn_fwd(q, q[:, :2], q[:, :2], 0.1, True, 0, dropout_p=0.1,
                                                              seed=seed)
            for deterministic in (False, True):
                flash_attention.flash_attn_bwd(out, q, q[:, :2], q[:, :2], out, lse, 0.1, True, 0, deterministic,
                                               dropout_p=0.1, seed=seed, out_lo=out_lo)
        flash_attention.dropout_keep_mask(seed, 1, 2, 33, 40, 0.1)
        # a local window (flash_attention's window_size), with dropout and without: the pointer forward
        q = torch.randn(1, 4, 33, 128, dtype=torch.bfloat16)
        for p in (0.0, 0.1):
            out, lse, *out_lo = flash_attention.flash_attn_fwd(q, q[:, :2], q[:, :2], 128 ** -0.5, True, 0,
                                                               dropout_p=p, seed=seed,
                                                               window=(16, -1))  # out_lo with dropout
            for deterministic in (False, True):
                flash_attention.flash_attn_bwd(out, q, q[:, :2], q[:, :2], out, lse, 128 ** -0.5, True, 0,
                                               deterministic,
                                               dropout_p=p, seed=seed, window=(16, -1),
                                               out_lo=out_lo[0] if out_lo else None)
        # masks, boolean and additive (float32 and the inputs' dtype), alone and with dropout; the
        # additive ones learned too (dmask: D from the tiles, dS written)
        q = torch.randn(1, 4, 33, 128, dtype=torch.bfloat16)
        masks = (torch.rand(1, 1, 33, 33) > 0.5, torch.randn(33, 33), torch.randn(1, 4, 33, 33, dtype=q.dtype))
        for mask, p in zip(masks, (0.0, 0.1, 0.0)):
            out, stats, out_lo = flash_attention.flash_attn_fwd(q, q[:, :2], q[:, :2], 0.1, False, 0, dropout_p=p,
                                                                seed=seed, mask=mask)
            dmasks = (None,) if mask.dtype == torch.bool else (None, torch.empty(1, 4, 33, 33, dtype=mask.dtype))
            for deterministic, dmask in itertools.product((False, True), dmasks):
                flash_attention.flash_attn_bwd(out, q, q[:, :2], q[:, :2], out, stats, 0.1, False, 0, deterministic,
                                               dropout_p=p, seed=seed, mask=mask, out_lo=out_lo, dmask=dmask)
        # a logit soft cap (Gemma 2's): alone (the descriptor forward on sm_90), with a window, with a mask
        for extra in ({}, {"window": (16, -1)}, {"mask": masks[0]}):
            causal = "mask" not in extra
            out, lse, out_lo = flash_attention.flash_attn_fwd(q, q[:, :2], q[:, :2], 0.1, causal, 0, softcap=30.0,
                                                              **extra)
            for deterministic in (False, True):
                flash_attention.flash_attn_bwd(out, q, q[:, :2], q[:, :2], out, lse, 0.1, causal, 0, deterministic,
                                               softcap=30.0, out_lo=out_lo, **extra)
        # attention sinks (GPT-OSS's): alone (the descriptor forward on sm_90), with a window, with a
        # mask; the dK/dV kernels with the sinks' shares
        sinks = torch.randn(4)
        for extra in ({}, {"window": (16, -1)}, {"mask": masks[0]}):
            causal = "mask" not in extra
            out, lse, out_lo = flash_attention.flash_attn_fwd(q, q[:, :2], q[:, :2], 0.1, causal, 0, sinks=sinks,
                                                              **extra)
            for deterministic in (False, True):
                flash_attention.flash_attn_bwd(out, q, q[:, :2], q[:, :2], out, lse, 0.1, causal, 0, deterministic,
                                               sinks=sinks, out_lo=out_lo, **extra)
        # a scale above the default (T5's 1.0, say): out_lo stored with no extras (the descriptor forward on sm_90)
        q = torch.randn(1, 4, 33, 128, dtype=torch.bfloat16)
        out, lse, out_lo = flash_attention.flash_attn_fwd(q, q[:, :2], q[:, :2], 0.3, True, 0)
        for deterministic in (False, True):
            flash_attention.flash_attn_bwd(out, q, q[:, :2], q[:, :2], out, lse, 0.3, True, 0, deterministic,
                                           out_lo=out_lo)
        # a packed batch (varlen): every config at head dim 128 on sm_90; with dropout, a window and a soft cap;
        # with a window and sinks (GPT-OSS's packed SFT); at a scale above the default (out_lo alone)
        cu = torch.tensor([0, 20, 21, 40], dtype=torch.int32)
        q = torch.randn(40, 4, 128, dtype=torch.bfloat16)
        for scale, extra in ((128 ** -0.5, {}), (0.1, {"dropout_p": 0.1, "seed": seed, "window": (16, -1),
                                                      "softcap": 30.0}),
                             (0.1, {"window": (16, -1), "sinks": sinks}), (0.3, {})):
            all_configs = target.arch >= 90 and scale == 128 ** -0.5
            out, lse, *out_lo = flash_attention.flash_attn_varlen_fwd(q, q[:, :2], q[:, :2], cu, cu, 20, 20, scale,
                                                                      True, **extra)  # out_lo: not with the first
            for deterministic in (False, True):
                flash_attention.flash_attn_varlen_bwd(out, q, q[:, :2], q[:, :2], out, lse, cu, cu, 20, 20, scale,
                                                      True, deterministic, out_lo=out_lo[0] if out_lo else None,
                                                      **extra)
        all_configs = False
        if target.arch >= 90:
            with flash_attention.use_loads("pointer"):
                for d in (80, 128):
                    all_configs = d == 128
                    q = torch.randn(1, 4, 33, d, dtype=torch.bfloat16)
                    out, lse = flash_attention.flash_attn_fwd(q, q[:, :2], q[:, :2], d ** -0.5, True, 0)
                    for deterministic in (False, True):
                        flash_attention.flash_attn_bwd(out, q, q[:, :2], q[:, :2], out, lse, d ** -0.5, True, 0,
                                                       deterministic)
    all_configs, targets = False, TARGETS
    for dtype, amsgrad, capturable in ((torch.float32, False, False), (torch.bfloat16, True, True)):
        ps = [torch.randn(5, dtype=dtype), torch.randn(3, 2, dtype=dtype)]
        ms = [torch.zeros(p.shape) for p in ps]
        scaler = torch.ones(1) if capturable else None  # as grad_scale and as found_inf
        adamw.adamw_step(ps, ps, ms, ms, ms, torch.ones(2), 1e-3, torch.ones(()) if capturable else None,
                         0.9, 0.999, 1e-8, 0.01, amsgrad, False, scaler, scaler)


jobs = []  # (fn, signature, constexprs, attrs, options, target, pruned): each variant to compile, once


_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")


def _compile(index: int):
    """Compile jobs[index]: (why it failed or None, the ptxas report of a
    variant that spills or None)."""
    fn, signature, constexprs, attrs, options, target, pruned = jobs[index]
    names = fn.arg_names
    divisible = [names[i] for (i,), attr in attrs.items() if attr and not signature[names[i]].startswith("*")]
    what = f"{fn.__name__} sm_{target.arch} {constexprs} {options}, ints 16 divides: {divisible}"
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # ptxas -v's report, with knobs.nvidia.dump_ptxas_log
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options)
    except Exception as e:  # report all, fail at the end
        return f"{what}: {type(e).__name__}: {str(e).splitlines()[0][:300]}", None
    if pruned and kernel.metadata.shared > SHARED_MEMORY[target.arch]:
        return (f"{what}: {kernel.metadata.shared} bytes of shared memory, more than "
                f"sm_{target.arch}'s {SHARED_MEMORY[target.arch]}"), None
    if options.get("enable_fp_fusion") is not True:
        return f"{what}: launched without enable_fp_fusion=True (triton_kernels._utils.FMA)", None
    if fn.__name__.endswith("_tma_kernel") and "cp.async.bulk.tensor" not in kernel.asm["ptx"]:
        return f"{what}: its descriptors lowered to plain loads and stores (no cp.async.bulk.tensor)", None
    spills = [int(n) for pair in _SPILLS.findall(log.getvalue()) for n in pair]
    registers = _REGISTERS.findall(log.getvalue())
    if any(spills):
        return None, f"{what}: {registers[-1] if registers else '?'} registers, {spills[-2]} bytes spill stores, " \
                     f"{spills[-1]} bytes spill loads"
    return None, None


def _stop_at_ptx(*args):
    """Triton's stages hook: the cubin stage builds nothing (ptxas not run).
    Triton 3.8+ calls it without arguments for its part of the cache key."""
    if not args:
        return "pyext-ptx-only", "pyext-ptx-only"
    stages = args[1]
    stages["cubin"] = lambda src, metadata: b""


def main():
    spills = "--spills" in sys.argv
    cache = tempfile.mkdtemp(prefix="pyext_compile_check_")
    try:
        triton.knobs.cache.dir = cache
        if spills:
            triton.knobs.nvidia.dump_ptxas_log = True
        else:
            triton.knobs.runtime.add_stages_inspection_hook = _stop_at_ptx
        return check(spills)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def check(spills: bool):
    """Compiles every variant the launch functions launch (to cubins if `spills`, listing theirs); 1 if any fails."""
    JITFunction.run = _record_jit
    Autotuner.run = _record_autotuned
    # every launch through its autotuner, not past it with a config remembered for the key:
    # the launches made while all_configs is True compile every config of their keys
    from pyext.triton_kernels.chosen_configs import ChosenConfigs
    ChosenConfigs.launch = lambda self, grid, key, *args, **kwargs: self.autotuned[grid](*args, **kwargs)
    exercise_launchers()
    seen = set()
    for fn, args, kwargs, configs, launch_targets, pruned in launches:
        for config in configs:
            signature, constexprs, attrs, options = _signature(fn, args, kwargs, config)
            for target in launch_targets:
                key = (fn.__name__, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
                       repr(sorted(attrs.items())), repr(sorted(options.items())), target.arch)
                if key not in seen:
                    seen.add(key)
                    jobs.append((fn, signature, constexprs, attrs, options, target, pruned))
    # one compiling process per core; forked, so they inherit `jobs`
    with concurrent.futures.ProcessPoolExecutor(os.cpu_count() or 1,
                                                mp_context=multiprocessing.get_context("fork")) as pool:
        results = list(pool.map(_compile, range(len(jobs)), chunksize=4))
    failures = [why for why, _ in results if why is not None]
    built = "cubins" if spills else "PTX"
    print(f"compiled {len(jobs) - len(failures)} of {len(jobs)} kernel variants to {built} "
          f"(Triton {triton.__version__})")
    for line in failures:
        print("FAILED", line)
    if spills:
        spilling = sorted(report for _, report in results if report is not None)
        print(f"{len(spilling)} variants spill registers")
        for line in spilling:
            print("SPILLS", line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
