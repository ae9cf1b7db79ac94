"""``transformers.Trainer`` integration of ForkKV-aware training: :class:`ForkKVTrainer` and its collator.

Each training example is the suffix of one shared context (``input_ids``, ``labels``; the prompt and answer that
come after it) plus ``context_index``, the position of its context in the ``contexts`` list given to the trainer.
The trainer keeps the base pass of recently used contexts (:class:`~forkkv_hf.training.TrainingContext`) so that
consecutive batches over one context pay for one base pass; a dataset sorted or grouped by context uses that best.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from transformers import Trainer

from ..peft.lora_factors import check_adapter_names
from .context import TrainingContext
from .distill import check_distill_args, forkkv_distill_loss
from .loss import check_residual, forkkv_loss, learned_labels

#: the columns ForkKVTrainer reads from a dataset
COLUMNS = ("input_ids", "attention_mask", "labels", "context_index")


class ForkKVCollator:
    """Pads examples ``{"input_ids", "labels", "context_index"[, "attention_mask"]}`` on the right into a batch of
    tensors: ``input_ids``/``attention_mask``/``labels`` ``[B, L_max]`` (``pad_token_id`` / 0 / -100 on padding),
    ``context_index [B]``."""

    def __init__(self, pad_token_id: int):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None; pass the tokenizer's pad_token_id (or eos_token_id)")
        self.pad_token_id = int(pad_token_id)

    def __call__(self, examples: list[dict]) -> dict:
        for key in ("input_ids", "labels", "context_index"):
            if key not in examples[0]:
                raise KeyError(f"training examples need {key!r} (got keys {sorted(examples[0])}); see ForkKVTrainer")
        width = max(len(e["input_ids"]) for e in examples)
        B = len(examples)
        ids = torch.full((B, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, width), -100, dtype=torch.long)
        mask = torch.zeros((B, width), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            if len(e["labels"]) != n:
                raise ValueError(f"example {i}: labels ({len(e['labels'])}) and input_ids ({n}) differ in length")
            ids[i, :n] = torch.as_tensor(e["input_ids"])
            labels[i, :n] = torch.as_tensor(e["labels"])
            mask[i, :n] = torch.as_tensor(e["attention_mask"]) if "attention_mask" in e else 1
        # a label right after padding of the example's own is not learned (forkkv_hf.training.loss): not counted
        # either, so that Trainer's num_items_in_batch counts what the loss sums
        labels[:, 1:] = learned_labels(labels, mask)[:, 1:]
        index = torch.tensor([int(e["context_index"]) for e in examples], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "context_index": index}


class ForkKVTrainer(Trainer):
    """A ``transformers.Trainer`` that trains one LoRA adapter of a ``PeftModel`` under ForkKV's semantics.

    ``contexts``: the shared contexts' token ids (a list; example ``i`` reads ``contexts[context_index[i]]``).
    ``adapter_name``: the adapter to train (default: the model's active adapter). ``residual``: ``"kv"`` (default),
    ``"v"``, ``"none"``, ``"exact"`` or a :class:`~forkkv_hf.training.FittedResidual` (see
    :func:`~forkkv_hf.training.forkkv_loss`). ``max_cached_contexts``:
    base passes kept (least recently used dropped). ``teacher_adapter``: distil from that adapter of the model
    under ``teacher_residual`` (default ``"exact"``) with :func:`~forkkv_hf.training.forkkv_distill_loss`
    (``temperature``, ``ce_weight``) instead of learning the labels; the student ``adapter_name`` is then made
    trainable and the teacher frozen (start the student from it with :func:`~forkkv_hf.training.copy_adapter`).
    Everything else is ``Trainer``'s; pass
    ``data_collator=ForkKVCollator(tokenizer.pad_token_id)`` (the default when omitted needs ``processing_class``
    with a pad token) and save with ``model.save_pretrained`` as usual::

        trainer = ForkKVTrainer(model=peft_model, args=TrainingArguments(...), train_dataset=ds,
                                contexts=[context_ids], data_collator=ForkKVCollator(tok.pad_token_id))
        trainer.train()
    """

    def __init__(self, *args, contexts, adapter_name: str | None = None, residual="kv",
                 max_cached_contexts: int = 4, teacher_adapter: str | None = None, teacher_residual: str = "exact",
                 temperature: float = 1.0, ce_weight: float = 0.0, **kwargs):
        check_residual(residual)
        if max_cached_contexts < 1:
            raise ValueError(f"max_cached_contexts must be at least 1, got {max_cached_contexts}")
        if kwargs.get("data_collator") is None:
            tok = kwargs.get("processing_class")
            pad = getattr(tok, "pad_token_id", None)
            if pad is None:
                raise ValueError("pass data_collator=ForkKVCollator(pad_token_id), or processing_class= a tokenizer "
                                 "with a pad token")
            kwargs["data_collator"] = ForkKVCollator(pad)
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("ForkKVTrainer computes its own loss (forkkv_loss or forkkv_distill_loss); drop "
                             "compute_loss_func")
        if kwargs.get("compute_metrics") is not None:  # (before: called with no predictions, silently)
            raise ValueError("ForkKVTrainer evaluates the loss only (its forward returns no logits to Trainer); drop "
                             "compute_metrics, and measure the agent with generate through a ForkKVCache")
        super().__init__(*args, **kwargs)
        if self.args.label_smoothing_factor:
            raise ValueError(f"label_smoothing_factor={self.args.label_smoothing_factor}: ForkKVTrainer's loss is the "
                             "plain cross-entropy (or distillation); set it to 0")
        # Trainer passes num_items_in_batch, the labelled tokens of every micro-batch of the optimizer step, and does
        # not average over the accumulation steps itself: the same update as one batch of them all (before, each
        # micro-batch was normalised by its own tokens, and the steps averaged: batch 1 x accumulation 2 gave an
        # update 16% off batch 2's)
        self.model_accepts_loss_kwargs = True
        if isinstance(contexts, torch.Tensor) and contexts.dim() == 1 or (
                isinstance(contexts, (list, tuple)) and contexts and isinstance(contexts[0], int)):
            raise TypeError("contexts is a list of contexts, and this is one context's token ids: pass [context_ids]")
        self.contexts = list(contexts)
        if not self.contexts:
            raise ValueError("contexts is empty; give the token ids of every shared context the examples refer to")
        self.adapter_name = adapter_name or self._active_adapter()
        check_adapter_names(self.model, [self.adapter_name])
        self.residual = residual
        self.max_cached_contexts = max_cached_contexts
        self.teacher_adapter, self.teacher_residual = teacher_adapter, teacher_residual
        self.temperature, self.ce_weight = temperature, ce_weight
        if teacher_adapter is not None:
            check_distill_args(self.model, self.adapter_name, teacher_adapter, teacher_residual, temperature,
                               ce_weight)
        self._train_only_the_adapter()
        self._base_passes: OrderedDict[int, TrainingContext] = OrderedDict()

    def _train_only_the_adapter(self) -> None:
        # the optimizer takes the weights that require grad when training starts: this adapter's only (before, those
        # of the active adapter: another adapter_name trained nothing, and weight decay moved the active one)
        for name in self.model.peft_config:
            self.model.set_requires_grad(name, name == self.adapter_name)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # Trainer reloads every adapter of a checkpoint trainable only if active, then the optimizer is built: a
        # resumed student (not the active adapter) trained nothing, silently
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._train_only_the_adapter()

    def _load_best_model(self):
        # Trainer loads the best checkpoint's top-level adapter files (the "default" adapter's) into the active
        # adapter: a student distilled from a teacher named "default" became the teacher, silently (an audit's
        # finding). Every adapter of the checkpoint from its own files, as resuming does
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    def _get_num_items_in_batch(self, batch_samples: list, device):
        # the labels the loss learns (a label right after padding is not: a collator padding on the left counted it,
        # and every step was scaled down, 19% in an audit's case)
        return super()._get_num_items_in_batch(
            [{**b, "labels": learned_labels(b["labels"], b.get("attention_mask"))} if "labels" in b else b
             for b in batch_samples], device)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if not prediction_loss_only:  # predict(): before, empty predictions, silently
            raise ValueError("ForkKVTrainer computes the loss only, no predictions: use evaluate() for the loss, and "
                             "generate through a ForkKVCache for the agent's outputs")
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    def _active_adapter(self) -> str:
        active = list(getattr(self.model, "active_adapters", []))
        if len(active) != 1:
            raise ValueError(f"the model has active adapters {active}; pass adapter_name= the one to train")
        return active[0]

    def _set_signature_columns_if_needed(self):
        # the model's forward does not take context_index; keep it when unused columns are removed
        if self._signature_columns is None:
            self._signature_columns = list(COLUMNS)

    def training_context(self, model, index: int) -> TrainingContext:
        """The base pass over ``contexts[index]`` (computed at first use, kept while recently used)."""
        if not 0 <= index < len(self.contexts):
            raise IndexError(f"context_index {index} is outside the {len(self.contexts)} contexts given")
        ctx = self._base_passes.pop(index, None)
        if ctx is None:
            ctx = TrainingContext(model, self.contexts[index])
        self._base_passes[index] = ctx
        while len(self._base_passes) > self.max_cached_contexts:
            self._base_passes.popitem(last=False)
        return ctx

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # bf16=/fp16= of the arguments: accelerate autocasts the wrapped model's forward, which the loss does not call
        with self.accelerator.autocast():
            return self._compute_loss(self.accelerator.unwrap_model(model), inputs, return_outputs, num_items_in_batch)

    def _compute_loss(self, model, inputs, return_outputs, num_items_in_batch):
        if "context_index" not in inputs:
            raise KeyError("the batch has no 'context_index'; use ForkKVCollator and keep that column")
        index = inputs["context_index"]
        n_items = (learned_labels(inputs["labels"], inputs["attention_mask"]) != -100).sum() \
            if num_items_in_batch is None else num_items_in_batch
        total = None
        # rows of one context run together: one forward per distinct context in the batch
        for c in torch.unique(index).tolist():
            rows = (index == c).nonzero().flatten()
            sub = {k: inputs[k][rows] for k in ("input_ids", "attention_mask", "labels")}
            if not bool((sub["labels"][:, 1:] != -100).any()):
                continue
            ctx = self.training_context(model, c)
            if self.teacher_adapter is None:
                part = forkkv_loss(model, ctx, sub, self.adapter_name, self.residual, num_items_in_batch=n_items)
            else:
                part = forkkv_distill_loss(model, ctx, sub, self.adapter_name, self.teacher_adapter, self.residual,
                                           self.teacher_residual, self.temperature, self.ce_weight, n_items)
            total = part if total is None else total + part
        if total is None:
            raise ValueError("a batch without any labelled token; every example needs labels other than -100")
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            total = total * self._loss_scale()  # as Trainer.compute_loss: the devices' gradients are averaged
        return (total, {}) if return_outputs else total  # evaluate() asks for outputs; the loss is all there is

    def _loss_scale(self) -> int:
        """What ``Trainer.compute_loss`` multiplies a loss normalised by ``num_items_in_batch`` with (the token count
        summed over the data-parallel processes, whose gradients are then averaged)."""
        scale = self.accelerator.num_processes
        pc = getattr(self.accelerator, "parallelism_config", None)
        if pc is not None:
            scale //= pc.tp_size
        return scale if self.args.n_gpu <= 1 else self.args.n_gpu
