"""Which adapter each batch row really runs: a forward hook on PEFT's LoRA layers records the ``adapter_names`` PEFT
passes them, and :func:`rows_run_by` reads it back.

The base pass of a shared context installs the hook on the K/V projections it reads
(:mod:`forkkv_hf.context.base_pass`); the ``"forkkv"`` attention compares what they ran with the agents a cache's
rows were forked for (:func:`forkkv_hf.attention.check_rows`). It sits below both, so the context needs nothing
of the attention.
"""

from __future__ import annotations

from torch import nn

from .lora_factors import BASE_ADAPTER, in_planned_step


def _probe_hook(module, args, kwargs, output):
    if in_planned_step(kwargs.get("adapter_names")):
        return  # a compiled decode step of generate: its call's eager prefill recorded the names, the steps run them
    module._forkkv_adapter_names = kwargs.get("adapter_names")


def install_adapter_probe(lora_layer: nn.Module) -> None:
    """Record, on every forward, the ``adapter_names`` PEFT passes to this LoRA layer (idempotent)."""
    if getattr(lora_layer, "_forkkv_probe", None) is None:
        lora_layer._forkkv_adapter_names = None
        lora_layer._forkkv_probe = lora_layer.register_forward_hook(_probe_hook, with_kwargs=True)


def rows_run_by(proj: nn.Module, batch: int) -> tuple[str, ...] | None:
    """The adapter PEFT applied to each row in this projection's last forward (``None``: not a probed LoRA layer)."""
    if getattr(proj, "_forkkv_probe", None) is None:
        return None
    if getattr(proj, "disable_adapters", False):  # disabled layers run the base layer whatever names PEFT passes
        return (BASE_ADAPTER,) * batch  # (read after them, a disable_adapter_layers() served the agents' residuals)
    names = proj._forkkv_adapter_names
    if names is not None:
        return tuple(names)
    active = list(getattr(proj, "active_adapters", []))
    if len(active) > 1:
        raise ValueError(
            f"several adapters are active at once ({active}); a ForkKVCache row runs one adapter. Pass "
            "adapter_names=cache.adapter_names to generate instead."
        )
    return (active[0] if active else BASE_ADAPTER,) * batch
