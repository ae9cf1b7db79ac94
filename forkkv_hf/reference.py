"""The ForkKV math in plain PyTorch, materialising every row's K/V in fp32. Slow and memory-hungry on purpose:
it is the readable ground truth that the fast paths (:mod:`forkkv_hf.residual_attention`, the Triton kernels) are
tested against.

For row ``b`` with agent slot ``s`` (``-1``: none), position ``t`` of the shared context:
``K_b[t] = K_base[t] + RoPE_t(B_k[s] u_k[s, t])`` and ``V_b[t] = V_base[t] + B_v[s] u_v[s, t]`` (``B`` already scaled);
after the shared context come the row's private K/V.
"""

from __future__ import annotations

import torch

from .rope import apply_rope


def _rows_residual(res, rows: torch.Tensor, B: int, Hkv: int, D: int) -> torch.Tensor:
    """``[B, T, H_kv, D]`` un-rotated residual ``B[s] u[s]`` per row (zeros where the row's slot is -1)."""
    T = res.u.shape[1]
    out = torch.zeros(B, T, Hkv * D, dtype=torch.float32, device=res.u.device)
    for b in range(B):
        s = int(rows[b])
        if s >= 0:
            out[b] = res.u[s].float() @ res.B[s].float().t()
    return out.view(B, T, Hkv, D)


def materialize_kv(view) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row's full K and V, ``[B, H_kv, T + P, D]`` in fp32."""
    sh = view.shared
    B = view.batch_size
    _, Hkv, T, D = sh.key.shape
    K = sh.key.float().expand(B, Hkv, T, D).clone()
    V = sh.value.float().expand(B, Hkv, T, D).clone()
    # a view reads a residual only if it has rows for it: a fork with ``residual="v"`` of a K+V context has no k_rows
    if sh.k_res is not None and view.k_rows is not None:
        dk = _rows_residual(sh.k_res, view.k_rows, B, Hkv, D).transpose(1, 2)  # [B, Hkv, T, D]
        K += apply_rope(dk, sh.cos.float(), sh.sin.float())
    if sh.v_res is not None and view.v_rows is not None:
        V += _rows_residual(sh.v_res, view.v_rows, B, Hkv, D).transpose(1, 2)
    K = torch.cat([K, view.key.float()], dim=2)
    V = torch.cat([V, view.value.float()], dim=2)
    return K, V


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


def reference_attention(query: torch.Tensor, view, attention_mask, scaling: float,
                        softcap: float | None = None) -> torch.Tensor:
    """Attention of ``query [B, H, Q, D]`` over the materialised rows; returns ``[B, Q, H, D]`` in fp32.
    ``softcap``: attention-logit soft-capping ``tanh(s / c) · c`` of the scaled scores (Gemma 2)."""
    B, H, Q, D = query.shape
    K, V = materialize_kv(view)
    Hkv = K.shape[1]
    G = H // Hkv
    T, P = view.shared_len, view.private_len
    K = K.repeat_interleave(G, dim=1)
    V = V.repeat_interleave(G, dim=1)
    s = torch.einsum("bhqd,bhkd->bhqk", query.float(), K) * scaling
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    mask, additive = kv_mask(attention_mask, B, Q, T, P, query.device)
    if mask is None:
        s = s.masked_fill(~implicit_mask(Q, T, P, query.device), float("-inf"))
    elif additive:
        s = s + mask[:, None].float()
    else:
        s = s.masked_fill(~mask[:, None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    out = torch.einsum("bhqk,bhkd->bhqd", p, V)
    return out.transpose(1, 2)
