"""Rotate-half RoPE as transformers' Llama applies it (``apply_rotary_pos_emb``), on ``[..., T, D]`` tensors."""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin``; ``cos``/``sin`` are ``[T, D]`` and broadcast over the leading dims of
    ``x: [..., T, D]``."""
    return x * cos + rotate_half(x) * sin


def unapply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`apply_rope`: ``RoPE_-t`` divided by ``cos² + sin²``, which is 1 for plain tables and
    ``attention_scaling²`` for YaRN's or longrope's scaled ones (``RoPE_-t`` alone left a drift fitted under them
    scaled by s², silently: a full-width fit 0.3 off the agent's own run)."""
    return apply_rope(x, cos, -sin) / (cos * cos + sin * sin)
