"""First calls of the CUDA kernels that have never run on a GPU, each probe in
its own process under a time limit, before any test or benchmark
(.ci/gpu-check). The Triton kernels are not probed: none waits on barriers of
ours, and their first call autotunes for a minute.

A kernel whose mbarrier protocol is wrong hangs instead of failing, and a
kernel that faults leaves its process's CUDA context unusable: either one,
met first inside the test suite, would spend the session's few minutes of GPU
time on timeouts and knock-on failures. Here each costs at most LIMIT seconds,
and what it costs is named: the probe's output says how far it got.

    python3 .ci/gpu_smoke.py FAILED_FILE

prints each probe's outcome and output (how far it got; for attention, the
kernels the profiler saw run and the errors of its first results against
float32 attention beside torch's own bf16 SDPA's) and writes the names of the probes that hung or
crashed, space separated, to FAILED_FILE. gpu-check passes them on in
$PYEXT_SMOKE_FAILED: the tests of those kernels skip saying so (see
tests/conftest.py), and a failed sm_90a probe turns the sm_90a kernels off
(PYEXT_FLASH_SM90=0) for the rest of the run."""
import subprocess
import sys
import time

import torch

LIMIT = 45  # seconds per probe: CUDA start-up and the extension's import take about 5

ATTENTION = """
import os, re, torch, torch.nn.functional as F, pyext
from torch.profiler import profile, ProfilerActivity
os.environ["PYEXT_FLASH_SM90"] = "{sm90}"

def err(ours, ref, theirs):
    return f"{{(ours.float() - ref).abs().max().item():.1e}} (torch's {{(theirs.float() - ref).abs().max().item():.1e}})"

for d in (64, 128, 40):
    for causal in (False, True):
        q, k, v = (torch.randn(2, 4, 300, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            out, lse, out_lo = torch.ops.pyext.flash_attn_fwd_cuda(q, k, v, d ** -0.5, causal, 0)
            torch.cuda.synchronize()
            print(f"forward d={{d}} causal={{causal}}: ran", flush=True)
            dout = torch.randn_like(out)
            grads = torch.ops.pyext.flash_attn_bwd_cuda(dout, q, k, v, out, out_lo, lse, d ** -0.5, causal, 0, True)
            torch.cuda.synchronize()
            print(f"backward d={{d}} causal={{causal}}: ran", flush=True)
        # Which kernels ran: a refused tensor map falls back to Stage 1 silently.
        ran = sorted({{m for e in prof.key_averages() for m in re.findall(r"flash_\\w+_kernel", e.key)}})
        print(f"  kernels: {{', '.join(ran) or 'none seen by the profiler'}}", flush=True)
        # Errors against float32 attention, beside torch's own bf16 SDPA's: a first look, the tests judge.
        f32 = [t.float().requires_grad_() for t in (q, k, v)]
        ref = F.scaled_dot_product_attention(*f32, is_causal=causal)
        ref_grads = torch.autograd.grad(ref, f32, dout.float())
        bf16 = [t.clone().requires_grad_() for t in (q, k, v)]
        theirs = F.scaled_dot_product_attention(*bf16, is_causal=causal)
        their_grads = torch.autograd.grad(theirs, bf16, dout)
        print(f"  error out {{err(out, ref, theirs)}}, " + ", ".join(
            f"{{n}} {{err(g, r, t)}}" for n, g, r, t in zip(("dq", "dk", "dv"), grads, ref_grads, their_grads)),
            flush=True)
"""

ADAMW = """
import torch, pyext
params = [torch.randn(n, device="cuda", requires_grad=True) for n in (1, 4099, 1 << 20)]
params.append(torch.randn(4100, device="cuda")[1:].requires_grad_())  # not 16-byte aligned
for p in params:
    p.grad = torch.randn_like(p)
opt = pyext.optim.AdamW(params, backend="cuda")
for _ in range(2):
    opt.step()
torch.cuda.synchronize()
print("two steps: ran", flush=True)
"""

# The LayerNorm kernels changed without a GPU (the forward's 64 bytes a thread,
# the backward's cp.async prefetch of its next row): rows of 16-byte vectors
# on each backward configuration that prefetches, and a row length that does not.
LAYER_NORM = """
import torch, pyext

def err(ours, ref, theirs):
    return f"{(ours.float() - ref).abs().max().item():.1e} (torch's {(theirs.float() - ref).abs().max().item():.1e})"

for dtype, rows, n in ((torch.bfloat16, 37, 8192), (torch.float32, 37, 8192), (torch.float32, 300, 1024),
                       (torch.bfloat16, 300, 1000)):
    x, w, b = (torch.randn(*shape, device="cuda", dtype=dtype) for shape in ((rows, n), (n,), (n,)))
    ours = [t.clone().requires_grad_() for t in (x, w, b)]
    y = pyext.layer_norm(ours[0], (n,), ours[1], ours[2], backend="cuda")
    torch.cuda.synchronize()
    print(f"forward {dtype} {rows}x{n}: ran", flush=True)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, ours, dy)
    torch.cuda.synchronize()
    print(f"backward {dtype} {rows}x{n}: ran", flush=True)
    f64 = [t.double().requires_grad_() for t in (x, w, b)]
    ref = torch.nn.functional.layer_norm(f64[0], (n,), f64[1], f64[2])
    ref_grads = torch.autograd.grad(ref, f64, dy.double())
    same = [t.clone().requires_grad_() for t in (x, w, b)]
    theirs = torch.nn.functional.layer_norm(same[0], (n,), same[1], same[2])
    their_grads = torch.autograd.grad(theirs, same, dy)
    print(f"  error y {err(y, ref, theirs)}, " + ", ".join(
        f"{name} {err(g, r, t)}" for name, g, r, t in zip(("dx", "dw", "db"), grads, ref_grads, their_grads)),
        flush=True)
"""


def probes():
    yield "cuda-attention-sm80", ATTENTION.format(sm90=0)
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9:
        yield "cuda-attention-sm90", ATTENTION.format(sm90=1)
    yield "cuda-adamw", ADAMW
    yield "cuda-layer-norm", LAYER_NORM


def run(name, code):
    """'ok', 'hung' or 'crashed'; a word on how it ended; what the probe printed."""
    start = time.time()
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=LIMIT)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return "hung", f"killed after {LIMIT} s", out
    seconds = time.time() - start
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return "crashed", f"exit {r.returncode} after {seconds:.0f} s: {last[:200]}", r.stdout
    return "ok", f"{seconds:.0f} s", r.stdout


def main(failed_file):
    failed = []
    for name, code in probes():
        outcome, detail, output = run(name, code)
        print(f"smoke {name}: {outcome} ({detail})", flush=True)
        for line in output.strip().splitlines():
            print(f"    {line}", flush=True)
        if outcome != "ok":
            failed.append(name)
    with open(failed_file, "w") as f:
        f.write(" ".join(failed))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
