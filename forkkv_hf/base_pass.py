"""The base-model pass of a shared context, and the checks around it: one forward of the base model (adapters
disabled) over the context tokens, chunked, after the K/V of a past; the model limits it must respect (positions,
sliding windows) and the RoPE layout the K residual relies on."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from tqdm.auto import tqdm

from .compat import cache_kwargs
from .lora_factors import is_peft_model
from .rope import apply_rope


def max_positions(config) -> int | None:
    return getattr(config, "max_position_embeddings", None)


def check_chunk_size(chunk_size) -> None:
    """``chunk_size`` must be a positive int (tokens per forward of a base pass) or ``None`` (one pass)."""
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of tokens per forward of the base pass (e.g. 4096) or "
                         f"None for one pass over the whole context, got {chunk_size!r}")


def sliding_window(attn: nn.Module, config) -> int | None:
    """The layer's sliding window: the module's own (Qwen2, Gemma), else the config's when the model passes it to
    every attention call (Mistral, Phi-3)."""
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(config, "sliding_window", None)


def cache_dtype(base: nn.Module) -> torch.dtype:
    """The dtype the model's K/V come out in (its compute dtype)."""
    dtype = getattr(base, "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    return torch.get_default_dtype()


def past_length(past) -> int:
    """Tokens in ``past`` (one ``(key, value)`` pair ``[1, H_kv, S, D]`` per layer, or ``None``); validates it."""
    if past is None:
        return 0
    lengths = set()
    for idx, pair in enumerate(past):
        if len(pair) != 2 or any(not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[0] != 1 for t in pair):
            raise ValueError(f"past layer {idx}: expected a (key, value) pair of [1, H_kv, S, D] tensors")
        lengths.update(t.shape[-2] for t in pair)
    if len(lengths) != 1:
        raise ValueError(f"past layers hold different numbers of tokens {sorted(lengths)}; each must hold the same S")
    return lengths.pop()


def run_base_pass(model, base, ids: torch.Tensor, chunk_size, progress, offset, past=None):
    """One forward of the base model (adapters disabled) over ``ids``, chunked, after the ``S`` tokens of ``past``
    (per layer ``(key, value)``, or ``None``); returns its ``DynamicCache`` (``S + T`` tokens)."""
    from transformers import DynamicCache

    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    runner = decoder if decoder is not None else base
    T = ids.numel()
    step = T if not chunk_size or chunk_size >= T else int(chunk_size)
    starts = list(range(0, T, step))
    disable = model.disable_adapter() if is_peft_model(model) else contextlib.nullcontext()
    cache = DynamicCache(config=base.config)
    S = 0
    if past is not None:
        past = list(past)
        num_layers = getattr(base.config, "num_hidden_layers", len(past))
        if len(past) != num_layers:
            raise ValueError(
                f"past has {len(past)} layers but the model has {num_layers}; give one (key, value) pair per layer"
            )
        for idx, (key, value) in enumerate(past):
            cache.update(key, value, idx)
        S = past[0][0].shape[-2]
    with disable:
        for t0 in tqdm(starts, desc="forkkv: base pass over shared context", unit="chunk", disable=not progress or len(starts) == 1):
            offset[0] = t0
            chunk = ids[t0 : t0 + step][None]
            positions = torch.arange(S + t0, S + t0 + chunk.shape[1], device=ids.device)[None]
            kwargs = dict(input_ids=chunk, position_ids=positions, use_cache=True, **cache_kwargs(cache))
            if runner is base:
                kwargs["logits_to_keep"] = 1
            runner(**kwargs)
    return cache


def check_rope_layout(idx: int, k_out_head: torch.Tensor | None, layer) -> None:
    """Refuse models whose cached K is not rotate-half RoPE applied directly to k_proj's output: the K residual is
    rebuilt on that assumption (a K norm, partial rotary or interleaved RoPE would make it wrong)."""
    if k_out_head is None:
        return
    n = k_out_head.shape[0]
    Hkv, D = layer.key.shape[1], layer.key.shape[-1]
    k = k_out_head.view(n, Hkv, D).transpose(0, 1)
    expect = apply_rope(k, layer.cos[:n].to(k.dtype), layer.sin[:n].to(k.dtype))
    got = layer.key[0, :, :n]
    err = (expect.float() - got.float()).abs().max().item()
    scale = got.float().abs().max().item() + 1e-6
    if err > 2e-2 * scale:
        raise ValueError(
            f"layer {idx}: the cached keys are not rotate-half RoPE of k_proj's output (max deviation {err:.3g} "
            f"against |K| {scale:.3g}); this model transforms K in a way ForkKV cannot split (a K norm, partial or "
            "interleaved rotary). Retarget the adapters away from k_proj (LoRA on v_proj is still shared)."
        )
