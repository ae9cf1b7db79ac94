"""The command line of the fidelity evaluation: ``python -m eval.quality`` (see :mod:`eval.quality`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import quality
from ..cli import positive_int
from ..plots import RESULTS, plot_quality
from .runner import VARIANTS, print_summary, run

#: the scenarios :func:`~eval.quality.scenarios.build_scenarios` makes
SCENARIOS = ("gsm8k_fewshot", "hamlet_act", "code_module")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eval.quality", description=quality.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="a tiny slice: 128-token contexts, each agent's shortest prompt, 6 tokens")
    ap.add_argument("--context-tokens", type=positive_int, help="minimum shared-context length (default 2048; quick 128)")
    ap.add_argument("--prompts-per-agent", type=positive_int, help="prompts of each agent per scenario (default 3; quick 1)")
    ap.add_argument("--max-new-tokens", type=positive_int, help="greedy tokens per answer (default 128; quick 6)")
    ap.add_argument("--scenarios", nargs="+", choices=SCENARIOS, help="run only these scenarios")
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=["exact", "forkkv", "naive"],
                    help="variants to run (default: exact, forkkv, naive; exact always runs: it is the reference). "
                         "The committed results add forkkv_v (about 8 more minutes)")
    ap.add_argument("--out", type=Path, help="JSON path (default eval/results/quality.json; quick: quality_quick.json)")
    args = ap.parse_args(argv)
    args.variants = ["exact"] + [v for v in VARIANTS if v in args.variants and v != "exact"]
    defaults = (128, 1, 6) if args.quick else (2048, 3, 128)
    for key, value in zip(("context_tokens", "prompts_per_agent", "max_new_tokens"), defaults):
        if getattr(args, key) is None:
            setattr(args, key, value)
    out = args.out or RESULTS / ("quality_quick.json" if args.quick else "quality.json")
    result = run(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    png = plot_quality(out, result)
    print_summary(result)
    print(f"wrote {out} and {png} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
