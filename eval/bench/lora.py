"""Benchmark: mixed-adapter decode with PEFT's per-adapter loop vs forkkv-hf's batched LoRA.

Llama-3.1-8B shapes (random bf16 weights) on one GPU, rank-16 LoRA on q/k/v/o. For N rows (N = 1, 8, 32, 128, 256)
it measures, with N distinct adapters and with all rows on one adapter:
- ``step_s``: one decode step (``model(next_token, cache, adapter_names)``, the median of 5) after a prefill; it
  includes what PEFT spends per ``PeftModel.forward`` with ``adapter_names`` (``_enable_peft_forward_hooks``, which
  walks all modules: ~65,000 with 256 adapters), which ``generate`` pays once per call, not per step. On the H200 a
  step measured this way took 0.25-0.5 s where a ``generate`` step took 50-90 ms;
- ``generate_tok_s``: tokens/s of ``generate`` (fixed length: ``min_new_tokens = max_new_tokens``), decode only
  (the time of a 1-token generate is subtracted; medians of ``--reps`` runs);
- ``generate_step_s``: the decode step of ``generate`` that this gives (what the targets are about);
- with ``--profile-rows``: ``torch.profiler`` over the decode steps of ``generate`` (two generates, 1 and 1 + k
  tokens; the difference divided by k): GPU kernel time per step by family and the share of the step the GPU idles
  waiting for the host;
for ``peft`` (PEFT's ``_mixed_batch_forward``) and ``batched`` (:mod:`forkkv_hf.peft.batched_lora`). The model's objects are
moved out of Python's cyclic garbage collector (``gc.freeze()``) after the build: with 256 adapters the module tree
holds ~2 million Python objects, and one full collection (0.6 s, measured on CPU) falling inside a timed generate
would be read as LoRA time. Result: the one schema (eval/bench/schema.py), rows keyed by (rows, mix, path); the
correctness check and the summary in ``extra``.

    python -m eval.bench.lora [--rows 1 8 32 128 256] [--prompt 128] [--new-tokens 16] [--layers 32]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import time

import torch

from ..cli import positive_int
from .measure import cuda_time, kernel_seconds_by_family, sync
from .models import add_random_adapters, build_model, default_device, llama8b_config
from .runner import BenchmarkRun

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def check_against_peft(pm, names, vocab, dev, g) -> dict:
    """Correctness at real size: batched logits vs PEFT's loop on a mixed batch (distinct adapters + a __base__ row)."""
    from forkkv_hf.peft.batched_lora import disable_batched_lora, enable_batched_lora

    with torch.no_grad():
        k = min(8, len(names))
        ids = torch.randint(3, vocab, (k + 1, 32), device=dev, generator=g)
        mix = names[:k] + ["__base__"]
        disable_batched_lora(pm)
        ref = pm(input_ids=ids, adapter_names=mix).logits.float()
        enable_batched_lora(pm)
        got = pm(input_ids=ids, adapter_names=mix).logits.float()
        return {"rows": k + 1, "max_abs_logit_diff": (got - ref).abs().max().item(),
                "max_abs_logit": ref.abs().max().item(),
                "greedy_agreement": (got.argmax(-1) == ref.argmax(-1)).float().mean().item()}


def measure_decode(pm, ids, mask, row_names, path, args) -> dict:
    """One case: a decode step after a prefill (``step_s``) and ``generate``'s decode speed, with PEFT's loop
    (``path="peft"``) or the batched LoRA (``"batched"``); with ``--profile-rows`` its profile."""
    from transformers import DynamicCache

    from forkkv_hf.peft.batched_lora import disable_batched_lora, enable_batched_lora
    from forkkv_hf.compat import cache_kwargs

    N = ids.shape[0]
    (enable_batched_lora if path == "batched" else disable_batched_lora)(pm)
    rec = {"prompt": args.prompt, "rank": args.rank}
    with torch.no_grad():
        cache = DynamicCache()
        out = pm(input_ids=ids, attention_mask=mask, adapter_names=row_names, use_cache=True, **cache_kwargs(cache))
        nxt = out.logits[:, -1:].argmax(-1)
        L = cache.get_seq_length()

        def step():
            pm(input_ids=nxt, adapter_names=row_names, use_cache=True, **cache_kwargs(cache))
            cache.crop(-1)  # back to the prefix, so every timed step sees the same cache

        rec["step_s"] = cuda_time(step, warmup=1, reps=5)
        assert cache.get_seq_length() == L
        del cache, out
        kw = dict(input_ids=ids, attention_mask=mask, adapter_names=row_names, do_sample=False, pad_token_id=0)
        # median of --reps runs (one run for PEFT's loop at large N: it takes minutes)
        reps = args.reps if (path == "batched" or N <= 32) else 1
        t_prefill = cuda_time(lambda: pm.generate(**kw, max_new_tokens=1, min_new_tokens=1), 0, reps)
        n = args.new_tokens
        t_total = cuda_time(lambda: pm.generate(**kw, max_new_tokens=n, min_new_tokens=n), 0, reps)
        rec["generate_reps"] = reps
    rec["prefill_s"] = t_prefill
    rec["generate_s"] = t_total
    rec["generate_tok_s"] = N * (n - 1) / max(t_total - t_prefill, 1e-9)
    rec["generate_step_s"] = (t_total - t_prefill) / (n - 1)
    if path == "batched" and N in (args.profile_rows or []):
        rec["profile"] = profile_steps(pm, kw)
        print(json.dumps({"profile": rec["profile"]}), flush=True)
    return rec


def summarize(rows, row_counts) -> list[dict]:
    """Per N: ours (distinct) over ours (one adapter), and the speed-up over PEFT's loop."""
    summary = []
    for N in row_counts:
        def get(mix, path, key):
            return next((r[key] for r in rows if r["rows"] == N and r["mix"] == mix and r["path"] == path), None)

        s = {"rows": N}
        for key in ("generate_step_s", "step_s"):
            s.update({f"{path}_{mix}_{key}": get(m, path, key) for mix, m in (("distinct", "distinct"),
                      ("one", "one_adapter")) for path in ("batched", "peft")})
        if s["batched_one_generate_step_s"]:
            s["distinct_over_one"] = s["batched_distinct_generate_step_s"] / s["batched_one_generate_step_s"]
        if s["peft_distinct_generate_step_s"]:
            s["speedup_vs_peft"] = s["peft_distinct_generate_step_s"] / s["batched_distinct_generate_step_s"]
        summary.append(s)
        print(json.dumps(s), flush=True)
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=positive_int, nargs="+", default=[1, 8, 32, 128, 256])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--peft-max-rows", type=int, default=256, help="skip PEFT's loop above this many rows")
    ap.add_argument("--reps", type=positive_int, default=3, help="generate timings: median of this many runs")
    ap.add_argument("--profile-rows", type=int, nargs="*", default=[32, 256],
                    help="profile the batched path's decode steps at these N (distinct and one adapter)")
    ap.add_argument("--tiny", action="store_true", help="toy model sizes (a CPU smoke run of this script)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = default_device()
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    from forkkv_hf.peft.batched_lora import disable_batched_lora

    t0 = time.time()
    model = build_model(llama8b_config(layers=args.layers, tiny=args.tiny), dtype=dtype)
    n_max = max(args.rows)
    names = [f"agent{i}" for i in range(n_max)]
    pm = add_random_adapters(model, names, rank=args.rank)
    gc.collect()
    gc.freeze()  # see the module docstring
    print(f"model + {n_max} adapters built in {time.time() - t0:.0f} s; "
          f"{torch.cuda.memory_allocated() / 2**30 if dev == 'cuda' else 0:.1f} GiB allocated", flush=True)
    params = {"model": {"shape": "tiny" if args.tiny else "Llama-3.1-8B", "layers": args.layers, "dtype": str(dtype),
                        "lora_targets": TARGETS}}
    run = BenchmarkRun("bench_lora", params, ("rows", "mix", "path"), out=args.out)
    g = torch.Generator(device=dev).manual_seed(0)
    vocab = model.config.vocab_size
    run.extra["check"] = check_against_peft(pm, names, vocab, dev, g)
    run.extra["summary"] = []
    print(json.dumps({"check": run.extra["check"]}), flush=True)
    for N in args.rows:
        ids = torch.randint(3, vocab, (N, args.prompt), device=dev, generator=g)
        mask = torch.ones_like(ids)
        for mix in ("distinct", "one_adapter"):
            row_names = names[:N] if mix == "distinct" else [names[0]] * N
            for path in ("peft", "batched"):
                if path == "peft" and N > args.peft_max_rows:
                    continue
                run.measure({"rows": N, "mix": mix, "path": path},
                            lambda: measure_decode(pm, ids, mask, row_names, path, args))
                if dev == "cuda":
                    torch.cuda.empty_cache()
    disable_batched_lora(pm)
    run.extra["summary"] = summarize(run.rows, args.rows)
    run.finish()


def profile_steps(pm, kw, steps=8):
    """Where a decode step of the batched path's ``generate`` goes: kernel time per step by family (from two profiled
    generates of 1 and 1 + ``steps`` tokens) and the step's wall time (from the same two generates unprofiled)."""
    from torch.profiler import ProfilerActivity, profile

    fams = {"batched LoRA kernels": ("_gathered_mm",), "GEMM": ("gemm", "Gemm", "cutlass", "xmma", "nvjet", "cublas"),
            "attention": ("flash", "fmha", "attention", "Attention"), "other kernels": ()}

    def run(n, profiled):
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with torch.no_grad(), (profile(activities=acts) if profiled else contextlib.nullcontext()) as prof:
            sync()
            t = time.perf_counter()
            pm.generate(**kw, max_new_tokens=n, min_new_tokens=n)
            sync()
            wall = time.perf_counter() - t
        if not profiled:
            return wall, None
        return wall, {f: 1e3 * t for f, t in kernel_seconds_by_family(prof, fams, "other kernels").items()}

    w1, _ = run(1, False)
    w2, _ = run(1 + steps, False)
    _, g1 = run(1, True)
    _, g2 = run(1 + steps, True)
    gpu = {f: (g2[f] - g1[f]) / steps for f in fams}
    wall_ms = 1e3 * (w2 - w1) / steps
    busy = sum(gpu.values())
    return {"rows": len(kw["adapter_names"]), "distinct_adapters": len(set(kw["adapter_names"])), "steps": steps,
            "step_wall_ms": wall_ms, "gpu_busy_ms": busy, "gpu_ms_by_family": gpu,
            "host_bound_share": max(0.0, 1 - busy / wall_ms) if wall_ms > 0 else None}


if __name__ == "__main__":
    main()
