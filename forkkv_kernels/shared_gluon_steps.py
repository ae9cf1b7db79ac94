"""The steps the Gluon shared kernels (:mod:`.shared_gluon`, :mod:`.shared_gluon_pair`)
share: a program's query vectors and their rows, one tile's masked scores and online-softmax step, the TMA issue of
K/V tiles, where the rows' ``u_v`` tiles start, and the partials' stores the merge reads. Gluon functions, inlined
into each kernel (its compiled code the same as with them written out: eval/KERNEL_NOTES.md). Imports nothing from
``forkkv_hf``."""

from __future__ import annotations

from .gluon_common import HAVE_GLUON

if HAVE_GLUON:  # with Hopper's TMA
    try:
        from triton.experimental import gluon
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma

        # the TMA load: tma.async_copy_global_to_shared up to Triton 3.6 (the GPU machine's), tma.async_load after
        _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    except (ImportError, AttributeError):  # pragma: no cover - a Gluon without these parts
        HAVE_GLUON = False


if HAVE_GLUON:
    @gluon.jit
    def _vectors(mb, BLOCK_M: gl.constexpr, B, VPR: gl.constexpr, NQG: gl.constexpr, G: gl.constexpr, hkv,
                 LAYOUT: gl.constexpr):
        """The program's query vectors in ``LAYOUT``: row, query, head, whether real, and the vector's index."""
        v = mb * BLOCK_M + gl.arange(0, BLOCK_M, layout=LAYOUT)
        row = v // VPR
        w = v % VPR
        valid = (row < B) & (w < NQG)
        return gl.minimum(row, B - 1), w // G, hkv * G + w % G, valid, w

    @gluon.jit
    def _kscores(R, r_row, kres, t0, t_end, BLOCK_T: gl.constexpr, ACC_S: gl.constexpr, HAS_K: gl.constexpr):
        """The K residual's (pre-scaled) scores of the tile of tokens ``t0`` on, in the scores' layout (zeros past
        ``t_end`` and for vectors without a K residual); without one (``HAS_K`` off) a dummy, no load."""
        t = t0 + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, ACC_S))
        rk = t
        if HAS_K:
            rk = gl.load(R + r_row[:, None] + t[None, :], mask=kres[:, None] & (t < t_end)[None, :], other=0.0)
        return rk

    @gluon.jit
    def _scores(s, rk, t0, t_end, qk_scale, R, r_row, kres, MASK, s_mb, s_mq, s_mt, mrow, mq, valid,
                BLOCK_T: gl.constexpr, ACC_S: gl.constexpr, HAS_K: gl.constexpr, K_PRE: gl.constexpr,
                HAS_MASK: gl.constexpr):
        """One tile's scores in log2 units: scaled, plus the K residual's (pre-scaled) scores, masked to -inf.
        ``K_PRE``: those scores are ``rk`` (loaded earlier by :func:`_kscores`), else loaded here."""
        t = t0 + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, ACC_S))
        tm = t < t_end
        s = s * qk_scale
        if HAS_K:
            if K_PRE:
                s += rk.to(gl.float32)
            else:
                s += _kscores(R, r_row, kres, t0, t_end, BLOCK_T, ACC_S, HAS_K).to(gl.float32)
        allowed = valid[:, None] & tm[None, :]
        if HAS_MASK:
            mk = gl.load(MASK + mrow[:, None] * s_mb + mq[:, None] * s_mq + t[None, :] * s_mt, mask=allowed, other=0)
            allowed = allowed & (mk != 0)
        return gl.where(allowed, s, float("-inf"))

    @gluon.jit
    def _softmax(s, m_i, l_i):
        """One online-softmax step over masked scores ``s`` (log2 units): probabilities, the running sums' rescale
        factor, the new running max and sum."""
        m_new = gl.maximum(m_i, gl.max(s, 1))
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_safe)
        p = gl.exp2(s - m_safe[:, None])
        return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)

    @gluon.jit
    def _queries(Q, s_qb, s_qh, s_qq, mb, B, hkv, VPR: gl.constexpr, NQG: gl.constexpr, G: gl.constexpr,
                 D: gl.constexpr, NW: gl.constexpr):
        """The program's ``16·NW`` query vectors ``[16·NW, D]``, dims contiguous (zeros for vectors past the rows)."""
        BLOCK_M: gl.constexpr = 16 * NW
        LQ: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8], warps_per_cta=[NW, 1],
                                            order=[1, 0])
        rowq, qi, head, validq, wq = _vectors(mb, BLOCK_M, B, VPR, NQG, G, hkv, gl.SliceLayout(1, LQ))
        d = gl.arange(0, D, layout=gl.SliceLayout(0, LQ))
        return gl.load(Q + (rowq * s_qb + head * s_qh + qi * s_qq)[:, None] + d[None, :], mask=validq[:, None],
                       other=0.0)

    @gluon.jit
    def _rows(mb, B, RS, hkv, KSLOT, BLOCK_M: gl.constexpr, VPR: gl.constexpr, NQG: gl.constexpr, G: gl.constexpr,
              HAS_K: gl.constexpr, ACC_S: gl.constexpr):
        """The program's vectors in the scores' layout: row, query, head, whether real, and the K residual's score
        rows and whether each vector has one (dummies without a K residual)."""
        row, qs, head_s, valid, ws = _vectors(mb, BLOCK_M, B, VPR, NQG, G, hkv, gl.SliceLayout(1, ACC_S))
        r_row = row
        kres = valid
        if HAS_K:
            kres = valid & (gl.load(KSLOT + row) >= 0)
            r_row = ((hkv * B + row) * VPR + ws).to(gl.int64) * RS
        return row, qs, head_s, valid, r_row, kres

    @gluon.jit
    def _tile_softmax(s, t0, t_end, qk_scale, R, r_row, kres, MASK, s_mb, s_mq, s_mt, row, qs, valid, m_i, l_i, o,
                      BLOCK_T: gl.constexpr, ACC_S: gl.constexpr, ACC_O: gl.constexpr, HAS_K: gl.constexpr,
                      HAS_MASK: gl.constexpr, dtype: gl.constexpr, rk=None, K_PRE: gl.constexpr = False):
        """One tile's softmax step (:func:`_scores`, :func:`_softmax`) and the output's rescale: the probabilities,
        the rescale factor, the running max and sum, the rescaled output, the probabilities as ``P·V``'s operand.
        ``K_PRE``: the K residual's scores are ``rk``, loaded ahead (:func:`_kscores`)."""
        p, alpha, m_i, l_i = _softmax(_scores(s, rk, t0, t_end, qk_scale, R, r_row, kres, MASK, s_mb, s_mq, s_mt, row,
                                              qs, valid, BLOCK_T, ACC_S, HAS_K, K_PRE, HAS_MASK), m_i, l_i)
        o = o * gl.convert_layout(alpha, gl.SliceLayout(1, ACC_O))[:, None]
        pa = gl.convert_layout(p.to(dtype), gl.DotOperandLayout(operand_index=0, parent=ACC_O, k_width=2))
        return p, alpha, m_i, l_i, o, pa

    @gluon.jit
    def _fetch_one(desc, bar, smem, stage, row, pred, NBYTES: gl.constexpr):
        """Issue the TMA copy of one tile (context row ``row`` of the flattened ``[HKV·T, D]``) into ``stage`` of
        its ring."""
        mbarrier.expect(bar.index(stage), NBYTES, pred=pred)
        _tma_load(desc, [row, 0], bar.index(stage), smem.index(stage), pred=pred)

    @gluon.jit
    def _fetch(k_desc, v_desc, kbar, vbar, k_smem, v_smem, stage, row, pred, NBYTES: gl.constexpr):
        """Issue the TMA copies of one K and one V tile into ``stage`` of their rings."""
        _fetch_one(k_desc, kbar, k_smem, stage, row, pred, NBYTES)
        _fetch_one(v_desc, vbar, v_smem, stage, row, pred, NBYTES)

    @gluon.jit
    def _refill(k_desc, v_desc, kbar, vbar, k_smem, v_smem, j, kv_row, n, STAGES: gl.constexpr,
                BLOCK_T: gl.constexpr, NBYTES: gl.constexpr, K_EARLY: gl.constexpr):
        """After tile ``j``'s MMAs: refill the stages they freed. ``K_EARLY``: K tile ``j + 1``'s stage (its scores
        are done) with tile ``j + 1 + STAGES`` and V tile ``j``'s with tile ``j + STAGES``; else both of tile ``j``'s
        stages with tile ``j + STAGES``."""
        st = j % STAGES
        if K_EARLY:
            _fetch_one(k_desc, kbar, k_smem, (j + 1) % STAGES, kv_row + (j + 1 + STAGES) * BLOCK_T,
                       j + 1 + STAGES < n, NBYTES)
            _fetch_one(v_desc, vbar, v_smem, st, kv_row + (j + STAGES) * BLOCK_T, j + STAGES < n, NBYTES)
        else:
            _fetch(k_desc, v_desc, kbar, vbar, k_smem, v_smem, st, kv_row + (j + STAGES) * BLOCK_T, j + STAGES < n,
                   NBYTES)

    @gluon.jit
    def _u_offsets(VSLOT, row0, B, T, NW: gl.constexpr, RPW: gl.constexpr, BLOCK_T: gl.constexpr, RV: gl.constexpr):
        """Where the program's rows' ``u_v`` tiles start in ``u_v [n, T, RV]`` (:func:`_fetch_u`'s ``u_off`` and
        ``u_t``, in the copy's layout): ring row ``j·NW + w`` holds row ``row0 + w·RPW + j``; a row without a V
        residual copies slot 0's tile, never used."""
        NR: gl.constexpr = RPW * NW
        LU3: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 1, 8], threads_per_warp=[1, 32 * 8 // RV, RV // 8],
                                             warps_per_cta=[NW, 1, 1], order=[2, 1, 0])  # u_v tiles [NR, BLOCK_T, RV]
        k3 = gl.arange(0, NR, layout=gl.SliceLayout(1, gl.SliceLayout(2, LU3)))
        u_row = gl.minimum(row0 + (k3 % NW) * RPW + k3 // NW, B - 1)
        u_slot = gl.maximum(gl.load(VSLOT + u_row), 0).to(gl.int64)
        u_t = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, gl.SliceLayout(2, LU3)))[None, :, None]
        u_off = (u_slot * T * RV)[:, None, None] + u_t * RV + \
            gl.arange(0, RV, layout=gl.SliceLayout(0, gl.SliceLayout(1, LU3)))[None, None, :]
        return u_off, u_t

    @gluon.jit
    def _store_partials(m_i, l_i, o, acc_u, row, head_s, qs, valid, M_WS, L_WS, ACC_WS, UV_WS, VSLOT, B, NQ, n_splits,
                        mb, hkv, split, HKV: gl.constexpr, G: gl.constexpr, D: gl.constexpr, HALF: gl.constexpr,
                        HALF_B: gl.constexpr, VPR: gl.constexpr, NQG: gl.constexpr, RV: gl.constexpr,
                        RVB: gl.constexpr, HAS_V: gl.constexpr, ACC_O: gl.constexpr, NW: gl.constexpr):
        """One program's unnormalised partials of KV head ``hkv`` and split ``split`` as the merge reads them: each
        vector's running max and sum, its output (the merge's lo | hi halves) and, with a V residual, its ``P·u_v``
        (``RVB`` wide, zeros past the rank; zeros for rows without one, whose tiles were slot 0's)."""
        BLOCK_M: gl.constexpr = 16 * NW
        wi = ((row * (HKV * G) + head_s) * NQ + qs) * n_splits + split
        gl.store(M_WS + wi, m_i, mask=valid)
        gl.store(L_WS + wi, l_i, mask=valid)
        rowo, qo, heado, valido, wo = _vectors(mb, BLOCK_M, B, VPR, NQG, G, hkv, gl.SliceLayout(1, ACC_O))
        wio = ((rowo * (HKV * G) + heado) * NQ + qo) * n_splits + split
        do = gl.arange(0, D, layout=gl.SliceLayout(0, ACC_O))
        dst = gl.where(do < HALF, do, do - HALF + HALF_B)  # the merge kernel's lo | hi layout
        gl.store(ACC_WS + wio[:, None] * (2 * HALF_B) + dst[None, :], o, mask=valido[:, None])
        if HAS_V:  # each vector's P·u_v; zeros for rows without a V residual (their tiles were slot 0's)
            LU: gl.constexpr = gl.BlockedLayout([1, RV], [32, 1], [NW, 1], [1, 0])
            ou = gl.convert_layout(gl.reshape(gl.convert_layout(acc_u, gl.BlockedLayout([1, 1, RV], [1, 32, 1],
                                                                                            [NW, 1, 1], [2, 1, 0])),
                                              [BLOCK_M, RV]), LU)
            rowu, qu, headu, validu, wu = _vectors(mb, BLOCK_M, B, VPR, NQG, G, hkv, gl.SliceLayout(1, LU))
            wiu = ((rowu * (HKV * G) + headu) * NQ + qu) * n_splits + split
            has_u = gl.load(VSLOT + rowu) >= 0
            r = gl.arange(0, RV, layout=gl.SliceLayout(0, LU))
            gl.store(UV_WS + wiu[:, None] * RVB + r[None, :], gl.where(has_u[:, None], ou, 0.0),
                     mask=validu[:, None])
            if RVB > RV:  # the merge's rows are RVB wide (at least 16): zeros past the rank (rank 8)
                gl.store(UV_WS + wiu[:, None] * RVB + RV + r[None, :], gl.zeros_like(ou), mask=validu[:, None])
