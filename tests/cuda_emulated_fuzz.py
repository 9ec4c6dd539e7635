"""Random attention cases on the CUDA kernels run on the CPU emulator
(tests/test_cuda_emulated.py), both stages, against the tolerance rule.

    python tests/cuda_emulated_fuzz.py --seed 1 --cases 100
    python tests/cuda_emulated_fuzz.py --seed 1 --features stage2 --case 17

Draws each case from (--seed, its index): the stage, a shape (B 1-2, GQA or
not, Sq and Sk 1-300 and often 1-3; any head dim a multiple of 8 up to 256
for Stage 1, one that pads to 64 or 128 for Stage 2), the dtype, causality
with a causal offset (bottom-right, top-left or any from -Sq to Sk), the
memory layout, the schedule (warps in lockstep; cp.async or TMA copies
landing as late as they may; warps one at a time; threads in a random order
and pace, with a seed of their own), the backward's mode (deterministic,
or dQ added up with atomics), for Stage 2 the multiprocessors of the
emulated device (its forward runs one CTA each, looping over the tiles),
and the softmax scale (1/sqrt(D), 0.5 or 2.0: the last two twice the
default or more from D 16 on, where the forward stores out_lo). Records
each output's error / the rule's bound (above 1 fails) as the other
fuzzers do. No GPU needed: g++ and the CUDA toolkit's headers.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import attention_checks  # noqa: E402
import fuzzing  # noqa: E402
import test_cuda_emulated as emulated  # noqa: E402

STAGES = {"stage1": "", "stage2": "_sm90"}
HEAD_DIMS = {"stage1": list(range(8, 257, 8)), "stage2": [40, 48, 56, 64, 104, 112, 120, 128]}


def length(rng):
    return rng.choice([1, 2, 3, rng.randint(1, 300), rng.randint(1, 300)])


def draw(rng, features):
    """One case: (stage, the arguments of check_stage)."""
    stage = rng.choice(features)
    heads_k = rng.choice([1, 2])
    sq, sk = length(rng), length(rng)
    shape = (rng.randint(1, 2), heads_k * rng.choice([1, 2, 3]), heads_k, sq, sk, rng.choice(HEAD_DIMS[stage]))
    offset = rng.choice([sk - sq, 0, rng.randint(-sq, sk)])
    return stage, dict(shape=shape, dtype=rng.choice([torch.bfloat16, torch.float16]), causal=rng.random() < 0.6,
                       mode=rng.choice(emulated.MODES), layout=rng.choice(["contiguous", "bshd"]), offset=offset,
                       seed=rng.randint(0, 2 ** 31), deterministic=rng.random() < 0.5,
                       sms=rng.choice([1, 2, 3, 132]), scale=rng.choice([None, None, 0.5, 2.0]))


LIBRARIES = {}


def run(stage, case):
    if stage not in LIBRARIES:
        LIBRARIES[stage] = emulated.flash_library(STAGES[stage])
    lib = LIBRARIES[stage]
    lib.emulator_seed(case["seed"])
    if stage == "stage2":
        lib.emulator_sms(case["sms"])
    arguments = {name: value for name, value in case.items() if name not in ("seed", "sms")}
    return fuzzing.margins([attention_checks], lambda: emulated.check_stage(lib, stage=STAGES[stage], **arguments))


def main():
    args = fuzzing.arguments(__doc__, list(STAGES)).parse_args()
    fuzzing.walk(args, args.features or list(STAGES), draw, run)


if __name__ == "__main__":
    main()
