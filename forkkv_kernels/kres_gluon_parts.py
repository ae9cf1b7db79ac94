"""The Gluon K passes' shared steps (:mod:`.kres_gluon`, :mod:`.kres_gluon_sync`): a score tile's columns and
their rows, a tile's loads, a rebuilt tile's halves and their rotation, one head's scores by ``mma.sync``, their
conversion and store. ``HAVE_GLUON``: this Triton has Gluon with the parts the K passes use. Imports nothing from
``forkkv_hf``."""

from __future__ import annotations

from .gluon_common import HAVE_GLUON

if HAVE_GLUON:
    try:
        from triton.experimental import gluon
        from triton.experimental.gluon import constexpr_function
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.language.nvidia.ampere import mma_v2
        from triton.experimental.gluon.language.nvidia.hopper import (  # noqa: F401 (the K passes' parts)
            fence_async_shared, warpgroup_mma, warpgroup_mma_wait)

        from .gluon_common import cta_barrier
    except (ImportError, AttributeError):  # pragma: no cover - a Gluon without these parts
        HAVE_GLUON = False


if HAVE_GLUON:
    @constexpr_function
    def _cols_layout(rows, cols, nw):
        """A blocked ``[rows, cols]`` layout with ``rows`` (tokens, contiguous in memory) fastest: 8 per thread."""
        spt = min(8, rows)
        tr = min(32, rows // spt)
        return gl.BlockedLayout(size_per_thread=[spt, 1], threads_per_warp=[tr, 32 // tr], warps_per_cta=[1, nw],
                                order=[0, 1])

    @gluon.jit
    def _satfinite_f16(x):
        return gl.inline_asm_elementwise("cvt.rn.satfinite.f16x2.f32 $0, $2, $1;", "=r,r,r", [x], dtype=gl.float16,
                                         is_pure=True, pack=2)

    @gluon.jit
    def _halves(x, BLOCK_T: gl.constexpr, HALF: gl.constexpr):
        """``x [BLOCK_T, 2·HALF]`` as its lo and hi halves of columns."""
        return gl.split(gl.permute(gl.reshape(x, [BLOCK_T, 2, HALF]), (0, 2, 1)))

    @gluon.jit
    def _joined(lo, hi, BLOCK_T: gl.constexpr, D: gl.constexpr):
        """The halves joined back into ``[BLOCK_T, D]`` (the inverse of :func:`_halves`)."""
        return gl.reshape(gl.permute(gl.join(lo, hi), (0, 2, 1)), [BLOCK_T, D])

    @gluon.jit
    def _columns(first, slot, ORDER, KSLOT, B, MQ: gl.constexpr, VPR: gl.constexpr, NQG: gl.constexpr,
                 LAYOUT: gl.constexpr):
        """The score tile's ``MQ`` columns in ``LAYOUT`` (rows from the sorted position ``first`` on, ``VPR`` query
        vectors each): each column's row, its query vector of that row, and whether it is one of the agent's."""
        col = gl.arange(0, MQ, layout=LAYOUT)
        w = col % VPR
        pos = first + col // VPR
        inb = pos < B
        row = gl.load(ORDER + pos, mask=inb, other=0)
        return row, w, inb & (gl.load(KSLOT + row, mask=inb, other=-1) == slot) & (w < NQG)

    @gluon.jit
    def _score_values(s, R, qk_scale, SATF: gl.constexpr):
        """One head's ``[BLOCK_T, MQ]`` scores scaled and converted to the buffer's dtype (fp16: saturated), in their
        accumulator's layout."""
        r = s * qk_scale
        if R.dtype.element_ty == gl.float16:
            if SATF:
                r = _satfinite_f16(r)
            else:
                r = gl.minimum(gl.maximum(r, -60000.0), 60000.0).to(gl.float16)
        return r.to(R.dtype.element_ty)

    @gluon.jit
    def _tile_loads(u_base, COS, SIN, t0, t_end, RK, tu, ku, tc, dc, D: gl.constexpr, HALF: gl.constexpr,
                    ROPE_HALF: gl.constexpr):
        """One tile's loads (tokens ``t0`` on, zeros past ``t_end``): its ``u`` tile and the cos/sin of the lo half's
        frequencies (and of the hi half's, unless ``ROPE_HALF``: then the lo half's again, no second load)."""
        u = gl.load(u_base + (t0 + tu)[:, None] * RK + ku[None, :],
                    mask=((t0 + tu) < t_end)[:, None] & (ku < RK)[None, :], other=0.0)
        cmask = ((t0 + tc) < t_end)[:, None]
        c_off = (t0 + tc)[:, None] * D + dc[None, :]
        c = gl.load(COS + c_off, mask=cmask, other=0.0)
        s = gl.load(SIN + c_off, mask=cmask, other=0.0)
        if ROPE_HALF:
            ch = c
            sh = s
        else:
            ch = gl.load(COS + c_off + HALF, mask=cmask, other=0.0)
            sh = gl.load(SIN + c_off + HALF, mask=cmask, other=0.0)
        return u, c, s, ch, sh

    @gluon.jit
    def _rotated(x, c_lo, s_lo, c_hi, s_hi, dtype: gl.constexpr, BLOCK_T: gl.constexpr, HALF: gl.constexpr):
        """A rebuilt tile ``x``'s halves, rotate-half RoPE applied in the cache dtype ``dtype``."""
        xl, xh = _halves(x, BLOCK_T, HALF)
        xl = xl.to(dtype)
        xh = xh.to(dtype)
        return xl * c_lo - xh * s_lo, xh * c_hi + xl * s_hi

    @gluon.jit
    def _head_scores(x, q_h, c_lo, s_lo, c_hi, s_hi, zs, dtype: gl.constexpr, A_K: gl.constexpr, B_Q: gl.constexpr,
                     BLOCK_T: gl.constexpr, HALF: gl.constexpr, MQ: gl.constexpr):
        """One head's scores by ``mma.sync`` from its rebuilt tile ``x``: its rotated halves, each against its half of
        the head's queries ``q_h`` (no join); for a narrow tile two independent chains of depth HALF, summed (a wide
        one would spill their accumulators; v36b)."""
        k_lo, k_hi = _rotated(x, c_lo, s_lo, c_hi, s_hi, dtype, BLOCK_T, HALF)
        s = mma_v2(gl.convert_layout(k_lo, A_K), q_h.slice(0, HALF).load(B_Q), zs)
        if MQ <= 16:
            s += mma_v2(gl.convert_layout(k_hi, A_K), q_h.slice(HALF, HALF).load(B_Q), zs)
        else:
            s = mma_v2(gl.convert_layout(k_hi, A_K), q_h.slice(HALF, HALF).load(B_Q), s)
        return s

    @gluon.jit
    def _store_head(s, R, h, t0, head_stride, r_off, r_mask, qk_scale, SATF: gl.constexpr):
        """Store head ``h``'s scores of the tile at ``t0`` from their accumulator's layout (each thread its tokens of
        each vector), not through shared memory: no CTA barrier per head (v36b)."""
        gl.store(R + (h * head_stride + t0) + r_off, _score_values(s, R, qk_scale, SATF), mask=r_mask)

    @gluon.jit
    def _agent_program(KSLOT, ORDER, B, MQ: gl.constexpr, VPR: gl.constexpr):
        """This program's agent (its K slot), the sorted position of the first row of its chunk, and whether it has
        work: the first program of its agent's sorted rows (grid: sorted position x split x chunk), a chunk within
        them."""
        p = gl.program_id(0)
        slot = gl.load(KSLOT + gl.load(ORDER + p))
        prev = gl.load(KSLOT + gl.load(ORDER + gl.maximum(p - 1, 0)))
        first = p + gl.program_id(2) * (MQ // VPR)
        first_slot = gl.load(KSLOT + gl.load(ORDER + gl.minimum(first, B - 1)))
        return slot, first, (slot >= 0) & ((p == 0) | (prev != slot)) & (first < B) & (first_slot == slot)

    @gluon.jit
    def _stage_agent(Q, s_qb, s_qh, s_qq, BK, KSLOT, ORDER, B, RK, slot, first, dtype: gl.constexpr,
                     HKV: gl.constexpr, G: gl.constexpr, D: gl.constexpr, RKB: gl.constexpr, MQ: gl.constexpr,
                     VPR: gl.constexpr, NQG: gl.constexpr):
        """The agent's ``B_k`` of every KV head, ``[HKV, RKB, D]`` (element (h, k, n) = B_k[slot, h·D + n, k]), and
        this chunk's query vectors (the score tile's columns) of every KV head, ``[HKV, D, MQ]``, in shared memory,
        fenced for the MMAs and seen by every warp."""
        NW: gl.constexpr = gl.num_warps()
        LB: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 1], threads_per_warp=[1, 32], warps_per_cta=[NW, 1],
                                            order=[0, 1])  # a head's B_k [RKB, D] (rank contiguous in memory)
        LQ: gl.constexpr = _cols_layout(D, MQ, NW)  # a head's queries [D, MQ] (dims contiguous in memory)
        b_smem = gl.allocate_shared_memory(dtype, [HKV, RKB, D], gl.NVMMASharedLayout.get_default_for([RKB, D], dtype))
        kb = gl.arange(0, RKB, layout=gl.SliceLayout(1, LB))
        nb = gl.arange(0, D, layout=gl.SliceLayout(0, LB))
        b_base = BK + slot.to(gl.int64) * (HKV * D * RK)
        for i in gl.static_range(HKV):
            b_smem.index(i).store(gl.load(b_base + (i * D + nb[None, :]) * RK + kb[:, None],
                                          mask=(kb < RK)[:, None], other=0.0).to(dtype))
        q_smem = gl.allocate_shared_memory(dtype, [HKV, D, MQ], gl.NVMMASharedLayout.get_default_for([D, MQ], dtype))
        dq = gl.arange(0, D, layout=gl.SliceLayout(1, LQ))
        rowq, wq, okq = _columns(first, slot, ORDER, KSLOT, B, MQ, VPR, NQG, gl.SliceLayout(0, LQ))
        q_off = rowq * s_qb + (wq % G) * s_qh + (wq // G) * s_qq
        for i in gl.static_range(HKV):
            q_smem.index(i).store(gl.load(Q + (q_off + i * G * s_qh)[None, :] + dq[:, None], mask=okq[None, :],
                                          other=0.0).to(dtype))
        fence_async_shared()
        cta_barrier()
        return b_smem, q_smem

    @gluon.jit
    def _score_addresses(first, slot, KSLOT, ORDER, B, RS, MQ: gl.constexpr, VPR: gl.constexpr, NQG: gl.constexpr,
                         BLOCK_T: gl.constexpr, ACC_S: gl.constexpr):
        """The score tile's offsets in the accumulator's layout ``ACC_S`` at head 0 and token 0 (int32: a head's
        scores fit, the launcher checks), a head's stride (B·VPR rows), the tile's token offsets and which columns
        are the agent's."""
        rowc, w, ok = _columns(first, slot, ORDER, KSLOT, B, MQ, VPR, NQG, gl.SliceLayout(0, ACC_S))
        ts = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, ACC_S))
        return ((rowc * VPR + w) * RS)[None, :] + ts[:, None], (B * VPR).to(gl.int64) * RS, ts, ok

    @gluon.jit
    def _tile_offsets(BLOCK_T: gl.constexpr, RKB: gl.constexpr, HALF: gl.constexpr):
        """The token and column offsets of a tile's ``u`` ``[BLOCK_T, RKB]`` and cos/sin ``[BLOCK_T, HALF]`` loads
        (:func:`_tile_loads`), each in its blocked layout."""
        NW: gl.constexpr = gl.num_warps()
        LU: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32, 1], warps_per_cta=[NW, 1],
                                            order=[1, 0])
        LC: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 // (HALF // 8), HALF // 8],
                                            warps_per_cta=[NW, 1], order=[1, 0])
        return (gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, LU)), gl.arange(0, RKB, layout=gl.SliceLayout(0, LU)),
                gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, LC)), gl.arange(0, HALF, layout=gl.SliceLayout(0, LC)))

    @gluon.jit
    def _tile_rope(c, sn, ch, sh, like, dtype: gl.constexpr, ROPE_HALF: gl.constexpr):
        """A tile's cos/sin of the lo and hi halves in ``dtype`` and in the layout of ``like`` (a rebuilt tile's half;
        with ``ROPE_HALF`` the hi half's are the lo half's)."""
        LAYOUT: gl.constexpr = like.type.layout
        c_lo = gl.convert_layout(c.to(dtype), LAYOUT)
        s_lo = gl.convert_layout(sn.to(dtype), LAYOUT)
        if ROPE_HALF:
            c_hi = c_lo
            s_hi = s_lo
        else:
            c_hi = gl.convert_layout(ch.to(dtype), LAYOUT)
            s_hi = gl.convert_layout(sh.to(dtype), LAYOUT)
        return c_lo, s_lo, c_hi, s_hi
