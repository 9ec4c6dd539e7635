"""What the fuzzers (attention_fuzz.py, norm_fuzz.py) share: each check's
margin recorded instead of asserted, and the walk over a seed's cases."""
import argparse
import math
import random

import torch

import conftest


def margin(out, ref, pt) -> float:
    """conftest.rule_margin (error / the rule's bound, above 1 fails); NaN
    where torch's own result is not finite where the reference is (the rule
    cannot judge the case: float16 parameters that overflow, say), else
    infinite where the NaN or infinity pattern differs from the reference's."""
    ref64, out64 = ref.double(), out.double()
    finite = ref64.isfinite()
    if not pt.double()[finite].isfinite().all():
        return math.nan
    if not (torch.equal(out64.isnan(), ref64.isnan()) and torch.equal(out64[~finite], ref64[~finite])):
        return math.inf
    return conftest.rule_margin(out, ref, pt)


def margins(checking_modules, call) -> dict:
    """{output: margin} of call(), which runs test checks that call
    `assert_close` of the given modules; a call that raises counts as
    infinitely far and prints why."""
    found = {}

    def record(out, ref, pt, name):
        found[name] = margin(out, ref, pt)
    for module in checking_modules:
        module.assert_close = record
    try:
        call()
    except Exception as e:  # noqa: BLE001 - a case that raises is a finding, reported with the case
        found["raised"] = math.inf
        print(f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
    return found


def arguments(doc, features, backends=None) -> argparse.ArgumentParser:
    """The fuzzers' options; --backend (the first of `backends` by default)
    where a fuzzer runs more than one."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", type=int, default=60)
    parser.add_argument("--case", type=int, help="run only this case of the seed")
    parser.add_argument("--features", nargs="+", choices=features)
    if backends:
        parser.add_argument("--backend", choices=backends, default=backends[0])
    return parser


def walk(args, features, draw, run):
    """Case i of the seed drawn by draw(rng, features) -> (feature, case)
    from random.Random(f"{seed}-{i}"), the data from a torch seed drawn
    after it, run(feature, case) -> margins. Prints each case past the rule
    or raising and each the rule cannot judge, then the worst margin of each
    feature's outputs and its case."""
    worst, past, unjudged = {}, 0, 0
    indices = [args.case] if args.case is not None else range(args.cases)
    for i in indices:
        rng = random.Random(f"{args.seed}-{i}")
        feature, case = draw(rng, features)
        torch.manual_seed(rng.randint(0, 2 ** 31))
        found = run(feature, case)
        if any(math.isnan(m) for m in found.values()):
            unjudged += 1
            print(f"torch's own result not finite: case {i} {feature} {case}", flush=True)
        found = {name: m for name, m in found.items() if not math.isnan(m)}
        if max(found.values(), default=0.0) > 1:
            past += 1
            print(f"past the rule: case {i} {feature} {found} {case}", flush=True)
        for name, m in found.items():
            if m >= worst.get((feature, name), (-1.0,))[0]:
                worst[(feature, name)] = (m, i, case)
    print(f"{len(indices)} cases, {past} past the rule or raising, {unjudged} with outputs the rule cannot judge")
    for (feature, name), (m, i, case) in sorted(worst.items()):
        print(f"worst {feature} {name}: {m:.3f} case {i} {case}")
