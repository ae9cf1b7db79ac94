"""The Gluon K pass (:mod:`.kres_gluon`) with its rebuild by ``mma.sync`` instead of the warpgroup MMA, so that one
head's rebuild can run beside another head's rotation within a warp.

Why (eval/KERNEL_NOTES.md "v41 measured", "v42"): the Gluon K pass issues 41% of the slots it could, its FMA pipes
46% / 35% busy and the tensor pipe 29%; per warp its steps alternate (the rebuild's MMA waited for, then 64 packed
rotation instructions, then the score chain) and the 2.5 warps per scheduler do not fill each other's gaps. With the
rebuild on the warpgroup MMA, ptxas serialises every MMA of the kernel as soon as a rebuild is in flight while the
previous head's accumulator is read (its reports C7514 / C7515), so that kernel cannot overlap them; ``mma.sync`` has
no asynchronous accumulator, so the next head's rebuild can be issued before this head's rotation (``PIPE``) and the
scheduler may interleave the two. The cost: the rebuild as 16 ``HMMA`` per warp and head (m16n8k16 over D = 128
columns) with ``B_k`` loaded from shared memory per head, against one warpgroup MMA.

Same operands, arithmetic and results as the Gluon K pass's fp16 form (``res_f16``): ``u`` and ``B_k`` in fp16, the
rebuild accumulated in fp16, rotated in packed fp16, scores by ``mma.sync`` accumulated in fp32, scaled and stored
through the saturating conversion; the same grid and launcher (:func:`~.kres_gluon.launch_kres_scores_gluon` with
``res_rebuild="mma_sync"``).

Imports nothing from ``forkkv_hf``.
"""

from __future__ import annotations

from .kres_gluon_parts import HAVE_GLUON

if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared

    from .gluon_common import cta_barrier as _cta_barrier
    from .kres_gluon_parts import _cols_layout, _columns, _halves, _head_scores, _store_head, _tile_loads

    @gluon.jit
    def _kres_scores_gluon_sync(
        Q, s_qb, s_qh, s_qq,
        UK, BK, COS, SIN, KSLOT, ORDER, R,
        B, T, RS, RK, split_len, qk_scale,
        HKV: gl.constexpr, G: gl.constexpr, HALF: gl.constexpr, RKB: gl.constexpr, VPR: gl.constexpr,
        NQG: gl.constexpr, MQ: gl.constexpr, BLOCK_T: gl.constexpr, ROPE_HALF: gl.constexpr, SATF: gl.constexpr,
    ):
        """:func:`~.kres_gluon._kres_scores_gluon`'s scores (its fp16 form), the rebuild by ``mma.sync``."""
        NW: gl.constexpr = gl.num_warps()
        D: gl.constexpr = 2 * HALF
        ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NW, 1], instr_shape=[16, 8])
        A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ACC, k_width=2)
        B_OP: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=ACC, k_width=2)
        LB: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 1], threads_per_warp=[1, 32], warps_per_cta=[NW, 1],
                                            order=[0, 1])  # a head's B_k [RKB, D] (rank contiguous in memory)
        LQ: gl.constexpr = _cols_layout(D, MQ, NW)  # a head's queries [D, MQ] (dims contiguous in memory)
        SB: gl.constexpr = gl.NVMMASharedLayout.get_default_for([RKB, D], gl.float16)
        SQ: gl.constexpr = gl.NVMMASharedLayout.get_default_for([D, MQ], gl.float16)
        SU: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_T, RKB], gl.float16)
        LU: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32, 1], warps_per_cta=[NW, 1],
                                            order=[1, 0])  # a u tile [BLOCK_T, RKB]
        LC: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 // (HALF // 8), HALF // 8],
                                            warps_per_cta=[NW, 1], order=[1, 0])  # a cos/sin tile [BLOCK_T, HALF]

        p = gl.program_id(0)
        split = gl.program_id(1)
        chunk = gl.program_id(2)
        slot = gl.load(KSLOT + gl.load(ORDER + p))
        prev = gl.load(KSLOT + gl.load(ORDER + gl.maximum(p - 1, 0)))
        first = p + chunk * (MQ // VPR)
        first_slot = gl.load(KSLOT + gl.load(ORDER + gl.minimum(first, B - 1)))
        if (slot >= 0) & ((p == 0) | (prev != slot)) & (first < B) & (first_slot == slot):
            dtype: gl.constexpr = gl.float16
            b_smem = gl.allocate_shared_memory(dtype, [HKV, RKB, D], SB)
            kb = gl.arange(0, RKB, layout=gl.SliceLayout(1, LB))
            nb = gl.arange(0, D, layout=gl.SliceLayout(0, LB))
            b_base = BK + slot.to(gl.int64) * (HKV * D * RK)
            for i in gl.static_range(HKV):
                b_smem.index(i).store(gl.load(b_base + (i * D + nb[None, :]) * RK + kb[:, None],
                                              mask=(kb < RK)[:, None], other=0.0).to(dtype))
            q_smem = gl.allocate_shared_memory(dtype, [HKV, D, MQ], SQ)
            dq = gl.arange(0, D, layout=gl.SliceLayout(1, LQ))
            rowq, wq, okq = _columns(first, slot, ORDER, KSLOT, B, MQ, VPR, NQG, gl.SliceLayout(0, LQ))
            q_off = rowq * s_qb + (wq % G) * s_qh + (wq // G) * s_qq
            for i in gl.static_range(HKV):
                q_smem.index(i).store(gl.load(Q + (q_off + i * G * s_qh)[None, :] + dq[:, None], mask=okq[None, :],
                                              other=0.0).to(dtype))
            fence_async_shared()
            _cta_barrier()
            rowc, w, ok = _columns(first, slot, ORDER, KSLOT, B, MQ, VPR, NQG, gl.SliceLayout(0, ACC))
            ts = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, ACC))
            r_off = ((rowc * VPR + w) * RS)[None, :] + ts[:, None]
            head_stride = (B * VPR).to(gl.int64) * RS

            u_base = UK + slot.to(gl.int64) * T * RK
            u_smem = gl.allocate_shared_memory(dtype, [BLOCK_T, RKB], SU)
            tu = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, LU))
            ku = gl.arange(0, RKB, layout=gl.SliceLayout(0, LU))
            tc = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, LC))
            dc = gl.arange(0, HALF, layout=gl.SliceLayout(0, LC))
            zx = gl.zeros([BLOCK_T, D], gl.float16, ACC)
            zs = gl.zeros([BLOCK_T, MQ], gl.float32, ACC)
            probe, probe_hi = _halves(zx, BLOCK_T, HALF)
            t_begin = split * split_len
            t_end = gl.minimum(T, t_begin + split_len)
            u_n, c_n, s_n, ch_n, sh_n = _tile_loads(u_base, COS, SIN, t_begin, t_end, RK, tu, ku, tc, dc, D, HALF,
                                                    ROPE_HALF)
            for t0 in range(t_begin, t_end, BLOCK_T):
                r_mask = ((t0 + ts) < t_end)[:, None] & ok[None, :]
                u, c, sn, ch, sh = u_n, c_n, s_n, ch_n, sh_n
                u_n, c_n, s_n, ch_n, sh_n = _tile_loads(u_base, COS, SIN, t0 + BLOCK_T, t_end, RK, tu, ku, tc, dc,
                                                        D, HALF, ROPE_HALF)
                _cta_barrier()  # every warp read the previous tile's u operand: the buffer can go
                u_smem.store(u.to(dtype))
                _cta_barrier()
                u_a = u_smem.load(A_OP)  # the u tile as the rebuild's A operand, for every head
                c_lo = gl.convert_layout(c.to(dtype), probe.type.layout)
                s_lo = gl.convert_layout(sn.to(dtype), probe.type.layout)
                if ROPE_HALF:
                    c_hi = c_lo
                    s_hi = s_lo
                else:
                    c_hi = gl.convert_layout(ch.to(dtype), probe.type.layout)
                    s_hi = gl.convert_layout(sh.to(dtype), probe.type.layout)
                # the heads in straight-line code, each head's rebuild issued before the previous head's rotation and
                # scores (no asynchronous accumulator: ptxas interleaves them, offline SASS)
                x_n = mma_v2(u_a, b_smem.index(0).load(B_OP), zx)
                for h in gl.static_range(HKV):
                    x = x_n
                    if h + 1 < HKV:
                        x_n = mma_v2(u_a, b_smem.index(h + 1).load(B_OP), zx)
                    s = _head_scores(x, q_smem.index(h), c_lo, s_lo, c_hi, s_hi, zs, dtype, A_OP, B_OP, BLOCK_T, HALF,
                                     MQ)
                    _store_head(s, R, h, t0, head_stride, r_off, r_mask, qk_scale, SATF)
