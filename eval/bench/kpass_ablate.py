"""What binds the K pass? Its step taken apart: one replica of the library's K pass (``forkkv_kernels.kres_pass``, the
decode rule: joined form, fp16 rebuild, 128-token tiles of 8 warps, 3 stages, cap 128 registers, one KV head per
score tile) whose parts can be left out, timed at the benchmark's shapes (H_kv = 8, G = 4, D = 128, r = 16, one decode
query per agent, 32K context) on the same grid as the library's pass.

Parts (each variant leaves out some; what is left out is replaced by what keeps the rest from being optimised away):
``load`` (the u and cos/sin tiles read per tile; without: read once, before the loop), ``rot`` (the RoPE rotation of
the rebuilt tile; without: the rebuilt tile scored as it is), ``score`` (the score MMA; without: the rebuilt tile's
row sums stand in for its result), ``store`` (the score tile written per tile and head; without: accumulated
in registers, written once per program); two variants add back the library's generality (``all_masked``: its
masks on the loads; ``all_gather``: its lookups of the agent's slot and rows and the queries' gather). The variant
with every part is checked against the library's pass first (same scores, bit for bit) and timed beside it, so the
replica's time can stand for the pass's. The difference between two variants is what that part costs where the
others run; the MMA-only variant is the pass's tensor-core time at this tile shape (its floor within this design).

    python -m eval.bench.kpass_ablate [--agents 32 128] [--context 32768] [--out eval/results/kpass_ablate_<gpu>.json]
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from forkkv_kernels.attention_common import split_length

from .runner import BenchmarkRun

HKV, G, D, R, MQ, BLOCK_T = 8, 4, 128, 16, 16, 128
#: the replica's parts: each variant keeps those set (``LOAD``, ``ROT``, ``SCORE``, ``STORE``) and adds back the
#: library's generality where set (``MASK``: the tile loads masked to the split's end, the B and query loads to their
#: dims, as the library's kernel; ``GATHER``: the agent's slot and rows looked up through the slot order before the
#: loop, the queries gathered per column through them)
PARTS = ("LOAD", "ROT", "SCORE", "STORE", "MASK", "GATHER")
VARIANTS = {
    "all": dict(LOAD=True, ROT=True, SCORE=True, STORE=True),
    "all_masked": dict(LOAD=True, ROT=True, SCORE=True, STORE=True, MASK=True),
    "all_gather": dict(LOAD=True, ROT=True, SCORE=True, STORE=True, GATHER=True),
    "no_store": dict(LOAD=True, ROT=True, SCORE=True, STORE=False),
    "no_rot": dict(LOAD=True, ROT=False, SCORE=True, STORE=True),
    "no_load": dict(LOAD=False, ROT=True, SCORE=True, STORE=True),
    "no_score": dict(LOAD=True, ROT=True, SCORE=False, STORE=True),
    "no_rot_store": dict(LOAD=True, ROT=False, SCORE=True, STORE=False),
    "mma_only": dict(LOAD=False, ROT=False, SCORE=True, STORE=False),
    "rebuild_only": dict(LOAD=False, ROT=False, SCORE=False, STORE=False),
}


def flags(variant: str) -> dict:
    return {p: VARIANTS[variant].get(p, False) for p in PARTS}


@triton.jit
def _kpass_ablate_kernel(Q, UK, BK, COS, SIN, R_OUT, KSLOT, ORDER, T, split_len, qk_scale, n_rank,
                         HKV: tl.constexpr, G: tl.constexpr, HALF: tl.constexpr, RK: tl.constexpr, MQ: tl.constexpr,
                         BLOCK_T: tl.constexpr, LOAD: tl.constexpr, ROT: tl.constexpr, SCORE: tl.constexpr,
                         STORE: tl.constexpr, MASK: tl.constexpr, GATHER: tl.constexpr):
    """The joined fp16 K pass for agent ``program_id(0)`` (one row of G vectors per KV head), split
    ``program_id(1)``: ``Q [A, HKV, G, 2·HALF]`` fp16, ``UK [A, T, RK]`` bf16, ``BK [A, HKV·2·HALF, RK]`` fp16,
    ``COS``/``SIN [T, 2·HALF]`` bf16 (halves equal), ``R_OUT [HKV, A·G, T]`` fp16; ``KSLOT``/``ORDER [A]`` int32
    (the identity here) for ``GATHER``; ``n_rank``: ``RK`` as the runtime value the library's masks compare with."""
    a = tl.program_id(0)
    split = tl.program_id(1)
    d = tl.arange(0, HALF)
    rk = tl.arange(0, RK)
    col = tl.arange(0, MQ)
    ok = col < G
    jn = tl.arange(0, 2 * HALF)
    q_row = (a * HKV * G + col) * (2 * HALF)  # the agent's row's query vector of each column, KV head 0
    if GATHER:  # as the library: the agent's slot through the rows' order, each column's row through it again
        a = tl.load(KSLOT + tl.load(ORDER + a))
        rowc = tl.load(ORDER + a + col * 0, mask=ok, other=0)
        ok = ok & (tl.load(KSLOT + rowc, mask=ok, other=-1) == a)
        q_row = (rowc * HKV * G + col % G) * (2 * HALF)
    u_base = UK + a.to(tl.int64) * T * RK
    b_base = BK + a.to(tl.int64) * (HKV * 2 * HALF * RK)
    t_begin = split * split_len
    t_end = tl.minimum(T, t_begin + split_len)
    t_first = t_begin + tl.arange(0, BLOCK_T)
    u0 = tl.load(u_base + t_first[:, None] * RK + rk[None, :]).to(tl.float16)
    c0 = tl.load(COS + t_first[:, None] * (2 * HALF) + d[None, :]).to(tl.float16)
    s0 = tl.load(SIN + t_first[:, None] * (2 * HALF) + d[None, :]).to(tl.float16)
    keep = tl.zeros([BLOCK_T, MQ], tl.float32)
    for t0 in range(t_begin, t_end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        if LOAD and MASK:
            tm = t < t_end
            u = tl.load(u_base + t[:, None] * RK + rk[None, :], mask=tm[:, None] & (rk < n_rank)[None, :],
                        other=0.0).to(tl.float16)
            c = tl.load(COS + t[:, None] * (2 * HALF) + d[None, :], mask=tm[:, None] & (d < HALF)[None, :],
                        other=0.0).to(tl.float16)
            s = tl.load(SIN + t[:, None] * (2 * HALF) + d[None, :], mask=tm[:, None] & (d < HALF)[None, :],
                        other=0.0).to(tl.float16)
        elif LOAD:
            u = tl.load(u_base + t[:, None] * RK + rk[None, :]).to(tl.float16)
            c = tl.load(COS + t[:, None] * (2 * HALF) + d[None, :]).to(tl.float16)
            s = tl.load(SIN + t[:, None] * (2 * HALF) + d[None, :]).to(tl.float16)
        else:
            u = u0
            c = c0
            s = s0
        for h in range(HKV):
            if MASK:
                bT = tl.load(b_base + (h * 2 * HALF + jn[None, :]) * RK + rk[:, None],
                             mask=((jn % HALF) < HALF)[None, :] & (rk < n_rank)[:, None], other=0.0)
                qn = tl.load(Q + (q_row + h * G * (2 * HALF))[None, :] + jn[:, None],
                             mask=ok[None, :] & ((jn % HALF) < HALF)[:, None], other=0.0)
            else:
                bT = tl.load(b_base + (h * 2 * HALF + jn[None, :]) * RK + rk[:, None])
                qn = tl.load(Q + (q_row + h * G * (2 * HALF))[None, :] + jn[:, None], mask=ok[None, :], other=0.0)
            x = tl.dot(u, bT, out_dtype=tl.float16)
            if ROT:
                x_lo, x_hi = tl.split(tl.permute(tl.reshape(x, [BLOCK_T, 2, HALF]), (0, 2, 1)))
                k_lo = x_lo * c - x_hi * s
                k_hi = x_hi * c + x_lo * s
                k = tl.reshape(tl.permute(tl.join(k_lo, k_hi), (0, 2, 1)), [BLOCK_T, 2 * HALF])
            else:
                k = x
            if SCORE:
                r = tl.dot(k, qn, out_dtype=tl.float32) * qk_scale
            else:  # the rebuilt (rotated) tile's row sums stand in for the scores
                r = tl.broadcast_to(tl.sum(k, 1).to(tl.float32)[:, None], [BLOCK_T, MQ]) * qk_scale
            if STORE:
                vec = (h * tl.num_programs(0) + a) * G + col
                tl.store(R_OUT + vec[None, :].to(tl.int64) * T + t[:, None], r.to(tl.float16),
                         mask=(t < t_end)[:, None] & ok[None, :])
            else:
                keep += r
    if not STORE:
        vec = a * G + col
        tl.store(R_OUT + vec[None, :].to(tl.int64) * T + t_first[:, None], keep.to(tl.float16),
                 mask=ok[None, :])


def make_inputs(A: int, T: int, device="cuda"):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(A, HKV * G, 1, D, device=device, generator=g, dtype=torch.bfloat16)
    u = (torch.randn(A, T, R, device=device, generator=g) * 0.5).to(torch.bfloat16)
    B = (torch.randn(A, HKV * D, R, device=device, generator=g) * 0.05).to(torch.bfloat16)
    pos = torch.arange(T, device=device, dtype=torch.float32)
    inv = 500000.0 ** (-torch.arange(0, D, 2, device=device, dtype=torch.float32) / D)
    ang = torch.outer(pos, inv)
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(torch.bfloat16).contiguous()
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(torch.bfloat16).contiguous()
    return q, u, B, cos, sin


def library_pass(q, u, B, cos, sin, scale, sms, interp=False):
    """The library's Triton K pass under its rule (``TRITON_K_RULE``, the decode rule's K-pass knobs below
    ``GLUON_K_FROM`` vectors; the fp16 form at any count, so that the replica's arithmetic is the rule's), as the
    library calls it: ``B`` kept in fp16, the queries converted per call (one more kernel in the timed call, ~3 µs).
    Returns (run, its output, knobs)."""
    from forkkv_kernels.kres_pass import launch_kres_scores
    from forkkv_kernels.rules import TRITON_K_RULE

    A, T = q.shape[0], u.shape[1]
    rule = TRITON_K_RULE
    knobs = {k: v for k, v in rule.items() if k != "res_whole_waves"}
    knobs["res_f16"] = True
    slot = torch.arange(A, device=q.device, dtype=torch.int32)
    out = torch.empty(HKV, A * G, T, device=q.device, dtype=torch.float16)
    B16 = B.to(torch.float16)  # kept with the residual, as the library's adapter and compiled decode pass it

    def run():
        return launch_kres_scores(q, u, B, cos, sin, slot, slot, out, scale, VPR=G, rope_half=True, lowp=True,
                                  prec="tf32", interp=interp, sms=sms, k_agents=A, k_max_rows=1,
                                  whole_waves=rule["res_whole_waves"], k_B16=B16, **knobs)
    return run, out, knobs


def f16_inputs(q, B, scale):
    """The replica's fp16 queries ``[A, HKV, G, D]``, ``B`` and score scale, converted as the library's launcher
    converts them (``forkkv_kernels.kres_pass.f16_queries``; outside the timed kernel, as the library keeps ``B`` in
    fp16 with the residual)."""
    from forkkv_kernels.kres_pass import f16_queries

    q16, scale16 = f16_queries(q, scale)
    return q16.reshape(q.shape[0], HKV, G, D).contiguous(), B.to(torch.float16), scale16


def replica(q16, u, B16, cos, sin, scale16, split_len, out, variant="all"):
    """Launch the replica (``variant``: a name of :data:`VARIANTS`) into ``out [HKV, A·G, T]`` fp16, on
    :func:`f16_inputs`' queries, ``B`` and scale and the library pass's ``u`` and cos/sin; returns the compiled
    kernel."""
    A, T = q16.shape[0], u.shape[1]
    order = torch.arange(A, device=u.device, dtype=torch.int32)
    return _kpass_ablate_kernel[(A, triton.cdiv(T, split_len))](
        q16, u, B16, cos, sin, out, order, order, T, split_len, scale16, R, HKV=HKV, G=G, HALF=D // 2, RK=R,
        MQ=MQ, BLOCK_T=BLOCK_T, **flags(variant), num_warps=8, num_stages=3, maxnreg=128)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    run = BenchmarkRun("kpass_ablate", params={"context": args.context, "agents": args.agents, "shape": {
        "kv_heads": HKV, "group": G, "head_dim": D, "rank": R, "block_t": BLOCK_T, "warps": 8, "stages": 3,
        "maxnreg": 128}, "variants": {v: flags(v) for v in VARIANTS}},
        case_keys=["agents", "variant"], out=args.out)
    T, scale = args.context, D**-0.5 * 1.4426950408889634
    for A in args.agents:
        q, u, B, cos, sin = make_inputs(A, T)
        lib, lib_out, knobs = library_pass(q, u, B, cos, sin, scale, sms)
        lib()
        split_len = split_length(T, BLOCK_T, A, knobs["res_programs_per_sm"] * sms, None, True)
        grid = [A, triton.cdiv(T, split_len)]
        out = torch.zeros(HKV, A * G, T, device="cuda", dtype=torch.float16)
        q16, B16, scale16 = f16_inputs(q, B, scale)
        replica(q16, u, B16, cos, sin, scale16, split_len, out)
        torch.cuda.synchronize()
        err = (out.float() - lib_out.float()).abs().max().item()
        ref = lib_out.float().abs().max().item()
        print(f"agents {A}: replica vs library max |diff| {err:.3g} (scores up to {ref:.3g}); grid {grid}",
              flush=True)
        if not err <= 1e-2 * max(ref, 1.0):
            raise SystemExit("the replica's scores are not the library's: fix the replica before timing it")
        run.measure({"agents": A, "variant": "library"},
                    lambda: {"us": triton.testing.do_bench(lib, warmup=25, rep=200) * 1e3, "knobs": knobs,
                             "grid": grid, "max_abs_diff_vs_replica": err})
        for name in VARIANTS:
            k = replica(q16, u, B16, cos, sin, scale16, split_len, out, name)
            run.measure({"agents": A, "variant": name},
                        lambda: {"us": triton.testing.do_bench(
                            lambda: replica(q16, u, B16, cos, sin, scale16, split_len, out, name), warmup=25,
                            rep=200) * 1e3, "n_regs": k.n_regs, "n_spills": k.n_spills, "shared": k.metadata.shared})
    run.finish()


if __name__ == "__main__":
    main()
