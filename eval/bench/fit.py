"""What fitting residuals costs (``SharedContext.fit_residuals``) on Llama-3.1-8B shapes: time, memory, bytes.

    python -m eval.bench.fit [--context 32768] [--agents 4] [--ranks 16 64] [--layers 32] [--out FILE]

Random bf16 weights (speed and memory do not depend on their values), N random rank-16 LoRA agents on
q/k/v/o/gate/up/down; one ``SharedContext.build`` (the base pass, timed), then ``fit_residuals`` of all N agents at
each rank (each agent's own pass over the context plus the per-layer fits, timed with a device sync), the
allocator's peak during the fit over what the model and the context already hold, the bytes of one agent's
residuals (fitted at rank r against ForkKV's rank-16 ``x·Aᵀ``) and, as a check on real sizes, the last layer's
relative K/V error of the fit against the agent's own K/V. Writes ``eval/results/fit_<gpu>.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..cli import positive_int

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.no_grad()
def last_layer_error(pm, context, fitted, name: str) -> dict:
    """Relative Frobenius error of the fitted last layer's K/V against the agent's own, and ForkKV's for scale."""
    from forkkv_hf.context.fitted import _own_pass
    from forkkv_hf.ops.naive import materialize_kv

    own = _own_pass(pm, context.token_ids.to(context.layers[0].key.device), name, 4096, False)[-1]
    out = {}
    for label, ctx in (("fitted", fitted), ("forkkv", context)):
        layer = ctx.fork([name]).layers[-1]
        dummy = layer.shared.key.new_zeros(1, layer.shared.key.shape[1], 0, layer.shared.key.shape[-1])
        view, _ = layer.update(dummy, dummy)
        K, V = materialize_kv(view)
        for kind, got, ref in (("k", K[0], own[0][0]), ("v", V[0], own[1][0])):
            out[f"{label}_{kind}"] = round(((got.float() - ref.float()).norm() / ref.float().norm()).item(), 5)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--agents", type=positive_int, default=4)
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tiny", action="store_true", help="toy sizes (a CPU check of the script)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    from forkkv_hf import SharedContext

    from ..device import device_info
    from .models import add_random_adapters, build_model, default_device, llama8b_config

    dev = default_device()
    dtype = torch.float32 if args.tiny else torch.bfloat16
    model = build_model(llama8b_config(layers=args.layers, tiny=args.tiny), dev, dtype)
    names = [f"agent{i}" for i in range(args.agents)]
    pm = add_random_adapters(model, names, rank=16, targets=TARGETS)
    pm.eval()
    T = 256 if args.tiny else args.context
    ids = torch.randint(3, model.config.vocab_size, (T,), generator=torch.Generator().manual_seed(0))
    cuda = dev == "cuda"
    t0 = time.perf_counter()
    context = SharedContext.build(pm, ids, names, progress=False)
    sync()
    out = {"benchmark": "fit_residuals", "device": device_info(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
           "params": {"model": "tiny" if args.tiny else "Llama-3.1-8B shapes", "layers": args.layers,
                      "dtype": str(dtype), "context": T, "agents": args.agents, "lora_rank": 16,
                      "lora_targets": list(TARGETS)},
           "build_s": round(time.perf_counter() - t0, 3), "forkkv_residual_bytes_per_agent":
               context.residual_bytes(names[0]), "base_bytes": context.base_bytes(), "rows": []}
    for rank in args.ranks:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        fitted = context.fit_residuals(pm, names, rank=rank, progress=True)
        sync()
        seconds = time.perf_counter() - t0
        row = {"rank": rank, "fit_s": round(seconds, 3), "fit_s_per_agent": round(seconds / args.agents, 3),
               "residual_bytes_per_agent": fitted.residual_bytes(names[0]),
               "retained_share_mean": {k: round(sum(x for a in names for x in fitted.fit_retained[a][k])
                                                 / sum(len(fitted.fit_retained[a][k]) for a in names), 4) for k in "kv"},
               "fit_peak_over_held_bytes": torch.cuda.max_memory_allocated() - before if cuda else None,
               "last_layer_relative_error": last_layer_error(pm, context, fitted, names[0])}
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
        del fitted
        if cuda:
            torch.cuda.empty_cache()
    path = args.out or Path("eval/results") / f"fit_{'tiny' if args.tiny else out['device'].get('gpu', 'cpu').lower().replace(' ', '_')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"build {out['build_s']} s; wrote {path}")


if __name__ == "__main__":
    main()
