"""Triton ResidualAttention, "fused rebuild" family: each work item rebuilds its agents' K residual inside the attention
loop over the shared context.

Reproduces :func:`forkkv_hf.ops.naive.reference_attention` (the fp32, materialising ground truth) without building
any row's K/V of the shared context:

- ``_shared_part_kernel`` (grid: work item x KV head x split of the shared context, flash-decoding style). A work
  item is a block of query vectors (rows x queries x the G query heads of one KV head) from up to ``A_MAX`` agents,
  which share each base tile it loads. Per tile of ``BLOCK_T`` context tokens and per agent, it rebuilds the agent's
  K residual in registers (``u[BLOCK_T, r] @ B_k[r, DC]`` in head-dim chunks, lo and hi halves so that rotate-half
  RoPE with that token's cos/sin is a few FMAs) and adds it to the base tile; scores are computed transposed
  (``[tokens, queries]``) so that rebuilt tile is the left MMA operand. One online-softmax step for all vectors, then
  ``P·V_base`` and the rank-r ``P·u_v`` per agent (the V residual is never expanded). Writes unnormalised partials
  (m, l, acc, acc_uv) per split.
- then :func:`~.attention_common.launch_private_merge`: the rows' private K/V and the log-sum-exp merge.

The cascade family (:mod:`.cascade`) is the default; this one is kept where it measures faster
(eval/KERNEL_NOTES.md).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .attention_common import (LOG2E, cdiv, check_inputs, launch, launch_private_merge, mma, num_sms, on_device, pow2,
                               rope_residual, rope_tile, softmax_step, workspace)

@triton.jit
def _shared_part_kernel(
    Q, s_qb, s_qh, s_qq,
    KB, s_kbh, s_kbt,
    VB, s_vbh, s_vbt,
    COS, SIN, s_ct, s_st,
    UK, s_ukn, s_ukt, BK, s_bkn, s_bko,
    UV, s_uvn, s_uvt,
    MASK, s_mb, s_mq, s_mt,
    SLOT_ROW, SLOT_Q, SLOT_AGENT, AGENT_K, AGENT_V,
    M_WS, L_WS, ACC_WS, UV_WS,
    T, NQ, H, RK, RV, split_len, n_splits, qk_scale,
    G: tl.constexpr, HALF: tl.constexpr, HALF_B: tl.constexpr, RKB: tl.constexpr, RVB: tl.constexpr,
    SLOTS: tl.constexpr, A_MAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_K_RES: tl.constexpr, HAS_V_RES: tl.constexpr, HAS_MASK: tl.constexpr, ROPE_HALF: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, DC: tl.constexpr = 32,
    LOWP_ROPE: tl.constexpr = False,
):
    """The shared context's part of every work item's attention, for one KV head and one split of the context.

    Scores are computed transposed, ``[BLOCK_T, BLOCK_M]`` (context tokens x query vectors), so the K tile rebuilt in
    registers is the *left* MMA operand and never goes through shared memory (eval/KERNEL_NOTES.md)."""
    item = tl.program_id(0)
    hkv = tl.program_id(1)
    split = tl.program_id(2)
    v = tl.arange(0, BLOCK_M)
    slot = v // G
    g = v % G
    in_slots = slot < SLOTS
    row = tl.load(SLOT_ROW + item * SLOTS + slot, mask=in_slots, other=-1)
    valid = row >= 0
    row = tl.maximum(row, 0)
    qi = tl.load(SLOT_Q + item * SLOTS + slot, mask=in_slots, other=0)
    ag = tl.load(SLOT_AGENT + item * SLOTS + slot, mask=in_slots, other=-1)
    head = hkv * G + g
    d = tl.arange(0, HALF_B)
    dm = d < HALF
    # q transposed: [HALF_B, BLOCK_M]
    qT_ptr = Q + row[None, :] * s_qb + head[None, :] * s_qh + qi[None, :] * s_qq + d[:, None]
    qTmask = valid[None, :] & dm[:, None]
    qT_lo = tl.load(qT_ptr, mask=qTmask, other=0.0)
    qT_hi = tl.load(qT_ptr + HALF, mask=qTmask, other=0.0)
    dtype = qT_lo.dtype

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    accT_lo = tl.zeros([HALF_B, BLOCK_M], tl.float32)
    accT_hi = tl.zeros([HALF_B, BLOCK_M], tl.float32)
    acc_uv = tl.zeros([BLOCK_M, RVB], tl.float32)
    rk = tl.arange(0, RKB)
    rv = tl.arange(0, RVB)

    t_begin = split * split_len
    t_end = tl.minimum(T, t_begin + split_len)
    for t0 in range(t_begin, t_end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tm = t < t_end
        kmask = tm[:, None] & dm[None, :]
        if HAS_K_RES:
            # D-chunked so that few [BLOCK_T, DC] tiles are live at once (register pressure, not FLOPs, limits this)
            sT = tl.zeros([BLOCK_T, BLOCK_M], tl.float32)
            dc = tl.arange(0, DC)
            for c in tl.static_range(HALF_B // DC):
                dd = c * DC + dc
                ddm = dd < HALF
                cmask = tm[:, None] & ddm[None, :]
                kb_ptr = KB + hkv * s_kbh + t[:, None] * s_kbt + dd[None, :]
                kb_lo = tl.load(kb_ptr, mask=cmask, other=0.0)
                kb_hi = tl.load(kb_ptr + HALF, mask=cmask, other=0.0)
                c_lo, s_lo, c_hi, s_hi = rope_tile(COS, SIN, s_ct, s_st, t, dd, cmask, HALF, ROPE_HALF)
                qc_ptr = Q + row[None, :] * s_qb + head[None, :] * s_qh + qi[None, :] * s_qq + dd[:, None]
                qc_mask = valid[None, :] & ddm[:, None]
                qc_lo = tl.load(qc_ptr, mask=qc_mask, other=0.0)
                qc_hi = tl.load(qc_ptr + HALF, mask=qc_mask, other=0.0)
                for j in tl.static_range(A_MAX):
                    kslot = tl.load(AGENT_K + item * A_MAX + j)
                    ks = tl.maximum(kslot, 0)
                    lim = tl.where(kslot >= 0, RK, 0)
                    u = tl.load(UK + ks * s_ukn + t[:, None] * s_ukt + rk[None, :],
                                mask=tm[:, None] & (rk[None, :] < lim), other=0.0)
                    # agent j's B_k rows of this chunk, transposed: [RKB, DC]
                    bkT_ptr = BK + ks * s_bkn + (hkv * 2 * HALF + dd[None, :]) * s_bko + rk[:, None]
                    bkT_mask = ddm[None, :] & (rk[:, None] < lim)
                    x_lo = mma(u, tl.load(bkT_ptr, mask=bkT_mask, other=0.0), DOT_PREC, UPCAST)  # [BLOCK_T, DC]
                    x_hi = mma(u, tl.load(bkT_ptr + HALF * s_bko, mask=bkT_mask, other=0.0), DOT_PREC, UPCAST)
                    r_lo, r_hi = rope_residual(x_lo, x_hi, c_lo, s_lo, c_hi, s_hi, dtype, LOWP_ROPE, UPCAST)
                    if LOWP_ROPE and not UPCAST:  # the add in the cache dtype too
                        k_lo = kb_lo + r_lo
                        k_hi = kb_hi + r_hi
                    else:
                        k_lo = (kb_lo.to(tl.float32) + r_lo.to(tl.float32)).to(dtype)
                        k_hi = (kb_hi.to(tl.float32) + r_hi.to(tl.float32)).to(dtype)
                    part = mma(k_lo, qc_lo, DOT_PREC, UPCAST) + mma(k_hi, qc_hi, DOT_PREC, UPCAST)
                    if A_MAX == 1:
                        sT += part
                    else:
                        sT += tl.where(ag[None, :] == j, part, 0.0)
        else:
            kb_ptr = KB + hkv * s_kbh + t[:, None] * s_kbt + d[None, :]
            kb_lo = tl.load(kb_ptr, mask=kmask, other=0.0)
            kb_hi = tl.load(kb_ptr + HALF, mask=kmask, other=0.0)
            sT = mma(kb_lo, qT_lo, DOT_PREC, UPCAST)
            sT += mma(kb_hi, qT_hi, DOT_PREC, UPCAST)
        sT = sT * qk_scale
        allowed = valid[None, :] & tm[:, None]
        if HAS_MASK:
            mk = tl.load(MASK + row[None, :] * s_mb + qi[None, :] * s_mq + t[:, None] * s_mt, mask=allowed, other=0)
            allowed = allowed & (mk != 0)
        pT, alpha, m_new, l_i = softmax_step(tl.where(allowed, sT, float("-inf")), m_i, l_i, 0)
        pTd = pT.to(dtype)
        vT_ptr = VB + hkv * s_vbh + t[None, :] * s_vbt + d[:, None]
        vTmask = tm[None, :] & dm[:, None]
        vT_lo = tl.load(vT_ptr, mask=vTmask, other=0.0)
        vT_hi = tl.load(vT_ptr + HALF, mask=vTmask, other=0.0)
        accT_lo = accT_lo * alpha[None, :] + mma(vT_lo, pTd, DOT_PREC, UPCAST)
        accT_hi = accT_hi * alpha[None, :] + mma(vT_hi, pTd, DOT_PREC, UPCAST)
        if HAS_V_RES:
            # P·u_v as [queries, r]: u_v tiles load contiguously, P is transposed once
            pd = tl.trans(pTd)
            acc_uv = acc_uv * alpha[:, None]
            for j in tl.static_range(A_MAX):
                vslot = tl.load(AGENT_V + item * A_MAX + j)
                vs = tl.maximum(vslot, 0)
                lim = tl.where(vslot >= 0, RV, 0)
                uvt = tl.load(UV + vs * s_uvn + t[:, None] * s_uvt + rv[None, :],
                              mask=tm[:, None] & (rv[None, :] < lim), other=0.0)
                acc_uv += tl.where(ag[:, None] == j, mma(pd, uvt, DOT_PREC, UPCAST), 0.0)
        m_i = m_new

    w = ((row * H + head) * NQ + qi) * n_splits + split
    tl.store(M_WS + w, m_i, mask=valid)
    tl.store(L_WS + w, l_i, mask=valid)
    a_ptr = ACC_WS + w[None, :] * (2 * HALF_B) + d[:, None]
    tl.store(a_ptr, accT_lo, mask=valid[None, :])
    tl.store(a_ptr + HALF_B, accT_hi, mask=valid[None, :])
    if HAS_V_RES:
        tl.store(UV_WS + w[:, None] * RVB + rv[None, :], acc_uv, mask=valid[:, None])



# ---------------------------------------------------------------------------------------------------------------------
# launcher

@functools.lru_cache(maxsize=256)
def _plan(k_slots: tuple, v_slots: tuple, nq: int, slots: int, agents_per_item: int):
    """Pack the (row, query) slots into work items of ``slots`` slots from at most ``agents_per_item`` agents.

    Slots are sorted by agent (its K and V residual slots), so an agent's rows and queries fill items together and an
    item mixes agents only where it has room. Returns host lists: per item and slot the row (-1: empty), query index
    and agent index within the item; per item and agent its K and V slots (-1: none); and A_MAX, the most agents
    any item holds.
    """
    groups: dict = {}
    for r, key in enumerate(zip(k_slots, v_slots)):
        groups.setdefault(key, []).append(r)
    items = []  # each: list of (row, q, agent_key)
    cur, cur_agents = [], []
    for key, rows in groups.items():
        for r in rows:
            for q in range(nq):
                if len(cur) == slots or (key not in cur_agents and len(cur_agents) == agents_per_item):
                    items.append((cur, cur_agents))
                    cur, cur_agents = [], []
                if key not in cur_agents:
                    cur_agents.append(key)
                cur.append((r, q, cur_agents.index(key)))
    if cur:
        items.append((cur, cur_agents))
    a_max = max(len(agents) for _, agents in items)
    slot_row, slot_q, slot_agent, agent_k, agent_v = [], [], [], [], []
    for cur, agents in items:
        pad = slots - len(cur)
        slot_row += [r for r, _, _ in cur] + [-1] * pad
        slot_q += [q for _, q, _ in cur] + [0] * pad
        slot_agent += [a for _, _, a in cur] + [-1] * pad
        agent_k += [k for k, _ in agents] + [-1] * (a_max - len(agents))
        agent_v += [v for _, v in agents] + [-1] * (a_max - len(agents))
    return slot_row, slot_q, slot_agent, agent_k, agent_v, a_max


@functools.lru_cache(maxsize=64)
def _plan_tensors(k_slots: tuple, v_slots: tuple, nq: int, slots: int, agents_per_item: int, device: str):
    *lists, a_max = _plan(k_slots, v_slots, nq, slots, agents_per_item)
    return tuple(torch.tensor(x, dtype=torch.int32, device=device) for x in lists), a_max


@functools.lru_cache(maxsize=64)
def _row_slots(v_slots: tuple, device: str) -> torch.Tensor:
    return torch.tensor(v_slots, dtype=torch.int32, device=device)


def fused_rebuild_attention(q: torch.Tensor, k_base: torch.Tensor, v_base: torch.Tensor, cos: torch.Tensor,
                            sin: torch.Tensor, k_priv: torch.Tensor, v_priv: torch.Tensor, scale: float, *,
                            k_u=None, k_B=None, k_slots: tuple | None = None, v_u=None, v_B=None,
                            v_slots: tuple | None = None, mask=None, rope_half: bool = False, **tuning) -> torch.Tensor:
    """Attention of ``q [B, H, NQ, D]`` (after RoPE) over each row's ``[shared base + its agent's residual | private]``
    K/V; returns ``[B, NQ, H, D]`` in the query's dtype.

    ``k_base``/``v_base [H_kv, T, D]``, ``cos``/``sin [T, D]`` (``rope_half``: their halves are equal),
    ``k_priv``/``v_priv [B, H_kv, P, D]``; ``k_u [n, T, r]`` and ``k_B [n, H_kv·D, r]`` (scaled) with ``k_slots`` the
    host tuple of each row's slot (-1: none), the same for V; ``mask [B, NQ, T + P]`` int8 (1 = attend) or None (the
    shared context visible, causal in the private part). ``tuning``: see :func:`_fused_rebuild_attention` and :func:`_launch`.
    """
    with on_device(q.device):
        return _fused_rebuild_attention(q, k_base, v_base, cos, sin, k_priv, v_priv, scale, k_u, k_B, k_slots, v_u,
                                        v_B, v_slots, mask, rope_half, **tuning)


@dataclass(frozen=True)
class WorkPlan:
    """How the shared-part kernel packs (row, query) slots into work items (:func:`_plan`), as device tensors: per item
    and slot ``slot_row`` (-1: empty), ``slot_q``, ``slot_agent``; per item and agent ``agent_k``/``agent_v`` (residual
    slots, -1: none); per row ``row_vslot`` (its V slot; ``None`` without a V residual). ``block_m``: query vectors
    per item; ``a_max``: the most agents an item holds; ``has_k``/``has_v``: some row has a residual of that kind.
    Memoised by the rows' slots, so a decode step (eager or captured in a CUDA graph) plans nothing."""

    block_m: int
    a_max: int
    slot_row: torch.Tensor
    slot_q: torch.Tensor
    slot_agent: torch.Tensor
    agent_k: torch.Tensor
    agent_v: torch.Tensor
    row_vslot: torch.Tensor | None
    has_k: bool
    has_v: bool


@functools.lru_cache(maxsize=256)
def plan_work(k_slots: tuple, v_slots: tuple, nq: int, groups: int, device: str, block_m: int | None = None,
              agents_per_item: int | None = 4) -> WorkPlan:
    """The work items for rows whose K/V residual slots are the host tuples ``k_slots``/``v_slots`` (-1: none; all -1
    when the layer has no residual of that kind), ``nq`` queries per row, ``groups`` query heads per KV head."""
    B = len(k_slots)
    has_k = any(s >= 0 for s in k_slots)
    has_v = any(s >= 0 for s in v_slots)
    k_slots = tuple(k_slots) if has_k else (-1,) * B
    v_slots = tuple(v_slots) if has_v else (-1,) * B
    BLOCK_M = max(block_m or (16 if nq == 1 else 64), pow2(groups))
    SLOTS = BLOCK_M // groups
    apm = min(SLOTS, agents_per_item or 8)
    tensors, a_max = _plan_tensors(k_slots, v_slots, nq, SLOTS, apm, device)
    return WorkPlan(BLOCK_M, a_max, *tensors, _row_slots(v_slots, device) if has_v else None, has_k, has_v)


def fused_rebuild_attention_planned(q: torch.Tensor, k_base: torch.Tensor, v_base: torch.Tensor, cos: torch.Tensor,
                                    sin: torch.Tensor, k_priv: torch.Tensor, v_priv: torch.Tensor, scale: float,
                                    plan: WorkPlan, *, k_u=None, k_B=None, v_u=None, v_B=None, mask=None,
                                    rope_half: bool = False, scratch=workspace, **tuning) -> torch.Tensor:
    """:func:`fused_rebuild_attention` over a :func:`plan_work` plan (``k_u``/``k_B`` used when ``plan.has_k``, the V
    ones when ``plan.has_v``): no host reads of tensor values, so a CUDA graph can capture it. ``scratch(name, numel,
    device)``: the partials' buffers (default: reusable workspaces; a CUDA-graph capture passes
    :func:`~.attention_common.fresh_scratch`)."""
    with on_device(q.device):
        return _launch(q, k_base, v_base, cos, sin, k_priv, v_priv, scale, plan, k_u, k_B, v_u, v_B, mask,
                       rope_half, scratch, **tuning)


def _fused_rebuild_attention(q, k_base, v_base, cos, sin, k_priv, v_priv, scale, k_u, k_B, k_slots, v_u, v_B, v_slots,
                             mask, rope_half, block_m: int | None = None, agents_per_item: int | None = 4, **tuning):
    """Plans the work items (``block_m`` query vectors per item, at most ``agents_per_item`` agents in one item: they
    share each base tile), then :func:`_launch`."""
    B, H, NQ, _ = q.shape
    none = (-1,) * B
    plan = plan_work(none if k_u is None else tuple(k_slots), none if v_u is None else tuple(v_slots), NQ,
                     H // k_base.shape[0], str(q.device), block_m, agents_per_item)
    return _launch(q, k_base, v_base, cos, sin, k_priv, v_priv, scale, plan, k_u, k_B, v_u, v_B, mask, rope_half,
                   workspace, **tuning)


def _launch(q, k_base, v_base, cos, sin, k_priv, v_priv, scale, plan: WorkPlan, k_u, k_B, v_u, v_B, mask, rope_half,
            scratch, block_t: int | None = None, n_splits: int | None = None, num_warps: int = 4,
            num_stages: int = 2, programs_per_sm: int = 8, d_chunk: int | None = None,
            lowp_rope: bool | None = None, launches: dict | None = None) -> torch.Tensor:
    """Tuning knobs (defaults are what the benchmarks chose): ``block_t`` context tokens per tile, ``n_splits`` splits of
    the shared context, ``num_warps``/``num_stages`` for the shared-part kernel, ``programs_per_sm``
    how many programs the split of the context aims at per SM, ``d_chunk`` the head-dim chunk of the K-residual
    rebuild (default 64 with ``lowp_rope``, else 32), ``lowp_rope`` the K residual's rotation and its add to the base
    tile in the cache dtype (bf16/fp16 FMAs) instead of fp32 (``None``: on for bf16/fp16 on the GPU, where it is
    faster and within the tests' pass rule; eval/KERNEL_NOTES.md v6). ``launches``: a dict that receives the compiled
    kernels (``"shared"``, ``"merge"``: registers, spills, shared memory) for the tuning scripts.
    """
    B, H, NQ, D = q.shape
    Hkv, T, _ = k_base.shape
    P = k_priv.shape[2]
    q, k_base, v_base, k_priv, v_priv = check_inputs(q, k_base, v_base, k_priv, v_priv)
    G, HALF = H // Hkv, D // 2
    dev, dtype = q.device, q.dtype
    has_k, has_v = plan.has_k, plan.has_v
    RK = k_u.shape[-1] if has_k else 1
    RV = v_u.shape[-1] if has_v else 1
    RKB, RVB = pow2(RK), pow2(RV)
    HALF_B = pow2(HALF)
    prec = "ieee" if dtype == torch.float32 else "tf32"

    interp = not q.is_cuda
    if dtype == torch.float32 and not interp:  # fp32 tiles take twice the shared memory
        block_t, num_stages = block_t or 32, 1
    BLOCK_T = block_t or (32 if interp else 64)
    BLOCK_M = plan.block_m
    SLOTS = BLOCK_M // G
    slot_row, slot_q, slot_agent, agent_k, agent_v, a_max = (plan.slot_row, plan.slot_q, plan.slot_agent,
                                                             plan.agent_k, plan.agent_v, plan.a_max)
    n_items = slot_row.numel() // SLOTS

    if n_splits is None:
        target = programs_per_sm * num_sms(str(dev))
        n_splits = max(1, min(cdiv(T, BLOCK_T), cdiv(target, n_items * Hkv)))
    split_len = cdiv(cdiv(T, n_splits), BLOCK_T) * BLOCK_T
    n_splits = cdiv(T, split_len)

    has_mask = mask is not None
    mk = mask if has_mask else q  # dummy pointer
    ms = mask.stride() if has_mask else (0, 0, 0)

    n_vec = B * H * NQ * n_splits
    ws = (scratch("m", n_vec, dev), scratch("l", n_vec, dev), scratch("acc", n_vec * 2 * HALF_B, dev),
          scratch("uv", n_vec * RVB if has_v else 1, dev))

    uk = k_u if has_k else q
    bk = k_B if has_k else q
    uv = v_u if has_v else q
    bv = v_B if has_v else q
    uk_s = (uk.stride(0), uk.stride(1)) if has_k else (0, 0)
    bk_s = (bk.stride(0), bk.stride(1)) if has_k else (0, 0)
    uv_s = (uv.stride(0), uv.stride(1)) if has_v else (0, 0)
    qk_scale = float(scale) * LOG2E
    if lowp_rope is None:
        lowp_rope = not interp and dtype in (torch.bfloat16, torch.float16)
    lowp = bool(lowp_rope) and dtype != torch.float32

    shared = launch(
        _shared_part_kernel, (n_items, Hkv, n_splits), q, q.stride(0), q.stride(1), q.stride(2),
        k_base, k_base.stride(0), k_base.stride(1),
        v_base, v_base.stride(0), v_base.stride(1),
        cos, sin, cos.stride(0), sin.stride(0),
        uk, *uk_s, bk, *bk_s,
        uv, *uv_s,
        mk, *ms,
        slot_row, slot_q, slot_agent, agent_k, agent_v,
        *ws,
        T, NQ, H, RK, RV, split_len, n_splits, qk_scale,
        G=G, HALF=HALF, HALF_B=HALF_B, RKB=RKB, RVB=RVB, SLOTS=SLOTS, A_MAX=a_max, BLOCK_M=BLOCK_M,
        BLOCK_T=BLOCK_T, HAS_K_RES=has_k, HAS_V_RES=has_v, HAS_MASK=has_mask, ROPE_HALF=has_k and rope_half,
        DOT_PREC=prec, UPCAST=interp, DC=min(HALF_B, max(16, d_chunk or (64 if lowp else 32))),
        LOWP_ROPE=lowp,
        num_warps=num_warps, num_stages=num_stages,
    )
    out, merge = launch_private_merge(
        q, k_priv, v_priv, bv, plan.row_vslot, mask, ws, n_splits, qk_scale, T=T, RV=RV, has_v=has_v, block_t=BLOCK_T,
        prec=prec, interp=interp)
    if launches is not None:
        launches.update(shared=shared, merge=merge)
    return out
