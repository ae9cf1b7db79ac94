"""Can a residual computed from the base pass alone, as ForkKV's is, carry what a fitted one carries?

    python -m eval.fidelity.regressed --adapter .fidelity/std/next_speaker_std_fresh --agent next_speaker \
        --ranks 8 16 32 --train-contexts 64 --out eval/results/fidelity_regressed_cpu.json

:mod:`eval.fidelity.fitted` showed that the best rank-r residual of a standard agent's own context K/V keeps most of
its exact-inference score while ForkKV's (``u = x_base·Aᵀ`` with the adapter's own k/v LoRA) keeps little. The fitted
residual needs the agent's own pass over each context. This script asks whether a map learnt once per agent, from
the base model's inputs of ``k_proj``/``v_proj`` (what ForkKV already reads at fork time) to the agent's K/V drift,
does as well on contexts it never saw: per layer and kind, a ridge regression of ``exact - base`` (K un-rotated) on
``x_base`` over training scenes, reduced to rank r (reduced-rank regression: the fitted values' top-r right singular
vectors), so that ``u = x_base·A_r`` (``[T, r]``) and ``B_r`` (``[H_kv·D, r]``), the same storage and the same kernel
as ForkKV's residual. Scored by teacher forcing on the held-out scenes beside the exact run, ForkKV and the oracle fit
of the same rank, with paired scene-bootstrap intervals; the held-out R² of each map is reported per kind.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import train as T
from .fitted import add_agent_args, eval_scenes, fitted_kv, load_agent, score_variants, summarize_hits
from .probe import question_contexts


def drift(exact, base, layers):
    """Per layer ``(x [T, d_in], dK [T, H_kv·D] un-rotated, dV [T, H_kv·D])`` of one context (fp32)."""
    from forkkv_hf.ops.rope import apply_rope

    out = []
    for (ke, ve), (kb, vb), layer in zip(exact, base, layers):
        n, H, Tn, D = kb.shape
        dk = apply_rope(ke - kb, layer.cos.to(kb.dtype), -layer.sin.to(kb.dtype))
        flat = lambda t: t[0].transpose(0, 1).reshape(Tn, H * D).float()  # noqa: E731
        out.append((layer.x_k[0].float(), layer.x_v[0].float(), flat(dk), flat(ve - vb)))
    return out


class Moments:
    """Running ``XᵀX``, ``XᵀY`` and ``YᵀY`` per layer and kind (k, v)."""

    def __init__(self):
        self.xx, self.xy, self.yy, self.n = {}, {}, {}, 0

    def add(self, d):
        for idx, (xk, xv, dk, dv) in enumerate(d):
            for kind, x, y in (("k", xk, dk), ("v", xv, dv)):
                key = (idx, kind)
                for store, val in ((self.xx, x.T @ x), (self.xy, x.T @ y), (self.yy, y.T @ y)):
                    store[key] = store.get(key, 0) + val.double()
        self.n += d[0][0].shape[0]


def reduced_rank_maps(m: Moments, ranks: list[int], ridge: float) -> dict:
    """``{rank: {(layer, kind): (A [d_in, r], B [width, r])}}``: ridge regression ``W = (XᵀX + λI)⁻¹XᵀY`` (λ =
    ``ridge`` times the mean diagonal of ``XᵀX``), cut to the top-r eigenvectors of ``WᵀXᵀXW`` (the fitted values'
    right singular vectors): ``A = W·B``, ``B`` orthonormal."""
    out = {r: {} for r in ranks}
    for key, xx in m.xx.items():
        lam = ridge * xx.diagonal().mean()
        W = torch.linalg.solve(xx + lam * torch.eye(xx.shape[0], dtype=xx.dtype), m.xy[key])
        evals, evecs = torch.linalg.eigh(W.T @ xx @ W)
        order = evecs[:, evals.argsort(descending=True)]
        for r in ranks:
            B = order[:, :r]
            out[r][key] = ((W @ B).float(), B.float())
    return out


def regressed_kv(base, layers, maps: dict):
    """Per layer ``(key, value)``: the base K/V plus ``rope(x_k·A_k·B_kᵀ)`` and ``x_v·A_v·B_vᵀ``."""
    from forkkv_hf.ops.rope import apply_rope

    out = []
    for idx, ((kb, vb), layer) in enumerate(zip(base, layers)):
        n, H, Tn, D = kb.shape
        res = []
        for kind, x in (("k", layer.x_k), ("v", layer.x_v)):
            A, B = maps[(idx, kind)]
            y = (x.float() @ A) @ B.T  # [n, T, H·D]
            res.append(y.reshape(n, Tn, H, D).transpose(1, 2).to(kb.dtype))
        out.append((kb + apply_rope(res[0], layer.cos.to(kb.dtype), layer.sin.to(kb.dtype)), vb + res[1]))
    return out


def held_out_r2(maps: dict, d) -> dict:
    """Sums for R² of each kind over one context: ``{kind: (residual sum of squares, total sum of squares)}``."""
    out = {"k": [0.0, 0.0], "v": [0.0, 0.0]}
    for idx, (xk, xv, dk, dv) in enumerate(d):
        for kind, x, y in (("k", xk, dk), ("v", xv, dv)):
            A, B = maps[(idx, kind)]
            out[kind][0] += ((x @ A) @ B.T - y).pow(2).sum().item()
            out[kind][1] += y.pow(2).sum().item()
    return out


def fitted_r2(d, ranks: list[int]) -> dict:
    """Sums for R² of the per-context rank-r SVD fit (the oracle): ``{rank: {kind: (residual SS, total SS)}}``."""
    out = {r: {"k": [0.0, 0.0], "v": [0.0, 0.0]} for r in ranks}
    for xk, xv, dk, dv in d:
        for kind, y in (("k", dk), ("v", dv)):
            s2 = torch.linalg.svdvals(y).pow(2)
            for r in ranks:
                out[r][kind][0] += s2[r:].sum().item()
                out[r][kind][1] += s2.sum().item()
    return out


def plot(path: Path, res: dict) -> Path:
    """Teacher-forced exact match against the rank: the per-scene fit and the regressed map (95% scene-bootstrap
    intervals), the exact run, ForkKV and adapter-blind sharing as lines; the PNG beside ``path``."""
    from ..plots import plt, save_figure

    summary = res["summary"]
    ranks = sorted(int(n.split("_")[1]) for n in summary if n.startswith("fitted_"))
    xs = list(range(len(ranks)))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for kind, color, label in (("fitted", "tab:blue", "best rank-r fit of each scene's own K/V (needs its pass)"),
                               ("regressed", "tab:orange", "rank-r map from the base pass, learnt on training scenes")):
        got = [summary[f"{kind}_{r}"]["answer_exact"] for r in ranks]
        ax.plot(xs, [g["mean"] for g in got], "o-", color=color, label=label)
        ax.fill_between(xs, [g["lo"] for g in got], [g["hi"] for g in got], color=color, alpha=0.15)
    for name, style, color, label in (("exact", "--", "k", "exact (own pass over the context)"),
                                      ("forkkv", ":", "r", f"ForkKV (its rank-{res['lora_rank']} residual)"),
                                      ("naive", "-.", "gray", "adapter-blind sharing")):
        ax.axhline(summary[name]["answer_exact"]["mean"], linestyle=style, color=color, label=label)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(r) for r in ranks])
    ax.set_xlabel("residual rank per layer and kind")
    ax.set_ylabel("answers reproduced, % (teacher-forced)")
    ax.set_title(f"Residuals computed without the agent's pass: {res['agent']}, standard adapter", fontsize=10)
    ax.legend(fontsize=7, loc="center right")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eval.fidelity.regressed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_agent_args(ap, [8, 16, 32])
    ap.add_argument("--train-contexts", type=int, default=64)
    ap.add_argument("--ridge", type=float, default=1e-3)
    args = ap.parse_args(argv)
    from forkkv_hf.training import TrainingContext
    from forkkv_hf.training.loss import context_kv

    from ..device import device_info

    t0 = time.perf_counter()
    data, pm, tok = load_agent(args)

    def kv_pair(text):
        ctx = TrainingContext(pm, T.context_ids(tok, text))
        return ctx, context_kv(pm, ctx, "agent", "exact"), context_kv(pm, ctx, "agent", "none")

    moments = Moments()
    with torch.no_grad():
        for c in tqdm(data["train"]["contexts"][: args.train_contexts], desc="drift of training scenes", unit="scene"):
            ctx, exact, base = kv_pair(c)
            moments.add(drift(exact, base, ctx.layers))
    maps = reduced_rank_maps(moments, args.ranks, args.ridge)

    by_ctx, text, ctx_ids = eval_scenes(data, args.agent, args.eval_contexts)
    names = ["exact", "forkkv", "naive"] + [f"{k}_{r}" for r in args.ranks for k in ("fitted", "regressed")]
    hits = {n: [] for n in names}
    r2 = {r: {"k": [0.0, 0.0], "v": [0.0, 0.0]} for r in args.ranks}
    r2_fit = {r: {"k": [0.0, 0.0], "v": [0.0, 0.0]} for r in args.ranks}
    with torch.no_grad():
        for ci in tqdm(ctx_ids, desc=f"held-out scenes {args.agent}", unit="scene"):
            rows = by_ctx.get(ci, [])
            if not rows:
                continue
            ctx, exact, base = kv_pair(text[ci])
            d = drift(exact, base, ctx.layers)
            for r, v in fitted_r2(d, args.ranks).items():
                for kind, (a, b) in v.items():
                    r2_fit[r][kind][0] += a
                    r2_fit[r][kind][1] += b
            kv = {"exact": exact, "naive": base, "forkkv": context_kv(pm, ctx, "agent", "kv")}
            for r in args.ranks:
                kv[f"fitted_{r}"] = fitted_kv(exact, base, ctx.layers, r)
                kv[f"regressed_{r}"] = regressed_kv(base, ctx.layers, maps[r])
                for kind, (a, b) in held_out_r2(maps[r], d).items():
                    r2[r][kind][0] += a
                    r2[r][kind][1] += b
            batch = T.collate([T.encode(tok, row) for row in rows], tok.pad_token_id)
            score_variants(pm, ctx, batch, "agent", kv, hits)
    summary = summarize_hits(hits, question_contexts(data, args.agent, ctx_ids))
    out = {"benchmark": "fidelity_regressed_residual", "device": device_info(),
           "time": time.strftime("%Y-%m-%d %H:%M:%S"), "params": {k: str(v) for k, v in vars(args).items()},
           "agent": args.agent, "lora_rank": pm.peft_config["agent"].r, "train_rows": moments.n,
           "held_out_r2": {r: {k: round(1 - a / b, 4) for k, (a, b) in v.items()} for r, v in r2.items()},
           "fitted_r2": {r: {k: round(1 - a / b, 4) for k, (a, b) in v.items()} for r, v in r2_fit.items()},
           "summary": summary, "per_question": hits, "seconds": round(time.perf_counter() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    plot(args.out, out)
    for n, s in summary.items():
        a, d = s["answer_exact"], s["minus_exact"]
        print(f"{n:>13}: {a['mean']:5.1f} [{a['lo']:.1f}, {a['hi']:.1f}]  vs exact {d['mean']:+.1f} "
              f"[{d['lo']:+.1f}, {d['hi']:+.1f}]")
    print("held-out R² (regressed):", out["held_out_r2"])
    print("R² of the per-scene fit:", out["fitted_r2"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
