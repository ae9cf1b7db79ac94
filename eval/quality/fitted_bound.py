"""How close could ANY residual of ForkKV's size bring a standard agent's context K/V to its exact K/V?

For each quality scenario's context (eval/quality/scenarios.py: 2K-token contexts) and each of the four trained
agents, the agent's own prefill is compared with the base pass per layer (:func:`~.context_passes.agent_prefill`):
the relative error of the context K and V that ForkKV uses (base + ``x_base·Aᵀ·Bᵀ``), of the base alone (naive
sharing), and of the best residual of the same size fitted to the agent's exact K/V (base + rank-r truncated SVD of
``exact - base``; by Eckart-Young no rank-r residual does better, ForkKV's included). Averaged over layers; no
generation. Writes ``eval/results/fitted_residual_bound_<device>.json``.

    python -m eval.quality.fitted_bound [--context-tokens 2048]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ..agents import AGENT_NAMES, load_agents
from ..bench.runner import RESULTS, slug
from ..device import device_info
from .context_passes import context_passes
from .scenarios import build_scenarios

KEYS = ("k_err_naive", "k_err_forkkv", "k_err_fitted", "v_err_naive", "v_err_forkkv", "v_err_fitted")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eval.quality.fitted_bound", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context-tokens", type=int, default=2048)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    t0 = time.time()
    pm, tok = load_agents()
    rows = []
    for sc in build_scenarios(tok, args.context_tokens, 1):
        ctx = torch.tensor(sc.context_ids, dtype=torch.long)
        layer_stats = context_passes(pm, ctx, AGENT_NAMES)[2]
        for name in AGENT_NAMES:
            stats = layer_stats[name]
            row = {"scenario": sc.name, "agent": name, "context_tokens": ctx.numel(),
                   **{k: sum(stats[k]) / len(stats[k]) for k in KEYS}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in KEYS}
    info = device_info()
    out = args.out or RESULTS / f"fitted_residual_bound_{slug(info.get('gpu', 'cpu'))}.json"
    res = {"benchmark": "fitted_residual_bound", "device": info, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
           "params": {"context_tokens": args.context_tokens, "agents": list(AGENT_NAMES)}, "rows": rows,
           "mean": mean, "seconds": time.time() - t0}
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print({k: round(v, 4) for k, v in mean.items()})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
