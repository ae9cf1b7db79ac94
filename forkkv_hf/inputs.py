"""Token ids in, checked: the one normaliser of every id sequence ForkKV takes (contexts, prompts), and the batch
inputs for ``generate`` over a forked context: ``[context | padding | prompt_i]`` per row."""

from __future__ import annotations

import torch


def vocab_size_of(model) -> int | None:
    """Rows of the model's input embedding (the bound token ids must stay below), or ``config.vocab_size``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    n = getattr(emb, "num_embeddings", None)
    return n if isinstance(n, int) else getattr(getattr(base, "config", None), "vocab_size", None)


def check_token_range(ids: torch.Tensor, what: str, vocab_size: int | None = None, pad_token_id=None) -> None:
    """Refuse ids ``< 0`` or ``>= vocab_size`` in ``ids`` (any shape) with the first offending id and its place."""
    if ids.numel() == 0:
        return
    lo, hi = torch.aminmax(ids)
    bad = None
    if int(lo) < 0:
        bad = ids < 0
    elif vocab_size is not None and int(hi) >= vocab_size:
        bad = ids >= vocab_size
    if bad is None:
        return
    where = tuple(int(i) for i in bad.nonzero()[0])
    value = int(ids[where])
    place = f"index {where[0]}" if len(where) == 1 else f"row {where[0]}, column {where[1]}"
    bound = f"0 <= id < {vocab_size} (the model's vocabulary)" if vocab_size is not None else "id >= 0"
    hint = f" (it is the pad_token_id {pad_token_id}: give a pad_token_id inside the vocabulary)" \
        if pad_token_id is not None and value == pad_token_id else ""
    raise ValueError(f"{what} holds token id {value} at {place}{hint}; token ids must satisfy {bound}")


def as_token_ids(x, what: str, vocab_size: int | None = None) -> torch.Tensor:
    """One sequence of token ids as a 1-D ``LongTensor``: ``x`` is a list/tuple of ints or an integer tensor of
    shape ``[L]`` or ``[1, L]``, or a tokenizer's output of one sequence (a ``BatchEncoding`` or dict: its
    ``input_ids``, what ``apply_chat_template`` returns on transformers 5.x; before, refused with no hint, found by an
    audit). Refuses floats and bools (never truncates them), ragged or batched input, padding in such an output's
    ``attention_mask``, and ids outside ``[0, vocab_size)`` (``vocab_size=None``: only negative ids)."""
    if hasattr(x, "keys"):
        x = _mapping_ids(x, what)
    if isinstance(x, (list, tuple)):
        if len(x) == 0:
            return torch.zeros(0, dtype=torch.long)
        try:
            x = torch.tensor(list(x))
        except (ValueError, TypeError, RuntimeError) as e:
            raise ValueError(
                f"{what} is not a flat list of token ids ({e}); give one sequence of ints, e.g. tokenizer(text).input_ids"
            ) from None
    if hasattr(x, "__array__") and not isinstance(x, torch.Tensor):  # numpy
        x = torch.as_tensor(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a 1-D LongTensor or a list of token ids, got {type(x).__name__}")
    if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
        raise TypeError(
            f"{what} must hold token ids (integer dtype), got {x.dtype}; convert with .long() only if these really "
            "are ids (floats are not rounded or truncated here)"
        )
    if x.dim() == 2:
        if x.shape[0] != 1:
            raise ValueError(f"{what} has batch size {x.shape[0]}; it is one sequence ([L] or [1, L])")
        x = x[0]
    if x.dim() != 1:
        raise ValueError(f"{what} must be [L] or [1, L], got shape {tuple(x.shape)}")
    x = x.long()
    check_token_range(x, what, vocab_size)
    return x


def _mapping_ids(x, what: str):
    """``x["input_ids"]`` of a tokenizer's output of one sequence; refuses other mappings and padded rows."""
    if "input_ids" not in x:
        raise TypeError(f"{what} is a mapping without input_ids (keys {list(x.keys())}); give one sequence of token "
                        "ids, e.g. tokenizer(text).input_ids")
    try:
        padded = x.get("attention_mask") is not None and not bool((torch.as_tensor(x["attention_mask"]) != 0).all())
    except (ValueError, TypeError, RuntimeError):  # ragged lists: a batch, refused with its ids
        padded = False
    if padded:
        raise ValueError(f"{what} is a tokenizer output with padding in its attention_mask; give the unpadded token "
                         "ids of one sequence (tokenizer(text).input_ids, or apply_chat_template(..., "
                         "return_dict=False))")
    return x["input_ids"]


def context_token_ids(context_ids, vocab_size: int | None = None) -> torch.Tensor:
    """``context_ids`` of a shared context, checked (:func:`as_token_ids`) and non-empty: ``[T]`` long."""
    ids = as_token_ids(context_ids, "context_ids", vocab_size)
    if ids.numel() == 0:
        raise ValueError("the shared context is empty; give it at least one token")
    return ids


def _pad_id(pad_token_id) -> int:
    if isinstance(pad_token_id, torch.Tensor) and pad_token_id.numel() == 1 and not pad_token_id.is_floating_point():
        pad_token_id = int(pad_token_id)
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
        raise TypeError(f"pad_token_id must be an int token id, got {pad_token_id!r}")
    if pad_token_id < 0:
        raise ValueError(f"pad_token_id must be a token id >= 0, got {pad_token_id}")
    return pad_token_id


def _padded(rows: torch.Tensor, pad: int) -> bool:
    """Whether the rows of ``rows [B, L]`` carry different numbers of ``pad`` at their start or end (a padded batch;
    rows that all start with one eos = pad id are not)."""
    is_pad = (torch.as_tensor(rows) == pad).long()
    lead, trail = is_pad.cumprod(1).sum(1), is_pad.flip(1).cumprod(1).sum(1)
    return bool((lead != lead[0]).any() or (trail != trail[0]).any())


def batch_inputs(context_ids, prompts, pad_token_id: int | None = None, device=None) -> dict:
    """``input_ids`` and ``attention_mask`` ``[B, T + L_max]`` for rows "context + that row's prompt".

    Padding goes between the context and the prompt and is masked, so the context sits at positions ``0..T-1`` in
    every row (the positions its shared cache was computed at) and each prompt follows at ``T, T+1, ...``. Pass the
    result to ``generate(**inputs, adapter_names=..., **cache_kwargs(cache))``: generate then runs only the prompts.
    Pass its ``attention_mask`` too: without it, ``generate`` derives a mask from ``pad_token_id`` that also hides
    any pad id inside the context, which a ForkKV cache refuses.
    """
    ctx = as_token_ids(context_ids, "context_ids")
    if isinstance(prompts, torch.Tensor) and prompts.dim() == 1:
        raise TypeError("prompts must be a list of prompts (one per row); wrap a single prompt as [prompt]")
    if hasattr(prompts, "keys"):  # a tokenizer's BatchEncoding
        raise TypeError("prompts is a mapping (a tokenizer's output?); give a list of unpadded prompts, e.g. "
                        "[tokenizer(t).input_ids for t in texts]")
    rows = [as_token_ids(p, f"prompt {i}") for i, p in enumerate(prompts)]
    if pad_token_id is not None and len(rows) > 1 and len({p.numel() for p in rows}) == 1 and _padded(
            torch.stack(rows), _pad_id(pad_token_id)):
        # a tokenizer's padded batch (a [B, L] tensor, or its lists): its pads would sit inside the prompts, unmasked
        # and attended (silently)
        # (unpadded rows of one length may look so too: one ends with the pad id, e.g. pad = eos, found by an
        # audit; rows of one length need no padding, so pad_token_id=None takes them as they are)
        raise ValueError(f"prompts are rows of one length that start or end with different numbers of "
                         f"pad_token_id={pad_token_id} (padded); give unpadded prompts: batch_inputs pads them itself. "
                         f"If they are unpadded and only happen to start or end with token {pad_token_id} (e.g. pad "
                         "= eos), call batch_inputs without pad_token_id: rows of one length need no padding")
    if not rows:
        raise ValueError("give at least one prompt")
    for i, p in enumerate(rows):
        if p.numel() == 0:
            raise ValueError(
                f"prompt {i} is empty; every row needs at least one token after the shared context (the next token "
                "is predicted from the row's last token, which the shared cache does not hold logits for)"
            )
    L = max(p.numel() for p in rows)
    if pad_token_id is None:
        if any(p.numel() != L for p in rows):
            raise ValueError("prompts have different lengths: give pad_token_id (e.g. tokenizer.pad_token_id)")
        pad_token_id = 0
    pad_token_id = _pad_id(pad_token_id)
    T = ctx.numel()
    input_ids = torch.full((len(rows), T + L), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T + L), dtype=torch.long)
    input_ids[:, :T] = ctx
    attention_mask[:, :T] = 1
    for i, p in enumerate(rows):
        input_ids[i, T + L - p.numel() :] = p
        attention_mask[i, T + L - p.numel() :] = 1
    if device is not None:
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    return {"input_ids": input_ids, "attention_mask": attention_mask}
