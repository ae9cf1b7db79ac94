"""Train the benchmark's agents two ways on the same data, in one loop: standard (the agent's own pass over the
context, ``residual="exact"``) and ForkKV-aware (``residual="kv"``, :mod:`forkkv_hf.training`); optionally a third
way after them, distilled (a ForkKV student started from the final standard adapter, trained to match it).

Step by step (contexts in a seeded order, reshuffled each epoch, ``contexts_per_step`` at a time), one
:class:`~forkkv_hf.training.TrainingContext` (one base pass over those contexts) serves the ForkKV-aware step of
every agent; each agent then takes one AdamW step per kind on its questions about those contexts (one batch, one
forward: rows say their context in ``context_index``). Both kinds see the same batches in the same order, step for
step, so they always stop at the same step: the planned ``steps`` decide the length and the learning-rate schedule;
``time_budget_s`` is a safety stop (it cuts the planned steps, both kinds alike, and the report says so).
Adapters ``<agent>`` (standard) and ``<agent>_fk`` (ForkKV-aware) live in one ``PeftModel`` and are saved with
``save_pretrained``.

The ``distill`` kind (adapter ``<agent>_fd``) needs the final standard adapters, so it trains in a second phase:
``copy_adapter`` of ``<agent>``, then the same steps (same contexts, same questions, same schedule) with
:func:`~forkkv_hf.training.forkkv_distill_loss` (student under ``"kv"``, teacher under ``"exact"``, temperature 1,
no cross-entropy). The standard adapters may instead be loaded (``teachers``: a ``save_pretrained`` folder); then
only the other kinds train. With a time budget and both phases, the first phase gets a like share per kind of it
and the distill phase what is left (it may then stop earlier; the report's ``distill`` says where).

Where the time goes (SmolLM2-135M on an H200): the steps are bound by the host (about 18 µs of Python and dispatch
per operator, some 24,000 operators in a standard step of one agent, 14,500 in a ForkKV-aware one), not by the GPU, so
more contexts per step cost little more per step. ``tf32`` lets the CUDA matmuls of training use TF32.
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

#: training kinds: adapter-name suffix and the ``residual`` the loss runs with ("distill": the student's, its teacher
#: being the standard adapter under "exact")
KINDS = {"standard": ("", "exact"), "forkkv": ("_fk", "kv"), "distill": ("_fd", "kv")}
#: the kinds trained side by side from fresh weights; "distill" trains after them, from the final standard adapters
LOCKSTEP = ("standard", "forkkv")
#: steps after the first (which pays one-off device set-up) that measure the pace a time budget is checked against
CALIBRATION_STEPS = 5
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainConfig:
    rank: int = 8
    alpha: int = 16
    lr: float = 1e-3
    warmup: int = 20
    #: passes over the training contexts when ``steps`` is not given
    epochs: int = 1
    #: optimizer steps per adapter (both kinds); None: ``epochs`` passes over the contexts
    steps: int | None = None
    #: contexts per step: each agent's batch holds its questions about all of them (one forward)
    contexts_per_step: int = 1
    #: questions per agent and context (at most)
    examples_per_context: int = 8
    seed: int = 0
    #: safety stop: when the pace of the first steps says the planned steps do not fit, they are cut (both kinds
    #: alike, the schedule decays to the new last step); the run also stops at a step end once it is spent
    time_budget_s: float | None = None
    #: TF32 for the CUDA matmuls of training (evaluation stays full fp32)
    tf32: bool = False
    #: any of :data:`KINDS`; "distill" needs "standard" (trained in the same run, or loaded as teachers)
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


def add_adapters(model, cfg: TrainConfig, kinds=None):
    """``model`` (or the ``PeftModel`` it already is) with one fresh LoRA adapter per agent and kind of ``kinds``
    (default ``cfg.kinds``; same seed for every kind of an agent: they start from the same weights)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    pm = model if isinstance(model, PeftModel) else None
    for a in AGENTS:
        for kind in cfg.kinds if kinds is None else kinds:
            torch.manual_seed(cfg.seed + AGENTS.index(a))
            lc = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=list(TARGETS),
                            task_type="CAUSAL_LM")
            name = adapter_name(a, kind)
            if pm is None:
                pm = get_peft_model(model, lc, adapter_name=name)
            else:
                pm.add_adapter(name, lc)
    return pm


def plan_steps(context_indices: list[int], cfg: TrainConfig) -> list[list[int]]:
    """The contexts of each step: per pass over ``context_indices`` a new seeded shuffle, cut into groups of
    ``contexts_per_step`` (a pass's last group may be smaller; no group spans two passes); ``cfg.steps`` groups, or
    the groups of ``cfg.epochs`` passes."""
    per = cfg.contexts_per_step
    if per < 1 or not context_indices:
        raise ValueError(f"contexts_per_step must be >= 1 and there must be training contexts (got {per}, "
                         f"{len(context_indices)} contexts)")
    passes = cfg.epochs if cfg.steps is None else math.ceil(cfg.steps / math.ceil(len(context_indices) / per))
    rng = random.Random(cfg.seed)
    groups: list[list[int]] = []
    for _ in range(passes):
        order = list(context_indices)
        rng.shuffle(order)
        groups += [order[i:i + per] for i in range(0, len(order), per)]
    return groups if cfg.steps is None else groups[: cfg.steps]


def schedule(step: int, warmup: int, steps: int) -> float:
    """The learning-rate factor of ``step``: linear warmup over ``warmup`` steps, cosine decay to 10% at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))


def _optimizer(params, cfg: TrainConfig):
    fused = all(p.is_cuda for p in params)  # one kernel per step on CUDA
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, **({"fused": True} if fused else {}))


def check_kinds(kinds, teachers=None, trained: bool = True) -> tuple:
    """``kinds`` in :data:`KINDS` order, or a ``ValueError`` that says what to pass instead (``trained=False``:
    saved adapters to evaluate, any kinds)."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"training kinds must be some of {tuple(KINDS)}, got {tuple(kinds)}")
    if trained and "distill" in kinds and "standard" not in kinds:
        raise ValueError("the distill kind learns from the standard adapters: list standard in the kinds too (trained "
                         "in the same run, or loaded with --teachers DIR)")
    if teachers is not None and "standard" not in kinds:
        raise ValueError("--teachers loads the standard adapters, which are then evaluated: list standard in --kinds")
    return tuple(k for k in KINDS if k in kinds)


def load_adapters(model, folder, names, pm=None):
    """``PeftModel`` ``pm`` (or ``model`` wrapped) with the adapters ``folder/<name>`` of ``save_pretrained``, frozen."""
    from pathlib import Path

    from peft import PeftModel

    missing = [n for n in names if not (Path(folder) / n / "adapter_config.json").exists()]
    if missing:
        raise FileNotFoundError(f"no saved adapter {missing} in {folder}: pass the folder that save_pretrained wrote "
                                "(one subfolder per adapter, as `run --adapters-out` writes)")
    for name in names:
        if pm is None:
            pm = PeftModel.from_pretrained(model, str(Path(folder) / name), adapter_name=name)
        else:
            pm.load_adapter(str(Path(folder) / name), adapter_name=name)
    return pm


def train(model, tok, data: dict, cfg: TrainConfig, teachers=None) -> tuple[object, dict]:
    """Train every agent in every kind of ``cfg.kinds`` on ``data["train"]``; returns the ``PeftModel`` and the
    training report. ``teachers``: a ``save_pretrained`` folder whose standard adapters ``<agent>`` are loaded
    instead of trained (the other kinds train)."""
    kinds = check_kinds(cfg.kinds, teachers)
    fresh = [k for k in LOCKSTEP if k in kinds and not (k == "standard" and teachers is not None)]
    pm = None if teachers is None else load_adapters(model, teachers, list(AGENTS))
    pm = add_adapters(model if pm is None else pm, cfg, fresh)
    pm.train()
    device = next(pm.parameters()).device
    precision = torch.get_float32_matmul_precision()
    if cfg.tf32 and device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    try:
        report = _train(pm, tok, data, cfg, fresh, "distill" in kinds)
        if teachers is not None:
            report["teachers_loaded_from"] = str(teachers)
        return pm, report
    finally:
        torch.set_float32_matmul_precision(precision)
        pm.eval()


def _train(pm, tok, data: dict, cfg: TrainConfig, lockstep: list[str], distill: bool) -> dict:
    from forkkv_hf.training import copy_adapter, forkkv_distill_loss, forkkv_loss

    contexts = data["train"]["contexts"]
    plan = plan_steps([c["context_index"] for c in contexts], cfg)
    planned = len(plan)
    budget = cfg.time_budget_s
    if budget is not None and lockstep and distill:  # each kind's steps get a like share of the budget
        budget = budget * len(lockstep) / (len(lockstep) + 1)
    stats = {"losses": {}, "seconds": {"base_pass": 0.0}, "examples": {}}
    t0 = time.perf_counter()
    out = {"steps": 0, "stopped": None, "contexts_seen": 0, "seconds_per_step": None}
    if lockstep:
        out = _phase(pm, tok, data, cfg, plan, budget, lockstep, stats, "train agents (" + " + ".join(lockstep) + ")",
                     lambda ctx, batch, a, kind: forkkv_loss(pm, ctx, batch, adapter_name(a, kind),
                                                             residual=KINDS[kind][1]))
        plan = plan[: out["steps"]]  # the distilled students take the same steps
    if distill:
        for a in AGENTS:  # each student starts from its final standard adapter
            copy_adapter(pm, adapter_name(a, "standard"), adapter_name(a, "distill"))
        left = None if cfg.time_budget_s is None else max(0.0, cfg.time_budget_s - (time.perf_counter() - t0))
        phase = _phase(pm, tok, data, cfg, plan, left, ["distill"], stats, "distill agents (standard -> forkkv)",
                       lambda ctx, batch, a, kind: forkkv_distill_loss(
                           pm, ctx, batch, adapter_name(a, "distill"), adapter_name(a, "standard"), residual="kv",
                           teacher_residual="exact", temperature=1.0, ce_weight=0.0))
        if lockstep:
            out["distill"] = {k: phase[k] for k in ("steps", "stopped", "seconds_per_step")}
        else:
            out = phase
    losses = stats["losses"]
    return {"config": asdict(cfg), "steps": out["steps"], "planned_steps": planned, "stopped": out["stopped"],
            **({"distill": out["distill"]} if "distill" in out else {}),
            "contexts_seen": out["contexts_seen"], "train_contexts": len(contexts),
            "examples_per_agent": stats["examples"], "targets": list(TARGETS),
            "seconds": {k: round(v, 1) for k, v in stats["seconds"].items()},
            "seconds_note": "host time per kind (the device runs behind; one wait per step, at its end)",
            "seconds_total": round(time.perf_counter() - t0, 1),
            "seconds_per_step": out["seconds_per_step"],
            "losses": losses,
            "loss_first_20": {k: _mean(v[:20]) for k, v in losses.items()},
            "loss_last_20": {k: _mean(v[-20:]) for k, v in losses.items()}}


def _phase(pm, tok, data: dict, cfg: TrainConfig, plan: list[list[int]], budget_s, kinds: list[str], stats: dict,
           desc: str, loss_fn) -> dict:
    """One AdamW step per agent and kind of ``kinds`` for each step of ``plan`` (questions sampled with the seed
    every phase uses: the same batches), the learning rate on :func:`schedule`; ``loss_fn(ctx, batch, agent,
    kind)``. Losses and host seconds go into ``stats``; returns the steps done, why it stopped, the pace."""
    from forkkv_hf.training import TrainingContext

    contexts = data["train"]["contexts"]
    by_context: dict[int, dict[str, list[dict]]] = {}
    for ex in data["train"]["examples"]:
        by_context.setdefault(ex["context_index"], {}).setdefault(ex["agent"], []).append(ex)
    steps = len(plan)
    rng = random.Random(cfg.seed + 1)
    names = {(a, k): adapter_name(a, k) for a in AGENTS for k in kinds}
    opts, scheds = {}, {}

    def lr_factor(step):  # reads `steps` when called: a time budget may cut it
        return schedule(step, cfg.warmup, steps)

    for key, name in names.items():
        params = [p for n, p in pm.named_parameters() if f".{name}." in n]
        for p in params:
            p.requires_grad_(True)
        opts[key] = _optimizer(params, cfg)
        scheds[key] = torch.optim.lr_scheduler.LambdaLR(opts[key], lr_factor)
    text_by_index = {c["context_index"]: c for c in contexts}
    losses = stats["losses"]
    for a, k in names:
        losses[f"{a}/{k}"] = []
    seconds = stats["seconds"]
    for k in kinds:
        seconds[k] = 0.0
    examples = {a: 0 for a in AGENTS}  # questions each agent's adapters (every kind) were trained on
    stop, done, seen, t0, t1 = None, 0, 0, time.perf_counter(), None
    bar = tqdm(range(steps), desc=desc, unit="step", mininterval=5)
    for step in bar:
        if step >= steps:
            break
        if step == 1:
            t1 = time.perf_counter()  # the first step pays one-off set-up (kernels, allocator)
        if budget_s is not None and t1 is not None:
            spent = time.perf_counter() - t0
            if step == 1 + CALIBRATION_STEPS and steps > step:
                pace = (time.perf_counter() - t1) / CALIBRATION_STEPS
                fit = step + int((budget_s - spent) / pace)
                if fit < steps:
                    steps, stop = max(step, fit), f"planned steps cut to {max(step, fit)} at step {step} " \
                                                  f"({pace:.2f} s/step, budget {budget_s:.0f} s)"
            if spent > budget_s and step < steps:
                steps, stop = step, f"time budget of {budget_s:.0f} s spent after step {step}"
                break
        cis = plan[step]
        t = time.perf_counter()
        ctx = TrainingContext(pm, [context_ids(tok, text_by_index[ci]) for ci in cis])
        seconds["base_pass"] += time.perf_counter() - t
        step_losses = []
        for a in AGENTS:
            rows, index = [], []
            for j, ci in enumerate(cis):
                pool = by_context[ci].get(a, [])
                picked = rng.sample(pool, min(cfg.examples_per_context, len(pool)))
                rows += picked
                index += [j] * len(picked)
            if not rows:
                continue
            examples[a] += len(rows)
            batch = collate([encode(tok, r) for r in rows], tok.pad_token_id)
            batch["context_index"] = torch.tensor(index)
            for kind in kinds:
                t = time.perf_counter()
                key = (a, kind)
                loss = loss_fn(ctx, batch, a, kind)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(opts[key].param_groups[0]["params"], 1.0)
                opts[key].step()
                scheds[key].step()
                opts[key].zero_grad(set_to_none=True)
                step_losses.append((f"{a}/{kind}", loss.detach()))
                seconds[kind] += time.perf_counter() - t
        # one wait for the device per step (the losses), not one per agent and kind
        values = torch.stack([v for _, v in step_losses]).tolist() if step_losses else []
        for (k, _), v in zip(step_losses, values):
            losses[k].append(round(v, 4))
        done += 1
        seen += len(cis)
        bar.set_postfix({k: f"{sum(v[-20:]) / max(1, len(v[-20:])):.2f}" for k, v in losses.items()
                         if k.startswith(AGENTS[0]) and k.split("/")[1] in kinds})
        del ctx
    bar.close()
    stats["examples"] = stats["examples"] or examples
    return {"steps": done, "stopped": stop, "contexts_seen": seen,
            "seconds_per_step": round((time.perf_counter() - t1) / (done - 1), 3) if t1 and done > 1 else None}


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
