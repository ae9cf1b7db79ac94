"""The base model's settings: the numbers its modules compute with beside their weights (a norm's epsilon, an
attention's scaling, a rotary module's ``attention_scaling``). A shared context's K/V depend on them as on the
weights, so its identity (:mod:`forkkv_hf.context.identity`) records them and a generate after one changed is
refused (before, an edit such as ``layer.input_layernorm.variance_epsilon = 1.0`` was served stale, silently)."""

from __future__ import annotations

from torch import nn

from ..peft.lora_factors import transformers_model

#: what changes while the model runs or trains, not what it computes (a dynamic RoPE's cached length grows with the
#: sequences it saw; checkpointing is a training switch)
_RUNTIME = frozenset({"training", "gradient_checkpointing", "max_seq_len_cached", "original_max_seq_len"})


def is_adapter_name(name: str) -> bool:
    return ".lora_" in name or ".modules_to_save." in name


def base_name(name: str) -> str:
    """A base weight's name whether or not PEFT wrapped its module (adding an adapter must not change it): LoRA's
    ``base_layer``, ``modules_to_save``'s ``original_module`` and trainable tokens' ``token_adapter`` (before, found
    by an audit, adding an adapter with ``trainable_token_indices`` renamed the embedding: a false stale refusal)."""
    return name.replace(".base_layer", "").replace(".original_module", "").replace(".token_adapter", "")


def base_modules(model: nn.Module):
    """``(prefix, module)`` of every module of the transformers model (``prefix``: its name and a dot), depth first,
    the insides of PEFT tuner layers skipped but for their base layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    stack = [("", transformers_model(model))]
    while stack:
        prefix, m = stack.pop()
        yield prefix, m
        children = m._modules.items()
        if isinstance(m, BaseTunerLayer):
            children = [(k, c) for k, c in children if k == "base_layer"]
        stack.extend((f"{prefix}{k}.", c) for k, c in children if c is not None)


def module_settings(model: nn.Module) -> tuple:
    """``(name, value)`` of every public bool, int and float attribute of the transformers model's modules (LoRA
    and PEFT's saved copies excluded, PEFT's wrapped layers by their base layer), sorted by name."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = [(base_name(prefix + k), v) for prefix, m in base_modules(model) if not isinstance(m, BaseTunerLayer)
           for k, v in vars(m).items() if type(v) in (bool, int, float) and not k.startswith("_") and k not in _RUNTIME]
    return tuple(sorted(kv for kv in out if not is_adapter_name(kv[0])))


def changed_settings(recorded: tuple, model: nn.Module) -> list[str]:
    """The settings of ``model`` that differ from ``recorded`` (``"name: old -> new"``; empty if none)."""
    now = module_settings(model)
    if now == recorded:
        return []
    old, new = dict(recorded), dict(now)
    return [f"{k}: {old.get(k)} -> {new.get(k)}" for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
