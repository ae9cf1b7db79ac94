"""Tune the decode kernel on the GPU: time launcher configurations at one or more (context, agents) points.

For each configuration: eager time (``do_bench`` median, includes the Python launch cost) and graph-replay time
(the call captured in a CUDA graph: GPU time alone). Writes JSON with the device and versions; the best
configuration per point is printed last.

    python eval/sweep_kernel.py [--points 32768:32 32768:8 4096:1] [--out sweep.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))
sys.path.insert(0, str(ROOT))

from bench_kernel import D, device_info, make_case  # noqa: E402


def graph_time(fn, do_bench, reps=20):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        with torch.cuda.graph(g):
            for _ in range(reps):
                fn()
    torch.cuda.current_stream().wait_stream(s)
    return do_bench(lambda: g.replay(), warmup=10, rep=100, return_mode="median") * 1e-3 / reps


CONFIGS = {
    "block_t": [32, 64],
    "items": [(16, 1), (16, 4)],  # (block_m, agents_per_item): 1 = one agent per item (no base sharing)
    "num_warps": [4, 8],
    "d_chunk": [32, 64],
    "lowp_rope": [False, True],
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", nargs="+", default=["32768:32", "4096:8"])
    ap.add_argument("--max-configs", type=int, default=64)
    ap.add_argument("--only", default=None, help='JSON dict of knob values to keep, e.g. {"num_warps": 4}')
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from triton.testing import do_bench

    from forkkv_kernels import residual_attention_triton

    grid = []
    for bt, (bm, apm), nw, dc, lowp in itertools.product(*CONFIGS.values()):
        grid.append(dict(block_t=bt, block_m=bm, agents_per_item=apm, num_warps=nw, num_stages=2,
                         programs_per_sm=8, d_chunk=dc, lowp_rope=lowp))
    if args.only:
        keep = json.loads(args.only)
        grid = [c for c in grid if all(c.get(k) == v for k, v in keep.items())]
    grid = grid[: args.max_configs]
    results = []
    scale = D**-0.5
    for point in args.points:
        T, N = map(int, point.split(":"))
        q, view = make_case(T, N)
        ref = residual_attention_triton(q, view, None, scale)
        best = None
        for cfg in grid:
            row = {"context": T, "agents": N, **cfg}
            try:
                fn = lambda: residual_attention_triton(q, view, None, scale, **cfg)  # noqa: E731
                out = fn()
                row["max_abs_diff_vs_default"] = (out.float() - ref.float()).abs().max().item()
                row["eager_s"] = do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e-3
                row["graph_s"] = graph_time(fn, do_bench)
            except Exception as e:  # noqa: BLE001 - a config that does not compile is a result too
                row["error"] = repr(e)[:300]
            results.append(row)
            if "graph_s" in row and (best is None or row["graph_s"] < best["graph_s"]):
                best = row
            print(json.dumps(row), flush=True)
        print("BEST", json.dumps(best), flush=True)
        del q, view
        torch.cuda.empty_cache()
    out = {"benchmark": "sweep_kernel", "time": time.strftime("%Y-%m-%d %H:%M:%S"), "device": device_info(),
           "rows": results}
    path = Path(args.out) if args.out else ROOT / "eval" / "results" / "sweep_kernel.json"
    path.write_text(json.dumps(out, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
