"""Where does the decode kernels' time go? Per (context, agents) point and variant (K+V residuals, V only, base only):
the GPU time of each kernel of one call (``torch.profiler``, mean over ``--reps`` calls), next to the variant's floor
(``floor_s``: eval.bench.kernel's, from the ceilings this run measures), and the compiled kernels' registers, spills and
shared memory. Plot: ``python -m eval.plots`` (``profile_kernel*.json``: the stages stacked against the floor).
``--ncu-once`` launches each variant once (for ``ncu``; see the GPU command in eval/KERNEL_NOTES.md).

    python -m eval.bench.profile_kernel [--points 32768:32 32768:128] [--ncu-once]
"""

from __future__ import annotations

import argparse
import json

import torch

from .kernel import D, VARIANTS, floors, kernel_resources, make_case, measure_ceilings, swept_knobs, variant_view
from .measure import kernel_seconds_by_family
from .runner import BenchmarkRun


#: kernel name fragments of each stage of a call
STAGES = {"k_pass": ["_kres_scores"], "shared": ["_cascade_shared", "_shared_part"], "merge": ["_private_merge"]}


def kernel_times(fn, reps: int) -> dict:
    """Mean GPU time per call of each stage of ``fn`` (seconds; ``other``: any other kernel, e.g. a copy)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return {k: v / reps for k, v in kernel_seconds_by_family(prof, STAGES, "other").items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", nargs="+", default=["32768:32", "32768:128", "32768:8", "32768:1"])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--ncu-once", action="store_true", help="launch each variant once and exit (for ncu)")
    ap.add_argument("--tuning-from", default=None,
                    help="an eval.bench.sweep_kernel result: its fastest knobs per variant")
    ap.add_argument("--knobs", default=None,
                    help='JSON launcher knobs for every variant (over --tuning-from\'s), e.g. {"res_form": "pairs"}')
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                    help="only these variants (e.g. base for knobs that serve calls without residuals only)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from forkkv_hf.ops.dispatch import residual_attention_triton

    scale = D**-0.5
    best = {}
    if args.tuning_from:
        from .schema import load

        best = load(args.tuning_from).extra["best"]
    extra = json.loads(args.knobs) if args.knobs else {}

    def knobs_of(variant, N):
        return {**swept_knobs(best, variant, N), **extra}

    if args.ncu_once:
        for point in args.points:
            q, view = make_case(*map(int, point.split(":")))
            for variant in args.variants:
                knobs = knobs_of(variant, view.batch_size)
                residual_attention_triton(q, variant_view(view, variant), None, scale, **knobs)
        torch.cuda.synchronize()
        return
    run = BenchmarkRun("profile_kernel", params={"reps": args.reps, "kernel": "cascade", "knobs": extra},
                       case_keys=["context", "agents", "variant"], out=args.out)
    from triton.testing import do_bench

    ceil = run.extra["ceilings"] = measure_ceilings(do_bench)
    for point in args.points:
        T, N = map(int, point.split(":"))
        q, view = make_case(T, N)
        fl = floors(T, N, ceil)
        for variant in args.variants:
            vv = variant_view(view, variant)
            knobs = knobs_of(variant, N)
            launched = {}
            fn = lambda: residual_attention_triton(q, vv, None, scale, launches=launched, **knobs)  # noqa: E731
            floor_s = fl["floor_s" if variant == "kv" else f"floor_{variant}_s"]
            run.measure({"context": T, "agents": N, "variant": variant},
                        lambda: {"knobs": knobs, "kernel_s": kernel_times(fn, args.reps), "floor_s": floor_s,
                                 "resources": kernel_resources({"cascade": launched})})
        del q, view
        torch.cuda.empty_cache()
    for r in run.rows:
        parts = ", ".join(f"{k} {v * 1e6:.1f}" for k, v in r["kernel_s"].items())
        print(f"{r['context']:6d} {r['agents']:4d} {r['variant']:5s} µs: {parts}", flush=True)
    run.finish()


if __name__ == "__main__":
    main()
