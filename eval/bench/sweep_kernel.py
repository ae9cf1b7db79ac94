"""Tune the cascade decode kernels on the GPU: time launcher configurations at (context, agents) points.

``--stage shared`` varies the shared-part kernel's knobs (tile, warps, vectors per program, programs per SM) for each
variant (K+V residuals, V only, base only); ``--stage kres`` varies the K pass's knobs (tile, warps, KV heads per
program, programs per SM) with K+V residuals. Each configuration is timed as the GPU time of one call (CUDA graph
replay, :func:`eval.bench.measure.graph_time`) and checked against the default configuration's output. Result: the
one schema, rows keyed by (stage, variant, context, agents, config); the best configuration per (stage, variant,
point) in ``extra["best"]``.

    python -m eval.bench.sweep_kernel [--stage shared kres] [--points 32768:32 32768:128] [--out sweep.json]
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from .kernel import D, make_case, variant_view
from .measure import graph_time
from .runner import BenchmarkRun

#: knob values per stage (None: the launcher's default); ``--grid`` replaces a stage's grid
GRIDS = {
    "shared": {"block_t": [32, 64], "num_warps": [4, 8], "block_m": [None, 128], "programs_per_sm": [2, 4]},
    "kres": {"res_block_t": [64, 128], "res_warps": [4, 8], "res_heads": [8, 2], "res_programs_per_sm": [2, 4]},
}
#: configurations left out: 128 vectors on 4 warps spill (ptxas for sm_90: 80-990 bytes of stack)
SPILLS = [{"block_m": 128, "num_warps": 4}]
STAGE_VARIANTS = {"shared": ["kv", "v", "base"], "kres": ["kv"]}


def configs(stage: str, only: dict | None = None, grids: dict | None = None) -> list[dict]:
    grid = (grids or GRIDS)[stage]
    out = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    out = [c for c in out if not any(all(c.get(k) == v for k, v in bad.items()) for bad in SPILLS)]
    return [c for c in out if all(c.get(k) == v for k, v in (only or {}).items())]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", nargs="+", default=["shared", "kres"], choices=list(GRIDS))
    ap.add_argument("--points", nargs="+", default=["32768:32", "32768:128", "32768:8", "32768:1"])
    ap.add_argument("--only", default=None, help='JSON dict of knob values to keep, e.g. {"num_warps": 4}')
    ap.add_argument("--fixed", default=None, help="JSON dict of knobs every configuration gets")
    ap.add_argument("--grid", default=None, help='JSON {stage: {knob: [values]}} replacing those stages\' grids')
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from triton.testing import do_bench

    from forkkv_hf.ops.dispatch import residual_attention_triton

    fixed = json.loads(args.fixed) if args.fixed else {}
    grids = {**GRIDS, **(json.loads(args.grid) if args.grid else {})}
    run = BenchmarkRun("sweep_kernel", params={"stages": args.stage, "points": args.points, "fixed": fixed,
                                               "grids": {s: grids[s] for s in args.stage}},
                       case_keys=["stage", "variant", "context", "agents", "config"], out=args.out)
    best = run.extra.setdefault("best", {})
    scale = D**-0.5
    for point in args.points:
        T, N = map(int, point.split(":"))
        q, view = make_case(T, N)
        for stage in args.stage:
            for variant in STAGE_VARIANTS[stage]:
                vv = variant_view(view, variant)
                ref = residual_attention_triton(q, vv, None, scale)
                for cfg in configs(stage, json.loads(args.only) if args.only else None, grids):
                    knobs = {**fixed, **{k: v for k, v in cfg.items() if v is not None}}

                    def measure():
                        fn = lambda: residual_attention_triton(q, vv, None, scale, kernel="cascade", **knobs)  # noqa
                        try:
                            diff = (fn().float() - ref.float()).abs().max().item()
                            return {"max_abs_diff_vs_default": diff, "graph_s": graph_time(fn, do_bench)}
                        except Exception as e:  # noqa: BLE001 - a config that does not compile is a result too
                            return {"error": repr(e)[:300]}

                    row = run.measure({"stage": stage, "variant": variant, "context": T, "agents": N,
                                       "config": json.dumps(cfg, sort_keys=True)}, measure)
                    key = f"{stage}/{variant}/{T}:{N}"
                    if "graph_s" in row and (key not in best or row["graph_s"] < best[key]["graph_s"]):
                        best[key] = {"config": cfg, "graph_s": row["graph_s"]}
        del q, view
        torch.cuda.empty_cache()
    for key, b in best.items():
        print("BEST", key, f"{b['graph_s'] * 1e6:.1f} us", json.dumps(b["config"]), flush=True)
    run.finish()


if __name__ == "__main__":
    main()
