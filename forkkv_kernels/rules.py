"""The launch rule: the knobs :func:`~.cascade.cascade_attention` uses on the GPU where a call does not give them
(:func:`launch_defaults`), each with the sweep that chose it. Imports nothing from ``forkkv_hf``."""

from __future__ import annotations

import torch

from .attention_common import pow2
from .kres_gluon import GLUON_RULE

#: the Triton K pass's rule (:mod:`.kres_pass`): the joined form (one rebuild MMA split in registers, one score MMA of
#: depth D), one KV head per score tile, 128-token tiles on 8 warps capped at 128 registers (2 programs per SM), 3
#: pipeline stages (v11c, one H200, whole K+V calls against v11b's halves form in packs of 4 on 64-token tiles: 32
#: agents 419.2 -> 403.2 µs, 128 agents 1,546.8 -> 1,471.6, 8 agents 148.3 -> 144.4, 1 agent 71.3 -> 71.1); the fp16
#: scores through one saturating conversion per 2 instead of a clamp (v11e, same run: 32 agents 403.8 -> 398.1 µs,
#: 128 agents 1,474.4 -> 1,448.0, 8 agents 145.4 -> 144.0, 1 agent 71.0 -> 70.7; sm_90+, elsewhere the clamp)
TRITON_K_RULE = dict(res_form="joined", res_block_t=128, res_warps=8, res_stages=3, res_maxnreg=128,
                     res_programs_per_sm=4, res_whole_waves=True, res_pack=1, res_satfinite=True, res_score="mma")
#: query vectors per KV head (agents x 4 for a decode row of Llama's GQA) from which a K+V decode call's K pass is the
#: Gluon one (:data:`~.kres_gluon.GLUON_RULE`, fp16 rebuild, scores stored from the ``mma.sync`` layout), where it
#: measured faster than the Triton pass by more than the 1.5% run-to-run spread in both orders (one H100, whole K+V
#: calls at 32K, Triton -> Gluon µs; v39, its MMAs from plain zeros: 16 agents 223.5 / 224.4 -> 217.1 / 219.7, 20
#: agents 261.8 / 262.9 -> 253.6 / 254.2, 32 agents 353.4 / 353.5 -> 343.4 / 342.1, 128 agents 1,283.4 / 1,286.8 ->
#: 1,187.1 / 1,170.8; level at 12, 184.9 / 185.5 -> 184.4 / 186.7; slower at 8, 148.3 / 148.3 -> 153.1 / 154.3;
#: sweep_kernel_v39{a,b}, _v39t{a,b}_nvidia_h100.json, eval/KERNEL_NOTES.md "v39 measured"; v36b's and v37's form,
#: before v39, from 96 agents)
GLUON_K_FROM = 64
#: ... where an agent's rows hold at most this many of them (its score tile 8 columns wide, as measured: one decode row
#: of G = 4, or two; wider tiles keep one score chain and spill, unmeasured)
GLUON_K_ROW_VECTORS = 8
#: query vectors per KV head from which a decode call's Triton K pass rebuilds, rotates and scores in fp16
#: (v15: :func:`triton_k_knobs`)
TRITON_F16_FROM = 128


#: the widest head the kernels serve on the GPU: their rule was measured and GPU-tested at 128 (Llama, Mistral, Qwen);
#: at 256 (Gemma) the rule's K pass failed to compile under its register cap in the kernels' GPU fuzz
#: (eval/results/raw/fuzz_kernels_v47_h100.json) and needs more shared memory than an H100 has (266,240 bytes at K
#: rank 16 for 128-token tiles in 3 stages, offline for sm_90, against 232,448). forkkv_hf's "auto" backend gives
#: wider heads the SDPA path (``forkkv_hf.ops.dispatch.TRITON_MAX_HEAD_DIM``, the same number)
MAX_HEAD_DIM = 128


#: the widest V-residual sub-block (``16 / VPR · rank`` columns: a block of 16 query vectors times all its rows'
#: ``u_v``) for which a K+V decode call takes the Gluon shared kernel: one query vector per row and KV head (MHA) at
#: rank 32 (512 columns) measured 6x slower there than in the Triton kernel (v49, one H100, 32 query heads on 32 KV
#: heads, 8K context, 64 agents, whole K+V calls: 8,766 against 1,454 µs; at rank 16, 256 columns, 752 against 848;
#: eval/results/raw/bench_v_tiles_v49_h100.json); the rule's measured shapes (G = 4, rank 16: 64 columns) are inside
GLUON_KV_MAX_COLUMNS = 256
#: the sub-block width (the same ``16 / VPR · rank`` columns) from which a call with a V residual takes the CUDA-core V
#: form (``v_form="fma"``: each vector's ``P·u_v`` from its own row's ``u_v`` tile) in the Triton shared kernel, where
#: it gives no tiles, form or ``v_form`` of its own: v50 (one H100, 32 query heads on 32 KV heads, 8K context, bf16,
#: `python -m eval.bench.v_tiles`, eval/results/raw/bench_v_tiles_v50b_h100.json), rule -> CUDA-core µs: at rank 64
#: (1,024 columns) V only 12,495 -> 148 (8 agents) and 3,523 -> 603 (64), K+V 5,808 -> 509 and 4,572 -> 1,359; at
#: rank 128 (2,048) V 24,324 -> 201, K+V 32,095 -> 491 (8 agents); at rank 32 (512 columns) mixed, the rule kept: V
#: 241 -> 195 and 708 -> 779, K+V 398 -> 353 and 1,448 -> 1,403; at rank 16 the rule faster (V 85 -> 142, 177 ->
#: 482). Only G = 1 measured; G = 2 reaches 1,024 columns at rank 128
FMA_V_FROM_COLUMNS = 1024


#: the K-pass knobs only the Triton K pass takes
TRITON_K_KNOBS = ("res_warps", "res_stages", "res_pack", "res_heads")


def triton_k_knobs(B: int, NQ: int, VPR: int, has_k: bool) -> dict:
    """The Triton K pass's knobs for a bf16/fp16 call (:data:`TRITON_K_RULE`) with its fp16 rebuild: the rebuild
    accumulated in fp16, rotated and scored from fp16 operands, for decode calls of :data:`TRITON_F16_FROM`+ vectors
    per KV head (v15, one H100, two sweeps: 32 agents 390.9 -> 381.9 and 390.0 -> 385.2 µs, 128 agents 1,434.4 ->
    1,391.5 and 1,435.9 -> 1,394.0; at 8 agents 146.1 -> 147.7 and at 1 agent 79.5 -> 84.0, the queries' and B_k's
    conversions, so not below 128 vectors; extend calls unmeasured). The rule's where it does not take the Gluon K
    pass, and :func:`~.cascade.cascade_attention`'s where a call cannot take it."""
    return {**TRITON_K_RULE, "res_f16": has_k and NQ == 1 and B * VPR >= TRITON_F16_FROM}


def asks_triton_k_pass(res_form: str | None = None, res_f16: bool | None = None, res_score: str | None = None,
                       **knobs) -> bool:
    """Whether a call's given K-pass knobs ask for the Triton K pass where the rule picks the Gluon one: a Triton
    form named, the fp16 rebuild refused (the Gluon form measured is the fp16 one), CUDA-core scores, or one of
    :data:`TRITON_K_KNOBS` given."""
    return (res_form not in (None, "gluon") or res_f16 is False or res_score not in (None, "mma_sync", "mma")
            or any(knobs.get(k) is not None for k in TRITON_K_KNOBS))


def launch_defaults(B: int, NQ: int, VPR: int, has_k: bool, has_v: bool, dtype: torch.dtype,
                    v_rank: int = 16, agent_rows: int = 1) -> dict:
    """The launch knobs :func:`~.cascade.cascade_attention` uses on the GPU where a call does not give them, for
    ``B`` rows of ``NQ`` queries (``VPR`` query vectors per row and KV head) in ``dtype``, with a V residual of rank
    ``v_rank`` and at most ``agent_rows`` rows per agent of the K residual.
    bf16/fp16: the fastest passing rules of the v8 sweep (eval/results/sweep_kernel_v8_nvidia_h200.json
    ``extra.summary``: H200, T=32K, 8/32/128 agents; eval/KERNEL_NOTES.md "v8 measured"; the V residual's pipeline
    stages: sweep_kernel_v13b_nvidia_h200.json, "v13b measured"; the merge: sweep_kernel_v12b_nvidia_h200.json, "v12b
    measured"; the K pass: sweep_kernel_v11c_nvidia_h200.json and sweep_kernel_v11e_nvidia_h200.json, "v11c
    measured"; its fp16 form: sweep_kernel_v15{,b}_nvidia_h100.json, "v15 measured"; the Gluon K pass:
    :data:`GLUON_K_FROM`).
    Whole waves: every split count rounds down to whole waves of the kernel's resident programs (2 per SM for the
    shared part, 1 for its 8-warp tile; the K pass aims at 4 per SM: two waves of its 2 resident 8-warp programs, which
    measured as fast as one in v11c)."""
    if dtype == torch.float32:  # fp32 tiles take twice the shared memory (not in the sweep: v7's settings)
        return dict(block_t=32, num_warps=4, num_stages=1, programs_per_sm=4 if has_k and B * NQ >= 32 else 2,
                    whole_waves=False, res_form="halves", res_block_t=32, res_warps=4, res_stages=1,
                    res_maxnreg=None, res_programs_per_sm=4, res_whole_waves=False, res_pack=1, res_satfinite=False,
                    res_score="mma", res_f16=False, merge_unroll=1, merge_chunk=1, merge_first=False, pdl=False,
                    shared_form="triton", shared_k_load="softmax")
    # one block of at most 32 vectors (8 agents): 128-token tiles on 8 warps, one program per SM (base 59.5 -> 51.4
    # µs, K+V 240.6 -> 164.9); not for the V residual alone (89.2 -> 109.3 µs)
    few = B * VPR <= 32
    wide = few and (has_k or not has_v)
    # the V residual alone: 2 stages from 33 vectors on (3 stages give its 64-vector program 176 KiB, one per SM: 32
    # agents 118.2 -> 121.2-132.6 µs), 3 up to 32 vectors at rank <= 16 (the u_v tile double-buffered, two programs
    # per SM still: v13b, 8 agents 75.1 -> 69.8 µs, 1 agent 65.4 -> 55.8; a higher rank's wider u_v tile would leave
    # one program per SM, unmeasured)
    piped_v = few and v_rank <= 16
    # both residuals, decode, from 32 vectors: the Gluon kernel with K's scores through its cp.async ring (v35b, one
    # H200, whole K+V calls in two orders, Triton -> Gluon µs: 8 agents 138.0 / 139.1 -> 134.3 / 133.2, 16 229.2 ->
    # 205.3, 32 370.8 / 370.4 -> 344.2 / 345.5, 64 706.2 -> 655.7, 128 1,378.0 / 1,369.8 -> 1,284.2 / 1,276.7; at 1
    # and 4 agents 66.2 -> 77.5 and 93.7 -> 100.8; sweep_kernel_v35{ba,bb,c}_nvidia_h200.json; where the ring cannot
    # take a call, the Triton kernel; contexts not a multiple of 16 tokens take the ring too since its GPU tests passed
    # at 129 and 2,053 tokens, v36)
    kv_decode = has_k and has_v and NQ == 1 and B * VPR >= 32
    gluon_kv = kv_decode and max(1, 16 // VPR) * pow2(v_rank, 1) <= GLUON_KV_MAX_COLUMNS
    # ... and its K pass in Gluon from GLUON_K_FROM vectors, an agent's rows holding at most GLUON_K_ROW_VECTORS
    # (TRITON_K_RULE elsewhere; where a call cannot take the Gluon K pass, cascade_attention falls back to it)
    # (v49's MHA calls beyond GLUON_KV_MAX_COLUMNS measured with it and the Triton shared kernel)
    gluon_k = kv_decode and B * VPR >= GLUON_K_FROM and agent_rows * VPR <= GLUON_K_ROW_VECTORS
    return dict(block_t=128 if wide else (32 if has_k and B * NQ >= 32 else 64), num_warps=8 if wide else 4,
                num_stages=2 if has_v and not has_k and not piped_v else 3, programs_per_sm=1 if wide else 2,
                whole_waves=True,
                # the Gluon K pass with its fp16 rebuild (the form v39 swept, at 16-24 agents too), or the Triton one
                **({**GLUON_RULE, "res_f16": True} if gluon_k else triton_k_knobs(B, NQ, VPR, has_k)),
                # the merge: the splits' partials merged first, before the private part, one split per step unrolled
                # by 2 (v12b, same run, against v10b's rule of chunks of 16 up to 8 agents and one split unrolled by
                # 2 from 9: 32 agents base 61.1 -> 56.5 µs, V 125.3 -> 117.6, K+V 391.2 -> 387.0; 1 agent base 46.1
                # -> 43.9, V 67.6 -> 65.6, K+V 70.9 -> 68.5; 8 agents 49.1 -> 46.9 / 77.0 -> 75.1 / 141.4 -> 140.1;
                # 128 agents 178.5 -> 176.7 / 402.8 -> 397.8 / 1,438.5 -> 1,434.2)
                merge_unroll=2, merge_chunk=1, merge_first=True,
                # the merge as a programmatic dependent launch, let start after the shared kernel's context loop (v19,
                # one H100, two sweeps each, µs: base only 1 / 8 / 32 / 128 agents 55.8 -> 54.8, 59.2 -> 57.8, 64.1 ->
                # 62.9, 181.8 -> 176.8; V only 1 / 8 agents 68.0 -> 65.2, 76.7 -> 73.5; K+V 8 / 32 agents 146.6 ->
                # 145.4, 378.8 -> 375.4, at 1 / 128 within 0.2%); not for the V residual alone beyond 32 vectors
                # (32 agents 119.4 -> 128.8, 128 agents 382.2 -> 415.9); "early" (every kernel letting the next start
                # at once) lost at 8 agents (V only +4.9%, K+V +1.6%) and won more than "merge" only for V only at 1
                # agent (-5.7% against -4.1%), base only at 128 (-4.1% against -2.8%) and V only from 32 agents (-0.7
                # / -0.9%, within the run-to-run spread, where "merge" loses);
                # sweep_kernel_v19{a,b,ma,mb,ra,rb}_nvidia_h100.json, eval/KERNEL_NOTES.md "v19"
                pdl=False if has_v and not has_k and not few else "merge",
                # the shared part in Gluon (its softmax under the next tile's score MMA, K/V by TMA into 3 buffers,
                # :data:`~.shared_gluon.GLUON_SHARED_RULE`) without residuals from 192 query vectors per KV head
                # (v21, one H100, base only at 128 agents: its kernel 150.0 / 150.9 / 151.1 -> 139.2 / 139.5 µs in
                # three profiles; v22/v23, one H100, whole calls in five sweeps, two orders: 48 agents 71.1-75.9 ->
                # 68.6-71.1, 64 agents 93.5-95.3 -> 83.7-89.5, 96 agents 141.5-144.6 -> 132.1-136.5, 128 agents
                # 167.3-178.4 -> 167.4-171.7; at 32 agents 62.5-62.6 -> 64.0-64.4, at 1 and 8 agents 55.1-58.9 ->
                # 60.7-65.0 (v21): the Triton kernel below 192 vectors, 129-191 unmeasured;
                # profile_kernel_v21*_nvidia_h100.json, sweep_kernel_v2{1a,1c,2a,3b,3c,3d,3e}_nvidia_h100.json; the K
                # residual's scores it also takes, not picked for them: below); with the V residual alone from
                # 32 vectors (v25/v26, one H100, whole calls, two orders each, Triton -> Gluon µs: 8 agents 73.6-75.3
                # -> 71.5-72.8, 12 81.4-81.5 -> 78.5, 16 90.3-90.6 -> 81.2-81.4, 24 117.1-117.6 -> 91.2-91.3, 32
                # 119.4-119.5 -> 94.3-95.8, 128 380.3-385.4 -> 315.5-326.2; at 1 agent 65.8 -> 66.3-66.6, 2-7
                # unmeasured; sweep_kernel_v25{va,vb}, v26{ta,tb}_nvidia_h100.json; decode calls only, extend calls
                # unmeasured; where it cannot take a call, e.g. ranks other than 8/16/32, the Triton kernel); with K's
                # scores it lost at every size (v25: 32 agents 373.6-377.6 -> 391.6-395.9, 128 1,389.0-1,391.0 ->
                # 1,444.4-1,457.4)
                shared_form="gluon" if gluon_kv or not has_k and (B * VPR >= 192 if not has_v else NQ == 1 and
                                                                   B * VPR >= 32) else "triton",
                shared_k_load="ring" if gluon_kv else "softmax")
