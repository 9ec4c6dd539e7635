"""AdamW step cases: a GPT-2-medium-like parameter list (~355M fp32 parameters
in ~290 tensors) and a ~1B one. Bytes: 28 per fp32 parameter (read p, g, m, v;
write p, m, v). Peers: torch.optim.AdamW for-loop, foreach and fused, and
Apex's FusedAdam in AdamW mode when Apex is installed."""
import functools

import torch

import pyext
from benchmarks.harness import HAS_GPU, Case, Check, optional_peer, our_backends
from pyext import reference


def gpt_shapes(layers, dim, vocab=50257, seq=1024):
    """Parameter shapes of a GPT-2-style model."""
    shapes = [(vocab, dim), (seq, dim)]
    for _ in range(layers):
        shapes += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,),
                   (dim,), (dim,), (4 * dim, dim), (4 * dim,), (dim, 4 * dim), (dim,)]
    return shapes + [(dim,), (dim,)]


MODELS = {"gpt2-medium": (24, 1024), "1B": (20, 2048)}
# the provider names its cases may hold (python -m benchmarks checks --skip-providers against them)
PROVIDERS = ("pyext-cuda", "pyext-triton", "torch-forloop", "torch-foreach", "torch-fused", "apex")


def _models(quick: bool, dtypes) -> dict:
    if torch.float32 not in dtypes:
        return {}
    return ({"gpt2-medium": MODELS["gpt2-medium"]} if quick else MODELS) if HAS_GPU else {"tiny": (2, 64)}


def count(quick: bool, dtypes) -> int:
    return len(_models(quick, dtypes))


def cases(quick: bool, dtypes):
    device = "cuda" if HAS_GPU else "cpu"
    ours = our_backends()
    for label, (layers, dim) in _models(quick, dtypes).items():
        shapes = gpt_shapes(layers, dim, vocab=50257 if HAS_GPU else 256, seq=1024 if HAS_GPU else 64)
        params = [torch.randn(s, device=device) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        n = sum(p.numel() for p in params)
        makers = {
            "pyext-cuda": lambda: pyext.optim.AdamW(params, backend="cuda"),
            "pyext-triton": lambda: pyext.optim.AdamW(params, backend="triton"),
            "torch-forloop": lambda: torch.optim.AdamW(params, foreach=False),
            "torch-foreach": lambda: torch.optim.AdamW(params, foreach=True),
            "torch-fused": lambda: torch.optim.AdamW(params, fused=True),
            "apex": _apex_adamw(params),
        }
        providers = {}
        for name, make in makers.items():
            if ours.get(name):
                providers[name] = ours[name]
            elif isinstance(make, str):
                providers[name] = make
            elif name == "torch-fused" and not HAS_GPU and not _fused_on_cpu():
                providers[name] = "fused AdamW needs a GPU in this torch"
            else:
                providers[name] = _stepper(make)
        yield Case(op="adamw", label=f"{label} {len(params)} tensors {n / 1e6:.0f}M", size=n, dtype="float32",
                   direction="step", bytes=28 * n, flops=0, providers=providers,
                   check=Check(functools.partial(_oracle, params), per_provider=True,
                               yardsticks=("torch-forloop", "torch-foreach", "torch-fused")))


def _apex_adamw(params):
    """A maker of Apex's FusedAdam with torch.optim.AdamW's defaults, or why it is skipped."""
    optimizers = optional_peer("apex.optimizers")
    if isinstance(optimizers, str):
        return optimizers
    return lambda: optimizers.FusedAdam(params, lr=1e-3, weight_decay=1e-2, adam_w_mode=True)


def _stepper(make):
    """A step of an optimizer built on first use (its state lives with it),
    returning the parameters it stepped."""
    holder = []

    def step():
        if not holder:
            holder.append(make())
        holder[0].step()
        return [p for group in holder[0].param_groups for p in group["params"]]
    return step


def _oracle(params):
    """What a new optimizer's first step makes of the parameters as they are
    now (each provider's steps go on from the last's): per tensor, a callable
    giving the step by pyext's reference in float64 from a copy taken now,
    with torch.optim.AdamW's defaults (computed when compared, one tensor at
    a time: no float64 copy of every parameter at once)."""
    return [functools.partial(_first_step, p.detach().clone(), p.grad) for p in params]


def _first_step(p, grad):
    p64, g64 = p.double(), grad.double()
    moments = [torch.zeros_like(p64), torch.zeros_like(p64)]
    reference.adamw_step([p64], [g64], *([m] for m in moments), [None], [1], lr=1e-3, beta1=0.9, beta2=0.999,
                         eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False)
    return p64


def _fused_on_cpu():
    try:
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)], fused=True)
        return True
    except RuntimeError:
        return False
