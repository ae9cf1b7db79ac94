"""Scores by residual rank, several recipes side by side: one picture from :mod:`eval.fidelity`'s ``compare`` files.

    python -m eval.fidelity.rank_plot \
        --series "teacher under the fit" 16:eval/results/fidelity_compare_std93_fitted16_vs_exact.json ... \
        --series "distilled for the fit" 16:eval/results/fidelity_compare_klfit16_both_vs_std93_exact.json ... \
        --out eval/results/fidelity_fitted_rank_recipes_cpu.png

Each ``R:FILE`` is a ``python -m eval.fidelity compare ... --out FILE`` result whose side b is the same reference
(e.g. the teachers under exact inference): per agent (and ``all``, pooled) its exact-match difference a - b in points
with the 95% scene-bootstrap interval is drawn at rank R, one line per series, one panel per agent. Zero is the
reference; issue 20's target is zero within the interval (or 0.5 points).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..cli import read_file_arg

COLOURS = ("tab:gray", "tab:blue", "tab:green", "tab:orange", "tab:red", "tab:purple")


def em_points(row: dict) -> tuple[float, float, float]:
    """A compare row's exact-match difference a - b and its 95% interval, in points."""
    em = row["em"]
    return 100 * em["mean"], 100 * em["lo"], 100 * em["hi"]


def read_points(specs: list[str]) -> dict:
    """``{agent: [(rank, mean, lo, hi)]}`` (points) from ``R:FILE`` specs, sorted by rank."""
    out: dict = {}
    for spec in specs:
        rank, sep, path = spec.partition(":")
        if not sep or not rank.isdigit():
            raise SystemExit(f"{spec!r}: give RANK:FILE, e.g. 16:eval/results/fidelity_compare_x.json")
        for row in json.loads(read_file_arg(path))["rows"]:
            out.setdefault(row["agent"], []).append((int(rank), *em_points(row)))
    return {agent: sorted(points) for agent, points in out.items()}


def plot(series: list[tuple[str, dict]], out: Path, title: str) -> Path:
    """One panel per agent (``all`` last), x the rank (log scale), y the difference in points with its interval (each
    panel its own scale)."""
    from ..plots import plt, save_figure

    agents = sorted({a for _, pts in series for a in pts}, key=lambda a: (a == "all", a))
    ranks = sorted({p[0] for _, pts in series for agent_pts in pts.values() for p in agent_pts})
    fig, axes = plt.subplots(1, len(agents), figsize=(4.4 * len(agents), 3.8), squeeze=False)
    for ax, agent in zip(axes[0], agents):
        for i, (label, pts) in enumerate(series):
            p = pts.get(agent)
            if not p:
                continue
            x = [r * (1 + 0.04 * (i - (len(series) - 1) / 2)) for r, *_ in p]  # series side by side at a rank
            y = [m for _, m, *_ in p]
            err = [[m - lo for _, m, lo, _ in p], [hi - m for _, m, _, hi in p]]
            ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=3, lw=1.2, color=COLOURS[i % len(COLOURS)],
                        label=label)
        ax.axhline(0, color="k", lw=0.8)
        ax.axhspan(-0.5, 0.5, color="k", alpha=0.08, lw=0)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel("residual rank per layer and kind")
        ax.set_title("both agents, pooled" if agent == "all" else agent, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("exact match minus the reference, points")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--series", nargs="+", action="append", required=True, metavar="LABEL R:FILE",
                    help="a label, then RANK:FILE compare results (repeat --series for each recipe)")
    ap.add_argument("--title", default="Scores under a fitted residual, by rank and recipe, minus the teachers' "
                                       "exact inference (by generation)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    for s in args.series:
        if len(s) < 2:
            raise SystemExit(f"--series {' '.join(s)}: give a label and at least one RANK:FILE")
    print(plot([(s[0], read_points(s[1:])) for s in args.series], args.out, args.title))


if __name__ == "__main__":
    main()
