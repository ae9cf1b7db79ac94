"""Triton ResidualAttention: attention over a shared base K/V, per-agent low-rank residuals and per-row private K/V.

Reproduces :func:`forkkv_hf.reference.reference_attention` (the fp32, materialising ground truth) without building
any row's K/V of the shared context:

- ``_shared_part_kernel`` (grid: work item x KV head x split of the shared context, flash-decoding style). A work
  item is a group of query vectors (rows x queries x the G query heads of one KV head) whose rows share one agent.
  Per tile of ``BLOCK_T`` context tokens it loads the base K/V tile, rebuilds the agent's K residual in registers
  (``u[BLOCK_T, r] @ B_k[r, D]``, two halves so that rotate-half RoPE with that token's cos/sin is a few FMAs), adds
  it to the base tile, and runs one online-softmax step for all the item's vectors; it accumulates ``P·V_base`` and
  the rank-r ``P·u_v`` (the V residual is never expanded). Items of different agents read the same base tiles at
  about the same time (item is the fastest grid axis), so the base is fetched from HBM about once and served from L2
  to the others. Writes unnormalised partials (m, l, acc, acc_uv) per split.
- ``_private_merge_kernel`` (grid: row x KV head x query block). Attends to the row's private K/V (causal, or the
  given mask), merges it with the shared partials by log-sum-exp, applies ``B_v`` to the merged ``P·u_v`` once, and
  writes the output ``[B, Q, H, D]``.

Decode (one query per row) and extend (a block of queries per row) are the same two kernels with different blocks.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl


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
    PERM, ITEM_START, ITEM_ROWS, ITEM_Q0, ITEM_NQ, ITEM_KSLOT, ITEM_VSLOT,
    M_WS, L_WS, ACC_WS, UV_WS,
    T, NQ, H, RK, RV, split_len, n_splits, qk_scale,
    G: tl.constexpr, HALF: tl.constexpr, HALF_B: tl.constexpr, RKB: tl.constexpr, RVB: tl.constexpr,
    QPB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_K_RES: tl.constexpr, HAS_V_RES: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    item = tl.program_id(0)
    hkv = tl.program_id(1)
    split = tl.program_id(2)
    start = tl.load(ITEM_START + item)
    nrows = tl.load(ITEM_ROWS + item)
    q0 = tl.load(ITEM_Q0 + item)
    nq = tl.load(ITEM_NQ + item)

    v = tl.arange(0, BLOCK_M)
    g = v % G
    ql = (v // G) % QPB
    rl = v // (G * QPB)
    valid = (rl < nrows) & (ql < nq)
    row = tl.load(PERM + start + rl, mask=valid, other=0)
    qi = q0 + ql
    head = hkv * G + g
    d = tl.arange(0, HALF_B)
    dm = d < HALF

    q_ptr = Q + row[:, None] * s_qb + head[:, None] * s_qh + qi[:, None] * s_qq + d[None, :]
    qmask = valid[:, None] & dm[None, :]
    q_lo = tl.load(q_ptr, mask=qmask, other=0.0)
    q_hi = tl.load(q_ptr + HALF, mask=qmask, other=0.0)
    dtype = q_lo.dtype

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc_lo = tl.zeros([BLOCK_M, HALF_B], tl.float32)
    acc_hi = tl.zeros([BLOCK_M, HALF_B], tl.float32)
    acc_uv = tl.zeros([BLOCK_M, RVB], tl.float32)

    kslot = tl.load(ITEM_KSLOT + item)
    vslot = tl.load(ITEM_VSLOT + item)
    rk = tl.arange(0, RKB)
    rv = tl.arange(0, RVB)
    ks = tl.maximum(kslot, 0)
    vs = tl.maximum(vslot, 0)
    # this agent's B_k rows for KV head hkv, both halves: [HALF_B, RKB] (zero when the item has no K residual)
    bk_ptr = BK + ks * s_bkn + (hkv * 2 * HALF + d[:, None]) * s_bko + rk[None, :]
    rk_lim = tl.where(kslot >= 0, RK, 0)
    bk_mask = dm[:, None] & (rk[None, :] < rk_lim)
    bk_lo = tl.load(bk_ptr, mask=bk_mask, other=0.0)
    bk_hi = tl.load(bk_ptr + HALF * s_bko, mask=bk_mask, other=0.0)

    t_begin = split * split_len
    t_end = tl.minimum(T, t_begin + split_len)
    for t0 in range(t_begin, t_end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tm = t < t_end
        kmask = tm[:, None] & dm[None, :]
        kb_ptr = KB + hkv * s_kbh + t[:, None] * s_kbt + d[None, :]
        k_lo = tl.load(kb_ptr, mask=kmask, other=0.0)
        k_hi = tl.load(kb_ptr + HALF, mask=kmask, other=0.0)
        if HAS_K_RES:
            if kslot >= 0:
                u = tl.load(UK + ks * s_ukn + t[:, None] * s_ukt + rk[None, :],
                            mask=tm[:, None] & (rk[None, :] < RK), other=0.0)
                x_lo = _dot(u, tl.trans(bk_lo), DOT_PREC, UPCAST)  # [BLOCK_T, HALF_B] fp32
                x_hi = _dot(u, tl.trans(bk_hi), DOT_PREC, UPCAST)
                c_ptr = COS + t[:, None] * s_ct + d[None, :]
                s_ptr = SIN + t[:, None] * s_st + d[None, :]
                c_lo = tl.load(c_ptr, mask=kmask, other=0.0).to(tl.float32)
                c_hi = tl.load(c_ptr + HALF, mask=kmask, other=0.0).to(tl.float32)
                s_lo = tl.load(s_ptr, mask=kmask, other=0.0).to(tl.float32)
                s_hi = tl.load(s_ptr + HALF, mask=kmask, other=0.0).to(tl.float32)
                # rotate-half RoPE of the residual at its own position, added to the (rotated) base key
                k_lo = (k_lo.to(tl.float32) + x_lo * c_lo - x_hi * s_lo).to(dtype)
                k_hi = (k_hi.to(tl.float32) + x_hi * c_hi + x_lo * s_hi).to(dtype)
        s = _dot(q_lo, tl.trans(k_lo), DOT_PREC, UPCAST)
        s += _dot(q_hi, tl.trans(k_hi), DOT_PREC, UPCAST)
        s = s * qk_scale
        allowed = valid[:, None] & tm[None, :]
        if HAS_MASK:
            mk = tl.load(MASK + row[:, None] * s_mb + qi[:, None] * s_mq + t[None, :] * s_mt,
                         mask=allowed, other=0)
            allowed = allowed & (mk != 0)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        pd = p.to(dtype)
        vb_ptr = VB + hkv * s_vbh + t[:, None] * s_vbt + d[None, :]
        v_lo = tl.load(vb_ptr, mask=kmask, other=0.0)
        v_hi = tl.load(vb_ptr + HALF, mask=kmask, other=0.0)
        acc_lo = acc_lo * alpha[:, None] + _dot(pd, v_lo, DOT_PREC, UPCAST)
        acc_hi = acc_hi * alpha[:, None] + _dot(pd, v_hi, DOT_PREC, UPCAST)
        if HAS_V_RES:
            if vslot >= 0:
                uvt = tl.load(UV + vs * s_uvn + t[:, None] * s_uvt + rv[None, :],
                              mask=tm[:, None] & (rv[None, :] < RV), other=0.0)
                acc_uv = acc_uv * alpha[:, None] + _dot(pd, uvt, DOT_PREC, UPCAST)
        m_i = m_new

    # partials of vector (row, head, qi) for this split
    w = ((row * H + head) * NQ + qi) * n_splits + split
    tl.store(M_WS + w, m_i, mask=valid)
    tl.store(L_WS + w, l_i, mask=valid)
    a_ptr = ACC_WS + w[:, None] * (2 * HALF_B) + d[None, :]
    tl.store(a_ptr, acc_lo, mask=valid[:, None])
    tl.store(a_ptr + HALF_B, acc_hi, mask=valid[:, None])
    if HAS_V_RES:
        tl.store(UV_WS + w[:, None] * RVB + rv[None, :], acc_uv, mask=valid[:, None])


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
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


@functools.lru_cache(maxsize=256)
def _plan(k_slots: tuple, v_slots: tuple, rows_per_item: int, nq: int, qpb: int):
    """Work items: rows grouped by their (K slot, V slot) agent pair, ``rows_per_item`` rows and ``qpb`` queries
    each. Returns host lists ``(perm, start, rows, q0, nq, kslot, vslot)``."""
    groups: dict = {}
    for r, key in enumerate(zip(k_slots, v_slots)):
        groups.setdefault(key, []).append(r)
    perm, start, nrows, q0s, nqs, ks, vs = [], [], [], [], [], [], []
    for (k, v), rows in groups.items():
        for i in range(0, len(rows), rows_per_item):
            chunk = rows[i : i + rows_per_item]
            off = len(perm)
            perm.extend(chunk)
            for q0 in range(0, nq, qpb):
                start.append(off)
                nrows.append(len(chunk))
                q0s.append(q0)
                nqs.append(min(qpb, nq - q0))
                ks.append(k)
                vs.append(v)
    return perm, start, nrows, q0s, nqs, ks, vs


@functools.lru_cache(maxsize=64)
def _plan_tensors(k_slots: tuple, v_slots: tuple, rows_per_item: int, nq: int, qpb: int, device: str):
    lists = _plan(k_slots, v_slots, rows_per_item, nq, qpb)
    return tuple(torch.tensor(x, dtype=torch.int32, device=device) for x in lists)


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


def residual_attention_triton(query: torch.Tensor, view, attention_mask, scaling: float,
                              block_t: int | None = None, n_splits: int | None = None) -> torch.Tensor:
    """``query [B, H, Q, D]`` (after RoPE) over a ``ForkKVView``; returns ``[B, Q, H, D]`` in the query's dtype."""
    B, H, NQ, D = query.shape
    sh = view.shared
    _, Hkv, T, _ = sh.key.shape
    P = view.private_len
    if H % Hkv:
        raise ValueError(f"{H} query heads are not a multiple of {Hkv} KV heads")
    if D % 2:
        raise ValueError(f"head_dim {D} is odd; rotate-half RoPE needs an even head_dim")
    G = H // Hkv
    HALF = D // 2
    dev = query.device
    dtype = query.dtype
    key = sh.key[0]
    value = sh.value[0]
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        key, value = key.contiguous(), value.contiguous()
    q = query if query.stride(-1) == 1 else query.contiguous()
    kp = view.key if view.key.stride(-1) == 1 else view.key.contiguous()
    vp = view.value if view.value.stride(-1) == 1 else view.value.contiguous()
    if key.dtype != dtype or kp.dtype != dtype:
        raise TypeError(f"query is {dtype} but the cache holds {key.dtype}/{kp.dtype}")

    k_res = sh.k_res if view.k_rows is not None else None
    v_res = sh.v_res if view.v_rows is not None else None
    k_slots = tuple(view.k_slots) if k_res is not None else (-1,) * B
    v_slots = tuple(view.v_slots) if v_res is not None else (-1,) * B
    has_k = k_res is not None and any(s >= 0 for s in k_slots)
    has_v = v_res is not None and any(s >= 0 for s in v_slots)
    RK = k_res.rank if has_k else 1
    RV = v_res.rank if has_v else 1
    RKB, RVB = _pow2(RK), _pow2(RV)
    HALF_B = _pow2(HALF)
    prec = "ieee" if dtype == torch.float32 else "tf32"

    interp = not query.is_cuda
    BLOCK_T = block_t or (32 if interp else 64)
    BLOCK_M = 16 if NQ == 1 else 64
    qpb = max(1, min(NQ, BLOCK_M // G)) if G <= BLOCK_M else 1
    if G > BLOCK_M:
        BLOCK_M = _pow2(G)
        qpb = 1
    rows_per_item = max(1, BLOCK_M // (G * qpb))
    plan = _plan_tensors(k_slots, v_slots, rows_per_item, NQ, qpb, str(dev))
    perm, start, nrows, q0s, nqs, ks, vs = plan
    n_items = start.numel()

    if n_splits is None:
        target = 2 * _num_sms(str(dev))
        n_splits = max(1, min(triton.cdiv(T, BLOCK_T), triton.cdiv(target, n_items * Hkv)))
    split_len = triton.cdiv(triton.cdiv(T, n_splits), BLOCK_T) * BLOCK_T
    n_splits = triton.cdiv(T, split_len)

    mask = _kv_mask(attention_mask, B, NQ, T, P)
    has_mask = mask is not None
    mk = mask if has_mask else q  # dummy pointer
    ms = mask.stride() if has_mask else (0, 0, 0)

    n_vec = B * H * NQ * n_splits
    m_ws = torch.empty(n_vec, device=dev, dtype=torch.float32)
    l_ws = torch.empty(n_vec, device=dev, dtype=torch.float32)
    acc_ws = torch.empty(n_vec, 2 * HALF_B, device=dev, dtype=torch.float32)
    uv_ws = torch.empty(n_vec if has_v else 1, RVB, device=dev, dtype=torch.float32)

    uk = k_res.u if has_k else q
    bk = k_res.B if has_k else q
    uv = v_res.u if has_v else q
    bv = v_res.B if has_v else q
    uk_s = (uk.stride(0), uk.stride(1)) if has_k else (0, 0)
    bk_s = (bk.stride(0), bk.stride(1)) if has_k else (0, 0)
    uv_s = (uv.stride(0), uv.stride(1)) if has_v else (0, 0)
    bv_s = (bv.stride(0), bv.stride(1)) if has_v else (0, 0)
    for t, name in ((uk, "u_k"), (bk, "B_k"), (uv, "u_v"), (bv, "B_v")):
        if t is not q and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    qk_scale = float(scaling) * LOG2E
    cos, sin = sh.cos, sh.sin

    _shared_part_kernel[(n_items, Hkv, n_splits)](
        q, q.stride(0), q.stride(1), q.stride(2),
        key, key.stride(0), key.stride(1),
        value, value.stride(0), value.stride(1),
        cos, sin, cos.stride(0), sin.stride(0),
        uk, *uk_s, bk, *bk_s,
        uv, *uv_s,
        mk, *ms,
        perm, start, nrows, q0s, nqs, ks, vs,
        m_ws, l_ws, acc_ws, uv_ws,
        T, NQ, H, RK, RV, split_len, n_splits, qk_scale,
        G=G, HALF=HALF, HALF_B=HALF_B, RKB=RKB, RVB=RVB, QPB=qpb, BLOCK_M=BLOCK_M, BLOCK_T=BLOCK_T,
        HAS_K_RES=has_k, HAS_V_RES=has_v, HAS_MASK=has_mask, DOT_PREC=prec, UPCAST=interp,
        num_warps=4, num_stages=2,
    )

    out = torch.empty(B, NQ, H, D, device=dev, dtype=dtype)
    row_vslot = _row_slots(v_slots, str(dev)) if has_v else perm
    BLOCK_M2 = _pow2(G * min(NQ, max(1, 64 // G)))
    qpb2 = max(1, BLOCK_M2 // G)
    _private_merge_kernel[(B, Hkv, triton.cdiv(NQ, qpb2))](
        q, q.stride(0), q.stride(1), q.stride(2),
        kp, kp.stride(0), kp.stride(1), kp.stride(2),
        vp, vp.stride(0), vp.stride(1), vp.stride(2),
        bv, *bv_s,
        row_vslot,
        mk, *ms,
        m_ws, l_ws, acc_ws, uv_ws,
        out, out.stride(0), out.stride(1), out.stride(2),
        T, P, NQ, H, RV, n_splits, qk_scale,
        G=G, HALF=HALF, HALF_B=HALF_B, RVB=RVB, QPB=qpb2, BLOCK_M=BLOCK_M2, BLOCK_T=BLOCK_T,
        HAS_V_RES=has_v, HAS_MASK=has_mask, DOT_PREC=prec, UPCAST=interp,
        num_warps=4, num_stages=2,
    )
    return out


@functools.lru_cache(maxsize=64)
def _row_slots(v_slots: tuple, device: str) -> torch.Tensor:
    return torch.tensor(v_slots, dtype=torch.int32, device=device)
