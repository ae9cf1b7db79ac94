"""The Gluon shared kernel with the V residual and a producer warp (Hopper, ``shared_form="gluon_ws"``; v32, built on
CPU, not yet run on a GPU): the consumer warpgroup's context loop without CTA barriers.

The single-head kernel (:mod:`.shared_gluon`) issues its TMA copies and its rows' ``u_v`` copies from the warps that
compute, and every issue or refill sits behind a CTA barrier: offline (sm_90, Triton 3.6) its V loop holds 5
``BAR.SYNC`` per 32-token tile where base only holds 4 per 64-token tile (eval/KERNEL_NOTES.md "v31"). Here one
producer warp (``gl.warp_specialize``) issues every copy: per tile the K tile, the V tile and each row's ``u_v`` tile
(TMA, ``[1, BLOCK_T, RV]`` boxes of ``u_v [n, T, RV]``, zeros past ``T``) against per-stage *full* mbarriers (their
bytes expected) once the consumer has released the stage on its *empty* mbarriers; the consumer warpgroup (the
default partition) waits on *full*, computes as the single-head kernel does (:mod:`.shared_gluon`'s helpers) and
releases K tile ``j + 1`` and V/``u_v`` tile ``j`` after each tile's MMA wait. Same arithmetic and partials (the merge
is shared). Limits: those of :func:`~.shared_gluon.unsupported` for a V residual. Asked for only; not the rule's pick.
Imports nothing from ``forkkv_hf``.
"""

from __future__ import annotations

from .attention_common import pow2
from .shared_gluon import GLUON_SHARED_V_RULE, HAVE_GLUON, _gl_dtype, descriptors, refusal

if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                                   warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from .gluon_common import acc_layout as _acc_layout
    from .gluon_common import cta_barrier as _cta_barrier
    from .shared_gluon import _pu
    from .shared_gluon_steps import _queries, _rows, _store_partials, _tile_softmax, _tma_load

#: the producer-warp kernel's launch knobs where a call does not give them: the single-head V rule's 32-token tiles on
#: 4 consumer warps, two programs per SM, with 2 buffers (one ring for K, V and u_v; with 3 two programs do not fit)
GLUON_WS_RULE = dict(GLUON_SHARED_V_RULE, num_stages=2)
#: registers per thread: the kernel's cap (its 5 warps take two warpgroups' registers: two programs per SM fit 128),
#: the producer warp's share; the consumer warpgroup gets the rest (232)
WS_MAXNREG, WS_PRODUCER_REGS = 128, 24


def ws_refusal(q, k_base, v_base, v_u, block_t: int, num_warps: int, num_stages: int, vpr: int) -> Exception | None:
    """The error, saying what to do, that a launch of the producer-warp kernel would raise, or None: no V residual,
    a consumer of other than 4 warps, or :func:`~.shared_gluon.refusal`'s reasons (the same shared memory)."""
    if v_u is None:
        return ValueError("shared_form='gluon_ws' is the V residual's kernel; without one use shared_form='gluon'")
    if num_warps != 4:
        return ValueError(f"shared_form='gluon_ws' runs one consumer warpgroup (num_warps=4), not {num_warps}")
    err = refusal(q, k_base, v_base, v_u, block_t, num_warps, num_stages, vpr)
    if err is not None:
        return type(err)(str(err).replace("shared_form='gluon'", "shared_form='gluon_ws'", 1))
    return None


if HAVE_GLUON:
    @gluon.jit
    def _producer(k_desc, v_desc, u_desc, VSLOT, B, T, split_len, k_full, vu_full, empty, k_smem, v_smem, u_smem,
                  BLOCK_M: gl.constexpr, VPR: gl.constexpr, NR: gl.constexpr, NWC: gl.constexpr, D: gl.constexpr,
                  BLOCK_T: gl.constexpr, STAGES: gl.constexpr, RV: gl.constexpr):
        """The producer warp: for each tile of the split, once the consumer has released the stage (one *empty*
        mbarrier per stage for its K, V and ``u_v`` tiles), the K tile on its *full* mbarrier and the V tile with the
        rows' ``u_v`` tiles on theirs (ring row ``j·NWC + w`` holds row ``row0 + w·RPW + j``, as the single-head
        kernel's)."""
        RPW: gl.constexpr = NR // NWC
        NBYTES: gl.constexpr = BLOCK_T * D * 2
        mb = gl.program_id(0)
        hkv = gl.program_id(1)
        split = gl.program_id(2)
        t_begin = split * split_len
        t_end = gl.minimum(T, t_begin + split_len)
        n = gl.cdiv(t_end - t_begin, BLOCK_T)
        kv_row = hkv * T + t_begin
        row0 = mb * (BLOCK_M // VPR)
        for i in range(n):
            st = i % STAGES
            mbarrier.wait(empty.index(st), ((i // STAGES) & 1) ^ 1)  # a fresh mbarrier's previous phase: complete
            mbarrier.expect(k_full.index(st), NBYTES)
            _tma_load(k_desc, [kv_row + i * BLOCK_T, 0], k_full.index(st), k_smem.index(st))
            mbarrier.expect(vu_full.index(st), NBYTES + NR * BLOCK_T * RV * 2)
            _tma_load(v_desc, [kv_row + i * BLOCK_T, 0], vu_full.index(st), v_smem.index(st))
            for k in gl.static_range(NR):
                slot = gl.maximum(gl.load(VSLOT + gl.minimum(row0 + (k % NWC) * RPW + k // NWC, B - 1)), 0)
                _tma_load(u_desc, [slot, t_begin + i * BLOCK_T, 0], vu_full.index(st),
                          u_smem.index(st).slice(k, 1, dim=0))

    @gluon.jit
    def _consumer(Q, s_qb, s_qh, s_qq, R, KSLOT, VSLOT, MASK, s_mb, s_mq, s_mt, M_WS, L_WS, ACC_WS, UV_WS,
                  B, T, NQ, split_len, n_splits, qk_scale, k_full, vu_full, empty, k_smem, v_smem, q_smem, u_smem,
                  HKV: gl.constexpr, G: gl.constexpr, D: gl.constexpr, HALF: gl.constexpr, HALF_B: gl.constexpr,
                  VPR: gl.constexpr, NQG: gl.constexpr, BLOCK_T: gl.constexpr, STAGES: gl.constexpr,
                  RV: gl.constexpr, HAS_K: gl.constexpr, HAS_MASK: gl.constexpr, RVB: gl.constexpr,
                  NW: gl.constexpr):
        """The consumer warpgroup: :func:`.shared_gluon._cascade_shared_gluon`'s loop with a V residual, each tile's
        operands waited for on *full*, and tile ``j``'s stage (its K tile read one tile earlier) released on *empty*
        once, after the tile's MMA wait."""
        BLOCK_M: gl.constexpr = 16 * NW
        ACC_S: gl.constexpr = _acc_layout(NW, BLOCK_T)
        ACC_O: gl.constexpr = _acc_layout(NW, D)
        dtype: gl.constexpr = Q.dtype.element_ty
        RPW: gl.constexpr = 16 // VPR
        MMA2: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NW, 1, 1], instr_shape=[1, 16, 8])
        mb = gl.program_id(0)
        hkv = gl.program_id(1)
        split = gl.program_id(2)
        t_begin = split * split_len
        t_end = gl.minimum(T, t_begin + split_len)
        n = gl.cdiv(t_end - t_begin, BLOCK_T)

        q = _queries(Q, s_qb, s_qh, s_qq, mb, B, hkv, VPR, NQG, G, D, NW)
        q_smem.store(q)
        fence_async_shared()
        _cta_barrier()  # (the partition's own barrier: the queries in shared memory before the first MMA)

        row, qs, head_s, valid, r_row, kres = _rows(mb, B, T, hkv, KSLOT, BLOCK_M, VPR, NQG, G, HAS_K, ACC_S)
        zs = gl.zeros([BLOCK_M, BLOCK_T], gl.float32, ACC_S) * qk_scale
        o = gl.zeros([BLOCK_M, D], gl.float32, ACC_O)
        acc_u = gl.zeros([NW, 16, RV], gl.float32, MMA2)

        mbarrier.wait(k_full.index(0), 0)
        s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zs, use_acc=False)
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, ACC_S))
        l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, ACC_S))
        for j in range(0, n - 1):
            st = j % STAGES
            sn = (j + 1) % STAGES
            mbarrier.wait(k_full.index(sn), ((j + 1) // STAGES) & 1)
            s_tok = warpgroup_mma(q_smem, k_smem.index(sn).permute((1, 0)), zs, use_acc=False, is_async=True)
            p, alpha, m_i, l_i, o, pa = _tile_softmax(s, t_begin + j * BLOCK_T, t_end, qk_scale, R, r_row, kres, MASK,
                                                      s_mb, s_mq, s_mt, row, qs, valid, m_i, l_i, o, BLOCK_T, ACC_S,
                                                      ACC_O, HAS_K, HAS_MASK, dtype, False)
            mbarrier.wait(vu_full.index(st), (j // STAGES) & 1)  # V tile j and the rows' u_v tiles
            o_tok = warpgroup_mma(pa, v_smem.index(st), o, is_async=True)
            acc_u = _pu(p, alpha, acc_u, u_smem, st, ACC_S, MMA2, NW, RPW, VPR, BLOCK_T, dtype)
            s, o, pa = warpgroup_mma_wait(num_outstanding=0, deps=[s_tok, o_tok, pa])
            fence_async_shared()  # the u_v tiles' reads before the producer's next TMA into the stage
            mbarrier.arrive(empty.index(st), count=1)  # tile j's K (read last iteration), V and u_v
        p, alpha, m_i, l_i, o, pa = _tile_softmax(s, t_begin + (n - 1) * BLOCK_T, t_end, qk_scale, R, r_row, kres, MASK,
                                                  s_mb, s_mq, s_mt, row, qs, valid, m_i, l_i, o, BLOCK_T, ACC_S,
                                                  ACC_O, HAS_K, HAS_MASK, dtype, False)
        sp = (n - 1) % STAGES
        mbarrier.wait(vu_full.index(sp), ((n - 1) // STAGES) & 1)
        o = warpgroup_mma(pa, v_smem.index(sp), o)
        acc_u = _pu(p, alpha, acc_u, u_smem, sp, ACC_S, MMA2, NW, RPW, VPR, BLOCK_T, dtype)
        _store_partials(m_i, l_i, o, acc_u, row, head_s, qs, valid, M_WS, L_WS, ACC_WS, UV_WS, VSLOT, B, NQ,
                        n_splits, mb, hkv, split, HKV, G, D, HALF, HALF_B, VPR, NQG, RV, RVB, True, ACC_O, NW)

    @gluon.jit
    def _cascade_shared_gluon_ws(
        Q, s_qb, s_qh, s_qq,
        k_desc, v_desc, u_desc, R, KSLOT, VSLOT,
        MASK, s_mb, s_mq, s_mt,
        M_WS, L_WS, ACC_WS, UV_WS,
        B, T, NQ, split_len, n_splits, qk_scale,
        HKV: gl.constexpr, G: gl.constexpr, D: gl.constexpr, HALF: gl.constexpr, HALF_B: gl.constexpr,
        VPR: gl.constexpr, NQG: gl.constexpr, BLOCK_T: gl.constexpr, STAGES: gl.constexpr, RV: gl.constexpr,
        HAS_K: gl.constexpr, HAS_MASK: gl.constexpr, RVB: gl.constexpr, PRODUCER_REGS: gl.constexpr,
    ):
        """The shared part with the V residual (grid ``(n_mb, HKV, n_splits)``, as the single-head kernel's): the
        rings and their *full*/*empty* mbarriers, then the consumer (:func:`_consumer`) and producer
        (:func:`_producer`) partitions."""
        NW: gl.constexpr = gl.num_warps()
        BLOCK_M: gl.constexpr = 16 * NW
        NR: gl.constexpr = 16 // VPR * NW
        dtype: gl.constexpr = Q.dtype.element_ty
        # the rings first (1024-byte aligned, whole KBs), the mbarriers after them: two programs per SM fit
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_T, D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_T, D], v_desc.layout)
        u_smem = gl.allocate_shared_memory(dtype, [STAGES, NR, BLOCK_T, RV],
                                           gl.NVMMASharedLayout.get_default_for([NR, BLOCK_T, RV], dtype))
        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, D], gl.NVMMASharedLayout.get_default_for([BLOCK_M, D],
                                                                                                     dtype))
        k_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        vu_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(k_full.index(i), count=1)
            mbarrier.init(vu_full.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        fence_async_shared()
        _cta_barrier()
        gl.warp_specialize([
            (_consumer, (Q, s_qb, s_qh, s_qq, R, KSLOT, VSLOT, MASK, s_mb, s_mq, s_mt, M_WS, L_WS, ACC_WS, UV_WS,
                         B, T, NQ, split_len, n_splits, qk_scale, k_full, vu_full, empty, k_smem, v_smem, q_smem,
                         u_smem, HKV, G, D, HALF, HALF_B, VPR, NQG, BLOCK_T, STAGES, RV, HAS_K, HAS_MASK, RVB, NW)),
            (_producer, (k_desc, v_desc, u_desc, VSLOT, B, T, split_len, k_full, vu_full, empty, k_smem, v_smem,
                         u_smem, BLOCK_M, VPR, NR, NW, D, BLOCK_T, STAGES, RV)),
        ], [1], [PRODUCER_REGS])


def u_descriptor(v_u, block_t: int):
    """The TMA descriptor of ``u_v [n, T, RV]`` (contiguous) in ``[1, block_t, RV]`` boxes (a row's tile), in the
    shared layout of the ``u_v`` ring's ``[rows, block_t, RV]`` tiles."""
    layout = gl.NVMMASharedLayout.get_default_for([1, block_t, v_u.shape[-1]], _gl_dtype(v_u.dtype))
    return TensorDescriptor.from_tensor(v_u, [1, block_t, v_u.shape[-1]], layout)


def launch_shared_gluon_ws(q, k_base, v_base, r_scores, k_slot, mask, ws, *, n_mb: int, split_len: int,
                           n_splits: int, qk_scale: float, VPR: int, has_k: bool, block_t: int, num_warps: int,
                           num_stages: int, v_u, v_slot):
    """Run :func:`_cascade_shared_gluon_ws` over the grid ``(n_mb, HKV, n_splits)`` into the partials ``ws``;
    arguments as :func:`~.shared_gluon.launch_shared_gluon`'s (a V residual required). Raises :func:`ws_refusal`'s
    error where the kernel cannot take the call."""
    B, H, NQ, D = q.shape
    Hkv, T, _ = k_base.shape
    err = ws_refusal(q, k_base, v_base, v_u, block_t, num_warps, num_stages, VPR)
    if err is not None:
        raise err
    rv = v_u.shape[-1]
    k_desc, v_desc = descriptors(k_base, v_base, block_t)
    ms = mask.stride() if mask is not None else (0, 0, 0)
    return _cascade_shared_gluon_ws[(n_mb, Hkv, n_splits)](
        q, q.stride(0), q.stride(1), q.stride(2), k_desc, v_desc, u_descriptor(v_u, block_t), r_scores,
        k_slot if has_k else q, v_slot, mask if mask is not None else q, *ms, ws[0], ws[1], ws[2], ws[3],
        B, T, NQ, split_len, n_splits, qk_scale,
        HKV=Hkv, G=H // Hkv, D=D, HALF=D // 2, HALF_B=D // 2, VPR=VPR, NQG=NQ * (H // Hkv), BLOCK_T=block_t,
        STAGES=num_stages, RV=rv, HAS_K=has_k, HAS_MASK=mask is not None, RVB=pow2(rv),
        PRODUCER_REGS=WS_PRODUCER_REGS, num_warps=num_warps, maxnreg=WS_MAXNREG)
