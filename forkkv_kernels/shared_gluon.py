"""The cascade's shared part (:func:`~.cascade._cascade_shared_kernel`) written in Gluon for Hopper (sm_90), its
softmax under the next tile's score MMA.

Per program (a block of ``BLOCK_M = 16·num_warps`` query vectors of one KV head, one split of the context, the Triton
kernel's grid) the queries go to shared memory once; the split's K and V tiles arrive by TMA into rings of
``STAGES`` buffers, each with its own mbarrier, issued ahead by one thread (no per-thread ``cp.async`` address work).
Per tile ``j``:

1. issue ``S_{j+1} = Q·K_{j+1}ᵀ`` (asynchronous warpgroup MMA, both operands in shared memory);
2. this tile's softmax step (scale, K-residual scores ``R``, masks, running max and sum) and the rescale of ``O``
   while that MMA runs; K's scores loaded here, or (``k_load="ring"``) copied by ``cp.async`` ``STAGES`` tiles
   ahead into a ring beside ``u_v``'s and read from it;
3. issue ``O += P_j·V_j`` (``P`` from registers); with a V residual, under it, ``P_j·u_v`` per vector with its own
   row's ``u_v`` tile (copied by ``cp.async`` into a ring beside K/V's; per warp and row one batched ``mma.sync``,
   the warp's other rows' probabilities zeroed); wait for both, refill the freed buffers (``K_EARLY``: K tile
   ``j + 1``'s, one tile further ahead than V's, which frees only now).

No MMA stays in flight across the loop's back edge (ptxas would serialise every MMA of the kernel: eval/KERNEL_NOTES.md
"v14"). FlashAttention-3's order (the previous tile's ``P·V`` in flight under this tile's softmax) was built and
measured no faster: ptxas moves its second wait above the exponentials (eval/KERNEL_NOTES.md "v21"). Writes the same
unnormalised partials (m, l, acc, acc_uv) as the Triton kernel, so the merge
(:func:`~.merge.launch_private_merge`) is shared. The launcher's rule (:func:`~.cascade.launch_defaults`)
picks it for calls without residuals from 192 query vectors per KV head (measured: eval/KERNEL_NOTES.md "v21
measured", "v23 measured"), for decode calls with the V residual alone from 32 ("v25 measured, v26"), and for decode
calls with both residuals from 32, K's scores through the ring ("v35b measured"; contexts not a multiple of 16 tokens
since "v36 measured").

Same arithmetic as the Triton kernel under the low-precision pass rule: bf16/fp16 operands, fp32 accumulation, the
probabilities rounded to the cache dtype before ``P·V``. Limits (:func:`unsupported` says which one a call breaks): a
CUDA device of compute capability 9.x, bf16/fp16, head dim 64 or 128, a V residual only of rank 8, 16 or 32 with at
most 16 query vectors per row and KV head, 32, 64 or 128 tokens per tile, 4 or 8 warps, 2-6 buffers within
:data:`SMEM_LIMIT`. Gluon has no interpreter: the CPU tests check this module's limits and compile it for sm_90
offline; the kernel itself is checked on the GPU against the exact attention (tests/test_shared_gluon.py).

Imports nothing from ``forkkv_hf``.
"""

from __future__ import annotations

import torch

from .attention_common import pow2
from .gluon_common import HAVE_GLUON, device_unsupported

if HAVE_GLUON:  # with Hopper's TMA
    try:
        from triton.experimental import gluon
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2
        from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                                       warpgroup_mma_wait)
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

        from .gluon_common import acc_layout as _acc_layout
        from .gluon_common import cta_barrier as _cta_barrier
        from .shared_gluon_steps import (_fetch, _fetch_one, _kscores, _queries, _refill, _rows,
                                         _store_partials, _tile_softmax, _u_offsets)
        # the cp.async copy likewise: async_copy_global_to_shared up to 3.6, async_load after
        _cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
    except (ImportError, AttributeError):  # pragma: no cover - a Gluon without these parts
        HAVE_GLUON = False


#: the Gluon shared kernel's launch knobs where a call asks for it (or the rule picks it) and does not give them:
#: 64-token tiles on 4 warps, 3 buffers (115 KB of shared memory, 165 registers: two programs per SM; v21 measured)
GLUON_SHARED_RULE = dict(block_t=64, num_warps=4, num_stages=3, programs_per_sm=2, whole_waves=True)
#: with a V residual (the rule's pick for the V residual alone from 32 query vectors per KV head, v25/v26 measured:
#: eval/KERNEL_NOTES.md): 32-token tiles, so that 16 rows' ``u_v`` tiles fit beside K/V's (115 KB with 3 buffers at
#: rank 16, 183 registers: two programs per SM); 2 buffers below 96 vectors (:func:`rule_for`)
GLUON_SHARED_V_RULE = dict(GLUON_SHARED_RULE, block_t=32)


#: where the kernel reads each tile's K-residual scores (``k_load``): loaded in its softmax, or copied by ``cp.async``
#: ``num_stages`` tiles ahead into a ring beside ``u_v``'s (eval/KERNEL_NOTES.md "v35", "v35b measured"; a tile ahead
#: into registers was measured too, slower than the ring everywhere, and removed)
K_LOADS = ("softmax", "ring")


#: shared memory the kernel may take (queries, the K/V ring, its barriers), bytes: below an H100/H200 SM's 227 KiB
SMEM_LIMIT = 200 * 1024


def rule_for(has_v: bool, d: int = 128, vpr: int = 4, v_rank: int = 16, block_t: int | None = None,
             num_warps: int | None = None, vectors: int | None = None, k_ring: bool = False) -> dict:
    """The Gluon shared kernel's launch knobs where a call does not give them. With a V residual: 2 buffers below 96
    query vectors per KV head (``vectors``; v26, one H100, V only, whole calls in two orders, 3 -> 2 buffers: 8 agents
    74.5-75.0 -> 72.0-72.8 µs, 12 79.9-80.2 -> 78.5, 16 82.4-82.5 -> 81.2-81.4; at 24 91.2-91.3 -> 92.7-93.1, at 32 and
    128 +1-2%: sweep_kernel_v26{ta,tb}, v25{va,vb}_nvidia_h100.json); and as its rows' ``u_v`` tiles grow with the
    rows per program (``16 // vpr`` per warp) and the rank, the buffers drop (down to 2) until they fit beside K/V's
    under :data:`SMEM_LIMIT` (a call that gives ``block_t``/``num_warps`` is fitted under those). With the K residual's
    scores in a ring (``k_ring``): 2 buffers (90 KB with a V residual of rank 16, two programs per SM; 3 buffers take
    127 KB, one program per SM: v35d, one H200, K+V whole calls at 32 / 128 agents 342.7 -> 384.3 / 1,286.0 ->
    1,445.3 µs, sweep_kernel_v35d_nvidia_h200.json)."""
    rule = dict(GLUON_SHARED_V_RULE if has_v else GLUON_SHARED_RULE)
    if (has_v and vectors is not None and vectors < 96) or k_ring:
        rule["num_stages"] = 2
    if has_v and vpr <= 16:
        bt, nw = block_t or rule["block_t"], num_warps or rule["num_warps"]
        while rule["num_stages"] > 2 and shared_bytes(d, bt, nw, rule["num_stages"], vpr, v_rank, k_ring) > SMEM_LIMIT:
            rule["num_stages"] -= 1
    return rule


def shared_bytes(d: int, block_t: int, num_warps: int, stages: int, vpr: int = 4, v_rank: int = 0,
                 k_ring: bool = False) -> int:
    """The kernel's shared memory: the queries' block and ``stages`` K and V tiles (2-byte values), with a V
    residual of rank ``v_rank`` (0: none) ``stages`` tiles of ``u_v`` for each of the program's rows (``16 // vpr``
    per warp at ``vpr`` query vectors per row and KV head), and with the K residual's scores in a ring (``k_ring``)
    ``stages`` tiles of the program's fp16 scores."""
    v_rows = 16 // vpr * num_warps if v_rank else 0
    values = 16 * num_warps * d + 2 * stages * block_t * d + stages * v_rows * block_t * v_rank
    values += stages * 16 * num_warps * block_t if k_ring else 0
    return 2 * values + 16 * stages  # K's and V's 8-byte mbarriers per stage (the u_v ring's copies need none)


def unsupported(device, dtype: torch.dtype, d: int, has_v: bool, block_t: int, num_warps: int,
                stages: int, vpr: int = 4, v_rank: int = 16, k_ring: bool = False) -> str | None:
    """Why the Gluon shared kernel cannot serve a call (queries of ``dtype`` and head dim ``d`` on ``device``, a V
    residual of rank ``v_rank`` or none, ``vpr`` query vectors per row and KV head, ``block_t`` tokens per tile on
    ``num_warps`` warps with ``stages`` buffers, the K residual's scores in a ring or not), or None."""
    device = torch.device(device)
    if dtype not in (torch.bfloat16, torch.float16):
        return f"it takes bf16/fp16 (got {dtype})"
    if d not in (64, 128):
        return f"head dim {d}: 64 or 128"
    if has_v and vpr > 16:
        return f"a V residual with {vpr} query vectors per row and KV head: at most 16 (a warp's rows)"
    if has_v and v_rank not in (8, 16, 32):
        return f"a V residual of rank {v_rank}: 8, 16 or 32 (u_v in 16-byte copies)"
    if block_t not in (32, 64, 128):
        return f"block_t={block_t}: 32, 64 or 128"
    if num_warps not in (4, 8):
        return f"num_warps={num_warps}: 4 (64 query vectors per program) or 8 (128)"
    if not 2 <= stages <= 6:
        return f"num_stages={stages}: 2 to 6 (the K/V ring's buffers)"
    smem = shared_bytes(d, block_t, num_warps, stages, vpr, v_rank if has_v else 0, k_ring)
    if smem > SMEM_LIMIT:
        return f"{smem} bytes of shared memory (at most {SMEM_LIMIT}): fewer stages or a smaller block_t"
    return device_unsupported(device, HAVE_GLUON)


if HAVE_GLUON:
    @gluon.jit
    def _fetch_u(UV, u_off, u_t, u_smem, stage, t, T, RV: gl.constexpr):
        """Issue the ``cp.async`` copies of the program's rows' ``u_v`` tiles (tokens ``t`` on; zeros past ``T``)
        into ``stage`` of their ring, one commit group per tile (``u_off``/``u_t``: each element's offset in ``UV``
        at token 0 and its token within the tile, in the copy's layout). Copied by every thread, not by TMA: each
        row's tile is a TMA copy of its own, and Gluon fences each with a CTA barrier (16 per tile for 16 rows)."""
        _cp_async(u_smem.index(stage), UV + (u_off + t * RV), mask=(t + u_t) < T)
        async_copy.commit_group()

    @gluon.jit
    def _fetch_r(R, r_row, kres, r_smem, stage, t, t_end, RS, BLOCK_T: gl.constexpr, LR: gl.constexpr,
                 R_PAD: gl.constexpr):
        """Issue the ``cp.async`` copies of the program's K-residual scores for the tile of tokens ``t`` on into
        ``stage`` of their ring (``r_row``/``kres``: each vector's score row and whether it has one, in the copy's
        layout ``LR``; zeros for vectors without one and past ``t_end``); committed with the tile's ``u_v`` copies (or
        alone). ``R_PAD`` (a context not a multiple of 16 tokens): bounded by the row's padded length ``RS`` instead,
        a multiple of 16 the compiler knows, which keeps the copies 16 bytes wide (with the context's end as the
        bound they do not compile); the scores past the split's end it then copies the softmax masks."""
        tt = t + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, LR))
        if R_PAD:
            inside = tt < RS
        else:
            inside = tt < t_end
        _cp_async(r_smem.index(stage), R + r_row[:, None] + tt[None, :], mask=kres[:, None] & inside[None, :])

    @gluon.jit
    def _pu(p, alpha, acc_u, u_smem, stage, ACC_S: gl.constexpr, MMA2: gl.constexpr, NW: gl.constexpr,
            RPW: gl.constexpr, VPR: gl.constexpr, BLOCK_T: gl.constexpr, dtype: gl.constexpr):
        """``acc_u = alpha·acc_u + P·u_v`` per query vector with its own row's ``u_v`` tile: warp ``w``'s 16
        vectors hold ``RPW`` rows; for each ``j`` one batched ``mma.sync`` (one batch per warp) multiplies the
        probabilities of the warp's ``j``-th row (the others' zeroed) by that row's tile."""
        # the scores' rows and the products' rows sit in the same lanes: a reshape, no shared memory (v30; a 1D
        # blocked layout in between put a warp's vectors in other warps)
        a3 = gl.convert_layout(gl.reshape(alpha, [NW, 16]), gl.SliceLayout(2, MMA2))
        acc_u = acc_u * a3[:, :, None]
        A_U: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA2, k_width=2)
        a = gl.convert_layout(gl.reshape(p.to(dtype), [NW, 16, BLOCK_T]), A_U)
        li = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, A_U)))  # the vector's place in its warp
        for j in gl.static_range(RPW):
            aj = gl.where((li // VPR == j)[None, :, None], a, gl.zeros_like(a))
            b = u_smem.index(stage).slice(j * NW, NW, dim=0).load(
                gl.DotOperandLayout(operand_index=1, parent=MMA2, k_width=2))
            acc_u = mma_v2(aj, b, acc_u)
        return acc_u

    @gluon.jit
    def _cascade_shared_gluon(
        Q, s_qb, s_qh, s_qq,
        k_desc, v_desc, R, KSLOT, UV, VSLOT,
        MASK, s_mb, s_mq, s_mt,
        M_WS, L_WS, ACC_WS, UV_WS,
        B, T, RS, NQ, split_len, n_splits, qk_scale,
        HKV: gl.constexpr, G: gl.constexpr, D: gl.constexpr, HALF: gl.constexpr, HALF_B: gl.constexpr,
        VPR: gl.constexpr, NQG: gl.constexpr, BLOCK_T: gl.constexpr, STAGES: gl.constexpr, RV: gl.constexpr,
        HAS_K: gl.constexpr, HAS_V: gl.constexpr, HAS_MASK: gl.constexpr, K_EARLY: gl.constexpr,
        Q_REGS: gl.constexpr, RVB: gl.constexpr, K_LOAD: gl.constexpr, R_PAD: gl.constexpr,
    ):
        """The shared context's part of the attention of ``BLOCK_M`` query vectors of one KV head over one split of
        the context, as :func:`~.cascade._cascade_shared_kernel`. ``k_desc``/``v_desc``: TMA descriptors of the
        flattened ``[HKV·T, D]`` base with ``[BLOCK_T, D]`` blocks (rows past a split's end are read and masked; past
        the tensor's end, zeros); ``UV``: the V residual's ``u_v [n, T, RV]``, contiguous (``HAS_V``)."""
        NW: gl.constexpr = gl.num_warps()
        BLOCK_M: gl.constexpr = 16 * NW
        ACC_S: gl.constexpr = _acc_layout(NW, BLOCK_T)  # scores [BLOCK_M, BLOCK_T]
        ACC_O: gl.constexpr = _acc_layout(NW, D)  # output [BLOCK_M, D]
        dtype: gl.constexpr = Q.dtype.element_ty
        SQ: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], dtype)
        NBYTES: gl.constexpr = BLOCK_T * D * 2
        RPW: gl.constexpr = 16 // VPR  # rows per warp (a V residual: VPR <= 16)
        NR: gl.constexpr = RPW * NW  # rows per program (a V residual)
        MMA2: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NW, 1, 1], instr_shape=[1, 16, 8])

        mb = gl.program_id(0)
        hkv = gl.program_id(1)
        split = gl.program_id(2)
        t_begin = split * split_len
        t_end = gl.minimum(T, t_begin + split_len)
        n = gl.cdiv(t_end - t_begin, BLOCK_T)
        kv_row = hkv * T + t_begin

        kbar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        vbar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(kbar.index(i), count=1)
            mbarrier.init(vbar.index(i), count=1)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_T, D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_T, D], v_desc.layout)
        row0 = mb * (BLOCK_M // VPR)  # the program's first row
        if HAS_V:  # each row's u_v tile, ring beside K/V's: [stage, j·NW + w, token, rank] for row row0 + w·RPW + j
            u_smem = gl.allocate_shared_memory(dtype, [STAGES, NR, BLOCK_T, RV],
                                               gl.NVMMASharedLayout.get_default_for([NR, BLOCK_T, RV], dtype))
            u_off, u_t = _u_offsets(VSLOT, row0, B, T, NW, RPW, BLOCK_T, RV)
        KR: gl.constexpr = HAS_K and K_LOAD == 1  # K's scores in a ring beside u_v's, STAGES tiles ahead
        COPIES: gl.constexpr = HAS_V or KR  # cp.async copies, one commit group per tile
        if KR:
            LR: gl.constexpr = gl.BlockedLayout([1, 8], [256 // BLOCK_T, BLOCK_T // 8], [NW, 1], [1, 0])
            r_smem = gl.allocate_shared_memory(R.dtype.element_ty, [STAGES, BLOCK_M, BLOCK_T],
                                               gl.SwizzledSharedLayout(8, 1, BLOCK_T // 8, [1, 0]))
            _r0, _r1, _r2, _r3, r_row_c, kres_c = _rows(mb, B, RS, hkv, KSLOT, BLOCK_M, VPR, NQG, G, HAS_K, LR)
        fence_async_shared()
        _cta_barrier()
        for i in gl.static_range(STAGES):
            _fetch(k_desc, v_desc, kbar, vbar, k_smem, v_smem, i, kv_row + i * BLOCK_T, i < n, NBYTES)
            if KR:
                _fetch_r(R, r_row_c, kres_c, r_smem, i, t_begin + i * BLOCK_T, t_end, RS, BLOCK_T, LR, R_PAD)
            if HAS_V:
                _fetch_u(UV, u_off, u_t, u_smem, i, t_begin + i * BLOCK_T, T, RV)
            elif KR:
                async_copy.commit_group()

        q = _queries(Q, s_qb, s_qh, s_qq, mb, B, hkv, VPR, NQG, G, D, NW)
        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, D], SQ, q)
        fence_async_shared()
        _cta_barrier()
        if Q_REGS:  # the score MMAs' left operand from registers: half their shared-memory reads
            qa = q_smem.load(gl.DotOperandLayout(operand_index=0, parent=ACC_S, k_width=2))
        else:
            qa = q_smem

        row, qs, head_s, valid, r_row, kres = _rows(mb, B, RS, hkv, KSLOT, BLOCK_M, VPR, NQG, G, HAS_K, ACC_S)
        # zeros the compiler cannot see as such: the score MMAs start from defined accumulator registers (with an
        # undefined start ptxas serialises every MMA of the kernel, its report C7514)
        zs = gl.zeros([BLOCK_M, BLOCK_T], gl.float32, ACC_S) * qk_scale
        o = gl.zeros([BLOCK_M, D], gl.float32, ACC_O)
        acc_u = gl.zeros([NW, 16, RV], gl.float32, MMA2)  # P·u_v per vector (HAS_V)

        mbarrier.wait(kbar.index(0), 0)
        s = warpgroup_mma(qa, k_smem.index(0).permute((1, 0)), zs, use_acc=False)
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, ACC_S))
        l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, ACC_S))
        # the next tile's scores issued before this tile's softmax: the softmax and the rescale run under that MMA
        # (the P·V needs their result, so the compiler cannot move them past the wait)
        if K_EARLY:  # tile 0's K stage is free now: K runs one tile further ahead than V
            _fetch_one(k_desc, kbar, k_smem, 0, kv_row + STAGES * BLOCK_T, STAGES < n, NBYTES)
        # rk: K's scores from the ring where KR, else unused (loaded in the softmax, if any); a placeholder carried
        # through the loop as in the form measured (eval/KERNEL_NOTES.md "v35b measured": without it ptxas gives the
        # ring's loop 206 registers and 530 instructions instead of 174 and 516)
        rk = _kscores(R, r_row, kres, t_begin, t_end, BLOCK_T, ACC_S, False)
        for j in range(0, n - 1):
            st = j % STAGES
            sn = (j + 1) % STAGES
            rk_next = _kscores(R, r_row, kres, t_begin + (j + 1) * BLOCK_T, t_end, BLOCK_T, ACC_S, False)
            mbarrier.wait(kbar.index(sn), ((j + 1) // STAGES) & 1)
            s_tok = warpgroup_mma(qa, k_smem.index(sn).permute((1, 0)), zs, use_acc=False, is_async=True)
            if KR:  # tile j's copies done (the later STAGES - 1 may still run): its K scores from the ring
                async_copy.wait_group(STAGES - 1)
                _cta_barrier()
                rk = r_smem.index(st).load(ACC_S)
            p, alpha, m_i, l_i, o, pa = _tile_softmax(s, t_begin + j * BLOCK_T, t_end, qk_scale, R, r_row, kres, MASK,
                                                      s_mb, s_mq, s_mt, row, qs, valid, m_i, l_i, o, BLOCK_T, ACC_S,
                                                      ACC_O, HAS_K, HAS_MASK, dtype, rk, KR)
            rk = rk_next
            mbarrier.wait(vbar.index(st), (j // STAGES) & 1)
            o_tok = warpgroup_mma(pa, v_smem.index(st), o, is_async=True)
            if HAS_V:  # under the two warpgroup MMAs: tile j's group done (the later STAGES - 1 may still run)
                if not KR:
                    async_copy.wait_group(STAGES - 1)
                    _cta_barrier()
                acc_u = _pu(p, alpha, acc_u, u_smem, st, ACC_S, MMA2, NW, RPW, VPR, BLOCK_T, dtype)
            s, o, pa = warpgroup_mma_wait(num_outstanding=0, deps=[s_tok, o_tok, pa])
            if KR:  # the stages tile j's copies filled are free (tiles past the split's end copy zeros)
                _fetch_r(R, r_row_c, kres_c, r_smem, st, t_begin + (j + STAGES) * BLOCK_T, t_end, RS, BLOCK_T,
                         LR, R_PAD)
            if HAS_V:  # u_v tile j's stage is free (a tile past the split's end copies tokens it never uses)
                _fetch_u(UV, u_off, u_t, u_smem, st, t_begin + (j + STAGES) * BLOCK_T, T, RV)
            elif KR:
                async_copy.commit_group()
            _refill(k_desc, v_desc, kbar, vbar, k_smem, v_smem, j, kv_row, n, STAGES, BLOCK_T, NBYTES, K_EARLY)
        sp = (n - 1) % STAGES
        if KR:
            async_copy.wait_group(STAGES - 1)
            _cta_barrier()
            rk = r_smem.index(sp).load(ACC_S)
        p, alpha, m_i, l_i, o, pa = _tile_softmax(s, t_begin + (n - 1) * BLOCK_T, t_end, qk_scale, R, r_row, kres, MASK,
                                                  s_mb, s_mq, s_mt, row, qs, valid, m_i, l_i, o, BLOCK_T, ACC_S,
                                                  ACC_O, HAS_K, HAS_MASK, dtype, rk, KR)
        mbarrier.wait(vbar.index(sp), ((n - 1) // STAGES) & 1)
        o = warpgroup_mma(pa, v_smem.index(sp), o)
        if HAS_V:
            if not KR:
                async_copy.wait_group(STAGES - 1)
                _cta_barrier()
            acc_u = _pu(p, alpha, acc_u, u_smem, sp, ACC_S, MMA2, NW, RPW, VPR, BLOCK_T, dtype)
        if COPIES:
            async_copy.wait_group(0)  # the copies past the split's end, before the program ends
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(kbar.index(i))
            mbarrier.invalidate(vbar.index(i))

        _store_partials(m_i, l_i, o, acc_u, row, head_s, qs, valid, M_WS, L_WS, ACC_WS, UV_WS, VSLOT, B, NQ,
                        n_splits, mb, hkv, split, HKV, G, D, HALF, HALF_B, VPR, NQG, RV, RVB, HAS_V, ACC_O, NW)


def _gl_dtype(dtype: torch.dtype):
    return gl.bfloat16 if dtype == torch.bfloat16 else gl.float16


def descriptors(k_base: torch.Tensor, v_base: torch.Tensor, block_t: int):
    """TMA descriptors of the base K/V ``[HKV, T, D]`` (contiguous) as ``[HKV·T, D]`` in ``block_t``-row blocks."""
    hkv, t, d = k_base.shape
    layout = gl.NVMMASharedLayout.get_default_for([block_t, d], _gl_dtype(k_base.dtype))
    return tuple(TensorDescriptor.from_tensor(x.view(hkv * t, d), [block_t, d], layout) for x in (k_base, v_base))


def ring_unsupported(r_stride: int, r_dtype: torch.dtype) -> str | None:
    """Why the K residual's scores cannot go through the ring (``k_load="ring"``) with score rows ``r_stride`` apart
    in ``r_dtype``, or None: its 16-byte copies need fp16 scores and every score row 16-byte aligned, which the
    compiler knows only of a stride that is a multiple of 16 (Triton specialises an integer argument on 16; the
    launcher pads the rows to 16 tokens)."""
    if r_dtype != torch.float16:
        return f"the K residual's scores in {r_dtype} (the ring copies fp16 scores)"
    if r_stride % 16:
        return f"score rows {r_stride} tokens apart (the ring's 16-byte copies need a multiple of 16)"
    return None


def refusal(q, k_base, v_base, v_u, block_t: int, num_warps: int, num_stages: int, vpr: int,
            k_ring: bool = False, r_dtype: torch.dtype = torch.float16,
            r_stride: int | None = None) -> Exception | None:
    """The error, saying what to do, that a launch of this call (queries ``q``, base ``k_base``/``v_base``, the V
    residual's ``u_v`` or None, these knobs) would raise, or None where the kernel can take it: ``u_v`` in another
    dtype than the queries (copied raw into a ring of theirs), a limit of :func:`unsupported`, tensors without a
    16-byte aligned start (TMA and the 16-byte copies need one), and with the K residual's scores in a ring
    (``k_ring``, scores in ``r_dtype``, rows ``r_stride`` apart, default the context's length)
    :func:`ring_unsupported`'s limits. The launcher's rule takes the Triton kernel instead wherever this is not
    None."""
    has_v = v_u is not None
    if has_v and v_u.dtype != q.dtype:
        return TypeError(f"shared_form='gluon' copies u_v into shared memory as the queries' {q.dtype}, but u_v is "
                         f"{v_u.dtype}: pass it in {q.dtype} or use shared_form='triton'")
    why = unsupported(q.device, q.dtype, q.shape[-1], has_v, block_t, num_warps, num_stages, vpr,
                      v_u.shape[-1] if has_v else 16, k_ring)
    if why:
        return ValueError(f"shared_form='gluon' cannot serve this call: {why}; use shared_form='triton'")
    why = ring_unsupported(r_stride or k_base.shape[1], r_dtype) if k_ring else None
    if why:
        return ValueError(f"shared_k_load='ring' cannot serve this call: {why}; use shared_k_load='softmax'")
    if k_base.data_ptr() % 16 or v_base.data_ptr() % 16 or (has_v and v_u.data_ptr() % 16):
        return ValueError("shared_form='gluon' reads the base K/V by TMA and u_v in 16-byte copies, which need them "
                          "16-byte aligned: pass tensors with an aligned start or use shared_form='triton'")
    return None


def launch_shared_gluon(q, k_base, v_base, r_scores, k_slot, mask, ws, *, n_mb: int, split_len: int, n_splits: int,
                        qk_scale: float, VPR: int, has_k: bool, block_t: int, num_warps: int, num_stages: int,
                        k_early: bool = True, q_regs: bool = False, k_load: str = "softmax", v_u=None, v_slot=None,
                        r_stride: int | None = None):
    """Run :func:`_cascade_shared_gluon` over the grid ``(n_mb, HKV, n_splits)`` into the partials ``ws = (m, l,
    acc, acc_uv)``; arguments as the Triton shared kernel's launch in :func:`~.cascade._cascade_attention`
    (``k_early``: K tiles refilled as soon as they free; ``q_regs``: the score MMAs' queries from registers, not
    shared memory; ``k_load``: where each tile's K-residual scores are read (:data:`K_LOADS`: ``"softmax"``
    loaded in its softmax, ``"ring"`` by ``cp.async`` into a ring of ``num_stages`` buffers beside ``u_v``'s,
    within :func:`ring_unsupported`'s limits); ``v_u``/``v_slot``: the V residual's ``u_v [n, T, RV]`` and the
    rows' slots, int32; ``r_stride``: how far apart ``r_scores``' rows are, default ``T``). Raises
    :func:`refusal`'s error where the kernel cannot take the call."""
    B, H, NQ, D = q.shape
    Hkv, T, _ = k_base.shape
    has_v = v_u is not None
    rv = v_u.shape[-1] if has_v else 16
    if k_load not in K_LOADS:
        raise ValueError(f"k_load={k_load!r}; use one of {K_LOADS}")
    err = refusal(q, k_base, v_base, v_u, block_t, num_warps, num_stages, VPR, has_k and k_load == "ring",
                  r_scores.dtype, r_stride)
    if err is not None:
        raise err
    k_desc, v_desc = descriptors(k_base, v_base, block_t)
    ms = mask.stride() if mask is not None else (0, 0, 0)
    return _cascade_shared_gluon[(n_mb, Hkv, n_splits)](
        q, q.stride(0), q.stride(1), q.stride(2), k_desc, v_desc, r_scores, k_slot if has_k else q,
        v_u if has_v else q, v_slot if has_v else q,
        mask if mask is not None else q, *ms, ws[0], ws[1], ws[2], ws[3],
        B, T, r_stride or T, NQ, split_len, n_splits, qk_scale,
        HKV=Hkv, G=H // Hkv, D=D, HALF=D // 2, HALF_B=D // 2, VPR=VPR, NQG=NQ * (H // Hkv), BLOCK_T=block_t,
        STAGES=num_stages, RV=rv, HAS_K=has_k, HAS_V=has_v, HAS_MASK=mask is not None, K_EARLY=bool(k_early),
        Q_REGS=bool(q_regs), RVB=pow2(rv), K_LOAD=K_LOADS.index(k_load),
        R_PAD=has_k and k_load == "ring" and T % 16 != 0, num_warps=num_warps)
