"""Batch inputs for ``generate`` over a forked context: ``[context | padding | prompt_i]`` per row."""

from __future__ import annotations

import torch


def _ids(x, what: str) -> torch.Tensor:
    if isinstance(x, (list, tuple)):
        x = torch.tensor(list(x), dtype=torch.long)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a 1-D LongTensor or a list of token ids, got {type(x).__name__}")
    if x.dim() == 2 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 1:
        raise ValueError(f"{what} must be 1-D (or [1, L]), got shape {tuple(x.shape)}")
    return x.long()


def batch_inputs(context_ids, prompts, pad_token_id: int | None = None, device=None) -> dict:
    """``input_ids`` and ``attention_mask`` ``[B, T + L_max]`` for rows "context + that row's prompt".

    Padding goes between the context and the prompt and is masked, so the context sits at positions ``0..T-1`` in
    every row (the positions its shared cache was computed at) and each prompt follows at ``T, T+1, ...``. Pass the
    result to ``generate(**inputs, adapter_names=..., past_key_values=cache)``: generate then runs only the prompts.
    """
    ctx = _ids(context_ids, "context_ids")
    rows = [_ids(p, f"prompt {i}") for i, p in enumerate(prompts)]
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
    T = ctx.numel()
    input_ids = torch.full((len(rows), T + L), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T + L), dtype=torch.long)
    input_ids[:, :T] = ctx
    attention_mask[:, :T] = 1
    for i, p in enumerate(rows):
        input_ids[i, T + L - p.numel() :] = p
        attention_mask[i, T + L - p.numel() :] = 1
    if device is not None:
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    return {"input_ids": input_ids, "attention_mask": attention_mask}
