"""Plots from the JSON results in eval/results/ (never from numbers typed by hand).

    python eval/plot_results.py            # writes eval/results/*.png for every result file it knows
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def save_figure(fig, path: Path, dpi: int = 120) -> Path:
    """Lay out ``fig``, write it beside its result file (``path`` with ``.png``), close it; returns the PNG's path."""
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def _load(pattern):
    return [(p, json.loads(p.read_text())) for p in sorted(RESULTS.glob(pattern))]


def plot_kernel(path, res):
    rows = res["rows"]
    contexts = sorted({r["context"] for r in rows})
    fig, axes = plt.subplots(1, len(contexts), figsize=(4.5 * len(contexts), 3.8), sharey=True)
    axes = axes if len(contexts) > 1 else [axes]
    for ax, T in zip(axes, contexts):
        rs = sorted((r for r in rows if r["context"] == T), key=lambda r: r["agents"])
        n = [r["agents"] for r in rs]
        for key, label, style in [("forkkv_s", "forkkv (Triton)", "o-"), ("sdpa_s", "SDPA, per-agent K/V", "s--"),
                                  ("sdpa_flash_s", "FlashAttention-2 (SDPA)", "^:"), ("floor_s", "floor", "k-")]:
            pts = [(x, r[key] * 1e6) for x, r in zip(n, rs) if key in r]
            if pts:
                ax.plot(*zip(*pts), style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"shared context {T // 1024}K")
        ax.set_xlabel("agents (one decode query each)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("one layer, µs")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Decode attention, Llama-3.1-8B layer, r=16 — {res['device'].get('gpu')}", fontsize=10)
    return save_figure(fig, path)


def plot_lora(path, res):
    rows = res["rows"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for path_name, mix, style in [("peft", "distinct", "s--"), ("batched", "distinct", "o-"),
                                  ("peft", "one_adapter", "s:"), ("batched", "one_adapter", "o:")]:
        rs = sorted((r for r in rows if r["path"] == path_name and r["mix"] == mix), key=lambda r: r["rows"])
        if rs:
            ax.plot([r["rows"] for r in rs], [r["generate_tok_s"] for r in rs], style,
                    label=f"{'PEFT loop' if path_name == 'peft' else 'batched LoRA'}, "
                          f"{'N distinct adapters' if mix == 'distinct' else 'one adapter'}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("rows (agents)")
    ax.set_ylabel("generate decode tokens/s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Mixed-adapter decode, 8B shapes, r=16 — {res['device'].get('gpu')}", fontsize=9)
    return save_figure(fig, path)


def plot_e2e(path, res):
    rows = [r for r in res["rows"] if not r.get("oom")]
    contexts = sorted({r["context"] for r in rows})
    cap = res.get("capacity") or {}
    fig, axes = plt.subplots(1, 3 if len(cap) == 2 else 2, figsize=(15 if len(cap) == 2 else 10, 3.8))
    for T in contexts:
        for system, style in (("baseline", "s--"), ("forkkv", "o-")):
            rs = sorted((r for r in rows if r["system"] == system and r["context"] == T), key=lambda r: r["agents"])
            if not rs:
                continue
            n = [r["agents"] for r in rs]
            label = f"{'PEFT + DynamicCache' if system == 'baseline' else 'forkkv'}, {T // 1024}K"
            axes[0].plot(n, [r["decode_tok_s"] for r in rs], style, label=label)
            axes[1].plot(n, [r["peak_gib"] for r in rs], style, label=label)
    axes[0].set_yscale("log")
    axes[1].axhline(res["budget_gib"], color="gray", lw=0.8, ls=":", label=f"budget {res['budget_gib']:.0f} GiB")
    if len(cap) == 2:
        ax = axes[2]
        at = {s: next(r for r in rows if r["system"] == s and r["context"] == c["context"]
                      and r["agents"] == c["max_agents_run"]) for s, c in cap.items()}
        names = ["baseline", "forkkv"]
        bars = ax.bar([0, 1], [cap[s]["max_agents_run"] for s in names], color=["tab:gray", "tab:blue"])
        for b, s in zip(bars, names):
            ax.annotate(f"{cap[s]['max_agents_run']} agents\n{at[s]['decode_tok_s']:.0f} tok/s",
                        (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
        ax.set_xticks([0, 1], ["PEFT + DynamicCache", "forkkv"])
        ax.set_ylabel("agents that fit")
        ax.set_yscale("log")
        ax.set_ylim(1, max(c["max_agents_run"] for c in cap.values()) * 4)
        ax.set_title(f"capacity at {cap['forkkv']['context'] // 1024}K context, {res['budget_gib']:.0f} GiB budget",
                     fontsize=9)
    for ax, yl in zip(axes, ("decode tokens/s (all agents)", "peak GPU memory, GiB")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("agents")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"End to end, Llama-3.1-8B shapes, 64-token prompts, 128 new tokens — {res['device'].get('gpu')}",
                 fontsize=10)
    return save_figure(fig, path)


def main():
    made = []
    for path, res in _load("bench_kernel_*.json"):
        made.append(plot_kernel(path, res))
    for path, res in _load("bench_lora_*.json"):
        if len({r["rows"] for r in res["rows"]}) >= 3:  # the 1-2 row-count reruns are README tables
            made.append(plot_lora(path, res))
    for path, res in _load("bench_e2e_*.json"):
        if "rows" in res:  # the device-map comparison (two runs in one file) is a README table, not a plot
            made.append(plot_e2e(path, res))
    for path, res in _load("quality*.json"):
        from quality import plot_quality  # noqa: PLC0415 - only when quality results exist

        made.append(plot_quality(path, res))
    for m in made:
        print("wrote", m)


if __name__ == "__main__":
    main()
