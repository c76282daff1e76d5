"""Where a compiled prefill's time goes, per op, for the plain baseline and each policy.

The bench's prefill overhead is one ratio per case; this splits it. The bench model (weights
shared by every variant), the plain baseline of ``csp-compile bench`` and ``optimize`` per policy,
profiled over ``--repeats`` rounds after a warm-up, the variants taking turns in rotating order (so
drifting machine speed hits all alike); printed per prefill: wall time, minor page faults, and the
self CPU time of the ops that cost most in any variant (with ``--kernels``, each Inductor kernel
apart; otherwise "Inductor kernels" is all of them).

    python examples/profile_prefill.py --length 4096 --policies csp,snapkv [--image] [--kernels]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from torch.profiler import profile

import csp_compile
from csp_compile.bench import baseline, model as bench_model, prefill
from csp_compile.config import CSPConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096, help="prompt tokens (default 4096)")
    parser.add_argument("--policies", default="csp,snapkv", help="comma-separated policies (default csp,snapkv)")
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--image", action="store_true", help="30%% image tokens (default: text only)")
    parser.add_argument("--repeats", type=int, default=6, help="rounds (default 6)")
    parser.add_argument("--rows", type=int, default=12, help="ops to print (default 12)")
    parser.add_argument("--kernels", action="store_true", help="time each Inductor kernel apart (slower compile)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.kernels:
        torch._inductor.config.cpp.enable_kernel_profile = True

    first = bench_model.build_bench_model(bench_model.BENCH_SHAPE)
    variants = {"plain": first}
    for policy in args.policies.split(","):
        model = bench_model.share_weights(bench_model.build_bench_model(bench_model.BENCH_SHAPE), first)
        csp_compile.optimize(model, CSPConfig(budget=args.budget, window=args.window, policy=policy))
        variants[policy] = model
    baseline.compile_plain(first)
    inputs = bench_model.bench_inputs(first, args.length, image_share=0.3 if args.image else 0.0)

    for model in variants.values():  # warm-up (the first call compiles)
        for _ in range(2):
            prefill.prefill(model, inputs)
    names = list(variants)
    per_op: dict[str, dict[str, float]] = {name: {} for name in names}
    wall = dict.fromkeys(names, 0.0)
    faults = dict.fromkeys(names, 0)
    for round_ in range(args.repeats):  # the variants take turns, each place in the order in turn (drift hits all)
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            with profile() as prof:
                start = time.perf_counter()
                prefill.prefill(variants[name], inputs)
                wall[name] += time.perf_counter() - start
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
            for event in prof.key_averages():
                key = "Inductor kernels" if event.key.startswith("## Call CompiledFxGraph") else event.key
                per_op[name][key] = per_op[name].get(key, 0.0) + event.self_cpu_time_total / 1e3 / args.repeats
    for name in names:
        print(f"{name:8s} wall {wall[name] / args.repeats * 1e3:8.1f} ms per prefill, "
              f"{faults[name] / args.repeats:7.0f} minor page faults")

    keys = sorted(set().union(*per_op.values()), key=lambda k: -max(per_op[n].get(k, 0.0) for n in names))
    print(f"\nself CPU ms per prefill ({args.length} tokens, {args.threads} thread(s))")
    print(f"{'op':70s}" + "".join(f"{n:>10s}" for n in names))
    for key in keys[:args.rows]:
        print(f"{key[:70]:70s}" + "".join(f"{per_op[n].get(key, 0.0):10.2f}" for n in names))


if __name__ == "__main__":
    main()
