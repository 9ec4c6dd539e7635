"""How close an attention case comes to the tolerance rule over many seeds.

    TRITON_INTERPRET=1 python tests/oracle_margins.py varlen "((9, 4, 24), (30, 0, 2), 2, 2, 32, 16)" --seeds 100
    TRITON_INTERPRET=1 python tests/oracle_margins.py dense "(2, 2, 1, 19, 33, 40, 24)" --seeds 60 --math-yardstick
    TRITON_INTERPRET=1 python tests/oracle_margins.py dense "(2, 2, 1, 19, 33, 40)" --seeds 100 --scale 2.0
    python tests/oracle_margins.py dense "(2, 2, 1, 19, 33, 40)" --seeds 200 --scale 4.0 --cuda-emulated stage2

Runs the test's own check (check_flash for "dense", check_varlen for
"varlen") on seeds 0..N-1 with the Triton backend, recording for each output
and gradient error / bound (the rule of conftest.py: above 1 fails), and
prints the worst, the seed it came from and how many seeds were past the
rule. Dense cases alternate causal and the backward path by seed.
--cuda-emulated stage1|stage2 runs a dense case on the CUDA kernels on the
CPU emulator (test_cuda_emulated.check_stage) instead of the Triton backend.
--math-yardstick judges by torch's SDPA without attention_checks.sdpa's
padding (its math backend, fp32 inside, where v is narrower than q).
"""
import argparse
import ast
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import conftest  # noqa: E402
import attention_checks  # noqa: E402
import test_attention_varlen  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["dense", "varlen"])
    parser.add_argument("case", help="a case as the test writes it: a dense shape or a varlen case")
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--causal", action="store_true", help="varlen: causal (dense alternates)")
    parser.add_argument("--deterministic", action="store_true", help="varlen: the two-kernel backward")
    parser.add_argument("--math-yardstick", action="store_true")
    parser.add_argument("--scale", type=float, help="dense: a softmax scale other than 1/sqrt(D)")
    parser.add_argument("--cuda-emulated", choices=["stage1", "stage2"], help="dense: the emulated CUDA kernels")
    args = parser.parse_args()
    if args.cuda_emulated and args.kind != "dense":
        parser.error("--cuda-emulated runs dense cases only (the CUDA kernels have no packed batches)")
    case = ast.literal_eval(args.case)
    if args.math_yardstick:
        attention_checks.sdpa = F.scaled_dot_product_attention
        test_attention_varlen.sdpa = F.scaled_dot_product_attention

    if args.cuda_emulated:
        import test_cuda_emulated
        stage = {"stage1": "", "stage2": "_sm90"}[args.cuda_emulated]
        emulator = test_cuda_emulated.flash_library(stage)
        if stage:
            emulator.emulator_sms(test_cuda_emulated.SM90_SMS)

    margins, seed = {}, 0

    def record(out, ref, pt, name="output"):
        margins.setdefault(name, []).append((conftest.rule_margin(out, ref, pt), seed))
    attention_checks.assert_close = record

    for seed in range(args.seeds):
        torch.manual_seed(seed)
        if args.kind == "dense" and args.cuda_emulated:
            test_cuda_emulated.check_stage(emulator, case, torch.bfloat16, seed % 2 == 1, "eager", "contiguous", stage,
                                           deterministic=seed % 4 >= 2, scale=args.scale)
        elif args.kind == "dense":
            q, k, v = attention_checks.qkv(case, torch.bfloat16, "cpu")
            attention_checks.check_flash("triton", q, k, v, seed % 2 == 1, seed % 4 >= 2, args.scale)
        else:
            test_attention_varlen.check_varlen("triton", args.deterministic, case, args.causal)
    for name, values in margins.items():
        worst, worst_seed = max(values)
        past = sum(m > 1 for m, _ in values)
        print(f"{name:4s} worst {worst:.3f}x the bound (seed {worst_seed}), past the rule in {past}/{len(values)}")


if __name__ == "__main__":
    main()
