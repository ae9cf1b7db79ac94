"""Which adapter each batch row really runs: a forward hook on PEFT's LoRA layers records the ``adapter_names`` PEFT
passes them, and :func:`rows_run_by` reads it back.

The hook sits on the K/V projections' LoRA layers of every model a ForkKV cache meets: the base pass of a shared
context installs it (:mod:`forkkv_hf.context.base_pass`), and so do each ``generate`` with a ForkKV cache and each
direct forward on one (:func:`install_kv_probes`; before, only a build did: on a model instance that never ran one,
or for an adapter added after it, the rows were not checked at all, found by an audit). The ``"forkkv"`` attention
compares what they ran with the agents a cache's rows were forked for (:func:`forkkv_hf.attention.check_rows`), and
``generate`` compares the rows its call will run beforehand (:func:`check_generate_rows`). It sits below both, so the
context needs nothing of the attention.
"""

from __future__ import annotations

import weakref

from torch import nn

from .lora_factors import BASE_ADAPTER, find_attention_modules, in_planned_step, is_peft_model, transformers_model


def _probe_hook(module, args, kwargs, output):
    if in_planned_step(kwargs.get("adapter_names")):
        return  # a compiled decode step of generate: its call's eager prefill recorded the names, the steps run them
    module._forkkv_adapter_names = kwargs.get("adapter_names")


def install_adapter_probe(lora_layer: nn.Module) -> None:
    """Record, on every forward, the ``adapter_names`` PEFT passes to this LoRA layer (idempotent)."""
    if getattr(lora_layer, "_forkkv_probe", None) is None:
        lora_layer._forkkv_adapter_names = None
        lora_layer._forkkv_probe = lora_layer.register_forward_hook(_probe_hook, with_kwargs=True)


#: per transformers model, its attention modules as a ``generate`` with a ForkKV cache last found them (a direct
#: forward installs the probes from them: finding them again is a walk of the whole model, milliseconds per forward)
_ATTENTION: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def remove_adapter_probes(model: nn.Module) -> None:
    """Remove the probe from every layer of ``model`` (:func:`~forkkv_hf.disable_forkkv`: before, they stayed, one
    hook per K/V LoRA layer on every plain PEFT forward after it). A generate or a direct forward with a ForkKV cache
    installs them again."""
    for module in model.modules():
        handle = module.__dict__.pop("_forkkv_probe", None)
        if handle is not None:
            handle.remove()
            module.__dict__.pop("_forkkv_adapter_names", None)


def install_kv_probes(model: nn.Module, attention: dict | None = None) -> list[nn.Module]:
    """Install the probe on the LoRA layer of every K/V projection of ``model`` (``attention``: its attention modules,
    found if not given and not found before); idempotent. Returns those LoRA layers."""
    from peft.tuners.lora import LoraLayer

    base = transformers_model(model)
    if attention is None:
        attention = _ATTENTION.get(base) or find_attention_modules(model)
    _ATTENTION[base] = attention
    layers = []
    for attn in attention.values():
        for name in ("k_proj", "v_proj", "qkv_proj"):  # (as kv_projections; read directly: this runs every forward)
            module = attn._modules.get(name)
            if isinstance(module, LoraLayer):  # (other tuners on K/V are refused by the build)
                install_adapter_probe(module)
                layers.append(module)
    return layers


def _several_active(active: list) -> ValueError:
    return ValueError(f"several adapters are active at once ({active}); a ForkKVCache row runs one adapter. Pass "
                      "adapter_names=cache.adapter_names to generate instead.")


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
        raise _several_active(active)
    return (active[0] if active else BASE_ADAPTER,) * batch


def rows_mismatch(seen, rows, what: str = "this forward") -> ValueError:
    """The error for a call whose rows run adapters ``seen`` over a cache forked for ``rows``."""
    off = ""
    if all(a == BASE_ADAPTER for a in seen) and any(a != BASE_ADAPTER for a in rows):
        off = (" (are the adapters disabled? PEFT then runs the base model and ignores adapter_names: fork "
               "'__base__' rows, or generate with the adapters on)")
    return ValueError(
        f"{what} runs adapters {list(seen)} per row, but the ForkKVCache rows were forked for {list(rows)}{off}; "
        "pass adapter_names=cache.adapter_names to generate (repeated for num_return_sequences, as PEFT requires), "
        "or fork the cache with the rows you generate")


def _peft_call_names(layer: nn.Module):
    """The ``adapter_names`` of the PEFT call running now, as its pre-forward hook on ``layer`` holds them (a
    ``PeftModel.generate`` around the wrapped ``generate`` of its transformers model, which does not get them)."""
    names = None
    for hook in layer._forward_pre_hooks.values():
        if getattr(getattr(hook, "func", None), "__name__", "") == "_adapter_names_pre_forward_hook":
            names = hook.keywords.get("adapter_names", names)
    return names


def _first_tuner_layer(model: nn.Module) -> list:
    """``[the first PEFT tuner layer of model]``, or ``[]``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return next(([m] for m in model.modules() if isinstance(m, BaseTunerLayer)), [])


def _rows_a_call_runs(model: nn.Module, kv_layers: list, adapter_names, batch: int) -> tuple[str, ...] | None:
    """The adapter each row of a ``generate`` of ``model`` runs on its K/V projections (``None``: unknown)."""
    if adapter_names is None:
        adapter_names = next((n for n in map(_peft_call_names, kv_layers) if n is not None), None)
    n = batch if adapter_names is None else len(adapter_names)
    # no K/V LoRA layer: any tuner layer tells (disabled: with pm.disable_adapter(), whose __base__ rows were refused
    # when no adapter had K/V LoRA; enabled on a model of transformers' own PEFT integration: its rows ran an adapter
    # on a __base__ fork, silently; both found by a second audit)
    layers = kv_layers or _first_tuner_layer(model)
    if any(getattr(layer, "disable_adapters", False) for layer in layers):
        return (BASE_ADAPTER,) * n  # PEFT runs the base layer whatever the names (with pm.disable_adapter(): ...)
    if adapter_names is not None:
        return tuple(adapter_names)
    if layers:
        active = list(getattr(layers[0], "active_adapters", []))
    elif is_peft_model(model):
        active = list(model.active_adapters)
    else:
        return None
    if len(active) > 1:
        raise _several_active(active)
    return (active[0] if active else BASE_ADAPTER,) * n


def check_generate_rows(model: nn.Module, attention: dict, adapter_names, batch: int, rows) -> None:
    """Before a ``generate`` of ``batch`` input rows: install the probes on ``model``'s K/V LoRA layers (its forwards
    are then checked by the attention too) and refuse ``adapter_names`` (or, without them, the active adapter or
    disabled adapters) other than ``rows``, the cache's, compared as generate expands rows (``num_return_sequences``,
    beams). Before (found by an audit), a model instance that never ran a build had no probes and served any rows."""
    seen = _rows_a_call_runs(model, install_kv_probes(model, attention), adapter_names, batch)
    if seen is None:
        return
    rows = tuple(rows)
    if len(seen) != len(rows):
        if len(seen) % len(rows) == 0:
            rows = tuple(a for a in rows for _ in range(len(seen) // len(rows)))
        elif len(rows) % len(seen) == 0:
            seen = tuple(a for a in seen for _ in range(len(rows) // len(seen)))
        else:
            return  # a batch the cache cannot take: refused with its own message (ForkKVLayer.lazy_initialization)
    if seen != rows:
        raise rows_mismatch(seen, rows, "this generate")
