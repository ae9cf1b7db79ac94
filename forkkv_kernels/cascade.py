"""Triton ResidualAttention, the cascade kernels: the shared base attended by every query vector of a KV head in one MMA
per tile; the residuals as separate low-rank terms; the private part merged by log-sum-exp.

Reproduces :func:`forkkv_hf.ops.naive.reference_attention` (the fp32, materialising ground truth). Per KV head, a query
vector ``m`` (row, query, one of the G query heads) of a row whose agent has slots ``(k, v)`` scores context token ``t``
as ``q_m·K_base[t] + q_m·RoPE_t(B_k[k] u_k[k, t])`` and reads ``V_base[t] + B_v[v] u_v[v, t]``. Three launches:

1. the K pass, :mod:`.kres_pass` (only with K residuals; grid: sorted row position x split of the context x group of
   KV heads). The first row of each agent (rows sorted by K slot) rebuilds the agent's K residual per tile and KV head,
   ``X = u[BLOCK_T, r] @ B_k[r, D]``, rotates it with the tile's cos/sin, and scores it against the query vectors of
   the agent's rows (up to ``MQ`` vectors, one chunk for an agent with few rows), so rows sharing an agent share each
   rebuild. Writes the scaled scores ``R [H_kv, B·VPR, T]`` (fp16 for bf16/fp16 inputs, fp32 for fp32).
2. ``_cascade_shared_kernel`` (grid: block of ``BLOCK_M`` query vectors x KV head x split, flash-decoding style).
   ``S = Q[BLOCK_M, D] @ K_base[BLOCK_T, D]ᵀ`` for every row at once, plus ``R``; online softmax; ``P·V_base``; and
   the V residual as ``P·u_v`` in sub-blocks of ``BLOCK_M / N_SUB`` vectors (one batched MMA whose right operand
   holds the u_v of the sub-block's rows; each vector keeps its own row's columns). Writes per-split partials.
3. :func:`~.merge.launch_private_merge`: the rows' private K/V, the log-sum-exp merge, ``(P·u_v)·B_vᵀ``.

Query vectors are laid out ``VPR = next_pow2(NQ·G)`` per row (vector ``row·VPR + q·G + g``), so a sub-block of vectors
never straddles rows unevenly. Imports nothing from ``forkkv_hf``; inputs are plain tensors and ints.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from .attention_common import (LOG2E, cdiv, check_inputs, check_mask, gdc_launch_dependents, gdc_wait, launch, mma,
                               num_sms, on_device, pdl_ok, pow2, softmax_step, split_length, workspace)
from .kres_gluon import GLUON_RULE
from .kres_gluon import refusal as kres_refusal
from .kres_pass import launch_kres_scores
from .merge import launch_private_merge
from .rules import FMA_V_FROM_COLUMNS, MAX_HEAD_DIM, asks_triton_k_pass, launch_defaults, triton_k_knobs
from .shared_gluon import launch_shared_gluon, ring_unsupported, rule_for
from .shared_gluon import refusal as gluon_refusal
from .shared_gluon_pair import GLUON_PAIR_RULE, launch_shared_gluon_pair
from .tiles import fma_tiles, sub_blocks, v_tiles

@triton.jit
def _cascade_shared_kernel(
    Q, s_qb, s_qh, s_qq,
    KB, VB, R, KSLOT, UV, VSLOT,
    MASK, s_mb, s_mq, s_mt,
    M_WS, L_WS, ACC_WS, UV_WS,
    B, T, RS, NQ, RV, split_len, n_splits, qk_scale,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DB: tl.constexpr, HALF: tl.constexpr,
    HALF_B: tl.constexpr, VPR: tl.constexpr, NQG: tl.constexpr, RVB: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_T: tl.constexpr, N_SUB: tl.constexpr, SB: tl.constexpr, RPSB: tl.constexpr, SBC: tl.constexpr,
    HAS_K: tl.constexpr, HAS_V: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    PDL_WAIT: tl.constexpr, PDL_TRIGGER: tl.constexpr, V_FMA: tl.constexpr = False,
):
    """The shared context's part of the attention of ``BLOCK_M`` query vectors of one KV head over one split of the
    context. ``KB``/``VB [HKV, T, D]``, ``UV [n, T, RV]`` contiguous, ``R [HKV, B·VPR, T]`` rows ``RS`` apart;
    ``KSLOT``/``VSLOT [B]``; ``MASK [B, NQ, T + P]`` int8. Writes unnormalised (m, l, acc, acc_uv) per vector and
    split (layout: see :mod:`.attention_common`). ``PDL_WAIT``: launched as a programmatic dependent launch after the K
    pass, it waits for that grid before the first read of ``R`` (everything else it reads was written before the K
    pass began);
    ``PDL_TRIGGER``: lets the merge kernel's grid start, 1: at once (after the wait, if any: then all the work before
    this call is complete), 2: after the context loop, before the partials' stores; 0: as the grid ends."""
    mb = tl.program_id(0)
    hkv = tl.program_id(1)
    split = tl.program_id(2)
    v = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    row = v // VPR
    w = v % VPR
    qi = w // G
    head = hkv * G + w % G
    valid = (row < B) & (w < NQG)
    row = tl.minimum(row, B - 1)
    d = tl.arange(0, DB)
    dm = d < D
    q = tl.load(Q + row[:, None] * s_qb + head[:, None] * s_qh + qi[:, None] * s_qq + d[None, :],
                mask=valid[:, None] & dm[None, :], other=0.0)
    dtype = q.dtype
    if HAS_K:
        kres = valid & (tl.load(KSLOT + row) >= 0)
        r_row = ((hkv * B + row) * VPR + w).to(tl.int64) * RS
    rv = tl.arange(0, RVB)
    if HAS_V and V_FMA:  # each vector its own row's u_v tile, P·u_v on CUDA cores: no block-diagonal columns
        uf_ok = (valid & (tl.load(VSLOT + row) >= 0))[:, None] & (rv < RV)[None, :]
        uf_off = tl.maximum(tl.load(VSLOT + row), 0).to(tl.int64) * T * RV
        acc_uv = tl.zeros([BLOCK_M, RVB], tl.float32)
    elif HAS_V:
        # u_v columns of each sub-block: RPSB rows x RVB ranks; vector i of a sub-block reads group i // VPR
        kk = tl.arange(0, N_SUB)
        cc = tl.arange(0, SBC)
        urow = ((mb * BLOCK_M + kk * SB) // VPR)[:, None] + (cc // RVB)[None, :]
        vs = tl.load(VSLOT + tl.minimum(urow, B - 1), mask=urow < B, other=-1)
        u_ok = (vs >= 0) & ((cc % RVB) < RV)[None, :]
        u_off = tl.maximum(vs, 0).to(tl.int64) * T * RV + (cc % RVB)[None, :]
        acc_uv = tl.zeros([N_SUB, SB, SBC], tl.float32)
    kv_base = hkv.to(tl.int64) * T * D

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DB], tl.float32)
    t_begin = split * split_len
    t_end = tl.minimum(T, t_begin + split_len)
    if PDL_WAIT:
        gdc_wait()
    if PDL_TRIGGER == 1:
        gdc_launch_dependents()
    for t0 in range(t_begin, t_end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tm = t < t_end
        kmask = tm[:, None] & dm[None, :]
        k = tl.load(KB + kv_base + t[:, None] * D + d[None, :], mask=kmask, other=0.0)
        s = mma(q, tl.trans(k), DOT_PREC, UPCAST) * qk_scale
        if HAS_K:
            s += tl.load(R + r_row[:, None] + t[None, :], mask=kres[:, None] & tm[None, :], other=0.0).to(tl.float32)
        allowed = valid[:, None] & tm[None, :]
        if HAS_MASK:
            mk = tl.load(MASK + row[:, None] * s_mb + qi[:, None] * s_mq + t[None, :] * s_mt, mask=allowed, other=0)
            allowed = allowed & (mk != 0)
        p, alpha, m_new, l_i = softmax_step(tl.where(allowed, s, float("-inf")), m_i, l_i, 1)
        pd = p.to(dtype)
        vt = tl.load(VB + kv_base + t[:, None] * D + d[None, :], mask=kmask, other=0.0)
        acc = acc * alpha[:, None] + mma(pd, vt, DOT_PREC, UPCAST)
        if HAS_V and V_FMA:
            uf = tl.load(UV + uf_off[:, None, None] + t[None, :, None] * RV + rv[None, None, :],
                         mask=uf_ok[:, None, :] & tm[None, :, None], other=0.0)
            acc_uv = acc_uv * alpha[:, None] + tl.sum(p[:, :, None] * uf.to(tl.float32), 1)
        elif HAS_V:
            u3 = tl.load(UV + u_off[:, None, :] + t[None, :, None] * RV, mask=u_ok[:, None, :] & tm[None, :, None],
                         other=0.0)
            a3 = tl.reshape(alpha, [N_SUB, SB])
            acc_uv = acc_uv * a3[:, :, None] + mma(tl.reshape(pd, [N_SUB, SB, BLOCK_T]), u3, DOT_PREC, UPCAST)
        m_i = m_new

    if PDL_TRIGGER == 2:
        gdc_launch_dependents()
    wi = ((row * (HKV * G) + head) * NQ + qi) * n_splits + split
    tl.store(M_WS + wi, m_i, mask=valid)
    tl.store(L_WS + wi, l_i, mask=valid)
    dst = tl.where(d < HALF, d, d - HALF + HALF_B)  # the merge kernel's lo | hi layout
    tl.store(ACC_WS + wi[:, None] * (2 * HALF_B) + dst[None, :], acc, mask=valid[:, None] & dm[None, :])
    if HAS_V and V_FMA:
        tl.store(UV_WS + wi[:, None] * RVB + rv[None, :], acc_uv, mask=valid[:, None])
    elif HAS_V:
        grp = tl.arange(0, SB) // VPR
        sel = grp[:, None] == tl.arange(0, RPSB)[None, :]
        own = tl.sum(tl.where(sel[None, :, :, None], tl.reshape(acc_uv, [N_SUB, SB, RPSB, RVB]), 0.0), 2)
        tl.store(UV_WS + wi[:, None] * RVB + rv[None, :], tl.reshape(own, [BLOCK_M, RVB]), mask=valid[:, None])


# ---------------------------------------------------------------------------------------------------------------------
# launcher


#: the ``pdl`` settings of :func:`cascade_attention` (None: plain launches)
PDL_MODES = (None, "early", "late", "merge")


def cascade_attention(q: torch.Tensor, k_base: torch.Tensor, v_base: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, k_priv: torch.Tensor, v_priv: torch.Tensor, scale: float, *,
                      k_u=None, k_B=None, k_slot=None, v_u=None, v_B=None, v_slot=None, mask=None,
                      rope_half: bool = False, k_order=None, k_agents: int | None = None, k_max_rows: int | None = None,
                      context_visible: bool = False, **tuning) -> torch.Tensor:
    """Attention of ``q [B, H, NQ, D]`` (after RoPE) over each row's ``[shared base + its agent's residual | private]``
    K/V; returns ``[B, NQ, H, D]`` in the query's dtype.

    ``k_base``/``v_base [H_kv, T, D]``; ``cos``/``sin [T, D]`` (``rope_half``: their two halves are equal, one is
    read); ``k_priv``/``v_priv [B, H_kv, P, D]``; ``k_u [n, T, r]``, ``k_B [n, H_kv·D, r]`` (scaled) and
    ``k_slot [B]`` int (each row's slot, -1: none), the same for V (None: no residual of that kind); ``mask
    [B, NQ, T + P]`` int8 (1 = attend) or None (the shared context visible, causal in the private part). ``k_order``:
    the rows sorted by ``k_slot`` (computed when None), ``k_agents``: how many distinct K slots and ``k_max_rows``: the
    most rows one K slot has (they size the K pass's grid and score MMA; ``B`` when None: correct, slower; a value
    below the true count leaves rows unscored: wrong). No host reads of tensor values: where the launch rule picks
    the K pass's fp16 rebuild (bf16/fp16 decode calls of 128+ query vectors per KV head, unless ``res_f16=False``),
    the caller vouches for the K residual's range (:func:`~.kres_pass.f16_range_ok`, as forkkv_hf's adapter checks
    once per residual); beyond it the rebuild overflows. ``context_visible``: the caller knows that ``mask`` shows every row the whole shared
    context (its first ``T`` columns all ones), so only the private part reads it: the shared part's kernels run
    unmasked (the compiled decode step's mask, eval/KERNEL_NOTES.md "v41 measured"). ``tuning``: see
    :func:`_cascade_attention`.
    """
    with on_device(q.device):
        return _cascade_attention(q, k_base, v_base, cos, sin, k_priv, v_priv, scale, k_u, k_B, k_slot, v_u, v_B,
                                  v_slot, mask, rope_half, k_order, k_agents, k_max_rows,
                                  shared_mask=None if context_visible else mask, **tuning)


def _cascade_attention(q, k_base, v_base, cos, sin, k_priv, v_priv, scale, k_u, k_B, k_slot, v_u, v_B, v_slot, mask,
                       rope_half, k_order, k_agents, k_max_rows, shared_mask, block_m: int | None = None,
                       block_t: int | None = None, n_sub: int | None = None, programs_per_sm: int | None = None,
                       n_splits: int | None = None,
                       num_warps: int | None = None, num_stages: int | None = None, maxnreg: int | None = None,
                       whole_waves: bool | None = None, res_form: str | None = None, res_block_t: int | None = None,
                       res_heads: int | None = None, res_programs_per_sm: int | None = None,
                       res_splits: int | None = None, res_warps: int | None = None, res_stages: int | None = None,
                       res_maxnreg: int | None = None, mq: int | None = None, res_whole_waves: bool | None = None,
                       res_score: str | None = None, res_pack: int | None = None, res_satfinite: bool | None = None,
                       res_f16: bool | None = None, k_B16=None, res_step_heads: int | None = None,
                       res_runtime_zeros: bool | None = None, res_rebuild: str | None = None, rope16=None,
                       merge_warps: int = 4, merge_stages: int = 2,
                       merge_unroll: int | None = None, merge_block_t: int | None = None,
                       merge_chunk: int | None = None, merge_first: bool | None = None,
                       lowp_rope: bool | None = None, scores_fp32: bool = False, pdl: bool | str | None = None,
                       shared_form: str | None = None, shared_k_early: bool = True, shared_q_regs: bool = False,
                       shared_k_load: str | None = None, v_form: str | None = None,
                       scratch=workspace, launches: dict | None = None) -> torch.Tensor:
    """``shared_mask``: the mask the shared part's kernels read (``mask``, or None where the caller knows it shows
    the whole context). Tuning knobs; where ``None``: :func:`launch_defaults` (on CPU, under the Triton interpreter,
    with 32-token tiles for speed).

    Shared-part kernel: ``block_m`` query vectors per program (default: up to 64), ``block_t`` context tokens per tile,
    ``n_sub`` sub-blocks of the V-residual MMA (default ``block_m / 16``: each multiplies only its own rows' u_v),
    ``v_form`` the V residual's ``P·u_v``: ``"mma"`` (those sub-blocks, the default) or ``"fma"`` (each vector its own
    row's ``u_v`` tile on CUDA cores, no block-diagonal columns: for one vector per row at high V ranks, where the
    sub-blocks are 16 x the rank wide; the Triton shared kernel, tiles from :func:`fma_tiles`; None: from
    :data:`~.rules.FMA_V_FROM_COLUMNS` sub-block columns where the call gives no tiles or form, v50),
    ``programs_per_sm`` how many programs the split of the context aims at per SM or ``n_splits`` the split count
    itself, ``num_warps``, ``num_stages``, ``maxnreg`` a per-thread register cap, ``whole_waves``: size the splits so
    the grid does not exceed programs-per-SM x SMs (one wave, no tail) instead of reaching at least that. K pass
    (:func:`~.kres_pass.launch_kres_scores`): ``res_form``, ``res_block_t``, ``res_heads``, ``res_programs_per_sm`` /
    ``res_splits``, ``res_warps``, ``res_stages``, ``res_maxnreg``, ``mq``, ``res_whole_waves``, ``res_score``,
    ``res_pack``, ``res_satfinite``, ``res_step_heads``, ``res_runtime_zeros`` and ``res_rebuild`` (the Gluon
    form's), ``res_f16`` (with ``k_B16``, ``k_B`` in fp16 kept by the caller: no conversion per call; ``rope16``,
    the cos/sin tables in fp16 kept by the caller: none per tile). Merge
    (:func:`~.merge.launch_private_merge`): ``merge_warps``, ``merge_stages``, ``merge_unroll``, ``merge_chunk`` (at
    most the split count, rounded up to a power of two), ``merge_block_t``, ``merge_first`` (the splits' partials
    merged before the private part).
    ``lowp_rope`` the K residual's rotation in the cache dtype (``None``: on for bf16/fp16 on the GPU),
    ``scores_fp32`` keep the K-residual scores in fp32 instead of fp16. ``pdl`` (:data:`PDL_MODES`; Hopper on,
    :func:`~.attention_common.pdl_ok`, elsewhere ignored): programmatic dependent launches, each kernel starting while
    the one before it drains and waiting for it before reading its output: ``"early"`` (or True) the shared kernel
    after a K pass and the merge, each kernel letting the next start as soon as its own grid runs; ``"late"`` the same,
    the shared kernel letting the merge start after its context loop (the K pass as it ends); ``"merge"`` only the
    merge, let start after the shared kernel's context loop. ``shared_form``: ``"triton"`` or ``"gluon"``, the shared
    part by :mod:`.shared_gluon` (Hopper; its own knobs :func:`~.shared_gluon.rule_for` under the given ``block_t``,
    ``num_warps``, ``num_stages``; ``shared_k_early``: its K tiles refilled as soon as they free; ``shared_q_regs``:
    its score MMAs' queries from registers; ``shared_k_load``: where it reads K's scores
    (:data:`~.shared_gluon.K_LOADS`; the rule's pick where the rule picks the kernel, else ``"softmax"``); it lets
    the merge start only as it ends), or ``"gluon_pair"``, with a V residual, two KV heads per program sharing the
    rows' ``u_v`` tiles (:mod:`.shared_gluon_pair`; its knobs :data:`~.shared_gluon_pair.GLUON_PAIR_RULE` under the
    given ones; never the rule's pick); None: the rule's pick (:func:`launch_defaults`), the Triton kernel where the
    call cannot take the Gluon one (another device or dtype, a given ``block_m``, knobs outside its limits, a context
    the rule's ring of K's scores cannot take). ``scratch(name, numel, device, dtype)``: the scores' and partials'
    buffers (default: reusable workspaces; a CUDA-graph capture passes
    :func:`~.attention_common.fresh_scratch`). ``launches``: a dict that receives the compiled kernels (``"kres"``,
    ``"shared"``, ``"merge"``) for the tuning scripts."""
    B, H, NQ, D = q.shape
    Hkv, T, _ = k_base.shape
    q, k_base, v_base, k_priv, v_priv = check_inputs(q, k_base, v_base, k_priv, v_priv)
    check_mask(mask, B, NQ, T + k_priv.shape[-2])
    k_base, v_base = k_base.contiguous(), v_base.contiguous()
    G, HALF = H // Hkv, D // 2
    HALF_B, DB = pow2(HALF), pow2(D)
    VPR, NQG = pow2(NQ * G, 1), NQ * G
    dev, dtype = q.device, q.dtype
    interp = not q.is_cuda
    if not interp and D > MAX_HEAD_DIM:
        raise NotImplementedError(f"head_dim {D}: the kernels serve heads up to {MAX_HEAD_DIM} on the GPU (at 256 "
                                  "their K pass fails to compile); use forkkv_hf's SDPA path "
                                  "(set_config(backend='sdpa'), or the 'auto' backend, which picks it)")
    prec = "ieee" if dtype == torch.float32 else "tf32"
    has_k, has_v = k_u is not None, v_u is not None
    # the K residual's score rows (written by the K pass, read by the shared part) padded to 16 tokens: every row
    # 16-byte aligned, as the Gluon kernel's ring of them needs (eval/KERNEL_NOTES.md "v35b measured")
    r_stride = cdiv(T, 16) * 16
    r_dtype = torch.float32 if (scores_fp32 or dtype == torch.float32) else torch.float16
    RV = v_u.shape[-1] if has_v else 1
    qk_scale = float(scale) * LOG2E
    sms = num_sms(str(dev))
    launched = {}
    if lowp_rope is None:
        lowp_rope = not interp and dtype in (torch.bfloat16, torch.float16)
    # the interpreter runs the GPU's bf16/fp16 rule (its split rounding included) with 32-token tiles for speed
    cfg = launch_defaults(B, NQ, VPR, has_k, has_v, torch.bfloat16 if interp else dtype, RV, k_max_rows or B)
    if has_k and cfg["res_form"] == "gluon" and res_form != "gluon" and (  # the rule's Gluon K pass, where it serves
            asks_triton_k_pass(res_form=res_form, res_f16=res_f16, res_score=res_score, res_warps=res_warps,
                               res_stages=res_stages, res_pack=res_pack, res_heads=res_heads)
            or kres_refusal(q, k_u, k_B, VPR=VPR, k_max_rows=k_max_rows, r_stride=r_stride,
                            lowp=bool(lowp_rope), res_block_t=res_block_t, res_score=res_score or cfg["res_score"],
                            mq=mq, res_step_heads=res_step_heads or 1) is not None):
        cfg.update(triton_k_knobs(B, NQ, VPR, has_k))  # ... else the Triton K pass under its rule
    if interp:  # (fp32 calls: the GPU's fp32 rule keeps the fp32 rebuild)
        cfg.update(block_t=32, res_block_t=32, res_f16=cfg["res_f16"] and dtype != torch.float32)
    given = dict(block_t=block_t, num_warps=num_warps, num_stages=num_stages, programs_per_sm=programs_per_sm,
                 whole_waves=whole_waves, res_block_t=res_block_t, res_warps=res_warps, res_stages=res_stages,
                 res_maxnreg=res_maxnreg, res_programs_per_sm=res_programs_per_sm, res_whole_waves=res_whole_waves,
                 merge_unroll=merge_unroll, merge_chunk=merge_chunk, merge_first=merge_first, res_pack=res_pack,
                 res_form=res_form, res_satfinite=res_satfinite, res_score=res_score, res_f16=res_f16, pdl=pdl)
    for name, v in (("block_m", block_m), ("block_t", block_t), ("n_sub", n_sub), ("res_block_t", res_block_t),
                    ("merge_block_t", merge_block_t)):
        if v is not None and (not isinstance(v, int) or v < 1 or v & (v - 1)):  # Triton's aranges need them so
            raise ValueError(f"{name}={v!r}; give a power of two")
    for name, v in (("block_t", block_t), ("merge_block_t", merge_block_t)):  # the depth of a P·V product: tensor
        if v is not None and v < 16:  # cores take 16+ (the interpreter takes less; a GPU's compile failed)
            raise ValueError(f"{name}={v}; give 16 or more (the depth of the P·V product)")
    if res_score == "fma" and res_form is None:  # CUDA-core scores run in the halves form only
        given["res_form"] = "halves"
    if res_form == "gluon":  # the Gluon K pass's own knobs under the given ones
        cfg.update(GLUON_RULE)
    if shared_form not in (None, "triton", "gluon", "gluon_pair"):
        raise ValueError(f"shared_form={shared_form!r}; use 'triton', 'gluon' or 'gluon_pair'")
    if v_form not in (None, "mma", "fma") or (v_form == "fma" and shared_form not in (None, "triton")):
        raise ValueError(f"v_form={v_form!r} (shared_form={shared_form!r}); use 'mma', or 'fma' in the Triton shared "
                         "kernel")
    if v_form is None and has_v and shared_form is None and block_m is None and block_t is None and n_sub is None \
            and sub_blocks(min(64, pow2(B * VPR)), VPR, pow2(RV))["SBC"] >= FMA_V_FROM_COLUMNS:
        v_form = "fma"  # wide sub-blocks (one vector per row at high V ranks): the CUDA-core V form, measured faster
    form = "triton" if v_form == "fma" else shared_form or cfg["shared_form"]
    if form == "gluon_pair":  # asked for: its own knobs under the given ones, refused by its launcher
        cfg.update(GLUON_PAIR_RULE)
    k_load = shared_k_load or (cfg["shared_k_load"] if form == cfg["shared_form"] == "gluon" else "softmax")
    if form == "gluon":  # the Gluon shared kernel's own knobs under the given ones
        k_ring = has_k and k_load == "ring"
        # the rule's ring where this call cannot take it (fp32 scores; any context: the score rows are padded to 16
        # tokens, eval/KERNEL_NOTES.md "v35b measured", "v36 measured")
        if k_ring and shared_k_load is None and ring_unsupported(r_stride, r_dtype) is not None:
            k_load, k_ring = "softmax", False
            if shared_form is None:
                form = "triton"  # ... and its kernel pick with it: the Triton kernel
        grule = rule_for(has_v, D, VPR, RV, block_t, num_warps, vectors=B * VPR, k_ring=k_ring)
        use = {**cfg, **grule, **{k: v for k, v in given.items() if v is not None}}
        if form == "gluon" and shared_form is None and (
                block_m is not None or gluon_refusal(q, k_base, v_base, v_u, use["block_t"], use["num_warps"],
                                                     use["num_stages"], VPR, k_ring, r_dtype, r_stride) is not None):
            form = "triton"  # the rule's pick, where this call cannot take it: the Triton kernel under its own rule
        elif form == "gluon":
            cfg.update(grule)
    # the fp16 form is the joined form's and the Gluon form's (the rule's, or where a call asks)
    if res_form not in (None, "joined", "gluon") or res_score == "fma":
        cfg["res_f16"] = False
    cfg.update({k: v for k, v in given.items() if v is not None})

    pdl_mode = {False: None, True: "early"}.get(cfg["pdl"], cfg["pdl"])
    if pdl_mode not in PDL_MODES:
        raise ValueError(f"pdl={cfg['pdl']!r}; use one of {PDL_MODES} (True: 'early', False/None: plain launches)")
    pdl_mode = pdl_mode if not interp and pdl_ok(str(dev)) else None
    use_pdl = pdl_mode is not None
    shared_waits = pdl_mode in ("early", "late") and has_k  # the shared kernel a dependent launch after the K pass
    if has_v:  # converted before the first launch: no other kernel between the three
        v_slot = v_slot.to(device=dev, dtype=torch.int32)
        v_u, v_B = v_u.contiguous(), v_B.contiguous()  # the merge reads v_B's rank with stride 1
    r_scores = q  # dummy pointer without a K residual
    if has_k:
        k_slot = k_slot.to(device=dev, dtype=torch.int32)
        if k_order is None:
            k_order = torch.argsort(k_slot, stable=True)
        r_scores = scratch("kres_scores", Hkv * B * VPR * r_stride, dev, r_dtype)
        launched["kres"] = launch_kres_scores(
            q, k_u.contiguous(), k_B.contiguous(), cos.contiguous(), sin.contiguous(), k_slot,
            k_order.to(device=dev, dtype=torch.int32), r_scores, qk_scale, VPR=VPR, rope_half=rope_half,
            r_stride=r_stride, lowp=bool(lowp_rope) and dtype != torch.float32, prec=prec, interp=interp, sms=sms,
            k_agents=k_agents,
            k_max_rows=k_max_rows, res_form=cfg["res_form"], res_block_t=cfg["res_block_t"], res_heads=res_heads,
            res_programs_per_sm=cfg["res_programs_per_sm"], res_splits=res_splits, res_warps=cfg["res_warps"],
            res_stages=cfg["res_stages"], res_maxnreg=cfg["res_maxnreg"], mq=mq, whole_waves=cfg["res_whole_waves"],
            res_score=cfg["res_score"], res_pack=cfg["res_pack"], res_satfinite=cfg["res_satfinite"],
            res_f16=cfg["res_f16"], k_B16=k_B16, pdl=pdl_mode == "early", res_step_heads=res_step_heads,
            res_runtime_zeros=res_runtime_zeros, res_rebuild=res_rebuild, rope16=rope16)

    BLOCK_T = cfg["block_t"]
    gluon_shared = form in ("gluon", "gluon_pair")
    BLOCK_M = 16 * cfg["num_warps"] if gluon_shared else block_m or min(64, pow2(B * VPR))
    RVB = pow2(RV)
    if has_v and v_form != "fma" and not gluon_shared and block_m is None and block_t is None and n_sub is None:
        tiles = v_tiles(BLOCK_M, BLOCK_T, VPR, RVB, DB, q.element_size())
        BLOCK_M, BLOCK_T = tiles or (BLOCK_M, BLOCK_T)
        v_form = "fma" if tiles is None else v_form  # the sub-blocks' smallest tiles do not fit: the CUDA-core form
    if has_v and v_form == "fma":
        BLOCK_M, BLOCK_T = fma_tiles(block_m or BLOCK_M, block_t or BLOCK_T, RVB, cfg["num_warps"],
                                     given=(block_m, block_t))
    n_mb = cdiv(B * VPR, BLOCK_M)
    programs = n_mb * (Hkv // 2 if form == "gluon_pair" else Hkv)
    split_len = split_length(T, BLOCK_T, programs, cfg["programs_per_sm"] * sms, n_splits, cfg["whole_waves"])
    n_splits = max(1, cdiv(T, split_len))
    n_vec = B * H * NQ * n_splits
    ws = (scratch("m", n_vec, dev), scratch("l", n_vec, dev), scratch("acc", n_vec * 2 * HALF_B, dev),
          scratch("uv", n_vec * RVB if has_v else 1, dev))
    ms = shared_mask.stride() if shared_mask is not None else (0, 0, 0)
    if form == "gluon_pair":
        launched["shared"] = launch_shared_gluon_pair(
            q, k_base, v_base, r_scores, k_slot, shared_mask, ws, n_mb=n_mb, split_len=split_len, n_splits=n_splits,
            qk_scale=qk_scale, VPR=VPR, has_k=has_k, block_t=BLOCK_T, num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"], k_early=shared_k_early, v_u=v_u if has_v else None,
            v_slot=v_slot if has_v else None, r_stride=r_stride)
    elif gluon_shared:
        launched["shared"] = launch_shared_gluon(
            q, k_base, v_base, r_scores, k_slot, shared_mask, ws, n_mb=n_mb, split_len=split_len, n_splits=n_splits,
            qk_scale=qk_scale, VPR=VPR, has_k=has_k, block_t=BLOCK_T, num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"], k_early=shared_k_early, q_regs=shared_q_regs, k_load=k_load,
            v_u=v_u if has_v else None, v_slot=v_slot if has_v else None, r_stride=r_stride)
    else:
        launched["shared"] = launch(
            _cascade_shared_kernel, (n_mb, Hkv, n_splits), q, q.stride(0), q.stride(1), q.stride(2),
            k_base, v_base, r_scores, k_slot if has_k else q, v_u if has_v else q, v_slot if has_v else q,
            shared_mask if shared_mask is not None else q, *ms,
            *ws,
            B, T, r_stride, NQ, RV, split_len, n_splits, qk_scale,
            HKV=Hkv, G=G, D=D, DB=DB, HALF=HALF, HALF_B=HALF_B, VPR=VPR, NQG=NQG, RVB=RVB, BLOCK_M=BLOCK_M,
            BLOCK_T=BLOCK_T, **sub_blocks(BLOCK_M, VPR, RVB, n_sub),
            HAS_K=has_k, HAS_V=has_v, HAS_MASK=shared_mask is not None, DOT_PREC=prec, UPCAST=interp,
            PDL_WAIT=shared_waits, PDL_TRIGGER={None: 0, "early": 1}.get(pdl_mode, 2), V_FMA=v_form == "fma",
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], maxnreg=maxnreg,
            pdl=shared_waits,
        )
    out, launched["merge"] = launch_private_merge(
        q, k_priv, v_priv, v_B, v_slot, mask, ws, n_splits, qk_scale, T=T, RV=RV, has_v=has_v, block_t=cfg["block_t"],
        prec=prec, interp=interp, merge_warps=merge_warps, merge_stages=merge_stages,
        merge_unroll=cfg["merge_unroll"], merge_chunk=cfg["merge_chunk"], merge_block_t=merge_block_t,
        merge_first=cfg["merge_first"], pdl=use_pdl)
    if launches is not None:
        launches.update(launched)
    return out
