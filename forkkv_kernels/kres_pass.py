"""The cascade family's K-residual score pass: per agent, the rebuilt and rotated K residual scored against the query
vectors of the agent's rows, written once for the shared-part kernel (:mod:`.cascade`) to add to its base scores.

For a row whose agent has K slot ``k``, KV head ``h``, context token ``t`` and query vector ``m`` of that head it
computes ``qk_scale · q_m·RoPE_t(B_k[k] u_k[k, t])_h``. Per tile of ``BLOCK_T`` tokens and KV head: the rebuild
``X = u[BLOCK_T, r] @ B_k[r, D]`` (one MMA), the rotate-half RoPE of ``X`` with the tile's cos/sin (CUDA cores), the
scores ``X_rot @ Q[D, MQ]`` (one MMA; the agent's vectors are its columns, so rows sharing an agent share the rebuild).
Three forms of the same arithmetic (``res_form``):

- halves: ``X`` as its lo and hi halves (two rebuild MMAs of width ``D/2``, two score MMAs of depth ``D/2``), so the
  rotation pairs dimension ``i`` with ``i + D/2`` elementwise;
- pairs: ``B_k``'s columns interleaved (``2i`` = dim ``i``, ``2i+1`` = dim ``i + D/2``), so one rebuild MMA of width
  ``D`` yields both halves as adjacent columns (split in registers), the rotated pair is joined back and the
  queries' rows interleaved the same way: one MMA each, half the operand staging and MMA waits of the halves form;
- joined: one rebuild MMA over the head's whole ``B_k`` in its own order (columns ``[lo | hi]``), split into the
  halves in registers (in the MMA's accumulator layout a thread holds column ``j`` and ``j + D/2`` alike), rotated as
  halves and joined back for one score MMA of depth ``D`` against the queries as they are: the pairs form's two MMAs
  without its shuffles of packed pairs (ptxas also serialises the halves form's MMAs and not this one's,
  eval/KERNEL_NOTES.md "v11").

The score step has two ways (``res_score``): ``"mma"`` (tensor cores; the MMA needs at least 16 columns, so one row of
G = 4 query vectors uses 4 of them) and ``"fma"`` (halves form only: each query vector's dot products on CUDA cores,
``sum(K_rot[BLOCK_T, D] * q[None, D], axis=1)`` for one vector at a time, ``MQ`` as small as the agent's vectors,
at most 16: no padding, and no conversion of the rotated tile into an MMA operand layout). Both round the rotated K
residual and the queries alike and accumulate in fp32.

Imports nothing from ``forkkv_hf``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_common import (cdiv, gdc_launch_dependents, launch, mma, mma_f16, pow2, rope_residual, rope_tile,
                               sm_major, split_length)

#: the forms of the K pass (``res_form``); ``"gluon"``: the joined form's arithmetic in Gluon, Hopper only
#: (:mod:`.kres_gluon`)
RES_FORMS = ("halves", "pairs", "joined", "gluon")
#: the ways of the K pass's score step (``res_score``); ``"mma_sync"``: the Gluon form's 8-column ``mma.sync``
RES_SCORES = ("mma", "fma", "mma_sync")


@triton.jit
def _f16_satfinite(x):
    """fp32 -> fp16 rounded to nearest, saturated to the largest finite fp16 (±65504; NaN stays NaN): PTX's
    ``cvt.rn.satfinite.f16x2.f32``, two values per instruction (GPU only: the interpreter cannot run PTX)."""
    return tl.inline_asm_elementwise("cvt.rn.satfinite.f16x2.f32 $0, $2, $1;", "=r,r,r", [x], dtype=tl.float16,
                                     is_pure=True, pack=2)


@triton.jit
def _kres_scores_kernel(
    Q, s_qb, s_qh, s_qq,
    UK, BK, COS, SIN, KSLOT, ORDER, R,
    B, T, RS, RK, split_len, qk_scale,
    HKV: tl.constexpr, G: tl.constexpr, HALF: tl.constexpr, HALF_B: tl.constexpr, RKB: tl.constexpr,
    VPR: tl.constexpr, NQG: tl.constexpr, MQ: tl.constexpr, BLOCK_T: tl.constexpr, HG: tl.constexpr,
    HA: tl.constexpr, ROPE_HALF: tl.constexpr, LOWP_ROPE: tl.constexpr, CLAMP: tl.constexpr, DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr, PAIRS: tl.constexpr, JOINED: tl.constexpr, SCORE_FMA: tl.constexpr, SATF: tl.constexpr,
    F16: tl.constexpr, PDL: tl.constexpr,
):
    """``R[h, row·VPR + w, t] = qk_scale · q[row, h·G + w%G, w//G] · RoPE_t(B_k[slot] u_k[slot, t])_h`` for every
    row with a K slot. ``UK [n, T, RK]``, ``BK [n, HKV·2·HALF, RK]``, ``COS``/``SIN [T, 2·HALF]`` contiguous;
    ``ORDER``: the rows sorted by ``KSLOT``. Grid: sorted position (only each agent's first position acts) x split of
    the context x (chunk of ``MQ // HA // VPR`` of the agent's rows, group of ``HG`` KV heads). ``HA`` KV heads share
    one score tile: column ``c`` belongs to head ``c // (MQ // HA)`` of the pack, each head's MMA sees only its own
    columns (the others' query operand is zero) and accumulates into the tile, which is scaled and stored once per
    pack instead of once per head. ``PDL``: let the next kernel's grid (the shared part, a programmatic dependent
    launch that waits for this grid before it reads ``R``) start as this grid's programs have all started."""
    if PDL:
        gdc_launch_dependents()
    p = tl.program_id(0)
    split = tl.program_id(1)
    chunk = tl.program_id(2) // (HKV // HG)
    hg = tl.program_id(2) % (HKV // HG)
    slot = tl.load(KSLOT + tl.load(ORDER + p))
    prev = tl.load(KSLOT + tl.load(ORDER + tl.maximum(p - 1, 0)))
    CV: tl.constexpr = MQ // HA  # score columns (query vectors of the chunk) per head
    first = p + chunk * (CV // VPR)
    first_slot = tl.load(KSLOT + tl.load(ORDER + tl.minimum(first, B - 1)))
    if (slot >= 0) & ((p == 0) | (prev != slot)) & (first < B) & (first_slot == slot):
        dtype = Q.dtype.element_ty
        d = tl.arange(0, HALF_B)
        dm = d < HALF
        rk = tl.arange(0, RKB)
        rkm = rk < RK
        # this chunk's query vectors (the score MMA's columns), resolved once, outside the loop over the context
        col = tl.arange(0, MQ)
        col_head = col // CV
        w = col % VPR
        pos = first + (col % CV) // VPR
        inb = pos < B
        rowc = tl.load(ORDER + pos, mask=inb, other=0)
        ok = inb & (tl.load(KSLOT + rowc, mask=inb, other=-1) == slot) & (w < NQG)
        q_off = rowc * s_qb + (w % G) * s_qh + (w // G) * s_qq
        u_base = UK + slot.to(tl.int64) * T * RK
        b_base = BK + slot.to(tl.int64) * (HKV * 2 * HALF * RK)
        bmask = dm[None, :] & rkm[:, None]
        # pairs form: column j of the rebuilt tile is dim j // 2 of the lo (j even) or hi (j odd) half
        j = tl.arange(0, 2 * HALF_B)
        j_dim = j // 2 + (j % 2) * HALF
        j_mask = ((j // 2) < HALF)[None, :] & rkm[:, None]
        # joined form: column j of the rebuilt tile is dim j of the lo half (j < HALF_B) or j - HALF_B of the hi half
        jn = tl.arange(0, 2 * HALF_B)
        jn_dim = jn % HALF_B + (jn // HALF_B) * HALF
        jn_ok = (jn % HALF_B) < HALF
        jn_mask = jn_ok[None, :] & rkm[:, None]
        t_begin = split * split_len
        t_end = tl.minimum(T, t_begin + split_len)
        for t0 in range(t_begin, t_end, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            tm = t < t_end
            u = tl.load(u_base + t[:, None] * RK + rk[None, :], mask=tm[:, None] & rkm[None, :], other=0.0)
            c_lo, s_lo, c_hi, s_hi = rope_tile(COS, SIN, 2 * HALF, 2 * HALF, t, d, tm[:, None] & dm[None, :], HALF,
                                               ROPE_HALF)
            if F16:  # (joined form) the tile's operands in fp16 once, for all its KV heads
                u = u.to(tl.float16)
                c_lo = c_lo.to(tl.float16)
                s_lo = s_lo.to(tl.float16)
                c_hi = c_hi.to(tl.float16)
                s_hi = s_hi.to(tl.float16)
            for hp in range(HG // HA):
                racc = tl.zeros([BLOCK_T, MQ], tl.float32)
                for ha in range(HA):
                    h = hg * HG + hp * HA + ha
                    qT_ptr = Q + (q_off + h * G * s_qh)[None, :] + d[:, None]
                    ok_h = ok & (col_head == ha)  # this head's columns of the tile
                    qmask_h = ok_h[None, :] & dm[:, None]
                    if JOINED:
                        # one rebuild MMA over the head's whole B_k (column j: dim j of the lo half for j < HALF_B,
                        # of the hi half above), split into the halves in registers; one score MMA of depth 2·HALF_B
                        bT = tl.load(b_base + (h * 2 * HALF + jn_dim[None, :]) * RK + rk[:, None], mask=jn_mask,
                                     other=0.0)
                        qn = tl.load(Q + (q_off + h * G * s_qh)[None, :] + jn_dim[:, None],
                                     mask=ok_h[None, :] & jn_ok[:, None], other=0.0)
                        if F16:  # the rebuild accumulates in fp16: packed halves, no conversion before the rotation
                            x = mma_f16(u, bT.to(tl.float16), UPCAST)
                            rdt: tl.constexpr = tl.float16
                            qn = qn.to(tl.float16)
                        else:
                            x = mma(u, bT, DOT_PREC, UPCAST)
                            rdt: tl.constexpr = dtype
                        x_lo, x_hi = tl.split(tl.permute(tl.reshape(x, [BLOCK_T, 2, HALF_B]), (0, 2, 1)))
                        k_lo, k_hi = rope_residual(x_lo, x_hi, c_lo, s_lo, c_hi, s_hi, rdt, LOWP_ROPE or F16, UPCAST)
                        k = tl.reshape(tl.permute(tl.join(k_lo.to(rdt), k_hi.to(rdt)), (0, 2, 1)),
                                       [BLOCK_T, 2 * HALF_B])
                        racc = mma(k, qn, DOT_PREC, UPCAST, racc)
                    elif PAIRS:
                        bT = tl.load(b_base + (h * 2 * HALF + j_dim[None, :]) * RK + rk[:, None], mask=j_mask,
                                     other=0.0)
                        x_lo, x_hi = tl.split(tl.reshape(mma(u, bT, DOT_PREC, UPCAST), [BLOCK_T, HALF_B, 2]))
                        k_lo, k_hi = rope_residual(x_lo, x_hi, c_lo, s_lo, c_hi, s_hi, dtype, LOWP_ROPE, UPCAST)
                        k = tl.reshape(tl.join(k_lo.to(dtype), k_hi.to(dtype)), [BLOCK_T, 2 * HALF_B])
                        q_pairs = tl.join(tl.load(qT_ptr, mask=qmask_h, other=0.0),
                                          tl.load(qT_ptr + HALF, mask=qmask_h, other=0.0))
                        racc = mma(k, tl.reshape(tl.permute(q_pairs, (0, 2, 1)), [2 * HALF_B, MQ]), DOT_PREC, UPCAST,
                                   racc)
                    else:
                        # B_k rows of head h, transposed: [RKB, HALF_B] per half
                        bT_ptr = b_base + (h * 2 * HALF + d[None, :]) * RK + rk[:, None]
                        x_lo = mma(u, tl.load(bT_ptr, mask=bmask, other=0.0), DOT_PREC, UPCAST)
                        x_hi = mma(u, tl.load(bT_ptr + HALF * RK, mask=bmask, other=0.0), DOT_PREC, UPCAST)
                        k_lo, k_hi = rope_residual(x_lo, x_hi, c_lo, s_lo, c_hi, s_hi, dtype, LOWP_ROPE, UPCAST)
                        if SCORE_FMA:  # (HA = 1) fp32 products of the values the MMA would multiply, fp32 sums; the
                            # rotated tile stays in the rebuild's layout, one query vector (a broadcast row) at a time
                            kl = k_lo.to(dtype).to(tl.float32)
                            kh = k_hi.to(dtype).to(tl.float32)
                            for c in tl.static_range(MQ):
                                pick = col == c
                                qc_ptr = Q + tl.sum(tl.where(pick, q_off, 0), 0) + h * G * s_qh + d
                                qc_ok = dm & ((d * 0 + tl.sum(tl.where(pick & ok, 1, 0), 0)) > 0)
                                qlc = tl.load(qc_ptr, mask=qc_ok, other=0.0).to(tl.float32)
                                qhc = tl.load(qc_ptr + HALF, mask=qc_ok, other=0.0).to(tl.float32)
                                rc = tl.sum(kl * qlc[None, :] + kh * qhc[None, :], 1)
                                racc = tl.where(pick[None, :], rc[:, None], racc)
                        else:
                            racc = mma(k_lo.to(dtype), tl.load(qT_ptr, mask=qmask_h, other=0.0), DOT_PREC, UPCAST,
                                       racc)
                            racc = mma(k_hi.to(dtype), tl.load(qT_ptr + HALF, mask=qmask_h, other=0.0), DOT_PREC,
                                       UPCAST, racc)
                r = racc * qk_scale
                if SATF:  # fp16 buffer, sm_90: one saturating conversion per 2 scores instead of a clamp and a cvt
                    r = _f16_satfinite(r)
                elif CLAMP:  # fp16 buffer: bound |score| (log2 units) far beyond where exp2 differences vanish
                    r = tl.minimum(tl.maximum(r, -60000.0), 60000.0)
                vec = (((hg * HG + hp * HA + col_head) * B + rowc) * VPR + w).to(tl.int64)
                tl.store(R + vec[None, :] * RS + t[:, None], r.to(R.dtype.element_ty), mask=tm[:, None] & ok[None, :])


#: ``res_f16`` on a bf16/fp32 call: the queries enter fp16 scaled by this power of two (their scores scaled back)
Q_F16_SCALE = 2.0**-8
#: ``res_f16``: the largest K-residual operand or rebuilt value :func:`f16_range_ok` accepts (rotated values reach
#: sqrt(2) times it, within fp16's 65504)
F16_LIMIT = 2.0**14


def f16_queries(q: torch.Tensor, qk_scale: float) -> tuple[torch.Tensor, float]:
    """The queries as ``res_f16``'s score MMA takes them, with the score scale to use: fp16 queries as they are, others
    converted to fp16 scaled by :data:`Q_F16_SCALE` (a power of two: bf16 queries up to 1.6e7 stay finite; exact for
    components from 2^-9 in magnitude, smaller ones rounded by fp16's subnormals, by at most 2^-17 absolute) and the
    scale divided by it."""
    if q.dtype == torch.float16:
        return q, qk_scale
    q16 = torch.empty(q.shape, dtype=torch.float16, device=q.device)
    torch.mul(q, Q_F16_SCALE, out=q16)
    return q16, qk_scale / Q_F16_SCALE


def f16_range_ok(k_u: torch.Tensor, k_B: torch.Tensor) -> bool:
    """Whether ``res_f16`` is safe for these K residuals (``k_u [n, T, r]``, ``k_B [n, H_kv·D, r]``): every ``u`` and
    ``B_k`` value and every rebuilt value's bound (per slot ``max|u| · max_i sum_j |B_k[i, j]|``) at most
    :data:`F16_LIMIT`, so that nothing overflows fp16 in the rebuild or the rotation. One host read; callers check once
    per residual, not per call."""
    if k_u.numel() == 0 or k_B.numel() == 0:
        return True
    lo, hi = torch.aminmax(k_u.detach().reshape(k_u.shape[0], -1), dim=1)  # no |u| temporary the size of u
    u_max = torch.maximum(-lo, hi).float()
    b_abs = k_B.detach().abs().float()
    bound = (u_max * b_abs.sum(-1).amax(-1)).amax()
    worst = torch.stack([u_max.amax(), b_abs.amax(), bound])
    return bool(torch.isfinite(worst).all() and (worst <= F16_LIMIT).all())


def _b16(k_B: torch.Tensor, k_B16) -> torch.Tensor:
    """``k_B`` in fp16 for ``res_f16``: the caller's copy (kept with the residual) or converted here, per call."""
    if k_B16 is not None and (k_B16.dtype != torch.float16 or k_B16.shape != k_B.shape):
        raise ValueError(f"k_B16 must be k_B in fp16: got {k_B16.dtype} {tuple(k_B16.shape)} for {tuple(k_B.shape)}")
    return k_B16.contiguous() if k_B16 is not None else k_B.to(torch.float16)


def rope_f16(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` in fp16 (contiguous) for ``rope16``: the same values as the fp16 forms' conversion per tile."""
    return cos.to(torch.float16).contiguous(), sin.to(torch.float16).contiguous()


def _rope16(cos: torch.Tensor, sin: torch.Tensor, rope16) -> tuple[torch.Tensor, torch.Tensor]:
    c16, s16 = rope16
    for name, t, ref in (("cos", c16, cos), ("sin", s16, sin)):
        if t.dtype != torch.float16 or t.shape != ref.shape or t.device != ref.device or not t.is_contiguous():
            raise ValueError(f"rope16's {name} must be the {name} table in fp16, contiguous, on its device: got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device} for {tuple(ref.shape)} on {ref.device} "
                             "(forkkv_kernels.kres_pass.rope_f16 makes them)")
    return c16, s16


def score_pack(res_pack: int, fma: bool, heads: int, mq: int, agent_vectors: int) -> int:
    """How many KV heads share one score tile for ``res_pack`` (at most that many, a power of two): 1 for CUDA-core
    scores, else halved until it divides the program's ``heads`` and each head's ``mq // pack`` columns hold an agent's
    ``agent_vectors`` (its rows' query vectors of one KV head)."""
    if res_pack < 1 or res_pack & (res_pack - 1):
        raise ValueError(f"res_pack={res_pack}; give a power of two (1: one KV head per score tile)")
    pack = 1 if fma else res_pack
    while pack > 1 and (heads % pack or mq // pack < pow2(agent_vectors, 1)):
        pack //= 2
    return pack


def launch_kres_scores(q, k_u, k_B, cos, sin, k_slot, k_order, r_scores, qk_scale: float, *, VPR: int, rope_half: bool,
                       lowp: bool, prec: str, interp: bool, sms: int, k_agents: int | None, k_max_rows: int | None,
                       res_form: str = "halves", res_block_t: int | None = None, res_heads: int | None = None,
                       res_programs_per_sm: int = 4, res_splits: int | None = None, res_warps: int = 4,
                       res_stages: int = 2, res_maxnreg: int | None = None, mq: int | None = None,
                       whole_waves: bool = False, res_score: str = "mma", res_pack: int = 1,
                       res_satfinite: bool = False, res_f16: bool = False, k_B16=None, pdl: bool = False,
                       r_stride: int | None = None, res_step_heads: int | None = None,
                       res_runtime_zeros: bool | None = None, res_rebuild: str | None = None, rope16=None):
    """Run ``_kres_scores_kernel`` into ``r_scores [H_kv, B·VPR, T]``, score rows ``r_stride`` apart (default
    ``T``). ``q [B, H, NQ, D]``; ``k_u [n, T, r]``, ``k_B [n, H_kv·D, r]``, ``cos``/``sin [T, D]`` contiguous;
    ``k_slot [B]``, ``k_order [B]`` int32 (rows sorted by
    slot). ``k_agents``/``k_max_rows``: distinct K slots and the most rows of one slot (grid and score-MMA width;
    ``None``: ``B``). Knobs: ``res_form`` (:data:`RES_FORMS`), ``res_block_t`` tokens per tile, ``res_heads`` KV heads
    per program (they share the u and cos/sin tiles), ``res_programs_per_sm`` (sizes the split of the context, see
    :func:`~.attention_common.split_length`) or ``res_splits`` (the split count itself), ``res_warps``, ``res_stages``,
    ``res_maxnreg`` (register cap per thread: more programs per SM), ``mq`` query vectors per score MMA,
    ``whole_waves`` (the split rule rounds down: at most one wave of ``res_programs_per_sm`` programs per SM),
    ``res_score`` (:data:`RES_SCORES`; ``"fma"``: halves form, ``mq`` default the agent's vectors, at most 16),
    ``res_satfinite`` (fp16 scores on sm_90+: one saturating PTX conversion per 2 scores instead of a clamp to ±60000
    and a conversion; elsewhere the clamp), ``res_pack`` at most this many KV heads share one score tile of ``mq``
    columns (a power of two; each head gets
    ``mq // pack`` columns: 4 for a decode row of G = 4, so 4 heads fill a 16-column MMA that one head would pad; the
    pack shrinks until each head's columns hold all the vectors of an agent's rows and the pack divides
    ``res_heads``; MMA scores only), ``res_f16`` (joined and Gluon forms: the rebuild's operands, its accumulator, the
    rotation and the score MMA's operands in fp16, the scores accumulated in fp32: no conversion between the rebuild
    and the rotation; bf16/fp32 queries enter fp16 scaled by :data:`Q_F16_SCALE`; the K residual must stay within fp16's
    range: :func:`f16_range_ok`; ``k_B16``: ``k_B`` already in fp16, else converted per call). Returns the compiled
    kernel. ``pdl``: the kernel lets the next one (a programmatic dependent launch) start early.
    ``res_step_heads``, ``res_runtime_zeros``, ``res_rebuild``: the Gluon form's KV heads per step of its head loop,
    its zero accumulators as v36b had them and its rebuild's MMA (:func:`~.kres_gluon.launch_kres_scores_gluon`).
    ``rope16``: ``(cos, sin)`` in fp16, kept by the caller, read instead of ``cos``/``sin`` by the fp16 forms (no
    conversion per tile: the Gluon pass's tile 97 instructions shorter, 1,227 -> 1,130 offline, whole K+V calls 1.0-3.4%
    faster at 32-256 agents on an H100, v42; the same values, both conversions rounding to the nearest fp16;
    :func:`rope_f16`)."""
    B, H, NQ, D = q.shape
    Hkv, T = k_B.shape[1] // D, k_u.shape[1]
    if res_form not in RES_FORMS:
        raise ValueError(f"res_form={res_form!r}; use one of {RES_FORMS}")
    if res_score not in RES_SCORES:
        raise ValueError(f"res_score={res_score!r}; use one of {RES_SCORES}")
    if res_f16 and rope16 is not None:  # the fp16 forms' cos/sin: the caller's fp16 copies
        cos, sin = _rope16(cos, sin, rope16)
    if res_form == "gluon":
        from .kres_gluon import launch_kres_scores_gluon

        if res_f16:  # the queries (scaled into fp16's range) and B_k in fp16, as for the joined form
            q, qk_scale = f16_queries(q, qk_scale)
            k_B = _b16(k_B, k_B16)
        return launch_kres_scores_gluon(
            q, k_u, k_B, cos, sin, k_slot, k_order, r_scores, qk_scale, VPR=VPR, rope_half=rope_half, lowp=lowp,
            sms=sms, k_agents=k_agents, k_max_rows=k_max_rows, res_block_t=res_block_t,
            res_programs_per_sm=res_programs_per_sm, res_splits=res_splits, mq=mq, whole_waves=whole_waves,
            res_satfinite=res_satfinite, res_score=res_score, res_maxnreg=res_maxnreg, r_stride=r_stride,
            res_f16=res_f16, res_step_heads=res_step_heads or 1, res_runtime_zeros=bool(res_runtime_zeros),
            res_rebuild=res_rebuild or "wgmma")
    if res_step_heads not in (None, 1):
        raise ValueError(f"res_step_heads={res_step_heads} is the Gluon K pass's (res_form='gluon'); the Triton forms "
                         "take one KV head per step (res_heads sets how many a program takes)")
    if res_runtime_zeros:
        raise ValueError("res_runtime_zeros is the Gluon K pass's (res_form='gluon'); the Triton forms start their "
                         "MMAs from their own zeros")
    if res_rebuild not in (None, "wgmma"):
        raise ValueError(f"res_rebuild={res_rebuild!r} is the Gluon K pass's (res_form='gluon'); the Triton forms' "
                         "rebuild is Triton's own tl.dot")
    if res_score == "mma_sync":
        raise ValueError("res_score='mma_sync' is the Gluon K pass's (res_form='gluon'); the Triton forms take "
                         "'mma' or 'fma'")
    fma = res_score == "fma"
    if res_f16 and res_form != "joined":
        raise ValueError(f"res_f16 runs in the joined form only (res_form={res_form!r}): pass res_form='joined'")
    if fma and res_form != "halves":
        raise ValueError(f"res_score='fma' runs in the halves form only (res_form={res_form!r}): pass "
                         "res_form='halves' or res_score='mma'")
    BT_R = res_block_t or (32 if interp else 64)
    HG = res_heads or Hkv
    if not isinstance(HG, int) or HG < 1 or Hkv % HG:  # a negative one divided and launched nothing, silently
        raise ValueError(f"res_heads={HG!r}: give a positive divisor of the {Hkv} KV heads")
    rows_max = max(1, k_max_rows or B)
    if fma and VPR > 16:  # (the mq refusal below named a knob the caller never gave, with contradictory bounds)
        raise ValueError(f"res_score='fma' (CUDA-core scores) takes at most 16 query vectors per row and KV head, this "
                         f"call has {VPR}; use res_score='mma'")
    MQ = mq or max(VPR, min(16 if fma else 64, pow2(rows_max * VPR, 1 if fma else 16)))
    if MQ < VPR or MQ != pow2(MQ, 1) or (MQ < 16 and not fma) or (MQ > 16 and fma):
        limit = " and at most 16 (one vector at a time)" if fma else " and 16 (the MMA); fewer with res_score=fma"
        raise ValueError(f"mq={MQ}: a power of two of at least {VPR} (the query vectors of one row and KV head)"
                         + limit)
    if res_f16:  # the score MMA's and the rebuild's fp16 operands (u: per tile); B_k: the caller's copy or converted
        q, qk_scale = f16_queries(q, qk_scale)
        k_B = _b16(k_B, k_B16)
    pack = score_pack(res_pack, fma, HG, MQ, rows_max * VPR)
    n_chunks = cdiv(rows_max, MQ // pack // VPR)
    n_act = max(1, k_agents or B) * n_chunks * (Hkv // HG)
    split_len = split_length(T, BT_R, n_act, res_programs_per_sm * sms, res_splits, whole_waves)
    return launch(
        _kres_scores_kernel, (B, cdiv(T, split_len), n_chunks * (Hkv // HG)), q, q.stride(0), q.stride(1), q.stride(2),
        k_u, k_B, cos, sin, k_slot, k_order, r_scores,
        B, T, r_stride or T, k_u.shape[-1], split_len, qk_scale,
        HKV=Hkv, G=H // Hkv, HALF=D // 2, HALF_B=pow2(D // 2), RKB=pow2(k_u.shape[-1]), VPR=VPR, NQG=NQ * (H // Hkv),
        MQ=MQ, BLOCK_T=BT_R, HG=HG, HA=pack, ROPE_HALF=rope_half, LOWP_ROPE=lowp, CLAMP=r_scores.dtype == torch.float16,
        DOT_PREC=prec, UPCAST=interp, PAIRS=res_form == "pairs", JOINED=res_form == "joined", SCORE_FMA=fma,
        SATF=res_satfinite and r_scores.dtype == torch.float16 and not interp and sm_major(str(q.device)) >= 9,
        F16=res_f16, PDL=pdl,
        num_warps=res_warps, num_stages=res_stages, maxnreg=res_maxnreg,
    )
