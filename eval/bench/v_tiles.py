"""The Triton shared kernel's V-residual sub-blocks on MHA shapes: the launcher's fitted tiles
(:func:`forkkv_kernels.cascade.v_tiles`) against the tiles before them (``block_m`` up to 64 query vectors, the rule's
``block_t``, given explicitly, which skips the fitting; it also switches the rule's Gluon shared kernel off), the
CUDA-core V form (``v_form="fma"``: each vector's ``P·u_v`` from its own row's ``u_v``, no block-diagonal
sub-blocks), and SDPA over each row's K/V materialised before the timing (plain PEFT's cache).

Shape: 32 query heads on 32 KV heads (MHA, e.g. Llama 2; one query vector per row and KV head), head_dim 128, bf16,
a shared context of ``--context`` tokens, 64 private tokens per row, one decode query per row, one agent per row;
V-only calls (no K residual: the shared kernel and the merge alone) and K+V calls at each V rank. Each time is the
GPU time of one call (a CUDA graph of ``GRAPH_CALLS`` calls, ``do_bench`` median); each output is checked against
SDPA's. Where the old tiles cannot compile (out of shared memory), the row says so.

    python -m eval.bench.v_tiles --out v_tiles.json [--context 8192] [--agents 8 32 64] [--ranks 16 32 64 128]
"""

from __future__ import annotations

import argparse

import torch

from ..cli import positive_int
from .kernel import D, H, make_case, materialise, materialised_attention, variant_view
from .measure import GRAPH_CALLS, graph_time
from .runner import BenchmarkRun


def old_tiles(view, variant: str) -> dict:
    """The knobs that reproduce the launcher's tiles before the fitting (given explicitly, so not fitted)."""
    from forkkv_kernels.cascade import launch_defaults

    N = view.batch_size
    cfg = launch_defaults(N, 1, 1, variant == "kv", True, torch.bfloat16, view.shared.v_res.rank)
    return {"block_m": min(64, 1 << (N - 1).bit_length()), "block_t": cfg["block_t"]}


def measure_case(T: int, N: int, rank: int, do_bench) -> dict:
    from forkkv_hf.ops.dispatch import residual_attention_triton
    from forkkv_kernels.attention_common import pow2
    from forkkv_kernels.tiles import v_tiles

    q, view = make_case(T, N, rank=rank, kv_heads=H)
    scale = D**-0.5
    row = {}
    for variant in ("v", "kv"):
        vv = variant_view(view, variant)
        K, V = materialise(vv)
        ref = materialised_attention(q, K, V, scale).transpose(1, 2).float()
        row[f"sdpa_{variant}_s"] = graph_time(lambda: materialised_attention(q, K, V, scale), do_bench)
        del K, V
        old = old_tiles(vv, variant)
        row[f"fitted_{variant}_tiles"] = v_tiles(old["block_m"], old["block_t"], 1, pow2(rank), D, 2)
        row[f"old_{variant}_tiles"] = (old["block_m"], old["block_t"])
        for name, knobs in (("fitted", {"v_form": "mma"}), ("old", old), ("fma", {"v_form": "fma"})):
            try:
                out = residual_attention_triton(q, vv, None, scale, **knobs)
            except Exception as e:  # noqa: BLE001  (Triton's OutOfResources is not importable under every version)
                row[f"{name}_{variant}_error"] = f"{type(e).__name__}: {str(e)[:160]}"
                continue
            row[f"{name}_{variant}_err_vs_sdpa"] = (out.float() - ref).abs().max().item()
            row[f"{name}_{variant}_s"] = graph_time(
                lambda: residual_attention_triton(q, vv, None, scale, **knobs), do_bench)  # noqa: B023
        torch.cuda.empty_cache()
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=positive_int, default=8192)
    ap.add_argument("--agents", type=positive_int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--ranks", type=positive_int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--out", type=str, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("eval.bench.v_tiles needs a CUDA GPU")
    from triton.testing import do_bench

    run = BenchmarkRun("bench_v_tiles", params={"shape": {"heads": H, "kv_heads": H, "head_dim": D, "private": 64,
                                                          "dtype": "bfloat16", "context": args.context},
                                                "times": f"GPU time per call: CUDA graph of {GRAPH_CALLS} calls "
                                                         "replayed (do_bench median)"},
                       case_keys=["agents", "rank"], out=args.out)
    for N in args.agents:
        for rank in args.ranks:
            run.measure({"agents": N, "rank": rank}, lambda: measure_case(args.context, N, rank, do_bench))
    us = lambda r, k: f"{r[k] * 1e6:9.1f}" if k in r else f"{'fail':>9}"  # noqa: E731
    cols = ("fitted", "old", "fma", "sdpa")
    heads = " ".join(f"{c:>9}" for c in cols)
    print(f"{'N':>4} {'rank':>4} | V: {heads} | K+V: {heads}")
    for r in run.rows:
        print(f"{r['agents']:4d} {r['rank']:4d} |    " + " ".join(us(r, f"{c}_v_s") for c in cols) + " |      "
              + " ".join(us(r, f"{c}_kv_s") for c in cols))
    run.finish()


if __name__ == "__main__":
    main()
