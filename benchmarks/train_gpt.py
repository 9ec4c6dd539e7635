"""A whole training step: GPT-2-small-like model, plain PyTorch against pyext.

    python -m benchmarks.train_gpt [--steps N] [--out DIR]

Trains the same model from the same initial weights on the same batches
(byte-level text the script generates), five ways: plain PyTorch with
torch.optim.AdamW(fused=True); patched with pyext.patch and pyext.optim.AdamW;
torch.compile of each; and, compiled, patched for attention and AdamW only,
leaving LayerNorm and GELU to Inductor's fusions ("pyext-attn+compile"),
which says whether our norm kernels help or hinder a compiled model. Reports
tokens/s (after warm-up steps), peak memory, and the loss curves (JSON and a
plot), and fails loudly when a patched curve leaves bf16 noise: its gap to
the plain bf16 curve must stay within twice the gap between plain bf16 and
plain fp32 training, plus a small floor (the tolerance rule of the tests,
applied to a training run).
Without a GPU it trains a tiny model for a few steps and says its timings
mean nothing.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pyext  # noqa: E402

GPT2_SMALL = dict(layers=12, heads=12, dim=768, seq=1024, batch=8)
TINY = dict(layers=2, heads=2, dim=64, seq=64, batch=2)
VOCAB = 256  # bytes
LOSS_FLOOR = 0.02  # nats


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, s, d))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, layers, heads, dim, seq, **_):
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, dim), nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB, bias=False)
        self.head.weight = self.tok.weight
        for module in self.modules():  # GPT-2's initialisation
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx, targets):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.float().view(-1, VOCAB), targets.reshape(-1))


def make_text(n_bytes: int, seed: int = 0) -> torch.Tensor:
    """Deterministic English-like bytes: words drawn from a small Zipf vocabulary."""
    g = torch.Generator().manual_seed(seed)
    words = ("the of and to in is was that for on with as by at from this are be or an it "
             "which one all have not but they were his her had their more can will would "
             "kernel memory tensor attention layer norm gradient optimizer step model").split()
    weights = 1.0 / torch.arange(1, len(words) + 1, dtype=torch.float)
    idx = torch.multinomial(weights, n_bytes // 3, replacement=True, generator=g)
    text = " ".join(words[i] for i in idx.tolist()).encode()[:n_bytes]
    return torch.tensor(list(text), dtype=torch.long)


def batches(cfg, steps, device):
    data = make_text(cfg["batch"] * (cfg["seq"] + 1) * steps + 1)
    chunk = cfg["batch"] * (cfg["seq"] + 1)
    for i in range(steps):
        block = data[i * chunk:(i + 1) * chunk].view(cfg["batch"], cfg["seq"] + 1).to(device)
        yield block[:, :-1], block[:, 1:]


def build(cfg, device, *, patched, norms=True, backend=None):
    """The model (seed 0, so every run starts from the same weights) and its
    optimizer: torch's fused AdamW, or, patched, pyext's kernels (LayerNorm
    and GELU only when `norms`) and AdamW."""
    torch.manual_seed(0)
    model = GPT(**cfg).to(device)
    if patched:
        pyext.patch(model, layer_norm=norms, gelu=norms, backend=backend)
        return model, pyext.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, backend=backend)
    return model, torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)


def step(model, opt, x, y, device, autocast=True):
    """One training step; returns the loss (not synchronised)."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model(x, y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def train(cfg, steps, device, *, patched, compiled, norms=True, autocast=True, warmup=3):
    model, opt = build(cfg, device, patched=patched, norms=norms)
    step_fn = torch.compile(model) if compiled else model
    losses, t_start = [], None
    if HAS_GPU:
        torch.cuda.reset_peak_memory_stats()
    for i, (x, y) in enumerate(batches(cfg, steps, device)):
        if i == min(warmup, steps - 1):
            if HAS_GPU:
                torch.cuda.synchronize()
            t_start = time.perf_counter()
        loss = step(step_fn, opt, x, y, device, autocast)
        losses.append(loss.detach())  # read after the loop: no host sync per step
    if HAS_GPU:
        torch.cuda.synchronize()
    timed_steps = steps - min(warmup, steps - 1)
    seconds = time.perf_counter() - t_start
    return dict(losses=[loss.item() for loss in losses], tokens_per_s=timed_steps * cfg["batch"] * cfg["seq"] / seconds,
                peak_memory_GiB=torch.cuda.max_memory_allocated() / 2 ** 30 if HAS_GPU else None)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_gpt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60 if HAS_GPU else 4)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile runs")
    args = parser.parse_args(argv)
    cfg = GPT2_SMALL if HAS_GPU else TINY
    device = torch.device("cuda" if HAS_GPU else "cpu")
    if not HAS_GPU:
        print("NO GPU: tiny model on the CPU; its timings mean nothing.")

    runs = {"eager": dict(patched=False, compiled=False), "pyext": dict(patched=True, compiled=False)}
    if not args.no_compile:
        runs.update({"compile": dict(patched=False, compiled=True),
                     "pyext+compile": dict(patched=True, compiled=True),
                     "pyext-attn+compile": dict(patched=True, compiled=True, norms=False)})
    results = {name: train(cfg, args.steps, device, **kw) for name, kw in runs.items()}
    fp32 = train(cfg, args.steps, device, patched=False, compiled=False, autocast=False)

    noise = max(abs(a - b) for a, b in zip(fp32["losses"], results["eager"]["losses"]))
    bound = 2 * noise + LOSS_FLOOR
    print(f"{'run':<20}{'tokens/s':>12}{'vs eager':>10}{'peak GiB':>10}{'final loss':>12}{'max gap':>10}")
    for name, r in results.items():
        gap = max(abs(a - b) for a, b in zip(r["losses"], results["eager"]["losses"]))
        r["max_gap_to_eager"] = gap
        mem = f"{r['peak_memory_GiB']:.2f}" if r["peak_memory_GiB"] is not None else "-"
        print(f"{name:<20}{r['tokens_per_s']:>12.0f}{r['tokens_per_s'] / results['eager']['tokens_per_s']:>9.2f}x"
              f"{mem:>10}{r['losses'][-1]:>12.4f}{gap:>10.4f}")
    print(f"bf16 noise (max |fp32 - bf16| loss gap): {noise:.4f}; allowed gap {bound:.4f}")

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"train_gpt-{'gpu' if HAS_GPU else 'smoke'}-{time.strftime('%Y%m%d-%H%M%S')}")
    with open(stem + ".json", "w") as f:
        json.dump(dict(config=cfg, steps=args.steps, device=torch.cuda.get_device_name() if HAS_GPU else "cpu",
                       torch=torch.__version__, noise=noise, bound=bound, fp32_losses=fp32["losses"],
                       runs=results), f, indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, r in results.items():
            ax.plot(r["losses"], label=name)
        ax.plot(fp32["losses"], "k--", label="eager fp32", linewidth=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(stem + ".png", dpi=110)
    except ImportError:
        pass
    print(f"wrote {stem}.json")
    diverged = [n for n, r in results.items() if not all(map(math.isfinite, r["losses"]))
                or r["max_gap_to_eager"] > bound]
    if diverged:
        print(f"FAIL: loss curves of {diverged} leave bf16 noise (gap > {bound:.4f})", file=sys.stderr)
        return 1
    if not HAS_GPU:
        print("NO GPU: tiny model on the CPU; its timings mean nothing.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
