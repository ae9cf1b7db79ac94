"""The RoPE checks of a forward that appends to a :class:`~forkkv_hf.cache.ForkKVCache` (called by
:func:`forkkv_hf.guards.check_forward_inputs` at a fork's first forward): rotary embeddings whose frequencies depend
on the sequence length (dynamic NTK, longrope) would rotate the prompt with other frequencies than the shared
context's."""

from __future__ import annotations

import copy

import torch

from .compat import text_config
from .peft.lora_factors import decoder_of, transformers_model


def _rope_type(rope) -> str | dict:
    return getattr(rope, "rope_type", "default")


def _length_dependent(kinds) -> bool:
    """Whether any of the rope types ``kinds`` (a type, a list of types, or a per-layer-type dict) recomputes its
    frequencies from the sequence length."""
    kinds = kinds.values() if isinstance(kinds, dict) else kinds if isinstance(kinds, (list, tuple)) else [kinds]
    return any("dynamic" in str(k) or str(k) == "longrope" for k in kinds)


def length_dependent_rope(config) -> bool:
    """Whether ``config``'s rotary embeddings (any layer type's) recompute their frequencies from the sequence length
    (dynamic NTK, longrope)."""
    return _length_dependent(_config_rope_types(config))


def _config_rope_types(config) -> list:
    """The rope types of ``config``'s text model: a multimodal model's (Llava) top-level config holds none, so a
    dynamic text model was never checked there (found by an audit; silently wrong)."""
    config = text_config(config)
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if "rope_type" in params or "type" in params:
        return [params.get("rope_type", params.get("type"))]
    return [p.get("rope_type") for p in params.values() if isinstance(p, dict)]  # per layer type (Gemma 3)


def rotary_modules(model) -> list:
    """The rotary embedding modules (holding ``inv_freq``) among the decoder's children: a few attribute reads,
    not a walk of every module (PEFT adds tens of thousands with many adapters)."""
    base = transformers_model(model)
    decoder = decoder_of(base) or base
    return [m for m in decoder.children()  # (Gemma 3 keeps one table per layer type: full_attention_inv_freq, ...)
            if hasattr(m, "inv_freq") or any(n.endswith("_inv_freq") for n, _ in m.named_buffers(recurse=False))]


def check_rope_for_prefill(cache, model, seq_len: int) -> None:
    """For RoPE whose frequencies depend on the sequence length (``dynamic`` NTK, ``longrope``): refuse the first
    forward after a fork if a plain prefill of the whole rows (``seq_len`` positions) would rotate the context with
    other frequencies than the base pass did; the shared K (and everything computed from it) would not be the
    model's. Position-only types (default, linear, yarn, llama3) never differ."""
    layer = cache.shared.layers[0]
    check_rope_tables(cache.shared.config, layer.cos, layer.sin, model, seq_len)


def check_rope_tables(config, cos_ctx: torch.Tensor, sin_ctx: torch.Tensor, model, seq_len: int,
                      what: str = "a plain prefill of these rows") -> None:
    """:func:`check_rope_for_prefill` against the tables ``cos_ctx``/``sin_ctx`` ``[T, D]`` a context was rotated
    with (a shared context's, or a :class:`~forkkv_hf.training.TrainingContext`'s)."""
    if not length_dependent_rope(config):
        return
    ropes = rotary_modules(model)
    kinds = [_rope_type(r) for r in ropes]
    if len(ropes) != 1 or isinstance(kinds[0], dict) or not hasattr(ropes[0], "inv_freq"):
        types = _config_rope_types(config)
        where = f"{len(ropes)} rotary modules" if len(ropes) != 1 else "one table per layer type"
        raise ValueError(f"this model's RoPE includes a sequence-length dependent type ({types}; {where}), which "
                         "ForkKV cannot check against its shared context; use rope types that depend on positions "
                         "only (default, linear, yarn, llama3)")
    T = cos_ctx.shape[0]
    probe = copy.deepcopy(ropes[0])  # dynamic RoPE updates its state in place: never touch the model's
    x = torch.zeros(1, dtype=cos_ctx.dtype, device=cos_ctx.device)
    with torch.no_grad():
        cos, sin = probe(x, torch.arange(max(seq_len, T), device=cos_ctx.device)[None])
    cos, sin = cos[0, :T].to(cos_ctx.device), sin[0, :T].to(sin_ctx.device)
    if not (torch.equal(cos, cos_ctx) and torch.equal(sin, sin_ctx)):
        limit = _rope_limit(ropes[0])
        one_pass = ", build a context longer than that in one pass (chunk_size=None)" \
            if isinstance(limit, int) and T > limit else ""
        raise ValueError(
            f"this model uses {kinds[0]!r} RoPE, whose frequencies depend on the sequence length (they change above "
            f"{limit} positions): {what} ({seq_len} positions) rotates the {T}-token shared "
            "context with other frequencies than its base pass did, so the shared K/V are not this model's. Keep "
            f"context + prompt within {limit} tokens (generating past it is fine: plain transformers keeps the earlier "
            f"keys as they were too){one_pass}, or use a position-only rope_type (linear, yarn, llama3)."
        )


def _rope_limit(rope) -> int | None:
    """Positions above which a sequence-length dependent rotary module changes its frequencies."""
    params = getattr(getattr(rope, "config", None), "rope_parameters", None) or {}
    if _rope_type(rope) == "longrope" and "original_max_position_embeddings" in params:
        return params["original_max_position_embeddings"]
    return getattr(rope, "original_max_seq_len", None)
