"""`python -m benchmarks --quick` runs end to end and writes its report."""
import glob
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import pyext
from benchmarks import OPS, report
from conftest import HAS_GPU, device_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(HAS_GPU, reason="the GPU run is `make gpu-check`")
def test_smoke_run_writes_json_csv_and_plots(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert "mean nothing" in lines[0] and "mean nothing" in lines[-1]
    (path,) = glob.glob(str(tmp_path / "*.json"))
    report = json.load(open(path))
    assert report["meta"]["torch"] and report["results"]
    assert report["meta"]["quick"] is True and report["meta"]["ops"] == list(OPS)
    timed = [r for r in report["results"] if "ms" in r]
    assert {r["provider"] for r in timed} >= {"torch", "pyext-triton"}
    # every result checked against the float64 oracle before it was timed, or saying why not
    assert not [r for r in timed if "wrong" in r or "error" in r], [r for r in timed if "wrong" in r]
    assert all(("error_vs_bound" in r) != ("unchecked" in r) for r in timed)
    assert {r["op"] for r in timed if "error_vs_bound" in r} == {r["op"] for r in timed} - {"train_step"}
    # what an attention label leaves out (B = 16384 / S and H = 2048 / D on a GPU) is in each row
    assert all({"batch", "heads"} <= set(r["shape"]) or "packed" in r["dtype"] for r in timed if r["op"] == "attention")
    # what each provider and the whole run cost in wall time, for sizing the suite to its budget
    assert all(0 < r["wall_s"] < report["meta"]["seconds"] for r in timed)
    # the attention rows of ours say which config each autotuned kernel chose (one config under the interpreter)
    tuned = {kernel for r in timed if "tuned" in r for kernel in r["tuned"]}
    assert {"_fwd_kernel", "_bwd_dkdv_dq_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"} <= tuned, tuned
    ops = list(dict.fromkeys(r["op"] for r in timed))
    spent = out.stdout.split("time spent:\n")[1].splitlines()[:len(ops) + 2]
    assert "s in all (" in spent[0] and spent[-1].startswith("the rest"), spent
    assert all(line.startswith(op) for line, op in zip(spent[1:], ops)), spent
    assert glob.glob(str(tmp_path / "*.csv")) and glob.glob(str(tmp_path / "*.png"))
    again = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--ops", "gelu", "--out",
                            str(tmp_path / "again"), "--compare", path],
                           cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"against {path}:" in again.stdout and "ms" in again.stdout.split(f"against {path}:")[1]


@pytest.mark.parametrize("op, metric, ceiling, axis", [
    ("layer_norm[4096 rows]", "GBps", ("copy_GBps", "copy, measured: 4132 GB/s"), "hidden size (elements a row)"),
    ("attention", "TFLOPs", ("bf16_matmul_TFLOPs", "bf16 matmul, measured: 783 TFLOP/s"),
     "sequence length (16k tokens a batch)")])
def test_a_plot_draws_each_provider_against_the_measured_ceiling(op, metric, ceiling, axis):
    """A plot reads on its own: what the size is, the GPU and the day, a line
    per provider and the run's ceiling for the metric; no ceiling drawn where
    the run measured none (the CPU smoke run)."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    rows = [dict(op=op, direction="fwd", dtype="bfloat16", provider=provider, size=size, ms=1.0, **{metric: value})
            for provider, value in (("pyext-triton", 300.0), ("torch", 200.0)) for size in (1024, 4096)]
    meta = {"gpu": "NVIDIA H200", "time": "2026-12-04T14:54:53+0000",
            "ceilings": {"copy_GBps": 4131.8, "bf16_matmul_TFLOPs": 783.47}}
    ax = report.figure(rows, meta).axes[0]
    assert ax.get_xlabel() == axis and ax.get_ylabel() == ("GB/s" if metric == "GBps" else "TFLOP/s")
    assert ax.get_title() == f"{op} fwd bfloat16 on NVIDIA H200, 2026-12-04"
    assert [line.get_label() for line in ax.get_lines()] == ["pyext-triton", "torch", ceiling[1]]
    assert ax.get_lines()[-1].get_ydata()[0] == meta["ceilings"][ceiling[0]] and ax.get_ylim()[0] == 0
    plt.close("all")
    ax = report.figure(rows, {}).axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["pyext-triton", "torch"]
    plt.close("all")


def test_triton_launch_cost_times_every_launch_function_on_a_pretend_gpu():
    """`TRITON_INTERPRET=0 python -m benchmarks.triton_launch_cost`: the Triton launch functions,
    past the autotuner after each key's first launch, compiled for sm_90 and timed with no GPU."""
    pytest.importorskip("triton.backends.nvidia")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.triton_launch_cost"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = out.stdout.strip().splitlines()[1:]
    assert len(rows) == 8 and all(float(row.split()[0]) > 0 for row in rows), out.stdout


def test_host_cost_times_each_call_beside_torchs():
    """`python -m benchmarks.host_cost --quick`: the CUDA ops given CPU bodies, each public call timed
    beside torch's; a hundredth of the calls, so that CI sees the tool run (its figures are noise)."""
    from pyext import _backend
    if not _backend.CUDA_BUILT:
        pytest.skip(f"needs the CUDA extension's ops: {_backend._CUDA_BUILD_NOTE}")
    out = subprocess.run([sys.executable, "-m", "benchmarks.host_cost", "--quick"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = {line.split()[0]: line for line in out.stdout.strip().splitlines()[2:-1]}
    assert {"layer_norm", "gelu", "sdpa", "varlen"} <= set(rows), out.stdout
    assert all(float(row.split()[-1]) > 0 for row in rows.values()), out.stdout
    assert out.stdout.strip().splitlines()[-1].startswith("AdamW step, 148 tensors: torch fused"), out.stdout


def test_time_spent_adds_up_each_ops_rows_and_names_its_costliest_providers():
    from benchmarks.report import time_spent
    rows = [dict(op="gelu", provider="torch", wall_s=1.0), dict(op="gelu", provider="pyext-cuda", wall_s=2.0),
            dict(op="attention", provider="sdpa-math", wall_s=30.0), dict(op="attention", provider="torch", wall_s=4.0),
            dict(op="attention", provider="sdpa-math", wall_s=20.0, label="S=2"),
            dict(op="attention", provider="flex", wall_s=5.0), dict(op="attention", provider="eager", wall_s=6.0),
            dict(op="attention", provider="apex", skipped="no")]
    for row in rows:
        row.update(label=row.get("label", "S=1"), dtype="bfloat16", direction="fwd")
    assert time_spent(rows, 100.0) == [
        "100 s in all (1:40)",
        "gelu               3 s over   1 cases: pyext-cuda 2 s, torch 1 s",
        "attention         65 s over   2 cases: sdpa-math 50 s, eager 6 s, flex 5 s",
        "the rest          32 s: ceilings, inputs, peers that failed"]
    assert time_spent([dict(op="gelu", provider="torch", ms=1.0)], 5.0) == []  # a report from before wall_s


def test_a_row_records_what_pyexts_autotuners_chose_in_its_first_call(monkeypatch, tmp_path):
    """"tuned": per kernel, the config chosen and every config's median ms (None for one that
    could not run); in the JSON, not the CSV."""
    from benchmarks import harness

    class Tuner:  # a ChosenConfigs, as the harness reads it
        choices = [("a key chosen before", "BLOCK: 8", {})]
    tuner = Tuner()
    monkeypatch.setattr(harness, "pyext_tuners", lambda: {"_fwd_kernel": tuner})

    def first_call_tunes():
        if len(tuner.choices) == 1:
            tuner.choices.append(("key", "BLOCK: 32", {"BLOCK: 16": 2.0, "BLOCK: 32": 1.0, "BLOCK: 64": float("inf")}))
    case = harness.Case(op="op", label="label", size=1, dtype="bfloat16", direction="fwd", bytes=1, flops=0,
                        check="a test's case",
                        providers={"pyext-triton": first_call_tunes, "torch": lambda: None})
    rows = harness.run_case(case, {}, quick=True)
    assert rows[0]["tuned"] == {"_fwd_kernel": [{"config": "BLOCK: 32",
                                                 "timed_ms": {"BLOCK: 16": 2.0, "BLOCK: 32": 1.0, "BLOCK: 64": None}}]}
    assert "tuned" not in rows[1]
    report.write_results(str(tmp_path / "report"), {}, rows)
    assert json.load(open(tmp_path / "report.json"))["results"][0]["tuned"] == rows[0]["tuned"]
    assert "tuned" not in open(tmp_path / "report.csv").readline()


@pytest.mark.parametrize("host_ms", [0.01, 5.0])
def test_a_call_that_waits_for_the_gpu_is_told_from_one_that_does_not(host_ms):
    """The report flags a provider whose call synchronises (waits_for_gpu),
    whether its own host time is short or long. Here a stand-in GPU: `spin`
    queues work until a deadline, and a synchronising call waits for it at
    its end."""
    from benchmarks.harness import waits_for_gpu
    busy_until = [0.0]

    def spin(ms):
        busy_until[0] = time.perf_counter() + ms / 1e3

    def asynchronous():
        time.sleep(host_ms / 1e3)

    def synchronising():
        asynchronous()
        while time.perf_counter() < busy_until[0]:
            pass
    assert waits_for_gpu(synchronising, spin, host_ms)
    assert not waits_for_gpu(asynchronous, spin, host_ms)


@pytest.mark.skipif(HAS_GPU, reason="the GPU run is `make gpu-check`")
def test_runs_of_one_op_each_merge_into_one_report(tmp_path):
    """make gpu-check measures one op per process, then joins the reports."""
    parts = []
    for op in ("gelu", "adamw"):
        run = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--ops", op, "--out", str(tmp_path / op)],
                             cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stderr[-3000:]
        (path,) = glob.glob(str(tmp_path / op / "*.json"))
        parts.append(path)
    merged = subprocess.run([sys.executable, "-m", "benchmarks", "--merge", *parts, "--out", str(tmp_path / "all")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert merged.returncode == 0, merged.stderr[-3000:]
    (path,) = glob.glob(str(tmp_path / "all" / "*.json"))
    report = json.load(open(path))
    assert {r["op"] for r in report["results"]} == {"gelu", "adamw"}
    assert report["meta"]["merged_from"] == parts and report["meta"]["ceilings"]
    assert report["meta"]["ops"] == ["gelu", "adamw"] and report["meta"]["quick"] is True
    assert report["meta"]["seconds"] == pytest.approx(sum(json.load(open(p))["meta"]["seconds"] for p in parts))
    assert glob.glob(str(tmp_path / "all" / "*.csv")) and glob.glob(str(tmp_path / "all" / "*.png"))


@pytest.mark.skipif(HAS_GPU, reason="the GPU run is `make gpu-check`")
def test_cases_runs_only_the_cases_a_pattern_matches(tmp_path):
    """--cases: a regex each, searched in "op direction dtype label" (the progress line's text)."""
    run = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--ops", "gelu", "layer_norm", "--cases",
                          "^gelu fwd ", "layer_norm fwd\\+bwd float32", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    (path,) = glob.glob(str(tmp_path / "*.json"))
    report = json.load(open(path))
    cases = {(r["op"], r["direction"], r["dtype"]) for r in report["results"]}
    assert cases == {("gelu", "fwd", "bfloat16"), ("gelu", "fwd", "float32"), ("layer_norm", "fwd+bwd", "float32")}
    assert report["meta"]["cases"] == ["^gelu fwd ", "layer_norm fwd\\+bwd float32"]
    assert "[3 done]" in run.stderr


@pytest.mark.parametrize("pattern, error", [("(", "not a regular expression: '('"),
                                            ("no-such-case", "matched no case of --ops gelu")])
def test_cases_that_do_not_parse_or_match_nothing_are_errors(tmp_path, pattern, error):
    run = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--ops", "gelu", "--cases", pattern,
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode != 0 and error in run.stderr, run.stderr[-3000:]
    assert not glob.glob(str(tmp_path / "*.json"))


@pytest.mark.skipif(HAS_GPU, reason="the GPU run is `python -m benchmarks.train_gpt` in `make gpu-check`")
def test_train_gpt_smoke_run_compares_loss_curves(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks.train_gpt", "--steps", "3", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "mean nothing" in out.stdout
    (path,) = glob.glob(str(tmp_path / "train_gpt-*.json"))
    assert glob.glob(str(tmp_path / "train_gpt-*.png"))
    runs = json.load(open(path))["runs"]
    assert set(runs) == {"eager", "pyext", "compile", "pyext+compile", "pyext-attn+compile"}
    assert all(len(r["losses"]) == 3 and r["tokens_per_s"] > 0 for r in runs.values())


@pytest.mark.skipif(HAS_GPU, reason="the GPU run is `python -m benchmarks.train_gpt` in `make gpu-check`")
def test_train_gpt_fails_when_a_loss_curve_leaves_bf16_noise(tmp_path, monkeypatch, capsys):
    from benchmarks import train_gpt
    train = train_gpt.train

    def patched_run_drifts(cfg, steps, device, **kw):
        run = train(cfg, steps, device, **kw)
        if kw["patched"]:
            run["losses"] = [loss + i for i, loss in enumerate(run["losses"])]
        return run
    monkeypatch.setattr(train_gpt, "train", patched_run_drifts)
    assert train_gpt.main(["--steps", "3", "--no-compile", "--out", str(tmp_path)]) == 1
    assert "FAIL: loss curves of ['pyext']" in capsys.readouterr().err


def test_train_gpt_attention_only_run_leaves_norms_and_gelu_to_torch():
    # "pyext-attn+compile" asks whether Inductor's own fusions of LayerNorm and
    # GELU beat our kernels in a compiled model: only attention and AdamW swapped.
    from benchmarks import train_gpt
    model, opt = train_gpt.build(train_gpt.TINY, torch.device("cpu"), patched=True, norms=False)
    swaps = pyext.patch_report(model)
    assert not swaps.swapped and swaps.attention != "not routed"
    assert all(type(m) in (torch.nn.LayerNorm, torch.nn.GELU) for m in model.modules()
               if isinstance(m, (torch.nn.LayerNorm, torch.nn.GELU)))
    assert isinstance(opt, pyext.optim.AdamW)


def test_attention_times_the_pointer_kernels_beside_the_descriptor_kernels():
    # pyext-triton-ptr: the forward and the backward with pointer loads forced, timed
    # only where pyext-triton takes the descriptor (TMA) path, i.e. compute capability 9.0+.
    import torch
    from benchmarks import attention
    hopper = HAS_GPU and torch.cuda.get_device_capability()[0] >= 9
    cases = list(attention.cases(True, [torch.bfloat16]))
    assert {case.direction for case in cases} == {"fwd", "bwd"}
    for case in cases:
        pointer = case.providers["pyext-triton-ptr"]
        if hopper:  # where the kernels have no descriptor path (dropout, masks, packed) it says so
            assert callable(pointer) or pointer.startswith("same kernel as pyext-triton:")
        else:
            assert isinstance(pointer, str) and "9.0" in pointer


def test_attention_times_cuda_stage1_where_pyext_cuda_runs_stage2():
    # pyext-cuda-stage1: the CUDA attention with PYEXT_FLASH_SM90=0, timed only
    # where pyext-cuda runs the sm_90a kernels (compute capability 9.x, head
    # dims padding to 64 or 128, no feature the CUDA kernels lack).
    import torch
    from benchmarks import attention
    from benchmarks.harness import our_backends
    sm90 = HAS_GPU and torch.cuda.get_device_capability()[0] == 9 and \
        our_backends()["pyext-cuda"] is None and os.environ.get("PYEXT_FLASH_SM90") != "0"
    cases = list(attention.cases(True, [torch.bfloat16]))
    assert {case.direction for case in cases} == {"fwd", "bwd"}
    for case in cases:
        stage1 = case.providers["pyext-cuda-stage1"]
        if callable(case.providers["pyext-cuda"]) and sm90 and "dv" not in case.dtype:
            assert callable(stage1)
        else:
            assert isinstance(stage1, str)


def test_attention_times_the_cuda_deterministic_backward_beside_the_default():
    # pyext-cuda-det: the CUDA backward with deterministic=True, in the
    # backward cases only, timed wherever pyext-cuda runs (whose default, on
    # either stage, adds dQ up with atomics); elsewhere it says why not.
    import torch
    from benchmarks import attention
    for case in attention.cases(True, [torch.bfloat16]):
        det = case.providers.get("pyext-cuda-det")
        if case.direction == "fwd":
            assert det is None
        elif callable(case.providers["pyext-cuda"]) and "dv" not in case.dtype:
            assert callable(det)
        else:
            assert isinstance(det, str)


def test_attention_times_the_triton_kernels_on_padded_heads_where_8_does_not_divide_them():
    # pyext-triton-padded: q, k, v zero-padded to a multiple of 8 as torch pads them, out cut back:
    # the same attention as pyext-triton's on the heads as given, timed only where 8 does not divide them.
    from benchmarks import attention
    for case in attention.cases(True, [torch.bfloat16]):
        padded = case.providers.get("pyext-triton-padded")
        assert (padded is not None) == (case.dtype.split("-")[1] in ("d20", f"d{attention.UNALIGNED_HEAD_DIM}"))
    q, k = (torch.randn(1, 2, 9, 20, dtype=torch.bfloat16, device=device_for("triton")) for _ in range(2))
    v = torch.randn(1, 2, 9, 12, dtype=torch.bfloat16, device=q.device, requires_grad=True)
    got = attention._padded_to_8(True, 20, 12)(q, k, v)
    torch.testing.assert_close(got, pyext.flash_attention(q, k, v, causal=True, backend="triton"))
    assert got.shape == v.shape and torch.autograd.grad(got.sum(), v)[0].shape == v.shape


def test_cuda_deterministic_asks_for_it_wherever_pyext_cuda_runs(monkeypatch):
    from benchmarks import attention
    calls = []
    monkeypatch.setattr(attention.pyext, "flash_attention", lambda *args, **kwargs: calls.append(kwargs))
    for head_dim in (64, 256):
        attention._cuda_deterministic(True, head_dim, head_dim, None)(None, None, None)
    assert calls == [dict(causal=True, deterministic=True, backend="cuda")] * 2
    assert attention._cuda_deterministic(False, 128, 128, "no GPU") == "no GPU"
    assert "one head dim" in attention._cuda_deterministic(False, 128, 64, None)


def test_cuda_stage1_sets_pyext_flash_sm90_only_while_it_runs(monkeypatch):
    from benchmarks import attention
    monkeypatch.setattr(attention.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(attention.torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    for before in (None, "1"):
        if before is None:
            monkeypatch.delenv("PYEXT_FLASH_SM90", raising=False)
        else:
            monkeypatch.setenv("PYEXT_FLASH_SM90", before)
        stage1 = attention._cuda_stage1(128, 128, None)
        assert stage1(lambda: os.environ.get("PYEXT_FLASH_SM90"))() == "0"
        assert os.environ.get("PYEXT_FLASH_SM90") == before
    assert "pad to 64 or 128" in attention._cuda_stage1(256, 256, None)
    assert "one head dim" in attention._cuda_stage1(192, 128, None)
    assert attention._cuda_stage1(128, 128, "not built") == "not built"
    monkeypatch.setattr(attention.torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "compute capability 9.x" in attention._cuda_stage1(128, 128, None)


def test_attention_times_the_deterministic_backward_beside_the_atomic_one():
    # pyext-triton-det: the backward with deterministic=True, offered in the
    # backward cases only (the forward is the same), wherever pyext-triton runs.
    import torch
    from benchmarks import attention
    from benchmarks.harness import our_backends
    why_not_triton = our_backends()["pyext-triton"]
    cases = list(attention.cases(True, [torch.bfloat16]))
    assert any(case.direction == "bwd" for case in cases)
    for case in cases:
        deterministic = case.providers.get("pyext-triton-det")
        if case.direction != "bwd":
            assert deterministic is None
        elif why_not_triton is None:
            assert all(g is not None for g in deterministic())
        else:
            assert deterministic == why_not_triton


def test_the_softcap_cases_time_gemma_2s_peers_on_what_ours_computes():
    """The soft-cap cases: torch's SDPA says why not; the eager peer (HF
    Gemma 2's attention) computes what pyext's does, up to bf16 rounding."""
    import torch
    import pyext
    from benchmarks import attention
    cases = [c for c in attention.cases(True, [torch.bfloat16]) if c.dtype.endswith("-softcap")]
    assert {c.direction for c in cases} == {"fwd", "bwd"}
    for case in cases:
        assert case.providers["sdpa-flash"] == "torch's SDPA has no soft cap" and "eager" in case.providers
    q, k, v = (torch.randn(1, 2, 64, 32, dtype=torch.bfloat16) for _ in range(3))
    eager = attention._eager_softcap(64, "cpu", torch.bfloat16, 5.0)(q, k, v)
    ours = pyext.flash_attention(q, k, v, causal=True, softcap=5.0, backend="torch")
    torch.testing.assert_close(eager, ours, atol=2e-2, rtol=2e-2)


def test_the_sinks_cases_time_gpt_oss_peers_on_what_ours_computes():
    """The sinks cases: torch's SDPA and FlashAttention's package say why
    not; the eager peer (HF GPT-OSS's attention) computes what pyext's
    does, up to bf16 rounding; so does the rescale the flex-attention peer
    applies to an attention without sinks, out * sigmoid(lse - sink)."""
    import torch
    import pyext
    from benchmarks import attention
    cases = [c for c in attention.cases(True, [torch.bfloat16]) if c.dtype.endswith("-sinks")]
    assert {c.direction for c in cases} == {"fwd", "bwd"}
    for case in cases:
        assert case.providers["sdpa-flash"] == "torch's SDPA has no sinks" and "eager" in case.providers
        assert case.providers["flash-attn"] == "flash_attn_func has no sinks"
    q, k, v = (torch.randn(1, 2, 64, 32, dtype=torch.bfloat16) for _ in range(3))
    sinks = torch.randn(2) * 2
    ours = pyext.flash_attention(q, k, v, causal=True, sinks=sinks, backend="torch")
    eager = attention._eager_sinks(64, "cpu", torch.bfloat16, sinks)(q, k, v)
    torch.testing.assert_close(eager, ours, atol=2e-2, rtol=2e-2)
    plain, lse = pyext.flash_attention(q, k, v, causal=True, return_lse=True, backend="torch")
    rescaled = plain * torch.sigmoid(lse - sinks.view(1, -1, 1)).unsqueeze(-1).to(plain.dtype)
    torch.testing.assert_close(rescaled, ours, atol=2e-2, rtol=2e-2)


def test_the_gated_norm_cases_time_qwen3_nexts_code_on_what_ours_computes():
    """The rms_norm_gated cases: the peer (Qwen3-Next's gated norm as
    transformers writes it) computes what pyext's does, up to bf16 rounding,
    and every case times it, eager and compiled; pyext-cuda says why not."""
    import torch
    import pyext
    from benchmarks import rms_norm_gated
    cases = list(rms_norm_gated.cases(True, [torch.bfloat16]))
    assert cases and all({"torch", "torch.compile", "pyext-triton"} <= set(c.providers) for c in cases)
    assert all(c.providers["pyext-cuda"] == "pyext has no CUDA kernels for rms_norm_gated" for c in cases)
    x, gate = torch.randn(5, 128, dtype=torch.bfloat16) * 2, torch.randn(5, 128, dtype=torch.bfloat16) * 3
    weight = torch.rand(128, dtype=torch.bfloat16) + 0.5
    torch.testing.assert_close(rms_norm_gated.models_code(x, gate, weight),
                               pyext.rms_norm_gated(x, gate, weight, 1e-6, backend="torch"), atol=3e-2, rtol=2e-2)


def test_the_grouped_norm_cases_time_the_models_code_on_what_ours_computes():
    """The grouped_norm cases: each peer (Cohere's QK norm, Qwen4-Exp's norm
    over streams, as transformers writes them) computes what pyext's does
    with group_size, up to bf16 rounding; pyext-cuda says why not."""
    from benchmarks import grouped_norm
    cases = list(grouped_norm.cases(True, [torch.bfloat16]))
    assert {c.op for c in cases} == {"layer_norm[groups]", "rms_norm[groups]"}
    assert all(c.providers["pyext-cuda"] == "pyext has no CUDA kernels for norms over groups" for c in cases)
    x, weight = torch.randn(5, 3, 16, dtype=torch.bfloat16) * 2 + 1, torch.randn(3, 16, dtype=torch.bfloat16)
    eps = grouped_norm.EPS
    torch.testing.assert_close(grouped_norm.cohere_qk_norm(x, weight), pyext.layer_norm(
        x, (3, 16), weight, eps=eps, group_size=16, backend="torch"), atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(grouped_norm.streams_rms_norm(x, weight), pyext.rms_norm(
        x, (3, 16), weight, eps=eps, group_size=16, backend="torch"), atol=3e-2, rtol=2e-2)


    """The "packed" cases: the offsets pyext's and FlashAttention's varlen
    calls take and the block-diagonal mask the SDPA backends take are one
    attention; the CUDA kernels say why they are not timed."""
    from benchmarks import attention
    from benchmarks.harness import our_backends
    lengths = attention._document_lengths(96, 32)
    assert sum(lengths) == 96 and max(lengths) <= 32 and len(lengths) > 3
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (torch.randn(1, 2, 96, 32, dtype=torch.bfloat16) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=attention._block_diagonal_mask(lengths, "cpu"))
    ours = attention._varlen(lambda *t: pyext.flash_attention_varlen(*t, cu_seqlens, cu_seqlens, 32, 32, causal=True,
                                                                     backend="torch"))(q, k, v)
    torch.testing.assert_close(sdpa, ours, atol=2e-2, rtol=2e-2)
    cases = [c for c in attention.cases(True, [torch.bfloat16]) if c.dtype.endswith("-packed")]
    assert {c.direction for c in cases} == {"fwd", "bwd"}
    why_not_cuda = our_backends()["pyext-cuda"] or "the CUDA attention kernels have no packed batches"
    assert all(c.providers["pyext-cuda"] == why_not_cuda for c in cases)


def _case(provider_fns, check="a test's case"):
    from benchmarks.harness import Case
    return Case(op="gelu", label="n=8", size=8, dtype="float32", direction="fwd", bytes=64, flops=0,
                providers=provider_fns, check=check)


def test_the_checks_floors_are_the_tests():
    from benchmarks import harness
    from conftest import FLOOR
    assert harness.FLOOR == FLOOR


def test_a_wrong_result_is_marked_and_left_out_of_the_speed_ups(monkeypatch, tmp_path, capsys):
    """Each provider's first result against the float64 oracle, bound by
    twice torch's own error plus the floor: a result past it is WRONG, ours
    or a peer's, and neither gives nor sets a speed-up; a wrong one of ours
    fails the run. A provider the check leaves out says why."""
    from benchmarks import __main__ as cli, harness
    x = torch.randn(64)
    exact = x.double().exp()
    tiny = 1e-6  # well inside the float32 floor (1e-5)
    fns = {"torch": lambda: x.exp(), "pyext-triton": lambda: (exact + tiny).float(),
           "pyext-cuda": lambda: (exact + 1).float(), "fast-but-wrong": lambda: x.exp()[:32],
           "slow-and-right": lambda: x.exp(), "pyext-triton-nosinks": lambda: x}
    check = harness.Check(lambda: exact, yardsticks=("torch",), unchecked={"pyext-triton-nosinks": "another problem"})
    rows = {r["provider"]: r for r in harness.run_case(_case(fns, check), {}, True)}
    assert rows["pyext-triton"]["error_vs_bound"] < 1 and "wrong" not in rows["pyext-triton"]
    assert "speedup_vs_best_peer" in rows["pyext-triton"]
    assert rows["pyext-cuda"]["wrong"].startswith("error ") and "speedup_vs_best_peer" not in rows["pyext-cuda"]
    assert rows["fast-but-wrong"]["wrong"] == "shape (32,) where the oracle's is (64,)"
    assert rows["pyext-triton"]["best_peer"] in ("torch", "slow-and-right")  # never the wrong peer
    assert rows["pyext-triton-nosinks"]["unchecked"] == "another problem"
    assert [line.split(": ", 1)[0] for line in report.failures(list(rows.values()))] == \
        ["gelu fwd float32 n=8 pyext-cuda"]

    def cases(quick, dtypes):
        yield _case(fns, check)
    monkeypatch.setitem(cli.OPS, "gelu", cases)
    monkeypatch.setitem(cli.COUNTS, "gelu", lambda quick, dtypes: 1)
    assert cli.main(["--quick", "--ops", "gelu", "--dtypes", "float32", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "WRONG: error" in out and "FAILED (ours raised or gave a wrong result):" in out


def test_an_error_of_ours_fails_the_run_where_a_peers_is_a_skip(monkeypatch, tmp_path, capsys):
    from benchmarks import __main__ as cli

    def raises():
        raise RuntimeError("no kernel for this")

    def cases(quick, dtypes):
        yield _case({"torch": lambda: None, "pyext-triton": raises, "a-peer": raises})
    monkeypatch.setitem(cli.OPS, "gelu", cases)
    monkeypatch.setitem(cli.COUNTS, "gelu", lambda quick, dtypes: 1)
    assert cli.main(["--quick", "--ops", "gelu", "--dtypes", "float32", "--out", str(tmp_path)]) == 1
    (path,) = glob.glob(str(tmp_path / "*.json"))
    rows = {r["provider"]: r for r in json.load(open(path))["results"]}
    assert rows["pyext-triton"]["error"] == "RuntimeError: no kernel for this"
    assert rows["a-peer"]["skipped"] == "RuntimeError: no kernel for this"
    out = capsys.readouterr().out
    assert "ERROR: RuntimeError: no kernel for this" in out and "gelu         FAILED: 1 rows of ours" in out


def test_a_host_bound_case_is_timed_again_as_cuda_graphs(monkeypatch):
    """Where issuing a call takes most of a row's time, every provider of the
    case is also timed as a replayed CUDA graph (the kernels alone); one that
    cannot be captured says why, a wrong one sets no speed-up, and a capture
    that breaks the CUDA context stops the run naming it. (replay_ms itself
    runs on a GPU: test_replaying_a_small_call_leaves_its_host_time_out.)"""
    from benchmarks import harness, replay
    x = torch.randn(64)
    fns = {"torch": lambda: x.exp(), "pyext-triton": lambda: x.exp(), "a-peer": lambda: x.exp(),
           "a-wrong-peer": lambda: x, "synchronises": lambda: x.exp()}
    graph_ms = {fns["torch"]: 0.04, fns["pyext-triton"]: 0.01, fns["a-peer"]: 0.02, fns["a-wrong-peer"]: 0.001}

    def fake_replay(fn):
        if fn not in graph_ms:
            raise RuntimeError("operation not permitted when stream is capturing")
        return [graph_ms[fn]] * 3
    monkeypatch.setattr(harness, "HAS_GPU", True)
    monkeypatch.setattr(harness, "timer", lambda fn, quick, first_call_made=False: [1.0, 0.9, 1.1])
    monkeypatch.setattr(harness, "cuda_context_broken", lambda: False)
    monkeypatch.setattr(replay, "replay_ms", fake_replay)
    check = harness.Check(lambda: x.double().exp(), yardsticks=("torch",))
    for host_ms, graphed in ((0.5, False), (0.95, True)):
        monkeypatch.setattr(harness, "host_and_memory", lambda fn: {"host_ms": host_ms})
        rows = {r["provider"]: r for r in harness.run_case(_case(fns, check), {}, True)}
        assert all(("graph_ms" in r or "graph_error" in r) == graphed for r in rows.values())
    assert rows["pyext-triton"]["graph_ms"] == 0.01 and rows["a-wrong-peer"]["graph_ms"] == 0.001
    assert rows["pyext-triton"]["graph_best_peer"] == "a-peer"  # not the wrong one, nor the uncaptured one
    assert rows["pyext-triton"]["graph_speedup_vs_best_peer"] == pytest.approx(2.0)
    assert rows["synchronises"]["graph_error"] == "RuntimeError: operation not permitted when stream is capturing"
    lines = report.table(list(rows.values())).splitlines()
    assert "host-bound  as a CUDA graph 0.0100 ms, 2.00x" in next(line for line in lines if " pyext-triton " in line)
    assert report.summary(list(rows.values()))[1] == \
        "gelu         host-bound cases as CUDA graphs: geomean 2.00x, min 2.00x over 1 cases"
    monkeypatch.setattr(harness, "cuda_context_broken", lambda: True)
    with pytest.raises(harness.BrokenCUDAContext, match="synchronises's CUDA-graph capture: RuntimeError"):
        harness.run_case(_case(fns, check), {}, True)


@pytest.mark.gpu
def test_replaying_a_small_call_leaves_its_host_time_out():
    """A call of several tiny kernels: issuing it costs the host more than
    its kernels take, so the eager timing is host-bound; replayed as a CUDA
    graph it takes less, and the capture leaves the stream
    as it was. A call that synchronises cannot be captured, and the GPU
    stays usable after."""
    from benchmarks import harness, replay
    x = torch.randn(1024, device="cuda")

    def small():
        y = x
        for _ in range(20):
            y = y * 1.0001
        return y
    stream = torch.cuda.current_stream()
    eager = harness.timer(small, quick=True)[0]
    graph = replay.replay_ms(small)
    assert torch.cuda.current_stream() == stream
    assert 0 < graph[0] < 0.8 * eager and graph[1] <= graph[0] <= graph[2]
    with pytest.raises(RuntimeError):
        replay.replay_ms(lambda: x.sum().item())
    assert torch.cuda.current_stream() == stream and not harness.cuda_context_broken()
    assert torch.equal(small(), small())
    rows = torch.randn(64, 256, device="cuda", requires_grad=True)
    for direction in ("bwd", "fwd+bwd"):  # autograd's backward on the capturing stream
        timed = harness.autograd_callable(lambda t: torch.nn.functional.layer_norm(t, (256,)), [rows], direction,
                                          torch.randn(64, 256, device="cuda"))
        timed()
        assert replay.replay_ms(timed)[0] > 0, direction


def test_a_timed_backward_builds_its_forward_again_when_told():
    """A provider timed backward-alone builds its forward once and replays
    the backward; a CUDA-graph capture (benchmarks/replay.py) has it build
    the forward again on the capturing stream, as a backward runs on its
    forward's stream."""
    from benchmarks import harness
    forwards = []
    x = torch.randn(4, requires_grad=True)
    timed = harness.autograd_callable(lambda t: forwards.append(1) or t.exp(), [x], "bwd", torch.ones(4))
    timed(), timed()
    timed.forget_forward()
    grads = timed()
    assert len(forwards) == 2 and torch.equal(grads[0], x.detach().exp())


def test_a_report_says_what_it_ran_on_from_which_source_and_how_it_was_timed(monkeypatch, tmp_path):
    from benchmarks import __main__ as cli, harness

    def cases(quick, dtypes):
        yield _case({"torch": lambda: None, "pyext-triton": lambda: None})
    monkeypatch.setitem(cli.OPS, "gelu", cases)
    monkeypatch.setitem(cli.COUNTS, "gelu", lambda quick, dtypes: 1)
    # a call whose host time is most of its measured time measures the host, not the kernel
    monkeypatch.setattr(harness, "timer", lambda fn, quick, first_call_made=False: [1.0, 0.9, 1.1])
    monkeypatch.setattr(harness, "host_and_memory", lambda fn: {"host_ms": 0.95})
    assert cli.main(["--quick", "--ops", "gelu", "--dtypes", "float32", "--out", str(tmp_path)]) == 0
    (path,) = glob.glob(str(tmp_path / "*.json"))
    report_ = json.load(open(path))
    meta = report_["meta"]
    assert meta["pyext"] == pyext.__version__ and meta["timing"] == harness.TIMING
    assert set(meta["peers"]) == {"flash-attn", "liger-kernel", "apex"} and "command" in meta
    assert meta["git_commit"] is None or len(meta["git_commit"].split("+")[0]) == 40
    assert all(r["host_bound"] for r in report_["results"])
    header = open(path.replace(".json", ".csv")).readline().strip().split(",")
    assert header[:5] == ["op", "label", "dtype", "direction", "provider"]


def test_a_merge_keeps_each_parts_own_figures_out_of_its_meta(tmp_path):
    from benchmarks import __main__ as cli
    row = dict(op="gelu", label="n=8", size=8, dtype="float32", direction="fwd", provider="torch", ms=1.0)
    paths = []
    for i, extra in enumerate([{"interrupted_after_cases": 3}, {}]):
        paths.append(str(tmp_path / f"{i}.json"))
        meta = dict(gpu="x", seconds=10.0, ceilings={"copy_GBps": 4000.0 + i}, **extra)
        json.dump({"meta": meta, "results": [dict(row, op=f"op{i}", ceiling=4000.0 + i)]}, open(paths[-1], "w"))
    meta, rows = cli.merge(paths)
    assert "interrupted_after_cases" not in meta and meta["interrupted"] == [paths[0]]
    assert meta["ceilings_of_parts"] == {paths[0]: {"copy_GBps": 4000.0}, paths[1]: {"copy_GBps": 4001.0}}
    assert [r["ceiling"] for r in rows] == [4000.0, 4001.0] and meta["seconds"] == 20.0


def test_compare_flags_a_regression_outside_the_runs_spread_and_notes_another_machine():
    row = dict(op="gelu", label="n=8", dtype="float32", direction="fwd", provider="torch")
    old = [dict(row, ms=1.0, ms_p20=0.9, ms_p80=1.1), dict(row, provider="noisy", ms=1.0, ms_p20=0.5, ms_p80=2.0)]
    new = [dict(row, ms=1.3, ms_p20=1.2, ms_p80=1.4), dict(row, provider="noisy", ms=1.3, ms_p20=0.8, ms_p80=2.0)]
    lines = report.compare(old, new)
    assert lines[0].endswith("+30.0%  REGRESSION") and lines[1].endswith("+30.0%  slower, within the runs' spread")
    assert report.compare_machines({"gpu": "NVIDIA H100", "torch": "2.11"}, {"gpu": "NVIDIA H200", "torch": "2.11"}) \
        == ["NOTE: gpu differs: NVIDIA H100 then, NVIDIA H200 now"]


def test_the_summary_speaks_for_the_public_backends_not_the_diagnostic_variants():
    row = dict(op="attention", label="S=1024", dtype="bfloat16", direction="fwd")
    rows = [dict(row, provider="pyext-triton", ms=2.0, speedup_vs_best_peer=0.5),
            dict(row, provider="pyext-triton-det", ms=1.0, speedup_vs_best_peer=1.0)]
    assert report.summary(rows) == ["attention    ours vs best peer: geomean 0.50x, min 0.50x over 1 cases"]


def test_skipped_providers_are_left_out_and_say_so():
    from benchmarks import harness
    rows = harness.run_case(_case({"torch": lambda: None, "pyext-triton": lambda: None}), {}, True,
                            skip=("pyext-triton",))
    by = {r["provider"]: r for r in rows}
    assert "ms" in by["torch"] and by["pyext-triton"]["skipped"] == "left out by --skip-providers"


def test_a_provider_that_breaks_the_cuda_context_stops_the_run_and_is_named(monkeypatch, tmp_path):
    """A fault is sticky: the run stops at it (no rows of knock-on errors),
    keeps what it finished and names the provider; a second run without it
    merges with the first into one row per case and provider."""
    from benchmarks import __main__ as cli, harness

    def faulting():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def cases(quick, dtypes):
        yield _case({"torch": lambda: None, "pyext-cuda": faulting})
        yield _case({"torch": lambda: None, "pyext-cuda": faulting})

    monkeypatch.setitem(cli.OPS, "gelu", cases)
    monkeypatch.setitem(cli.COUNTS, "gelu", lambda quick, dtypes: 2)
    monkeypatch.setattr(harness, "cuda_context_broken", lambda: True)
    assert cli.main(["--quick", "--ops", "gelu", "--dtypes", "float32", "--out", str(tmp_path / "a")]) == 1
    (first,) = glob.glob(str(tmp_path / "a" / "*.json"))
    report = json.load(open(first))
    assert report["meta"]["cuda_context_broken_by"].startswith("pyext-cuda on gelu fwd")
    assert [r["provider"] for r in report["results"]] == ["torch", "pyext-cuda"]  # the first case only

    monkeypatch.setattr(harness, "cuda_context_broken", lambda: False)
    assert cli.main(["--quick", "--ops", "gelu", "--dtypes", "float32", "--skip-providers", "pyext-cuda",
                     "--out", str(tmp_path / "b")]) == 0
    (second,) = glob.glob(str(tmp_path / "b" / "*.json"))
    meta, rows = cli.merge([first, second])
    assert len(rows) == 2 and {r["provider"] for r in rows} == {"torch", "pyext-cuda"}
    assert "ms" in next(r for r in rows if r["provider"] == "torch")
    assert meta["cuda_context_broken_by"] == [report["meta"]["cuda_context_broken_by"]]


def test_merge_keeps_a_measured_row_over_a_skipped_one_and_a_later_over_an_earlier(tmp_path):
    from benchmarks import __main__ as cli
    row = dict(op="gelu", label="n=8", dtype="float32", direction="fwd")
    parts = [
        [dict(row, provider="a", ms=1.0), dict(row, provider="b", skipped="left out"), dict(row, provider="c", ms=3.0)],
        [dict(row, provider="a", skipped="left out"), dict(row, provider="b", ms=2.0), dict(row, provider="c", ms=4.0)],
    ]
    paths = []
    for i, results in enumerate(parts):
        paths.append(str(tmp_path / f"{i}.json"))
        json.dump({"meta": {"gpu": "x"}, "results": results}, open(paths[-1], "w"))
    _, rows = cli.merge(paths)
    assert {r["provider"]: r.get("ms") for r in rows} == {"a": 1.0, "b": 2.0, "c": 4.0}


def test_train_step_flops_are_what_the_model_runs_with_causal_attentions_hidden_half_left_out():
    """step_flops, the model FLOPs behind the train_step rows' TFLOP/s and
    utilisation, against torch's FlopCounterMode over one forward and backward
    of the patched model (Triton attention, bf16 autocast): every matmul it
    counts, plus the attention ops, which it counts dense, halved for the
    causal mask."""
    from torch.utils.flop_counter import FlopCounterMode
    import pyext
    from benchmarks.train_gpt import GPT, TINY, batches
    from benchmarks.train_step import step_flops
    model = pyext.patch(GPT(**TINY), backend="triton")
    x, y = next(batches(TINY, 1, torch.device("cpu")))
    with FlopCounterMode(display=False) as counter, torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, y).backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    attention = sum(n for op, n in counts.items() if op.startswith("pyext.flash_attn"))
    assert attention > 0 and set(counts) - {"aten.mm", "aten.addmm"} == {"pyext.flash_attn_fwd_triton",
                                                                          "pyext.flash_attn_bwd_triton"}
    assert step_flops(**{k: TINY[k] for k in ("layers", "heads", "dim", "seq", "batch")}) \
        == counts["aten.mm"] + counts["aten.addmm"] + attention / 2


def _fake_gelu_cases(monkeypatch, providers):
    """OPS["gelu"] replaced by one case of `providers` (name -> callable) per dtype."""
    from benchmarks import __main__ as cli

    def cases(quick, dtypes):
        for _ in dtypes:
            yield _case(dict(providers))
    monkeypatch.setitem(cli.OPS, "gelu", cases)
    monkeypatch.setitem(cli.COUNTS, "gelu", lambda quick, dtypes: len(dtypes))
    return cli


@pytest.mark.parametrize("content, why", [(None, "No such file"), ("{", "not JSON"),
                                          ('{"meta": {}}', "not a report of python -m benchmarks"),
                                          ("[]", "not a report of python -m benchmarks"),
                                          ('{"meta": {}, "results": [{"op": "gelu"}]}', "rows naming")])
def test_a_compare_file_that_is_not_a_report_is_refused_before_anything_is_timed(monkeypatch, tmp_path, capsys,
                                                                                   content, why):
    timed = []
    cli = _fake_gelu_cases(monkeypatch, {"torch": lambda: timed.append(1)})
    old = tmp_path / "old.json"
    if content is not None:
        old.write_text(content)
    with pytest.raises(SystemExit, match=why):
        cli.main(["--quick", "--ops", "gelu", "--out", str(tmp_path / "out"), "--compare", str(old)])
    assert timed == [] and not glob.glob(str(tmp_path / "out" / "*.json"))


def test_compare_names_rows_skipped_now_and_counts_rows_this_run_lacks():
    row = dict(op="gelu", label="n=8", dtype="float32", direction="fwd")
    old = [dict(row, provider="a", ms=1.0), dict(row, provider="b", ms=2.0), dict(row, provider="c", ms=0.0),
           dict(row, label="n=16", provider="a", ms=3.0)]
    new = [dict(row, provider="a", ms=1.1), dict(row, provider="b", skipped="left out by --skip-providers"),
           dict(row, provider="c", ms=1.0)]
    lines = report.compare(old, new)
    assert lines[0].endswith("+10.0%  REGRESSION")
    assert lines[1].endswith("2.0000 -> skipped now: left out by --skip-providers")
    assert lines[2:] == ["1 rows timed in the older run are not in this one (other ops, dtypes or sizes)"]


def test_option_values_that_select_nothing_or_name_no_provider_are_errors(monkeypatch, tmp_path, capsys):
    from benchmarks import __main__ as cli
    with pytest.raises(SystemExit, match="--ops adamw with --dtypes bfloat16 select no case"):
        cli.main(["--quick", "--ops", "adamw", "--dtypes", "bfloat16", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        cli.main(["--quick", "--ops", "gelu", "--skip-providers", "pyext-tritn", "--out", str(tmp_path)])
    assert "--skip-providers pyext-tritn: no provider of --ops gelu is named so" in capsys.readouterr().err
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.raises(SystemExit, match="--out .*file"):
        cli.main(["--quick", "--ops", "gelu", "--out", str(not_a_folder)])


def test_an_op_or_dtype_given_twice_is_timed_once_and_ours_alone_says_so(monkeypatch, tmp_path, capsys):
    cli = _fake_gelu_cases(monkeypatch, {"pyext-triton": lambda: None, "torch": lambda: None})
    cli.main(["--quick", "--ops", "gelu", "gelu", "--dtypes", "float32", "float32", "--skip-providers", "torch",
              "--out", str(tmp_path)])
    (path,) = glob.glob(str(tmp_path / "*.json"))
    assert [r["provider"] for r in json.load(open(path))["results"]] == ["pyext-triton", "torch"]
    assert "gelu         no peer timed beside ours: no speed-up to give" in capsys.readouterr().out


def test_a_merge_of_gpu_reports_is_labelled_by_their_gpu_wherever_it_runs(tmp_path, capsys):
    """...and a part cut short while being written (a run killed by its
    time limit) is left out, saying so, where other parts remain."""
    from benchmarks import __main__ as cli
    part, cut = tmp_path / "part.json", tmp_path / "cut.json"
    part.write_text(json.dumps({"meta": {"gpu": "NVIDIA H200", "time": "2026-12-04T14:54:53+0000"}, "results": [
        dict(op="gelu", label="n=8", size=8, dtype="float32", direction="fwd", provider="torch", ms=1.0,
             GBps=1.0)]}))
    cut.write_text(part.read_text()[:40])
    assert cli.main(["--merge", str(part), str(cut), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "mean nothing" not in out and f"left out of the merge: python -m benchmarks: --merge {cut}: not JSON" in out
    (path,) = glob.glob(str(tmp_path / "out" / "*.json"))
    assert os.path.basename(path).startswith("NVIDIA-H200-")
    assert json.load(open(path))["meta"]["merged_from"] == [str(part)]
    with pytest.raises(SystemExit, match="not JSON"):
        cli.main(["--merge", str(cut), "--out", str(tmp_path / "out")])


def test_plot_files_have_names_a_markdown_link_reads_and_smoke_plots_say_so(tmp_path):
    row = dict(op="layer_norm[4096 rows]", label="4096x1024", size=1024, dtype="bfloat16", direction="fwd+bwd",
               provider="torch", ms=1.0, GBps=1.0)
    (path,) = report.plot(str(tmp_path / "run"), [row], {"gpu": None})
    assert os.path.basename(path) == "run-layer_norm_4096_rows-fwd_bwd-bfloat16.png"
    assert "CPU smoke run" in report.figure([row], {"gpu": None}).axes[0].get_title()
