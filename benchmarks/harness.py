"""Timing and ceilings shared by every benchmark case (report.py presents them).

A Case is one problem (op, shape, dtype, direction) with the bytes and FLOPs
it must move and do, and the providers (ours and the peers) that solve it.
Conventions (DESIGN.md section 5): memory-bound kernels count each tensor read
once and written once; attention FLOPs = 4*B*H*Sq*Sk*D (half when causal),
backward 2.5x forward; AdamW 28 bytes per fp32 parameter.
"""
import dataclasses
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from functools import lru_cache, partial
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from benchmarks import replay

HAS_GPU = torch.cuda.is_available()
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# pyext-triton-ptr: the Triton attention with pointer loads forced (on sm_90: the
# Ampere path timed beside the descriptor path that pyext-triton takes there);
# pyext-triton-det: the Triton attention backward with deterministic=True (the
# two-kernel one, beside pyext-triton's atomic-dQ pass); pyext-triton-mask: a
# sliding window given as a mask, as an HF model gives it (attention "window" cases);
# pyext-triton-padded: the Triton attention on heads zero-padded to a multiple
# of 8, as torch pads them (cases whose head dim 8 does not divide);
# pyext-cuda-stage1: the CUDA attention's mma.sync kernels where pyext-cuda runs
# the sm_90a ones (compute capability 9.x); pyext-cuda-det: the CUDA backward
# with deterministic=True (beside pyext-cuda's atomic-dQ one)
# pyext-triton-nosinks: the Triton attention on a sinks case without its sinks (their own cost)
OURS = ("pyext-cuda", "pyext-triton", "pyext-triton-ptr", "pyext-triton-det", "pyext-triton-mask",
        "pyext-triton-padded", "pyext-cuda-stage1", "pyext-cuda-det", "pyext-triton-nosinks")
# The backends a user names (or auto picks): the summary's "ours"; the rest of OURS are diagnostics.
PUBLIC = ("pyext-cuda", "pyext-triton")
# How the GPU rows are timed (into each report's meta): triton.testing.do_bench, which clears a 256 MB
# buffer before each run (L2 cold, the clearing not timed) and reports the median and the 20th and 80th
# percentiles of the runs it makes over rep ms (rep_ms_quick with --quick), after warmup ms.
TIMING = {"method": "triton.testing.do_bench (CUDA events), L2 cleared before each run", "warmup_ms": 10,
          "rep_ms": 50, "rep_ms_quick": 30, "min_repeats": 10, "quantiles": "median, p20, p80",
          "host_bound_cases": "every provider also replayed as a CUDA graph, L2 cleared before each replay "
                              "(benchmarks/replay.py): graph_ms"}
# A row whose host time to issue one call is at least this share of its measured time measures the host
# (Python, launches), not the kernels: flagged "host_bound".
HOST_BOUND = 0.8
# The correctness rule's floor per dtype (DESIGN.md section 4; tests/conftest.py's FLOOR, which a test
# holds these to).
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@dataclasses.dataclass
class Check:
    """How a case's providers are judged before they are timed (DESIGN.md
    section 4's rule): each provider's first result against the float64
    oracle, output by output, within twice the error of torch's own
    provider in the same dtype (the first of `yardsticks` that ran) plus the
    dtype's floor. A result past it is marked wrong and left out of the
    speed-ups, ours or a peer's."""
    oracle: Callable[[], object]  # the case's result in float64, as a provider returns it
    yardsticks: Tuple[str, ...]
    # the inputs change from one provider to the next (an optimizer step): the oracle per provider,
    # called before its first call (its items may be callables, each computed when compared)
    per_provider: bool = False
    unchecked: Dict[str, str] = dataclasses.field(default_factory=dict)  # provider -> why not compared


@dataclasses.dataclass
class Case:
    op: str                 # "gelu", "layer_norm", ...
    label: str              # human-readable shape and options
    size: float             # x-axis for plots (elements, hidden size, seqlen)
    dtype: str
    direction: str          # "fwd", "bwd", "fwd+bwd", "step"
    bytes: float            # minimal bytes moved (0 when compute bound)
    flops: float            # FLOPs done (0 when memory bound)
    # provider -> zero-argument callable to time, or a string saying why it is skipped
    providers: Dict[str, Union[Callable[[], object], str]]
    check: Union[Check, str]  # or why the case's results are not compared (dropout's random draws)
    shape: Dict[str, int] = dataclasses.field(default_factory=dict)  # sizes the label leaves out, into each row


def timer(fn: Callable[[], object], quick: bool, first_call_made: bool = False) -> List[float]:
    """Run-time (median, 20th and 80th percentile) in milliseconds, after a
    first call that compiles, untimed (pyext's autotuned kernels compile
    their configs on a thread each: triton_kernels/chosen_configs.py; made
    by the caller where first_call_made), and warm-up. Without a GPU one run
    after that first call: the smoke run's timings mean nothing, and the
    interpreter's calls are slow."""
    if not first_call_made:
        fn()
    if HAS_GPU:
        import triton.testing
        warmup, rep = TIMING["warmup_ms"], TIMING["rep_ms_quick" if quick else "rep_ms"]
        # do_bench repeats a call rep / (its time) times: at least TIMING's min_repeats, however long the call
        rep = max(rep, TIMING["min_repeats"] * _one_call_ms(fn))
        q = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
        return list(q)
    t0 = time.perf_counter()
    fn()
    return [(time.perf_counter() - t0) * 1e3] * 3


def _one_call_ms(fn: Callable[[], object]) -> float:
    """One call's GPU time (CUDA events), to size the repeats."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def host_and_memory(fn: Callable[[], object]) -> dict:
    """CPU time to issue one call (median of 5, no synchronisation: what the
    host spends launching); whether the call waits for the GPU (see
    `waits_for_gpu`); and, on a GPU, the peak memory one call allocates
    beyond what was allocated before it. Not on the CPU smoke run."""
    if not HAS_GPU:
        return {}
    issue = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        issue.append((time.perf_counter() - t0) * 1e3)
    waits = waits_for_gpu(fn, _spin_gpu, statistics.median(issue))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return {"host_ms": statistics.median(issue), "waits_for_gpu": waits,
            "peak_mem_MB": (torch.cuda.max_memory_allocated() - before) / 2 ** 20}


def waits_for_gpu(fn: Callable[[], object], spin: Callable[[float], None], host_ms: float) -> bool:
    """Whether a call waits for the GPU (a .item(), a copy to the host, a
    cudaFree, or more launches than the driver queues: about a thousand, as
    a for-loop optimizer over hundreds of tensors makes): such a call keeps
    the host from running ahead of the GPU in a training step, and where the
    GPU is idle host_ms cannot tell its wait from launch time. So the call
    is issued behind `spin(busy)`, busy ms of queued GPU work (2 ms plus
    twice its host time, so that the spin outlasts the call): a waiting
    call then takes more than a quarter of the spin on top of its host
    time, an asynchronous one only its jitter."""
    busy = 2.0 + 2 * host_ms
    times = []
    for _ in range(3):
        spin(busy)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times) - host_ms > busy / 4


@lru_cache(maxsize=None)
def _spin_cycles_per_ms() -> float:
    """The clock of torch's spin kernel on this GPU, measured once."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(1 << 20)
    end.record()
    end.synchronize()
    return (1 << 20) / start.elapsed_time(end)


def _spin_gpu(ms: float) -> None:
    """Queues about ms of GPU work (torch's spin kernel), returning at once."""
    torch.cuda._sleep(int(ms * _spin_cycles_per_ms()))


def optional_peer(module: str):
    """A peer package's module when it imports, else the line saying why not
    (absent, or built for other torch/Triton versions than these)."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        return f"{module} is not installed ({e.__class__.__name__})"
    except Exception as e:  # installed, but does not import with this torch or Triton
        return f"{module} failed to import ({e.__class__.__name__}: {str(e)[:120]})"


def measure_ceilings(quick: bool) -> dict:
    """The machine's own ceilings: device-to-device copy bandwidth (bytes read
    plus written) and bf16 matrix-product rate, on random data."""
    if not HAS_GPU:
        return {"copy_GBps": None, "bf16_matmul_TFLOPs": None}
    n = (1 << 26) if quick else (1 << 28)  # 256 MiB or 1 GiB of fp32
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    ms = timer(partial(dst.copy_, src), quick)[0]
    copy_gbps = 2 * src.numel() * 4 / ms / 1e6
    del src, dst
    m = 4096 if quick else 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    ms = timer(lambda: a @ b, quick)[0]
    return {"copy_GBps": copy_gbps, "bf16_matmul_TFLOPs": 2 * m ** 3 / ms / 1e9}


def machine_info() -> dict:
    """What a reader needs to place a run's figures: when, on what, with
    which versions of everything timed, from which source, run how."""
    import pyext
    info = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if HAS_GPU else None,
        "pyext": pyext.__version__,
        "git_commit": _git_commit(),
        "command": " ".join(sys.argv),
        "peers": {name: _version(name) for name in ("flash-attn", "liger-kernel", "apex")},
        "timing": TIMING,
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if HAS_GPU:
        p = torch.cuda.get_device_properties(0)
        info.update(sm_count=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                    memory_GiB=round(p.total_memory / 2 ** 30, 1), **_gpu_clocks())
    return info


def _version(distribution: str) -> Optional[str]:
    from importlib import metadata
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> Optional[str]:
    """The source's commit, with "+changes" where the tree differs from it (None outside a git checkout)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


# nvidia-smi's query fields, by the names the report gives them
_NVIDIA_SMI = {"driver": "driver_version", "sm_clock": "clocks.sm", "sm_clock_max": "clocks.max.sm",
               "memory_clock": "clocks.mem", "memory_clock_max": "clocks.max.mem", "power_limit": "power.limit"}


def _gpu_clocks() -> dict:
    """The driver, the SM and memory clocks now and at most, and the power limit, as nvidia-smi reports them."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(_NVIDIA_SMI.values())}", "--format=csv,noheader",
                              f"--id={torch.cuda.current_device()}"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    values = [v.strip() for v in out.stdout.strip().split(",")]
    return dict(zip(_NVIDIA_SMI, values)) if out.returncode == 0 and len(values) == len(_NVIDIA_SMI) else {}


class BrokenCUDAContext(RuntimeError):
    """A provider's kernel faulted: nothing after it in this process can use the GPU."""


def cuda_context_broken() -> bool:
    """True after a fault (an illegal address, a trap): the error is sticky."""
    if not HAS_GPU:
        return False
    try:
        torch.cuda.synchronize()
    except RuntimeError:
        return True
    return False


def pyext_tuners() -> Dict[str, object]:
    """pyext's autotuned Triton kernels (triton_kernels/chosen_configs.py's
    ChosenConfigs) by name; none where Triton does not import."""
    try:
        from pyext.triton_kernels.chosen_configs import ChosenConfigs
        from pyext.triton_kernels.flash_attention import backward, backward_tma, forward
    except ImportError:
        return {}
    return {name: value for module in (forward, backward, backward_tma) for name, value in vars(module).items()
            if isinstance(value, ChosenConfigs)}


def tuned_since(tuners: Dict[str, object], before: Dict[str, int]) -> dict:
    """What pyext's autotuners chose since `before` (each one's count of
    choices then): per kernel, each choice's config and the median ms of
    every config timed for it (None for one that could not run)."""
    report = {}
    for name, tuner in tuners.items():
        for _, config, timed in tuner.choices[before[name]:]:
            times = {str(c): ms if math.isfinite(ms) else None for c, ms in timed.items()}
            report.setdefault(name, []).append({"config": str(config), "timed_ms": times})
    return report


class WrongResult(Exception):
    """A provider's result is not the oracle's shape: no error to measure."""


def _tensors(result) -> list:
    """The tensors of a provider's result (an output, or a tuple of gradients), in order."""
    if isinstance(result, (tuple, list)):
        return [t for item in result for t in _tensors(item)]
    return [] if result is None else [result]


def result_errors(result, oracle) -> List[float]:
    """max |result - oracle| of each tensor, over the elements where the
    oracle is finite (a NaN there is infinitely far)."""
    outs, refs = _tensors(result), _tensors(oracle)
    if len(outs) != len(refs):
        raise WrongResult(f"{len(outs)} tensors where the oracle has {len(refs)}")
    errors = []
    for out, ref in zip(outs, refs):
        ref = ref() if callable(ref) else ref
        if out.shape != ref.shape:
            raise WrongResult(f"shape {tuple(out.shape)} where the oracle's is {tuple(ref.shape)}")
        finite = ref.isfinite()
        diff = (out.detach().to(ref.device, torch.float64) - ref)[finite].abs()
        err = diff.max().item() if diff.numel() else 0.0
        errors.append(math.inf if math.isnan(err) else err)
    return errors


def judge(rows: List[dict], errors: Dict[str, List[float]], dtypes: Dict[str, list], check) -> None:
    """Each checked row's "error_vs_bound" (its worst output's error over the
    rule's bound; above 1 it is "wrong"), or why it is "unchecked"."""
    if isinstance(check, str):
        for r in rows:
            if "ms" in r:
                r["unchecked"] = check
        return
    yardstick = next((name for name in check.yardsticks if name in errors), None)
    for r in rows:
        name = r["provider"]
        if "ms" not in r or "wrong" in r:
            continue
        if name in check.unchecked:
            r["unchecked"] = check.unchecked[name]
        elif yardstick is None:
            r["unchecked"] = f"none of torch's providers ({', '.join(check.yardsticks)}) ran to set the bound"
        else:
            bounds = [2 * theirs + FLOOR[dtype] for theirs, dtype in zip(errors[yardstick], dtypes[name])]
            worst = max((ours / bound for ours, bound in zip(errors[name], bounds)), default=0.0)
            r.update(error_vs_bound=worst, yardstick=yardstick)
            if worst > 1:
                r["wrong"] = f"error {worst:.3g}x the bound (2x {yardstick}'s error + the floor)"


def run_case(case: Case, ceilings: dict, quick: bool, skip: tuple = ()) -> List[dict]:
    """Check, then time, every provider of one case but those in `skip`; one
    row per provider. Raises BrokenCUDAContext, with the rows so far, when
    one faults. A row of ours records what pyext's autotuners chose during
    its first call ("tuned": config, and every config's time), for pruning
    the configs. A provider of ours that raises is an "error" (a peer that
    cannot run the case is "skipped", saying why)."""
    rows, tuners = [], pyext_tuners()
    check = case.check
    oracle, errors, dtypes = None, {}, {}
    for name, fn in case.providers.items():
        row = dict(op=case.op, label=case.label, size=case.size, dtype=case.dtype,
                   direction=case.direction, provider=name, bytes=case.bytes, flops=case.flops)
        if case.shape:
            row["shape"] = case.shape
        if name in skip:
            row["skipped"] = "left out by --skip-providers"
        elif isinstance(fn, str):
            row["skipped"] = fn
        else:
            start, before = time.perf_counter(), {kernel: len(t.choices) for kernel, t in tuners.items()}
            checked = isinstance(check, Check) and name not in check.unchecked
            if checked and (oracle is None or check.per_provider):
                try:
                    oracle = check.oracle()
                except Exception as e:  # out of memory, say: the case goes unchecked, saying why
                    check = f"the oracle failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                    checked = False
            try:
                result = fn()  # the first call: compiles, autotunes; its result is the one checked
                if checked:
                    try:
                        errors[name] = result_errors(result, oracle)
                        dtypes[name] = [t.dtype for t in _tensors(result)]
                    except WrongResult as e:
                        row["wrong"] = str(e)
                del result
                med, lo, hi = timer(fn, quick, first_call_made=True)
            except Exception as e:  # a peer that cannot run this case says why
                row["error" if name in OURS else "skipped"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                if cuda_context_broken():
                    rows.append(row)
                    raise BrokenCUDAContext(f"{name} on {case.op} {case.direction} {case.dtype} {case.label}: "
                                            f"{row.get('error') or row['skipped']}", rows) from e
            else:
                row.update(ms=med, ms_p20=lo, ms_p80=hi, **host_and_memory(fn))
                # what timing this provider cost the run: its first call (compiles, autotunes) included
                row["wall_s"] = time.perf_counter() - start
                tuned = tuned_since(tuners, before)
                if tuned:
                    row["tuned"] = tuned
                if row.get("host_ms", 0) >= HOST_BOUND * med:
                    row["host_bound"] = True
                # the ceiling each row is a percent of, in the row (a merge's parts measured their own)
                if case.bytes:
                    row["GBps"] = case.bytes / med / 1e6
                    if ceilings.get("copy_GBps"):
                        row.update(ceiling=ceilings["copy_GBps"], pct_of_ceiling=100 * row["GBps"] /
                                   ceilings["copy_GBps"])
                if case.flops:
                    row["TFLOPs"] = case.flops / med / 1e9
                    if ceilings.get("bf16_matmul_TFLOPs"):
                        row.update(ceiling=ceilings["bf16_matmul_TFLOPs"], pct_of_ceiling=100 * row["TFLOPs"] /
                                   ceilings["bf16_matmul_TFLOPs"])
        rows.append(row)
        if HAS_GPU:
            torch.cuda.empty_cache()
    del oracle
    judge(rows, errors, dtypes, check)
    if HAS_GPU:
        broken = replay.retime_host_bound(rows, case.providers, cuda_context_broken)
        if broken:
            raise BrokenCUDAContext(f"{case.op} {case.direction} {case.dtype} {case.label}: {broken}", rows)
    set_speedups(rows, "ms", "speedup_vs_best_peer", "best_peer")
    set_speedups(rows, "graph_ms", "graph_speedup_vs_best_peer", "graph_best_peer")
    return rows


def set_speedups(rows: List[dict], ms: str, speedup: str, best_peer: str) -> None:
    """Each right row of ours timed as `ms` ("ms", "graph_ms") gets `speedup`
    over the fastest right peer timed so, named in `best_peer`."""
    right = [r for r in rows if ms in r and "wrong" not in r]
    peers = {r["provider"]: r[ms] for r in right if r["provider"] not in OURS}
    for r in right:
        if r["provider"] in OURS and peers:
            best = min(peers, key=peers.get)
            r.update({speedup: peers[best] / r[ms], best_peer: best})


def norm_grid(quick: bool, shapes_gpu, shapes_quick, shapes_smoke):
    """(shapes, directions) of a memory-bound op's cases: on a GPU its full
    or quick shapes, forward, backward and both; without one the smoke
    shapes, forward and both."""
    if HAS_GPU:
        return (shapes_quick if quick else shapes_gpu), ("fwd", "bwd", "fwd+bwd")
    return shapes_smoke, ("fwd", "fwd+bwd")


def grid_count(grid, dtypes) -> int:
    """How many cases a (shapes, directions) grid makes over dtypes."""
    shapes, directions = grid
    return len(dtypes) * len(shapes) * len(directions)


def our_backends() -> Dict[str, Optional[str]]:
    """pyext-cuda / pyext-triton -> None when it runs here, else why not."""
    import pyext
    status = pyext.available_backends()
    return {f"pyext-{b}": None if status[b].available else status[b].reason for b in ("cuda", "triton")}


def oracle_of(fn: Callable, inputs: list, direction: str, grad: torch.Tensor) -> Callable[[], object]:
    """The case's oracle: what autograd_callable(fn, ...) returns, computed
    on float64 copies of the floating-point inputs and grad (fn the
    reference; tensors it holds itself, a mask, stay as they are)."""
    def run():
        copies = [t.detach().double().requires_grad_(t.requires_grad)
                  if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
        return autograd_callable(fn, copies, direction, grad.double())()
    return run


def autograd_callable(fn: Callable, inputs: list, direction: str, grad: torch.Tensor):
    """What to time for one provider: the forward alone (no autograd state),
    the backward alone (graph built once, replayed with retain_graph), or both."""
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if direction == "fwd":
        def run():
            with torch.no_grad():
                return fn(*inputs)
        return run
    if direction == "bwd":
        graph = []  # built by the first (warm-up) call, so a provider that fails does so when timed

        def run():
            if not graph:
                graph.append(fn(*inputs))
            return torch.autograd.grad(graph[0], leaves, grad, retain_graph=True)
        # a backward runs on its forward's stream: a CUDA-graph capture (replay.py), on a stream of its
        # own, builds the forward again there first
        run.forget_forward = graph.clear
        return run
    if direction == "fwd+bwd":
        return lambda: torch.autograd.grad(fn(*inputs), leaves, grad)
    raise ValueError(direction)
