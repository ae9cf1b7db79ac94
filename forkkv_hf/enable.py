"""Turn ForkKV on and off on a model: :func:`enable_forkkv` selects the ``"forkkv"`` attention
(:mod:`forkkv_hf.attention`) and, on a ``PeftModel``, installs batched LoRA and the ``generate``/``forward``
wrappers (:mod:`forkkv_hf.peft`); :func:`disable_forkkv` undoes all of it.
"""

from __future__ import annotations

from torch import nn

from .attention import ATTN_NAME, register_forkkv
from .model_lock import model_lock
from .peft import wrappers
from .peft.adapter_probe import remove_adapter_probes
from .peft.batched_lora import disable_batched_lora, enable_batched_lora
from .peft.lora_factors import find_attention_modules, transformers_model
from .peft.tp import tp_world
from .static_cache import free_static_buffers


def enable_forkkv(model: nn.Module, batched_lora: bool = True) -> nn.Module:
    """Register the ``"forkkv"`` attention and select it on ``model`` (a ``PeftModel`` or transformers model).

    Idempotent; returns the model. On a ``PeftModel`` it also turns on batched mixed-adapter LoRA
    (:mod:`forkkv_hf.peft.batched_lora`; ``batched_lora=False`` keeps PEFT's per-adapter loop, refused under tensor
    parallelism: see :func:`_check_peft_loop`) and wraps ``generate``
    (:mod:`forkkv_hf.peft.wrappers`: an exception inside it no longer leaves PEFT's ``adapter_names`` hooks
    installed). :func:`disable_forkkv` undoes all of it. Waits for a call of the model running in another thread
    (it holds the model's lock).
    """
    with model_lock(model):
        return _enable(model, batched_lora)


def _check_peft_loop(model: nn.Module, batched_lora: bool) -> None:
    """Refuse ``batched_lora=False`` on a tensor-parallel ``PeftModel``. Before (found by an audit) it was accepted
    and silently wrong: PEFT's per-adapter loop iterates ``set(adapter_names)``, whose order differs between
    processes, so a rowwise layer's all-reduce added one adapter's partial products on one rank to another adapter's
    on the next (or gloo aborted on a size mismatch). Batched LoRA (the default) sums each adapter's partial products
    in one order on every rank, also where it runs a per-adapter loop."""
    if not batched_lora and model is not transformers_model(model) and tp_world(model)[1] > 1:
        raise ValueError(
            "enable_forkkv(model, batched_lora=False) on a tensor-parallel model (tp_plan): PEFT's per-adapter loop "
            "runs the adapters in a different order on each rank and sums different adapters' partial products "
            "across ranks. Keep batched_lora=True (the default), or load the model with device_map instead of "
            "tp_plan"
        )


def _enable(model: nn.Module, batched_lora: bool) -> nn.Module:
    _check_peft_loop(model, batched_lora)
    attention = find_attention_modules(model)  # refuses, with the reason, a model ForkKV cannot run on
    register_forkkv()
    base = transformers_model(model)
    current = base.config._attn_implementation
    if current != ATTN_NAME:
        base.set_attn_implementation(ATTN_NAME)
        if base.config._attn_implementation != ATTN_NAME:
            raise ValueError(
                f"{type(base).__name__} did not switch to the {ATTN_NAME!r} attention (it does not use transformers' "
                "AttentionInterface), so it cannot read a ForkKVCache"
            )
        others = [i for i, attn in attention.items()
                  if getattr(getattr(attn, "config", None), "_attn_implementation", ATTN_NAME) != ATTN_NAME]
        if others:
            base.set_attn_implementation(current)
            raise ValueError(
                f"the attention of layers {others} reads a config of its own that did not switch to the {ATTN_NAME!r} "
                "attention (PEFT's layer_replication deep-copies the layers), so it cannot read a ForkKVCache; "
                "ForkKV does not support replicated layers"
            )
        base._forkkv_previous_attn = current
    model._forkkv_enabled = True
    if model is not base:
        if batched_lora:
            enable_batched_lora(model)
        else:
            disable_batched_lora(model)
    wrappers.install(model)
    if model is not base:  # its own generate is reachable too (peft_model.get_base_model().generate)
        wrappers.install_generate(base, model)
    wrappers.install_token_recorder(base)
    return model


def disable_forkkv(model: nn.Module) -> nn.Module:
    """Select again the attention implementation the model had before :func:`enable_forkkv`, and remove what it
    installed, the compiled decode's pooled private K/V buffers included (a cache still holding them keeps its
    own). Waits for a call of the model running in another thread (it held the model's lock)."""
    with model_lock(model):
        return _disable(model)


def _disable(model: nn.Module) -> nn.Module:
    base = transformers_model(model)
    previous = getattr(base, "_forkkv_previous_attn", None)
    if base.config._attn_implementation == ATTN_NAME:
        base.set_attn_implementation(previous or "sdpa")
    model._forkkv_enabled = False
    if model is not base:
        disable_batched_lora(model)
    wrappers.uninstall_token_recorder(base)
    remove_adapter_probes(model)
    wrappers.uninstall_if_unused(model)
    free_static_buffers(base)
    if model is not base and getattr(base.__dict__.get("generate"), "_forkkv_wrapper", False):
        del base.generate
    return model


def is_forkkv_enabled(model: nn.Module) -> bool:
    return transformers_model(model).config._attn_implementation == ATTN_NAME
