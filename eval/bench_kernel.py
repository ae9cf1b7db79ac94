"""Benchmark: ForkKV decode ResidualAttention vs SDPA over materialised per-agent K/V, and the floor.

One Llama-3.1-8B-shaped attention layer (32 query heads, 8 KV heads, head_dim 128), bf16, rank-16 residuals on K and
V, N agents (one row each, one query each), a shared context of T tokens and 64 private tokens per row. For each
(T, N) it times, with the median of ``triton.testing.do_bench``:

- ``forkkv``: our Triton decode kernels over one base copy + N rank-r residuals + private parts;
- ``sdpa``: what a PEFT user runs today: ``scaled_dot_product_attention`` over each agent's own full K/V (base +
  residual materialised, plus private), with ``enable_gqa`` (PyTorch picks the backend), and, where it applies,
  ``sdpa_flash``: the same forced onto the FlashAttention-2 backend (K/V heads repeated to 32);
- ``floor``: max(bytes that must be read / measured HBM bandwidth, FLOPs / measured bf16 matmul rate), bytes = one
  base copy + N residuals + private parts + queries/outputs; FLOPs include rebuilding the K residual.

It also checks the kernel's output against the materialised computation at every size. Writes
``eval/results/bench_kernel_<gpu>.json`` (or ``--out``) with the device, versions and parameters.

    python eval/bench_kernel.py [--contexts 4096 16384 32768] [--agents 1 8 32 128] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

H, HKV, D, RANK, PRIVATE = 32, 8, 128, 16, 64


def device_info() -> dict:
    import transformers
    import triton

    info = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sms=p.multi_processor_count, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        pass
    return info


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


def make_case(T: int, N: int, dtype=torch.bfloat16, seed=0):
    """A decode step: N rows (agent i on row i), one query each, shared T + private PRIVATE tokens."""
    from forkkv_hf.cache import ForkKVView
    from forkkv_hf.shared_context import Residual, SharedLayer

    g = torch.Generator(device="cuda").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, device="cuda", generator=g, dtype=torch.float32)  # noqa: E731
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device="cuda", dtype=torch.float32) / D))
    f = torch.outer(torch.arange(T, device="cuda", dtype=torch.float32), inv)
    emb = torch.cat([f, f], -1)
    res = lambda: Residual(  # noqa: E731
        tuple(f"a{i}" for i in range(N)), rnd(N, T, RANK).to(dtype), (rnd(N, HKV * D, RANK) * 0.05).to(dtype), (RANK,) * N
    )
    shared = SharedLayer(rnd(1, HKV, T, D).to(dtype), rnd(1, HKV, T, D).to(dtype), emb.cos().to(dtype),
                         emb.sin().to(dtype), res(), res())
    rows = torch.arange(N, device="cuda")
    view = ForkKVView(shared, rows, rows, rnd(N, HKV, PRIVATE, D).to(dtype), rnd(N, HKV, PRIVATE, D).to(dtype),
                      tuple(f"a{i}" for i in range(N)), tuple(range(N)), tuple(range(N)))
    q = rnd(N, H, 1, D).to(dtype)
    return q, view


def materialise(view, chunk=8):
    """Every agent's full K/V ``[N, HKV, T + P, D]`` in the view's dtype (what a PEFT user's cache holds)."""
    from forkkv_hf.rope import apply_rope

    sh = view.shared
    N = view.batch_size
    T = sh.key.shape[2]
    dt = sh.key.dtype
    K = torch.empty(N, HKV, T + view.private_len, D, device="cuda", dtype=dt)
    V = torch.empty_like(K)
    for i in range(0, N, chunk):
        j = min(N, i + chunk)
        dk = (sh.k_res.u[i:j].float() @ sh.k_res.B[i:j].float().transpose(1, 2)).view(j - i, T, HKV, D).transpose(1, 2)
        dv = (sh.v_res.u[i:j].float() @ sh.v_res.B[i:j].float().transpose(1, 2)).view(j - i, T, HKV, D).transpose(1, 2)
        K[i:j, :, :T] = (sh.key.float() + apply_rope(dk, sh.cos.float(), sh.sin.float())).to(dt)
        V[i:j, :, :T] = (sh.value.float() + dv).to(dt)
    K[:, :, T:] = view.key
    V[:, :, T:] = view.value
    return K, V


def floor_time(T, N, ceil, itemsize=2):
    base = 2 * HKV * T * D * itemsize
    residual = N * 2 * RANK * T * itemsize
    private = N * 2 * HKV * PRIVATE * D * itemsize
    qo = 2 * N * H * D * itemsize
    nbytes = base + residual + private + qo
    flops = N * (2 * T * RANK * HKV * D + 4 * (T + PRIVATE) * D * H + 2 * T * RANK * H + 2 * RANK * D * H)
    return {"bytes": nbytes, "flops": flops, "t_bytes_s": nbytes / ceil["hbm_bytes_per_s"],
            "t_flops_s": flops / ceil["bf16_flops_per_s"],
            "floor_s": max(nbytes / ceil["hbm_bytes_per_s"], flops / ceil["bf16_flops_per_s"])}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768])
    ap.add_argument("--agents", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--quick", action="store_true", help="one small size, for a smoke run")
    ap.add_argument("--out", type=str, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_kernel needs a CUDA GPU")
    from triton.testing import do_bench

    from forkkv_hf.reference import materialize_kv  # noqa: F401  (documents the ground truth)
    from forkkv_kernels import residual_attention_triton

    if args.quick:
        args.contexts, args.agents = [4096], [1, 8]
    info = device_info()
    ceil = measure_ceilings(do_bench)
    print(f"{info.get('gpu')}: HBM {ceil['hbm_bytes_per_s'] / 1e12:.2f} TB/s, bf16 {ceil['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s",
          flush=True)
    scale = D**-0.5
    rows = []
    for T in args.contexts:
        for N in args.agents:
            q, view = make_case(T, N)
            row = {"context": T, "agents": N, "rank": RANK, "private": PRIVATE}
            out = residual_attention_triton(q, view, None, scale)
            t_ours = do_bench(lambda: residual_attention_triton(q, view, None, scale), warmup=25, rep=100,
                              return_mode="median") * 1e-3
            row["forkkv_s"] = t_ours
            try:
                K, V = materialise(view)
                ref = torch.nn.functional.scaled_dot_product_attention(q, K, V, scale=scale, enable_gqa=True)
                ref = ref.transpose(1, 2)
                row["max_abs_err_vs_sdpa"] = (out.float() - ref.float()).abs().max().item()
                row["sdpa_s"] = do_bench(
                    lambda: torch.nn.functional.scaled_dot_product_attention(q, K, V, scale=scale, enable_gqa=True),
                    warmup=25, rep=100, return_mode="median") * 1e-3
                row["materialised_kv_bytes"] = 2 * K.numel() * K.element_size()
                try:
                    from torch.nn.attention import SDPBackend, sdpa_kernel

                    Kr = K.repeat_interleave(H // HKV, 1) if N * H * (T + PRIVATE) * D * 2 * 2 < 40 * 2**30 else None
                    if Kr is not None:
                        Vr = V.repeat_interleave(H // HKV, 1)
                        del K, V

                        def flash():
                            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                                return torch.nn.functional.scaled_dot_product_attention(q, Kr, Vr, scale=scale)

                        row["sdpa_flash_s"] = do_bench(flash, warmup=25, rep=100, return_mode="median") * 1e-3
                        del Kr, Vr
                except Exception as e:  # noqa: BLE001 - report, don't hide
                    row["sdpa_flash_error"] = repr(e)[:200]
            except torch.cuda.OutOfMemoryError:
                row["sdpa_error"] = "out of memory materialising per-agent K/V"
            torch.cuda.empty_cache()
            row.update(floor_time(T, N, ceil))
            base = min(v for k, v in row.items() if k in ("sdpa_s", "sdpa_flash_s"))
            row["speedup_vs_best_sdpa"] = base / t_ours
            row["forkkv_over_floor"] = t_ours / row["floor_s"]
            rows.append(row)
            print(f"T={T:6d} N={N:4d}  forkkv {t_ours * 1e6:8.1f} us  sdpa {row.get('sdpa_s', float('nan')) * 1e6:8.1f} us"
                  f"  flash {row.get('sdpa_flash_s', float('nan')) * 1e6:8.1f} us  floor {row['floor_s'] * 1e6:7.1f} us"
                  f"  speedup x{row['speedup_vs_best_sdpa']:.1f}  /floor {row['forkkv_over_floor']:.2f}"
                  f"  err {row.get('max_abs_err_vs_sdpa', float('nan')):.2e}", flush=True)
            del q, view
            torch.cuda.empty_cache()
    result = {"benchmark": "bench_kernel", "time": time.strftime("%Y-%m-%d %H:%M:%S"), "device": info,
              "ceilings": ceil, "shape": {"heads": H, "kv_heads": HKV, "head_dim": D, "dtype": "bfloat16"},
              "rows": rows}
    out = Path(args.out) if args.out else ROOT / "eval" / "results" / f"bench_kernel_{_slug(info.get('gpu', 'gpu'))}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print("wrote", out)


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s).strip("_").lower()


if __name__ == "__main__":
    main()
