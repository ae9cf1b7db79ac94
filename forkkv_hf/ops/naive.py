"""The ForkKV math in plain PyTorch, materialising every row's K/V in fp32. Slow and memory-hungry on purpose:
it is the readable ground truth that the fast paths (:mod:`forkkv_hf.ops.dispatch`, the Triton kernels) are
tested against. Only the tests (and the public :func:`reference_attention`) use it; no fast path imports it.

For row ``b`` with agent slot ``s`` (``-1``: none), position ``t`` of the shared context:
``K_b[t] = K_base[t] + RoPE_t(B_k[s] u_k[s, t])`` and ``V_b[t] = V_base[t] + B_v[s] u_v[s, t]`` (``B`` already scaled);
after the shared context come the row's private K/V.
"""

from __future__ import annotations

import torch

from .masks import implicit_mask, kv_mask
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
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a query that sees no key: 0, as SDPA gives
    out = torch.einsum("bhqk,bhkd->bhqd", p, V)
    return out.transpose(1, 2)
