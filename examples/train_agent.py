"""Train an agent for ForkKV with a ``transformers.Trainer``, save it with PEFT, and serve it from a shared context.

The recipe measured to keep an agent's score under a fitted residual (README, "Training agents for ForkKV"), end to
end on SmolLM2-135M-Instruct (CPU) and the context benchmark's ``speaker`` task (eval/fidelity: "who says this line
of the scene above?"), the scenes held as ``datasets.Dataset`` objects:

1. a standard LoRA adapter (the teacher) is trained as usual: :class:`~forkkv_hf.training.ForkKVTrainer` with
   ``residual="exact"`` (ordinary fine-tuning, each example after its own scene);
2. a student starts from it (``copy_adapter``) and is distilled from it under the residual it will be served with,
   ``FittedResidual(rank)``: what ``SharedContext.fit_residuals(..., rank=rank)`` serves;
3. the student is saved with ``save_pretrained``, loaded back beside its teacher into a fresh ``PeftModel``, and both
   answer the held-out scenes' questions by ``generate``: the teacher with the scene prefilled by its own adapter
   (exact), the teacher and the student from one shared base pass plus their fitted residuals.

    python -m examples.train_agent [--steps 24] [--train-scenes 12] [--eval-scenes 4] [--rank 32] [--out DIR]

At the defaults it takes about 14 minutes on two CPU cores (830 s on 2026-12-07: teacher 332 s, student 461 s; it
printed 33.3 / 37.5 / 45.8 % on 24 questions). So short a training and so few questions show the workflow, not the
method's quality: eval/RESULTS.md has the measured runs (hundreds of steps and questions, paired intervals).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import forkkv_hf
from eval.cli import positive_int
from eval.agents import END
from eval.fidelity import tasks
from eval.fidelity.metrics import exact_match
from eval.fidelity.runner import own_prefill
from eval.fidelity.train import TARGETS, context_ids, encode, prompt_ids
from eval.quality.context_passes import stacked_cache
from eval.quality.metrics import generate_rows
from eval.smollm2 import load_smollm2
from forkkv_hf import SharedContext, batch_inputs
from forkkv_hf.training import FittedResidual, ForkKVCollator, ForkKVTrainer, copy_adapter

AGENT = "speaker"


def training_set(tok, split: dict):
    """The split's scenes as token ids and its ``speaker`` questions as a ``datasets.Dataset`` of ForkKVTrainer
    rows (``input_ids``, ``labels`` on the answer, ``context_index``)."""
    from datasets import Dataset

    contexts = [context_ids(tok, c) for c in split["contexts"]]
    rows = []
    for ex in split["examples"]:
        if ex["agent"] == AGENT:
            ids, labels = encode(tok, ex)
            rows.append({"input_ids": ids, "labels": labels, "context_index": ex["context_index"]})
    return contexts, Dataset.from_list(rows)


def train(pm, tok, contexts, dataset, adapter: str, steps: int, out: Path, **kwargs) -> float:
    """``steps`` optimizer steps of ``adapter`` through ForkKVTrainer (its progress bar and logging); the mean loss."""
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(out / f"trainer_{adapter}"), per_device_train_batch_size=4,
                             max_steps=steps, learning_rate=1e-3, warmup_steps=max(1, steps // 10),
                             lr_scheduler_type="cosine", logging_steps=max(1, steps // 6), report_to=[],
                             save_strategy="no", use_cpu=not torch.cuda.is_available(), seed=0)
    trainer = ForkKVTrainer(model=pm, args=args, train_dataset=dataset, contexts=contexts, adapter_name=adapter,
                            data_collator=ForkKVCollator(tok.pad_token_id), **kwargs)
    return trainer.train().training_loss


def evaluate(pm, tok, split: dict, teacher: str, student: str, rank: int) -> dict[str, float]:
    """Exact match (%) on the split's ``speaker`` questions, answered greedily: the teacher exact (each scene prefilled
    by its own adapter, plain PEFT), the teacher and the student under their rank-``rank`` fitted residuals (one base
    pass per scene, then each agent's own pass for its fit)."""
    eos = tok.convert_tokens_to_ids(END)
    names = ("teacher, exact", f"teacher, fitted rank {rank}", f"student, fitted rank {rank}")
    hits = {name: [] for name in names}
    for c in split["contexts"]:
        qs = [ex for ex in split["examples"] if ex["agent"] == AGENT and ex["context_index"] == c["context_index"]]
        ctx = context_ids(tok, c)
        inputs = batch_inputs(ctx, [prompt_ids(tok, q) for q in qs] * 2, pad_token_id=tok.pad_token_id)
        one = {k: v[: len(qs)] for k, v in inputs.items()}
        forkkv_hf.disable_forkkv(pm)
        own = stacked_cache({teacher: own_prefill(pm, teacher, ctx)}, [teacher] * len(qs))  # the scene, per row
        exact = generate_rows(pm, one, [teacher] * len(qs), own, 12, eos, tok.pad_token_id)
        forkkv_hf.enable_forkkv(pm)
        fitted = SharedContext.build(pm, ctx, [teacher, student], progress=False).fit_residuals(
            pm, [teacher, student], rank=rank, progress=False)
        rows = [teacher] * len(qs) + [student] * len(qs)
        served = generate_rows(pm, inputs, rows, fitted.fork(rows), 12, eos, tok.pad_token_id)
        for name, outs in zip(names, (exact, served[: len(qs)], served[len(qs):])):
            hits[name] += [exact_match(tok.decode(o, skip_special_tokens=True).strip(), q["answer"])
                           for o, q in zip(outs, qs)]
    return {name: 100.0 * sum(v) / len(v) for name, v in hits.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=positive_int, default=24, help="optimizer steps of each phase (teacher, then student)")
    ap.add_argument("--train-scenes", type=positive_int, default=12)
    ap.add_argument("--eval-scenes", type=positive_int, default=4)
    ap.add_argument("--rank", type=positive_int, default=32, help="the fitted residual's rank the student is distilled for")
    ap.add_argument("--out", type=Path, default=Path(".train_agent"), help="adapters and trainer files go here")
    ap.add_argument("--threads", type=positive_int, default=None, help="torch threads on CPU (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = load_smollm2()
    data = tasks.build(args.train_scenes, args.eval_scenes, per_agent=8, eval_per_agent=6)
    contexts, dataset = training_set(tok, data["train"])
    print(f"{len(dataset)} training questions over {len(contexts)} scenes "
          f"({sum(len(c) for c in contexts) // len(contexts)} tokens each on average)")

    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(TARGETS), task_type="CAUSAL_LM"),
                        adapter_name=AGENT)
    loss = train(pm, tok, contexts, dataset, AGENT, args.steps, args.out, residual="exact")
    print(f"1. teacher `{AGENT}` trained as usual: mean loss {loss:.3f}")
    student = f"{AGENT}_fit{args.rank}"
    copy_adapter(pm, AGENT, student)
    loss = train(pm, tok, contexts, dataset, student, args.steps, args.out, residual=FittedResidual(args.rank),
                 teacher_adapter=AGENT)
    print(f"2. student `{student}` distilled under FittedResidual({args.rank}): mean KL {loss:.4f}")
    folder = args.out / "adapters"
    pm.save_pretrained(str(folder), selected_adapters=[AGENT, student])

    from peft import PeftModel

    fresh, _ = load_smollm2()
    served = PeftModel.from_pretrained(fresh, str(folder / AGENT), adapter_name=AGENT)
    served.load_adapter(str(folder / student), adapter_name=student)
    served.eval()
    forkkv_hf.enable_forkkv(served)
    scores = evaluate(served, tok, data["eval"], AGENT, student, args.rank)
    n = sum(ex["agent"] == AGENT for ex in data["eval"]["examples"])
    print(f"3. saved to {folder}, loaded back, {n} held-out questions over {args.eval_scenes} scenes, exact match:")
    for name, em in scores.items():
        print(f"   {name:<28} {em:5.1f} %")
    print(f"done in {time.perf_counter() - t0:.0f} s (a short run: see eval/RESULTS.md for measured ones)")
    return scores


if __name__ == "__main__":
    main()
