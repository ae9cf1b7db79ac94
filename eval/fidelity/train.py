"""Train the benchmark's agents two ways on the same data, in one loop: standard (the agent's own pass over the
context, ``residual="exact"``) and ForkKV-aware (``residual="kv"``, :mod:`forkkv_hf.training`).

Context by context (seeded order, ``epochs`` passes), one :class:`~forkkv_hf.training.TrainingContext` (one base
pass) serves the ForkKV-aware step of every agent; each agent then takes one AdamW step per kind on that context's
questions. Both kinds see the same batches in the same order, so they stop at the same step when a time budget cuts
the run short. Adapters ``<agent>`` (standard) and ``<agent>_fk`` (ForkKV-aware) live in one ``PeftModel`` and are
saved with ``save_pretrained``.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..agents import END, context_text, prompt_text
from .tasks import AGENTS

#: training kinds: adapter-name suffix and the ``residual`` the loss runs with
KINDS = {"standard": ("", "exact"), "forkkv": ("_fk", "kv")}
#: steps run before a time budget fixes the number of steps (and so the learning-rate schedule)
CALIBRATION_STEPS = 5
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainConfig:
    rank: int = 8
    alpha: int = 16
    lr: float = 1e-3
    warmup: int = 20
    epochs: int = 1
    examples_per_step: int = 8
    seed: int = 0
    #: fit the run into this many seconds: after CALIBRATION_STEPS contexts, the number of steps is cut to what the
    #: pace so far allows (both kinds stop at the same step; the schedule decays to the new last step)
    time_budget_s: float | None = None
    kinds: tuple = ("standard", "forkkv")


def adapter_name(agent: str, kind: str) -> str:
    return agent + KINDS[kind][0]


def prompt_ids(tok, example: dict) -> list[int]:
    """Token ids of the agent's own turn after the context: its question and the start of its answer."""
    return tok(prompt_text(example["question"]), add_special_tokens=False).input_ids


def encode(tok, example: dict) -> tuple[list[int], list[int]]:
    """Token ids of the agent's suffix (question turn + answer) and its labels (the answer and its end token)."""
    prompt = prompt_ids(tok, example)
    answer = tok(example["answer"] + END, add_special_tokens=False).input_ids
    return prompt + answer, [-100] * len(prompt) + answer


def context_ids(tok, context: dict) -> torch.Tensor:
    return torch.tensor(tok(context_text(context["text"])).input_ids, dtype=torch.long)


def collate(rows: list[tuple[list[int], list[int]]], pad: int) -> dict:
    width = max(len(ids) for ids, _ in rows)
    batch = {"input_ids": torch.full((len(rows), width), pad), "labels": torch.full((len(rows), width), -100),
             "attention_mask": torch.zeros((len(rows), width), dtype=torch.long)}
    for i, (ids, labels) in enumerate(rows):
        batch["input_ids"][i, : len(ids)] = torch.tensor(ids)
        batch["labels"][i, : len(ids)] = torch.tensor(labels)
        batch["attention_mask"][i, : len(ids)] = 1
    return batch


def add_adapters(model, cfg: TrainConfig):
    """``model`` wrapped with one fresh LoRA adapter per agent and kind (same seed for both kinds of an agent:
    they start from the same weights)."""
    from peft import LoraConfig, get_peft_model

    pm = None
    for a in AGENTS:
        for kind in cfg.kinds:
            torch.manual_seed(cfg.seed + AGENTS.index(a))
            lc = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=list(TARGETS),
                            task_type="CAUSAL_LM")
            name = adapter_name(a, kind)
            if pm is None:
                pm = get_peft_model(model, lc, adapter_name=name)
            else:
                pm.add_adapter(name, lc)
    return pm


def train(model, tok, data: dict, cfg: TrainConfig) -> tuple[object, dict]:
    """Train every agent both ways on ``data["train"]``; returns the ``PeftModel`` and the training report."""
    from forkkv_hf.training import TrainingContext, forkkv_loss

    pm = add_adapters(model, cfg)
    pm.train()
    contexts = data["train"]["contexts"]
    by_context: dict[int, dict[str, list[dict]]] = {}
    for ex in data["train"]["examples"]:
        by_context.setdefault(ex["context_index"], {}).setdefault(ex["agent"], []).append(ex)
    rng = random.Random(cfg.seed)
    order = [c["context_index"] for c in contexts]
    plan = []
    for _ in range(cfg.epochs):
        rng.shuffle(order)
        plan += list(order)
    steps = len(plan)
    names = {(a, k): adapter_name(a, k) for a in AGENTS for k in cfg.kinds}
    opts, scheds = {}, {}

    def lr_factor(step):  # linear warmup, cosine decay to 10%
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, steps - cfg.warmup)))

    for key, name in names.items():
        params = [p for n, p in pm.named_parameters() if f".{name}." in n]
        for p in params:
            p.requires_grad_(True)
        opts[key] = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        scheds[key] = torch.optim.lr_scheduler.LambdaLR(opts[key], lr_factor)
    text_by_index = {c["context_index"]: c for c in contexts}
    losses = {f"{a}/{k}": [] for a, k in names}
    t0 = time.perf_counter()
    seconds = {k: 0.0 for k in cfg.kinds}
    seconds["base_pass"] = 0.0
    done = 0
    bar = tqdm(plan, desc="train agents (standard + forkkv-aware)", unit="context", mininterval=5)
    for ci in bar:
        if done == steps:
            break
        if cfg.time_budget_s is not None and done == CALIBRATION_STEPS:
            # the planned steps that fit the budget at the pace so far: the schedule then decays to the last one
            pace = (time.perf_counter() - t0) / done
            steps = min(steps, done + int((cfg.time_budget_s - (time.perf_counter() - t0)) / pace))
        ids = context_ids(tok, text_by_index[ci]).to(next(pm.parameters()).device)
        t = time.perf_counter()
        ctx = TrainingContext(pm, ids)
        seconds["base_pass"] += time.perf_counter() - t
        for a in AGENTS:
            rows = by_context[ci].get(a, [])
            rows = rng.sample(rows, min(cfg.examples_per_step, len(rows)))
            if not rows:
                continue
            batch = collate([encode(tok, r) for r in rows], tok.pad_token_id)
            for kind in cfg.kinds:
                t = time.perf_counter()
                key = (a, kind)
                loss = forkkv_loss(pm, ctx, batch, names[key], residual=KINDS[kind][1])
                loss.backward()
                torch.nn.utils.clip_grad_norm_(opts[key].param_groups[0]["params"], 1.0)
                opts[key].step()
                scheds[key].step()
                opts[key].zero_grad(set_to_none=True)
                losses[f"{a}/{kind}"].append(round(loss.item(), 4))
                seconds[kind] += time.perf_counter() - t
        done += 1
        bar.set_postfix({k: f"{sum(v[-20:]) / max(1, len(v[-20:])):.2f}" for k, v in losses.items()
                         if k.startswith(AGENTS[0])})
        del ctx
    report = {"config": asdict(cfg), "steps": done, "planned_steps": len(plan), "targets": list(TARGETS),
              "seconds": {k: round(v, 1) for k, v in seconds.items()},
              "seconds_total": round(time.perf_counter() - t0, 1), "losses": losses,
              "loss_first_20": {k: _mean(v[:20]) for k, v in losses.items()},
              "loss_last_20": {k: _mean(v[-20:]) for k, v in losses.items()}}
    pm.eval()
    return pm, report


def _mean(xs):
    return round(sum(xs) / len(xs), 4) if xs else None


def save_adapters(pm, folder, names) -> None:
    """``save_pretrained`` of ``names`` into ``folder/<name>/`` in fp16; the model's LoRA weights are rounded to
    fp16 too (and kept in their dtype), so that what is evaluated in memory is what was saved."""
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.data = p.data.to(torch.float16)
    for name in names:
        pm.peft_config[name].base_model_name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    pm.save_pretrained(str(folder), selected_adapters=list(names), safe_serialization=True,
                       save_embedding_layers=False)
    dtype = pm.get_base_model().dtype
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.data = p.data.to(dtype)
