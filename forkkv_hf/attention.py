"""The ``"forkkv"`` attention implementation for transformers, and :func:`enable_forkkv`.

``forkkv_attention_forward`` is registered with ``AttentionInterface`` under ``"forkkv"`` (and the sdpa mask function
with ``AttentionMaskInterface`` under the same name, so the model builds causal/padding masks for it). When the
cache hands it a :class:`~forkkv_hf.cache.ForkKVView` it runs ResidualAttention; given plain tensors (a pass with
no cache, or with a ``DynamicCache``) it falls back to SDPA, so a model with ``"forkkv"`` selected behaves exactly
as with ``"sdpa"`` outside ForkKV.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from .cache import ForkKVView
from .lora_factors import BASE_ADAPTER, transformers_model
from .residual_attention import residual_attention

ATTN_NAME = "forkkv"


# ---------------------------------------------------------------------------------------------------------------------
# which adapter each row really runs: recorded from PEFT's LoRA layers, checked against the cache's rows
def _probe_hook(module, args, kwargs, output):
    module._forkkv_adapter_names = kwargs.get("adapter_names")


def install_adapter_probe(lora_layer: nn.Module) -> None:
    """Record, on every forward, the ``adapter_names`` PEFT passes to this LoRA layer (idempotent)."""
    if getattr(lora_layer, "_forkkv_probe", None) is None:
        lora_layer._forkkv_adapter_names = None
        lora_layer._forkkv_probe = lora_layer.register_forward_hook(_probe_hook, with_kwargs=True)


def _rows_run_by(proj: nn.Module, batch: int) -> tuple[str, ...] | None:
    """The adapter PEFT applied to each row in this projection's last forward (``None``: not a probed LoRA layer)."""
    if getattr(proj, "_forkkv_probe", None) is None:
        return None
    names = proj._forkkv_adapter_names
    if names is not None:
        return tuple(names)
    if getattr(proj, "disable_adapters", False):
        return (BASE_ADAPTER,) * batch
    active = list(getattr(proj, "active_adapters", []))
    if len(active) > 1:
        raise ValueError(
            f"several adapters are active at once ({active}); a ForkKVCache row runs one adapter. Pass "
            "adapter_names=cache.adapter_names to generate instead."
        )
    return (active[0] if active else BASE_ADAPTER,) * batch


def check_rows(module: nn.Module, view: ForkKVView) -> None:
    """Raise if the adapters this forward runs per row are not the agents the cache rows were forked for."""
    for proj_name in ("k_proj", "v_proj"):
        proj = getattr(module, proj_name, None)
        if proj is None:
            continue
        seen = _rows_run_by(proj, view.batch_size)
        if seen is None:
            continue
        if seen != view.row_adapters:
            raise ValueError(
                f"this forward runs adapters {list(seen)} per row, but the ForkKVCache rows were forked for "
                f"{list(view.row_adapters)}; pass adapter_names=cache.adapter_names to generate (repeated for "
                "num_return_sequences, as PEFT requires), or fork the cache with the rows you generate"
            )
        return


# ---------------------------------------------------------------------------------------------------------------------
def forkkv_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key,
    value,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
):
    """transformers attention interface: ``query [B, H, Q, D]`` -> ``([B, Q, H, D], None)``."""
    if not isinstance(key, ForkKVView):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if dropout:
        raise ValueError("ForkKV attention is for inference; call model.eval() (attention dropout is active)")
    if kwargs.get("softcap") is not None or getattr(module, "sliding_window", None):
        raise ValueError(
            f"{type(module).__name__} uses attention soft-capping or a sliding window, which ForkKV does not "
            "implement; use a model with full attention (Llama, Mistral without sliding window, Qwen2)"
        )
    check_rows(module, key)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return residual_attention(query, key, attention_mask, scaling), None


def register_forkkv() -> None:
    """Register ``"forkkv"`` with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(ATTN_NAME, forkkv_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def enable_forkkv(model: nn.Module, batched_lora: bool = True) -> nn.Module:
    """Register the ``"forkkv"`` attention and select it on ``model`` (a ``PeftModel`` or transformers model).

    Idempotent; returns the model. On a ``PeftModel`` it also turns on batched mixed-adapter LoRA
    (:mod:`forkkv_hf.batched_lora`; ``batched_lora=False`` keeps PEFT's per-adapter loop) and wraps ``generate``
    (:mod:`forkkv_hf.peft_integration`: an exception inside it no longer leaves PEFT's ``adapter_names`` hooks
    installed). :func:`disable_forkkv` undoes all of it.
    """
    register_forkkv()
    base = transformers_model(model)
    current = base.config._attn_implementation
    if current != ATTN_NAME:
        base._forkkv_previous_attn = current
        base.set_attn_implementation(ATTN_NAME)
    if model is not base:
        from . import peft_integration
        from .batched_lora import disable_batched_lora, enable_batched_lora

        model._forkkv_enabled = True
        if batched_lora:
            enable_batched_lora(model)
        else:
            disable_batched_lora(model)
        peft_integration.install(model)
    return model


def disable_forkkv(model: nn.Module) -> nn.Module:
    """Select again the attention implementation the model had before :func:`enable_forkkv`, and remove what it
    installed."""
    base = transformers_model(model)
    previous = getattr(base, "_forkkv_previous_attn", None)
    if base.config._attn_implementation == ATTN_NAME:
        base.set_attn_implementation(previous or "sdpa")
    if model is not base:
        from .batched_lora import disable_batched_lora

        model._forkkv_enabled = False
        disable_batched_lora(model)
    return model


def is_forkkv_enabled(model: nn.Module) -> bool:
    return transformers_model(model).config._attn_implementation == ATTN_NAME
