"""Training for fitted residuals, by rank: one picture (and table) from the probe's result files.

    python -m eval.fidelity.fit_plot eval/results/fidelity_probe_cpu_fitted8*.json \
        eval/results/fidelity_probe_cpu_fitted16*.json --out eval/results/fidelity_fitted_training.png

Each file is a :mod:`eval.fidelity.probe` result with ``fitR_init`` variants (an agent's standard adapter trained
under ``FittedResidual(R)``) and the reference rows ``standard@exact`` and ``standard@fittedR``. Per agent and rank R
it reports, in teacher-forced exact-match points minus the standard adapter under exact inference (paired over the
same questions, 95% scene-bootstrap intervals): the standard adapter under a rank-R fit, the adapter trained for it
under that fit, and the trained adapter under exact inference. Zero is the issue's target (within its interval).

``--baseline FILES``: probe results with a ``std_init`` variant (the standard adapter trained as many more steps under
exact inference, ``--variants std_init``), the fair baseline of an adapter that took those steps under a fit: adds
that adapter under exact inference as a fourth series and, per agent and rank, the trained adapter under its fit
minus it (``"minus equally trained"``).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from ..cli import existing_file
from .metrics import paired_difference_ci
from .probe import question_contexts
from .tasks import read_jsonl

SERIES = (("standard adapter, fitted rank R", "tab:gray"), ("trained for rank R, fitted rank R", "tab:blue"),
          ("trained for rank R, exact inference", "tab:green"),
          ("standard trained as many more steps, exact inference", "tab:orange"))  # the last: with --baseline only
EQUAL = "minus equally trained"  # trained for rank R under its fit minus the standard adapter trained as long (exact)


def baselines(files: list[Path]) -> dict:
    """``{agent: (std_init's per-question exact-inference scores, its standard@exact's, its steps)}`` from probe
    files with a ``std_init`` variant."""
    out = {}
    for f in files:
        res = json.loads(Path(f).read_text())
        for agent, r in res["agents"].items():
            rec = r["variants"].get("std_init")
            if rec is not None:
                if agent in out:  # (a glob matching two seeds' files kept the last one; the check that then failed
                    raise SystemExit(  # named the steps)
                        f"two --baseline files have a std_init baseline for {agent!r} (the second: {f}); give one "
                        "file per agent")
                out[agent] = (rec["exact"]["per_question"], r["reference"]["standard@exact"]["per_question"],
                              res["params"]["steps"])
    if files and not out:
        raise SystemExit("no std_init variant in the --baseline files (python -m eval.fidelity.probe --variants "
                         "std_init trains it)")
    return out


def collect(files: list[Path], data_dir: Path | None = None, baseline_files: list[Path] = ()) -> dict:
    """``{agent: {R: {series: {"mean", "lo", "hi"} (points), "<series> (EM %)", "standard@exact": EM %, "questions":
    n}}}`` (with ``baseline_files``, where an agent has one, the fourth series and ``EQUAL``); ``"all"``, added last,
    pools the agents of a rank that several agents have (paired per question, scene clusters; the baseline's series
    only if every pooled agent has one)."""
    equal = baselines(list(baseline_files))
    out: dict = {}
    datas: dict = {}
    pooled: dict = {}  # rank -> agent -> (its series' per-question values, standard@exact's, clusters)
    for f in files:
        res = json.loads(Path(f).read_text())
        data_path = Path(data_dir or res["params"]["data"])
        data = datas.setdefault(data_path, read_jsonl(data_path))
        ctx = [c["context_index"] for c in data["eval"]["contexts"]][: int(res["params"]["eval_contexts"])]
        for agent, r in res["agents"].items():
            ref = r["reference"].get("standard@exact")
            if ref is None:
                continue
            clusters = question_contexts(data, agent, ctx)
            base = ref["per_question"]
            if len(clusters) != len(base):
                raise ValueError(f"{f}: {agent}'s {len(base)} questions do not match the data's {len(clusters)}")
            eq = equal.get(agent)
            if eq is not None and (eq[1] != base or eq[2] != res["params"]["steps"]):
                raise SystemExit(f"{f}: {agent}'s --baseline is not the same standard adapter, questions and steps "
                                 f"(its steps {eq[2]}, these {res['params']['steps']})")
            for variant, rec in r["variants"].items():
                fit = re.fullmatch(r"fit(\d+)_init", variant)
                std = r["reference"].get(f"standard@fitted{fit.group(1)}") if fit else None
                if std is None:
                    continue
                rank = int(fit.group(1))
                sides = [s["per_question"] for s in (std, rec[f"fitted{rank}"], rec["exact"])] + ([eq[0]] if eq else [])
                out.setdefault(agent, {})[rank] = {**_row(sides, base, clusters), "file": str(f)}
                pooled.setdefault(rank, {})[agent] = (sides, base, [(str(data_path), c) for c in clusters])
    if not out:
        raise SystemExit("no fitR_init variant with its standard@fittedR and standard@exact reference rows in the files")
    for rank, by_agent in pooled.items():  # every agent of a rank, its questions side by side (same scene clusters)
        if len(by_agent) > 1:
            parts = list(by_agent.values())
            sides = [sum((p[0][i] for p in parts), []) for i in range(min(len(p[0]) for p in parts))]
            out.setdefault("all", {})[rank] = {**_row(sides, sum((p[1] for p in parts), []),
                                                      sum((p[2] for p in parts), [])), "agents": sorted(by_agent)}
    return out


def _row(sides: list[list[float]], base: list[float], clusters: list) -> dict:
    def diff(values, against=base):
        d = paired_difference_ci(values, against, clusters)
        return {k: round(100 * d[k], 1) for k in ("mean", "lo", "hi")}

    row = {**{name: diff(v) for (name, _), v in zip(SERIES, sides)},
           **{f"{name} (EM %)": round(100 * sum(v) / len(v), 1) for (name, _), v in zip(SERIES, sides)},
           "standard@exact": round(100 * sum(base) / len(base), 1), "questions": len(base)}
    if len(sides) == len(SERIES):  # the trained adapter under its fit against the standard adapter trained as long
        row[EQUAL] = diff(sides[1], against=sides[3])
    return row


def table(res: dict) -> str:
    full = any(EQUAL in row for by_rank in res.values() for row in by_rank.values())
    names = [n for n, _ in SERIES][: len(SERIES) if full else len(SERIES) - 1]
    lines = ["| agent | rank | standard@exact | " + " | ".join(names + ([EQUAL] if full else [])) + " |",
             "|---|---|---|" + "---|" * (len(names) + full)]

    def ci(d):
        return f"{d['mean']:+.1f} [{d['lo']:+.1f}, {d['hi']:+.1f}]"

    for agent, by_rank in res.items():  # "all" last: collect adds it after the agents
        for rank in sorted(by_rank):
            row = by_rank[rank]
            cells = [f"{row[f'{n} (EM %)']:.1f} ({ci(row[n])})" if n in row else "not run" for n in names]
            cells += [ci(row[EQUAL]) if EQUAL in row else "not run"] if full else []
            lines.append(f"| {agent} | {rank} | {row['standard@exact']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(res: dict, out: Path) -> Path:
    from ..plots import plt, save_figure

    agents = [a for a in sorted(res) if a != "all"] + (["all"] if "all" in res else [])
    fig, axes = plt.subplots(1, len(agents), figsize=(5.6 * len(agents), 4.2), squeeze=False)
    for ax, agent in zip(axes[0], agents):
        ranks = sorted(res[agent])
        for j, (name, color) in enumerate(SERIES):
            have = [i for i, r in enumerate(ranks) if name in res[agent][r]]
            if not have:
                continue
            xs = [i + (j - 1.5) * 0.18 for i in have]
            rows = [res[agent][ranks[i]][name] for i in have]
            ax.errorbar(xs, [r["mean"] for r in rows], yerr=[[r["mean"] - r["lo"] for r in rows],
                                                            [r["hi"] - r["mean"] for r in rows]],
                        fmt="o", capsize=3, color=color, label=name)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(ranks)), [f"rank {r}" for r in ranks])
        std = res[agent][ranks[0]]["standard@exact"]
        ax.set_title(f"{agent} (standard@exact {std:.1f}%, {res[agent][ranks[0]]['questions']} questions)",
                     fontsize=9)
        ax.set_ylabel("exact match minus standard@exact (points)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.suptitle("Training for fitted residuals (SmolLM2-135M, teacher-forced, paired 95% scene-bootstrap CIs)",
                 fontsize=10)
    return save_figure(fig, out)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eval.fidelity.fit_plot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", type=existing_file, nargs="+", help="probe result files with fitR_init variants")
    ap.add_argument("--out", type=Path, required=True, help="the PNG (a JSON of the figures is written beside it)")
    ap.add_argument("--data", type=Path, help="the benchmark's JSON lines (default: each file's --data)")
    ap.add_argument("--baseline", type=existing_file, nargs="*", default=[],
                    help="probe result files with a std_init variant (the standard adapter trained as many more steps)")
    args = ap.parse_args(argv)
    res = collect(args.files, args.data, args.baseline)
    print(table(res))
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    print(f"wrote {plot(res, args.out)} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
