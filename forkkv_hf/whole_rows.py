"""Which tokens a forward appending to a :class:`~forkkv_hf.cache.ForkKVCache` gives, and where they go: whole rows
(shared context + the tokens the cache holds + new tokens) or the new tokens alone (:func:`whole_rows`), whole rows
cut to their new tokens (:func:`cut_whole_rows`), and the positions of new tokens that a 2-D mask of the whole rows
places (:func:`mask_positions`). :mod:`forkkv_hf.guards` runs them; split from it for its length.

Two changes after an audit: ids that begin with what the cache holds, given without mask or positions, were taken
for whole rows and cut (new tokens that repeat the context lost them, silently): now refused unless a 4-D mask's key
length or ``cache_position`` tells which; and a forward with a whole rows' mask holding padding but no position_ids
numbered a padded row's prompt after its pads (0.05 off its own run, silently): now numbered as generate does.
"""

from __future__ import annotations

import inspect

import torch


def check_rows_continue(cache, ids: torch.Tensor, expanded: bool = False) -> None:
    """``ids [B, >= T + P]`` must start with the shared context and then the private tokens the cache holds
    (``expanded``: a generate's rows, which the cache may hold each ``k`` times: ``batch_repeat_interleave(k)`` before
    a continuation with ``num_return_sequences`` or beams)."""
    T = cache.num_shared_tokens
    P = cache.layers[0].private_length()
    ctx = cache.shared.token_ids.to(ids.device)
    if not torch.equal(ids[:, :T], ctx.expand(ids.shape[0], T)):
        raise ValueError(
            f"input_ids do not start with the {T}-token shared context this cache was built on; build the rows "
            "with forkkv_hf.batch_inputs(context_ids, prompts) (padding goes after the context)"
        )
    if P > 0:
        rec, held = cache.private_ids, ids[:, T : T + P]
        if expanded and rec is not None and rec.shape[0] % ids.shape[0] == 0:
            held = held.repeat_interleave(rec.shape[0] // ids.shape[0], dim=0)
        if rec is None or rec.shape[0] != held.shape[0] or not torch.equal(held, rec.to(ids.device)):
            raise ValueError(
                f"this ForkKVCache already holds {P} private tokens per row from an earlier generate, and these "
                "input_ids do not continue them; call cache.reset() (or fork a new cache) for new prompts"
            )


def padding_of(mask, S: int, L: int):
    """``[B, L]`` bool: which of a forward's ``L`` new tokens (after ``S`` cached ones) are padding, by a 2-D mask
    (0 columns) or a 4-D one (keys its last query does not attend: transformers masks padding as keys; the 4-D masks
    of a compileable cache's generate; for models with ``layer_types``, a dict of them per attention type, each of
    which masks the padding), else ``None``."""
    mask = mask_tensor(mask)
    if mask is None or mask.shape[-1] < S + L or mask.dim() not in (2, 4):
        return None
    cols = mask[:, S : S + L] if mask.dim() == 2 else mask[:, 0, -1, S : S + L]
    if mask.dim() == 4 and cols.dtype != torch.bool:  # additive: 0 attends, a large negative number masks
        return cols < torch.finfo(cols.dtype).min / 2
    return cols == 0


def mask_tensor(mask):
    """A forward's mask as one tensor (of a dict per attention type, the full attention's), else ``None``."""
    if isinstance(mask, dict):
        mask = mask.get("full_attention", next((m for m in mask.values() if isinstance(m, torch.Tensor)), None))
    return mask if isinstance(mask, torch.Tensor) else None


def positions_fit(pos: torch.Tensor, B: int, L: int) -> bool:
    """Whether ``position_ids`` give one position per token of ``B`` rows of ``L``: ``[B or 1, L]``, or M-RoPE's
    ``[sections, B or 1, L]`` (Qwen2-VL's generate builds them for text too; before, refused as malformed)."""
    return pos.dim() in (2, 3) and pos.shape[-2] in (1, B) and pos.shape[-1] == L


def whole_rows(cache, ids: torch.Tensor, mask, pos, decode_step: bool = False, cache_position=None) -> bool:
    """Whether ``ids [B, L]`` of a forward are whole rows (context + what the cache holds + new tokens) rather than
    only the new tokens. A 2-D mask tells by its length, else position ids by where the first new token that is not
    padding starts; with neither, ids that do not begin with what the cache holds are new tokens, and ids that do are
    told by a 4-D mask's key length or ``cache_position``, else refused (before, taken for whole rows: new tokens that
    repeat the context were cut, silently; found by an audit). A decode step of ``generate`` (new tokens only) is told
    by a 2-D mask's length alone."""
    T = cache.num_shared_tokens
    S = T + cache.layers[0].private_length()
    L = ids.shape[1]
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        if mask.shape[1] == S + L:
            return False
        if mask.shape[1] == L and L > S:
            return True
        if mask.shape[1] == L == S:  # whole rows the cache holds already (a longer mask would append them again)
            raise nothing_new(L, S)
        raise ValueError(
            f"attention_mask covers {mask.shape[1]} tokens but this forward appends {L} to a cache holding {S} "
            f"({T} shared): give a mask of {S + L} columns (cached + new tokens), as generate does"
        )
    if decode_step:
        return False
    if pos is not None:
        starts_early = pos[..., 0] < T
        pad = padding_of(mask, S, L)
        if pad is not None:
            starts_early = starts_early & ~pad[:, 0]
        if not bool(starts_early.any()):
            return False
        if L > T and torch.equal(ids[:, :T], cache.shared.token_ids.to(ids.device).expand(ids.shape[0], T)):
            return True
        raise ValueError(
            f"position_ids start at {int(pos[..., 0].min())}, inside the {T}-token shared context, for input_ids that "
            f"are not whole rows: the tokens after the cache go at positions {T} and above (pass position_ids of the "
            f"whole rows' attention_mask, cumsum - 1, sliced to the new tokens)"
        )
    if L <= S:
        return False
    held = cache.shared.token_ids.to(ids.device).expand(ids.shape[0], T)
    if S > T:
        if cache.private_ids is None or tuple(cache.private_ids.shape) != (ids.shape[0], S - T):
            return False
        held = torch.cat([held, cache.private_ids.to(ids.device)], dim=1)
    if not torch.equal(ids[:, :S], held):
        return False
    keys = mask_tensor(mask)
    keys = keys.shape[-1] if keys is not None and keys.dim() == 4 else None
    if keys in (L, S + L):
        return keys == L
    if isinstance(cache_position, torch.Tensor) and cache_position.numel():
        return int(cache_position.reshape(-1)[0]) < S
    raise ValueError(
        f"input_ids hold whole rows ({L} tokens) or new tokens that repeat the {S} tokens this cache holds (they begin "
        f"with them), and no attention_mask or position_ids tell which. Whole rows: pass only the tokens after them, "
        f"input_ids[:, {S}:], with position_ids, or keep them and pass their attention_mask ({L} columns) with "
        f"logits_to_keep=k; new tokens: pass their position_ids ({S} and up) or an attention_mask of {S + L} columns "
        "(cached + new tokens)"
    )


def nothing_new(L: int, S: int) -> ValueError:
    return ValueError(f"input_ids have {L} tokens, all of which this cache already holds ({S}); pass new tokens")


def check_context_positions(pos, T: int) -> None:
    """Whole rows' ``position_ids`` (where given) must number the shared context 0..T-1, as its one pass did."""
    if pos is not None and (not isinstance(pos, torch.Tensor) or pos.shape[-1] < T or not torch.equal(
            pos[..., :T], torch.arange(T, device=pos.device).expand_as(pos[..., :T]))):
        raise ValueError(f"position_ids of the shared context must be 0..{T - 1} in every row (its K/V were computed "
                         "there); give position_ids of the whole rows that start so, or none")


def cut_whole_rows(cache, ids, pos, kwargs: dict):
    """Whole rows -> the new tokens (and their positions), if the caller keeps only logits of new tokens."""
    T = cache.num_shared_tokens
    S = T + cache.layers[0].private_length()
    L = ids.shape[1]
    if L <= S:
        raise nothing_new(L, S)
    check_rows_continue(cache, ids)
    check_context_positions(pos, T)
    keep = kwargs.get("logits_to_keep", 0)
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= L - S:
        raise ValueError(
            f"input_ids hold whole rows ({L} tokens) but the cache already holds their first {S} ({T} shared "
            f"context): pass only the tokens after them, input_ids[:, {S}:], with the attention_mask of the whole "
            f"rows and position_ids[:, {S}:] (or generate, which does that); or pass logits_to_keep=k "
            f"(1 <= k <= {L - S}) to get the logits of the last k tokens only"
        )
    return ids[:, S:], (None if pos is None else pos[..., S:])


def padded(mask2d, length: int) -> bool:
    """Whether a 2-D mask of ``length`` columns masks any."""
    return mask2d is not None and mask2d.shape[1] == length and not bool(mask2d.bool().all())


def takes_positions(module) -> bool:
    """Whether ``module``'s forward names ``position_ids``."""
    return "position_ids" in inspect.signature(module.forward).parameters


def mask_positions(mask2d: torch.Tensor) -> torch.Tensor:
    """The position ids ``generate`` gives the rows of a 2-D mask (padding after the context included): each token
    numbered by the visible tokens before it (a pad at 1, as generate puts it)."""
    return (mask2d.long().cumsum(-1) - 1).masked_fill(mask2d == 0, 1)


def replace_ids(args: tuple, kwargs: dict, ids, pos):
    kwargs = dict(kwargs)
    if "input_ids" in kwargs or not args:
        kwargs["input_ids"] = ids
    else:
        args = (ids,) + tuple(args[1:])
    if pos is not None:
        kwargs["position_ids"] = pos
    return args, kwargs
