"""Triton ResidualAttention: attention over a shared base K/V, per-agent low-rank residuals and per-row private K/V.

Reproduces :func:`forkkv_hf.reference.reference_attention` (the fp32, materialising ground truth) without building
any row's K/V of the shared context:

- ``_shared_part_kernel`` (grid: work item x KV head x split of the shared context, flash-decoding style). A work
  item is a block of query vectors (rows x queries x the G query heads of one KV head) from up to ``A_MAX`` agents,
  which share each base tile it loads. Per tile of ``BLOCK_T`` context tokens and per agent, it rebuilds the agent's
  K residual in registers (``u[BLOCK_T, r] @ B_k[r, DC]`` in head-dim chunks, lo and hi halves so that rotate-half
  RoPE with that token's cos/sin is a few FMAs) and adds it to the base tile; scores are computed transposed
  (``[tokens, queries]``) so that rebuilt tile is the left MMA operand. One online-softmax step for all vectors, then
  ``P·V_base`` and the rank-r ``P·u_v`` per agent (the V residual is never expanded). Writes unnormalised partials
  (m, l, acc, acc_uv) per split.
- ``_private_merge_kernel`` (grid: row x KV head x query block). Attends to the row's private K/V (causal, or the
  given mask), merges it with the shared partials by log-sum-exp, applies ``B_v`` to the merged ``P·u_v`` once, and
  writes the output ``[B, Q, H, D]``.

Decode (one query per row) and extend (a block of queries per row) are the same two kernels with different blocks.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


def _cdiv(a: int, b: int) -> int:
    # plain integer math: triton.cdiv / next_power_of_2 go through Triton's JIT machinery, ~10 µs a call on the host
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@triton.jit
def _dot(a, b, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``tl.dot`` with fp32 accumulation. ``UPCAST`` (the CPU interpreter) feeds it fp32 copies: the interpreter's
    bf16 dot is wrong (triton 3.9), and fp32 products of bf16/fp16 values are exact, as on tensor cores."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PREC)


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
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, UV_NATURAL: tl.constexpr = True, DC: tl.constexpr = 32,
    LOWP_ROPE: tl.constexpr = False,
):
    """The shared context's part of every work item's attention, for one KV head and one split of the context.

    Scores are computed transposed, ``[BLOCK_T, BLOCK_M]`` (context tokens x query vectors), so the K tile rebuilt in
    registers is the *left* MMA operand and never goes through shared memory (the untransposed version of this
    kernel was 2.2x slower, eval/KERNEL_NOTES.md)."""
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
    acc_uvT = tl.zeros([RVB, BLOCK_M], tl.float32)
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
                c_ptr = COS + t[:, None] * s_ct + dd[None, :]
                s_ptr = SIN + t[:, None] * s_st + dd[None, :]
                c_lo = tl.load(c_ptr, mask=cmask, other=0.0)
                s_lo = tl.load(s_ptr, mask=cmask, other=0.0)
                if ROPE_HALF:
                    c_hi = c_lo
                    s_hi = s_lo
                else:
                    c_hi = tl.load(c_ptr + HALF, mask=cmask, other=0.0)
                    s_hi = tl.load(s_ptr + HALF, mask=cmask, other=0.0)
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
                    x_lo = _dot(u, tl.load(bkT_ptr, mask=bkT_mask, other=0.0), DOT_PREC, UPCAST)  # [BLOCK_T, DC]
                    x_hi = _dot(u, tl.load(bkT_ptr + HALF * s_bko, mask=bkT_mask, other=0.0), DOT_PREC, UPCAST)
                    if LOWP_ROPE and UPCAST:  # the interpreter's bf16 arithmetic is wrong: the same roundings in fp32
                        xl = x_lo.to(dtype).to(tl.float32)
                        xh = x_hi.to(dtype).to(tl.float32)
                        cl = c_lo.to(dtype).to(tl.float32)
                        sl = s_lo.to(dtype).to(tl.float32)
                        ch = c_hi.to(dtype).to(tl.float32)
                        sh = s_hi.to(dtype).to(tl.float32)
                        rl = ((xl * cl).to(dtype).to(tl.float32) - (xh * sl).to(dtype).to(tl.float32)).to(dtype)
                        rh = ((xh * ch).to(dtype).to(tl.float32) + (xl * sh).to(dtype).to(tl.float32)).to(dtype)
                        k_lo = (kb_lo.to(tl.float32) + rl.to(tl.float32)).to(dtype)
                        k_hi = (kb_hi.to(tl.float32) + rh.to(tl.float32)).to(dtype)
                    elif LOWP_ROPE:  # the rotation in the cache dtype (packed bf16/fp16 FMAs, half the registers)
                        xl = x_lo.to(dtype)
                        xh = x_hi.to(dtype)
                        k_lo = kb_lo + (xl * c_lo.to(dtype) - xh * s_lo.to(dtype))
                        k_hi = kb_hi + (xh * c_hi.to(dtype) + xl * s_hi.to(dtype))
                    else:
                        k_lo = (kb_lo.to(tl.float32) + x_lo * c_lo.to(tl.float32) - x_hi * s_lo.to(tl.float32)).to(dtype)
                        k_hi = (kb_hi.to(tl.float32) + x_hi * c_hi.to(tl.float32) + x_lo * s_hi.to(tl.float32)).to(dtype)
                    part = _dot(k_lo, qc_lo, DOT_PREC, UPCAST) + _dot(k_hi, qc_hi, DOT_PREC, UPCAST)
                    if A_MAX == 1:
                        sT += part
                    else:
                        sT += tl.where(ag[None, :] == j, part, 0.0)
        else:
            kb_ptr = KB + hkv * s_kbh + t[:, None] * s_kbt + d[None, :]
            kb_lo = tl.load(kb_ptr, mask=kmask, other=0.0)
            kb_hi = tl.load(kb_ptr + HALF, mask=kmask, other=0.0)
            sT = _dot(kb_lo, qT_lo, DOT_PREC, UPCAST)
            sT += _dot(kb_hi, qT_hi, DOT_PREC, UPCAST)
        sT = sT * qk_scale
        allowed = valid[None, :] & tm[:, None]
        if HAS_MASK:
            mk = tl.load(MASK + row[None, :] * s_mb + qi[None, :] * s_mq + t[:, None] * s_mt, mask=allowed, other=0)
            allowed = allowed & (mk != 0)
        sT = tl.where(allowed, sT, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sT, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        pT = tl.exp2(sT - m_safe[None, :])
        l_i = l_i * alpha + tl.sum(pT, 0)
        pTd = pT.to(dtype)
        vT_ptr = VB + hkv * s_vbh + t[None, :] * s_vbt + d[:, None]
        vTmask = tm[None, :] & dm[:, None]
        vT_lo = tl.load(vT_ptr, mask=vTmask, other=0.0)
        vT_hi = tl.load(vT_ptr + HALF, mask=vTmask, other=0.0)
        accT_lo = accT_lo * alpha[None, :] + _dot(vT_lo, pTd, DOT_PREC, UPCAST)
        accT_hi = accT_hi * alpha[None, :] + _dot(vT_hi, pTd, DOT_PREC, UPCAST)
        if HAS_V_RES:
            if UV_NATURAL:  # P·u_v as [queries, r]: u_v tiles load contiguously, P is transposed once
                pd = tl.trans(pTd)
                acc_uv = acc_uv * alpha[:, None]
                for j in tl.static_range(A_MAX):
                    vslot = tl.load(AGENT_V + item * A_MAX + j)
                    vs = tl.maximum(vslot, 0)
                    lim = tl.where(vslot >= 0, RV, 0)
                    uvt = tl.load(UV + vs * s_uvn + t[:, None] * s_uvt + rv[None, :],
                                  mask=tm[:, None] & (rv[None, :] < lim), other=0.0)
                    acc_uv += tl.where(ag[:, None] == j, _dot(pd, uvt, DOT_PREC, UPCAST), 0.0)
            else:
                acc_uvT = acc_uvT * alpha[None, :]
                for j in tl.static_range(A_MAX):
                    vslot = tl.load(AGENT_V + item * A_MAX + j)
                    vs = tl.maximum(vslot, 0)
                    lim = tl.where(vslot >= 0, RV, 0)
                    uvT = tl.load(UV + vs * s_uvn + t[None, :] * s_uvt + rv[:, None],
                                  mask=tm[None, :] & (rv[:, None] < lim), other=0.0)
                    acc_uvT += tl.where(ag[None, :] == j, _dot(uvT, pTd, DOT_PREC, UPCAST), 0.0)
        m_i = m_new

    w = ((row * H + head) * NQ + qi) * n_splits + split
    tl.store(M_WS + w, m_i, mask=valid)
    tl.store(L_WS + w, l_i, mask=valid)
    a_ptr = ACC_WS + w[None, :] * (2 * HALF_B) + d[:, None]
    tl.store(a_ptr, accT_lo, mask=valid[None, :])
    tl.store(a_ptr + HALF_B, accT_hi, mask=valid[None, :])
    if HAS_V_RES:
        if UV_NATURAL:
            tl.store(UV_WS + w[:, None] * RVB + rv[None, :], acc_uv, mask=valid[:, None])
        else:
            tl.store(UV_WS + w[None, :] * RVB + rv[:, None], acc_uvT, mask=valid[None, :])


@triton.jit
def _private_merge_kernel(
    Q, s_qb, s_qh, s_qq,
    KP, s_kpb, s_kph, s_kpt,
    VP, s_vpb, s_vph, s_vpt,
    BV, s_bvn, s_bvo,
    ROW_VSLOT,
    MASK, s_mb, s_mq, s_mt,
    M_WS, L_WS, ACC_WS, UV_WS,
    OUT, s_ob, s_oq, s_oh,
    T, P, NQ, H, RV, n_splits, qk_scale,
    G: tl.constexpr, HALF: tl.constexpr, HALF_B: tl.constexpr, RVB: tl.constexpr,
    QPB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_V_RES: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    row = tl.program_id(0)
    hkv = tl.program_id(1)
    qb = tl.program_id(2)
    v = tl.arange(0, BLOCK_M)
    g = v % G
    ql = v // G
    qi = qb * QPB + ql
    valid = (ql < QPB) & (qi < NQ)
    head = hkv * G + g
    d = tl.arange(0, HALF_B)
    dm = d < HALF
    qmask = valid[:, None] & dm[None, :]
    q_ptr = Q + row * s_qb + head[:, None] * s_qh + qi[:, None] * s_qq + d[None, :]
    q_lo = tl.load(q_ptr, mask=qmask, other=0.0)
    q_hi = tl.load(q_ptr + HALF, mask=qmask, other=0.0)
    dtype = q_lo.dtype

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc_lo = tl.zeros([BLOCK_M, HALF_B], tl.float32)
    acc_hi = tl.zeros([BLOCK_M, HALF_B], tl.float32)
    for t0 in range(0, P, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tm = t < P
        kmask = tm[:, None] & dm[None, :]
        k_ptr = KP + row * s_kpb + hkv * s_kph + t[:, None] * s_kpt + d[None, :]
        k_lo = tl.load(k_ptr, mask=kmask, other=0.0)
        k_hi = tl.load(k_ptr + HALF, mask=kmask, other=0.0)
        s = _dot(q_lo, tl.trans(k_lo), DOT_PREC, UPCAST)
        s += _dot(q_hi, tl.trans(k_hi), DOT_PREC, UPCAST)
        s = s * qk_scale
        allowed = valid[:, None] & tm[None, :]
        if HAS_MASK:
            mk = tl.load(MASK + row * s_mb + qi[:, None] * s_mq + (T + t[None, :]) * s_mt, mask=allowed, other=0)
            allowed = allowed & (mk != 0)
        else:  # causal, bottom-right aligned: query qi is private token P - NQ + qi
            allowed = allowed & (t[None, :] <= (P - NQ + qi)[:, None])
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        pd = p.to(dtype)
        v_ptr = VP + row * s_vpb + hkv * s_vph + t[:, None] * s_vpt + d[None, :]
        v_lo = tl.load(v_ptr, mask=kmask, other=0.0)
        v_hi = tl.load(v_ptr + HALF, mask=kmask, other=0.0)
        acc_lo = acc_lo * alpha[:, None] + _dot(pd, v_lo, DOT_PREC, UPCAST)
        acc_hi = acc_hi * alpha[:, None] + _dot(pd, v_hi, DOT_PREC, UPCAST)
        m_i = m_new

    # log-sum-exp merge with the shared context's split partials
    rv = tl.arange(0, RVB)
    acc_uv = tl.zeros([BLOCK_M, RVB], tl.float32)
    wbase = ((row * H + head) * NQ + qi) * n_splits
    for sp in range(0, n_splits):
        w = wbase + sp
        m_s = tl.load(M_WS + w, mask=valid, other=float("-inf"))
        l_s = tl.load(L_WS + w, mask=valid, other=0.0)
        m_new = tl.maximum(m_i, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        a = tl.exp2(m_i - m_safe)
        b = tl.exp2(m_s - m_safe)
        a_ptr = ACC_WS + w[:, None] * (2 * HALF_B) + d[None, :]
        acc_lo = acc_lo * a[:, None] + tl.load(a_ptr, mask=valid[:, None], other=0.0) * b[:, None]
        acc_hi = acc_hi * a[:, None] + tl.load(a_ptr + HALF_B, mask=valid[:, None], other=0.0) * b[:, None]
        if HAS_V_RES:
            uv_s = tl.load(UV_WS + w[:, None] * RVB + rv[None, :], mask=valid[:, None], other=0.0)
            acc_uv = acc_uv * a[:, None] + uv_s * b[:, None]
        l_i = l_i * a + l_s * b
        m_i = m_new

    inv_l = 1.0 / tl.where(l_i == 0.0, 1.0, l_i)
    out_lo = acc_lo * inv_l[:, None]
    out_hi = acc_hi * inv_l[:, None]
    if HAS_V_RES:
        vslot = tl.load(ROW_VSLOT + row)
        if vslot >= 0:
            # P·V_row = P·V_base + (P·u_v) B_vᵀ: the V residual applied once, after the softmax
            bv_ptr = BV + vslot * s_bvn + (hkv * 2 * HALF + d[:, None]) * s_bvo + rv[None, :]
            bv_mask = dm[:, None] & (rv[None, :] < RV)
            bv_lo = tl.load(bv_ptr, mask=bv_mask, other=0.0).to(tl.float32)
            bv_hi = tl.load(bv_ptr + HALF * s_bvo, mask=bv_mask, other=0.0).to(tl.float32)
            puv = acc_uv * inv_l[:, None]
            out_lo += _dot(puv, tl.trans(bv_lo), "ieee", UPCAST)
            out_hi += _dot(puv, tl.trans(bv_hi), "ieee", UPCAST)
    o_ptr = OUT + row * s_ob + qi[:, None] * s_oq + head[:, None] * s_oh + d[None, :]
    tl.store(o_ptr, out_lo.to(OUT.dtype.element_ty), mask=qmask)
    tl.store(o_ptr + HALF, out_hi.to(OUT.dtype.element_ty), mask=qmask)


# ---------------------------------------------------------------------------------------------------------------------
# launcher
LOG2E = 1.4426950408889634


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, _next_pow2(max(int(n), 1)))


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


@functools.lru_cache(maxsize=8)
def _num_sms(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).multi_processor_count
    return 4


def _kv_mask(attention_mask, B, NQ, T, P):
    from forkkv_hf.reference import kv_mask

    mask, additive = kv_mask(attention_mask, B, NQ, T, P, None)
    if mask is None:
        return None
    if additive:  # an additive float mask: only 0 / -inf-like entries can be expressed as a bool mask
        finite = mask > torch.finfo(mask.dtype).min / 2
        if not bool(((mask == 0) | ~finite).all()):
            raise ValueError("the Triton ResidualAttention takes boolean (or 0/-inf) masks, not additive biases")
        mask = finite
    return mask.view(torch.int8) if mask.dtype == torch.bool else mask.to(torch.int8)


_WORKSPACES: dict = {}
#: the compiled kernels of the last launch (registers, spills and shared memory are read from them by the tuning scripts)
LAST_LAUNCH: dict = {}


def _workspace(name: str, numel: int, device) -> torch.Tensor:
    """A reusable fp32 scratch buffer (the kernels of one stream run one after another, so layers can share it)."""
    key = (name, str(device))
    buf = _WORKSPACES.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, 1), dtype=torch.float32, device=device)
        _WORKSPACES[key] = buf
    return buf[:numel]


def _rope_half(shared) -> bool:
    """Whether the layer's cos/sin tables repeat their first half (then the kernel loads one half). Memoised."""
    flag = getattr(shared, "_rope_half", None)
    if flag is None:
        h = shared.cos.shape[-1] // 2
        flag = bool(torch.equal(shared.cos[:, :h], shared.cos[:, h:]) and torch.equal(shared.sin[:, :h], shared.sin[:, h:]))
        shared._rope_half = flag
    return flag


def residual_attention_triton(query: torch.Tensor, view, attention_mask, scaling: float, **tuning) -> torch.Tensor:
    """``query [B, H, Q, D]`` (after RoPE) over a ``ForkKVView``; returns ``[B, Q, H, D]`` in the query's dtype.
    Launches on the query's GPU (with a device map, layers live on several GPUs). ``tuning``: see
    :func:`_residual_attention_triton`."""
    with _on_device(query.device):
        return _residual_attention_triton(query, view, attention_mask, scaling, **tuning)


@dataclass(frozen=True)
class WorkPlan:
    """How the shared-part kernel packs (row, query) slots into work items (see :func:`_plan`), as device tensors:
    per item and slot ``slot_row`` (-1: empty), ``slot_q``, ``slot_agent``; per item and agent ``agent_k``/``agent_v``
    (residual slots, -1: none); per row ``row_vslot`` (its V residual slot). ``block_m``: query vectors per item;
    ``a_max``: the most agents an item holds. Built on the host from the rows' slots (memoised, so the same rows give
    the same tensors), then read by every launch for those rows, eager or captured in a graph."""

    block_m: int
    a_max: int
    slot_row: torch.Tensor
    slot_q: torch.Tensor
    slot_agent: torch.Tensor
    agent_k: torch.Tensor
    agent_v: torch.Tensor
    row_vslot: torch.Tensor


def plan_work(k_slots: tuple, v_slots: tuple, nq: int, groups: int, device, block_m: int | None = None,
              agents_per_item: int | None = 4) -> WorkPlan:
    """The work items for rows whose K/V residual slots are ``k_slots``/``v_slots`` (host tuples, -1: none; all -1
    when the layer has no residual of that kind), ``nq`` queries per row and ``groups`` query heads per KV head."""
    BLOCK_M = max(block_m or (16 if nq == 1 else 64), _pow2(groups))
    SLOTS = BLOCK_M // groups
    apm = min(SLOTS, agents_per_item or 8)
    tensors, a_max = _plan_tensors(tuple(k_slots), tuple(v_slots), nq, SLOTS, apm, str(device))
    return WorkPlan(BLOCK_M, a_max, *tensors, _row_slots(tuple(v_slots), str(device)))


def _residual_attention_triton(query: torch.Tensor, view, attention_mask, scaling: float,
                               block_t: int | None = None, n_splits: int | None = None, block_m: int | None = None,
                               agents_per_item: int | None = 4, num_warps: int = 4,
                               num_stages: int = 2, programs_per_sm: int = 8,
                               uv_natural: bool = True, d_chunk: int | None = None,
                               lowp_rope: bool | None = None) -> torch.Tensor:
    """``query [B, H, Q, D]`` (after RoPE) over a ``ForkKVView``; returns ``[B, Q, H, D]`` in the query's dtype.

    Tuning knobs (defaults are what the benchmarks chose): ``block_t`` context tokens per tile, ``n_splits`` splits of
    the shared context, ``block_m`` query vectors per work item, ``agents_per_item`` the most agents packed in one
    item (they share each base tile), ``num_warps``/``num_stages`` for the shared-part kernel, ``programs_per_sm``
    how many programs the split of the context aims at per SM, ``uv_natural`` the layout of the V-residual
    accumulation, ``d_chunk`` the head-dim chunk of the K-residual rebuild (default 64 with ``lowp_rope``, else 32),
    ``lowp_rope`` the K residual's rotation and its add to the base tile in the cache dtype (bf16/fp16 FMAs) instead of
    fp32 (default: on for bf16/fp16 on the GPU, 587 vs 658 µs at 32K/32 agents on an H200; env ``FORKKV_LOWP_ROPE``
    = 0/1 overrides; within the tests' pass rule, eval/KERNEL_NOTES.md v6).
    """
    B, H, NQ, D = query.shape
    sh = view.shared
    _, Hkv, T, _ = sh.key.shape
    if H % Hkv:
        raise ValueError(f"{H} query heads are not a multiple of {Hkv} KV heads")
    k_res = sh.k_res if view.k_rows is not None else None
    v_res = sh.v_res if view.v_rows is not None else None
    k_slots = tuple(view.k_slots) if k_res is not None else (-1,) * B
    v_slots = tuple(view.v_slots) if v_res is not None else (-1,) * B
    has_k = k_res is not None and any(s >= 0 for s in k_slots)
    has_v = v_res is not None and any(s >= 0 for s in v_slots)
    if not has_k:
        k_slots = (-1,) * B
    if not has_v:
        v_slots = (-1,) * B
    plan = plan_work(k_slots, v_slots, NQ, H // Hkv, query.device, block_m=block_m, agents_per_item=agents_per_item)
    return _launch(
        query, sh.key[0], sh.value[0], sh.cos, sh.sin,
        k_res.u if has_k else None, k_res.B if has_k else None, v_res.u if has_v else None, v_res.B if has_v else None,
        view.key, view.value, _kv_mask(attention_mask, B, NQ, T, view.private_len), plan, scaling,
        rope_half=has_k and _rope_half(sh), block_t=block_t, n_splits=n_splits, num_warps=num_warps,
        num_stages=num_stages, programs_per_sm=programs_per_sm, uv_natural=uv_natural, d_chunk=d_chunk,
        lowp_rope=lowp_rope, workspace=_workspace,
    )


def launch_residual_attention(q, key, value, cos, sin, u_k, b_k, u_v, b_v, kp, vp, mask, plan: WorkPlan,
                              scaling: float, *, rope_half: bool, **tuning) -> torch.Tensor:
    """The two kernels over pre-planned work (no host-side reads of tensor values, so it can be captured in a CUDA
    graph). ``q [B, H, NQ, D]``; ``key``/``value`` ``[H_kv, T, D]`` (the shared base); ``cos``/``sin`` ``[T, D]``;
    ``u_k [n, T, r_k]``, ``b_k [n, H_kv·D, r_k]`` (``None``: no K residual), ``u_v``/``b_v`` likewise;
    ``kp``/``vp`` ``[B, H_kv, P, D]`` (private); ``mask`` int8 ``[B, NQ, T + P]`` (1 = attend) or ``None`` (causal
    in the private part); ``rope_half``: cos/sin repeat their first half. Fresh scratch buffers per call. Returns
    ``[B, NQ, H, D]``."""
    with _on_device(q.device):
        return _launch(q, key, value, cos, sin, u_k, b_k, u_v, b_v, kp, vp, mask, plan, scaling,
                       rope_half=rope_half, **tuning)


def _fresh_workspace(name: str, numel: int, device) -> torch.Tensor:
    return torch.empty(max(numel, 1), dtype=torch.float32, device=device)


def _launch(q, key, value, cos, sin, u_k, b_k, u_v, b_v, kp, vp, mask, plan: WorkPlan, scaling: float, *,
            rope_half: bool, block_t: int | None = None, n_splits: int | None = None, num_warps: int = 4,
            num_stages: int = 2, programs_per_sm: int = 8, uv_natural: bool = True, d_chunk: int | None = None,
            lowp_rope: bool | None = None, workspace=_fresh_workspace) -> torch.Tensor:
    B, H, NQ, D = q.shape
    Hkv, T, _ = key.shape
    P = kp.shape[-2]
    if D % 2:
        raise ValueError(f"head_dim {D} is odd; rotate-half RoPE needs an even head_dim")
    G = H // Hkv
    HALF = D // 2
    dev = q.device
    dtype = q.dtype
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        key, value = key.contiguous(), value.contiguous()
    q = q if q.stride(-1) == 1 else q.contiguous()
    kp = kp if kp.stride(-1) == 1 else kp.contiguous()
    vp = vp if vp.stride(-1) == 1 else vp.contiguous()
    if key.dtype != dtype or kp.dtype != dtype:
        raise TypeError(f"query is {dtype} but the cache holds {key.dtype}/{kp.dtype}")
    has_k, has_v = u_k is not None, u_v is not None
    RK = u_k.shape[-1] if has_k else 1
    RV = u_v.shape[-1] if has_v else 1
    RKB, RVB = _pow2(RK), _pow2(RV)
    HALF_B = _pow2(HALF)
    prec = "ieee" if dtype == torch.float32 else "tf32"

    interp = not q.is_cuda
    if dtype == torch.float32 and not interp:  # fp32 tiles take twice the shared memory
        block_t, num_stages = block_t or 32, 1
    BLOCK_T = block_t or (32 if interp else 64)
    BLOCK_M = plan.block_m
    SLOTS = BLOCK_M // G
    n_items = plan.slot_row.numel() // SLOTS

    if n_splits is None:
        target = programs_per_sm * _num_sms(str(dev))
        n_splits = max(1, min(_cdiv(T, BLOCK_T), _cdiv(target, n_items * Hkv)))
    split_len = _cdiv(_cdiv(T, n_splits), BLOCK_T) * BLOCK_T
    n_splits = _cdiv(T, split_len)

    has_mask = mask is not None
    mk = mask if has_mask else q  # dummy pointer
    ms = mask.stride() if has_mask else (0, 0, 0)

    n_vec = B * H * NQ * n_splits
    m_ws = workspace("m", n_vec, dev)
    l_ws = workspace("l", n_vec, dev)
    acc_ws = workspace("acc", n_vec * 2 * HALF_B, dev)
    uv_ws = workspace("uv", n_vec * RVB if has_v else 1, dev)

    uk = u_k if has_k else q
    bk = b_k if has_k else q
    uv = u_v if has_v else q
    bv = b_v if has_v else q
    uk_s = (uk.stride(0), uk.stride(1)) if has_k else (0, 0)
    bk_s = (bk.stride(0), bk.stride(1)) if has_k else (0, 0)
    uv_s = (uv.stride(0), uv.stride(1)) if has_v else (0, 0)
    bv_s = (bv.stride(0), bv.stride(1)) if has_v else (0, 0)
    for t, name in ((uk, "u_k"), (bk, "B_k"), (uv, "u_v"), (bv, "B_v")):
        if t is not q and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    qk_scale = float(scaling) * LOG2E
    if lowp_rope is None:
        env = os.environ.get("FORKKV_LOWP_ROPE")
        lowp_rope = bool(int(env)) if env is not None else (not interp and dtype in (torch.bfloat16, torch.float16))
    lowp = bool(lowp_rope) and dtype != torch.float32

    LAST_LAUNCH["shared"] = _shared_part_kernel[(n_items, Hkv, n_splits)](
        q, q.stride(0), q.stride(1), q.stride(2),
        key, key.stride(0), key.stride(1),
        value, value.stride(0), value.stride(1),
        cos, sin, cos.stride(0), sin.stride(0),
        uk, *uk_s, bk, *bk_s,
        uv, *uv_s,
        mk, *ms,
        plan.slot_row, plan.slot_q, plan.slot_agent, plan.agent_k, plan.agent_v,
        m_ws, l_ws, acc_ws, uv_ws,
        T, NQ, H, RK, RV, split_len, n_splits, qk_scale,
        G=G, HALF=HALF, HALF_B=HALF_B, RKB=RKB, RVB=RVB, SLOTS=SLOTS, A_MAX=plan.a_max, BLOCK_M=BLOCK_M,
        BLOCK_T=BLOCK_T, HAS_K_RES=has_k, HAS_V_RES=has_v, HAS_MASK=has_mask, ROPE_HALF=has_k and rope_half,
        DOT_PREC=prec, UPCAST=interp, UV_NATURAL=uv_natural, DC=min(HALF_B, max(16, d_chunk or (64 if lowp else 32))),
        LOWP_ROPE=lowp,
        num_warps=num_warps, num_stages=num_stages,
    )

    out = torch.empty(B, NQ, H, D, device=dev, dtype=dtype)
    BLOCK_M2 = _pow2(G * min(NQ, max(1, 64 // G)))
    qpb2 = max(1, BLOCK_M2 // G)
    LAST_LAUNCH["merge"] = _private_merge_kernel[(B, Hkv, _cdiv(NQ, qpb2))](
        q, q.stride(0), q.stride(1), q.stride(2),
        kp, kp.stride(0), kp.stride(1), kp.stride(2),
        vp, vp.stride(0), vp.stride(1), vp.stride(2),
        bv, *bv_s,
        plan.row_vslot,
        mk, *ms,
        m_ws, l_ws, acc_ws, uv_ws,
        out, out.stride(0), out.stride(1), out.stride(2),
        T, P, NQ, H, RV, n_splits, qk_scale,
        G=G, HALF=HALF, HALF_B=HALF_B, RVB=RVB, QPB=qpb2, BLOCK_M=BLOCK_M2, BLOCK_T=BLOCK_T,
        HAS_V_RES=has_v, HAS_MASK=has_mask, DOT_PREC=prec, UPCAST=interp,
        num_warps=4, num_stages=2,
    )
    return out


def _on_device(dev: torch.device):
    """Launch on the tensors' GPU: with a device map, layers live on several GPUs while the current device stays
    the first one (Triton launches on the current device)."""
    import contextlib

    if dev.type == "cuda" and dev.index is not None and dev.index != torch.cuda.current_device():
        return torch.cuda.device(dev)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=64)
def _row_slots(v_slots: tuple, device: str) -> torch.Tensor:
    return torch.tensor(v_slots, dtype=torch.int32, device=device)
