"""benchmarks.readme_table turns a benchmark JSON into the README's results section."""
import json

from benchmarks import readme_table


def test_rewrites_only_the_marked_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{readme_table.START}\nold\n{readme_table.END}\noutro\n")
    report = {"meta": {"time": "2026-11-22T10:00:00", "gpu": "NVIDIA H100", "torch": "2.11", "triton": "3.6",
                       "cuda": "13.0", "ceilings": {"copy_GBps": 3000.0, "bf16_matmul_TFLOPs": 780.0}},
              "results": [
                  dict(op="gelu", label="n=1", dtype="bfloat16", direction="fwd", provider="pyext-triton", ms=2.0,
                       GBps=2700.0, pct_of_ceiling=90.0, speedup_vs_best_peer=1.1),
                  dict(op="gelu", label="n=1", dtype="bfloat16", direction="fwd", provider="pyext-cuda", ms=1.5,
                       GBps=2800.0, pct_of_ceiling=93.3, speedup_vs_best_peer=1.2),
                  dict(op="gelu", label="n=1", dtype="bfloat16", direction="fwd", provider="torch", ms=1.8),
                  # a faster result of ours that is wrong is not the case's figure
                  dict(op="gelu", label="n=2", dtype="bfloat16", direction="fwd", provider="pyext-cuda", ms=1.0,
                       GBps=5400.0, wrong="error 3x the bound"),
                  dict(op="gelu", label="n=2", dtype="bfloat16", direction="fwd", provider="pyext-triton", ms=2.0,
                       GBps=2700.0, pct_of_ceiling=90.0, speedup_vs_best_peer=0.9, best_peer="torch.compile")]}
    results = tmp_path / "results"
    results.mkdir()
    source = results / "NVIDIA-H100.json"
    source.write_text(json.dumps(report))
    for name in ("NVIDIA-H100-gelu-fwd-bfloat16.png", "NVIDIA-H100-gelu-bwd-float32.png", "other-gelu-fwd.png"):
        (results / name).write_bytes(b"png")
    readme_table.main([str(source)], readme=str(readme), results_dir=str(results))
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text
    assert "NVIDIA H100" in text
    assert "| gelu | n=1 | bfloat16 | fwd | pyext-cuda | 1.500 | 2800 GB/s | 93% | 1.20x | - |" in text
    assert "| gelu | n=2 | bfloat16 | fwd | pyext-triton | 2.000 | 2700 GB/s | 90% | 0.90x | torch.compile |" in text
    assert "Source: `results/NVIDIA-H100.json`" in text
    assert "not checked against the oracle" in text  # none of its rows has error_vs_bound
    # the plots written with this JSON, by path from the README; not another run's
    assert "![gelu bwd float32](results/NVIDIA-H100-gelu-bwd-float32.png)" in text
    assert "![gelu fwd bfloat16](results/NVIDIA-H100-gelu-fwd-bfloat16.png)" in text
    assert "other-gelu" not in text


def test_without_gpu_results_says_so(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"{readme_table.START}\n{readme_table.END}\n")
    (tmp_path / "smoke-1.json").write_text("{}")
    readme_table.main([], readme=str(readme), results_dir=str(tmp_path))
    assert "No GPU results are committed yet" in readme.read_text()


def report_at(time, ops):
    return {"meta": {"time": time, "gpu": "NVIDIA H200", "torch": "2.11", "triton": "3.6", "cuda": "13.0",
                     "ceilings": {}, "ops": ops, "quick": True},
            "results": [dict(op=ops[0], label="n=1", dtype="float32", direction="fwd", provider="pyext-cuda", ms=1.0)]}


def test_takes_the_run_that_started_last_not_the_file_written_last(tmp_path):
    """A clone's file times say when it was checked out: the JSON's own time decides."""
    import os
    readme = tmp_path / "README.md"
    readme.write_text(f"{readme_table.START}\n{readme_table.END}\n")
    later, earlier = tmp_path / "run-b.json", tmp_path / "run-a.json"
    later.write_text(json.dumps(report_at("2026-12-04T14:54:53+0000", ["adamw"])))
    earlier.write_text(json.dumps(report_at("2026-12-04T14:52:37+0000", ["attention"])))
    os.utime(later, (1, 1))  # written "first"
    readme_table.main([], readme=str(readme), results_dir=str(tmp_path))
    text = readme.read_text()
    assert "Source: `run-b.json`" in text
    assert "The run's ops: adamw (--quick: fewer sizes, shorter timing); its results were not checked" in text


def test_a_smoke_run_or_a_file_that_is_no_report_is_refused(tmp_path, capsys):
    import pytest
    readme = tmp_path / "README.md"
    readme.write_text(f"{readme_table.START}\nkept\n{readme_table.END}\n")
    smoke, broken = tmp_path / "smoke.json", tmp_path / "broken.json"
    smoke.write_text(json.dumps(dict(report_at("2026-12-04T14:54:53+0000", ["gelu"]),
                                     meta={"gpu": None, "time": "2026-12-04T14:54:53+0000"})))
    broken.write_text("{")
    with pytest.raises(SystemExit, match="a run without a GPU"):
        readme_table.main([str(smoke)], readme=str(readme), results_dir=str(tmp_path))
    with pytest.raises(SystemExit, match="not JSON"):
        readme_table.main([str(broken)], readme=str(readme), results_dir=str(tmp_path))
    assert "kept" in readme.read_text()
    with pytest.raises(SystemExit) as done:
        readme_table.main(["--help"], readme=str(readme), results_dir=str(tmp_path))
    assert done.value.code == 0 and "RESULTS.json" in capsys.readouterr().out


def test_a_run_with_host_bound_cases_gives_their_cuda_graph_times_in_a_column(tmp_path):
    meta = {"time": "2026-12-08T10:00:00", "gpu": "NVIDIA H100", "torch": "2.11", "triton": "3.6", "cuda": "13.0"}
    row = dict(op="gelu", dtype="bfloat16", direction="fwd", provider="pyext-triton", GBps=100.0)
    rows = [dict(row, label="n=1", ms=0.02, host_bound=True, graph_ms=0.004, graph_speedup_vs_best_peer=1.5,
                 graph_best_peer="torch"),
            dict(row, label="n=2", ms=1.0)]
    lines = readme_table.markdown({"meta": meta, "results": rows}, str(tmp_path / "run.json"),
                                  readme_dir=str(tmp_path)).splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| op |"))
    assert lines[head].endswith("| best peer | host-bound: as a CUDA graph |") and lines[head + 1] == "|---" * 11 + "|"
    assert lines[head + 2].endswith("| - | 0.004 ms, 1.50x vs torch |") and lines[head + 3].endswith("| - | - |")
