"""Random ForkKV views (shared base + residuals + private K/V) built directly, without a model."""

from __future__ import annotations

import math

import torch

from forkkv_hf.cache import ForkKVView
from forkkv_hf.context import Residual, SharedLayer


def rope_tables(T: int, D: int, base: float = 10000.0, offset: int = 0):
    inv = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    pos = torch.arange(offset, offset + T, dtype=torch.float32)
    f = torch.outer(pos, inv)
    emb = torch.cat([f, f], dim=-1)
    return emb.cos(), emb.sin()


def random_view(
    B=3,
    Hkv=2,
    D=16,
    T=37,
    P=5,
    n_agents=2,
    rows=None,
    ranks=(4, 2),
    v_ranks=None,
    k_res=True,
    v_res=True,
    bias=False,
    dtype=torch.float32,
    device="cpu",
    seed=0,
    res_scale=0.5,
):
    """``rows``: slot per row (-1 = no residual); default cycles through the agents and one -1 row. ``ranks``: per
    agent, of both residuals; ``v_ranks``: V's where they differ from K's (fitted residuals' ``k_rank``)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if rows is None:
        rows = [(i % (n_agents + 1)) - 1 if i % (n_agents + 1) else -1 for i in range(B)]
        rows = [i % (n_agents + 1) - 1 for i in range(1, B + 1)]
    assert len(rows) == B
    cos, sin = rope_tables(T, D)
    key = rnd(1, Hkv, T, D).to(dtype)
    value = rnd(1, Hkv, T, D).to(dtype)

    def residual(ranks):
        r_max = max(ranks[:n_agents])
        r = r_max + bias
        u = torch.zeros(n_agents, T, r)
        Bm = torch.zeros(n_agents, Hkv * D, r)
        for a in range(n_agents):
            ra = ranks[a % len(ranks)]
            u[a, :, :ra] = rnd(T, ra)
            Bm[a, :, :ra] = rnd(Hkv * D, ra) * res_scale / math.sqrt(ra)
            if bias:
                u[a, :, r_max] = 1
                Bm[a, :, r_max] = rnd(Hkv * D) * res_scale
        names = tuple(f"agent{a}" for a in range(n_agents))
        return Residual(names, u.to(dtype), Bm.to(dtype), tuple(ranks[:n_agents]))

    shared = SharedLayer(
        key.to(device),
        value.to(device),
        cos.to(dtype).to(device),
        sin.to(dtype).to(device),
        residual(ranks) if k_res else None,
        residual(ranks if v_ranks is None else v_ranks) if v_res else None,
    )
    for res in (shared.k_res, shared.v_res):
        if res is not None:
            res.u, res.B = res.u.to(device), res.B.to(device)
    rows_t = torch.tensor(rows, dtype=torch.long, device=device)
    names = tuple("__base__" if s < 0 else f"agent{s}" for s in rows)
    view = ForkKVView(
        shared,
        rows_t if k_res else None,
        rows_t if v_res else None,
        rnd(B, Hkv, P, D).to(dtype).to(device),
        rnd(B, Hkv, P, D).to(dtype).to(device),
        names,
        tuple(rows) if k_res else None,
        tuple(rows) if v_res else None,
    )
    return view


def padding_mask(B, Q, T, P, pads, device="cpu"):
    """Bool mask [B, 1, Q, T+P]: whole context visible, the first ``pads[b]`` private tokens of row b masked
    (padding between context and prompt), causal among the private tokens."""
    m = torch.zeros(B, 1, Q, T + P, dtype=torch.bool, device=device)
    m[..., :T] = True
    for b in range(B):
        for i in range(Q):
            last = P - Q + i
            m[b, 0, i, T + pads[b] : T + last + 1] = True
    return m


def lowp_attention_error(query32, view_lowp, mask, scale, ref):
    """Max error against ``ref`` of the same attention done by PyTorch in the view's low dtype over materialised
    rows (matmuls, softmax and rounding in that dtype): the baseline of flash-attention's pass rule."""
    from forkkv_hf.ops.naive import materialize_kv

    dt = view_lowp.shared.key.dtype
    K, V = materialize_kv(view_lowp)
    B, H, Q, D = query32.shape
    G = H // K.shape[1]
    K = K.to(dt).repeat_interleave(G, 1)
    V = V.to(dt).repeat_interleave(G, 1)
    s = (query32.to(dt) @ K.transpose(-1, -2)) * scale
    T, P = view_lowp.shared_len, view_lowp.private_len
    if mask is None:
        allowed = torch.ones(Q, T + P, dtype=torch.bool)
        allowed[:, T:] = torch.ones(Q, P, dtype=torch.bool).tril(P - Q)  # causal, by hand: not the masks under test
    else:
        allowed = mask[:, :, -Q:, : T + P]
    s = s.masked_fill(~allowed, float("-inf"))
    out = torch.softmax(s, dim=-1).to(dt) @ V
    return (out.transpose(1, 2).float() - ref).abs().max().item()
