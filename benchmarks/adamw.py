"""AdamW cases: one optimizer step over the parameter list of a GPT-2-medium
sized model (~355M fp32 parameters in 292 tensors) and of a ~1B one.

Bytes: 28 per fp32 parameter (read p, g, m, v; write p, m, v), the DESIGN.md
convention; floor = 28 N / copy bandwidth. Peers: torch.optim.AdamW for-loop,
foreach and fused. Each row also carries `host_ms`, the host wall time to
issue one step (device idle at the start, no sync inside), which is what a
training loop pays on the CPU per step.
"""
import gc
import statistics
import time

import torch

import pyext
from benchmarks.harness import HAS_GPU, Case, our_backends

# GPT-2 shapes: token and position embeddings, 12 tensors per block, final norm.
MODELS_GPU = {
    "gpt2-medium": dict(n_layer=24, d=1024, vocab=50257, ctx=1024),  # 355M params, 292 tensors
    "1B": dict(n_layer=18, d=2048, vocab=50257, ctx=2048),           # 1.01B params, 220 tensors
}
MODELS_SMOKE = {
    "gpt2-medium (tiny)": dict(n_layer=2, d=64, vocab=500, ctx=64),
    "1B (tiny)": dict(n_layer=2, d=96, vocab=500, ctx=96),
}
BYTES_PER_PARAM = 28
HOST_SAMPLES = 20 if HAS_GPU else 3  # the smoke run's Triton interpreter is slow


def gpt_shapes(n_layer, d, vocab, ctx):
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(n_layer):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),  # ln_1, attn c_attn, c_proj
                   (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]  # ln_2, mlp c_fc, c_proj
    return shapes + [(d,), (d,)]


PROVIDERS = {
    "pyext-cuda": lambda params: pyext.optim.AdamW(params, backend="cuda"),
    "pyext-triton": lambda params: pyext.optim.AdamW(params, backend="triton"),
    "torch-forloop": lambda params: torch.optim.AdamW(params, foreach=False),
    "torch-foreach": lambda params: torch.optim.AdamW(params, foreach=True),
    "torch-fused": lambda params: torch.optim.AdamW(params, fused=True),
}


class Workload:
    """The params (with grads) of one case and the optimizer being timed.

    Made on first use; making one frees the previous workload, and switching
    provider frees the previous optimizer's state, so that a 1B-parameter
    case holds 8 GB of params and grads plus one optimizer's 8 GB of moments.
    """
    active = None

    def __init__(self, shapes, device):
        self.shapes, self.device = shapes, device
        self.params, self.name, self.opt = None, None, None

    def step(self, name):
        if Workload.active is not self:
            if Workload.active is not None:
                Workload.active.params = Workload.active.opt = Workload.active.name = None
            Workload.active = self
            gc.collect()
            self.params = [torch.nn.Parameter(torch.randn(s, device=self.device)) for s in self.shapes]
            for p in self.params:
                p.grad = torch.randn_like(p)
        if self.name != name:
            self.opt = None
            gc.collect()
            self.opt, self.name = PROVIDERS[name](self.params), name
        self.opt.step()

    def host_ms(self, name):
        """Median host wall time of issuing one step, starting from an idle device."""
        samples = []
        for _ in range(HOST_SAMPLES):
            if HAS_GPU:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            self.step(name)
            samples.append((time.perf_counter() - t0) * 1e3)
        return {"host_ms": statistics.median(samples)}


def cases(quick: bool, dtypes):
    """fp32 parameters whatever `dtypes` says: the 28-byte convention is fp32's."""
    device = "cuda" if HAS_GPU else "cpu"
    models = MODELS_GPU if HAS_GPU else MODELS_SMOKE
    if quick and HAS_GPU:
        models = {"gpt2-medium": MODELS_GPU["gpt2-medium"]}
    ours = our_backends()
    for label, config in models.items():
        shapes = gpt_shapes(**config)
        n = sum(torch.Size(s).numel() for s in shapes)
        work = Workload(shapes, device)
        providers = {name: ours.get(name) or (lambda name=name: work.step(name)) for name in PROVIDERS}
        extras = {name: (lambda name=name: work.host_ms(name)) for name in PROVIDERS}
        count = f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"
        yield Case(op="adamw", label=f"{label} {count}/{len(shapes)}t", size=n, dtype="float32",
                   direction="step", bytes=BYTES_PER_PARAM * n, flops=0, providers=providers,
                   extras=extras)
