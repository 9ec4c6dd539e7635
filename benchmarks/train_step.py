"""One whole training step, timed as one call: forward, backward and AdamW
step of train_gpt's GPT-2-small-like model (bf16 autocast, 8 x 1024 tokens
of a byte vocabulary; a tiny one without a GPU).

FLOPs per step: 6 x the matmul weights x tokens (forward 2, backward 4), plus
causal attention, 4 B H S^2 D / 2 forward and 2.5 times that backward. As
TFLOP/s over the bf16 matmul ceiling this is the step's model-FLOP
utilisation. Providers: plain PyTorch with torch.optim.AdamW(fused=True),
the same model under torch.compile, and the model patched by pyext.patch
with one backend and stepped by pyext.optim.AdamW. The loss curves, and the
patched model under torch.compile, are `python -m benchmarks.train_gpt`'s.
"""
import torch

from benchmarks.harness import HAS_GPU, Case, our_backends

# train_gpt is imported where it is used, not here: `python -m benchmarks.train_gpt`
# imports this package first, and must not find that module already loaded.


# the provider names its cases may hold (python -m benchmarks checks --skip-providers against them)
PROVIDERS = ("pyext-cuda", "pyext-triton", "torch", "torch.compile")


def _configs(quick: bool, dtypes) -> dict:
    if torch.bfloat16 not in dtypes:
        return {}
    from benchmarks.train_gpt import GPT2_SMALL, TINY
    return {"gpt2-small": GPT2_SMALL} if HAS_GPU else {"tiny": TINY}


def count(quick: bool, dtypes) -> int:
    return len(_configs(quick, dtypes))


def step_flops(layers, heads, dim, seq, batch) -> float:
    from benchmarks.train_gpt import VOCAB
    weights = layers * 12 * dim * dim + dim * VOCAB  # qkv, proj, fc, fc2; the tied head
    attention_fwd = 4 * batch * heads * seq * seq * (dim // heads) / 2
    return 6 * weights * batch * seq + 3.5 * layers * attention_fwd


def cases(quick: bool, dtypes):
    from benchmarks.train_gpt import batches
    device = torch.device("cuda" if HAS_GPU else "cpu")
    ours = our_backends()
    for label, cfg in _configs(quick, dtypes).items():
        x, y = next(batches(cfg, 1, device))
        providers = {name: ours[name] or _stepper(cfg, device, x, y, backend=name[len("pyext-"):])
                     for name in ("pyext-cuda", "pyext-triton")}
        providers["torch"] = _stepper(cfg, device, x, y)
        providers["torch.compile"] = _stepper(cfg, device, x, y, compiled=True)
        tokens = cfg["batch"] * cfg["seq"]
        yield Case(op="train_step", label=f"{label} {cfg['batch']}x{cfg['seq']} tokens", size=tokens,
                   dtype="bfloat16", direction="step", bytes=0,
                   flops=step_flops(cfg["layers"], cfg["heads"], cfg["dim"], cfg["seq"], cfg["batch"]),
                   providers=providers,
                   check="a whole training step: benchmarks/train_gpt.py compares its loss curves with torch's")


def _stepper(cfg, device, x, y, backend=None, compiled=False):
    """A training step of a model (and optimizer) built on first use, the same
    initial weights for every provider."""
    from benchmarks.train_gpt import build, step
    holder = []

    def run():
        if not holder:
            model, opt = build(cfg, device, patched=backend is not None, backend=backend)
            holder.append((torch.compile(model) if compiled else model, opt))
        step(*holder[0], x, y, device)
    return run
