"""Triton's launch path, timed with no GPU:
`TRITON_INTERPRET=0 python -m benchmarks.triton_launch_cost`.

host_cost.py makes the Triton launches no-ops, which leaves out Triton's own
Python: binding and specializing each argument, the autotuner's key. Here
the launch functions of pyext's Triton kernels run on CPU tensors with a
pretend H100 as Triton's driver (pretend_hopper.py): the first call of each
compiles real sm_90 kernels (every autotune config: a minute or two the
first time, Triton's cache after), and from then on everything runs as on
the GPU but the launches, which do nothing. Small shapes, so that the few
torch ops on the CPU tensors (allocations, dQ's fp32 buffer) cost little.
Microseconds of host time per call, best of 5 rounds of 300 calls: a
property of the CPU and the Python, not of a GPU (the H200 machine's CPU
is 2.5-3x slower than the project's CPU machine; benchmarks/NOTES.md,
"Host cost of a call").
"""
import os

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise SystemExit("run with TRITON_INTERPRET=0: the kernels must be compiled ones, not the interpreter's")

import torch  # noqa: E402

from benchmarks import pretend_hopper  # noqa: E402
from benchmarks.host_cost import best_us  # noqa: E402


def calls():
    """{name: call} of the launch functions, attention at (1, 2, 64, 128) causal, LayerNorm at 8 x 768, bf16."""
    from pyext.triton_kernels import flash_attention, layer_norm
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 128, dtype=torch.bfloat16) for _ in range(3))
    scale = 128 ** -0.5
    out, lse = flash_attention.flash_attn_fwd(q, k, v, scale, True, 0)
    dout = torch.randn_like(out)

    def forward(loads):
        with flash_attention.use_loads(loads):
            flash_attention.flash_attn_fwd(q, k, v, scale, True, 0)

    def backward(loads, deterministic):
        with flash_attention.use_loads(loads):
            flash_attention.flash_attn_bwd(dout, q, k, v, out, lse, scale, True, 0, deterministic)

    x, w = torch.randn(8, 768, dtype=torch.bfloat16), torch.randn(768, dtype=torch.bfloat16)
    _, mean, rstd = layer_norm.layer_norm_fwd(x, (768,), w, w, 1e-5)
    return {
        "attention forward, descriptors (1 launch, autotuned)": lambda: forward("descriptor"),
        "attention forward, pointers (1, autotuned)": lambda: forward("pointer"),
        "attention backward, deterministic, descriptors (3, 2 autotuned)": lambda: backward("descriptor", True),
        "attention backward, deterministic, pointers (3, 2 autotuned)": lambda: backward("pointer", True),
        "attention backward, atomic dQ, descriptors (2, 1 autotuned)": lambda: backward("descriptor", False),
        "attention backward, atomic dQ, pointers (2, 1 autotuned)": lambda: backward("pointer", False),
        "layer_norm forward (1)": lambda: layer_norm.layer_norm_fwd(x, (768,), w, w, 1e-5),
        "layer_norm backward (2)": lambda: layer_norm.layer_norm_bwd(x, x, mean, rstd, w, w, True, True),
    }


def main():
    import triton
    pretend_hopper.install()
    print(f"Triton launch path, us per call on this CPU (torch {torch.__version__}, Triton {triton.__version__}, "
          "launches no-ops)")
    for name, call in calls().items():
        print(f"{best_us(call, 300, rounds=5):8.1f}  {name}")  # its first calls compile and let autotuners choose


if __name__ == "__main__":
    main()
