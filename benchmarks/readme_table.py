"""Write the latest committed GPU benchmark into README.md's results section.

    python -m benchmarks.readme_table [RESULTS.json]

Without an argument it takes the GPU JSON under benchmarks/results/ whose
run started last (smoke and train_gpt files are skipped) and rewrites the
README between <!-- results:start --> and <!-- results:end -->, so the
README shows only measured figures, with their date, GPU, versions and the
ops the run covered, and the plots written beside that JSON
(`<its name>-<op>-<direction>-<dtype>.png`).
"""
import argparse
import datetime
import glob
import json
import os
import sys

from benchmarks.harness import PUBLIC
from benchmarks.report import load_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START, END = "<!-- results:start -->", "<!-- results:end -->"


def measured_at(path):
    """When the run of this JSON started (its meta's time): a clone's file
    times say only when it was checked out."""
    with open(path) as f:
        started = datetime.datetime.fromisoformat(json.load(f)["meta"]["time"])
    return started if started.tzinfo else started.replace(tzinfo=datetime.timezone.utc)


def latest_gpu_json(results_dir):
    paths = [p for p in glob.glob(os.path.join(results_dir, "*.json"))
             if not os.path.basename(p).startswith(("smoke", "train_gpt"))]
    return max(paths, key=lambda p: (measured_at(p), p)) if paths else None


def scope(meta, rows):
    """What the run covered, in a sentence: its ops, and whether it was quick or cut short."""
    ops = meta.get("ops") or sorted({r["op"].split("[")[0] for r in rows})
    text = f"The run's ops: {', '.join(ops)}"
    if meta.get("quick"):
        text += " (--quick: fewer sizes, shorter timing)"
    if "interrupted_after_cases" in meta or "interrupted" in meta:
        text += "; it was cut short, and the table holds only the cases it finished"
    if not any("error_vs_bound" in r for r in rows):
        text += "; its results were not checked against the oracle (a run from before the suite checked them)"
    return text + ". Earlier runs are under `benchmarks/results/`."


def plots_beside(source):
    """The PNG plots `python -m benchmarks` wrote with this JSON, sorted."""
    return sorted(glob.glob(glob.escape(os.path.splitext(source)[0]) + "-*.png"))


def markdown(report, source, readme_dir=ROOT):
    meta, rows = report["meta"], report["results"]
    ceil = meta.get("ceilings", {})

    def ceiling(key):  # None where it was not measured (a CPU smoke run)
        return "-" if ceil.get(key) is None else f"{ceil[key]:.0f}"
    lines = [f"Measured {meta['time'][:10]} on {meta['gpu']} (torch {meta['torch']}, Triton {meta['triton']}, "
             f"CUDA {meta['cuda']}); ceilings: copy {ceiling('copy_GBps')} GB/s, bf16 matmul "
             f"{ceiling('bf16_matmul_TFLOPs')} TFLOP/s. Source: `{os.path.relpath(source, readme_dir)}`.", "",
             scope(meta, rows), ""]
    graphed = any("graph_ms" in r for r in rows)  # runs before benchmarks/replay.py have no such column
    lines += ["| op | case | dtype | dir | ours (best) | time ms | throughput | % ceiling | vs best peer | best peer |"
              + (" host-bound: as a CUDA graph |" if graphed else ""), "|---" * (11 if graphed else 10) + "|"]
    cases = {}
    for r in rows:
        if r["provider"] in PUBLIC and "ms" in r and "wrong" not in r:
            key = (r["op"], r["label"], r["dtype"], r["direction"])
            if key not in cases or r["ms"] < cases[key]["ms"]:
                cases[key] = r
    for (op, label, dtype, direction), r in cases.items():
        rate = f"{r['TFLOPs']:.0f} TFLOP/s" if "TFLOPs" in r else f"{r.get('GBps', 0):.0f} GB/s"
        pct = f"{r['pct_of_ceiling']:.0f}%" if "pct_of_ceiling" in r else "-"
        up = f"{r['speedup_vs_best_peer']:.2f}x" if "speedup_vs_best_peer" in r else "-"
        graph = ""
        if graphed:  # a host-bound case's kernels alone (benchmarks/replay.py)
            graph = " - |" if "graph_ms" not in r else f" {r['graph_ms']:.3f} ms" + (
                f", {r['graph_speedup_vs_best_peer']:.2f}x vs {r['graph_best_peer']}" if "graph_best_peer" in r
                else "") + " |"
        lines.append(f"| {op} | {label} | {dtype} | {direction} | {r['provider']} | {r['ms']:.3f} | {rate} | "
                     f"{pct} | {up} | {r.get('best_peer', '-')} |{graph}")
    stem = os.path.basename(os.path.splitext(source)[0])
    for png in plots_beside(source):
        title = os.path.splitext(os.path.basename(png))[0][len(stem) + 1:].replace("-", " ")
        target = os.path.relpath(png, readme_dir)
        if any(c in target for c in " ()<>"):  # (an older run's plot names): a link Markdown still reads
            target = f"<{target}>"
        lines += ["", f"![{title}]({target})"]
    return "\n".join(lines)


def rewrite(readme_path, body):
    text = open(readme_path).read()
    if START not in text or END not in text:
        raise SystemExit(f"{readme_path} has no {START} ... {END} section")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(readme_path, "w") as f:
        f.write(f"{head}{START}\n{body}\n{END}{tail}")


def main(argv=None, readme=os.path.join(ROOT, "README.md"),
         results_dir=os.path.join(ROOT, "benchmarks", "results")):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.readme_table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="?", metavar="RESULTS.json",
                        help="a GPU run's JSON (default: the committed one whose run started last)")
    args = parser.parse_args(argv)
    source = args.results or latest_gpu_json(results_dir)
    if source is None:
        body = "No GPU results are committed yet: run `make gpu-check` on a GPU machine."
    else:
        report = load_report(source, "readme_table")
        if not report["meta"].get("gpu"):
            raise SystemExit(f"python -m benchmarks.readme_table: {source} is a run without a GPU (a smoke run): "
                             "its timings mean nothing; give a GPU run's JSON")
        body = markdown(report, source, os.path.dirname(os.path.abspath(readme)))
    rewrite(readme, body)
    if source is None:
        print(f"no GPU results JSON in {results_dir}: the results section of {readme} says so")
    else:
        print(f"rewrote the results section of {readme} from {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
