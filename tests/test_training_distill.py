"""Distillation into ForkKV-aware training (forkkv_hf.training.distill) on tiny random models: the loss is the
temperature-scaled KL of a hand-written full-vocabulary reference and so are its gradients, a student copied from
its teacher has nothing to learn where it computes what the teacher does and something to learn under ForkKV,
ForkKVTrainer with a teacher trains the student only, and what cannot work is refused with what to do."""

import pytest
import torch
from cases import parametrize
from models import tiny_llama, with_adapters
from peft import PeftModel
from test_training import ALL, _batch, _context, _Rows

from forkkv_hf.training import (FittedResidual, ForkKVCollator, ForkKVTrainer, TrainingContext, copy_adapter,
                                forkkv_distill_loss, forkkv_logits)


def _teacher_and_student(layers=3, **teacher):
    """A model with adapter "teacher" (LoRA on every projection of every layer unless told) and "student", its copy."""
    pm = with_adapters(tiny_llama(layers=layers), {"teacher": teacher or dict(target_modules=ALL)})
    copy_adapter(pm, "teacher", "student")
    return pm


def _weights(pm, name):
    return {n: p.detach().clone() for n, p in pm.named_parameters() if f".{name}." in n}


def _student_params(pm):
    return [p for n, p in pm.named_parameters() if ".student." in n]


def test_copy_adapter_makes_identical_logits(tmp_path):
    """A copy computes what its source computes (ForkKV and exact), on an adapter loaded from disk (its config frozen
    for inference), and is its own weights: changing it leaves the source as it was."""
    with_adapters(tiny_llama(layers=2), {"teacher": dict(target_modules=ALL)}).save_pretrained(tmp_path)
    pm = PeftModel.from_pretrained(tiny_llama(layers=2), tmp_path / "teacher", adapter_name="teacher")
    assert pm.peft_config["teacher"].inference_mode
    copy_adapter(pm, "teacher", "student")
    assert list(pm.active_adapters) == ["teacher"]
    assert not pm.peft_config["student"].inference_mode
    assert pm.peft_config["student"].target_modules == pm.peft_config["teacher"].target_modules
    teacher, student = _weights(pm, "teacher"), _weights(pm, "student")
    assert len(student) == len(teacher) == 2 * 7 * 2
    ctx, batch = TrainingContext(pm, _context()), _batch()
    with torch.no_grad():
        for residual in ("kv", "exact"):
            assert torch.equal(forkkv_logits(pm, ctx, batch, "student", residual),
                               forkkv_logits(pm, ctx, batch, "teacher", residual))
        for p in _student_params(pm):
            p.add_(0.1)
        assert not torch.equal(forkkv_logits(pm, ctx, batch, "student", "kv"), forkkv_logits(pm, ctx, batch,
                                                                                             "teacher", "kv"))
    assert all(torch.equal(p, teacher[n]) for n, p in _weights(pm, "teacher").items())


def test_a_copy_keeps_its_sources_dropout_mode():
    """add_adapter makes new dropout modules in training mode: the copy of an eval-mode model's adapter dropped out
    at inference (its greedy rows 0.9 off its source's, and off its own from one call to the next)."""
    pm = _teacher_and_student(layers=2, target_modules=ALL, lora_dropout=0.5)
    pm.eval()
    copy_adapter(pm, "teacher", "copy")
    drops = [m.lora_dropout for m in pm.modules() if hasattr(m, "lora_dropout") and "copy" in m.lora_dropout]
    assert drops and not any(d["copy"].training for d in drops)
    ctx, batch = TrainingContext(pm, _context()), _batch()
    with torch.no_grad():
        assert torch.equal(forkkv_logits(pm, ctx, batch, "copy", "kv"), forkkv_logits(pm, ctx, batch, "teacher", "kv"))


def test_student_equal_to_its_teacher_has_nothing_to_learn():
    """Student = copy of the teacher and both under exact inference: the KL is 0 and so are its gradients (which
    still reach every student weight). The teacher has LoRA dropout, the student none, the model is in training
    mode: 0 only if the teacher's targets come from eval mode (deterministic, no dropout)."""
    pm = _teacher_and_student(target_modules=ALL, lora_dropout=0.5)
    for m in pm.modules():
        if hasattr(m, "lora_dropout") and "student" in m.lora_dropout:
            m.lora_dropout["student"] = torch.nn.Identity()
    pm.train()
    ctx, batch = TrainingContext(pm, _context()), _batch()
    loss = forkkv_distill_loss(pm, ctx, batch, "student", "teacher", residual="exact")
    grads = torch.autograd.grad(loss, _student_params(pm))
    assert abs(loss.item()) < 1e-6
    assert max(g.abs().max().item() for g in grads) < 1e-6


def _reference(pm, ctx, batch, temperature, ce_weight, num_items, residual="kv"):
    """The distillation loss from full-vocabulary logits (forkkv_logits) of every position, then the labelled ones;
    the student under ``residual``."""
    with torch.no_grad():
        teacher = forkkv_logits(pm, ctx, batch, "teacher", residual="exact")
    student = forkkv_logits(pm, ctx, batch, "student", residual=residual)
    keep = batch["labels"][:, 1:] != -100
    t, s = teacher[:, :-1][keep] / temperature, student[:, :-1][keep] / temperature
    p_t = torch.softmax(t, -1)
    kl = (p_t * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum() * temperature**2
    ce = torch.nn.functional.cross_entropy(student[:, :-1][keep], batch["labels"][:, 1:][keep], reduction="sum")
    return (kl + ce_weight * ce) / (keep.sum() if num_items is None else num_items)


@parametrize("temperature, ce_weight, num_items", [(2.0, 0.0, None), (2.0, 0.5, 11), (1.0, 1.0, None)])
def test_loss_and_gradients_equal_a_full_vocabulary_reference(temperature, ce_weight, num_items):
    pm = _teacher_and_student()
    with torch.no_grad():  # a student that differs from its teacher everywhere, not only by ForkKV
        for p in _student_params(pm):
            p.mul_(0.7)
    pm.train()
    teacher_flags = [p.requires_grad for n, p in pm.named_parameters() if ".teacher." in n]
    ctx, batch = TrainingContext(pm, _context()), _batch(B=3)
    params = _student_params(pm)
    loss = forkkv_distill_loss(pm, ctx, batch, "student", "teacher", temperature=temperature, ce_weight=ce_weight,
                               num_items_in_batch=num_items)
    grads = torch.autograd.grad(loss, params)
    want = _reference(pm, ctx, batch, temperature, ce_weight, num_items)
    want_grads = torch.autograd.grad(want, params)
    assert loss.item() > 1e-3
    assert abs(loss.item() - want.item()) <= 1e-5 * want.item()
    for g, w in zip(grads, want_grads):  # fp32 sums in another order: ~1e-5 of the largest gradient apart
        assert (g - w).abs().max() <= 1e-4 * w.abs().max() + 1e-9
    assert max(g.abs().max().item() for g in grads) > 0
    # the teacher ran in eval mode and its weights keep their requires_grad; the model is back in training mode
    assert [p.requires_grad for n, p in pm.named_parameters() if ".teacher." in n] == teacher_flags
    assert pm.training and all(m.training for m in pm.modules())


def test_forkkv_student_learns_its_teacher():
    """Under ForkKV the copy differs from its teacher under exact inference (LoRA on every layer drifts the context
    K/V): the loss is above 0 and a few AdamW steps on the student lower it; the teacher does not move."""
    pm = _teacher_and_student()
    pm.set_adapter("student")
    pm.train()
    teacher = _weights(pm, "teacher")
    ctx, batch = TrainingContext(pm, _context()), _batch(B=4, pad_last=0)
    opt = torch.optim.AdamW(_student_params(pm), lr=1e-4)  # the KL is small: larger steps overshoot it
    losses = []
    for _ in range(12):
        loss = forkkv_distill_loss(pm, ctx, batch, "student", "teacher")
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[0] > 1e-3, losses
    assert losses[-1] < 0.6 * losses[0], losses
    assert all(torch.equal(p, teacher[n]) for n, p in _weights(pm, "teacher").items())
    # the teacher's forward (set_adapter) left it frozen, as set_adapter("student") made it
    assert not any(p.requires_grad for n, p in pm.named_parameters() if ".teacher." in n)


def test_distillation_under_a_fitted_residual():
    """The student under residuals fitted to its own pass (``FittedResidual(r)``, what ``SharedContext.fit_residuals``
    serves) distilled from the teacher under exact inference (issue 20's probe, variant ``klfitR``). At full width
    (2 KV heads x 16 dims over a context of more tokens) the fit is the student's own pass, so the teacher's copy has
    nothing to learn; at rank 2 it has: the loss and its gradients are the full-vocabulary reference's with the
    student's logits under the fit, and a few steps lower it."""
    pm = _teacher_and_student()
    pm.set_adapter("student")
    pm.train()
    ctx = TrainingContext(pm, torch.randint(3, 128, (40,), generator=torch.Generator().manual_seed(4)))
    batch = _batch(B=3, pad_last=0)
    assert abs(forkkv_distill_loss(pm, ctx, batch, "student", "teacher", residual=FittedResidual(32)).item()) < 1e-5
    params = _student_params(pm)
    loss = forkkv_distill_loss(pm, ctx, batch, "student", "teacher", residual=FittedResidual(2))
    want = _reference(pm, ctx, batch, 1.0, 0.0, None, residual=FittedResidual(2))
    assert loss.item() > 1e-4 and abs(loss.item() - want.item()) <= 1e-5 * want.item()
    for g, w in zip(torch.autograd.grad(loss, params), torch.autograd.grad(want, params)):
        assert (g - w).abs().max() <= 1e-4 * w.abs().max() + 1e-9
    opt = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    for _ in range(10):
        loss = forkkv_distill_loss(pm, ctx, batch, "student", "teacher", residual=FittedResidual(2))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_trainer_with_a_teacher_trains_the_student_only(tmp_path):
    from transformers import TrainingArguments

    pm = _teacher_and_student()
    pm.set_adapter("teacher")  # active and trainable, as get_peft_model leaves it: the trainer must freeze it
    assert all(p.requires_grad for n, p in pm.named_parameters() if ".teacher." in n)
    contexts = [_context(seed=s) for s in (5, 6)]
    batch = _batch(B=4, pad_last=0)
    rows = [{"input_ids": batch["input_ids"][i].tolist(), "labels": batch["labels"][i].tolist(), "context_index": i % 2}
            for i in range(4)]
    teacher, student = _weights(pm, "teacher"), _weights(pm, "student")
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True, logging_steps=1, disable_tqdm=True)
    trainer = ForkKVTrainer(model=pm, args=args, train_dataset=_Rows(rows), contexts=contexts, adapter_name="student",
                            teacher_adapter="teacher", temperature=2.0, ce_weight=0.5, data_collator=ForkKVCollator(0))
    # the optimizer, built when training starts, takes what requires grad: the student, not the teacher
    assert all(p.requires_grad == (".student." in n) for n, p in pm.named_parameters() if "lora_" in n)
    # the trainer's loss is the distillation loss of each context's rows, weighted by their labelled tokens
    collated = ForkKVCollator(0)(rows)
    pm.train()
    with torch.no_grad():
        got = trainer.compute_loss(pm, dict(collated)).item()
        parts = [(forkkv_distill_loss(pm, TrainingContext(pm, contexts[c]), {k: collated[k][c::2] for k in (
                  "input_ids", "attention_mask", "labels")}, "student", "teacher", temperature=2.0, ce_weight=0.5).item(),
                  (collated["labels"][c::2, 1:] != -100).sum().item()) for c in (0, 1)]
    assert abs(got - sum(l * n for l, n in parts) / sum(n for _, n in parts)) < 1e-5
    trainer.train()
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == {id(p) for p in _student_params(pm)}
    assert all(torch.equal(p, teacher[n]) for n, p in _weights(pm, "teacher").items())
    trained = _weights(pm, "student")
    assert all(not torch.equal(p, student[n]) for n, p in trained.items())
    pm.save_pretrained(tmp_path / "saved", selected_adapters=["student"])
    served = PeftModel.from_pretrained(tiny_llama(layers=3), tmp_path / "saved" / "student", adapter_name="student")
    assert all(torch.equal(p, trained[n]) for n, p in _weights(served, "student").items())
    assert len(_weights(served, "student")) == len(trained)


def test_refusals(tmp_path):
    from transformers import TrainingArguments

    pm = _teacher_and_student(layers=2)
    ctx, batch = TrainingContext(pm, _context()), _batch()
    with pytest.raises(ValueError, match="same adapter 'teacher'.*copy_adapter"):
        forkkv_distill_loss(pm, ctx, batch, "teacher", "teacher")
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nobody'\]"):
        forkkv_distill_loss(pm, ctx, batch, "student", "nobody")
    with pytest.raises(ValueError, match="teacher_adapter must be the name of a LoRA adapter.*load_adapter"):
        forkkv_distill_loss(pm, ctx, batch, "student", "__base__")
    for temperature in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            forkkv_distill_loss(pm, ctx, batch, "student", "teacher", temperature=temperature)
    with pytest.raises(ValueError, match="ce_weight must be >= 0"):
        forkkv_distill_loss(pm, ctx, batch, "student", "teacher", ce_weight=-1.0)
    with pytest.raises(ValueError, match="teacher_residual must be one of"):
        forkkv_distill_loss(pm, ctx, batch, "student", "teacher", teacher_residual="full")
    with pytest.raises(ValueError, match="nothing to learn"):
        forkkv_distill_loss(pm, ctx, {**batch, "labels": torch.full_like(batch["labels"], -100)}, "student", "teacher")
    with pytest.raises(ValueError, match="'student' already exists.*delete_adapter"):
        copy_adapter(pm, "teacher", "student")
    with pytest.raises(ValueError, match="unknown adapter"):
        copy_adapter(pm, "nobody", "other")
    with pytest.raises(TypeError, match="needs a peft.PeftModel"):
        copy_adapter(tiny_llama(), "teacher", "student")
    with pytest.raises(ValueError, match="same adapter"):
        ForkKVTrainer(model=pm, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
                      contexts=[_context()], teacher_adapter="teacher", adapter_name="teacher",
                      data_collator=ForkKVCollator(0))
    assert sorted(pm.peft_config) == ["student", "teacher"]
