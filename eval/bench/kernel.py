"""Benchmark: ForkKV decode ResidualAttention (K+V residuals, V residual only, shared base only) vs SDPA over
materialised per-agent K/V, and the floors.

One Llama-3.1-8B-shaped attention layer (32 query heads, 8 KV heads, head_dim 128), bf16, rank-16 residuals, N agents
(one row each, one query each), a shared context of T tokens and 64 private tokens per row. For each (T, N):

- ``cascade_s`` / ``forkkv_v_s`` / ``forkkv_base_s``: the cascade kernels (through
  :func:`forkkv_hf.ops.dispatch.residual_attention_triton`) with K and V residuals, with the V residual only
  (no row has a K residual), and over the shared base only (no residual at all);
- ``forkkv_s``: K+V through the dispatch (the cascade kernels with the launcher's defaults; ``cascade_s`` with the
  knobs of ``--tuning-from`` where given). Result files before the fused-rebuild family's removal also hold its time,
  ``fused_s``, and the family the dispatch then chose, ``forkkv_kernel``;
- ``sdpa_s``: what a PEFT user runs today, ``scaled_dot_product_attention`` over each agent's own full K/V (base +
  residual materialised, plus private) with ``enable_gqa`` (PyTorch picks the backend); ``sdpa_flash_s``: the same
  forced onto FlashAttention-2 (K/V heads repeated to 32) where that fits in memory;
- ``floor_s`` / ``floor_v_s`` / ``floor_base_s``: max(bytes that must be read / measured HBM bandwidth, FLOPs /
  measured bf16 matmul rate) of each variant (bytes: one base copy + the residuals it uses + private parts + queries
  and outputs; FLOPs: QK and PV over T + P, the K residual's rebuild, the V residual's P·u_v and B_v).

Times are the GPU time of one call: a CUDA graph of ``GRAPH_CALLS`` calls replayed, ``do_bench`` median, divided by
the calls. The same calls timed eagerly from Python (``*_eager_s``: what one un-captured call costs, launch overhead
included) are recorded beside them. The kernel's output is checked against SDPA at every size. Result: the one
schema (eval/bench/schema.py), rows keyed by (context, agents), the measured ceilings and the compiled kernels'
resource use in ``extra``. ``--tuning-from``: run each variant with the knobs a sweep (eval/bench/sweep_kernel.py) found
fastest at the nearest agent count instead of the launcher's defaults (each row records its ``*_knobs``).

    python -m eval.bench.kernel [--contexts 4096 16384 32768] [--agents 1 8 32 128] [--tuning-from SWEEP.json]
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from ..cli import positive_int
from .measure import GRAPH_CALLS, graph_time
from .runner import BenchmarkRun

H, HKV, D, RANK, PRIVATE = 32, 8, 128, 16, 64


def measure_ceilings(do_bench) -> dict:
    """HBM bandwidth from a large device-to-device copy (bytes read + written) and the bf16 matmul rate."""
    n = 1 << 30  # 1 GiB
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    a.random_(0, 255)
    t = do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median") * 1e-3
    bw = 2 * n / t
    m = 8192
    x = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    t = do_bench(lambda: x @ y, warmup=25, rep=200, return_mode="median") * 1e-3
    flops = 2 * m**3 / t
    del a, b, x, y
    torch.cuda.empty_cache()
    return {"hbm_bytes_per_s": bw, "bf16_flops_per_s": flops}


def make_case(T: int, N: int, dtype=torch.bfloat16, seed=0, device="cuda", queries: int = 1, rank: int = RANK,
              kv_heads: int = HKV):
    """A decode step: N rows (agent i on row i), ``queries`` new tokens each (1: decode; more: an extend call, the
    last ``queries`` of the private tokens), shared T + private PRIVATE tokens, ``kv_heads`` KV heads (32: MHA)."""
    HKV = kv_heads  # noqa: N806
    from forkkv_hf.cache import ForkKVView
    from forkkv_hf.context import Residual, SharedLayer

    g = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, device=device, generator=g, dtype=torch.float32)  # noqa: E731
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D))
    f = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv)
    emb = torch.cat([f, f], -1)
    res = lambda: Residual(  # noqa: E731
        tuple(f"a{i}" for i in range(N)), rnd(N, T, rank).to(dtype), (rnd(N, HKV * D, rank) * 0.05).to(dtype), (rank,) * N
    )
    shared = SharedLayer(rnd(1, HKV, T, D).to(dtype), rnd(1, HKV, T, D).to(dtype), emb.cos().to(dtype),
                         emb.sin().to(dtype), res(), res())
    rows = torch.arange(N, device=device)
    view = ForkKVView(shared, rows, rows, rnd(N, HKV, PRIVATE, D).to(dtype), rnd(N, HKV, PRIVATE, D).to(dtype),
                      tuple(f"a{i}" for i in range(N)), tuple(range(N)), tuple(range(N)))
    q = rnd(N, H, queries, D).to(dtype)
    return q, view


VARIANTS = ("kv", "v", "base")


def variant_view(view, variant: str):
    """The same rows with K+V residuals (``kv``), the V residual only (``v``) or none (``base``)."""
    if variant == "kv":
        return view
    none = dict(k_rows=None, k_slots=None)
    if variant == "base":
        none.update(v_rows=None, v_slots=None)
    return dataclasses.replace(view, **none)


def row_kv(view, lo: int, hi: int, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``lo:hi``'s full K/V ``[hi - lo, H_kv, T + P, D]`` (base + each row's residuals where it has them, then its
    private part), computed in fp32 and stored in ``dtype`` (default: the view's)."""
    from forkkv_hf.ops.rope import apply_rope

    sh = view.shared
    _, Hkv, T, Dh = sh.key.shape
    dt = dtype or sh.key.dtype
    K = sh.key.float().expand(hi - lo, -1, -1, -1).clone()
    V = sh.value.float().expand(hi - lo, -1, -1, -1).clone()
    for res, rows, dst, rope in ((sh.k_res, view.k_rows, K, True), (sh.v_res, view.v_rows, V, False)):
        if res is None or rows is None:
            continue
        slots = rows[lo:hi].clamp(min=0)
        d = (res.u[slots].float() @ res.B[slots].float().transpose(1, 2)).view(hi - lo, T, Hkv, Dh).transpose(1, 2)
        d = d * (rows[lo:hi] >= 0).view(-1, 1, 1, 1)
        dst += apply_rope(d, sh.cos.float(), sh.sin.float()) if rope else d
    return (torch.cat([K, view.key[lo:hi].float()], 2).to(dt), torch.cat([V, view.value[lo:hi].float()], 2).to(dt))


def materialise(view, chunk=8, dtype=None):
    """Every row's full K/V ``[N, H_kv, T + P, D]`` in ``dtype`` (default: the view's; what a PEFT user's cache
    holds)."""
    N, sh = view.batch_size, view.shared
    _, Hkv, T, Dh = sh.key.shape
    K = torch.empty(N, Hkv, T + view.private_len, Dh, device=sh.key.device, dtype=dtype or sh.key.dtype)
    V = torch.empty_like(K)
    for i in range(0, N, chunk):
        K[i:i + chunk], V[i:i + chunk] = row_kv(view, i, min(N, i + chunk), K.dtype)
    return K, V


def materialised_attention(q, K, V, scale: float) -> torch.Tensor:
    """SDPA of ``q [N, H, nq, D]`` over materialised ``K``/``V [N, H_kv, L, D]``, the ``nq`` new tokens being the last
    of the ``L``: each sees everything up to itself (decode: everything). ``[N, H, nq, D]``."""
    nq, L = q.shape[2], K.shape[2]
    mask = None if nq == 1 else (torch.arange(L, device=q.device)[None, :]
                                 <= torch.arange(L - nq, L, device=q.device)[:, None])
    return torch.nn.functional.scaled_dot_product_attention(q, K, V, attn_mask=mask, scale=scale, enable_gqa=True)


def reference(q, view, scale: float, chunk=8) -> tuple[torch.Tensor, float]:
    """The exact attention of ``q [N, H, 1, D]`` over the view's rows, ``[N, 1, H, D]`` fp32 (from the view's own
    low-precision tensors, in fp32), and the error of the same attention done by PyTorch in the view's dtype
    (materialised K/V, SDPA): the pass rule's unit (tests: a kernel may err by 3x that)."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ref, err = [], 0.0
    for i in range(0, view.batch_size, chunk):
        j = min(view.batch_size, i + chunk)
        K, V = row_kv(view, i, j, torch.float32)
        exact = sdpa(q[i:j].float(), K, V, scale=scale, enable_gqa=True)
        low = sdpa(q[i:j], K.to(q.dtype), V.to(q.dtype), scale=scale, enable_gqa=True)
        err = max(err, (low.float() - exact).abs().max().item())
        ref.append(exact.transpose(1, 2))
        del K, V
    return torch.cat(ref), err


def floors(T: int, N: int, ceil: dict, itemsize: int = 2, queries: int = 1, rank: int = RANK,
           kv_heads: int = HKV) -> dict:
    """Bytes, FLOPs and floor of each variant (the problem's minimum, whatever the kernel's formulation), for
    ``queries`` new tokens per row (the K residual's rebuild is shared by them)."""
    HKV = kv_heads  # noqa: N806
    base_b = 2 * HKV * T * D * itemsize + N * 2 * HKV * PRIVATE * D * itemsize + 2 * N * queries * H * D * itemsize
    base_f = N * queries * 4 * (T + PRIVATE) * D * H
    u_b = N * T * rank * itemsize + N * HKV * D * rank * itemsize
    v_f = N * queries * (2 * T * rank * H + 2 * rank * D * H)
    k_f = N * 2 * T * rank * HKV * D
    out = {}
    for name, nbytes, flops in (("base", base_b, base_f), ("v", base_b + u_b, base_f + v_f),
                                ("kv", base_b + 2 * u_b, base_f + v_f + k_f)):
        t = max(nbytes / ceil["hbm_bytes_per_s"], flops / ceil["bf16_flops_per_s"])
        suffix = "" if name == "kv" else f"_{name}"
        out.update({f"bytes{suffix}": nbytes, f"flops{suffix}": flops, f"floor{suffix}_s": t})
    return out


def _time(fn, do_bench) -> tuple[float, float]:
    eager = do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
    return graph_time(fn, do_bench), eager


def swept_knobs(best: dict, variant: str, N: int) -> dict:
    """The knobs eval.bench.sweep_kernel found fastest for ``variant`` at the swept agent count nearest ``N``: its
    ``combined`` stage where it ran, else the union of the stages' (the shared part and the merge, plus the K pass for
    ``kv``); whole-wave split counts as the rule that gives them (``rule``); {} without a sweep."""
    def nearest(stage):
        points = [(int(k.split(":")[1]), b) for k, b in best.items() if k.startswith(f"{stage}/{variant}/")]
        if not points:
            return None
        b = min(points, key=lambda p: abs(p[0] - N))[1]
        return {k: v for k, v in b.get("rule", b["config"]).items() if v is not None}

    combined = nearest("combined")
    if combined is not None:
        return combined
    out = {}
    for stage in ("kres", "shared", "merge") if variant == "kv" else ("shared", "merge"):
        out.update(nearest(stage) or {})
    return out


def measure_case(T: int, N: int, ceil: dict, do_bench, best: dict | None = None, launches: dict | None = None,
                 queries: int = 1, rank: int = RANK, kv_heads: int = HKV) -> dict:
    """One (context, agents) case with ``queries`` new tokens per row. ``launches``: ``{"cascade": {}}`` to receive
    the compiled kernels (for :func:`kernel_resources`)."""
    from forkkv_hf.ops.dispatch import residual_attention_triton

    launches = launches if launches is not None else {"cascade": {}}

    from forkkv_kernels.attention_common import pow2
    from forkkv_kernels.cascade import launch_defaults

    HKV = kv_heads  # noqa: N806
    q, view = make_case(T, N, queries=queries, rank=rank, kv_heads=HKV)
    scale = D**-0.5
    # the K pass's rule at this point (what the defaults columns ran; e.g. res_f16 from 32 decode agents, v15)
    rule = launch_defaults(N, queries, pow2(queries * (H // HKV), 1), True, True, q.dtype, rank)
    row = {"rank": rank, "private": PRIVATE, "kres_rule": {k: v for k, v in rule.items() if k.startswith("res_")}}
    for variant in VARIANTS:
        vv = variant_view(view, variant)
        key = "cascade" if variant == "kv" else f"forkkv_{variant}"
        knobs = row[f"{key}_knobs"] = swept_knobs(best or {}, variant, N)
        row[f"{key}_s"], row[f"{key}_eager_s"] = _time(
            lambda: residual_attention_triton(q, vv, None, scale, launches=launches["cascade"], **knobs), do_bench)
    if row["cascade_knobs"]:  # K+V as the dispatch runs it: the launcher's defaults
        row["forkkv_s"], row["forkkv_eager_s"] = _time(lambda: residual_attention_triton(q, view, None, scale),
                                                       do_bench)
    else:
        row["forkkv_s"], row["forkkv_eager_s"] = row["cascade_s"], row["cascade_eager_s"]
    out = residual_attention_triton(q, view, None, scale, **row["cascade_knobs"])
    try:
        K, V = materialise(view)
        sdpa = lambda: materialised_attention(q, K, V, scale)  # noqa: E731
        row["max_abs_err_vs_sdpa"] = (out.float() - sdpa().transpose(1, 2).float()).abs().max().item()
        row["sdpa_s"], row["sdpa_eager_s"] = _time(sdpa, do_bench)
        row["materialised_kv_bytes"] = 2 * K.numel() * K.element_size()
        if queries == 1 and N * H * (T + PRIVATE) * D * 2 * 2 < 40 * 2**30:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            Kr, Vr = K.repeat_interleave(H // HKV, 1), V.repeat_interleave(H // HKV, 1)
            del K, V

            def flash():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return torch.nn.functional.scaled_dot_product_attention(q, Kr, Vr, scale=scale)

            row["sdpa_flash_s"] = do_bench(flash, warmup=25, rep=100, return_mode="median") * 1e-3
            del Kr, Vr
    except torch.cuda.OutOfMemoryError:
        row["sdpa_error"] = "out of memory materialising per-agent K/V"
    torch.cuda.empty_cache()
    row.update(floors(T, N, ceil, queries=queries, rank=rank, kv_heads=HKV))
    if "sdpa_s" in row:
        row["speedup_vs_sdpa"] = row["sdpa_s"] / row["forkkv_s"]
    for key, floor in (("forkkv", "floor"), ("forkkv_v", "floor_v"), ("forkkv_base", "floor_base")):
        row[f"{key}_over_floor"] = row[f"{key}_s"] / row[f"{floor}_s"]
    return row


def kernel_resources(launches: dict) -> dict:
    """Registers, spills and shared memory of the compiled kernels in ``launches`` (family -> the ``launches`` dict
    its launcher filled: kernel name -> compiled kernel)."""
    out = {}
    for fam, launched in launches.items():
        for name, k in launched.items():
            md = getattr(k, "metadata", None)
            out[f"{fam}.{name}"] = {"n_regs": getattr(k, "n_regs", None), "n_spills": getattr(k, "n_spills", None),
                                    "shared": getattr(md, "shared", None), "num_warps": getattr(md, "num_warps", None)}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768])
    ap.add_argument("--agents", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--queries", type=int, default=1,
                    help="new tokens per row (1: decode; more: extend calls, e.g. speculative decoding's drafts); "
                         "results in bench_kernel_<gpu>_q<queries>.json")
    ap.add_argument("--rank", type=int, default=RANK, help="the residuals' rank (e.g. 64 for fitted residuals, "
                    "SharedContext.fit_residuals); results in bench_kernel_<gpu>[_q<queries>]_r<rank>.json")
    ap.add_argument("--kv-heads", type=positive_int, default=HKV, help="KV heads of the 32 query heads (a divisor "
                    "of 32; 32: an MHA model such as Llama 2); results in ..._kv<kv_heads>.json")
    ap.add_argument("--quick", action="store_true", help="one small size, for a smoke run")
    ap.add_argument("--tuning-from", default=None, help="an eval.bench.sweep_kernel result: each variant runs with the "
                    "knobs it found fastest at the nearest swept agent count (recorded per row as *_knobs)")
    ap.add_argument("--out", type=str, default=None)
    args = ap.parse_args(argv)
    if H % args.kv_heads:
        ap.error(f"--kv-heads {args.kv_heads}: give a divisor of the {H} query heads")
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernel needs a CUDA GPU")
    from triton.testing import do_bench

    if args.quick:
        args.contexts, args.agents = [4096], [1, 8]
    run = BenchmarkRun("bench_kernel", params={"shape": {"heads": H, "kv_heads": args.kv_heads, "head_dim": D,
                                                         "rank": args.rank,
                                                         "private": PRIVATE, "dtype": "bfloat16",
                                                         "queries_per_row": args.queries},
                                               "times": f"GPU time per call: CUDA graph of {GRAPH_CALLS} calls "
                                                        "replayed (do_bench median); *_eager_s: do_bench median of "
                                                        "the Python call"},
                       case_keys=["context", "agents"], out=args.out,
                       suffix=("" if args.queries == 1 else f"_q{args.queries}")
                       + ("" if args.rank == RANK else f"_r{args.rank}")
                       + ("" if args.kv_heads == HKV else f"_kv{args.kv_heads}"))
    best = {}
    if args.tuning_from:
        from .schema import load

        best = run.extra["tuning_from"] = load(args.tuning_from).extra["best"]
    ceil = run.extra["ceilings"] = measure_ceilings(do_bench)
    print(f"{run.device.get('gpu')}: HBM {ceil['hbm_bytes_per_s'] / 1e12:.2f} TB/s, "
          f"bf16 {ceil['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s", flush=True)
    launches = {"cascade": {}}  # the last case's compiled kernels
    for T in args.contexts:
        for N in args.agents:
            run.measure({"context": T, "agents": N},
                        lambda: measure_case(T, N, ceil, do_bench, best, launches, queries=args.queries,
                                                 rank=args.rank, kv_heads=args.kv_heads))
            torch.cuda.empty_cache()
    run.extra["kernel_resources"] = kernel_resources(launches)
    print(f"{'T':>6} {'N':>4} {'K+V':>8} {'V only':>8} {'base':>8} {'swept':>8} {'SDPA':>8} {'floorKV':>8} "
          f"{'floorV':>7} {'floorB':>7}  (µs, GPU time per call)")
    us = lambda r, k: f"{r[k] * 1e6:8.1f}" if k in r else f"{'-':>8}"  # noqa: E731
    for r in run.rows:
        print(f"{r['context']:6d} {r['agents']:4d} {us(r, 'forkkv_s')} {us(r, 'forkkv_v_s')} {us(r, 'forkkv_base_s')} "
              f"{us(r, 'cascade_s')} {us(r, 'sdpa_s')} {us(r, 'floor_s')}{us(r, 'floor_v_s')[1:]}"
              f"{us(r, 'floor_base_s')[1:]}")
    run.finish()


if __name__ == "__main__":
    main()
