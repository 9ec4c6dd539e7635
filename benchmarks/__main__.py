"""python -m benchmarks [--ops gelu ...] [--dtypes bfloat16 float32] [--quick] [--cases REGEX ...]
                       [--skip-providers P ...] [--out DIR] [--compare OLD.json]
python -m benchmarks --merge PART.json ... [--out DIR] [--compare OLD.json]

The JSON and CSV are rewritten after every case, so a run that is killed (a
time limit, a kernel that hangs) keeps what it finished. A kernel that
faults leaves the process unable to use the GPU: the run stops there, says
which provider did it, and reports what it finished; --skip-providers leaves
that one out of a second run. --merge joins the reports of runs made one op
per process (as make gpu-check does, so that a kernel that breaks the CUDA
context costs its own op only) into one report."""
import argparse
import json
import re
import signal
import sys
import time

import torch

from benchmarks import COUNTS, OPS, PROVIDERS, harness, report
from benchmarks.harness import HAS_GPU

NO_GPU_WARNING = ("NO GPU: this is a smoke run on tiny CPU shapes; its timings mean nothing "
                  "(run it on a CUDA GPU for real figures).")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _regex(text):
    try:
        return re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"not a regular expression: {text!r} ({e})") from None


def measure(args, meta, base):
    """Ceilings (into meta), then every case of args.ops: the rows, written to base as they come."""
    start = time.perf_counter()
    dtypes = [getattr(torch, d) for d in args.dtypes]
    total = sum(COUNTS[op](args.quick, dtypes) for op in args.ops)
    if not total:  # adamw times float32 alone, attention the half types: --dtypes can leave an op nothing
        raise SystemExit(f"python -m benchmarks: --ops {' '.join(args.ops)} with --dtypes {' '.join(args.dtypes)} "
                         "select no case (each op's dtypes: benchmarks/<op>.py)")
    print("machine:", ", ".join(f"{k}={v}" for k, v in meta.items() if not isinstance(v, dict)))
    meta.update(ops=list(args.ops), dtypes=list(args.dtypes), quick=args.quick)  # the run's scope, for readers
    if args.cases:
        meta["cases"] = [p.pattern for p in args.cases]
    ceilings = harness.measure_ceilings(args.quick)
    meta["ceilings"] = ceilings
    if HAS_GPU:
        print(f"ceilings: copy {ceilings['copy_GBps']:.0f} GB/s, "
              f"bf16 matmul {ceilings['bf16_matmul_TFLOPs']:.0f} TFLOP/s")

    # Cases are made one at a time (each holds its tensors), so the total is not known ahead.
    # Stopped early (Ctrl-C, or SIGTERM from a time limit), it reports the cases it finished.
    signal.signal(signal.SIGTERM, _interrupt)
    rows, done = [], 0
    # With --cases the count is not known ahead either: the bar shows cases done, with no total.
    patterns = args.cases or []
    bar = report.Progress(None if patterns else total)
    skip = tuple(args.skip_providers)
    try:
        for op in args.ops:
            for case in OPS[op](args.quick, dtypes):
                name = f"{case.op} {case.direction} {case.dtype} {case.label}"
                if patterns and not any(p.search(name) for p in patterns):
                    continue
                bar.show(done, name)
                rows += harness.run_case(case, ceilings, args.quick, skip)
                done += 1
                report.write_results(base, meta, rows)
        if patterns and not done:
            raise SystemExit(f"python -m benchmarks: --cases {' '.join(p.pattern for p in patterns)!r} matched no "
                             f"case of --ops {' '.join(args.ops)}")
    except KeyboardInterrupt:
        meta["interrupted_after_cases"] = done
        print(f"\ninterrupted: reporting the {done} cases finished")
    except harness.BrokenCUDAContext as e:
        message, case_rows = e.args
        rows += case_rows
        meta["interrupted_after_cases"] = done
        meta["cuda_context_broken_by"] = message
        print(f"\nstopped: {message}; the CUDA context is unusable after it. Reporting the {done} cases "
              f"finished; run again with --skip-providers {message.split()[0]} for the rest")
    bar.show(done, "done", last=True)
    meta["seconds"] = time.perf_counter() - start  # the run's wall time (the suite's budget: 10 minutes in full)
    return rows


def merge(paths):
    """One report from several: the first one's machine and ceilings, one row
    per case and provider. Where parts repeat one (a run again after a fault,
    with the faulting provider left out), a measured row wins over a skipped
    one, and a later part over an earlier. A part that is not a report (a
    run killed while writing it) is left out, saying so, unless all are."""
    reports, kept = [], []
    for path in paths:
        try:
            reports.append(report.load_report(path, "--merge"))
            kept.append(path)
        except SystemExit as e:
            if len(paths) == 1:
                raise
            print(f"left out of the merge: {e}")
    if not reports:
        raise SystemExit("python -m benchmarks: --merge: none of the files is a report")
    paths = kept
    # the first part's machine; what belongs to one part alone is not the merge's
    one_part = ("interrupted_after_cases", "cuda_context_broken_by", "cases", "seconds", "command")
    meta = {k: v for k, v in reports[0]["meta"].items() if k not in one_part}
    meta["merged_from"] = list(paths)
    metas = [r["meta"] for r in reports]
    if len({json.dumps(m.get("ceilings"), sort_keys=True) for m in metas}) > 1:
        meta["ceilings_of_parts"] = {p: m.get("ceilings") for p, m in zip(paths, metas)}  # each row: its own
    if all("ops" in m for m in metas):
        meta.update(ops=list(dict.fromkeys(op for m in metas for op in m["ops"])),
                    dtypes=list(dict.fromkeys(d for m in metas for d in m["dtypes"])),
                    quick=any(m["quick"] for m in metas))
    if all("seconds" in m for m in metas):
        meta["seconds"] = sum(m["seconds"] for m in metas)
    interrupted = [p for p, r in zip(paths, reports) if "interrupted_after_cases" in r["meta"]]
    if interrupted:
        meta["interrupted"] = interrupted
    broken = [r["meta"]["cuda_context_broken_by"] for r in reports if "cuda_context_broken_by" in r["meta"]]
    if broken:
        meta["cuda_context_broken_by"] = broken
    rows = {}
    for row in (row for r in reports for row in r["results"]):
        key = report.case_key(row)
        if key not in rows or "skipped" in rows[key] or "skipped" not in row:
            rows[key] = row
    return meta, list(rows.values())


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", choices=sorted(OPS), default=list(OPS))
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"],
                        choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--quick", action="store_true", help="fewer sizes, shorter timing")
    parser.add_argument("--cases", nargs="+", metavar="REGEX", type=_regex,
                        help="only the cases whose 'op direction dtype label', as the progress line shows it, "
                             "one of these matches (e.g. 'fwd bfloat16-d64 ' or 'S=2048 D=128$')")
    parser.add_argument("--skip-providers", nargs="+", action="extend", default=[], metavar="PROVIDER",
                        help="leave these providers out (e.g. pyext-cuda), each row saying so")
    parser.add_argument("--out", default=harness.RESULTS_DIR, metavar="DIR",
                        help="where the JSON, CSV and plots go (default: benchmarks/results/)")
    parser.add_argument("--compare", metavar="OLD.json", help="report each case's change against an older run")
    parser.add_argument("--merge", nargs="+", metavar="PART.json", help="join these reports instead of measuring")
    args = parser.parse_args(argv)
    args.ops, args.dtypes = list(dict.fromkeys(args.ops)), list(dict.fromkeys(args.dtypes))
    known = set().union(*(PROVIDERS[op] for op in args.ops))
    unknown = [p for p in args.skip_providers if p not in known]
    if unknown and not args.merge:
        parser.error(f"--skip-providers {' '.join(unknown)}: no provider of --ops {' '.join(args.ops)} is named "
                     f"so (they are: {', '.join(sorted(known))})")
    old = report.load_report(args.compare, "--compare") if args.compare else None  # before any time is spent

    if args.merge:
        meta, rows = merge(args.merge)
    else:
        meta = harness.machine_info()
    gpu = bool(meta.get("gpu"))  # a merge's: the machine its reports were measured on
    if not gpu:
        print(NO_GPU_WARNING)
    base = report.result_base(args.out, meta)
    if not args.merge:
        rows = measure(args, meta, base)

    print(report.table(rows))
    print("\n".join(["", "summary:"] + report.summary(rows)))
    spent = report.time_spent(rows, meta.get("seconds"))
    if spent:
        print("\n".join(["", "time spent:"] + spent))
    if old is not None:
        lines = report.compare_machines(old["meta"], meta) + report.compare(old["results"], rows)
        print("\n".join(["", f"against {args.compare}:"] + (lines or ["no case in common"])))
    report.write_results(base, meta, rows)
    pngs = report.plot(base, rows, meta)
    print(f"wrote {base}.json, {base}.csv and {len(pngs)} plots")
    failed = report.failures(rows)
    if failed:
        print("\n".join(["", "FAILED (ours raised or gave a wrong result):"] + failed))
    if not gpu:
        print(NO_GPU_WARNING)
    return 1 if failed or "interrupted_after_cases" in meta or "interrupted" in meta else 0


if __name__ == "__main__":
    sys.exit(main())
