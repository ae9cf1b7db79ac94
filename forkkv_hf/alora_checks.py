"""Activated LoRA (PEFT's ``alora_invocation_tokens``) over a shared context: such an agent is inactive until the last
occurrence of its invocation sequence in the row, so ForkKV serves it exactly only where that occurrence starts after
the shared context, whose K/V one base pass computed. :func:`check_generate_rows` (a ``generate`` call's whole rows)
and :func:`check_forward_rows` (a direct forward's new tokens) refuse a row whose invocation starts inside the context.

Before (found by an audit) the check ran only for ``generate`` calls given ``adapter_names``: a ``generate`` running
the active adapter (no names) and every direct forward on a fork served such a row silently (0.6-0.9 off the agent's
own run). Now rows without names run the active adapter, as PEFT's do, and a direct forward is checked over the whole
rows it continues: the context, the private tokens the cache recorded and the new tokens.
"""

from __future__ import annotations

import torch


def _active(holder) -> str | None:
    """The one active adapter of a ``PeftModel`` (or of the transformers model PEFT wraps), else ``None``."""
    active = getattr(holder, "active_adapter", None)
    if isinstance(active, (list, tuple)):
        active = active[0] if len(active) == 1 else None
    return active if isinstance(active, str) else None


def _is_alora(configs: dict, names) -> bool:
    return any(getattr(configs.get(n), "alora_invocation_tokens", None) for n in names if isinstance(n, str))


def _check(cache, configs: dict, active, ids: torch.Tensor, names: list) -> None:
    """Refuse a row of the whole rows ``ids [B, L]`` (run by ``names``, one per row) whose last invocation sequence
    starts inside the shared context."""
    from peft.tuners.lora.variants import calculate_alora_offsets

    T = cache.num_shared_tokens
    L = ids.shape[1]
    for i, (name, off) in enumerate(zip(names, calculate_alora_offsets(configs, active, ids, names))):
        if off is not None and L - off < T:
            raise ValueError(
                f"row {i} ({name!r}, Activated LoRA): its invocation sequence starts at token {L - off}, inside the "
                f"{T}-token shared context, so the adapter would be active over part of the context, which the shared "
                "cache computed without it. Put the invocation sequence in the agent's prompt."
            )


def check_generate_rows(cache, model, input_ids: torch.Tensor, adapter_names) -> None:
    """A ``generate`` call's whole rows ``input_ids``, run by ``adapter_names`` (repeated for
    ``num_return_sequences`` or beams: each row's first), or by the model's active adapter where none are given."""
    configs = getattr(model, "peft_config", None) or {}
    B = input_ids.shape[0]
    if adapter_names:
        names = list(adapter_names)
        if len(names) != B and len(names) % B == 0:
            names = names[:: len(names) // B]
    else:
        names = [_active(model)] * B
    if _is_alora(configs, names):
        _check(cache, configs, _active(model), input_ids, names)


def check_forward_rows(cache, module, new_ids: torch.Tensor) -> None:
    """A direct forward of ``module`` (the transformers model PEFT wraps, holding its ``peft_config``) appending
    ``new_ids`` to ``cache``: its rows run the agents the cache was forked for (the attention refuses any other), and
    are checked over context + recorded private tokens + new tokens (not where the private tokens are unknown: a
    forward given embeddings). ``generate``'s forwards are left to :func:`check_generate_rows`."""
    configs = getattr(module, "peft_config", None) or {}
    names = cache.adapter_names
    if "_generate_forwards" in cache.__dict__ or not _is_alora(configs, names) or len(names) != new_ids.shape[0]:
        return
    B, T, P = new_ids.shape[0], cache.num_shared_tokens, cache.layers[0].private_length()
    parts = [cache.shared.token_ids.to(new_ids.device).expand(B, T)]
    if P:
        held = cache.private_ids
        if held is None or tuple(held.shape) != (B, P):
            return
        parts.append(held.to(new_ids.device))
    _check(cache, configs, _active(module), torch.cat(parts + [new_ids], 1), names)
