"""Paired differences side by side, one line per agent (and seed): a forest plot from :mod:`eval.fidelity`'s
``compare`` files.

    python -m eval.fidelity.forest_plot \
        --series "teacher under the fit" "speaker (0)=eval/results/fidelity_compare_a.json@speaker" ... \
        --series "student under the fit" "speaker (0)=eval/results/fidelity_compare_b.json@speaker" ... \
        --out eval/results/fidelity_fitted32_seeds_72ctx_cpu.png

Each ``LABEL=FILE[@AGENT]`` names a ``python -m eval.fidelity compare ... --out FILE`` result and the row of it to
draw (an agent's, or without ``@AGENT`` the pooled ``all``): its exact-match difference a - b in points with the 95%
scene-bootstrap interval, on the line ``LABEL``. Lines keep the order in which they first appear; each series is one
colour. Zero is the reference (side b); the gray band is issue 20's ±0.5 points. Beside the PNG a JSON records the
series, their specs and the values drawn; ``--spec THAT.json`` draws it again from the compare files it names:

    python -m eval.fidelity.forest_plot --spec eval/results/fidelity_fitted32_seeds_72ctx_cpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..cli import existing_file, read_file_arg
from .rank_plot import COLOURS, em_points


def read_row(spec: str) -> tuple[str, float, float, float, int]:
    """``(label, mean, lo, hi, prompts)`` in points from ``LABEL=FILE[@AGENT]`` (``all`` without an agent)."""
    label, sep, rest = spec.partition("=")
    if not sep or not label or not rest:
        raise SystemExit(f"{spec!r}: give LABEL=FILE[@AGENT], e.g. 'speaker (0)=fidelity_compare_x.json@speaker'")
    path, _, agent = rest.partition("@")
    rows = json.loads(read_file_arg(path))["rows"]
    for row in rows:
        if row["agent"] == (agent or "all"):
            return label, *em_points(row), row["prompts"]
    raise SystemExit(f"{path} has no row {agent or 'all'!r}; it has {[r['agent'] for r in rows]}")


def plot(series: list[tuple[str, list[tuple]]], out: Path, title: str, xlabel: str) -> Path:
    """Lines top to bottom in order of first appearance, each series a colour, slightly offset on its line."""
    from ..plots import plt, save_figure

    labels: list[str] = []
    for _, rows in series:
        labels += [r[0] for r in rows if r[0] not in labels]
    fig, ax = plt.subplots(figsize=(7.5, 1.6 + 0.45 * len(labels)))
    for i, (name, rows) in enumerate(series):
        dy = 0.12 * (i - (len(series) - 1) / 2)
        y = [labels.index(r[0]) + dy for r in rows]
        ax.errorbar([r[1] for r in rows], y, xerr=[[r[1] - r[2] for r in rows], [r[3] - r[1] for r in rows]],
                    fmt="o", ms=4, capsize=3, lw=1.2, color=COLOURS[(i + 1) % len(COLOURS)], label=name)
    ax.axvline(0, color="k", lw=0.8)
    ax.axvspan(-0.5, 0.5, color="k", alpha=0.08, lw=0)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=len(series))  # below: no row hidden
    ax.set_title(title, fontsize=9)
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--series", nargs="+", action="append", metavar="NAME LABEL=FILE[@AGENT]",
                     help="a series name, then LABEL=FILE[@AGENT] compare rows (repeat --series for each)")
    src.add_argument("--spec", type=existing_file, help="the JSON an earlier call wrote beside its PNG: draw it again")
    ap.add_argument("--title", default="Exact match minus the teachers' exact inference (by generation)")
    ap.add_argument("--xlabel", default="exact match minus the reference, points (95% scene-bootstrap interval)")
    ap.add_argument("--out", type=Path, help="the PNG (with --spec: beside the spec by default)")
    args = ap.parse_args(argv)
    if args.spec:
        rec = json.loads(args.spec.read_text())
        series = [[s["name"], *(r["spec"] for r in s["rows"])] for s in rec["series"]]
        title, xlabel, out = rec["title"], rec["xlabel"], args.out or args.spec.with_suffix(".png")
    else:
        if args.out is None:
            raise SystemExit("--out PNG: where to draw the series")
        series, title, xlabel, out = args.series, args.title, args.xlabel, args.out
    for s in series:
        if len(s) < 2:
            raise SystemExit(f"--series {' '.join(s)}: give a name and at least one LABEL=FILE[@AGENT]")
    drawn = [(s[0], [read_row(x) for x in s[1:]]) for s in series]
    png = plot(drawn, out, title, xlabel)
    record = {"title": title, "xlabel": xlabel, "series": [
        {"name": name, "rows": [dict(spec=spec, label=r[0], mean=r[1], lo=r[2], hi=r[3], prompts=r[4])
                                for spec, r in zip(s[1:], rows)]} for s, (name, rows) in zip(series, drawn)]}
    png.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print(png, png.with_suffix(".json"))


if __name__ == "__main__":
    main()
