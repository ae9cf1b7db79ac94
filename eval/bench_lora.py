"""Benchmark: mixed-adapter decode with PEFT's per-adapter loop vs forkkv-hf's batched LoRA.

Llama-3.1-8B shapes (random bf16 weights) on one GPU, rank-16 LoRA on q/k/v/o. For N rows (N = 1, 8, 32, 128, 256)
it measures, with N distinct adapters and with all rows on one adapter:
- ``step_s``: one decode step (``model(next_token, cache, adapter_names)``, the median of 5) after a prefill; it
  includes what PEFT spends per ``PeftModel.forward`` with ``adapter_names`` (``_enable_peft_forward_hooks``, which
  walks all modules: ~65,000 with 256 adapters), which ``generate`` pays once per call, not per step. On the H200 a
  step measured this way took 0.25-0.5 s where a ``generate`` step took 50-90 ms;
- ``generate_tok_s``: tokens/s of ``generate`` (fixed length: ``min_new_tokens = max_new_tokens``), decode only
  (the time of a 1-token generate is subtracted; medians of ``--reps`` runs);
for ``peft`` (PEFT's ``_mixed_batch_forward``) and ``batched`` (:mod:`forkkv_hf.batched_lora`). Writes JSON with the
device and versions.

    python eval/bench_lora.py [--rows 1 8 32 128 256] [--prompt 128] [--new-tokens 16] [--layers 32]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "eval"))

from common import (  # noqa: E402
    add_random_adapters,
    build_model,
    cuda_time,
    default_device,
    device_info,
    llama8b_config,
    slug,
)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 128, 256])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--peft-max-rows", type=int, default=256, help="skip PEFT's loop above this many rows")
    ap.add_argument("--reps", type=int, default=3, help="generate timings: median of this many runs")
    ap.add_argument("--tiny", action="store_true", help="toy model sizes (a CPU smoke run of this script)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = default_device()
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    from transformers import DynamicCache

    from forkkv_hf.batched_lora import disable_batched_lora, enable_batched_lora
    from forkkv_hf.compat import cache_kwargs

    info = device_info()
    t0 = time.time()
    model = build_model(llama8b_config(layers=args.layers, tiny=args.tiny), dtype=dtype)
    n_max = max(args.rows)
    names = [f"agent{i}" for i in range(n_max)]
    pm = add_random_adapters(model, names, rank=args.rank)
    print(f"model + {n_max} adapters built in {time.time() - t0:.0f} s; "
          f"{torch.cuda.memory_allocated() / 2**30 if dev == 'cuda' else 0:.1f} GiB allocated", flush=True)
    rows = []
    out_path = Path(args.out) if args.out else ROOT / "eval" / "results" / f"bench_lora_{slug(info.get('gpu', 'gpu'))}.json"

    def save(rows, check, summary):  # after every case: a run cut short keeps what it measured
        result = {"benchmark": "bench_lora", "time": time.strftime("%Y-%m-%d %H:%M:%S"), "device": info,
                  "model": {"shape": "tiny" if args.tiny else "Llama-3.1-8B", "layers": args.layers,
                            "dtype": str(dtype), "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
                  "check": check, "rows": rows, "summary": summary}
        out_path.write_text(json.dumps(result, indent=1))

    g = torch.Generator(device=dev).manual_seed(0)
    vocab = model.config.vocab_size
    # correctness at real size: batched logits vs PEFT's loop on a mixed batch (distinct adapters + a __base__ row)
    with torch.no_grad():
        k = min(8, n_max)
        ids = torch.randint(3, vocab, (k + 1, 32), device=dev, generator=g)
        mix = names[:k] + ["__base__"]
        disable_batched_lora(pm)
        ref = pm(input_ids=ids, adapter_names=mix).logits.float()
        enable_batched_lora(pm)
        got = pm(input_ids=ids, adapter_names=mix).logits.float()
        check = {"rows": k + 1, "max_abs_logit_diff": (got - ref).abs().max().item(),
                 "max_abs_logit": ref.abs().max().item(),
                 "greedy_agreement": (got.argmax(-1) == ref.argmax(-1)).float().mean().item()}
        print(json.dumps({"check": check}), flush=True)
        del ref, got
    for N in args.rows:
        ids = torch.randint(3, vocab, (N, args.prompt), device=dev, generator=g)
        mask = torch.ones_like(ids)
        for mix in ("distinct", "one_adapter"):
            row_names = names[:N] if mix == "distinct" else [names[0]] * N
            for path in ("peft", "batched"):
                if path == "peft" and N > args.peft_max_rows:
                    continue
                (enable_batched_lora if path == "batched" else disable_batched_lora)(pm)
                rec = {"rows": N, "mix": mix, "path": path, "prompt": args.prompt, "rank": args.rank}
                with torch.no_grad():
                    cache = DynamicCache()
                    out = pm(input_ids=ids, attention_mask=mask, adapter_names=row_names, use_cache=True,
                             **cache_kwargs(cache))
                    nxt = out.logits[:, -1:].argmax(-1)
                    L = cache.get_seq_length()

                    def step():
                        pm(input_ids=nxt, adapter_names=row_names, use_cache=True, **cache_kwargs(cache))
                        cache.crop(-1)  # back to the prefix, so every timed step sees the same cache

                    rec["step_s"] = cuda_time(step, warmup=1, reps=5)
                    assert cache.get_seq_length() == L
                    del cache, out
                    kw = dict(input_ids=ids, attention_mask=mask, adapter_names=row_names, do_sample=False,
                              pad_token_id=0)
                    # median of --reps runs (one run for PEFT's loop at large N: it takes minutes)
                    reps = args.reps if (path == "batched" or N <= 32) else 1
                    t_prefill = cuda_time(lambda: pm.generate(**kw, max_new_tokens=1, min_new_tokens=1), 0, reps)
                    n = args.new_tokens
                    t_total = cuda_time(lambda: pm.generate(**kw, max_new_tokens=n, min_new_tokens=n), 0, reps)
                    rec["generate_reps"] = reps
                rec["prefill_s"] = t_prefill
                rec["generate_s"] = t_total
                rec["generate_tok_s"] = N * (n - 1) / max(t_total - t_prefill, 1e-9)
                rows.append(rec)
                print(json.dumps(rec), flush=True)
                save(rows, check, [])
                if dev == "cuda":
                    torch.cuda.empty_cache()
    disable_batched_lora(pm)
    # summary: ours (distinct) over ours (one adapter), and speed-up over PEFT's loop
    summary = []
    for N in args.rows:
        get = lambda mix, path: next((r["step_s"] for r in rows if r["rows"] == N and r["mix"] == mix  # noqa: E731
                                      and r["path"] == path), None)
        s = {"rows": N, "batched_distinct_s": get("distinct", "batched"), "batched_one_s": get("one_adapter", "batched"),
             "peft_distinct_s": get("distinct", "peft"), "peft_one_s": get("one_adapter", "peft")}
        if s["batched_one_s"]:
            s["distinct_over_one"] = s["batched_distinct_s"] / s["batched_one_s"]
        if s["peft_distinct_s"]:
            s["speedup_vs_peft"] = s["peft_distinct_s"] / s["batched_distinct_s"]
        summary.append(s)
        print(json.dumps(s), flush=True)
    save(rows, check, summary)
    print("wrote", out_path)


if __name__ == "__main__":
    main()
