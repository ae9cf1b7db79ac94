"""Does a fit in attention's own metric keep more at the same rank than the plain truncated SVD?

    python -m eval.fidelity.weighted --adapter .fidelity/std/next_speaker_std_fresh --agent next_speaker \
        --ranks 8 16 32 --out eval/results/fidelity_weighted_cpu.json

``SharedContext.fit_residuals`` keeps the best rank-r fit of the agent's drift ``own − base`` in plain squared error.
Attention does not weigh every direction alike: a K error ``δk`` matters through ``q·δk`` and a V error ``δv``
through ``W_o·δv``. This script fits in those metrics instead, per layer: K, per KV head and rotary pair ``i``,
weighted by the mean energy of the agent's queries in that pair over its own pass (summed over the group's query
heads; RoPE rotates each pair, so over positions only a pair's energy survives); V, per KV head, by ``Σ_h W_o,hᵀ
W_o,h`` over the group's query heads (the layer's ``o_proj`` with the agent's LoRA merged). The weighted fit is the
rank-r SVD of ``drift · S`` mapped back by ``S⁻¹`` (``S`` the metric's square root): the same storage (``u [T, r]``,
``B [H_kv·D, r]``) and kernels. Both fits are scored by teacher forcing on the held-out scenes (as
:mod:`eval.fidelity.fitted`), with paired scene-bootstrap intervals.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from tqdm.auto import tqdm

from . import train as T
from .fitted import add_agent_args, eval_scenes, fitted_kv, load_agent, pct, score_variants, summarize_hits
from .probe import question_contexts


def metrics(pm, adapter: str, queries: dict, Hkv: int, D: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(S_k, S_v)``, each ``[H_kv·D, H_kv·D]``: the square roots of the K and V metrics (module doc)."""
    from forkkv_hf.peft.lora_factors import find_attention_modules

    out = []
    for idx, attn in sorted(find_attention_modules(pm).items()):
        q = queries[idx].float()  # [T, H·D], before RoPE
        H = q.shape[-1] // D
        G = H // Hkv
        qh = q.view(-1, H, D).pow(2).mean(0)  # [H, D]
        pair = qh[:, : D // 2] + qh[:, D // 2 :]  # rotary pairs (i, i + D/2)
        wk = torch.cat([pair, pair], -1).view(Hkv, G, D).sum(1).reshape(-1)  # [H_kv·D]
        o = attn.o_proj
        W = o.get_base_layer().weight.float() if hasattr(o, "get_base_layer") else o.weight.float()
        if hasattr(o, "lora_A") and adapter in o.lora_A:
            W = W + o.scaling[adapter] * o.lora_B[adapter].weight.float() @ o.lora_A[adapter].weight.float()
        Sv = torch.zeros(Hkv * D, Hkv * D)
        for g in range(Hkv):
            M = sum(W[:, h * D : (h + 1) * D].T @ W[:, h * D : (h + 1) * D] for h in range(g * G, (g + 1) * G))
            ev, vec = torch.linalg.eigh(M.double())
            Sv[g * D : (g + 1) * D, g * D : (g + 1) * D] = ((vec * ev.clamp_min(1e-12).sqrt()) @ vec.T).float()
        out.append((torch.diag(wk.clamp_min(1e-12).sqrt()), Sv))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eval.fidelity.weighted", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_agent_args(ap, [8, 16, 32])
    args = ap.parse_args(argv)
    from forkkv_hf.peft.lora_factors import find_attention_modules
    from forkkv_hf.training import TrainingContext
    from forkkv_hf.training.loss import context_kv

    from ..device import device_info

    t0 = time.perf_counter()
    data, pm, tok = load_agent(args)
    queries = {}
    hooks = [attn.q_proj.register_forward_hook(lambda m, a, o, i=idx: queries.__setitem__(i, o[0].detach()))
             for idx, attn in find_attention_modules(pm).items()]
    by_ctx, text, ctx_ids = eval_scenes(data, args.agent, args.eval_contexts)
    names = ["exact", "forkkv"] + [f"{k}_{r}" for r in args.ranks for k in ("rank", "weighted")]
    hits = {n: [] for n in names}
    with torch.no_grad():
        for ci in tqdm(ctx_ids, desc=f"weighted fits {args.agent}", unit="scene"):
            rows = by_ctx.get(ci, [])
            if not rows:
                continue
            ctx = TrainingContext(pm, T.context_ids(tok, text[ci]))
            queries.clear()
            exact = context_kv(pm, ctx, "agent", "exact")  # the hooks see the agent's own queries
            own_queries = dict(queries)
            base = context_kv(pm, ctx, "agent", "none")
            Hkv, D = exact[0][0].shape[1], exact[0][0].shape[3]
            metric = metrics(pm, "agent", own_queries, Hkv, D)
            kv = {"exact": exact, "forkkv": context_kv(pm, ctx, "agent", "kv")}
            for r in args.ranks:
                kv[f"rank_{r}"] = fitted_kv(exact, base, ctx.layers, r)
                kv[f"weighted_{r}"] = fitted_kv(exact, base, ctx.layers, r, metric)
            batch = T.collate([T.encode(tok, row) for row in rows], tok.pad_token_id)
            score_variants(pm, ctx, batch, "agent", kv, hits)
    for h in hooks:
        h.remove()
    clusters = question_contexts(data, args.agent, ctx_ids)
    summary = summarize_hits(hits, clusters, refs=("exact",))
    from .metrics import paired_difference_ci

    for r in args.ranks:
        summary[f"weighted_{r}"]["minus_rank"] = pct(paired_difference_ci(hits[f"weighted_{r}"], hits[f"rank_{r}"],
                                                                          clusters))
    out = {"benchmark": "fidelity_weighted_fit", "device": device_info(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
           "params": {k: str(v) for k, v in vars(args).items()}, "agent": args.agent, "summary": summary,
           "per_question": hits, "seconds": round(time.perf_counter() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    for n, s in summary.items():
        a, d = s["answer_exact"], s["minus_exact"]
        extra = f"  vs plain fit {s['minus_rank']['mean']:+.1f} [{s['minus_rank']['lo']:+.1f}, " \
                f"{s['minus_rank']['hi']:+.1f}]" if "minus_rank" in s else ""
        print(f"{n:>12}: {a['mean']:5.1f} [{a['lo']:.1f}, {a['hi']:.1f}]  vs exact {d['mean']:+.1f}{extra}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
