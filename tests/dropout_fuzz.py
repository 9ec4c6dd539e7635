"""Random small attention-with-dropout cases against the tolerance rule.

    TRITON_INTERPRET=1 python tests/dropout_fuzz.py --seed 1 --cases 80

Draws each case's shape (B 1-2, GQA or not, Sq 1-40, Sk often 1-3, head dim
8-40), dtype, dropout_p, causality and backward path from --seed, runs
pyext.flash_attention on the Triton backend, and judges out, dq, dk and dv
as test_attention_dropout does (the float64 oracle and torch's math in the
dtype, both with the kernels' mask): prints each case past the rule, then
the worst error / bound of each output and its case. Small key counts are
where the rounding of out in D = rowsum(dO * O) shows (benchmarks/NOTES.md,
"A dropout tail where a row sees one key").
"""
import argparse
import os
import random
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import pyext  # noqa: E402
from pyext import reference  # noqa: E402
from pyext.ops import attention  # noqa: E402
import conftest  # noqa: E402
from attention_checks import attention_with_dropout, qkv  # noqa: E402


def margin(out, ref, pt):
    """error / bound of the rule (conftest.assert_close): above 1 fails."""
    ref, finite = ref.double(), ref.isfinite()
    err = (out.double() - ref)[finite].abs().max().item() if finite.any() else 0.0
    pt_err = (pt.double() - ref)[finite].abs().max().item() if finite.any() else 0.0
    return err / (2 * pt_err + conftest.FLOOR[out.dtype])


def draw_case(rng):
    heads_k = rng.choice([1, 2])
    shape = (rng.randint(1, 2), heads_k * rng.choice([1, 2]), heads_k, rng.randint(1, 40),
             rng.choice([1, 1, 2, 3, rng.randint(1, 40)]), rng.choice([8, 16, 32, 40]))
    return dict(shape=shape, dtype=rng.choice([torch.bfloat16, torch.float16]),
                p=rng.choice([0.1, 0.3, 0.5, 0.7, 0.9]), causal=rng.random() < 0.5,
                deterministic=rng.random() < 0.5)


def run_case(shape, dtype, p, causal, deterministic):
    """{name: error / bound} of one case."""
    q, k, v = qkv(shape, dtype, "cpu")
    seeds, draw = [], attention._dropout_seed
    attention._dropout_seed = lambda device: seeds.append(draw(device)) or seeds[-1]
    try:
        out = pyext.flash_attention(q, k, v, causal=causal, dropout_p=p, deterministic=deterministic,
                                    backend="triton")
    finally:
        attention._dropout_seed = draw
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    offset, scale = k.shape[2] - q.shape[2], q.shape[-1] ** -0.5
    from pyext.triton_kernels.flash_attention import dropout_keep_mask
    keep = dropout_keep_mask(seeds[-1], *q.shape[:3], k.shape[2], p)

    def run(attention_fn, in_dtype):
        leaves = [t.detach().to(in_dtype).requires_grad_() for t in (q, k, v)]
        o = attention_fn(*leaves)
        return [o] + list(torch.autograd.grad(o, leaves, dout.to(in_dtype)))
    ref = run(lambda *t: reference.attention(*t, scale=scale, causal=causal, causal_offset=offset, dropout_p=p,
                                             keep=keep)[0], torch.float64)
    pt = run(lambda *t: attention_with_dropout(*t, scale, causal, offset, keep, p), dtype)
    return {name: margin(o, r, y) for name, o, r, y in zip(["out", "dq", "dk", "dv"], [out, *grads], ref, pt)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", type=int, default=80)
    args = parser.parse_args()
    rng, worst, past = random.Random(args.seed), {}, 0
    for _ in range(args.cases):
        case = draw_case(rng)
        torch.manual_seed(rng.randint(0, 2 ** 31))
        margins = run_case(**case)
        if max(margins.values()) > 1:
            past += 1
            print(f"past the rule: {margins} {case}", flush=True)
        for name, m in margins.items():
            if m > worst.get(name, (0.0,))[0]:
                worst[name] = (m, case)
    print(f"{args.cases} cases, {past} past the rule")
    for name, (m, case) in worst.items():
        print(f"worst {name}: {m:.3f} {case}")


if __name__ == "__main__":
    main()
