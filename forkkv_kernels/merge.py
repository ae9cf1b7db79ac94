"""The cascade's last kernel: each row's private part and the log-sum-exp merge with the shared context's partials.

``_private_merge_kernel`` (grid: row x KV head x query block) attends to each row's private K/V (causal, or the given
mask), merges that with the shared context's per-split partials (m, l, acc, acc_uv) by log-sum-exp, applies ``B_v`` to
the merged ``P·u_v`` once, and writes the output ``[B, Q, H, D]``. The partials' layout (index
``((row·H + head)·NQ + q)·n_splits + split``; ``acc`` as lo half at ``[0, HALF)`` and hi half at
``[HALF_B, HALF_B + HALF)`` of a ``2·HALF_B`` row; ``acc_uv`` ``RVB`` wide) is the contract with the shared-part kernels
(:mod:`.cascade`, :mod:`.shared_gluon`, :mod:`.shared_gluon_pair`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_common import cdiv, gdc_wait, launch, mma, pow2, softmax_step


@triton.jit
def _merge_split(M_WS, L_WS, ACC_WS, UV_WS, w, valid, m_i, l_i, acc_lo, acc_hi, acc_uv, HALF_B: tl.constexpr,
                 RVB: tl.constexpr, HAS_V_RES: tl.constexpr):
    """Merge one split's partials (entries ``w``, one per query vector) into the running (m, l, acc, acc_uv)."""
    m_s = tl.load(M_WS + w, mask=valid, other=float("-inf"))
    l_s = tl.load(L_WS + w, mask=valid, other=0.0)
    m_new = tl.maximum(m_i, m_s)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    a = tl.exp2(m_i - m_safe)
    b = tl.exp2(m_s - m_safe)
    a_ptr = ACC_WS + w[:, None] * (2 * HALF_B) + tl.arange(0, HALF_B)[None, :]
    acc_lo = acc_lo * a[:, None] + tl.load(a_ptr, mask=valid[:, None], other=0.0) * b[:, None]
    acc_hi = acc_hi * a[:, None] + tl.load(a_ptr + HALF_B, mask=valid[:, None], other=0.0) * b[:, None]
    if HAS_V_RES:
        uv_s = tl.load(UV_WS + w[:, None] * RVB + tl.arange(0, RVB)[None, :], mask=valid[:, None], other=0.0)
        acc_uv = acc_uv * a[:, None] + uv_s * b[:, None]
    return m_new, l_i * a + l_s * b, acc_lo, acc_hi, acc_uv


@triton.jit
def _merge_chunk(M_WS, L_WS, ACC_WS, UV_WS, wbase, s0, n_splits, valid, m_i, l_i, acc_lo, acc_hi, acc_uv,
                 HALF_B: tl.constexpr, RVB: tl.constexpr, CHUNK: tl.constexpr, HAS_V_RES: tl.constexpr):
    """Merge the partials of splits ``s0 .. s0 + CHUNK`` (those below ``n_splits``; entries ``wbase + split``, one
    per query vector) into the running (m, l, acc, acc_uv): one max over the chunk, its loads all independent."""
    sp = s0 + tl.arange(0, CHUNK)
    ok = (sp < n_splits)[:, None] & valid[None, :]
    w = wbase[None, :] + sp[:, None]
    m_s = tl.load(M_WS + w, mask=ok, other=float("-inf"))
    l_s = tl.load(L_WS + w, mask=ok, other=0.0)
    m_new = tl.maximum(m_i, tl.max(m_s, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    a = tl.exp2(m_i - m_safe)
    b = tl.exp2(m_s - m_safe[None, :])
    a_ptr = ACC_WS + w[:, :, None] * (2 * HALF_B) + tl.arange(0, HALF_B)[None, None, :]
    b3 = b[:, :, None]
    acc_lo = acc_lo * a[:, None] + tl.sum(tl.load(a_ptr, mask=ok[:, :, None], other=0.0) * b3, 0)
    acc_hi = acc_hi * a[:, None] + tl.sum(tl.load(a_ptr + HALF_B, mask=ok[:, :, None], other=0.0) * b3, 0)
    if HAS_V_RES:
        uv_s = tl.load(UV_WS + w[:, :, None] * RVB + tl.arange(0, RVB)[None, None, :], mask=ok[:, :, None], other=0.0)
        acc_uv = acc_uv * a[:, None] + tl.sum(uv_s * b3, 0)
    return m_new, l_i * a + tl.sum(l_s * b, 0), acc_lo, acc_hi, acc_uv


@triton.jit
def _merge_splits(M_WS, L_WS, ACC_WS, UV_WS, wbase, n_splits, valid, m_i, l_i, acc_lo, acc_hi, acc_uv,
                  HALF_B: tl.constexpr, RVB: tl.constexpr, HAS_V_RES: tl.constexpr, MERGE_UNROLL: tl.constexpr,
                  MERGE_CHUNK: tl.constexpr):
    """Merge every split's partials (entries ``wbase + split``) into the running (m, l, acc, acc_uv)."""
    if MERGE_CHUNK > 1:  # MERGE_CHUNK splits per step, loaded together (no chain of dependent loads over the splits)
        for sp in tl.range(0, n_splits, MERGE_CHUNK, loop_unroll_factor=MERGE_UNROLL):
            m_i, l_i, acc_lo, acc_hi, acc_uv = _merge_chunk(M_WS, L_WS, ACC_WS, UV_WS, wbase, sp, n_splits, valid, m_i,
                                                            l_i, acc_lo, acc_hi, acc_uv, HALF_B, RVB, MERGE_CHUNK,
                                                            HAS_V_RES)
    elif MERGE_UNROLL > 1:  # the splits' loads are independent: unrolled, several are in flight at once
        for sp in tl.range(0, n_splits, loop_unroll_factor=MERGE_UNROLL):
            m_i, l_i, acc_lo, acc_hi, acc_uv = _merge_split(M_WS, L_WS, ACC_WS, UV_WS, wbase + sp, valid, m_i, l_i,
                                                            acc_lo, acc_hi, acc_uv, HALF_B, RVB, HAS_V_RES)
    else:
        for sp in range(0, n_splits):
            m_i, l_i, acc_lo, acc_hi, acc_uv = _merge_split(M_WS, L_WS, ACC_WS, UV_WS, wbase + sp, valid, m_i, l_i,
                                                            acc_lo, acc_hi, acc_uv, HALF_B, RVB, HAS_V_RES)
    return m_i, l_i, acc_lo, acc_hi, acc_uv


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
    MERGE_UNROLL: tl.constexpr, MERGE_CHUNK: tl.constexpr, MERGE_FIRST: tl.constexpr, PDL: tl.constexpr,
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
    acc_uv = tl.zeros([BLOCK_M, RVB], tl.float32)
    wbase = ((row * H + head) * NQ + qi) * n_splits
    if MERGE_FIRST:  # the splits' partials first: their loads are issued with the query's, not after the private part
        if PDL:  # launched before the shared kernel ended: its partials are complete and visible after the wait
            gdc_wait()
        m_i, l_i, acc_lo, acc_hi, acc_uv = _merge_splits(M_WS, L_WS, ACC_WS, UV_WS, wbase, n_splits, valid, m_i, l_i,
                                                         acc_lo, acc_hi, acc_uv, HALF_B, RVB, HAS_V_RES, MERGE_UNROLL,
                                                         MERGE_CHUNK)
    for t0 in range(0, P, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tm = t < P
        kmask = tm[:, None] & dm[None, :]
        k_ptr = KP + row * s_kpb + hkv * s_kph + t[:, None] * s_kpt + d[None, :]
        k_lo = tl.load(k_ptr, mask=kmask, other=0.0)
        k_hi = tl.load(k_ptr + HALF, mask=kmask, other=0.0)
        s = mma(q_lo, tl.trans(k_lo), DOT_PREC, UPCAST)
        s += mma(q_hi, tl.trans(k_hi), DOT_PREC, UPCAST)
        s = s * qk_scale
        allowed = valid[:, None] & tm[None, :]
        if HAS_MASK:
            mk = tl.load(MASK + row * s_mb + qi[:, None] * s_mq + (T + t[None, :]) * s_mt, mask=allowed, other=0)
            allowed = allowed & (mk != 0)
        else:  # causal, bottom-right aligned: query qi is private token P - NQ + qi
            allowed = allowed & (t[None, :] <= (P - NQ + qi)[:, None])
        p, alpha, m_new, l_i = softmax_step(tl.where(allowed, s, float("-inf")), m_i, l_i, 1)
        pd = p.to(dtype)
        v_ptr = VP + row * s_vpb + hkv * s_vph + t[:, None] * s_vpt + d[None, :]
        v_lo = tl.load(v_ptr, mask=kmask, other=0.0)
        v_hi = tl.load(v_ptr + HALF, mask=kmask, other=0.0)
        acc_lo = acc_lo * alpha[:, None] + mma(pd, v_lo, DOT_PREC, UPCAST)
        acc_hi = acc_hi * alpha[:, None] + mma(pd, v_hi, DOT_PREC, UPCAST)
        if MERGE_FIRST and HAS_V_RES:
            acc_uv = acc_uv * alpha[:, None]
        m_i = m_new

    if not MERGE_FIRST:  # log-sum-exp merge with the shared context's split partials
        if PDL:  # the private part ran while the shared kernel drained
            gdc_wait()
        m_i, l_i, acc_lo, acc_hi, acc_uv = _merge_splits(M_WS, L_WS, ACC_WS, UV_WS, wbase, n_splits, valid, m_i, l_i,
                                                         acc_lo, acc_hi, acc_uv, HALF_B, RVB, HAS_V_RES, MERGE_UNROLL,
                                                         MERGE_CHUNK)

    rv = tl.arange(0, RVB)
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
            out_lo += mma(puv, tl.trans(bv_lo), "ieee", UPCAST)
            out_hi += mma(puv, tl.trans(bv_hi), "ieee", UPCAST)
    o_ptr = OUT + row * s_ob + qi[:, None] * s_oq + head[:, None] * s_oh + d[None, :]
    tl.store(o_ptr, out_lo.to(OUT.dtype.element_ty), mask=qmask)
    tl.store(o_ptr + HALF, out_hi.to(OUT.dtype.element_ty), mask=qmask)


def launch_private_merge(q, k_priv, v_priv, v_B, row_vslot, mask, ws, n_splits: int, qk_scale: float, *, T: int,
                         RV: int, has_v: bool, block_t: int, prec: str, interp: bool, merge_warps: int = 4,
                         merge_stages: int = 2, merge_unroll: int = 1, merge_block_t: int | None = None,
                         merge_chunk: int = 1, merge_first: bool = False, pdl: bool = False):
    """Run ``_private_merge_kernel``: ``q [B, H, NQ, D]``, ``k_priv``/``v_priv [B, H_kv, P, D]`` (last dim contiguous),
    ``v_B [n, H_kv·D, r]`` and ``row_vslot [B]`` int32 (used when ``has_v``), ``mask [B, NQ, T + P]`` int8 or None,
    ``ws = (m, l, acc, acc_uv)`` the shared part's partials. Knobs: ``merge_warps``, ``merge_stages``,
    ``merge_unroll`` (how many steps of the merge loop one unrolled step holds), ``merge_chunk`` (how many splits'
    partials one step loads together and merges with one max: a power of two; 1, one split per step; a chunk wider
    than the splits runs as the split count rounded up to a power of two, the rest being masked lanes),
    ``merge_block_t`` private tokens per tile (default ``block_t``), ``merge_first``: merge the splits' partials
    before the private part instead of after it (same result; their loads then start with the program), ``pdl``: a
    programmatic dependent launch after the shared kernel (which must be the stream's previous kernel; the private part,
    or with ``merge_first`` nothing, runs before the wait for its partials). Returns the
    output ``[B, NQ, H, D]``; also the compiled kernel (resource reports)."""
    B, H, NQ, D = q.shape
    Hkv, P = k_priv.shape[1], k_priv.shape[2]
    G, HALF = H // Hkv, D // 2
    if merge_unroll < 1:
        raise ValueError(f"merge_unroll={merge_unroll}; give 1 (no unrolling) or more splits per unrolled step")
    if merge_chunk < 1 or merge_chunk & (merge_chunk - 1):
        raise ValueError(f"merge_chunk={merge_chunk}; give a power of two (1: one split's partials per merge step)")
    merge_chunk = min(merge_chunk, pow2(n_splits, 1))
    out = torch.empty(B, NQ, H, D, device=q.device, dtype=q.dtype)
    ms = mask.stride() if mask is not None else (0, 0, 0)
    bv_s = (v_B.stride(0), v_B.stride(1)) if has_v else (0, 0)
    BLOCK_M = pow2(G * min(NQ, max(1, 64 // G)))
    qpb = max(1, BLOCK_M // G)
    m_ws, l_ws, acc_ws, uv_ws = ws
    kernel = launch(
        _private_merge_kernel, (B, Hkv, cdiv(NQ, qpb)), q, q.stride(0), q.stride(1), q.stride(2),
        k_priv, k_priv.stride(0), k_priv.stride(1), k_priv.stride(2),
        v_priv, v_priv.stride(0), v_priv.stride(1), v_priv.stride(2),
        v_B if has_v else q, *bv_s,
        row_vslot if has_v else m_ws,
        mask if mask is not None else q, *ms,
        m_ws, l_ws, acc_ws, uv_ws,
        out, out.stride(0), out.stride(1), out.stride(2),
        T, P, NQ, H, RV, n_splits, qk_scale,
        G=G, HALF=HALF, HALF_B=pow2(HALF), RVB=pow2(RV), QPB=qpb, BLOCK_M=BLOCK_M, BLOCK_T=merge_block_t or block_t,
        HAS_V_RES=has_v, HAS_MASK=mask is not None, DOT_PREC=prec, UPCAST=interp, MERGE_UNROLL=merge_unroll,
        MERGE_CHUNK=merge_chunk, MERGE_FIRST=bool(merge_first), PDL=pdl, num_warps=merge_warps,
        num_stages=merge_stages, pdl=pdl,
    )
    return out, kernel
