"""Random small attention cases of every feature against the tolerance rule.

    TRITON_INTERPRET=1 python tests/attention_fuzz.py --seed 1 --cases 60
    TRITON_INTERPRET=1 python tests/attention_fuzz.py --seed 1 --features dropout mask --case 17

Draws each case from (--seed, its index): a feature (plain attention, a soft
cap, sinks, dropout, a mask, a packed batch), a small shape (B 1-2, GQA or
not, Sq and Sk 1-48 and often 1-3, head dim 1-96, mostly multiples of 8),
the dtype, causality, a window, a scale and the backward path. Runs that
feature's own test check on the Triton backend, recording each output's
error / the rule's bound (fuzzing.margin; above 1 fails) rather than
asserting, and prints each case past the rule or raising, then the worst
margin of each feature's outputs and its case. --case N reruns one case.
Small key counts and peaky softmaxes are where the rule's tails hide
(benchmarks/NOTES.md, "A dropout tail where a row sees one key").
"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from pyext.ops import attention  # noqa: E402
import fuzzing  # noqa: E402
import attention_checks  # noqa: E402
import test_attention_mask  # noqa: E402
import test_attention_varlen  # noqa: E402

def length(rng, zero=False):
    return rng.choice([0 if zero else 1, 1, 2, 3, rng.randint(1, 48)])


def draw(rng, features):
    """One case: (feature, the arguments of its run_* function)."""
    feature = rng.choice(features)
    heads_k = rng.choice([1, 2])
    shape = (rng.randint(1, 2), heads_k * rng.choice([1, 2, 3]), heads_k, length(rng), length(rng),
             rng.choice([8, 16, 24, 32, 40, 64, 80, 96, rng.randint(1, 96)]))
    window = rng.choice([(-1, -1), (rng.randint(0, 20), -1), (rng.randint(0, 20), rng.randint(0, 20))])
    case = dict(shape=shape, dtype=rng.choice([torch.bfloat16, torch.float16]), causal=rng.random() < 0.5,
                deterministic=rng.random() < 0.5)
    if feature == "plain":
        case.update(scale=rng.choice([None, None, 0.5, 2.0]), layout=rng.choice(["contiguous", "bshd"]))
    elif feature == "softcap":
        case.update(window=window, softcap=rng.choice([1.0, 5.0, 20.0, 50.0]), scale=rng.choice([None, 0.5]))
    elif feature == "sinks":
        case.update(window=window, spread=rng.choice([0.5, 2.0, 5.0]),
                    sinks_dtype=rng.choice([torch.float32, case["dtype"]]))
    elif feature == "dropout":
        case.update(p=rng.choice([0.1, 0.3, 0.5, 0.9]))
    elif feature == "mask":
        b, hq, _, sq, sk, _ = shape
        del case["causal"]
        case.update(kind=rng.choice(["bool", "additive", "additive_qdtype"]), scale=rng.choice([None, 0.5]),
                    mask_shape=rng.choice([(b, hq, sq, sk), (sq, sk), (b, 1, 1, sk), (hq, sq, sk)]))
        case.update(learned=case["kind"] != "bool" and rng.random() < 0.5)
    else:
        count = rng.randint(1, 4)
        lens_q = [length(rng, zero=True) for _ in range(count)]
        lens_k = lens_q if rng.random() < 0.5 else [length(rng, zero=True) for _ in range(count)]
        for lens in (lens_q, lens_k):  # an empty batch has no yardstick (torch_dense's zeros have no graph)
            lens[0] = lens[0] or int(not sum(lens))
        del case["shape"]
        case.update(case=(tuple(lens_q), tuple(lens_k), *shape[1:3], shape[5]), window=window,
                    softcap=rng.choice([0.0, 0.0, 5.0]), scale=rng.choice([None, 0.5]))
    return feature, case


def run_plain(shape, dtype, causal, deterministic, scale, layout):
    q, k, v = attention_checks.qkv(shape, dtype, "cpu", layout)
    attention_checks.check_flash("triton", q, k, v, causal, deterministic, scale)


def run_softcap(shape, dtype, causal, deterministic, window, softcap, scale):
    attention_checks.check_softcap("triton", deterministic, shape, causal, window, softcap, scale, dtype)


def run_sinks(shape, dtype, causal, deterministic, window, spread, sinks_dtype):
    attention_checks.check_sinks("triton", deterministic, shape, causal, window, spread, sinks_dtype, dtype)


def run_dropout(shape, dtype, causal, deterministic, p):
    seeds, draw_seed = [], attention._dropout_seed
    attention._dropout_seed = lambda device: seeds.append(draw_seed(device)) or seeds[-1]
    try:
        attention_checks.check_dropout(*attention_checks.qkv(shape, dtype, "cpu"), causal, deterministic, p, seeds)
    finally:
        attention._dropout_seed = draw_seed


def run_mask(shape, dtype, deterministic, kind, scale, mask_shape, learned):
    """A boolean mask leaves each row one key at least: rows that see none
    have a test of their own (test_rows_masked_everywhere_give_what_torch_gives).
    learned: an additive mask that requires grad, its gradient checked too."""
    q, k, v = attention_checks.qkv(shape, dtype, "cpu")
    mask = test_attention_mask.make_mask(kind, None, dtype, "cpu", shape=mask_shape).requires_grad_(learned)
    if kind == "bool":
        mask[..., torch.randint(shape[4], ())] = True
    test_attention_mask.check_masked(q, k, v, mask, deterministic, scale=scale)


def run_varlen(case, dtype, causal, deterministic, window, softcap, scale):
    test_attention_varlen.check_varlen("triton", deterministic, case, causal, dtype, window, softcap, scale)


RUNS = {"plain": run_plain, "softcap": run_softcap, "sinks": run_sinks, "dropout": run_dropout, "mask": run_mask,
        "varlen": run_varlen}
FEATURES = list(RUNS)


def run(feature, case):
    return fuzzing.margins([attention_checks, test_attention_mask], lambda: RUNS[feature](**case))


def main():
    args = fuzzing.arguments(__doc__, FEATURES).parse_args()
    fuzzing.walk(args, args.features or FEATURES, draw, run)


if __name__ == "__main__":
    main()
