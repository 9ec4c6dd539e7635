"""Random AdamW runs against the tolerance rule, on the Triton (or CUDA) backend.

    TRITON_INTERPRET=1 python tests/adamw_fuzz.py --seed 1 --cases 100
    python tests/adamw_fuzz.py --seed 1 --cases 1000 --backend cuda   # on a GPU
    python tests/adamw_fuzz.py --seed 1 --cases 100 --backend emulated  # the CUDA kernel, on the CPU

Draws each case from (--seed, its index): the dtype, 4-7 parameters of
random shapes (a scalar, empty, odd sizes to a few thousand), their size
(1e-3 to 1e3) and their gradients' (1e-12 to 1e4, now and then zero or
missing), 1-10 steps at an lr of 1e-5 to 10 that stays,
decays or jumps, and the options (betas down to 0, eps 1e-12 to 1e-3,
weight decay to 1, amsgrad, maximize). Runs test_adamw's own check (the
parameters and moments against a float64 run, torch.optim.AdamW the
yardstick), recording each margin (fuzzing.margin; above 1 fails) rather
than asserting, and prints each case past the rule or raising, then the
worst margin of each output. --case N reruns one case. As
tests/attention_fuzz.py does for attention.
"""
import functools
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import conftest  # noqa: E402
import fuzzing  # noqa: E402
import test_adamw  # noqa: E402

FEATURES = ["adamw"]


def draw(rng, features):
    """One case: ("adamw", the arguments of run_adamw)."""
    shapes = [rng.choice([(), (0,), (1,), (rng.randint(1, 40),), (rng.randint(1, 9), rng.randint(1, 9)),
                          (rng.randint(1, 3000),)]) for _ in range(rng.randint(4, 7))]
    steps = rng.randint(1, 10)
    lr = rng.choice([1e-5, 1e-3, 1e-2, 1e-1, 1.0, 10.0])
    schedule = rng.choice(["constant", "decay", "jumps"])
    lrs = [lr if schedule == "constant" else lr * (1 - i / steps) if schedule == "decay"
           else lr * rng.choice([0.1, 1.0, 3.0]) for i in range(steps)]
    options = dict(betas=rng.choice([(0.9, 0.999), (0.8, 0.95), (0.0, 0.99), (0.9, 0.9999), (0.5, 0.5)]),
                   eps=rng.choice([1e-8, 1e-6, 1e-12, 1e-3]), weight_decay=rng.choice([0.0, 1e-2, 0.1, 1.0]),
                   amsgrad=rng.random() < 0.4, maximize=rng.random() < 0.3)
    return "adamw", dict(dtype=rng.choice([torch.float32, torch.bfloat16, torch.float16]), shapes=shapes,
                         param_size=10.0 ** rng.randint(-3, 3),
                         grad_size=10.0 ** rng.choice([-12, -8, -4, -2, 0, 2, 4]),
                         missing=rng.choice([0.0, 0.2]), zero=rng.choice([0.0, 0.1]), lrs=lrs, options=options)


def run_adamw(backend, device, dtype, shapes, param_size, grad_size, missing, zero, lrs, options):
    """One size for all parameters and one for all gradients: the rule's
    max error over every element would otherwise be one small tensor's, a
    single rounding against torch's (as test_adamw says)."""
    start = [(param_size * torch.randn(shape)).to(device, dtype) for shape in shapes]
    grads = []
    for _ in lrs:
        step = []
        for p in start:
            chance = torch.rand(()).item()
            g = None if chance < missing else grad_size * torch.randn(p.shape) * (chance >= missing + zero)
            step.append(None if g is None else g.to(device, dtype))
        grads.append(step)
    if backend == "emulated":
        test_adamw.check_steps("cuda", dtype, options, start, grads, lrs, optimizer=emulated())
    else:
        test_adamw.check_steps(backend, dtype, options, start, grads, lrs)


@functools.cache
def emulated():
    """pyext.optim.AdamW stepping through the CUDA kernel on the CPU emulator
    (tests/test_cuda_emulated.py), as check_steps' `optimizer`."""
    import test_cuda_emulated
    return functools.partial(test_cuda_emulated.EmulatedAdamW, lib=test_cuda_emulated.load_adamw_emulator())


def run(case, backend):
    device = "cpu" if backend == "emulated" else conftest.device_for(backend)
    return fuzzing.margins([test_adamw], lambda: run_adamw(backend, device, **case))


def main():
    args = fuzzing.arguments(__doc__, FEATURES, backends=["triton", "cuda", "emulated"]).parse_args()
    fuzzing.walk(args, FEATURES, draw, lambda feature, case: run(case, args.backend))


if __name__ == "__main__":
    main()
