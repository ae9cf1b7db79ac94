"""Every plot of the results, drawn from the JSON files in eval/results/ (never from numbers typed by hand).

    python -m eval.plots [--results DIR]     # writes <result>.png beside every result file it draws

Benchmark results (the one schema, :mod:`eval.bench.schema`) are drawn by benchmark: ``bench_kernel``, ``bench_lora``
and ``bench_e2e`` sweeps (a file whose lines would all have fewer than three points is a rerun for a README table,
not drawn), ``bench_decode`` files that record each call's garbage collections (every timed call; with the profile,
the step's GPU time by kernel family), and
``profile_kernel`` results (a call's stages, stacked); ``quality*.json`` is the fidelity report of
``python -m eval.quality``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .bench.runner import RESULTS  # noqa: E402
from .bench.schema import BenchResult, load  # noqa: E402

VARIANT_LABELS = {"exact": "exact (own prefill)", "forkkv": "forkkv (K+V residual)", "forkkv_v": "forkkv, V only",
                  "naive": "naive share (base K/V)"}


def save_figure(fig, path: Path, dpi: int = 120) -> Path:
    """Lay out ``fig``, write it beside its result file (``path`` with ``.png``), close it; returns the PNG's path."""
    fig.tight_layout()
    out = Path(path).with_suffix(".png")
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def plot_kernel(path, res: BenchResult) -> Path:
    rows = res.rows
    queries = res.params.get("shape", {}).get("queries_per_row", 1)
    calls, per_agent = ("Decode", "one decode query each") if queries == 1 else ("Extend", f"{queries} query positions each")
    contexts = sorted({r["context"] for r in rows})
    fig, axes = plt.subplots(1, len(contexts), figsize=(max(4.5 * len(contexts), 6.5), 3.8), sharey=True)
    axes = axes if len(contexts) > 1 else [axes]
    for ax, T in zip(axes, contexts):
        rs = sorted((r for r in rows if r["context"] == T), key=lambda r: r["agents"])
        n = [r["agents"] for r in rs]
        for key, label, style in [("forkkv_s", "forkkv, K+V residuals", "o-"), ("sdpa_s", "SDPA, per-agent K/V", "s--"),
                                  ("sdpa_flash_s", "FlashAttention-2 (SDPA)", "^:"), ("floor_s", "floor", "k-")]:
            pts = [(x, r[key] * 1e6) for x, r in zip(n, rs) if key in r]
            if pts:
                ax.plot(*zip(*pts), style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"shared context {T // 1024}K")
        ax.set_xlabel(f"agents ({per_agent})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("one layer, µs")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{calls} attention, Llama-3.1-8B layer, r=16 — {res.device.get('gpu')}", fontsize=10)
    return save_figure(fig, path)


def plot_lora(path, res: BenchResult) -> Path:
    rows = res.rows
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
    ax.set_title(f"Mixed-adapter decode, 8B shapes, r=16 — {res.device.get('gpu')}", fontsize=9)
    return save_figure(fig, path)


def plot_e2e(path, res: BenchResult) -> Path:
    rows = [r for r in res.rows if not r.get("oom")]
    contexts = sorted({r["context"] for r in rows})
    cap = res.extra.get("capacity") or {}
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
    axes[1].axhline(res.params["budget_gib"], color="gray", lw=0.8, ls=":", label=f"budget {res.params['budget_gib']:.0f} GiB")
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
        ax.set_title(f"capacity at {cap['forkkv']['context'] // 1024}K context, {res.params['budget_gib']:.0f} GiB budget",
                     fontsize=9)
    for ax, yl in zip(axes, ("decode tokens/s (all agents)", "peak GPU memory, GiB")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("agents")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"End to end, Llama-3.1-8B shapes, 64-token prompts, 128 new tokens — {res.device.get('gpu')}",
                 fontsize=10)
    return save_figure(fig, path)


def plot_quality(path, result: dict) -> Path:
    """The fidelity report's figure (``python -m eval.quality``), a PNG next to the JSON ``path``: KL and agreement per agent and variant, similarity and K/V error per layer."""
    path = Path(path)
    s = result["summary"]
    names = list(s["per_agent"])
    variants = [v for v in result["config"]["variants"] if v != "exact"]
    colors = {"forkkv": "tab:blue", "forkkv_v": "tab:green", "naive": "tab:red", "exact": "tab:gray"}
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    width = 0.8 / len(variants)
    for ax, key, ylabel in ((axes[0, 0], "kl", "mean KL(exact || variant) per token"),
                            (axes[0, 1], "token_agreement", "greedy-token agreement with exact")):
        for j, v in enumerate(variants):
            xs = [i + (j - (len(variants) - 1) / 2) * width for i in range(len(names))]
            ax.bar(xs, [s["per_agent"][a][v][key] for a in names], width, label=VARIANT_LABELS[v], color=colors[v])
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
    axes[0, 0].set_yscale("log")
    axes[0, 1].set_ylim(0, 1.02)
    axes[0, 0].legend(fontsize=8)
    layers = s["layers"]
    for a in names:
        axes[1, 0].plot(layers[a]["kv_input_cosine"], "o-", ms=3, label=f"{a} (k/v input)")
        axes[1, 0].plot(layers[a]["residual_cosine"], ":", color=axes[1, 0].lines[-1].get_color(), lw=1)
    axes[1, 0].ticklabel_format(axis="y", useOffset=False)
    axes[1, 0].set_xlabel("layer")
    axes[1, 0].set_ylabel("cosine with base model's states")
    axes[1, 0].set_title("agents' states over the shared context (dotted: residual stream)", fontsize=9)
    axes[1, 0].legend(fontsize=8)
    axes[1, 0].grid(alpha=0.3)
    for kind, style in (("k", "-"), ("v", "--")):
        for variant, color in (("forkkv", "tab:blue"), ("naive", "tab:red")):
            err = [sum(layers[a][f"{kind}_err_{variant}"][l] for a in names) / len(names)
                   for l in range(len(layers[names[0]]["kv_input_cosine"]))]
            axes[1, 1].plot(err, style, color=color, label=f"{kind.upper()}, {variant}")
    axes[1, 1].set_yscale("log")
    axes[1, 1].set_xlabel("layer")
    axes[1, 1].set_ylabel("relative error of context K/V vs exact (mean of agents)")
    axes[1, 1].legend(fontsize=8)
    axes[1, 1].grid(alpha=0.3)
    tokens = sorted({sc["context_tokens"] for sc in result["scenarios"]})
    fig.suptitle(f"ForkKV fidelity, SmolLM2-135M + 4 trained LoRA agents, shared contexts of {tokens} tokens, "
                 f"{sum(len(sc['rows']) for sc in result['scenarios'])} prompts, greedy ({result['machine']['cpu']})",
                 fontsize=9)
    return save_figure(fig, path, dpi=110)


#: the stages of a ResidualAttention call, as eval.bench.profile_kernel names them, and their colours
PROFILE_STAGES = (("k_pass", "K pass", "tab:red"), ("shared", "shared part", "tab:blue"),
                  ("merge", "private part + merge", "tab:green"), ("other", "other", "tab:gray"))


def plot_profile(path, res: BenchResult) -> Path:
    """GPU time per stage of one call, stacked, per variant, with each variant's floor: one panel per (context, agent
    count), each on its own linear scale."""
    panels = sorted({(r["context"], r["agents"]) for r in res.rows})
    names = {"kv": "K+V", "v": "V only", "base": "base only"}
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels) + 1, 3.8), squeeze=False)
    labels = set()
    for ax, (T, N) in zip(axes[0], panels):
        rows = {r["variant"]: r for r in res.rows if (r["context"], r["agents"]) == (T, N)}
        variants = [v for v in names if v in rows]
        for x, v in enumerate(variants):
            r, bottom = rows[v], 0.0
            for key, label, colour in PROFILE_STAGES:
                us = r["kernel_s"].get(key, 0.0) * 1e6
                if us > 0:
                    ax.bar(x, us, bottom=bottom, color=colour, label=None if label in labels else label)
                    labels.add(label)
                    bottom += us
            if "floor_s" in r:
                ax.plot([x - 0.4, x + 0.4], [r["floor_s"] * 1e6] * 2, "k-", lw=2,
                        label=None if "floor" in labels else "floor")
                labels.add("floor")
            ax.text(x, bottom, f"{bottom:.0f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(variants)), [names[v] for v in variants], fontsize=7)
        ax.set_title(f"{T // 1024}K context, {N} agent{'s' if N > 1 else ''}", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("one layer, µs of GPU time")
    axes[0][-1].legend(*axes[0][0].get_legend_handles_labels(), fontsize=7, loc="upper right")  # over short bars
    fig.suptitle(f"Where a ResidualAttention call's time goes, stage by stage — {res.device.get('gpu')}", fontsize=10)
    return save_figure(fig, path)


#: eval.bench.kpass_ablate's variants as the plot names them (what each leaves out of the K pass's step)
ABLATE_NAMES = {"library": "library's pass", "all": "replica (all parts)", "all_masked": "+ the library's masks",
                "all_gather": "+ the library's gathers", "no_store": "no per-tile store",
                "no_load": "no per-tile loads", "no_rot": "no rotation", "no_score": "no score MMA (stand-in)",
                "no_rot_store": "no rotation, no store", "mma_only": "MMAs only", "rebuild_only": "rebuild MMA only"}


def plot_kpass_ablate(path, res: BenchResult) -> Path:
    """The K pass with parts of its step left out: one panel per agent count, µs per variant, the replica's time
    (every part) as a dashed line."""
    counts = sorted({r["agents"] for r in res.rows})
    fig, axes = plt.subplots(1, len(counts), figsize=(5.0 * len(counts), 3.6), squeeze=False)
    for ax, n in zip(axes[0], counts):
        rows = {r["variant"]: r["us"] for r in res.rows if r["agents"] == n}
        names = [v for v in ABLATE_NAMES if v in rows]
        ax.barh(range(len(names)), [rows[v] for v in names],
                color=["tab:gray" if v in ("library", "all") else "tab:blue" for v in names])
        for y, v in enumerate(names):
            ax.text(rows[v], y, f" {rows[v]:.0f}", va="center", fontsize=7)
        ax.axvline(rows.get("all", 0), color="k", ls="--", lw=1)
        ax.set_yticks(range(len(names)), [ABLATE_NAMES[v] for v in names], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.15 * max(rows.values()))
        ax.set_xlabel("K pass, µs of GPU time (one layer)")
        ax.set_title(f"{res.params.get('context', 0) // 1024}K context, {n} agents", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(f"The K pass's step taken apart — {res.device.get('gpu')}", fontsize=10)
    return save_figure(fig, path)


#: the ForkKV attention's kernels in a step's breakdown (name fragments, as eval.bench.measure.KERNEL_FAMILIES)
ATTENTION_PARTS = (("K pass", "_kres_scores"), ("shared part", "_cascade_shared"), ("private part + merge",
                                                                                     "_private_merge"))


def _step_breakdown(ax, r: dict) -> None:
    """One decode step's GPU time by kernel family as a stacked bar, the ForkKV attention split into its kernels
    (the profiled rows' ``gpu_ms_by_family`` and ``kernels_per_step_by_name``)."""
    families = dict(r["gpu_ms_by_family"])
    attention = families.pop("forkkv attention kernels", 0.0)
    parts = []
    for label, fragment in ATTENTION_PARTS:
        ms = sum(k["us"] for name, k in r.get("kernels_per_step_by_name", {}).items() if fragment in name) / 1e3
        if ms > 0:
            parts.append((label, ms))
            attention -= ms
    if attention > 0.05:
        parts.append(("other ForkKV attention", attention))
    parts += sorted(((k, v) for k, v in families.items() if v > 0.05), key=lambda kv: -kv[1])
    left, colours = 0.0, plt.get_cmap("tab10").colors
    for i, (label, ms) in enumerate(parts):
        ax.barh(0, ms, left=left, color=colours[i % len(colours)], label=f"{label}: {ms:.1f}")
        left += ms
    ax.set_yticks([])
    ax.set_xlabel(f"GPU ms per decode step (profiled; busy {r['gpu_busy_ms']:.1f}, step {r['step_ms']:.1f})")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=2, frameon=False)
    ax.grid(alpha=0.3, axis="x")


def plot_decode_calls(path, res: BenchResult) -> Path:
    """Each timed ``generate`` call of a decode benchmark in the order run (the short and the long call of each
    repetition), with the part of it Python's full garbage collections took stacked on top in red and each call's
    marked decode step (``step_ms_marked_each``) written above it: one panel per row; below it, where the row was
    profiled, its step's GPU time by kernel family."""
    rows = [r for r in res.rows if "full_gc_each_call" in r]
    profiled = any("gpu_ms_by_family" in r for r in rows)
    fig, axes = plt.subplots(2 if profiled else 1, len(rows), figsize=(5.2 * len(rows), 6.4 if profiled else 3.6),
                             squeeze=False, gridspec_kw={"height_ratios": [3, 1]} if profiled else None)
    for ax, r in zip(axes[0], rows):
        calls = [(r[key], r["generate_each_s"][key][i], r["full_gc_each_call"][key][i][1],
                  r.get("step_ms_marked_each", {}).get(key, [None] * r["reps"])[i])
                 for i in range(r["reps"]) for key in ("n1", "n2")]  # (new tokens, seconds, in full GCs, marked ms)
        labelled = False
        for x, (n, t, gc_s, marked) in enumerate(calls):
            colour = "tab:blue" if n == r["n1"] else "tab:green"
            ax.bar(x, t - gc_s, color=colour, label=f"{n} new tokens" if x < 2 else None)
            if gc_s > 0:
                ax.bar(x, gc_s, bottom=t - gc_s, color="tab:red", label=None if labelled else "full garbage collection")
                labelled = True
            notes = ([f"GC {gc_s:.2f} s"] if gc_s > 0 else []) + ([f"{marked:.1f} ms/step"] if marked else [])
            if notes:
                ax.text(x, t, "\n".join(notes), ha="center", va="bottom", fontsize=7)
        ax.set_ylim(0, 1.45 * max(t for _, t, _, _ in calls))
        ax.set_xticks(range(len(calls)), [str(i // 2 + 1) for i in range(len(calls))], fontsize=7)
        ax.set_xlabel("repetition")
        ax.set_title(f"{r['system']}, {r['agents']} agents, {r['context'] // 1024}K", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, loc="upper left", ncol=2)
    for ax, r in zip(axes[1] if profiled else [], rows):
        if "gpu_ms_by_family" in r:
            _step_breakdown(ax, r)
        else:
            ax.axis("off")
    axes[0][0].set_ylabel("generate call, s")
    frozen = "gc.freeze() after the warm-up" if res.params.get("freeze_gc") else "the collector as Python sets it"
    fig.suptitle(f"Timed decode calls, {frozen}\n{res.device.get('gpu', 'CPU')}", fontsize=10)
    return save_figure(fig, path)


#: benchmark -> (its plot, the row fields that name one line of it, the row field along the x axis)
BENCH_PLOTS = {"bench_kernel": (plot_kernel, ("context",), "agents"),
               "bench_lora": (plot_lora, ("path", "mix"), "rows"),
               "bench_e2e": (plot_e2e, ("system", "context"), "agents")}


def is_sweep(res: BenchResult, series: tuple[str, ...], axis: str) -> bool:
    """Whether some line of the plot would have three points or more (else the file is a rerun of a few cases
    for a README table)."""
    points: dict[tuple, set] = {}
    for r in res.rows:
        points.setdefault(tuple(r.get(k) for k in series), set()).add(r.get(axis))
    return any(len(xs) >= 3 for xs in points.values())


def plot_all(results: Path = RESULTS) -> list[Path]:
    """Draw every result file in ``results`` that has a plot; returns the PNGs written."""
    made = []
    for path in sorted(results.glob("bench_*.json")):
        res = load(path)
        if res.benchmark in BENCH_PLOTS:
            plot, series, axis = BENCH_PLOTS[res.benchmark]
            if is_sweep(res, series, axis):
                made.append(plot(path, res))
        elif res.benchmark == "bench_decode" and any("full_gc_each_call" in r for r in res.rows):
            made.append(plot_decode_calls(path, res))
    for path in sorted(results.glob("profile_kernel*.json")):
        made.append(plot_profile(path, load(path)))
    for path in sorted(results.glob("kpass_ablate*.json")):
        made.append(plot_kpass_ablate(path, load(path)))
    for path in sorted(results.glob("quality*.json")):
        made.append(plot_quality(path, json.loads(path.read_text())))
    return made


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of result files (default eval/results)")
    args = ap.parse_args(argv)
    if not args.results.is_dir():
        raise SystemExit(f"--results {args.results}: no such folder")
    made = plot_all(args.results)
    for m in made:
        print("wrote", m)
    if not made:
        print(f"no result file under {args.results} has a plot (bench_*.json sweeps, profile_kernel*.json, "
              "kpass_ablate*.json, quality*.json)")


if __name__ == "__main__":
    main()
