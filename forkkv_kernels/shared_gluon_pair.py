"""The Gluon shared kernel with the V residual for two KV heads per program (Hopper, ``shared_form="gluon_pair"``):
one warpgroup per head, both on the same rows, sharing their ``u_v`` tiles.

``u_v`` is per agent and token, the same for every KV head (``B_v`` maps the rank to all of them), so the single-head
kernel (:mod:`.shared_gluon`) copies each row's ``u_v`` into the SMs once per KV head: at 128 agents and 32K, 8 x 134
MB from L2, as much as the base K/V's re-reads (eval/KERNEL_NOTES.md "v28", "v29"). Here a program serves KV heads
``2p`` and ``2p + 1`` of one block of ``16·num_warps`` query vectors and one split of the context, by warp
specialisation (``gl.warp_specialize``): the default partition (the *lead*) and one worker partition of the same
``num_warps`` each run the single-head kernel's loop (:mod:`.shared_gluon`'s helpers) over their own head's K/V ring
(TMA, their own mbarriers); the lead alone copies the rows' ``u_v`` tiles (``cp.async``, each thread's copies
arriving on the stage's ``u_ready`` mbarrier), both multiply them, and the worker arrives on the stage's ``u_free``
once its products have read it, which the lead waits for before it refills that stage. Half the ``u_v`` copies, one
program per SM (176 KB of shared memory at the rule's 32-token tiles, 3 buffers, rank 16). Measured on an H100
(v28/v29): the copies were not the V residual's cost (masked off, 2.4 / 10.4 µs of 93 / 305 at 32 / 128 agents);
this kernel is 0.7-2.2% faster at 32 agents, 2.2-3.9% at 128 and 1% slower at 8.

Same arithmetic and partials as the single-head kernel (the merge is shared); exact on the GPU over the V case space
(tests/test_shared_gluon_pair.py). Limits: those of :func:`~.shared_gluon.unsupported` for a V residual, an even
number of KV heads, and :func:`pair_bytes` within :data:`~.shared_gluon.SMEM_LIMIT`. Not the rule's pick (a few
percent, against warp specialisation in the default path): asked for by ``shared_form="gluon_pair"``. Imports nothing
from ``forkkv_hf``.
"""

from __future__ import annotations

from .attention_common import pow2
from .shared_gluon import GLUON_SHARED_V_RULE, HAVE_GLUON, SMEM_LIMIT, descriptors, refusal, shared_bytes

if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                                   warpgroup_mma_wait)

    from .gluon_common import acc_layout as _acc_layout
    from .gluon_common import cta_barrier as _cta_barrier
    from .shared_gluon import _fetch_u, _pu
    from .shared_gluon_steps import (_fetch, _fetch_one, _queries, _refill, _rows, _store_partials, _tile_softmax,
                                     _u_offsets)

#: the pair kernel's launch knobs where a call does not give them: the single-head V rule's 32-token tiles and 3
#: buffers on 4 warps per head, one program (8 warps) per SM
GLUON_PAIR_RULE = dict(GLUON_SHARED_V_RULE, programs_per_sm=1)
#: registers per thread of each partition (8 warps x 32 threads x 240 fit an SM's 64K)
PAIR_REGS = 240


def pair_bytes(d: int, block_t: int, num_warps: int, stages: int, vpr: int = 4, v_rank: int = 16) -> int:
    """The pair kernel's shared memory: two heads' queries and K/V rings (:func:`~.shared_gluon.shared_bytes` without
    a V residual, twice), one ``u_v`` ring of the rows' tiles, and its ``u_ready``/``u_free`` mbarriers."""
    u_rows = 16 // vpr * num_warps
    return 2 * shared_bytes(d, block_t, num_warps, stages) + 2 * stages * u_rows * block_t * v_rank + 16 * stages


def pair_refusal(q, k_base, v_base, v_u, block_t: int, num_warps: int, num_stages: int, vpr: int) -> Exception | None:
    """The error, saying what to do, that a launch of the pair kernel would raise, or None: no V residual (nothing to
    share), an odd number of KV heads, :func:`~.shared_gluon.refusal`'s reasons, or more shared memory than
    :data:`~.shared_gluon.SMEM_LIMIT`."""
    if v_u is None:
        return ValueError("shared_form='gluon_pair' shares the V residual's u_v tiles between two KV heads; without "
                          "a V residual use shared_form='gluon'")
    if k_base.shape[0] % 2:
        return ValueError(f"shared_form='gluon_pair' serves KV heads in pairs; this model has {k_base.shape[0]}: "
                          "use shared_form='gluon'")
    err = refusal(q, k_base, v_base, v_u, block_t, num_warps, num_stages, vpr)
    if err is not None:
        return type(err)(str(err).replace("shared_form='gluon'", "shared_form='gluon_pair'", 1))
    smem = pair_bytes(q.shape[-1], block_t, num_warps, num_stages, vpr, v_u.shape[-1])
    if smem > SMEM_LIMIT:
        return ValueError(f"shared_form='gluon_pair' cannot serve this call: {smem} bytes of shared memory (at most "
                          f"{SMEM_LIMIT}): fewer stages or a smaller block_t, or use shared_form='gluon'")
    return None


if HAVE_GLUON:
    @gluon.jit
    def _fill_u(UV, u_off, u_t, u_smem, u_ready, stage, t, T, RV: gl.constexpr):
        """The lead's copies of the rows' ``u_v`` tiles (tokens ``t`` on) into ``stage``, each thread's arriving on
        the stage's ``u_ready`` once they land."""
        _fetch_u(UV, u_off, u_t, u_smem, stage, t, T, RV)
        async_copy.mbarrier_arrive(u_ready.index(stage), increment_count=False)

    @gluon.jit
    def _pair_head(
        Q, s_qb, s_qh, s_qq, k_desc, v_desc, R, KSLOT, UV, VSLOT, MASK, s_mb, s_mq, s_mt,
        M_WS, L_WS, ACC_WS, UV_WS, B, T, RS, NQ, split_len, n_splits, qk_scale,
        kbar, vbar, k_smem, v_smem, q_smem, u_smem, u_ready, u_free,
        HKV: gl.constexpr, G: gl.constexpr, D: gl.constexpr, HALF: gl.constexpr, HALF_B: gl.constexpr,
        VPR: gl.constexpr, NQG: gl.constexpr, BLOCK_T: gl.constexpr, STAGES: gl.constexpr, RV: gl.constexpr,
        HAS_K: gl.constexpr, HAS_MASK: gl.constexpr, K_EARLY: gl.constexpr, RVB: gl.constexpr, NW: gl.constexpr,
        LEAD: gl.constexpr,
    ):
        """One head of the pair (the lead's ``2p`` or the worker's ``2p + 1``; ``NW``: the partition's warps):
        :func:`.shared_gluon._cascade_shared_gluon`'s loop with a V residual over this head's K/V ring, the ``u_v``
        ring shared."""
        BLOCK_M: gl.constexpr = 16 * NW
        ACC_S: gl.constexpr = _acc_layout(NW, BLOCK_T)
        ACC_O: gl.constexpr = _acc_layout(NW, D)
        dtype: gl.constexpr = Q.dtype.element_ty
        NBYTES: gl.constexpr = BLOCK_T * D * 2
        RPW: gl.constexpr = 16 // VPR
        MMA2: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NW, 1, 1], instr_shape=[1, 16, 8])

        mb = gl.program_id(0)
        hkv = gl.program_id(1) * 2 + (0 if LEAD else 1)
        split = gl.program_id(2)
        t_begin = split * split_len
        t_end = gl.minimum(T, t_begin + split_len)
        n = gl.cdiv(t_end - t_begin, BLOCK_T)
        kv_row = hkv * T + t_begin
        row0 = mb * (BLOCK_M // VPR)
        if LEAD:  # the rows' u_v offsets, as the single-head kernel's
            u_off, u_t = _u_offsets(VSLOT, row0, B, T, NW, RPW, BLOCK_T, RV)
        for i in gl.static_range(STAGES):
            _fetch(k_desc, v_desc, kbar, vbar, k_smem, v_smem, i, kv_row + i * BLOCK_T, i < n, NBYTES)
            if LEAD:
                _fill_u(UV, u_off, u_t, u_smem, u_ready, i, t_begin + i * BLOCK_T, T, RV)

        q = _queries(Q, s_qb, s_qh, s_qq, mb, B, hkv, VPR, NQG, G, D, NW)
        q_smem.store(q)
        fence_async_shared()
        _cta_barrier()

        row, qs, head_s, valid, r_row, kres = _rows(mb, B, RS, hkv, KSLOT, BLOCK_M, VPR, NQG, G, HAS_K, ACC_S)
        zs = gl.zeros([BLOCK_M, BLOCK_T], gl.float32, ACC_S) * qk_scale
        o = gl.zeros([BLOCK_M, D], gl.float32, ACC_O)
        acc_u = gl.zeros([NW, 16, RV], gl.float32, MMA2)

        mbarrier.wait(kbar.index(0), 0)
        s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zs, use_acc=False)
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, ACC_S))
        l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, ACC_S))
        if K_EARLY:
            _fetch_one(k_desc, kbar, k_smem, 0, kv_row + STAGES * BLOCK_T, STAGES < n, NBYTES)
        for j in range(0, n - 1):
            st = j % STAGES
            sn = (j + 1) % STAGES
            ph = (j // STAGES) & 1
            mbarrier.wait(kbar.index(sn), ((j + 1) // STAGES) & 1)
            s_tok = warpgroup_mma(q_smem, k_smem.index(sn).permute((1, 0)), zs, use_acc=False, is_async=True)
            p, alpha, m_i, l_i, o, pa = _tile_softmax(s, t_begin + j * BLOCK_T, t_end, qk_scale, R, r_row, kres, MASK,
                                                      s_mb, s_mq, s_mt, row, qs, valid, m_i, l_i, o, BLOCK_T, ACC_S,
                                                      ACC_O, HAS_K, HAS_MASK, dtype)
            mbarrier.wait(vbar.index(st), ph)
            o_tok = warpgroup_mma(pa, v_smem.index(st), o, is_async=True)
            mbarrier.wait(u_ready.index(st), ph)  # the lead's copies of tile j landed
            acc_u = _pu(p, alpha, acc_u, u_smem, st, ACC_S, MMA2, NW, RPW, VPR, BLOCK_T, dtype)
            if not LEAD:  # this head is done with the stage's u_v tiles
                mbarrier.arrive(u_free.index(st), count=1)
            s, o, pa = warpgroup_mma_wait(num_outstanding=0, deps=[s_tok, o_tok, pa])
            if LEAD:  # refill the stage once the worker has read it (each lead warp reads only rows it copied)
                mbarrier.wait(u_free.index(st), ph)
                _fill_u(UV, u_off, u_t, u_smem, u_ready, st, t_begin + (j + STAGES) * BLOCK_T, T, RV)
            _refill(k_desc, v_desc, kbar, vbar, k_smem, v_smem, j, kv_row, n, STAGES, BLOCK_T, NBYTES, K_EARLY)
        p, alpha, m_i, l_i, o, pa = _tile_softmax(s, t_begin + (n - 1) * BLOCK_T, t_end, qk_scale, R, r_row, kres, MASK,
                                                  s_mb, s_mq, s_mt, row, qs, valid, m_i, l_i, o, BLOCK_T, ACC_S,
                                                  ACC_O, HAS_K, HAS_MASK, dtype)
        sp = (n - 1) % STAGES
        mbarrier.wait(vbar.index(sp), ((n - 1) // STAGES) & 1)
        o = warpgroup_mma(pa, v_smem.index(sp), o)
        mbarrier.wait(u_ready.index(sp), ((n - 1) // STAGES) & 1)
        acc_u = _pu(p, alpha, acc_u, u_smem, sp, ACC_S, MMA2, NW, RPW, VPR, BLOCK_T, dtype)
        if LEAD:  # the copies past the split's end, before the program ends
            async_copy.wait_group(0)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(kbar.index(i))
            mbarrier.invalidate(vbar.index(i))

        _store_partials(m_i, l_i, o, acc_u, row, head_s, qs, valid, M_WS, L_WS, ACC_WS, UV_WS, VSLOT, B, NQ,
                        n_splits, mb, hkv, split, HKV, G, D, HALF, HALF_B, VPR, NQG, RV, RVB, True, ACC_O, NW)

    @gluon.jit
    def _cascade_shared_gluon_pair(
        Q, s_qb, s_qh, s_qq,
        k_desc, v_desc, R, KSLOT, UV, VSLOT,
        MASK, s_mb, s_mq, s_mt,
        M_WS, L_WS, ACC_WS, UV_WS,
        B, T, RS, NQ, split_len, n_splits, qk_scale,
        HKV: gl.constexpr, G: gl.constexpr, D: gl.constexpr, HALF: gl.constexpr, HALF_B: gl.constexpr,
        VPR: gl.constexpr, NQG: gl.constexpr, BLOCK_T: gl.constexpr, STAGES: gl.constexpr, RV: gl.constexpr,
        HAS_K: gl.constexpr, HAS_MASK: gl.constexpr, K_EARLY: gl.constexpr, RVB: gl.constexpr,
        WORKER_REGS: gl.constexpr,
    ):
        """The shared part with the V residual of KV heads ``2p``/``2p + 1`` (grid ``(n_mb, HKV // 2, n_splits)``):
        each head's rings and mbarriers, the shared ``u_v`` ring, then the two partitions (:func:`_pair_head`)."""
        NW: gl.constexpr = gl.num_warps()
        BLOCK_M: gl.constexpr = 16 * NW
        NR: gl.constexpr = 16 // VPR * NW
        dtype: gl.constexpr = Q.dtype.element_ty
        SQ: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], dtype)
        kbar0 = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        vbar0 = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        kbar1 = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        vbar1 = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        u_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        u_free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(kbar0.index(i), count=1)
            mbarrier.init(vbar0.index(i), count=1)
            mbarrier.init(kbar1.index(i), count=1)
            mbarrier.init(vbar1.index(i), count=1)
            mbarrier.init(u_ready.index(i), count=32 * NW)  # each lead thread's copies arrive once
            mbarrier.init(u_free.index(i), count=1)  # the worker's arrival
        k_smem0 = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_T, D], k_desc.layout)
        v_smem0 = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_T, D], v_desc.layout)
        k_smem1 = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_T, D], k_desc.layout)
        v_smem1 = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_T, D], v_desc.layout)
        q_smem0 = gl.allocate_shared_memory(dtype, [BLOCK_M, D], SQ)
        q_smem1 = gl.allocate_shared_memory(dtype, [BLOCK_M, D], SQ)
        u_smem = gl.allocate_shared_memory(dtype, [STAGES, NR, BLOCK_T, RV],
                                           gl.NVMMASharedLayout.get_default_for([NR, BLOCK_T, RV], dtype))
        fence_async_shared()
        _cta_barrier()
        # each partition's arguments written out: a tuple built by concatenation loses its constexprs (Triton 3.6)
        gl.warp_specialize([
            (_pair_head, (Q, s_qb, s_qh, s_qq, k_desc, v_desc, R, KSLOT, UV, VSLOT, MASK, s_mb, s_mq, s_mt,
                          M_WS, L_WS, ACC_WS, UV_WS, B, T, RS, NQ, split_len, n_splits, qk_scale,
                          kbar0, vbar0, k_smem0, v_smem0, q_smem0, u_smem, u_ready, u_free,
                          HKV, G, D, HALF, HALF_B, VPR, NQG, BLOCK_T, STAGES, RV, HAS_K, HAS_MASK, K_EARLY, RVB, NW,
                          True)),
            (_pair_head, (Q, s_qb, s_qh, s_qq, k_desc, v_desc, R, KSLOT, UV, VSLOT, MASK, s_mb, s_mq, s_mt,
                          M_WS, L_WS, ACC_WS, UV_WS, B, T, RS, NQ, split_len, n_splits, qk_scale,
                          kbar1, vbar1, k_smem1, v_smem1, q_smem1, u_smem, u_ready, u_free,
                          HKV, G, D, HALF, HALF_B, VPR, NQG, BLOCK_T, STAGES, RV, HAS_K, HAS_MASK, K_EARLY, RVB, NW,
                          False)),
        ], [NW], [WORKER_REGS])


def launch_shared_gluon_pair(q, k_base, v_base, r_scores, k_slot, mask, ws, *, n_mb: int, split_len: int,
                             n_splits: int, qk_scale: float, VPR: int, has_k: bool, block_t: int, num_warps: int,
                             num_stages: int, v_u, v_slot, k_early: bool = True,
                             r_stride: int | None = None):
    """Run :func:`_cascade_shared_gluon_pair` over the grid ``(n_mb, HKV // 2, n_splits)`` into the partials ``ws``;
    arguments as :func:`~.shared_gluon.launch_shared_gluon`'s (a V residual required). Raises :func:`pair_refusal`'s
    error where the kernel cannot take the call."""
    B, H, NQ, D = q.shape
    Hkv, T, _ = k_base.shape
    err = pair_refusal(q, k_base, v_base, v_u, block_t, num_warps, num_stages, VPR)
    if err is not None:
        raise err
    rv = v_u.shape[-1]
    k_desc, v_desc = descriptors(k_base, v_base, block_t)
    ms = mask.stride() if mask is not None else (0, 0, 0)
    return _cascade_shared_gluon_pair[(n_mb, Hkv // 2, n_splits)](
        q, q.stride(0), q.stride(1), q.stride(2), k_desc, v_desc, r_scores, k_slot if has_k else q, v_u, v_slot,
        mask if mask is not None else q, *ms, ws[0], ws[1], ws[2], ws[3],
        B, T, r_stride or T, NQ, split_len, n_splits, qk_scale,
        HKV=Hkv, G=H // Hkv, D=D, HALF=D // 2, HALF_B=D // 2, VPR=VPR, NQG=NQ * (H // Hkv), BLOCK_T=block_t,
        STAGES=num_stages, RV=rv, HAS_K=has_k, HAS_MASK=mask is not None, K_EARLY=bool(k_early), RVB=pow2(rv),
        WORKER_REGS=PAIR_REGS, num_warps=num_warps, maxnreg=PAIR_REGS)
