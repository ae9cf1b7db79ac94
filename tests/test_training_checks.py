"""What ForkKV-aware training refuses or matches that an audit found unchecked: gradient checkpointing (the context
silently left out), sliding windows beyond what inference serves, the families' final-logit transforms, a bf16 model's
fp32 adapters, the first label after the context, and ForkKVTrainer against transformers' Trainer (the adapter it
trains, gradient accumulation, evaluate, label smoothing)."""

import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model

from forkkv_hf.training import ForkKVCollator, ForkKVTrainer, TrainingContext, forkkv_loss
from cases import parametrize
from models import tiny_llama, with_adapters
from test_model_families import _tiny
from test_training import ALL, _batch, _context, _Rows


def _peft_loss(pm, ctx, batch, name):
    """Ordinary fine-tuning's loss of ``batch`` after ``ctx``: the PeftModel's own forward over [context | rows]."""
    pm.set_adapter(name)
    B = batch["input_ids"].shape[0]
    ids = torch.cat([ctx.expand(B, -1), batch["input_ids"]], 1)
    labels = torch.cat([torch.full((B, ctx.numel()), -100), batch["labels"]], 1)
    mask = torch.cat([torch.ones(B, ctx.numel(), dtype=torch.long), batch["attention_mask"]], 1)
    return pm(input_ids=ids, attention_mask=mask, labels=labels).loss


def test_gradient_checkpointing_is_refused_not_left_to_drop_the_context():
    pm = with_adapters(tiny_llama(layers=2), {"agent": dict(target_modules=ALL)})
    tc = TrainingContext(pm, _context())
    pm.gradient_checkpointing_enable()
    pm.train()
    for residual in ("exact", "kv"):  # exact: 4.87 against 4.82 before (no context); kv: a shape error
        with pytest.raises(ValueError, match="gradient checkpointing is on"):
            forkkv_loss(pm, tc, _batch(), "agent", residual)
    pm.eval()  # its layers keep the cache outside training mode
    forkkv_loss(pm, tc, _batch(), "agent", "kv")


def test_rows_beyond_a_sliding_window_are_refused_as_inference_refuses_them():
    pm = with_adapters(_tiny("Mistral", sliding_window=8), {"agent": dict(target_modules=ALL)})
    tc = TrainingContext(pm, _context())
    with pytest.raises(ValueError, match="sliding-window attention \\(window 8\\)"):
        forkkv_loss(pm, tc, _batch(), "agent", "kv")
    torch.testing.assert_close(forkkv_loss(pm, tc, _batch(), "agent", "exact"),
                               _peft_loss(pm, _context(), _batch(), "agent"))


FINAL_LOGITS = {"Gemma2": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=64, attn_implementation="eager",
                          final_logit_softcapping=0.5),
                "Granite": dict(logits_scaling=8.0), "Cohere": dict(logit_scale=0.0625)}


@parametrize("family", list(FINAL_LOGITS))
def test_the_loss_applies_the_models_final_logit_transform(family):
    """Gemma 2's final soft-capping, Granite's logits_scaling, Cohere's logit_scale: residual="exact" is ordinary
    fine-tuning (Gemma 2's loss was 26.3 against PEFT's 20.2 before)."""
    pm = with_adapters(_tiny(family, **FINAL_LOGITS[family]), {"agent": dict(target_modules=["q_proj", "v_proj"])})
    torch.testing.assert_close(forkkv_loss(pm, TrainingContext(pm, _context()), _batch(), "agent", "exact"),
                               _peft_loss(pm, _context(), _batch(), "agent"))


def test_a_bf16_models_fp32_adapters_train_under_the_residual():
    """get_peft_model keeps a bf16 model's adapters in fp32: the residual's LoRA runs in their dtype, as PEFT's forward
    (before, a dtype error for residual="kv" and "v")."""
    pm = get_peft_model(tiny_llama(layers=2, dtype=torch.bfloat16), LoraConfig(r=4, target_modules=ALL),
                        adapter_name="agent")
    tc = TrainingContext(pm, _context())
    for residual in ("kv", "v"):
        loss = forkkv_loss(pm, tc, _batch(), "agent", residual)
        loss.backward()
        v_proj = pm.base_model.model.model.layers[1].self_attn.v_proj
        assert torch.isfinite(loss) and v_proj.lora_B["agent"].weight.grad is not None


def test_a_label_on_the_first_token_after_the_context_is_said_not_to_be_learned(caplog):
    from forkkv_hf.log import warn_once

    warn_once.cache_clear()
    pm = with_adapters(tiny_llama(layers=2), {"agent": dict(target_modules=ALL)})
    tc = TrainingContext(pm, _context())
    batch = _batch()
    batch["labels"][:, 0] = batch["input_ids"][:, 0]
    with caplog.at_level(logging.WARNING, logger="forkkv_hf"):
        forkkv_loss(pm, tc, batch, "agent", "exact")
    assert "first token after the context are not learned" in caplog.text
    one = {"input_ids": batch["input_ids"][:, :1], "labels": batch["input_ids"][:, :1]}
    with pytest.raises(ValueError, match="or only the first token, which follows the context, is labelled"):
        forkkv_loss(pm, tc, one, "agent")


def _trainer(tmp_path, pm, rows, **kw):
    from transformers import TrainingArguments

    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, learning_rate=1.0,
                report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, optim="sgd", max_grad_norm=0.0,
                weight_decay=0.0, lr_scheduler_type="constant")
    args.update(kw.pop("args", {}))
    kw.setdefault("data_collator", ForkKVCollator(0))
    return ForkKVTrainer(model=pm, args=TrainingArguments(**args), train_dataset=_Rows(rows), contexts=[_context()],
                         **kw)


def _rows(n=2):
    batch = _batch(B=n, pad_last=0)
    batch["labels"][0, 2:4] = -100  # rows of 2 and 4 labelled targets: their weights differ by token
    return [{"input_ids": batch["input_ids"][i].tolist(), "labels": batch["labels"][i].tolist(), "context_index": 0}
            for i in range(n)]


def _lora_state(pm):
    return {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_" in n}


def test_the_trainer_trains_the_named_adapter_only(tmp_path):
    """adapter_name other than the active adapter: before, the optimizer held the active adapter's weights (and
    trained nothing of the named one)."""
    pm = with_adapters(tiny_llama(layers=2), {"agent": dict(target_modules=ALL), "other": dict(target_modules=ALL)})
    pm.set_adapter("agent")
    before = _lora_state(pm)
    _trainer(tmp_path, pm, _rows(), adapter_name="other").train()
    moved = {n.split(".")[-2] for n, p in _lora_state(pm).items() if not torch.equal(p, before[n])}
    assert moved == {"other"}


def test_gradient_accumulation_makes_the_update_of_one_batch(tmp_path):
    """Batch 1 x 2 accumulation steps updates as batch 2 x 1, as transformers' Trainer does (each micro-batch
    normalised by the tokens of the whole step; before, by its own: 16% off here)."""
    updates = []
    for batch, steps in ((2, 1), (1, 2)):
        pm = with_adapters(tiny_llama(layers=2), {"agent": dict(target_modules=ALL)})
        before = _lora_state(pm)
        _trainer(tmp_path, pm, _rows(), args=dict(per_device_train_batch_size=batch,
                                                  gradient_accumulation_steps=steps)).train()
        updates.append(torch.cat([(p - before[n]).flatten() for n, p in _lora_state(pm).items()]))
    torch.testing.assert_close(updates[1], updates[0], rtol=1e-4, atol=1e-6)


def test_evaluate_reports_the_loss_and_label_smoothing_is_refused(tmp_path):
    pm = with_adapters(tiny_llama(layers=2), {"agent": dict(target_modules=ALL)})
    trainer = _trainer(tmp_path, pm, _rows(), args=dict(prediction_loss_only=True))
    assert torch.isfinite(torch.tensor(trainer.evaluate(_Rows(_rows()))["eval_loss"]))
    with pytest.raises(ValueError, match="label_smoothing_factor=0.3"):
        _trainer(tmp_path, pm, _rows(), args=dict(label_smoothing_factor=0.3))
    with pytest.raises(ValueError, match="drop compute_loss_func"):
        _trainer(tmp_path, pm, _rows(), compute_loss_func=lambda *a, **k: 0)


def test_k_residuals_inference_refuses_are_refused_in_training():
    """Interleaved RoPE (Cohere) trained a K residual inference refuses (logits 0.037 off the model's own where
    ForkKV is exact, silently); partial rotary (StableLM) failed inside apply_rope. Both now say so; V still trains."""
    for family, kw, message in (("Cohere", dict(logit_scale=1.0), "not rotate-half RoPE"),
                                ("StableLm", dict(partial_rotary_factor=0.25), "partial rotary")):
        pm = with_adapters(_tiny(family, **kw), {"agent": dict(target_modules=["k_proj", "v_proj"])})
        ctx = TrainingContext(pm, _context())
        with pytest.raises(ValueError, match=message):
            forkkv_loss(pm, ctx, _batch(), "agent", residual="kv")
        assert torch.isfinite(forkkv_loss(pm, ctx, _batch(), "agent", residual="v"))


@parametrize("rope", ["dynamic", "longrope"])
def test_rows_past_a_length_dependent_ropes_limit_are_refused(rope):
    """Context (17) + suffix (6) past a dynamic-NTK / longrope limit of 20: the context's base pass was rotated for
    its own length, so neither ForkKV nor "exact" (0.16-0.79 off plain fine-tuning) was the model's pass; refused,
    as inference refuses such rows. Rows within the limit train."""
    params = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0} if rope == "dynamic" else \
        {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8, "long_factor": [4.0] * 8,
         "original_max_position_embeddings": 20}
    model = tiny_llama(layers=2, max_pos=20 if rope == "dynamic" else 64, rope_parameters=params)
    pm = with_adapters(model, {"agent": dict(target_modules=ALL)})
    ctx = TrainingContext(pm, _context())
    for residual in ("exact", "kv"):
        with pytest.raises(ValueError, match="frequencies depend on the sequence length"):
            forkkv_loss(pm, ctx, _batch(pad_last=0), "agent", residual=residual)
        assert torch.isfinite(forkkv_loss(pm, ctx, _batch(L=3, pad_last=0), "agent", residual=residual))


def test_merged_adapters_are_refused_at_each_step():
    """A merged adapter: the context's base pass unmerged it for good (merged before) or the suffix saw it over a
    context without it (merged after: 0.83 off, silently). Refused."""
    pm = with_adapters(tiny_llama(layers=2), {"agent": dict(target_modules=ALL),
                                              "other": dict(target_modules=["q_proj", "o_proj"])})
    pm.merge_adapter(["other"])
    with pytest.raises(ValueError, match=r"adapters \['other'\] are merged"):
        TrainingContext(pm, _context())
    pm.unmerge_adapter()
    ctx = TrainingContext(pm, _context())
    pm.merge_adapter(["other"])
    with pytest.raises(ValueError, match=r"adapters \['other'\] are merged"):
        forkkv_loss(pm, ctx, _batch(), "agent")
    pm.unmerge_adapter()
    assert torch.isfinite(forkkv_loss(pm, ctx, _batch(), "agent"))


def test_a_refused_forward_leaves_no_adapter_to_the_training_steps():
    """A forward with ``adapter_names`` refused inside leaves PEFT's hooks on the LoRA layers (PEFT removes them only
    when the forward returns): the next training step of another agent ran the refused call's adapter on its suffix
    (loss 4.93 -> 4.85, silently). The wrapper and the training forward remove them."""
    import forkkv_hf
    from forkkv_hf import SharedContext, cache_kwargs

    pm = with_adapters(tiny_llama(layers=2), {"agent": dict(target_modules=ALL), "other": dict(target_modules=ALL)})
    ctx_ids, batch = _context(), _batch(pad_last=0)
    ctx = TrainingContext(pm, ctx_ids)
    want = forkkv_loss(pm, ctx, batch, "agent").item()
    forkkv_hf.enable_forkkv(pm)
    shared = SharedContext.build(pm, ctx_ids, ["other"], progress=False)
    forkkv_hf.disable_forkkv(pm)  # the forward below is then refused inside the attention
    full = torch.cat([torch.ones(2, ctx_ids.numel(), dtype=torch.long), batch["attention_mask"]], 1)
    with pytest.raises(ValueError, match="enable_forkkv"), torch.no_grad():
        pm(input_ids=batch["input_ids"], attention_mask=full, adapter_names=["other"] * 2,
           **cache_kwargs(shared.fork(["other"] * 2)))
    assert forkkv_loss(pm, ctx, batch, "agent").item() == pytest.approx(want, abs=1e-6)


def test_left_padded_rows_do_not_learn_a_label_from_padding(caplog):
    """A left-padded row's first real token was learned from the pad position before it (which sees only the
    context): the loss counted one label more than the unpadded rows give. Dropped and said now, as for the first
    token after the context."""
    from forkkv_hf.log import warn_once

    warn_once.cache_clear()
    pm = with_adapters(tiny_llama(layers=2), {"agent": dict(target_modules=ALL)})
    tc = TrainingContext(pm, _context())
    ids = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 0] = -100
    with caplog.at_level(logging.WARNING, logger="forkkv_hf"):
        padded = forkkv_loss(pm, tc, {"input_ids": ids, "attention_mask": mask, "labels": labels}, "agent", "kv")
    assert "labels right after padding are not learned" in caplog.text
    # the same labels without the padding: row 1 keeps only its label on 10 (9 follows the context)
    rows = [{"input_ids": ids[:1], "labels": labels[:1]}, {"input_ids": ids[1:, 2:], "labels": labels[1:, 2:]}]
    sums = [forkkv_loss(pm, tc, r, "agent", "kv") * (r["labels"][:, 1:] != -100).sum() for r in rows]
    torch.testing.assert_close(padded, sum(sums) / 4)
    # the collator does not count them either (Trainer's num_items_in_batch: the loss's scale was 6/7 off)
    examples = [{"input_ids": i.tolist(), "labels": l.tolist(), "attention_mask": m.tolist(), "context_index": 0}
                for i, l, m in zip(ids, labels, mask)]
    collated = ForkKVCollator(0)(examples)
    assert int((collated["labels"][:, 1:] != -100).sum()) == 4


def test_exact_training_refuses_padding_inside_rows_on_sliding_window_models():
    """residual="exact" ran rows with padding inside (a shorter context among several, left pads) on a sliding-window
    model: transformers placed the window by column, so those rows lost tokens of their window (0.8 off alone)."""
    pm = with_adapters(_tiny("Mistral", sliding_window=8), {"agent": dict(target_modules=ALL)})
    two = TrainingContext(pm, [_context(), _context(seed=3)[:5]])
    batch = {**_batch(pad_last=0), "context_index": torch.tensor([0, 1])}
    with pytest.raises(ValueError, match="hold padding before real tokens"):
        forkkv_loss(pm, two, batch, "agent", "exact")
    left = _batch(pad_last=0)
    left["attention_mask"][1, :1] = 0
    with pytest.raises(ValueError, match="hold padding before real tokens"):
        forkkv_loss(pm, TrainingContext(pm, _context()), left, "agent", "exact")


def test_the_trainer_resumes_training_the_named_adapter(tmp_path):
    """Resuming from a checkpoint reloaded the adapters trainable only if active and the optimizer took the active
    one's weights: a student distilled from the active teacher (the README's workflow) trained nothing, silently."""
    from forkkv_hf.training import copy_adapter

    def make():
        pm = with_adapters(tiny_llama(layers=2), {"teacher": dict(target_modules=ALL)})
        copy_adapter(pm, "teacher", "student")
        return pm

    args = dict(max_steps=1, save_strategy="steps", save_steps=1, learning_rate=1e-2)
    _trainer(tmp_path, make(), _rows(), adapter_name="student", teacher_adapter="teacher", args=args).train()
    pm = make()
    before = _lora_state(pm)
    trainer = _trainer(tmp_path, pm, _rows(), adapter_name="student", teacher_adapter="teacher",
                       args={**args, "max_steps": 3})
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    moved = {n.split(".")[-2] for n, p in _lora_state(pm).items() if not torch.equal(p, before[n])}
    assert moved == {"student"}
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(".student." in n for n, p in pm.named_parameters() if id(p) in held)


def test_the_trainer_autocasts_under_bf16_and_refuses_what_it_cannot_train(tmp_path):
    """bf16=True: accelerate autocasts the wrapped model's forward, which the loss does not call, so the trainer ran
    in fp32 (same loss as without); now under the accelerator's autocast. A single context given as contexts=ids and
    a misspelt adapter_name failed only at the first step, with misleading errors."""
    pm = with_adapters(tiny_llama(layers=2), {"agent": dict(target_modules=ALL)})
    seen = []
    hook = pm.get_base_model().model.layers[0].self_attn.q_proj.base_layer.register_forward_hook(
        lambda m, i, o: seen.append(o.dtype))
    try:
        trainer = _trainer(tmp_path, pm, _rows(), args=dict(bf16=True))
        trainer.evaluate(_Rows(_rows()))
    finally:
        hook.remove()
    assert torch.bfloat16 in seen
    with pytest.raises(TypeError, match=r"one context's token ids: pass \[context_ids\]"):
        ForkKVTrainer(model=pm, args=trainer.args, train_dataset=_Rows(_rows()), contexts=_context(),
                      data_collator=ForkKVCollator(0))
    with pytest.raises(ValueError, match="agnet"):
        _trainer(tmp_path, pm, _rows(), adapter_name="agnet")


def test_the_best_checkpoint_loads_each_adapter_from_its_own_files(tmp_path):
    """``load_best_model_at_end``: Trainer loads the best checkpoint's top-level adapter files (the "default"
    adapter's) into the active adapter; a student distilled from a teacher named "default" (what ``get_peft_model``
    names it) ended as the teacher's copy, silently (an audit's finding). It now ends as its best checkpoint."""
    from safetensors.torch import load_file

    from forkkv_hf.training import copy_adapter

    pm = with_adapters(tiny_llama(layers=2), {"default": dict(target_modules=ALL)})
    copy_adapter(pm, "default", "student")
    args = dict(max_steps=3, learning_rate=5e-2, eval_strategy="steps", eval_steps=1, save_strategy="steps",
                save_steps=1, load_best_model_at_end=True)
    trainer = _trainer(tmp_path, pm, _rows(), adapter_name="student", teacher_adapter="default", args=args,
                       eval_dataset=_Rows(_rows()))
    trainer.train()
    saved = load_file(str(tmp_path / trainer.state.best_model_checkpoint / "student" / "adapter_model.safetensors"))
    got = {n: p for n, p in pm.named_parameters() if ".student." in n}
    assert got and not any(torch.equal(p, dict(pm.named_parameters())[n.replace(".student.", ".default.")])
                           for n, p in got.items() if "lora_A" in n)
    for key, value in saved.items():  # PEFT's saved names drop the adapter's
        name = next(n for n in got if n.replace(".student", "").endswith(key.replace("base_model.model.", "", 1)))
        assert torch.equal(got[name], value), name


def test_a_left_padding_collator_counts_the_labels_the_loss_learns(tmp_path):
    """A collator padding on the left (a tokenizer's ``padding_side="left"``): Trainer counted the label right after
    the pads, which the loss does not learn, and divided by that count (evaluate() 19% low and every step scaled down
    in an audit's case). The evaluation loss now equals the mean loss of the learned labels."""
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": list(ids), "context_index": 0}
            for ids in (torch.randint(3, 128, (n,), generator=g).tolist() for n in (8, 3, 3, 3))]

    def left_collator(examples):
        W = max(len(e["input_ids"]) for e in examples)
        ids, labels = torch.zeros(len(examples), W, dtype=torch.long), torch.full((len(examples), W), -100)
        mask = torch.zeros(len(examples), W, dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[i, W - n:], labels[i, W - n:], mask[i, W - n:] = torch.tensor(e["input_ids"]), torch.tensor(
                e["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask,
                "context_index": torch.tensor([e["context_index"] for e in examples])}

    pm = with_adapters(tiny_llama(layers=2), {"agent": dict(target_modules=["q_proj", "k_proj", "v_proj"])})
    trainer = _trainer(tmp_path, pm, rows, data_collator=left_collator, args=dict(per_device_eval_batch_size=4))
    with torch.no_grad():
        want = forkkv_loss(pm, TrainingContext(pm, _context()), left_collator(rows), "agent")  # its own count
    torch.testing.assert_close(torch.tensor(trainer.evaluate(_Rows(rows))["eval_loss"]), want, rtol=1e-5, atol=1e-6)


def test_metrics_and_predictions_are_refused(tmp_path):
    """compute_metrics was called with no predictions, and predict() returned none, silently."""
    pm = with_adapters(tiny_llama(layers=2), {"agent": dict(target_modules=ALL)})
    with pytest.raises(ValueError, match="drop compute_metrics"):
        _trainer(tmp_path, pm, _rows(), compute_metrics=lambda p: {})
    with pytest.raises(ValueError, match="no predictions"):
        _trainer(tmp_path, pm, _rows()).predict(_Rows(_rows()))
