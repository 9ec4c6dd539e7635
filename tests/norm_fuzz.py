"""Random small norm cases against the tolerance rule, on the Triton (or CUDA) backend.

    TRITON_INTERPRET=1 python tests/norm_fuzz.py --seed 1 --cases 200
    TRITON_INTERPRET=1 python tests/norm_fuzz.py --seed 1 --features gated --case 17
    python tests/norm_fuzz.py --seed 1 --cases 2000 --backend cuda   # on a GPU
    python tests/norm_fuzz.py --seed 1 --cases 200 --backend emulated  # the CUDA kernels, on the CPU

Draws each case from (--seed, its index): an op (LayerNorm and RMSNorm, the
same over groups of the row, the gated RMSNorm), rows (0-70, often 1-3),
normalized_shape (one to three dims, 1 to a few thousand elements, now and
then past the fused path's 8192), the dtypes of x (float16, bfloat16,
float32: a float64 call's yardstick is its oracle) and of the parameters,
which parameters there are, eps, x's layout and, above all, the values:
rows far from zero against their spread (LayerNorm's cancellation), rows of
one value, rows of very different sizes, wide ranges. Runs that op's own
test check (tests/test_layer_norm.py, test_grouped_norm.py,
test_rms_norm_gated.py), recording each output's error / the rule's bound
(fuzzing.margin; above 1 fails) rather than asserting, and prints each
case past the rule or raising, then the worst margin of each op's outputs
and its case. --case N reruns one case. As tests/attention_fuzz.py does for
attention.
"""
import functools
import math
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import conftest  # noqa: E402
import fuzzing  # noqa: E402
import test_grouped_norm  # noqa: E402
import test_layer_norm  # noqa: E402
import test_rms_norm_gated  # noqa: E402

HALVES = [torch.float16, torch.bfloat16]
# (spread, offset) of x's values: a standard row off zero; rows far from
# zero against their spread; tiny and huge rows; rows of one value (spread 0)
VALUES = [(2.0, 1.5), (1.0, 0.0), (1e-2, 10.0), (1e-3, 1.0), (0.5, 300.0), (1e-3, 0.0), (100.0, 0.0), (0.0, 3.0)]


def normalized_shape(rng):
    """One to three dims whose product is n."""
    n = rng.choice([1, 2, 3, 7, 16, 64, 100, rng.randint(1, 300), rng.randint(300, 5000), rng.randint(8193, 9000)])
    shape = [n]
    for _ in range(rng.choice([0, 0, 1, 2])):
        d = rng.choice([d for d in range(1, shape[0] + 1) if shape[0] % d == 0])
        shape = [d, shape[0] // d] + shape[1:]
    return tuple(shape)


def draw(rng, features, backend):
    """One case: (feature, the arguments of its run_* function)."""
    feature = rng.choice(features)
    shape = normalized_shape(rng)
    rows = rng.choice([0, 1, 2, 3, rng.randint(1, 70)]) if math.prod(shape) < 8192 else rng.choice([1, 2])
    dtype = rng.choice(HALVES + [torch.float32])
    case = dict(rows=rows, shape=shape, dtype=dtype, values=rng.choice(VALUES),
                row_sizes=rng.random() < 0.25,  # each row its own power of ten, 1e-3 to 1e3
                layout=rng.choice(["contiguous", "contiguous", "transposed", "strided"]))
    param_dtypes = [dtype] + ([torch.float32] if dtype in HALVES else [])
    if feature in ("norm", "grouped"):
        kind = rng.choice(["layer_norm", "rms_norm"])
        if kind == "rms_norm" and dtype == torch.float32 and backend == "triton":
            param_dtypes += HALVES  # a narrower RMSNorm weight (the CUDA kernels refuse it)
        case.update(kind=kind, weight=rng.random() < 0.8, bias=rng.random() < 0.7,
                    param_dtype=rng.choice(param_dtypes),
                    eps=rng.choice([1e-5, 1e-6, 1e-2] + ([None] if kind == "rms_norm" else [])))
        if feature == "grouped":
            n = math.prod(shape)
            case["group_size"] = rng.choice([d for d in range(1, n + 1) if n % d == 0 and d < n] or [n])
    else:
        n = math.prod(shape)
        case.update(shape=(n,), activation=rng.choice(["silu", "sigmoid"]), norm_before_gate=rng.random() < 0.5,
                    weight=rng.random() < 0.8, param_dtype=rng.choice(param_dtypes),
                    eps=rng.choice([1e-6, 1e-5, None]),
                    group_size=rng.choice([None, None] + [d for d in range(1, n) if n % d == 0][-3:]))
    return feature, case


def in_layout(x, dtype, layout, device):
    """x in dtype, laid out "contiguous", "strided" (every other element of
    a row twice as long) or "transposed" (the last two dims swapped in memory)."""
    if layout == "strided":
        out = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=dtype, device=device)[..., ::2]
    elif layout == "transposed":
        out = torch.empty(*x.shape[:-2], x.shape[-1], x.shape[-2], dtype=dtype, device=device).transpose(-1, -2)
    else:
        out = torch.empty(x.shape, dtype=dtype, device=device)
    return out.copy_(x)


def make_x(rows, shape, dtype, values, row_sizes, layout, device):
    """x of (rows, *shape): spread * normal + offset, each row scaled by its
    own power of ten with row_sizes (less where float16 would overflow); one
    value a row where spread is 0."""
    spread, offset = values
    x = spread * torch.randn(rows, *shape) + offset
    if spread == 0.0:
        x = x + torch.randn(rows).view(-1, *[1] * len(shape))
    if row_sizes:
        powers = torch.randint(-3, 4, (rows,)).view(-1, *[1] * len(shape))
        if dtype == torch.float16:  # float16 ends at 65504: the row's largest below 1e4
            largest = x.abs().amax(dim=tuple(range(1, x.dim())), keepdim=True).clamp(min=1e-30)
            powers = powers.minimum((4 - largest.log10()).floor())
        x = x * 10.0 ** powers
    return in_layout(x, dtype, layout, device)


def params(shape, dtype, weight, bias, device):
    """A weight near 1 and a small bias, of normalized_shape."""
    w = (1 + 0.3 * torch.randn(shape)).to(device, dtype) if weight else None
    b = (0.3 * torch.randn(shape)).to(device, dtype) if bias else None
    return w, b


@functools.cache
def norm_emulator():
    import test_cuda_emulated
    return test_cuda_emulated.load_norm_emulator()


def emulated(kind):
    """The CUDA kernels on the CPU emulator (tests/test_cuda_emulated.py),
    called as F.layer_norm / F.rms_norm are: x as (rows, n) contiguous and
    eps=None made the dtype's default, as the host layer
    (csrc/layer_norm/layer_norm_api.cpp) hands them to the kernels. An
    empty x, which the host layer answers without a launch, goes to torch."""
    import test_cuda_emulated
    from pyext import reference
    from pyext.ops.layer_norm import default_rms_eps

    def fn(x, shape, weight, *rest):
        bias, eps = rest if kind == "layer_norm" else (None, rest[0])
        if x.numel() == 0:
            return getattr(reference, kind)(x, shape, weight, *rest)
        n = math.prod(shape)
        eps = default_rms_eps(x.dtype) if eps is None else eps
        flat = [t.reshape(n) if t is not None else None for t in (weight, bias)]
        y = test_cuda_emulated.EmulatedNorm.apply(x.reshape(-1, n).contiguous(), *flat, eps, kind, norm_emulator(),
                                                  "eager", 3)
        return y.view(x.shape)
    return fn


def run_norm(backend, device, rows, shape, dtype, values, row_sizes, layout, kind, weight, bias, param_dtype, eps):
    x = make_x(rows, shape, dtype, values, row_sizes, layout, device)
    w, b = params(shape, param_dtype, weight, bias and kind == "layer_norm", device)
    fn = emulated(kind) if backend == "emulated" else None
    test_layer_norm.check(kind, backend, x, shape, w, b, eps, fn=fn)


def run_grouped(backend, device, rows, shape, dtype, values, row_sizes, layout, kind, weight, bias, param_dtype, eps,
                group_size):
    x = make_x(rows, shape, dtype, values, row_sizes, layout, device)
    w, b = params(shape, param_dtype, weight, bias and kind == "layer_norm", device)
    test_grouped_norm.check(kind, backend, x, w, b, shape, group_size, eps)


def run_gated(backend, device, rows, shape, dtype, values, row_sizes, layout, activation, norm_before_gate, weight,
              param_dtype, eps, group_size):
    x = make_x(rows, shape, dtype, values, row_sizes, layout, device)
    gate = in_layout(3.0 * torch.randn(rows, *shape), dtype, layout, device)
    w, _ = params(shape, param_dtype, weight, False, device)
    test_rms_norm_gated.check(backend, x, gate, w, eps, activation, norm_before_gate, group_size)


RUNS = {"norm": run_norm, "grouped": run_grouped, "gated": run_gated}
FEATURES = list(RUNS)
CUDA_FEATURES = ["norm"]  # the groups and the gated norm have Triton kernels only


def run(feature, case, backend):
    device = "cpu" if backend == "emulated" else conftest.device_for(backend)
    return fuzzing.margins([test_layer_norm, test_grouped_norm, test_rms_norm_gated],
                           lambda: RUNS[feature](backend, device, **case))


def main():
    args = fuzzing.arguments(__doc__, FEATURES, backends=["triton", "cuda", "emulated"]).parse_args()
    features = args.features or (CUDA_FEATURES if args.backend in ("cuda", "emulated") else FEATURES)
    fuzzing.walk(args, features, lambda rng, f: draw(rng, f, args.backend), lambda f, c: run(f, c, args.backend))


if __name__ == "__main__":
    main()
