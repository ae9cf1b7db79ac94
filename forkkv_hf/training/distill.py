"""Distillation into ForkKV-aware training: adapt an existing (standard) LoRA adapter to ForkKV.

A standard adapter, trained with the context in its input, loses accuracy when it is served from a shared context
(it reads the base model's context K/V plus its rank-r residual instead of its own pass). Its own outputs under
exact inference are the best targets for a ForkKV student: :func:`copy_adapter` starts the student from the
teacher's weights, :func:`forkkv_distill_loss` trains it under ForkKV to match the teacher's next-token
distributions on the labelled positions (Hinton et al. 2015: KL at temperature ``τ``, times ``τ²``), optionally
plus the cross-entropy on the labels. On the H200 probe (eval/results/fidelity_probe_nvidia_h200.json) this gained
7.3 points of exact match over plain ForkKV-aware cross-entropy on the hardest agent.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from torch import nn

from ..peft.lora_factors import check_adapter_names, is_peft_model
from .context import TrainingContext
from .loss import _hidden, check_residual, labelled_logits, labelled_targets


def check_distill_args(model: nn.Module, adapter_name: str, teacher_adapter: str, teacher_residual: str,
                       temperature: float, ce_weight: float) -> None:
    """Refuse a distillation setup that cannot work, saying what to do instead."""
    if not isinstance(teacher_adapter, str) or teacher_adapter == "__base__":
        raise ValueError(f"teacher_adapter must be the name of a LoRA adapter of the model, got {teacher_adapter!r}; "
                         "load the standard adapter with peft_model.load_adapter(path, adapter_name='teacher')")
    check_adapter_names(model, [adapter_name, teacher_adapter])
    if teacher_adapter == adapter_name:
        raise ValueError(f"the student and the teacher are the same adapter {adapter_name!r}; train a copy of the "
                         f"teacher: copy_adapter(peft_model, {teacher_adapter!r}, 'student') and pass "
                         "adapter_name='student'")
    check_residual(teacher_residual, "teacher_residual",
                   " ('exact': the teacher as it was trained, its own pass over the context)")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r} (1.0: the teacher's own distributions)")
    if not ce_weight >= 0:
        raise ValueError(f"ce_weight must be >= 0, got {ce_weight!r} (0: distillation only; 1: KL + cross-entropy)")


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The LoRA weights of adapter ``name`` (every tuner layer's ``lora_A``/``lora_B``/... entry of that name)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    params = []
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for attr in module.adapter_layer_names:  # ModuleDicts and ParameterDicts keyed by adapter
                entries = getattr(module, attr, None)
                if entries is None or name not in entries:
                    continue
                entry = entries[name]
                params += list(entry.parameters()) if isinstance(entry, nn.Module) else [entry]
    return params


@contextmanager
def _teacher_forward(model: nn.Module, teacher_adapter: str):
    """No grad, eval mode (deterministic targets: no dropout), and afterwards every module's mode and the
    teacher's ``requires_grad`` as they were (activating the teacher with ``set_adapter`` marks it trainable; an
    optimizer built later from the trainable weights must not pick it up)."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in adapter_parameters(model, teacher_adapter)]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)


def forkkv_distill_loss(model: nn.Module, context: TrainingContext, batch: dict, adapter_name: str,
                        teacher_adapter: str, residual: str = "kv", teacher_residual: str = "exact",
                        temperature: float = 1.0, ce_weight: float = 0.0,
                        num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """Distillation loss of student ``adapter_name`` under ``residual`` from ``teacher_adapter`` under
    ``teacher_residual``, on the labelled positions of ``batch`` (the positions :func:`forkkv_loss` learns).

    ``batch`` and ``context``: as for :func:`~forkkv_hf.training.forkkv_loss` (``input_ids``/``labels``
    ``[B, L]``, optionally ``attention_mask [B, L]`` and ``context_index [B]``). The teacher runs first, without
    grad and in eval mode; its weights are not trained and keep their ``requires_grad``. With ``z_t``, ``z_s`` the
    teacher's and the student's logits ``[N, V]`` at the ``N`` labelled positions and ``τ = temperature``::

        loss = (τ² · Σ_n KL(softmax(z_t[n]/τ) || softmax(z_s[n]/τ)) + ce_weight · Σ_n CE(z_s[n], label[n])) / N

    (``N`` replaced by ``num_items_in_batch`` when given, as in ``forkkv_loss``). ``ce_weight=0``: pure
    distillation; the labels' tokens only choose the positions. Start the student from the teacher
    (:func:`copy_adapter`) to adapt an existing adapter to ForkKV. Ends with ``adapter_name`` active.
    """
    check_distill_args(model, adapter_name, teacher_adapter, teacher_residual, temperature, ce_weight)
    keep, target = labelled_targets(batch)
    with _teacher_forward(model, teacher_adapter):
        teacher = labelled_logits(model, _hidden(model, context, batch, teacher_adapter, teacher_residual), keep)
    # the student's forward comes after the teacher's, so it runs with the student active and trainable
    student = labelled_logits(model, _hidden(model, context, batch, adapter_name, residual), keep)
    log_p_student = torch.log_softmax(student / temperature, dim=-1)
    log_p_teacher = torch.log_softmax(teacher.to(student.device, student.dtype) / temperature, dim=-1)
    total = torch.nn.functional.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="sum")
    total = total * temperature**2
    if ce_weight > 0:
        ce = torch.nn.functional.cross_entropy(student, target.to(student.device, non_blocking=True), reduction="sum")
        total = total + ce_weight * ce
    return total / (keep.sum() if num_items_in_batch is None else num_items_in_batch)


def copy_adapter(model: nn.Module, source: str, target: str) -> None:
    """Add adapter ``target`` to the ``PeftModel`` ``model``: ``source``'s LoRA config (a deep copy, marked for
    training) and a copy of every weight of ``source`` (LoRA factors, and modules_to_save / trainable tokens if
    any), so that a student starts from its teacher. Like ``PeftModel.add_adapter``, the new adapter is not made
    active or trainable: ``set_adapter(target)`` or :class:`~forkkv_hf.training.ForkKVTrainer` does that."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    if not is_peft_model(model):
        raise TypeError(f"copy_adapter needs a peft.PeftModel, got {type(model).__name__}; load the adapter with "
                        "PeftModel.from_pretrained(model, path, adapter_name=...) first")
    if not isinstance(source, str) or source == "__base__":
        raise ValueError(f"source must be the name of a LoRA adapter of the model, got {source!r}")
    check_adapter_names(model, [source])
    if not isinstance(target, str) or not target:
        raise ValueError(f"target must be a new adapter name, got {target!r}")
    if target in model.peft_config:
        raise ValueError(f"adapter {target!r} already exists; pick another name, or "
                         f"peft_model.delete_adapter({target!r}) first")
    config = copy.deepcopy(model.peft_config[source])
    config.inference_mode = False  # a loaded adapter's config is frozen for inference; the copy is for training
    model.add_adapter(target, config)
    weights = get_peft_model_state_dict(model, adapter_name=source)
    loaded = set_peft_model_state_dict(model, weights, adapter_name=target)
    if not weights or loaded.unexpected_keys:
        model.delete_adapter(target)
        raise RuntimeError(f"copying adapter {source!r} into {target!r} left weights unplaced "
                           f"({loaded.unexpected_keys[:4] if weights else 'no weights found'}); the adapter type is "
                           "not supported by copy_adapter")
    for module in model.modules():  # add_adapter makes the new dropout modules in training mode whatever the model's
        drop = getattr(module, "lora_dropout", None)  # (an eval-mode model's copy dropped out at inference)
        if isinstance(drop, nn.ModuleDict) and target in drop and source in drop:
            drop[target].train(drop[source].training)
