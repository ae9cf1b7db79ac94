"""The attention masks every ForkKV attention path shares: the model's mask normalised to ``[B, Q, T + P]`` over
``[shared context | private part]``, the implicit mask a ``None`` stands for, the kernels' int8 form and a static
layer's visible-keys mask. The fast paths and the reference (:mod:`.naive`) both read them, so the tests build
their masks by hand (tests/views.py) rather than through this module."""

from __future__ import annotations

import torch


def kv_mask(attention_mask, B: int, Q: int, T: int, P: int, device) -> tuple[torch.Tensor | None, bool]:
    """Normalise the mask the model passes to ``[B, Q, T + P]``.

    Returns ``(mask, additive)``: a bool mask (True = attend), a float additive mask, or ``None`` meaning "causal
    within the private part, the whole shared context visible" (what transformers' sdpa mask leaves implicit).
    """
    if attention_mask is None:
        return None, False
    m = attention_mask
    if m.dim() == 4:
        if m.shape[1] != 1:
            raise ValueError(f"per-head attention masks are not supported (got {tuple(m.shape)})")
        m = m[:, 0]
    if m.dim() != 3:
        raise ValueError(f"expected a 4D attention mask [B, 1, Q, kv], got shape {tuple(attention_mask.shape)}")
    kv = T + P
    m = m[..., -Q:, :]
    if m.shape[-1] < kv:
        raise ValueError(f"the attention mask covers {m.shape[-1]} keys but the cache holds {kv}")
    m = m[..., :kv].expand(B, Q, kv)
    return m, m.dtype != torch.bool


def causal_private_mask(Q: int, P: int, device) -> torch.Tensor:
    """``[Q, P]`` bool: query ``i`` (the last ``Q`` of the private part) sees private key ``j`` iff ``j <= P - Q + i``."""
    i = torch.arange(Q, device=device)[:, None]
    j = torch.arange(P, device=device)[None, :]
    return j <= (P - Q + i)


def implicit_mask(Q: int, T: int, P: int, device) -> torch.Tensor:
    """``[Q, T + P]`` bool, what a ``None`` mask means: the whole shared context visible, causal in the private part."""
    allowed = torch.ones(Q, T + P, dtype=torch.bool, device=device)
    allowed[:, T:] = causal_private_mask(Q, P, device)
    return allowed


def int8_mask(attention_mask, B: int, Q: int, T: int, P: int):
    """The model's mask as the kernels take it: ``[B, Q, T + P]`` int8 (1 = attend), or None for the implicit mask."""
    mask, additive = kv_mask(attention_mask, B, Q, T, P, None)
    if mask is None:
        return None
    if additive:  # an additive float mask: only 0 / -inf-like entries can be expressed as a bool mask
        finite = mask > torch.finfo(mask.dtype).min / 2
        if not bool(((mask == 0) | ~finite).all()):
            raise ValueError("the Triton ResidualAttention takes boolean (or 0/-inf) masks, not additive biases; "
                             "use backend='torch' for attention biases")
        mask = finite
    return mask.view(torch.int8) if mask.dtype == torch.bool else mask.to(torch.int8)


def visible_mask(view, Q: int) -> torch.Tensor:
    """``[1, 1, Q, T + capacity]`` bool: what a ``None`` mask means over a static layer (the whole shared context,
    causal among the ``view.length`` private tokens written; the rest of the buffer unwritten)."""
    T, P = view.shared_len, view.private_len
    dev = view.key.device
    last = T + view.length - Q + torch.arange(Q, device=dev)  # absolute position of each query
    return (torch.arange(T + P, device=dev)[None, :] <= last[:, None])[None, None]
