"""What a benchmark run shows and writes: the progress bar, the table, the
summary and where the time went, the comparison with an older run, the JSON
and CSV reports and the plots. harness.py measures the rows they read."""
import csv
import json
import math
import os
import sys
import time
from typing import List, Optional

from benchmarks.harness import OURS, PUBLIC


class Progress:
    """A progress bar on stderr, rewritten in place: cases done of the total,
    time so far, time left at the pace so far, and the case now running.
    With no total (a run filtered by --cases): the cases done and the time."""

    def __init__(self, total: Optional[int], width: int = 24):
        self.total = None if total is None else max(total, 1)
        self.width, self.start = width, time.perf_counter()

    def show(self, done: int, text: str, last: bool = False) -> None:
        elapsed = time.perf_counter() - self.start
        if self.total is None:
            sys.stderr.write(f"\r[{done} done] {_minutes(elapsed)} {text[:60]:<60}")
        else:
            filled = self.width * min(done, self.total) // self.total
            left = f"~{_minutes(elapsed / done * (self.total - done))} left" if 0 < done < self.total else ""
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} "
                             f"{_minutes(elapsed)} {left:>10} {text[:60]:<60}")
        if last:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _minutes(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def table(rows: List[dict]) -> str:
    """One line per row: its figures, or why it has none. "spread": half the
    20th-80th percentile range of its runs, in percent of the median.
    "err/bound": the row's error against the float64 oracle over the
    correctness rule's bound (above 1: WRONG, and no speed-up); "-" where it
    is not checked."""
    head = (f"{'op':<12}{'case':<28}{'dtype':<26}{'dir':<8}{'provider':<16}"
            f"{'ms':>9}{'spread':>8}{'GB/s':>9}{'TFLOP/s':>9}{'%ceil':>7}{'vs best':>9}{'err/bound':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        start = f"{r['op']:<12}{r['label'][:27]:<28}{r['dtype']:<26}{r['direction']:<8}{r['provider']:<16}"
        if "ms" not in r:
            why = ("ERROR: " + r["error"]) if "error" in r else "skipped: " + r.get("skipped", "not timed")
            lines.append(f"{start}  {why[:70]}")
            continue
        def fmt(key, spec):
            return format(r[key], spec) if key in r else "-"
        speedup = f"{r['speedup_vs_best_peer']:.2f}x" if "speedup_vs_best_peer" in r else "-"
        notes = ("  WRONG: " + r["wrong"] if "wrong" in r else "") + \
            ("  waits for the GPU" if r.get("waits_for_gpu") else "") + \
            ("  host-bound" if r.get("host_bound") else "") + _graph_note(r)
        # half the 20th-80th percentile range, in percent of the median
        spread = f"±{50 * (r['ms_p80'] - r['ms_p20']) / r['ms']:.0f}%" if "ms_p80" in r and r["ms"] else "-"
        lines.append(f"{start}{fmt('ms', '.4f'):>9}{spread:>8}{fmt('GBps', '.0f'):>9}{fmt('TFLOPs', '.1f'):>9}"
                     f"{fmt('pct_of_ceiling', '.1f'):>7}{speedup:>9}{fmt('error_vs_bound', '.2f'):>10}{notes}")
    return "\n".join(lines)


def _graph_note(r: dict) -> str:
    """A host-bound case's row timed again as a CUDA graph (benchmarks/replay.py)."""
    if "graph_ms" in r:
        up = f", {r['graph_speedup_vs_best_peer']:.2f}x" if "graph_speedup_vs_best_peer" in r else ""
        return f"  as a CUDA graph {r['graph_ms']:.4f} ms{up}"
    return "  no CUDA graph: " + r["graph_error"][:60] if "graph_error" in r else ""


def failures(rows: List[dict]) -> List[str]:
    """The rows of ours that raised or were wrong, and peers that were wrong,
    one line each: what makes the run fail."""
    return [f"{r['op']} {r['direction']} {r['dtype']} {r['label']} {r['provider']}: "
            f"{'error: ' + r['error'] if 'error' in r else 'wrong: ' + r['wrong']}"
            for r in rows if "error" in r or ("wrong" in r and r["provider"] in OURS)]


def result_base(out_dir: str, meta: dict) -> str:
    """out_dir/<GPU name>-<date>-<time> (smoke-... for a run without a GPU,
    meta's "gpu" None): the reports' path less its suffix."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"python -m benchmarks: --out {out_dir}: {e.strerror}") from None
    stem = meta["gpu"].replace(" ", "-") if meta.get("gpu") else "smoke"
    return os.path.join(out_dir, f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")


_KEY_FIELDS = ("op", "label", "dtype", "direction", "provider")


def load_report(path: str, option: str) -> dict:
    """The report (meta and results) that `python -m benchmarks` wrote at
    path, or SystemExit saying, in a line, why the file named by `option`
    is not one."""
    def refuse(why):
        raise SystemExit(f"python -m benchmarks: {option} {path}: {why}")
    try:
        with open(path) as f:
            loaded = json.load(f)
    except OSError as e:
        refuse(e.strerror)
    except ValueError as e:
        refuse(f"not JSON ({e})")
    if not (isinstance(loaded, dict) and isinstance(loaded.get("meta"), dict)
            and isinstance(loaded.get("results"), list)
            and all(isinstance(r, dict) and all(k in r for k in _KEY_FIELDS) for r in loaded["results"])):
        refuse(f"not a report of python -m benchmarks (a JSON object of 'meta' and 'results', rows naming "
               f"{', '.join(_KEY_FIELDS)})")
    return loaded


def write_results(base: str, meta: dict, rows: List[dict]) -> None:
    """base.json (meta + every row) and base.csv (one row per case and provider)."""
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    keys = sorted({k for r in rows for k, v in r.items() if not isinstance(v, dict)})  # "tuned": the JSON's alone
    keys = [k for k in _KEY_FIELDS if k in keys] + [k for k in keys if k not in _KEY_FIELDS]  # the case first
    with open(base + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def case_key(row: dict) -> tuple:
    return (row["op"], row["label"], row["dtype"], row["direction"], row["provider"])


MACHINE_KEYS = ("gpu", "torch", "triton", "cuda", "python", "pyext")


def compare_machines(old_meta: dict, meta: dict) -> List[str]:
    """A line for each of MACHINE_KEYS where the two runs differ: their
    times then compare different machines or software, not our change."""
    return [f"NOTE: {key} differs: {old_meta.get(key)} then, {meta.get(key)} now" for key in MACHINE_KEYS
            if old_meta.get(key) != meta.get(key)]


def compare(old_rows: List[dict], rows: List[dict], threshold: float = 0.05) -> List[str]:
    """Per case and provider, the change of the median time against an older
    run; lines flagged REGRESSION when more than `threshold` slower and the
    two runs' spreads (20th to 80th percentile) do not overlap, a row timed
    then and skipped now saying why, and a last line counting the rows
    timed then that this run does not hold (other ops, dtypes or sizes)."""
    old = {case_key(r): r for r in old_rows if r.get("ms", 0) > 0}
    lines = []
    for r in rows:
        then = old.get(case_key(r))
        if then is None:
            continue
        before = then["ms"]
        head = f"{r['op']:<11}{r['label'][:26]:<27}{r['dtype']:<26}{r['direction']:<8}{r['provider']:<16}"
        if "ms" not in r:
            lines.append(f"{head}{before:9.4f} -> skipped now: {r.get('skipped', r.get('error', 'not timed'))[:60]}")
            continue
        change = r["ms"] / before - 1
        apart = r.get("ms_p20", r["ms"]) > then.get("ms_p80", before)
        flag = ("  REGRESSION" if apart else "  slower, within the runs' spread") if change > threshold else ""
        lines.append(f"{head}{before:9.4f} -> {r['ms']:9.4f} ms {100 * change:+6.1f}%{flag}")
    gone = len(old.keys() - {case_key(r) for r in rows})
    if gone and lines:
        lines.append(f"{gone} rows timed in the older run are not in this one (other ops, dtypes or sizes)")
    return lines


def summary(rows: List[dict]) -> List[str]:
    """Per op: the speed-up over the best peer of the better of our public
    backends (pyext-cuda, pyext-triton; not the diagnostic variants) in each
    case (geometric mean and minimum over the cases) and their best percent
    of the ceiling; rows of ours that are wrong or raised, counted."""
    lines = []
    for op in dict.fromkeys(r["op"] for r in rows):
        best = _best_of_ours(rows, op, "speedup_vs_best_peer")
        if not best:
            ours_timed = any(r["op"] == op and r["provider"] in OURS and "ms" in r for r in rows)
            lines.append(f"{op:<12} " + ("no peer timed beside ours: no speed-up to give" if ours_timed
                                         else "no timed case of ours"))
            continue
        pct = [r["pct_of_ceiling"] for r in rows if r["op"] == op and r["provider"] in PUBLIC
               and "pct_of_ceiling" in r and "wrong" not in r]
        pct_text = f", up to {max(pct):.0f}% of the ceiling" if pct else ""
        lines.append(f"{op:<12} ours vs best peer: {_geomean_and_min(best)}{pct_text}")
        graphed = _best_of_ours(rows, op, "graph_speedup_vs_best_peer")
        if graphed:
            lines.append(f"{op:<12} host-bound cases as CUDA graphs: {_geomean_and_min(graphed)}")
    for op in dict.fromkeys(r["op"] for r in rows):
        bad = [r for r in rows if r["op"] == op and r["provider"] in OURS and ("error" in r or "wrong" in r)]
        if bad:
            lines.append(f"{op:<12} FAILED: {len(bad)} rows of ours raised or were wrong (see the table)")
    return lines


def _best_of_ours(rows: List[dict], op: str, key: str) -> dict:
    """Per case of op, the better of our public backends' `key` (a speed-up)."""
    best = {}
    for r in rows:
        if r["op"] == op and r["provider"] in PUBLIC and key in r:
            case = case_key(r)[:4]
            best[case] = max(best.get(case, 0.0), r[key])
    return best


def _geomean_and_min(ups: dict) -> str:
    values = list(ups.values())
    geo = math.exp(sum(math.log(u) for u in values) / len(values))
    return f"geomean {geo:.2f}x, min {min(values):.2f}x over {len(values)} cases"


def time_spent(rows: List[dict], seconds: Optional[float]) -> List[str]:
    """Where the run's time went: per op, the wall time of its timed rows
    (wall_s: first calls, compiles, autotuning, timing), over how many cases,
    and its three costliest providers; then the rest of the run's `seconds`
    (the ceilings, making the inputs, peers that failed). Nothing for
    reports without wall_s."""
    timed = [r for r in rows if "wall_s" in r]
    if not timed:
        return []
    digits = 1 if seconds and seconds < 60 else 0  # a smoke run's seconds, not rounded to nothing
    lines = [f"{seconds:.{digits}f} s in all ({_minutes(seconds)})" if seconds else "the run's total is not known"]
    for op in dict.fromkeys(r["op"] for r in timed):
        by_provider = {}
        for r in timed:
            if r["op"] == op:
                by_provider[r["provider"]] = by_provider.get(r["provider"], 0.0) + r["wall_s"]
        costliest = sorted(by_provider.items(), key=lambda item: -item[1])[:3]
        cases = len({case_key(r)[:4] for r in timed if r["op"] == op})
        lines.append(f"{op:<14}{sum(by_provider.values()):6.{digits}f} s over {cases:3d} cases: "
                     + ", ".join(f"{name} {spent:.{digits}f} s" for name, spent in costliest))
    if seconds:
        lines.append(f"{'the rest':<14}{seconds - sum(r['wall_s'] for r in timed):6.{digits}f} s: ceilings, "
                     "inputs, peers that failed")
    return lines


# What a case's `size` is, by op (before any "[...]" of its plot group)
SIZE_AXES = {"gelu": "elements", "layer_norm": "hidden size (elements a row)",
             "rms_norm": "hidden size (elements a row)", "rms_norm_gated": "hidden size (elements a row)",
             "attention": "sequence length (16k tokens a batch)", "adamw": "parameters",
             "train_step": "tokens a step"}


def plot(base: str, rows: List[dict], meta: Optional[dict] = None) -> List[str]:
    """One PNG per op, direction and dtype (`figure`)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return []
    paths = []
    for op, direction, dtype in sorted({(r["op"], r["direction"], r["dtype"]) for r in rows}):
        sel = [r for r in rows if (r["op"], r["direction"], r["dtype"]) == (op, direction, dtype) and "ms" in r]
        if not sel:
            continue
        fig = figure(sel, meta or {})
        path = f"{base}-{_file_safe(op)}-{_file_safe(direction)}-{dtype}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _file_safe(name: str) -> str:
    """name with what a file name or a Markdown link would trip on ("[4096 rows]", "fwd+bwd") made "_"."""
    return "".join(c if c.isalnum() or c in "._" else "_" for c in name).strip("_")


def figure(rows: List[dict], meta: dict):
    """Throughput against size for the timed rows of one op, direction and
    dtype: a line per provider, and the run's measured ceiling (copy
    bandwidth, or the bf16 matmul rate) dashed, so that each point reads as
    a share of what the machine can do."""
    import matplotlib.pyplot as plt
    op, direction, dtype = rows[0]["op"], rows[0]["direction"], rows[0]["dtype"]
    metric = "TFLOPs" if "TFLOPs" in rows[0] else "GBps"
    unit = "TFLOP/s" if metric == "TFLOPs" else "GB/s"
    fig, ax = plt.subplots(figsize=(7, 4))
    for provider in sorted({r["provider"] for r in rows}):
        pts = sorted((r["size"], r[metric]) for r in rows if r["provider"] == provider)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
    ceiling = meta.get("ceilings", {}).get("bf16_matmul_TFLOPs" if metric == "TFLOPs" else "copy_GBps")
    if ceiling:
        name = "bf16 matmul" if metric == "TFLOPs" else "copy"
        ax.axhline(ceiling, color="black", linestyle="--", linewidth=0.8,
                   label=f"{name}, measured: {ceiling:.0f} {unit}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(SIZE_AXES.get(op.split("[")[0], "size"))
    ax.set_ylabel(unit)
    ax.set_ylim(bottom=0)
    machine = (f" on {meta['gpu']}, {meta['time'][:10]}" if meta.get("gpu") and meta.get("time")
               else " (CPU smoke run: the timings mean nothing)" if not meta.get("gpu") else "")
    ax.set_title(f"{op} {direction} {dtype}{machine}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
