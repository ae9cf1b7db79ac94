"""How much of a standard agent's exact-inference score can a residual cache of rank r keep, whatever its values?

    python -m eval.fidelity.fitted --adapter .fidelity/std/next_speaker_std_fresh --agent next_speaker \
        --ranks 0 8 16 32 64 192 [--split-ranks 64:16 ...] --out eval/results/fidelity_fitted_rank_cpu.json

For each held-out scene the agent's context K/V are taken three ways: its own pass over the scene (``exact``), the
base model's (what ForkKV shares) and, per rank r, the base K/V plus the best rank-r approximation of their
difference (truncated SVD of ``exact - base`` per layer over the ``[T, H_kv·D]`` matrix, K before RoPE): the same
storage as ForkKV's rank-r residual (``u [T, r]`` and ``B [H_kv·D, r]`` per layer and kind), and by Eckart-Young the
residual of that size closest to the agent's own K/V. Rank 0 is adapter-blind sharing; the full width (``H_kv·D``)
is the exact run. Each variant is scored by teacher forcing like :mod:`eval.fidelity.probe` (a question counts when
every answer token and the end token are the argmax: when greedy decoding reproduces the answer), on the same
questions, with paired scene-bootstrap intervals against the exact run; ForkKV's own residual (``x_base·Aᵀ``, rank
of the adapter) is scored beside them. A fitted residual needs the agent's own pass over the context, which ForkKV
exists to avoid: this is a bound on what any residual of that size could hold (``SharedContext.fit_residuals`` serves
it). ``--split-ranks K:V`` also fits K at rank K and V at rank V (variants ``rank_k<K>_v<V>``; the plot's second
panel shows every measured pair).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import train as T
from .probe import answer_logits_targets, question_contexts
from .tasks import read_jsonl


def _plain_fit(m: torch.Tensor, rank: int) -> torch.Tensor:
    """The rank-``rank`` truncated SVD of ``m`` (fp32; zeros at rank 0, ``m`` itself from its full rank on)."""
    m = m.float()
    if rank <= 0:
        return torch.zeros_like(m)
    if rank < min(m.shape):
        U, S, Vh = torch.linalg.svd(m, full_matrices=False)
        return (U[:, :rank] * S[:rank]) @ Vh[:rank]
    return m


def _metric_fit(m: torch.Tensor, rank: int, S: torch.Tensor) -> torch.Tensor:
    """The best rank-``rank`` fit of ``m`` in the metric whose square root is ``S`` (float64): the rank-``rank`` fit of
    ``m·S`` (its top right singular vectors, from the Gram matrix), mapped back by ``S⁻¹``."""
    S = S.double()
    a = m.double() @ S
    ev, vec = torch.linalg.eigh(a.T @ a)
    top = vec[:, ev.argsort(descending=True)[:rank]]
    return (a @ top) @ top.T @ torch.linalg.pinv(S)


def fitted_kv(exact, base, layers, rank: int | tuple[int, int], metric=None):
    """Per layer ``(key, value)`` ``[1, H_kv, T, D]``: ``base`` plus the rank-``rank`` truncated SVD of ``exact -
    base`` (keys un-rotated with the layer's RoPE tables first, fitted, rotated back; ``rank`` a pair: K's rank,
    V's rank). ``exact``/``base``: per layer
    ``(key, value)`` as :func:`forkkv_hf.training.context_kv` returns them; ``layers``: the TrainingContext's layers
    (their ``cos``/``sin``). ``metric``: per layer ``(S_k, S_v)`` ``[H_kv·D, H_kv·D]``, the square roots of metrics
    to fit each kind in (:mod:`eval.fidelity.weighted`); ``None``: plain squared error."""
    from forkkv_hf.ops.rope import apply_rope

    ranks = rank if isinstance(rank, tuple) else (rank, rank)
    out = []
    for idx, ((ke, ve), (kb, vb), layer) in enumerate(zip(exact, base, layers)):
        n, H, Tn, D = kb.shape
        cos, sin = layer.cos.to(kb.dtype), layer.sin.to(kb.dtype)
        dk = apply_rope(ke - kb, cos, -sin)  # RoPE_t is a rotation: its inverse is the rotation by -t
        fit = []
        for kind, d in enumerate((dk, ve - vb)):
            m = d.transpose(1, 2).reshape(n * Tn, H * D)
            r = ranks[kind]
            m = _plain_fit(m, r) if metric is None else _metric_fit(m, r, metric[idx][kind])
            fit.append(m.reshape(n, Tn, H, D).transpose(1, 2).to(kb.dtype))
        out.append((kb + apply_rope(fit[0], cos, sin), vb + fit[1]))
    return out


def logits_over(pm, context, batch: dict, adapter: str, kv) -> torch.Tensor:
    """Logits ``[B, L, V]`` of the suffix rows over the given per-layer context K/V (one context), the agent active:
    :func:`forkkv_hf.training.forkkv_logits` with the context K/V replaced."""
    from transformers import DynamicCache

    from forkkv_hf.compat import cache_kwargs
    from forkkv_hf.peft.lora_factors import transformers_model
    from forkkv_hf.training.loss import _activate, _suffix_tensors

    _activate(pm, adapter)
    base = transformers_model(pm)
    ids, _, full_mask, positions, _ = _suffix_tensors(batch, context, context.layers[0].key.device)
    cache = DynamicCache()
    for idx, (key, value) in enumerate(kv):
        cache.update(key.expand(ids.shape[0], -1, -1, -1), value.expand(ids.shape[0], -1, -1, -1), idx)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base
    hidden = decoder(input_ids=ids, attention_mask=full_mask, position_ids=positions, use_cache=True,
                     **cache_kwargs(cache)).last_hidden_state
    return base.get_output_embeddings()(hidden)


def add_agent_args(ap: argparse.ArgumentParser, ranks: list[int]) -> None:
    """The options every script of this family takes (the agent's saved adapter, the data, the ranks, the scenes)."""
    ap.add_argument("--adapter", type=Path, required=True, help="a saved standard adapter (save_pretrained folder)")
    ap.add_argument("--agent", default="next_speaker")
    ap.add_argument("--data", type=Path, default=Path(".fidelity/data"))
    ap.add_argument("--ranks", type=int, nargs="+", default=ranks)
    ap.add_argument("--split-ranks", nargs="*", default=[], metavar="K:V",
                    help="also the K residual at rank K and V's at rank V (variants rank_k<K>_v<V>)")
    ap.add_argument("--eval-contexts", type=int, default=24)
    ap.add_argument("--smoke", type=Path, metavar="TOKENIZER_DIR", help="a tiny random Llama (a check of the code)")
    ap.add_argument("--out", type=Path, required=True)


def load_agent(args):
    """``(data, peft_model, tokenizer)``: the data of ``--data`` and the model (SmolLM2, or the smoke model) with the
    adapter of ``--adapter`` loaded as ``"agent"``, active, in eval mode."""
    from peft import PeftModel

    from ..smollm2 import load_smollm2
    from .__main__ import smoke_model

    data = read_jsonl(args.data)
    model, tok = load_smollm2() if args.smoke is None else smoke_model(args.smoke)
    pm = PeftModel.from_pretrained(model, str(args.adapter), adapter_name="agent")
    pm.eval()
    pm.set_adapter("agent")
    return data, pm, tok


def eval_scenes(data, agent: str, count: int) -> tuple[dict, dict, list[int]]:
    """``(questions per scene, scene per index, the first count scene indices)`` of the evaluation split, for
    ``agent``'s questions."""
    by_ctx = {}
    for ex in data["eval"]["examples"]:
        if ex["agent"] == agent:
            by_ctx.setdefault(ex["context_index"], []).append(ex)
    text = {c["context_index"]: c for c in data["eval"]["contexts"]}
    return by_ctx, text, [c["context_index"] for c in data["eval"]["contexts"]][:count]


def score_variants(pm, ctx, batch: dict, adapter: str, kv: dict, hits: dict) -> dict:
    """Teacher-force ``batch`` over each variant's context K/V (``kv``: name -> per-layer K/V), appending to
    ``hits[name]`` whether each question's answer is reproduced; returns each variant's answer logits."""
    answer = {}
    for n in hits:
        lg, tg, rid = answer_logits_targets(logits_over(pm, ctx, batch, adapter, kv[n]).float(), batch["labels"])
        answer[n] = lg
        hit = (lg.argmax(-1) == tg).cpu()
        hits[n] += [float(hit[rid == i].all()) for i in range(batch["labels"].shape[0])]
    return answer


def pct(d: dict) -> dict:
    return {k: round(100 * d[k], 1) for k in ("mean", "lo", "hi")}


def summarize_hits(hits: dict, clusters: list, refs=("exact", "forkkv")) -> dict:
    """Per variant: its exact match and its paired differences from each of ``refs``, in points, with 95%
    scene-bootstrap intervals."""
    from .metrics import bootstrap_ci, paired_difference_ci

    return {n: {"answer_exact": pct(bootstrap_ci(h, clusters)),
                **{f"minus_{r}": pct(paired_difference_ci(h, hits[r], clusters)) for r in refs}}
            for n, h in hits.items()}


def split_ranks(specs) -> dict[str, tuple[int, int]]:
    """``["16:64", ...]`` -> ``{"rank_k16_v64": (16, 64), ...}``."""
    out = {}
    for spec in specs:
        k, sep, v = spec.partition(":")
        if not (sep and k.isdigit() and v.isdigit()):
            raise ValueError(f"--split-ranks takes K:V pairs of ints, got {spec!r}")
        out[f"rank_k{k}_v{v}"] = (int(k), int(v))
    return out


def score_ranks(pm, tok, data, agent: str, adapter: str, ranks: list[int], contexts: list[int],
                split: dict | None = None) -> dict:
    """Per variant (``exact``, ``forkkv``, ``naive``, ``rank_<r>``; ``split``: name -> (K rank, V rank), as
    :func:`split_ranks` names them): teacher-forced exact match per question and its
    mean; the largest differences of the full-width fit from the exact run (K/V and answer logits) and of rank 0 from
    adapter-blind sharing (logits)."""
    from forkkv_hf.training import TrainingContext
    from forkkv_hf.training.loss import context_kv

    by_ctx, text, _ = eval_scenes(data, agent, 0)
    split = split or {}
    names = ["exact", "forkkv", "naive"] + [f"rank_{r}" for r in ranks] + list(split)
    hits = {n: [] for n in names}
    worst_full = 0.0
    # the ends of the curve, checked on the logits: the full width is the exact run, rank 0 adapter-blind sharing
    ends = {"full_width_logits_max_abs_diff": 0.0, "rank_0_logits_max_abs_diff_vs_naive": 0.0,
            "naive_logits_max_abs_diff_vs_exact": 0.0}  # the scale: how far adapter-blind sharing is
    with torch.no_grad():
        for ci in tqdm(contexts, desc=f"fitted residuals {agent}", unit="scene"):
            rows = by_ctx.get(ci, [])
            if not rows:
                continue
            ctx = TrainingContext(pm, T.context_ids(tok, text[ci]))
            batch = T.collate([T.encode(tok, r) for r in rows], tok.pad_token_id)
            pm.set_adapter(adapter)
            exact = context_kv(pm, ctx, adapter, "exact")
            base = context_kv(pm, ctx, adapter, "none")
            kv = {"exact": exact, "forkkv": context_kv(pm, ctx, adapter, "kv"), "naive": base}
            width = exact[0][0].shape[1] * exact[0][0].shape[3]
            for name, pair in split.items():
                kv[name] = fitted_kv(exact, base, ctx.layers, pair)
            for r in ranks:
                kv[f"rank_{r}"] = fitted_kv(exact, base, ctx.layers, r)
                if r >= width:  # the full width reproduces the agent's own K/V
                    worst_full = max(worst_full, max((a - b).abs().max().item() for (ka, va), (kb, vb) in
                                                     zip(kv[f"rank_{r}"], exact) for a, b in ((ka, kb), (va, vb))))
            answer = score_variants(pm, ctx, batch, adapter, kv, hits)
            d = (answer["naive"] - answer["exact"]).abs().max().item()
            ends["naive_logits_max_abs_diff_vs_exact"] = max(ends["naive_logits_max_abs_diff_vs_exact"], d)
            for r in ranks:
                if r >= width:
                    d = (answer[f"rank_{r}"] - answer["exact"]).abs().max().item()
                    ends["full_width_logits_max_abs_diff"] = max(ends["full_width_logits_max_abs_diff"], d)
                if r == 0:
                    d = (answer["rank_0"] - answer["naive"]).abs().max().item()
                    ends["rank_0_logits_max_abs_diff_vs_naive"] = max(ends["rank_0_logits_max_abs_diff_vs_naive"], d)
    return {"per_question": hits, "answer_exact": {n: sum(h) / len(h) for n, h in hits.items()},
            "full_width_kv_max_abs_diff": worst_full, "kv_width": width, **ends}


def rank_pair_differences(hits: dict, clusters: list) -> dict:
    """Paired differences (points, 95% scene-bootstrap intervals) between fitted variants that share a K rank, share
    a V rank, or swap them: ``"rank_k64_v16 - rank_k16_v64"`` and so on, each pair once (the higher K rank first,
    then the higher V rank)."""
    from .metrics import paired_difference_ci

    name = fitted_pairs(hits)
    out = {}
    for a in sorted(name, reverse=True):
        for b in sorted(name, reverse=True):
            if a > b and (a[0] == b[0] or a[1] == b[1] or a == b[::-1]):
                out[f"{name[a]} - {name[b]}"] = pct(paired_difference_ci(hits[name[a]], hits[name[b]], clusters))
    return out


def fitted_pairs(names) -> dict[tuple[int, int], str]:
    """``{(K rank, V rank): variant}`` of the fitted variants among ``names``: ``rank_<r>`` is ``(r, r)`` (and wins
    over a ``rank_k<r>_v<r>`` of the same ranks), ``rank_k<K>_v<V>`` as :func:`split_ranks` names them."""
    out = {}
    for name in names:
        parts = name.split("_")[1:]
        if name.startswith("rank_") and len(parts) == 1 and parts[0].isdigit():
            out[(int(parts[0]),) * 2] = name
        elif name.startswith("rank_k") and len(parts) == 2:
            out.setdefault((int(parts[0][1:]), int(parts[1][1:])), name)
    return out


def _rank_grid(summary: dict) -> tuple[list[int], list[int], dict]:
    """``(K ranks, V ranks, {(k, v): score})`` of every fitted variant in ``summary`` (:func:`fitted_pairs`)."""
    cells = {kv: summary[name]["answer_exact"]["mean"] for kv, name in fitted_pairs(summary).items()}
    return sorted({k for k, _ in cells}), sorted({v for _, v in cells}), cells


def plot(path: Path, res: dict) -> Path:
    """Teacher-forced exact match against the residual's rank (95% scene-bootstrap intervals), with the exact run,
    ForkKV's own residual and adapter-blind sharing as lines; where K and V ranks were also fitted apart
    (``--split-ranks``), a second panel: the score of each measured (K rank, V rank). The PNG beside ``path``."""
    from ..plots import plt, save_figure

    summary = res["summary"]
    ranks = sorted(int(n.split("_")[1]) for n in summary if n.startswith("rank_") and n[5:].isdigit())
    mean = [summary[f"rank_{r}"]["answer_exact"]["mean"] for r in ranks]
    lo = [summary[f"rank_{r}"]["answer_exact"]["lo"] for r in ranks]
    hi = [summary[f"rank_{r}"]["answer_exact"]["hi"] for r in ranks]
    split = bool(res.get("split_ranks"))
    fig, axes = plt.subplots(1, 2 if split else 1, figsize=(12.4 if split else 6.4, 4.4), squeeze=False)
    ax = axes[0][0]
    xs = list(range(len(ranks)))  # evenly spaced: the ranks are roughly doubling
    ax.plot(xs, mean, "o-", color="tab:blue", label="base + best rank-r fit of the agent's own K/V")
    ax.fill_between(xs, lo, hi, color="tab:blue", alpha=0.15)
    for name, style, label in (("exact", "k--", "exact (own pass over the context)"),
                               ("forkkv", "r:", f"ForkKV (its rank-{res['lora_rank']} residual)")):
        ax.axhline(summary[name]["answer_exact"]["mean"], linestyle=style[1:], color=style[0], label=label)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(r) for r in ranks])
    ax.set_xlabel(f"residual rank per layer and kind (K/V width {res['kv_width']})")
    ax.set_ylabel("answers reproduced, % (teacher-forced)")
    ax.set_title(f"What a rank-r residual can keep: {res['agent']}, standard adapter", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    if split:
        ks, vs, cells = _rank_grid(summary)
        grid = [[cells.get((k, v), float("nan")) for v in vs] for k in ks]
        ax = axes[0][1]
        im = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto",
                       vmin=summary["naive"]["answer_exact"]["mean"], vmax=summary["exact"]["answer_exact"]["mean"])
        for (k, v), score in cells.items():
            ax.text(vs.index(v), ks.index(k), f"{score:.1f}", ha="center", va="center", fontsize=8,
                    color="white" if score < 0.5 * (im.norm.vmin + im.norm.vmax) else "black")
        ax.set_xticks(range(len(vs)), [str(v) for v in vs])
        ax.set_yticks(range(len(ks)), [str(k) for k in ks])
        ax.set_xlabel("V residual rank")
        ax.set_ylabel("K residual rank")
        ax.set_title(f"K and V fitted at their own ranks (exact {summary['exact']['answer_exact']['mean']:.1f}, "
                     f"ForkKV {summary['forkkv']['answer_exact']['mean']:.1f}); blank: not run", fontsize=10)
        fig.colorbar(im, ax=ax, label="answers reproduced, %")
    return save_figure(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eval.fidelity.fitted", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_agent_args(ap, [0, 8, 16, 32, 64, 192])
    args = ap.parse_args(argv)
    from ..device import device_info

    t0 = time.perf_counter()
    data, pm, tok = load_agent(args)
    ctx_ids = eval_scenes(data, args.agent, args.eval_contexts)[2]
    res = score_ranks(pm, tok, data, args.agent, "agent", args.ranks, ctx_ids, split_ranks(args.split_ranks))
    res["split_ranks"] = args.split_ranks
    clusters = question_contexts(data, args.agent, ctx_ids)
    res["summary"] = summarize_hits(res["per_question"], clusters)
    if args.split_ranks:
        res["paired_differences"] = rank_pair_differences(res["per_question"], clusters)
    out = {"benchmark": "fidelity_fitted_rank", "device": device_info(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
           "params": {k: str(v) for k, v in vars(args).items()}, "agent": args.agent,
           "lora_rank": pm.peft_config["agent"].r, **res, "seconds": round(time.perf_counter() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    plot(args.out, out)
    for n, s in res["summary"].items():
        a, d = s["answer_exact"], s["minus_exact"]
        print(f"{n:>10}: {a['mean']:5.1f} [{a['lo']:.1f}, {a['hi']:.1f}]  vs exact {d['mean']:+.1f} "
              f"[{d['lo']:+.1f}, {d['hi']:+.1f}]")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
