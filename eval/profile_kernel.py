"""Where does the decode kernel's time go? Resource use of each compiled variant (registers, spills, shared memory)
and ablations (the same kernel without the K residual, without the V residual, without both) at one size.
Run it under ``ncu`` too (see eval/gpu_session.sh) for hardware counters.

    python eval/profile_kernel.py [--point 32768:32] [--ncu-once]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))
sys.path.insert(0, str(ROOT))

from bench_kernel import D, device_info, make_case  # noqa: E402
from sweep_kernel import graph_time  # noqa: E402

CONFIGS = [
    dict(block_t=32, block_m=16, agents_per_item=4, num_warps=4, num_stages=2, programs_per_sm=8),
    dict(block_t=64, block_m=16, agents_per_item=4, num_warps=8, num_stages=2, programs_per_sm=8),
]


def stats(k):
    md = getattr(k, "metadata", None)
    return {"n_regs": getattr(k, "n_regs", None), "n_spills": getattr(k, "n_spills", None),
            "shared": getattr(md, "shared", None), "num_warps": getattr(md, "num_warps", None)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--point", default="32768:32")
    ap.add_argument("--ncu-once", action="store_true", help="launch each config once and exit (for ncu)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from triton.testing import do_bench

    import forkkv_kernels.residual_attention as ra

    T, N = map(int, args.point.split(":"))
    q, view = make_case(T, N)
    scale = D**-0.5
    if args.ncu_once:
        for cfg in CONFIGS[:2]:
            ra.residual_attention_triton(q, view, None, scale, **cfg)
        torch.cuda.synchronize()
        return
    rows = []
    sh = view.shared
    k_res, v_res = sh.k_res, sh.v_res
    for cfg in CONFIGS:
        for ablation in ("full", "no_k_res", "no_v_res", "no_res"):
            sh.k_res = None if ablation in ("no_k_res", "no_res") else k_res
            sh.v_res = None if ablation in ("no_v_res", "no_res") else v_res
            view.k_rows = None if sh.k_res is None else torch.arange(N, device="cuda")
            view.v_rows = None if sh.v_res is None else torch.arange(N, device="cuda")
            fn = lambda: ra.residual_attention_triton(q, view, None, scale, **cfg)  # noqa: E731
            fn()
            row = {"context": T, "agents": N, "ablation": ablation, **cfg,
                   "shared_kernel": stats(ra.LAST_LAUNCH["shared"]), "merge_kernel": stats(ra.LAST_LAUNCH["merge"])}
            row["graph_s"] = graph_time(fn, do_bench)
            rows.append(row)
            print(json.dumps(row), flush=True)
    sh.k_res, sh.v_res = k_res, v_res
    out = {"benchmark": "profile_kernel", "time": time.strftime("%Y-%m-%d %H:%M:%S"), "device": device_info(),
           "rows": rows}
    Path(args.out or ROOT / "eval" / "results" / "profile_kernel.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
