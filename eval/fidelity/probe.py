"""Quick comparison of ForkKV-aware training recipes for one agent, scored without generation.

    python -m eval.fidelity.probe --agents next_speaker --teacher .fidelity/h200_run2/adapters --steps 60 \
        --variants ce_fresh kl_init ce_kv32 --out eval/results/fidelity_probe_cpu.json

Each variant trains a ForkKV-aware adapter (``residual="kv"``) for one agent of :mod:`eval.fidelity.tasks` on the
same batches, then scores it on held-out scenes by teacher forcing: ``answer_exact`` is the share of questions whose
every answer token (and the end token) is the model's argmax, which is exactly when greedy decoding reproduces the
answer, so it tracks the benchmark's exact match at one forward per batch instead of a generate per question.
``answer_nll`` is the mean negative log-likelihood per answer token. The reference rows score the standard adapter
``--teacher/<agent>`` under exact inference (its own pass over the scene) and under ForkKV.

Variants (name = loss + init [+ k/v rank]): ``std``: cross-entropy under exact inference (ordinary fine-tuning: a
standard adapter, e.g. to serve as ``--teacher`` after ``--save``); ``ce``: cross-entropy on the answers under ForkKV;
``kl``: KL from the standard
adapter under exact inference to the student under ForkKV on the answer positions (distillation; needs
``--teacher``); ``cekl``: their sum; ``fitR``: cross-entropy under residuals fitted to rank R to the agent's own pass
(``FittedResidual(R)``: training for ``SharedContext.fit_residuals``), scored also under them; ``klfitR``: ``kl``'s
distillation with the student under that fit. ``fresh``: new LoRA
weights (seeded); ``init``: start from the standard adapter. ``_kvN``: rank N on k_proj/v_proj (the residual's rank),
the other modules keep ``--rank``. ``--fitted-ranks R ...`` adds reference rows of the standard adapter under fitted
residuals of those ranks (``standard@fittedR``).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import train as T
from .tasks import read_jsonl


def parse_variant(name: str) -> dict:
    parts = name.split("_")
    loss, init = parts[0], parts[1]
    fit = re.fullmatch(r"(kl)?fit(\d+)", loss)
    if (loss not in ("std", "ce", "kl", "cekl") and not fit) or init not in ("fresh", "init"):
        raise ValueError(f"variant {name!r}: <std|ce|kl|cekl|fitR|klfitR>_<fresh|init>[_kvN]")
    kv = int(parts[2][2:]) if len(parts) > 2 and parts[2].startswith("kv") else None
    return {"loss": f"{fit.group(1) or ''}fit" if fit else loss, "init": init, "kv_rank": kv,
            "fit_rank": int(fit.group(2)) if fit else None}


def as_residual(name: str):
    """A scoring row's residual: ``"kv"``/``"exact"``/... as they are, ``"fittedR"`` as ``FittedResidual(R)``."""
    from forkkv_hf.training import FittedResidual

    fit = re.fullmatch(r"fitted(\d+)", name)
    return FittedResidual(int(fit.group(1))) if fit else name


def answer_logits_targets(logits: torch.Tensor, labels: torch.Tensor):
    """Logits ``[N, V]`` and targets ``[N]`` of the labelled positions (shifted as in causal-LM loss), and each
    position's row ``[N]``."""
    target = labels[:, 1:]
    keep = target != -100
    rows = torch.arange(labels.shape[0])[:, None].expand_as(target)[keep]
    return logits[:, :-1][keep.to(logits.device)], target[keep].to(logits.device), rows


def question_contexts(data, agent: str, contexts: list[int]) -> list[int]:
    """The scene of each question :func:`score` scores, in its order (the clusters of the paired intervals)."""
    counts = {}
    for ex in data["eval"]["examples"]:
        if ex["agent"] == agent:
            counts[ex["context_index"]] = counts.get(ex["context_index"], 0) + 1
    return [ci for ci in contexts for _ in range(counts.get(ci, 0))]


def compare(res: dict, clusters: list[int]) -> dict:
    """Each variant's teacher-forced exact match under ForkKV and under exact inference minus the standard adapter's
    under exact inference (and under ForkKV), paired over the same questions, with 95% scene-bootstrap intervals, in
    points: ``{variant: {"kv_minus_standard@exact": {...}, ...}}``."""
    from .metrics import paired_difference_ci

    out = {}
    for variant, rec in res["variants"].items():
        rows = {}
        for residual in [k for k, v in rec.items() if isinstance(v, dict) and "per_question" in v]:
            for ref, base in res["reference"].items():
                d = paired_difference_ci(rec[residual]["per_question"], base["per_question"], clusters)
                rows[f"{residual}_minus_{ref}"] = {k: round(100 * d[k], 1) for k in ("mean", "lo", "hi")}
        out[variant] = rows
    return out


def summarize(path: Path, data: dict, eval_contexts: int) -> dict:
    """Add the paired comparisons (:func:`compare`) to a probe result file, per agent; returns them."""
    out = json.loads(path.read_text())
    ctx = [c["context_index"] for c in data["eval"]["contexts"]][:eval_contexts]
    made = {}
    for agent, res in out["agents"].items():
        if res["reference"]:
            res["comparisons"] = made[agent] = compare(res, question_contexts(data, agent, ctx))
    path.write_text(json.dumps(out, indent=1))
    return made


def score(pm, tok, data, agent: str, name: str, residual: str, contexts: list[int]) -> dict:
    from forkkv_hf.training import TrainingContext, forkkv_logits

    by_ctx = {}
    for ex in data["eval"]["examples"]:
        if ex["agent"] == agent:
            by_ctx.setdefault(ex["context_index"], []).append(ex)
    text = {c["context_index"]: c for c in data["eval"]["contexts"]}
    exact, nll, tokens = [], 0.0, 0
    with torch.no_grad():
        for ci in contexts:
            rows = by_ctx.get(ci, [])
            if not rows:
                continue
            ctx = TrainingContext(pm, T.context_ids(tok, text[ci]))
            batch = T.collate([T.encode(tok, r) for r in rows], tok.pad_token_id)
            logits = forkkv_logits(pm, ctx, batch, name, residual=as_residual(residual)).float()
            lg, tg, rid = answer_logits_targets(logits, batch["labels"])
            hit = (lg.argmax(-1) == tg).cpu()
            nll += torch.nn.functional.cross_entropy(lg, tg, reduction="sum").item()
            tokens += tg.numel()
            for i in range(len(rows)):
                exact.append(float(hit[rid == i].all()))
    return {"answer_exact": sum(exact) / len(exact), "answer_nll": nll / tokens, "questions": len(exact),
            "per_question": exact}


def train_variant(pm, tok, data, agent: str, student: str, teacher: str | None, spec: dict, cfg: T.TrainConfig,
                  plan: list[list[int]]) -> dict:
    from forkkv_hf.training import FittedResidual, TrainingContext, forkkv_distill_loss, forkkv_loss

    params = [p for n, p in pm.named_parameters() if f".{student}." in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: T.schedule(step, cfg.warmup, len(plan)))
    by_ctx = {}
    for ex in data["train"]["examples"]:
        if ex["agent"] == agent:
            by_ctx.setdefault(ex["context_index"], []).append(ex)
    text = {c["context_index"]: c for c in data["train"]["contexts"]}
    rng = random.Random(cfg.seed + 1)
    losses = []
    for cis in tqdm(plan, desc=f"train {student}", unit="step", mininterval=10):
        ctx = TrainingContext(pm, [T.context_ids(tok, text[ci]) for ci in cis])
        rows, index = [], []
        for j, ci in enumerate(cis):
            pool = by_ctx.get(ci, [])
            picked = rng.sample(pool, min(cfg.examples_per_context, len(pool)))
            rows += picked
            index += [j] * len(picked)
        batch = T.collate([T.encode(tok, r) for r in rows], tok.pad_token_id)
        batch["context_index"] = torch.tensor(index)
        if spec["loss"] in ("ce", "std", "fit"):
            residual = {"ce": "kv", "std": "exact"}.get(spec["loss"]) or FittedResidual(spec["fit_rank"])
            loss = forkkv_loss(pm, ctx, batch, student, residual=residual)
        else:  # KL per answer token from the teacher under exact inference (+ the cross-entropy for cekl)
            residual = FittedResidual(spec["fit_rank"]) if spec["loss"] == "klfit" else "kv"
            loss = forkkv_distill_loss(pm, ctx, batch, student, teacher, residual=residual, teacher_residual="exact",
                                       temperature=1.0, ce_weight=1.0 if spec["loss"] == "cekl" else 0.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
    return {"losses": losses, "loss_last_10": sum(losses[-10:]) / len(losses[-10:])}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eval.fidelity.probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", nargs="+", default=["next_speaker"])
    ap.add_argument("--data", type=Path, default=Path(".fidelity/data"))
    ap.add_argument("--teacher", type=Path, help="folder of the standard adapters (save_pretrained, one per agent)")
    ap.add_argument("--variants", nargs="+", default=["ce_fresh"])
    ap.add_argument("--fitted-ranks", type=int, nargs="*", default=[],
                    help="also score the standard adapter (reference rows) under residuals fitted to these ranks")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--contexts-per-step", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--eval-contexts", type=int, default=24)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--seed", type=int, default=0,
                    help="the training plan, the questions sampled per step and fresh LoRA weights (a second seed: 1)")
    ap.add_argument("--smoke", type=Path, metavar="TOKENIZER_DIR",
                    help="a tiny random Llama with this tokenizer instead of SmolLM2 (a check of the code, not the "
                         "method)")
    ap.add_argument("--time-limit", type=float, help="start no variant that the last one's pace says would end later")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--save", type=Path, help="save each trained variant's adapter in SAVE/<agent>_<variant>")
    ap.add_argument("--summarize", action="store_true",
                    help="train nothing: add the paired comparisons to the result file --out (with --data and "
                         "--eval-contexts as it was run)")
    args = ap.parse_args(argv)
    if args.summarize:
        for agent, rows in summarize(args.out, read_jsonl(args.data), args.eval_contexts).items():
            for variant, r in rows.items():
                print(agent, variant, {k: f"{v['mean']:+.1f} [{v['lo']:+.1f}, {v['hi']:+.1f}]" for k, v in r.items()})
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    from peft import LoraConfig, PeftModel, get_peft_model

    from forkkv_hf.training import copy_adapter

    from ..device import device_info
    from ..smollm2 import load_smollm2
    from .__main__ import smoke_model

    data = read_jsonl(args.data)
    model, tok = load_smollm2() if args.smoke is None else smoke_model(args.smoke)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    cfg = T.TrainConfig(rank=args.rank, lr=args.lr, steps=args.steps, contexts_per_step=args.contexts_per_step,
                        seed=args.seed)
    plan = T.plan_steps([c["context_index"] for c in data["train"]["contexts"]], cfg)
    eval_ctx = [c["context_index"] for c in data["eval"]["contexts"]][: args.eval_contexts]
    out = {"device": device_info(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
           "params": {k: str(v) for k, v in vars(args).items()}, "agents": {}}
    t0, last, pm = time.perf_counter(), 0.0, None
    for agent in args.agents:
        teacher = None
        res = out["agents"][agent] = {"reference": {}, "variants": {}}
        if args.teacher is not None:
            teacher = f"teacher_{agent}"
            if pm is None:
                pm = PeftModel.from_pretrained(model, str(args.teacher / agent), adapter_name=teacher)
            else:
                pm.load_adapter(str(args.teacher / agent), adapter_name=teacher)
            pm.eval()
            for residual in ("exact", "kv", *(f"fitted{r}" for r in args.fitted_ranks)):
                s = score(pm, tok, data, agent, teacher, residual, eval_ctx)
                res["reference"][f"standard@{residual}"] = s
                print(f"{agent} standard@{residual}: exact {s['answer_exact']:.3f} nll {s['answer_nll']:.3f}", flush=True)
        for variant in args.variants:
            if args.time_limit and time.perf_counter() - t0 + last > args.time_limit:
                print(f"time limit: {agent} {variant} not run", flush=True)
                continue
            t_variant = time.perf_counter()
            spec = parse_variant(variant)
            if spec["loss"] in ("kl", "cekl", "klfit") and teacher is None:
                raise SystemExit(f"variant {variant} needs --teacher")
            name = f"{agent}_{variant}"
            torch.manual_seed(args.seed)
            ranks = {"k_proj": spec["kv_rank"], "v_proj": spec["kv_rank"]} if spec["kv_rank"] else {}
            lc = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=list(T.TARGETS),
                            rank_pattern=ranks, alpha_pattern={k: 2 * v for k, v in ranks.items()},
                            task_type="CAUSAL_LM")
            if spec["init"] == "init":
                if spec["kv_rank"] or teacher is None:
                    raise SystemExit(f"variant {variant}: init copies the standard adapter (needs --teacher, its rank)")
                copy_adapter(pm, teacher, name)  # the standard adapter's config and weights
            elif pm is None:
                pm = get_peft_model(model, lc, adapter_name=name)
            else:
                pm.add_adapter(name, lc)
            pm.train()
            t = time.perf_counter()
            rec = train_variant(pm, tok, data, agent, name, teacher, spec, cfg, plan)
            rec["train_s"] = round(time.perf_counter() - t, 1)
            pm.eval()
            for residual in ("kv", "exact", *([f"fitted{spec['fit_rank']}"] if spec["fit_rank"] else [])):
                rec[residual] = score(pm, tok, data, agent, name, residual, eval_ctx)
            fitted = "".join(f"; {k} {v['answer_exact']:.3f}" for k, v in rec.items() if k.startswith("fitted"))
            print(f"{name}: loss {rec['loss_last_10']:.3f}; forkkv exact {rec['kv']['answer_exact']:.3f} nll "
                  f"{rec['kv']['answer_nll']:.3f}; exact-inference {rec['exact']['answer_exact']:.3f}{fitted} "
                  f"({rec['train_s']} s)", flush=True)
            res["variants"][variant] = rec
            if args.save is not None:
                pm.save_pretrained(str(args.save), selected_adapters=[name])
            if res["reference"]:
                res["comparisons"] = compare(res, question_contexts(data, agent, eval_ctx))
            if len(pm.peft_config) > 1:  # the next variant starts from its own weights
                pm.delete_adapter(name)
            last = time.perf_counter() - t_variant
            out["seconds"] = round(time.perf_counter() - t0, 1)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
