"""The Gluon K pass (:mod:`.kres_gluon`) with its rebuild by ``mma.sync`` instead of the warpgroup MMA, so that one
head's rebuild can run beside another head's rotation within a warp.

Why (eval/KERNEL_NOTES.md "v41 measured", "v42"): the Gluon K pass issues 41% of the slots it could, its FMA pipes
46% / 35% busy and the tensor pipe 29%; per warp its steps alternate (the rebuild's MMA waited for, then 64 packed
rotation instructions, then the score chain) and the 2.5 warps per scheduler do not fill each other's gaps. With the
rebuild on the warpgroup MMA, ptxas serialises every MMA of the kernel as soon as a rebuild is in flight while the
previous head's accumulator is read (its reports C7514 / C7515), so that kernel cannot overlap them; ``mma.sync`` has
no asynchronous accumulator, so the next head's rebuild can be issued before this head's rotation and the
scheduler may interleave the two. The cost: the rebuild as 16 ``HMMA`` per warp and head (m16n8k16 over D = 128
columns) with ``B_k`` loaded from shared memory per head, against one warpgroup MMA.

Measured (eval/KERNEL_NOTES.md "v42 measured", one H100): whole K+V calls 3-14% slower than with the rule's Gluon K
pass at 32 / 128 / 256 agents, capped at 160 registers or not; ncu at 128 agents: the same issue rate (0.41 per
scheduler), the pipes' use spread, the HMMAs' shared-memory operands waited on. Kept opt-in for sweeps; the launch
rule does not take it.

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

    from .gluon_common import cta_barrier as _cta_barrier
    from .kres_gluon_parts import (_agent_program, _halves, _head_scores, _score_addresses, _stage_agent, _store_head,
                                   _tile_loads, _tile_offsets, _tile_rope)

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
        SU: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_T, RKB], gl.float16)

        split = gl.program_id(1)
        slot, first, active = _agent_program(KSLOT, ORDER, B, MQ, VPR)
        if active:
            dtype: gl.constexpr = gl.float16
            b_smem, q_smem = _stage_agent(Q, s_qb, s_qh, s_qq, BK, KSLOT, ORDER, B, RK, slot, first, dtype, HKV, G, D,
                                          RKB, MQ, VPR, NQG)
            r_off, head_stride, ts, ok = _score_addresses(first, slot, KSLOT, ORDER, B, RS, MQ, VPR, NQG, BLOCK_T,
                                                          ACC)
            u_base = UK + slot.to(gl.int64) * T * RK
            u_smem = gl.allocate_shared_memory(dtype, [BLOCK_T, RKB], SU)
            tu, ku, tc, dc = _tile_offsets(BLOCK_T, RKB, HALF)
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
                c_lo, s_lo, c_hi, s_hi = _tile_rope(c, sn, ch, sh, probe, dtype, ROPE_HALF)
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
