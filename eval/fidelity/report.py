"""The benchmark's result file (``eval/results/fidelity_<device>.json``, schema ``forkkv-bench/1``), its tables
and its plot.

One row per (training kind, inference variant, agent), ``agent = "all"`` pooling the three: exact match, F1, KL and
teacher-forced top-1 against the same adapters' exact run, identical greedy outputs, each mean with its 95%
context-cluster bootstrap interval (:mod:`eval.fidelity.metrics`), and the paired difference in exact match and F1
against standard adapters under exact inference (the quality a user has today without sharing).
"""

from __future__ import annotations

import math
from pathlib import Path

from ..bench.schema import BenchResult
from .metrics import OUTPUT_CHARS, bootstrap_ci, paired_difference_ci
from .tasks import AGENTS

BASELINE = ("standard", "exact")
#: display names of training kinds where the kind's own name would mislead (others: the name itself)
LABELS = {"distill": "distilled"}
METRICS = ("em", "f1", "rouge_l", "kl", "tf_top1", "identical")
#: the repository's evaluate module of exact match, F1 and ROUGE-L (eval/metrics/context_qa)
METRIC_MODULE = Path(__file__).resolve().parents[1] / "metrics" / "context_qa"
#: the paired comparisons the issue asks about: (name, (training, inference) of a, of b); each reports mean(a - b)
#: (a result file holds those whose two sides were evaluated)
COMPARISONS = (
    ("forkkv-trained@forkkv - standard@exact", ("forkkv", "forkkv"), ("standard", "exact")),
    ("forkkv-trained@forkkv - standard@forkkv", ("forkkv", "forkkv"), ("standard", "forkkv")),
    ("forkkv-trained@forkkv - standard@naive", ("forkkv", "forkkv"), ("standard", "naive")),
    ("standard@forkkv - standard@forkkv_v (K residual, standard)", ("standard", "forkkv"), ("standard", "forkkv_v")),
    ("forkkv-trained@forkkv - forkkv-trained@forkkv_v (K residual, forkkv-trained)", ("forkkv", "forkkv"),
     ("forkkv", "forkkv_v")),
    ("distilled@forkkv - standard@exact", ("distill", "forkkv"), ("standard", "exact")),
    ("distilled@forkkv - forkkv-trained@forkkv", ("distill", "forkkv"), ("forkkv", "forkkv")),
    ("distilled@forkkv - standard@forkkv", ("distill", "forkkv"), ("standard", "forkkv")),
)


def summarize(records: list[dict], n_boot: int = 2000) -> list[dict]:
    """Rows of the result file from the per-prompt records of :func:`eval.fidelity.runner.evaluate`."""
    combos = list(dict.fromkeys((r["kind"], r["variant"]) for r in records))
    metrics = [m for m in METRICS if all(m in r for r in records)]  # rouge_l: only where it was computed
    key = lambda r: (r["context"], r["id"])  # noqa: E731
    rows = []
    for agent in (*AGENTS, "all"):
        mine = [r for r in records if agent == "all" or r["agent"] == agent]
        base = {key(r): r for r in mine if (r["kind"], r["variant"]) == BASELINE}
        for kind, variant in combos:
            sel = [r for r in mine if (r["kind"], r["variant"]) == (kind, variant)]
            if not sel:
                continue
            clusters = [r["context"] for r in sel]
            row = {"training": kind, "inference": variant, "agent": agent, "prompts": len(sel),
                   "contexts": len(set(clusters))}
            for m in metrics:
                row[m] = bootstrap_ci([float(r[m]) for r in sel], clusters, n=n_boot)
            if base and (kind, variant) != BASELINE:
                paired = [r for r in sel if key(r) in base]
                for m in ("em", "f1"):
                    row[f"{m}_minus_standard_exact"] = paired_difference_ci(
                        [float(r[m]) for r in paired], [float(base[key(r)][m]) for r in paired],
                        [r["context"] for r in paired], n=n_boot)
            rows.append(row)
    return rows


def fitted_comparisons(records: list[dict]) -> list[tuple]:
    """Every pair of fitted variants a run evaluated for one training kind, as :data:`COMPARISONS` entries (the
    variant named first in the run first): e.g. ``standard@fitted_64_16 - standard@fitted_64``."""
    combos = list(dict.fromkeys((r["kind"], r["variant"]) for r in records if r["variant"].startswith("fitted_")))
    label = {"forkkv": "forkkv-trained", **LABELS}  # as COMPARISONS names the kinds
    return [(f"{label.get(a[0], a[0])}@{a[1]} - {label.get(b[0], b[0])}@{b[1]}", a, b)
            for i, b in enumerate(combos) for a in combos[i + 1:] if a[0] == b[0]]


def comparisons(records: list[dict], n_boot: int = 2000) -> list[dict]:
    """:data:`COMPARISONS` and the pairs of fitted variants (:func:`fitted_comparisons`) per agent and pooled: paired
    differences in exact match, F1 and KL, with intervals."""
    out = []
    for name, a, b in (*COMPARISONS, *fitted_comparisons(records)):
        out += paired_rows(name, [r for r in records if (r["kind"], r["variant"]) == a],
                           [r for r in records if (r["kind"], r["variant"]) == b], n_boot)
    order = {agent: i for i, agent in enumerate((*AGENTS, "all"))}
    return sorted(out, key=lambda row: order[row["agent"]])  # stable: the comparisons' order within an agent


def paired_rows(name: str, side_a: list[dict], side_b: list[dict], n_boot: int = 2000) -> list[dict]:
    """Paired differences ``a - b`` in exact match, F1 and KL over the prompts both record lists hold (matched by
    context and question id), per agent and pooled (``"all"``), with context-bootstrap intervals; each row also
    carries both sides' exact match over those prompts (``em_a``, ``em_b``). The two lists may come from different
    result files (``python -m eval.fidelity compare``): e.g. trained adapters against the standard ones."""
    out = []
    for agent in (*AGENTS, "all"):
        a = {(r["context"], r["id"]): r for r in side_a if agent == "all" or r["agent"] == agent}
        b = {(r["context"], r["id"]): r for r in side_b if agent == "all" or r["agent"] == agent}
        keys = [k for k in a if k in b]
        if not keys:
            continue
        other = [k for k in keys if a[k].get("answer") != b[k].get("answer")]
        if other:  # ids name a window and a draw, not a question: files run on other data pair other questions
            raise ValueError(f"{len(other)} of {len(keys)} paired prompts ({agent}) have different answers, e.g. "
                             f"{other[0]}: {a[other[0]].get('answer')!r} against {b[other[0]].get('answer')!r}; the "
                             "two sides were run on different data (another --seed or --data): compare runs of one")
        row = {"comparison": name, "agent": agent, "prompts": len(keys)}
        for m in ("em", "f1", "kl"):
            row[m] = paired_difference_ci([float(a[k][m]) for k in keys], [float(b[k][m]) for k in keys],
                                          [k[0] for k in keys], n=n_boot)
        row["em_a"] = sum(float(a[k]["em"]) for k in keys) / len(keys)
        row["em_b"] = sum(float(b[k]["em"]) for k in keys) / len(keys)
        out.append(row)
    return out


def rescore(records: list[dict], metric=None) -> dict:
    """Every record's exact match, F1 and ROUGE-L recomputed from its output and answer through the ``context_qa``
    evaluate module (``metric``: a loaded one, default ``evaluate.load`` of :data:`METRIC_MODULE`): ``rouge_l`` is set
    (in place), and exact match and F1 must equal what the run stored for every output kept whole. Returns what was
    checked."""
    if metric is None:
        import evaluate

        metric = evaluate.load(str(METRIC_MODULE))
    per = metric.compute(predictions=[r["output"] for r in records],
                         references=[r["answer"] for r in records])["per_example"]
    checked, differ = 0, []
    for i, r in enumerate(records):
        r["rouge_l"] = per["rouge_l"][i]
        if len(r["output"]) < OUTPUT_CHARS:
            checked += 1
            if per["exact_match"][i] != r["em"] or abs(per["f1"][i] - r["f1"]) > 1e-9:
                differ.append(r["id"])
    if differ:
        raise ValueError(f"the evaluate module scores {len(differ)} records otherwise than the run did, e.g. {differ[:3]}")
    return {"module": "eval/metrics/context_qa (evaluate)", "records": len(records), "em_f1_rechecked": checked,
            "rouge_l_added": len(records)}


def result(records: list[dict], device: dict, params: dict, extra: dict) -> BenchResult:
    extra = {**extra, "comparisons": comparisons(records)}
    return BenchResult("fidelity", device, params, ["training", "inference", "agent"], summarize(records), extra)


def comparison_table(res: BenchResult, agents=("all", *AGENTS)) -> str:
    lines = ["| comparison (a − b, paired) | agent | exact match, points [95% CI] | F1, points [95% CI] | KL difference |",
             "|---|---|---|---|---|"]
    for agent in agents:
        for c in res.extra.get("comparisons", []):
            if c["agent"] == agent:
                em, f, kl = c["em"], c["f1"], c["kl"]
                lines.append(f"| {c['comparison']} | {agent} | {100 * em['mean']:+.1f} [{100 * em['lo']:+.1f}, "
                             f"{100 * em['hi']:+.1f}] | {100 * f['mean']:+.1f} [{100 * f['lo']:+.1f}, "
                             f"{100 * f['hi']:+.1f}] | {kl['mean']:+.2e} [{kl['lo']:+.2e}, {kl['hi']:+.2e}] |")
    return "\n".join(lines)


def label(kind: str, suffix: str = "") -> str:
    """Display name of training kind ``kind`` (``suffix`` appended to kinds without their own label)."""
    return LABELS.get(kind, kind + suffix)


def _pct(ci: dict) -> str:
    return f"{100 * ci['mean']:.1f} [{100 * ci['lo']:.1f}, {100 * ci['hi']:.1f}]"


def table(res: BenchResult, agent: str = "all") -> str:
    """A markdown table of one agent's rows (or all agents pooled)."""
    rouge = all("rouge_l" in r for r in res.rows)
    lines = ["| training | inference | exact match % [95% CI] | F1 % [95% CI] | " + ("ROUGE-L % | " if rouge else "")
             + "EM − standard/exact (points) | KL(exact ‖ variant) | TF top-1 % | identical outputs % |",
             "|---|---|---|---|---|---|---|---|" + ("---|" if rouge else "")]
    for r in res.rows:
        if r["agent"] != agent:
            continue
        d = r.get("em_minus_standard_exact")
        diff = "—" if d is None else f"{100 * d['mean']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]"
        rl = f"{100 * r['rouge_l']['mean']:.1f} | " if rouge else ""
        lines.append(f"| {label(r['training'])} | {r['inference']} | {_pct(r['em'])} | {_pct(r['f1'])} | {rl}{diff} | "
                     f"{r['kl']['mean']:.2e} | {100 * r['tf_top1']['mean']:.1f} | {100 * r['identical']['mean']:.0f} |")
    return "\n".join(lines)


def plot(res: BenchResult, path: Path) -> Path:
    """Exact match and F1 with 95% intervals per agent, one bar per (training, inference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agents = [a for a in (*AGENTS, "all") if any(r["agent"] == a for r in res.rows)]
    if len(agents) == 2:  # one agent evaluated (run --agents): "all" would repeat it
        agents = agents[:1]
    combos = list(dict.fromkeys((r["training"], r["inference"]) for r in res.rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=False)
    width = 0.8 / len(combos)
    colors = plt.cm.tab10.colors
    for ax, metric in zip(axes, ("em", "f1")):
        for j, (kind, variant) in enumerate(combos):
            xs, ys, lo, hi = [], [], [], []
            for i, a in enumerate(agents):
                row = next((r for r in res.rows if (r["training"], r["inference"], r["agent"]) == (kind, variant, a)),
                           None)
                if row is None:
                    continue
                ci = row[metric]
                xs.append(i + (j - (len(combos) - 1) / 2) * width)
                ys.append(100 * ci["mean"])
                lo.append(100 * (ci["mean"] - ci["lo"]))
                hi.append(100 * (ci["hi"] - ci["mean"]))
            hatch = {"forkkv": "//", "distill": "\\\\"}.get(kind)
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, color=colors[j % 10], hatch=hatch,
                   label=f"{label(kind, '-trained')}, {variant} inference")
        ax.set_xticks(range(len(agents)), agents)
        ax.set_ylabel(f"{'exact match' if metric == 'em' else 'F1'} (%)")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    dev = res.device.get("gpu") or res.device.get("cpu", "")
    kinds = " vs ".join(label(k, "-trained") for k in dict.fromkeys(kind for kind, _ in combos))
    fig.suptitle(f"Context benchmark (SmolLM2-135M, LoRA agents): {kinds}, 95% context-bootstrap CIs ({dev})",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.05 + 0.035 * math.ceil(len(combos) / 4), 1, 1))  # room for the legend's rows
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
