"""Every refusal of what a caller hands a :class:`~forkkv_hf.cache.ForkKVCache`, in one place.

- :func:`generate_cache`: which cache a ``generate`` call passes (refuses ``past_key_values=`` and ``cache=`` at once);
- :func:`check_generate_inputs`: a ``generate`` call's inputs against the cache, before anything runs: the rows must
  start with the shared context (and continue what the cache holds), every row must see the whole context (a mask,
  given or derived from ``pad_token_id``, must not hide context tokens), token ids must be in the vocabulary,
  assisted decoding runs one row and returns no hidden states (before, that failed deep inside transformers: found by
  an audit), Activated LoRA is not invoked inside the context (:mod:`forkkv_hf.alora_checks`);
- :func:`check_forward_inputs`: each forward that appends to the cache (generate's steps and direct calls): mask
  length, context columns, positions after the context, the vocabulary, sequence-length dependent RoPE, Activated
  LoRA (direct forwards); whole rows (context + new tokens) are cut to the new tokens when the caller keeps only the
  last logits (assisted decoding's first step passes whole rows) and refused otherwise; new tokens given a whole
  rows' mask with padding but no positions are numbered as generate numbers them (:mod:`forkkv_hf.whole_rows`).

Each error says what is wrong and what to do. Nothing here imports the cache or the shared context (duck typing),
so the cache, the attention and the PEFT integration can all call it.
"""

from __future__ import annotations

import torch

from .alora_checks import check_forward_rows, check_generate_rows
from .compat import CACHE_KWARG, TRANSFORMERS_VERSION, chunked_prefill_skips_cache, text_config
from .generate_settings import check_adapter_names_per_row, generation_setting
from .inputs import check_token_range, vocab_size_of
from .peft.lora_factors import transformers_model
from .rope_checks import check_rope_for_prefill
from .whole_rows import (check_context_positions, check_rows_continue, cut_whole_rows, mask_positions, padded,
                         padding_of, positions_fit, replace_ids, takes_positions, whole_rows)

_USE_MASK = "pass the attention_mask of forkkv_hf.batch_inputs(context_ids, prompts, pad_token_id=...) (its padding " \
            "goes between the context and the prompt)"


def generate_cache(kwargs: dict):
    """The cache a ``generate(**kwargs)`` call passes, under either keyword; refuses two different ones."""
    old, new = kwargs.get("past_key_values"), kwargs.get("cache")
    if old is not None and new is not None and old is not new:
        raise ValueError(
            "generate got both past_key_values= and cache=; transformers uses only one of them. Pass the cache once, "
            f"as {CACHE_KWARG}= on transformers {TRANSFORMERS_VERSION} (forkkv_hf.cache_kwargs(cache) picks it)"
        )
    if new is not None and CACHE_KWARG == "past_key_values" and hasattr(new, "check_generate_inputs"):
        raise ValueError(
            f"transformers {TRANSFORMERS_VERSION} takes the cache as past_key_values=, not cache=; pass "
            "**forkkv_hf.cache_kwargs(cache), which picks the keyword of the installed version"
        )
    return old if old is not None else new


# ---------------------------------------------------------------------------------------------------- generate
def _special_ids(model, kwargs: dict) -> tuple[int | None, set]:
    """``pad_token_id`` and the set of ``eos_token_id`` a generate call with ``kwargs`` uses."""
    pad = generation_setting(model, kwargs, "pad_token_id")
    eos = generation_setting(model, kwargs, "eos_token_id")
    if isinstance(eos, torch.Tensor):
        eos = eos.reshape(-1).tolist()
    eos = set() if eos is None else {int(e) for e in (eos if isinstance(eos, (list, tuple, set)) else [eos])}
    return (None if pad is None else int(pad)), eos


def check_context_mask(mask: torch.Tensor, T: int, length: int, what: str) -> None:
    """Refuse a 2-D ``mask [B, S]`` whose length is not ``length`` or that hides any of the first ``T`` columns (the
    shared context, whose K/V every row shares)."""
    if mask.dim() != 2:
        raise ValueError(f"{what} must be 2-D [batch, tokens] with a ForkKV cache, got shape {tuple(mask.shape)}")
    if mask.shape[1] != length:
        raise ValueError(f"{what} covers {mask.shape[1]} tokens but must cover {length}, one column per token of the "
                         f"rows (shared context, tokens the cache holds, new tokens); {_USE_MASK}")
    hidden = mask[:, :T] == 0
    if bool(hidden.any()):
        row, col = (int(i) for i in hidden.nonzero()[0])
        raise ValueError(
            f"{what} hides token {col} of the {T}-token shared context in row {row}; every row reads the shared "
            f"context's K/V as a whole, so a mask cannot remove context tokens (plain PEFT would compute other K/V for "
            f"that row). {_USE_MASK[0].upper()}{_USE_MASK[1:]}, or build a separate shared context without those "
            "tokens."
        )


def _check_generate_mask(model, input_ids: torch.Tensor, kwargs: dict, T: int) -> None:
    mask = kwargs.get("attention_mask")
    if mask is not None:
        if mask.shape[0] != input_ids.shape[0]:
            raise ValueError(f"attention_mask has {mask.shape[0]} rows but input_ids have {input_ids.shape[0]}")
        check_context_mask(mask, T, input_ids.shape[1], "attention_mask")
        return
    pad, eos = _special_ids(model, kwargs)
    if pad is None or pad in eos:
        return  # generate then attends to every token
    at = (input_ids[:, :T] == pad).nonzero()
    if at.numel():
        raise ValueError(
            f"pad_token_id={pad} occurs inside the shared context (row {int(at[0, 0])}, token {int(at[0, 1])}) and no "
            "attention_mask was given, so generate would derive a mask that hides it from that row; "
            f"{_USE_MASK}, or give a pad_token_id that does not occur in the context"
        )


def check_generate_inputs(cache, model, input_ids, kwargs: dict) -> None:
    """Refuse, before ``generate`` runs, inputs this cache would serve wrong (see the module docstring); the checks
    of the cache's own state (model instance, dtype, adapters) are :meth:`ForkKVCache.check_generate_inputs`'."""
    if kwargs.get("use_cache") is False:  # (a config's False runs eager: forkkv_hf.compile_policy.eager_reason)
        raise ValueError("a ForkKVCache needs use_cache=True (it is the cache the new tokens are appended to)")
    gen_cfg = kwargs.get("generation_config")
    impl = kwargs.get("cache_implementation") or getattr(gen_cfg, "cache_implementation", None)
    if impl is not None:
        raise ValueError(f"cache_implementation={impl!r} asks for another cache; drop it when passing a "
                         "ForkKVCache (which compiles its decode step itself where it can)")
    if input_ids is None:
        raise ValueError("pass input_ids with the full rows (shared context + prompt), as forkkv_hf.batch_inputs "
                         "builds them, together with a ForkKVCache")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a [batch, tokens] LongTensor, as forkkv_hf.batch_inputs builds them")
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold token ids (integer dtype), got {input_ids.dtype}")
    drafts = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")
    assisted = any(kwargs.get(k) is not None or getattr(gen_cfg, k, None) is not None for k in drafts)
    if assisted and input_ids.shape[0] != 1:
        raise ValueError(
            f"assisted and prompt-lookup decoding run one row at a time (a transformers rule), got {input_ids.shape[0]}"
            " rows; generate each row with its own fork (shared.fork([name])) or drop assistant_model / "
            "prompt_lookup_num_tokens / assistant_early_exit"
        )
    if assisted and generation_setting(model, kwargs, "output_hidden_states", False) and generation_setting(
            model, kwargs, "return_dict_in_generate", False):  # (failed inside generate, which collects them then)
        raise ValueError(
            "output_hidden_states=True with assisted, prompt-lookup or early-exit decoding and a ForkKVCache: "
            "transformers splits the first step's hidden states along the whole rows, which the cache cuts to the "
            "tokens after the context; drop output_hidden_states, or drop assistant_model / prompt_lookup_num_tokens"
            " / assistant_early_exit (greedy, sampling and beams return hidden states)"
        )
    pad, _ = _special_ids(model, kwargs)
    vocab = vocab_size_of(model)
    check_token_range(input_ids, "input_ids", vocab, pad_token_id=pad)
    if pad is not None and vocab is not None and not 0 <= pad < vocab:
        raise ValueError(f"pad_token_id={pad} is outside the model's vocabulary (0 <= id < {vocab})")
    T = cache.num_shared_tokens
    P = cache.layers[0].private_length()
    L = input_ids.shape[1]
    if L <= T + P:
        raise ValueError(
            f"input_ids have {L} tokens but this cache already holds {T} shared + {P} private tokens: pass the "
            "whole rows (context + prompt [+ earlier output]) with at least one new token, or call cache.reset()"
        )
    check_rows_continue(cache, input_ids, expanded=True)
    check_context_positions(kwargs.get("position_ids"), T)
    _check_generate_embeds(cache, model, input_ids, kwargs.get("inputs_embeds"), T + P)
    if generation_setting(model, kwargs, "output_attentions", False):
        raise ValueError(_NO_WEIGHTS)
    chunk = generation_setting(model, kwargs, "prefill_chunk_size")
    if chunk is not None and not chunked_prefill_skips_cache():
        raise ValueError(f"prefill_chunk_size with a ForkKVCache on transformers {TRANSFORMERS_VERSION}: its chunked "
                         "prefill starts at the rows' first token, inside the shared context the cache holds; drop "
                         "prefill_chunk_size (the prompts alone are prefilled) or use a newer transformers 5.x")
    if generation_setting(model, kwargs, "token_healing", False):  # re-tokenises the rows after these checks
        raise ValueError("token_healing with a ForkKVCache: it rewrites the rows' tokens inside generate, after the "
                         "shared context was computed from them; heal the prompts before building the rows")
    _check_generate_mask(model, input_ids, kwargs, T)
    check_adapter_names_per_row(model, kwargs, input_ids.shape[0])
    check_generate_rows(cache, model, input_ids, kwargs.get("adapter_names"))
    if model.training:  # as the context's build, the store and the fits refuse it
        raise ValueError("the model is in training mode (dropout on); call model.eval() before generating with a "
                         "ForkKVCache")


_NO_WEIGHTS = ("output_attentions=True with a ForkKV cache: ForkKV's attention computes no attention weights over its "
               "split cache (they would come back empty); drop output_attentions, or run these rows with plain PEFT "
               "+ DynamicCache and attn_implementation='eager' for the weights")


def _embeddings_of(model, ids: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return transformers_model(model).get_input_embeddings()(ids.to(like.device)).to(like.dtype)


def _check_generate_embeds(cache, model, input_ids: torch.Tensor, embeds, S: int) -> None:
    """``inputs_embeds`` beside the whole rows' ``input_ids``: ``generate`` embeds only the tokens after the cache
    from them; over the ``S`` tokens the cache holds (whose K/V came from the ids) they must be the model's own
    embeddings of those ids, or they would be ignored there."""
    if embeds is None:
        return
    B, L = input_ids.shape
    if not isinstance(embeds, torch.Tensor) or embeds.dim() != 3 or tuple(embeds.shape[:2]) != (B, L):
        raise ValueError(f"inputs_embeds must be [batch, tokens, hidden] with the input_ids' [{B}, {L}], got "
                         f"{tuple(getattr(embeds, 'shape', ()))}")
    if not torch.equal(embeds[:, :S], _embeddings_of(model, input_ids[:, :S], embeds)):
        held = "the shared context" + (" and the tokens this cache holds" if S > cache.num_shared_tokens else "")
        raise ValueError(
            f"inputs_embeds differ from the model's embeddings of input_ids over their first {S} tokens ({held}), "
            "whose K/V this cache holds, computed from the token ids: embeddings of your own there would be ignored. "
            "Give embeddings of your own only after them (in the prompt), or run these rows with plain PEFT + "
            "DynamicCache"
        )


# ---------------------------------------------------------------------------------------------------- forward
def check_forward_inputs(cache, module, args: tuple, kwargs: dict, decode_step: bool = False):
    """Checks of one forward of ``module`` (the transformers model) that appends to ``cache``; returns ``(args,
    kwargs)`` with whole rows cut to the new tokens (see :func:`cut_whole_rows`), or ``None`` to run as given.
    ``decode_step``: a forward of a ``generate`` call after its first (the prefill), whose ids, mask and positions
    ``generate`` made from what the first forward was checked on; the checks that read tensor values (a device sync
    per step) are skipped, the shape checks stay."""
    if kwargs.get("output_attentions"):
        raise ValueError(_NO_WEIGHTS)
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, torch.Tensor):
        if isinstance(kwargs.get("inputs_embeds"), torch.Tensor):
            return _check_forward_embeds(cache, module, args, kwargs, decode_step)
        return None
    mask, pos = kwargs.get("attention_mask"), kwargs.get("position_ids")
    B, T = ids.shape[0], cache.num_shared_tokens
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] != B:
        raise ValueError(f"attention_mask has {mask.shape[0]} rows but input_ids have {B}")
    if pos is not None and not positions_fit(pos, B, ids.shape[1]):
        raise ValueError(f"position_ids must be [{B}, {ids.shape[1]}] (one position per token of input_ids; M-RoPE's "
                         f"[sections, {B}, {ids.shape[1]}]), got {tuple(pos.shape)}")
    changed = None
    if whole_rows(cache, ids, mask, pos, decode_step, kwargs.get("cache_position")):
        ids, pos = cut_whole_rows(cache, ids, pos, kwargs)
        args, kwargs = replace_ids(args, kwargs, ids, pos)
        changed = (args, kwargs)
    S = T + cache.layers[0].private_length()
    L = ids.shape[1]
    mask2d = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    if pos is None and not decode_step and len(args) <= 1 and padded(mask2d, S + L) and takes_positions(module):
        pos = mask_positions(mask2d)[:, -L:]  # as generate's; before, numbered after the pads (found by an audit)
        args, kwargs = replace_ids(args, kwargs, ids, pos)
        changed = (args, kwargs)
    config = cache.shared.config  # (a composite config, e.g. Llava's, holds the vocabulary in its text config)
    vocab = getattr(text_config(config), "vocab_size", None)
    if decode_step:
        if mask2d is not None and mask2d.shape[1] != S + L:
            raise ValueError(f"attention_mask covers {mask2d.shape[1]} tokens but must cover {S + L} (cached + new)")
        return changed
    # one device sync for the usual case; the detailed checks below only run to explain a failure
    ok = (ids >= 0).all()
    if vocab is not None:
        ok = ok & (ids < vocab).all()
    if mask2d is not None:
        if mask2d.shape[1] != S + L:
            raise ValueError(f"attention_mask covers {mask2d.shape[1]} tokens but must cover {S + L} (cached + new)")
        ok = ok & (mask2d[:, :T] != 0).all()
    new_valid = None
    if pos is not None:
        new_valid = pos[..., -L:] >= T
        pad = padding_of(mask, S, L)
        if pad is not None:
            new_valid = new_valid | pad
        ok = ok & new_valid.all()
    if not bool(ok):
        check_token_range(ids, "input_ids", vocab)
        if mask2d is not None:
            check_context_mask(mask2d, T, S + L, "attention_mask")
        if new_valid is not None and not bool(new_valid.all()):
            raise ValueError(
                f"position_ids put new tokens at positions below {T}, which the shared context occupies; the tokens "
                f"after the cache start at position {T} (+ earlier tokens of the row): pass position_ids of the "
                "whole rows' attention_mask (cumsum - 1), sliced to the new tokens"
            )
    check_forward_rows(cache, module, ids)  # Activated LoRA invoked inside the context (before: unchecked here)
    if cache.layers[0].private_length() == 0:
        check_rope_for_prefill(cache, module, int(pos.max()) + 1 if pos is not None else S + L)
    return changed


def _check_forward_embeds(cache, module, args: tuple, kwargs: dict, decode_step: bool):
    """:func:`check_forward_inputs` for a forward given ``inputs_embeds`` (the new tokens only: embeddings cannot be
    cut to them as whole rows of ids are): the mask's and positions' shapes; then, outside ``generate``'s decode
    steps, no context column hidden, no new token placed inside the context, no whole rows; positions from a padded
    mask where none are given, as for ids (returns ``(args, kwargs)`` then, else ``None``)."""
    embeds, mask, pos = kwargs["inputs_embeds"], kwargs.get("attention_mask"), kwargs.get("position_ids")
    B, L = embeds.shape[:2]
    T = cache.num_shared_tokens
    S = T + cache.layers[0].private_length()
    mask2d = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    if mask2d is not None and tuple(mask2d.shape) != (B, S + L):
        raise ValueError(f"attention_mask is {list(mask2d.shape)} but must be [{B}, {S + L}]: one column per cached "
                         f"token ({S}, {T} shared) and per new token (inputs_embeds hold the new tokens only)")
    if pos is not None and not positions_fit(pos, B, L):
        raise ValueError(f"position_ids must be [{B}, {L}] (one position per new embedding; M-RoPE's [sections, {B}, "
                         f"{L}]), got {tuple(pos.shape)}")
    if decode_step:
        return None
    if mask2d is not None:
        check_context_mask(mask2d, T, S + L, "attention_mask")
    changed = None
    if pos is None and len(args) == 0 and padded(mask2d, S + L) and takes_positions(module):
        pos = mask_positions(mask2d)[:, -L:]  # as for ids (before, numbered after the pads: found by an audit)
        changed = (args, {**kwargs, "position_ids": pos})
    if pos is not None:
        inside = pos < T
        pad = padding_of(mask, S, L)
        if bool((inside & ~pad if pad is not None else inside).any()):
            raise ValueError(f"position_ids put new tokens at positions below {T}, which the shared context occupies; "
                             f"the embeddings after the cache go at positions {T} and above")
    ctx = cache.shared.token_ids
    if L > T and torch.equal(embeds[:, :T], _embeddings_of(module, ctx, embeds).expand(B, T, -1)):
        raise ValueError(f"inputs_embeds start with the embeddings of the {T}-token shared context, which this cache "
                         "already holds: pass the embeddings of the new tokens only (after the context and the tokens"
                         " the cache holds)")
    if cache.layers[0].private_length() == 0:
        check_rope_for_prefill(cache, module, int(pos.max()) + 1 if pos is not None else S + L)
    return changed


def embedded_ids(cache, embeds, forwards) -> torch.Tensor | None:
    """The token ids of a ``generate`` prefill given ``inputs_embeds`` (``forwards``: the call's forwards so far, 0),
    from the whole rows' ``input_ids`` the call was given (checked equal to the embeddings over what the cache holds),
    for the cache's record of its private tokens; ``None`` for other forwards."""
    ids = cache.__dict__.get("_generate_ids")
    if forwards != 0 or ids is None or not isinstance(embeds, torch.Tensor):
        return None
    S = cache.num_shared_tokens + cache.layers[0].private_length()
    if embeds.shape[0] != ids.shape[0] and embeds.shape[0] % ids.shape[0] == 0:  # num_return_sequences, beams
        ids = ids.repeat_interleave(embeds.shape[0] // ids.shape[0], dim=0)
    return ids[:, S:] if ids.shape[1] - S == embeds.shape[1] else None
