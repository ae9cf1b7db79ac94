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
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import train as T
from .fitted import fitted_kv, logits_over
from .probe import answer_logits_targets, question_contexts
from .tasks import read_jsonl


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


def weighted_kv(exact, base, layers, rank: int, metric):
    """:func:`eval.fidelity.fitted.fitted_kv` with each kind's drift fitted in its metric."""
    from forkkv_hf.ops.rope import apply_rope

    out = []
    for (ke, ve), (kb, vb), layer, S_pair in zip(exact, base, layers, metric):
        n, H, Tn, D = kb.shape
        cos, sin = layer.cos.to(kb.dtype), layer.sin.to(kb.dtype)
        fit = []
        for d, S in zip((apply_rope(ke - kb, cos, -sin), ve - vb), S_pair):
            S = S.double()
            a = d.transpose(1, 2).reshape(n * Tn, H * D).double() @ S
            ev, vec = torch.linalg.eigh(a.T @ a)  # the top right singular vectors of a, from its Gram matrix
            top = vec[:, ev.argsort(descending=True)[:rank]]
            m = (a @ top) @ top.T @ torch.linalg.pinv(S)
            fit.append(m.reshape(n, Tn, H, D).transpose(1, 2).to(kb.dtype))
        out.append((kb + apply_rope(fit[0], cos, sin), vb + fit[1]))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eval.fidelity.weighted", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", type=Path, required=True, help="a saved standard adapter (save_pretrained folder)")
    ap.add_argument("--agent", default="next_speaker")
    ap.add_argument("--data", type=Path, default=Path(".fidelity/data"))
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--eval-contexts", type=int, default=24)
    ap.add_argument("--smoke", type=Path, metavar="TOKENIZER_DIR", help="a tiny random Llama (a check of the code)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    from peft import PeftModel

    from forkkv_hf.peft.lora_factors import find_attention_modules
    from forkkv_hf.training import TrainingContext
    from forkkv_hf.training.loss import context_kv

    from ..device import device_info
    from ..smollm2 import load_smollm2
    from .__main__ import smoke_model
    from .metrics import bootstrap_ci, paired_difference_ci

    t0 = time.perf_counter()
    data = read_jsonl(args.data)
    model, tok = load_smollm2() if args.smoke is None else smoke_model(args.smoke)
    pm = PeftModel.from_pretrained(model, str(args.adapter), adapter_name="agent")
    pm.eval()
    pm.set_adapter("agent")
    queries = {}
    hooks = [attn.q_proj.register_forward_hook(lambda m, a, o, i=idx: queries.__setitem__(i, o[0].detach()))
             for idx, attn in find_attention_modules(pm).items()]
    by_ctx = {}
    for ex in data["eval"]["examples"]:
        if ex["agent"] == args.agent:
            by_ctx.setdefault(ex["context_index"], []).append(ex)
    text = {c["context_index"]: c for c in data["eval"]["contexts"]}
    ctx_ids = [c["context_index"] for c in data["eval"]["contexts"]][: args.eval_contexts]
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
                kv[f"weighted_{r}"] = weighted_kv(exact, base, ctx.layers, r, metric)
            batch = T.collate([T.encode(tok, row) for row in rows], tok.pad_token_id)
            for n in names:
                lg, tg, rid = answer_logits_targets(logits_over(pm, ctx, batch, "agent", kv[n]).float(),
                                                    batch["labels"])
                hit = (lg.argmax(-1) == tg).cpu()
                hits[n] += [float(hit[rid == i].all()) for i in range(len(rows))]
    for h in hooks:
        h.remove()
    clusters = question_contexts(data, args.agent, ctx_ids)
    pct = lambda d: {k: round(100 * d[k], 1) for k in ("mean", "lo", "hi")}  # noqa: E731
    summary = {n: {"answer_exact": pct(bootstrap_ci(h, clusters)),
                   "minus_exact": pct(paired_difference_ci(h, hits["exact"], clusters))} for n, h in hits.items()}
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
