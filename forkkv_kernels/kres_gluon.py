"""The K pass (:mod:`.kres_pass`) written in Gluon for Hopper (sm_90): the same scores as the Triton kernel's joined
form, with its operands placed by hand.

Per program (one agent, one split of the context, one chunk of its query vectors) the agent's ``B_k`` and its query
vectors of every KV head go to shared memory once, before the loop over the context (the Triton kernel loads and
stages both again for every tile and head). Per tile of ``BLOCK_T`` tokens the ``u`` tile goes to shared memory and
the cos/sin of the lo half's frequencies to registers, converted once per tile into the layout of a rebuilt tile's
halves (with ``res_f16`` both loaded a tile ahead); then for each KV head (or pair of heads, ``res_step_heads``), in a
loop: the rebuild ``X = u @ B_k`` (one warpgroup MMA of width D, split into its halves in registers: in the MMA's
layout a thread holds column ``j`` and ``j + D/2`` alike), the rotate-half RoPE on CUDA cores in the cache dtype, the
scores ``X_rot @ Q`` with the rotated halves as register
operands (``res_score="mma_sync"``: ``mma.sync`` over each half, 8 columns, enough for a decode row's G = 4 query
vectors where the warpgroup MMA pads them to 16; ``"mma"``: the warpgroup MMA over the joined tile), scaled, converted
(fp16: one saturating conversion per 2) and stored from the accumulator's layout (no shared memory, no CTA barrier
per head).

What ptxas does with it decided its shape (eval/KERNEL_NOTES.md "v14"): the heads unrolled, or a rebuild issued for the
next head before this one's rotation (an MMA in flight across the loop's back edge), and ptxas serialises every MMA
of the kernel (its reports C7514 / C7515); one head per loop step with each MMA waited for before its result is read
compiles without them. Measured: v14 (synchronous tile loads, fp32 rebuild) lost to the Triton rule by ~20-30% on an
H200; v36 (the loads of ``res_f16`` a tile ahead, fp16 rebuild) on an H100 level with it; v36b (its stores without
shared memory, two score chains) on an H100, whole K+V calls at 32K: -3.6 / -4.4% at 128 agents in two orders, level
at 32, +5% at 8 (eval/KERNEL_NOTES.md "v36b measured"); v37: -6.1 / -6.4% at 96 agents, -2.6 / -1.5% at 64; v39 (the
MMAs from plain zeros, 7 instructions per head fewer): -2.1 to -9.0% from 16 to 128 agents, level at 12, +3% at 8, so
the launch rule takes it (fp16 rebuild) for K+V decode calls from :data:`~.rules.GLUON_K_FROM` query vectors per KV
head (16 agents), where :func:`refusal` lets it.

Same arithmetic as the joined form with the rotation in the cache dtype (``lowp_rope``): fp32 accumulation (or fp16
with ``res_f16``), the rebuilt halves rounded to bf16/fp16, the rotation in packed bf16/fp16, fp32 score
accumulation. Limits (:func:`unsupported` says which one a call breaks): a CUDA device of compute capability 9.x,
bf16/fp16, ``D/2`` a power of two from 16 to 128, rank at most 64, score tiles of 8 (16) to 64 columns, 64 or 128
tokens per tile (4 or 8 warps), the staged operands within :data:`SMEM_LIMIT`, one KV head's scores within int32
offsets. Gluon has no interpreter: the CPU tests run the Triton kernel and this module's checks; the kernel itself is
checked on the GPU against the exact attention (tests/test_kres_gluon.py).

Imports nothing from ``forkkv_hf``.
"""

from __future__ import annotations

import torch

from .attention_common import cdiv, pow2, split_length
from .gluon_common import device_unsupported
from .kres_gluon_parts import HAVE_GLUON

if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, warpgroup_mma,
                                                                   warpgroup_mma_wait)

    from .gluon_common import acc_layout as _acc_layout
    from .gluon_common import cta_barrier as _cta_barrier
    from .kres_gluon_parts import (_agent_program, _halves, _head_scores, _joined, _rotated, _score_addresses,
                                   _stage_agent, _store_head, _tile_loads, _tile_offsets, _tile_rope)
    from .kres_gluon_sync import _kres_scores_gluon_sync


#: the Gluon K pass's launch knobs where a call asks for the form and does not give them (tiles of 64 tokens on 4
#: warps: 148 registers with the fp16 rebuild, v39; 3 programs per SM; one wave of them)
GLUON_RULE = dict(res_form="gluon", res_block_t=64, res_warps=4, res_stages=1, res_maxnreg=None, res_programs_per_sm=3,
                  res_whole_waves=True, res_pack=1, res_satfinite=True, res_score="mma_sync")
#: how many query vectors one score tile may hold (its columns), by the score step: mma.sync takes 8 columns and up,
#: the warpgroup MMA 16
SCORE_COLUMNS = {"mma_sync": (8, 16, 32, 64), "mma": (16, 32, 64)}
#: shared memory the kernel may take (the agent's B_k and queries of every KV head, the u tile, the store's
#: conversion), bytes: below an H100/H200 SM's 227 KiB
SMEM_LIMIT = 200 * 1024


def score_columns(vectors: int, res_score: str) -> int:
    """The score tile's width for an agent's ``vectors`` (its rows' query vectors of one KV head): the narrowest the
    score step takes that holds them (at most 64; chunks of the rows beyond)."""
    narrowest = SCORE_COLUMNS[res_score][0]
    return max(narrowest, min(64, pow2(vectors, narrowest)))


def shared_bytes(hkv: int, d: int, rank: int, mq: int, block_t: int) -> int:
    """The kernel's shared memory: ``B_k`` and the queries of every KV head, the u tile, and a score tile's fp32 bytes
    for the layout conversions' scratch."""
    rkb = max(16, pow2(rank))
    return 2 * (hkv * rkb * d + hkv * d * mq + block_t * rkb) + 4 * block_t * mq


def unsupported(device, dtype: torch.dtype, d: int, hkv: int, rank: int, vpr: int, mq: int, block_t: int,
                res_score: str) -> str | None:
    """Why the Gluon K pass cannot serve a call (queries of ``dtype`` and head dim ``d`` on ``device``, ``hkv`` KV
    heads, K rank ``rank``, ``vpr`` query vectors per row and KV head, ``mq`` score columns, ``block_t`` tokens per
    tile), or None: see the module's limits."""
    half = d // 2
    device = torch.device(device)
    if dtype not in (torch.bfloat16, torch.float16):
        return f"it takes bf16/fp16 (got {dtype})"
    if not (16 <= half <= 128 and half == pow2(half)):
        return f"head dim {d}: D/2 must be a power of two from 16 to 128"
    if not 1 <= rank <= 64:
        return f"K rank {rank}: at most 64"
    if res_score not in SCORE_COLUMNS:
        return f"res_score={res_score!r}: use one of {tuple(SCORE_COLUMNS)}"
    if mq not in SCORE_COLUMNS[res_score] or mq < vpr:
        return (f"mq={mq}: one of {SCORE_COLUMNS[res_score]} with res_score={res_score!r}, at least a row's {vpr} "
                "query vectors")
    if block_t not in (64, 128):
        return f"res_block_t={block_t}: 64 (4 warps) or 128 (8 warps)"
    smem = shared_bytes(hkv, d, rank, mq, block_t)
    if smem > SMEM_LIMIT:
        return (f"{smem} bytes of shared memory (at most {SMEM_LIMIT}) for {hkv} KV heads of dim {d} at rank {rank}, "
                f"mq={mq}")
    return device_unsupported(device, HAVE_GLUON)


if HAVE_GLUON:
    @gluon.jit
    def _kres_scores_gluon(
        Q, s_qb, s_qh, s_qq,
        UK, BK, COS, SIN, KSLOT, ORDER, R,
        B, T, RS, RK, split_len, qk_scale,
        HKV: gl.constexpr, G: gl.constexpr, HALF: gl.constexpr, RKB: gl.constexpr, VPR: gl.constexpr,
        NQG: gl.constexpr, MQ: gl.constexpr, BLOCK_T: gl.constexpr, ROPE_HALF: gl.constexpr, SATF: gl.constexpr,
        SYNC_SCORE: gl.constexpr, F16: gl.constexpr, HP: gl.constexpr, RT_ZEROS: gl.constexpr,
    ):
        """``R[h, row·VPR + w, t] = qk_scale · q[row, h·G + w%G, w//G] · RoPE_t(B_k[slot] u_k[slot, t])_h``, as
        :func:`~.kres_pass._kres_scores_kernel` with every KV head in one program (no packs). Grid: sorted position x
        split of the context x chunk of ``MQ // VPR`` of the agent's rows."""
        NW: gl.constexpr = gl.num_warps()
        D: gl.constexpr = 2 * HALF
        ACC_X: gl.constexpr = _acc_layout(NW, D)  # a rebuilt head [BLOCK_T, D]
        if SYNC_SCORE:  # the scores by mma.sync (synchronous, 8 columns at least)
            ACC_S: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NW, 1], instr_shape=[16, 8])
        else:
            ACC_S: gl.constexpr = _acc_layout(NW, MQ)  # a score tile [BLOCK_T, MQ]
        B_Q: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=ACC_S, k_width=2)
        A_K: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ACC_S, k_width=2)
        SU: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_T, RKB], gl.bfloat16)

        split = gl.program_id(1)
        slot, first, active = _agent_program(KSLOT, ORDER, B, MQ, VPR)
        if active:
            dtype: gl.constexpr = Q.dtype.element_ty
            b_smem, q_smem = _stage_agent(Q, s_qb, s_qh, s_qq, BK, KSLOT, ORDER, B, RK, slot, first, dtype, HKV, G, D,
                                          RKB, MQ, VPR, NQG)
            r_off, head_stride, ts, ok = _score_addresses(first, slot, KSLOT, ORDER, B, RS, MQ, VPR, NQG, BLOCK_T,
                                                          ACC_S)
            u_base = UK + slot.to(gl.int64) * T * RK
            u_smem = gl.allocate_shared_memory(dtype, [BLOCK_T, RKB], SU)
            tu, ku, tc, dc = _tile_offsets(BLOCK_T, RKB, HALF)
            # the MMAs' zero accumulators: plain zeros (the score chains start from RZ, v39: offline 118 instructions
            # per head and 148 registers instead of 125 and 166, the same results bit for bit), or with RT_ZEROS
            # zeros the compiler cannot see as such (0 · qk_scale, v36b's form: the chains' start copied into four
            # registers at every head; the rebuild's use_acc=False ignores its accumulator either way)
            zx = gl.zeros([BLOCK_T, D], gl.float16 if F16 else gl.float32, ACC_X)  # F16: the rebuild in fp16
            zs = gl.zeros([BLOCK_T, MQ], gl.float32, ACC_S)
            if RT_ZEROS:
                zs = zs * qk_scale
                if F16:
                    zx = (gl.zeros([BLOCK_T, D], gl.float32, ACC_X) * qk_scale).to(gl.float16)
            # the layout of a rebuilt tile's halves (in the MMA's layout a thread holds column j and j + HALF alike:
            # the split moves no data); the tile's cos/sin are converted into it once per tile, for all its heads
            probe, probe_hi = _halves(zx, BLOCK_T, HALF)
            t_begin = split * split_len
            t_end = gl.minimum(T, t_begin + split_len)
            # the u tile and the cos/sin of the lo half's frequencies (the fp16 form) loaded one tile ahead into
            # registers: a tile's heads of work lie between a load and its use (v14 waited on them at once; v36)
            u_n, c_n, s_n, ch_n, sh_n = _tile_loads(u_base, COS, SIN, t_begin, t_end, RK, tu, ku, tc, dc, D, HALF,
                                                    ROPE_HALF)
            for t0 in range(t_begin, t_end, BLOCK_T):
                r_mask = ((t0 + ts) < t_end)[:, None] & ok[None, :]
                if F16:
                    u, c, sn, ch, sh = u_n, c_n, s_n, ch_n, sh_n
                    u_n, c_n, s_n, ch_n, sh_n = _tile_loads(u_base, COS, SIN, t0 + BLOCK_T, t_end, RK, tu, ku, tc, dc,
                                                            D, HALF, ROPE_HALF)
                else:  # (with the fp32 rebuild the registers held ahead cost more than they hide: 194 registers and
                    # a loop of 255 instructions instead of 143 and 161 offline)
                    u, c, sn, ch, sh = _tile_loads(u_base, COS, SIN, t0, t_end, RK, tu, ku, tc, dc, D, HALF, ROPE_HALF)
                _cta_barrier()  # the previous tile's rebuild MMAs are done (waited): its u tile can go
                u_smem.store(u.to(dtype))
                fence_async_shared()
                _cta_barrier()
                c_lo, s_lo, c_hi, s_hi = _tile_rope(c, sn, ch, sh, probe, dtype, ROPE_HALF)
                # one head at a time, in a loop: unrolled, ptxas serialises every MMA of the kernel (its report
                # C7514), and a rebuild issued for the next head before this one's rotation (an MMA in flight across
                # the loop's back edge) gets them serialised too (C7515)
                for hp in range(HKV // HP):
                    h = hp * HP
                    if HP == 2:  # two heads per step: their rebuilds issued together, their rotations and score
                        # chains side by side (independent instructions for the scheduler; v36c)
                        x0, x1 = warpgroup_mma_wait(num_outstanding=0, deps=[
                            warpgroup_mma(u_smem, b_smem.index(h), zx, use_acc=False, is_async=True),
                            warpgroup_mma(u_smem, b_smem.index(h + 1), zx, use_acc=False, is_async=True)])
                        s0 = _head_scores(x0, q_smem.index(h), c_lo, s_lo, c_hi, s_hi, zs, dtype, A_K, B_Q, BLOCK_T,
                                          HALF, MQ)
                        s1 = _head_scores(x1, q_smem.index(h + 1), c_lo, s_lo, c_hi, s_hi, zs, dtype, A_K, B_Q,
                                          BLOCK_T, HALF, MQ)
                        _store_head(s0, R, h, t0, head_stride, r_off, r_mask, qk_scale, SATF)
                        _store_head(s1, R, h + 1, t0, head_stride, r_off, r_mask, qk_scale, SATF)
                    else:
                        x = warpgroup_mma_wait(num_outstanding=0, deps=[
                            warpgroup_mma(u_smem, b_smem.index(h), zx, use_acc=False, is_async=True)])
                        if SYNC_SCORE:
                            s = _head_scores(x, q_smem.index(h), c_lo, s_lo, c_hi, s_hi, zs, dtype, A_K, B_Q, BLOCK_T,
                                             HALF, MQ)
                        else:  # the warpgroup MMA over the joined rotated tile
                            k_lo, k_hi = _rotated(x, c_lo, s_lo, c_hi, s_hi, dtype, BLOCK_T, HALF)
                            k = gl.convert_layout(_joined(k_lo, k_hi, BLOCK_T, D), A_K)
                            s, k = warpgroup_mma_wait(num_outstanding=0, deps=[
                                warpgroup_mma(k, q_smem.index(h), zs, is_async=True), k])
                        _store_head(s, R, h, t0, head_stride, r_off, r_mask, qk_scale, SATF)


def refusal(q, k_u, k_B, *, VPR: int, k_max_rows: int | None = None, r_stride: int | None = None, lowp: bool = True,
            res_block_t: int | None = None, res_score: str = "mma_sync", mq: int | None = None,
            res_step_heads: int = 1) -> ValueError | None:
    """The error, saying what to do, that :func:`launch_kres_scores_gluon` would raise for this call (queries ``q``,
    the K residual's ``k_u``/``k_B``, these arguments as the launcher's), or None where the kernel can take it: a
    limit of :func:`unsupported`, one KV head's scores beyond int32 offsets, the rotation not in the cache dtype, a
    head pair the call cannot take. The launch rule (:func:`~.rules.launch_defaults`) takes the Triton K pass
    wherever this is not None."""
    B, H, NQ, D = q.shape
    Hkv, T, rank = k_B.shape[1] // D, k_u.shape[1], k_u.shape[-1]
    block_t = res_block_t or 64
    rows_max = max(1, k_max_rows or B)
    MQ = mq or score_columns(rows_max * VPR, res_score if res_score in SCORE_COLUMNS else "mma")
    why = unsupported(q.device, q.dtype, D, Hkv, rank, VPR, MQ, block_t, res_score)
    if not why and B * VPR * (r_stride or T) >= 2**31:  # the kernel's int32 offsets within one KV head's scores
        why = f"{B} rows' scores of {T} tokens exceed its int32 offsets"
    if why:
        return ValueError(f"res_form='gluon' cannot serve this call: {why}; use res_form='joined' (the Triton K pass)")
    if not lowp:
        return ValueError("res_form='gluon' rotates the K residual in the cache dtype: leave lowp_rope on (None or "
                          "True) or use res_form='joined'")
    if res_step_heads not in (1, 2) or (res_step_heads == 2 and (res_score != "mma_sync" or Hkv % 2)):
        return ValueError(f"res_step_heads={res_step_heads}: 1, or 2 with res_score='mma_sync' and an even number of "
                          f"KV heads (got {res_score!r}, {Hkv} KV heads)")
    return None


def launch_kres_scores_gluon(q, k_u, k_B, cos, sin, k_slot, k_order, r_scores, qk_scale: float, *, VPR: int,
                             rope_half: bool, sms: int, k_agents: int | None, k_max_rows: int | None,
                             lowp: bool = True, res_block_t: int | None = None, res_programs_per_sm: int = 3,
                             res_splits: int | None = None, mq: int | None = None, whole_waves: bool = False,
                             res_satfinite: bool = True, res_score: str = "mma_sync", res_maxnreg: int | None = None,
                             r_stride: int | None = None, res_f16: bool = False, res_step_heads: int = 1,
                             res_runtime_zeros: bool = False, res_rebuild: str = "wgmma"):
    """Run :func:`_kres_scores_gluon` into ``r_scores [H_kv, B·VPR, T]`` (rows ``r_stride`` apart); arguments as
    :func:`~.kres_pass.launch_kres_scores`: ``res_block_t`` 64 (4 warps, the default) or 128 (8 warps),
    ``res_score`` ``"mma_sync"`` (the default) or ``"mma"`` (the warpgroup MMA), ``mq`` default the narrowest score
    tile that holds an agent's vectors, ``lowp`` must be on (the rotation in the cache dtype); ``res_f16`` the
    rebuild accumulated in fp16, the rotation and the score operands in fp16 (as the Triton joined form's, with its
    range condition :func:`~.kres_pass.f16_range_ok`): ``q`` and ``k_B`` arrive in fp16, the queries scaled as
    :func:`~.kres_pass.f16_queries` does (the caller converts them); ``res_step_heads`` KV heads per step of the
    head loop (1, or 2 with ``mma.sync`` scores and an even head count: their rebuilds issued together, their
    rotations and score chains side by side); ``res_runtime_zeros`` the MMAs' zero accumulators as v36b had them
    (``0 · qk_scale``, unseen by the compiler: 6-8 more instructions per head, the same results; v39's A/B knob);
    ``res_rebuild`` ``"wgmma"`` (the warpgroup MMA, the default) or ``"mma_sync"`` (:mod:`.kres_gluon_sync`: the fp16
    form with ``mma.sync`` scores, one head per step, the heads' rebuilds and rotations interleaved).
    Raises ``ValueError`` where :func:`refusal` says why it cannot."""
    B, H, NQ, D = q.shape
    Hkv, T, rank = k_B.shape[1] // D, k_u.shape[1], k_u.shape[-1]
    block_t = res_block_t or 64
    rows_max = max(1, k_max_rows or B)
    MQ = mq or score_columns(rows_max * VPR, res_score if res_score in SCORE_COLUMNS else "mma")
    if res_rebuild not in ("wgmma", "mma_sync") or res_rebuild == "mma_sync" and (
            not res_f16 or res_score != "mma_sync" or res_step_heads != 1 or res_runtime_zeros):
        raise ValueError(f"res_rebuild={res_rebuild!r}: 'wgmma', or 'mma_sync' with res_f16=True, "
                         "res_score='mma_sync', one head per step and plain zeros")
    err = refusal(q, k_u, k_B, VPR=VPR, k_max_rows=k_max_rows, r_stride=r_stride, lowp=lowp, res_block_t=block_t,
                  res_score=res_score, mq=MQ, res_step_heads=res_step_heads)
    if err is not None:
        raise err
    if res_f16 and (q.dtype != torch.float16 or k_B.dtype != torch.float16):
        raise ValueError("res_f16: the queries and k_B arrive in fp16 (kres_pass.launch_kres_scores converts them)")
    n_chunks = cdiv(rows_max, MQ // VPR)
    n_act = max(1, k_agents or B) * n_chunks
    split_len = split_length(T, block_t, n_act, res_programs_per_sm * sms, res_splits, whole_waves)
    opts = {} if res_maxnreg is None else {"maxnreg": res_maxnreg}
    if res_rebuild == "mma_sync":
        return _kres_scores_gluon_sync[(B, cdiv(T, split_len), n_chunks)](
            q, q.stride(0), q.stride(1), q.stride(2), k_u, k_B, cos, sin, k_slot, k_order, r_scores,
            B, T, r_stride or T, rank, split_len, qk_scale,
            HKV=Hkv, G=H // Hkv, HALF=D // 2, RKB=max(16, pow2(rank)), VPR=VPR, NQG=NQ * (H // Hkv), MQ=MQ,
            BLOCK_T=block_t, ROPE_HALF=rope_half, SATF=bool(res_satfinite) and r_scores.dtype == torch.float16,
            num_warps=block_t // 16, **opts)
    return _kres_scores_gluon[(B, cdiv(T, split_len), n_chunks)](
        q, q.stride(0), q.stride(1), q.stride(2), k_u, k_B, cos, sin, k_slot, k_order, r_scores,
        B, T, r_stride or T, rank, split_len, qk_scale,
        HKV=Hkv, G=H // Hkv, HALF=D // 2, RKB=max(16, pow2(rank)), VPR=VPR, NQG=NQ * (H // Hkv), MQ=MQ,
        BLOCK_T=block_t, ROPE_HALF=rope_half, SATF=bool(res_satfinite) and r_scores.dtype == torch.float16,
        SYNC_SCORE=res_score == "mma_sync", F16=bool(res_f16), HP=res_step_heads, RT_ZEROS=bool(res_runtime_zeros),
        num_warps=block_t // 16, **opts)
