"""End-to-end benchmark: N LoRA agents over one shared context, ForkKV vs what a PEFT user does today.

Llama-3.1-8B shapes (random bf16 weights), N rank-16 LoRA adapters on q/k/v/o (non-zero B), a shared context of T
tokens, a 64-token prompt per agent, 128 generated tokens per agent (``min_new_tokens = max_new_tokens``).

- ``baseline``: one ``PeftModel``, ``generate(adapter_names=...)`` over rows "context + prompt" (PEFT's mixed batch,
  ``DynamicCache``, SDPA): every agent prefills the context with its own adapter and keeps its own K/V.
- ``forkkv``: ``enable_forkkv`` (ResidualAttention kernels + batched LoRA), one base pass over the context
  (``SharedContext.build``), ``fork(names)``, ``generate`` over the prompts.

For each (T, N): time to first token (the whole batch's first token, prefill included), decode tokens/s, total time,
peak GPU memory (``max_memory_allocated``) and cache bytes. Capacity: under a memory budget (``--budget-gib``,
enforced with ``set_per_process_memory_fraction``), peak memory is measured at two N, the largest N that fits is
derived from that line, and that N is run (and must fit) to report its throughput. ``torch.profiler`` over decode steps
of ``generate`` (ForkKV at N=32 and N=1, the baseline at N=1, at the capacity context) says where the time goes. JSON with the device and versions.
These rows run ForkKV's decode eager (``disable_compile=True``), timed with a synchronising hook at every step.

Decode step of plain ``generate`` (``eval/decode_step.py``; ``--decode-agents``, default on CUDA 1 8 32 128 and the
capacity N, at ``--decode-context``): step = difference of two generate lengths, GPU-busy time per step (profiler),
tokens/s and the first call's extra time, for ForkKV with the decode step compiled (transformers' default: inductor,
CUDA graphs) and eager (``--compile on off``), and the transformers-alone anchors (no PEFT, one row: eager
``DynamicCache``; ``StaticCache`` + its own compile). ``--only-decode`` skips the sections above.

    python eval/bench_e2e.py [--contexts 4096 16384 32768] [--agents 1 4 8] [--forkkv-agents 1 4 8 32 128]
    python eval/bench_e2e.py --only-decode [--decode-agents 1 8 32 128] [--compile on off]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "eval"))

import decode_step  # noqa: E402
from common import (  # noqa: E402
    add_random_adapters,
    build_model,
    build_model_split,
    default_device,
    device_info,
    kernel_seconds_by_family,
    llama8b_config,
    slug,
)

PROMPT, NEW, PREFILL_CHUNK = 64, 128, 4096
#: the baseline's LoRA: PEFT's per-adapter loop (False), or forkkv_hf's batched LoRA (set by eval/bench_tp.py: under
#: tensor parallelism PEFT 0.21.0's mixed-adapter loop fails, its LoRA factors not being sharded)
BASELINE_BATCHED_LORA = False


class StepTimer:
    """A logits processor that records (synchronised) wall time at every generation step."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak():
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def _peaks_gib() -> list[float]:
    """Peak memory of every visible GPU (a device-map run spreads over several)."""
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.max_memory_allocated(i) / 2**30 for i in range(torch.cuda.device_count())]


def cache_bytes(cache) -> int:
    from forkkv_hf import ForkKVCache

    if isinstance(cache, ForkKVCache):
        return cache.memory_report().forkkv_bytes
    return sum(t.numel() * t.element_size() for l in cache.layers for t in (l.keys, l.values) if t is not None)


def _generate(pm, system, ctx, inputs, names, gen, shared=None):
    """One ``generate`` of the agents as ``system`` does it; returns the output and the cache it filled.
    ForkKV: one base pass over ``ctx`` (or the given ``shared``), a fork per call. Baseline: every row prefills the
    context with its own adapter."""
    import forkkv_hf
    from forkkv_hf import SharedContext, cache_kwargs

    if system == "forkkv":
        forkkv_hf.enable_forkkv(pm)
        shared = shared or SharedContext.build(pm, ctx, sorted(set(names)), progress=False)
        cache = shared.fork(names)
        gen = {"disable_compile": True, **gen}  # these sections time eager decode (the decode section compiles)
        return pm.generate(**inputs, adapter_names=names, **gen, **cache_kwargs(cache)), cache
    forkkv_hf.disable_forkkv(pm)
    if BASELINE_BATCHED_LORA:
        from forkkv_hf.batched_lora import enable_batched_lora

        enable_batched_lora(pm)
    # chunked prefill bounds the activations of N long rows (what a careful HF user would do)
    out = pm.generate(**inputs, adapter_names=names, prefill_chunk_size=PREFILL_CHUNK, **gen)
    return out, getattr(out, "cache", None) or getattr(out, "past_key_values", None)


def run_one(pm, system, ctx, prompts, names, new_tokens):
    """One generate of N agents; returns the measurements (raises torch.cuda.OutOfMemoryError if it does not fit)."""
    from transformers import LogitsProcessorList

    from forkkv_hf import batch_inputs

    _free()
    timer = StepTimer()
    dev = ctx.device
    inputs = batch_inputs(ctx, prompts, pad_token_id=0, device=dev)
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
               return_dict_in_generate=True, logits_processor=LogitsProcessorList([timer]))
    _sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        out, cache = _generate(pm, system, ctx, inputs, names, gen)
    t_end = timer.times[-1]
    rec = {
        "ttft_s": timer.times[0] - t0,
        "total_s": t_end - t0,
        "decode_s": t_end - timer.times[0],
        "decode_tok_s": len(names) * (len(timer.times) - 1) / max(t_end - timer.times[0], 1e-9),
        "step_ms_median": 1e3 * sorted(b - a for a, b in zip(timer.times, timer.times[1:]))[(len(timer.times) - 1) // 2]
        if len(timer.times) > 1 else None,
        "peak_gib": _peak() / 2**30,
        "peak_gib_per_gpu": _peaks_gib(),
        "cache_gib": cache_bytes(cache) / 2**30,
        "new_tokens": out.sequences.shape[1] - inputs["input_ids"].shape[1],
    }
    del out, cache
    _free()
    return rec


def _profiled_generate(pm, system, ctx, prompts, names, new_tokens, profiled=True, shared=None):
    """Wall time, kernel time by family and CPU time of the ops of one ``generate`` of ``new_tokens`` tokens
    (without ``profiled``: wall time only, free of the profiler's own overhead)."""
    import contextlib

    from torch.profiler import ProfilerActivity, profile

    from forkkv_hf import batch_inputs

    inputs = batch_inputs(ctx, prompts, pad_token_id=0, device=ctx.device)
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    fams = {"forkkv attention kernels": ("_shared_part", "_private_merge"), "batched LoRA kernels": ("_gathered_mm",),
            "attention (SDPA/flash)": ("flash", "fmha", "attention", "Attention"),
            "GEMM": ("gemm", "Gemm", "cutlass", "sm90_xmma", "nvjet", "cublas"), "elementwise/other": ()}
    with torch.no_grad():
        _sync()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with (profile(activities=acts) if profiled else contextlib.nullcontext()) as prof:
            t0 = time.perf_counter()
            _generate(pm, system, ctx, inputs, names, gen, shared=shared)
            _sync()
            wall = time.perf_counter() - t0
    cpu = {}
    if not profiled:
        return wall, {k: 0.0 for k in fams}, cpu
    gpu = kernel_seconds_by_family(prof, fams, "elementwise/other")
    for ev in prof.key_averages():
        if not (getattr(ev, "device_type", None) is not None and "CUDA" in str(ev.device_type)):
            cpu[ev.key] = (ev.self_cpu_time_total / 1e6, ev.count)
    return wall, gpu, cpu


def profile_decode(pm, system, ctx, prompts, names, steps=16):
    """Where one decode step of ``generate`` spends its time, with nothing but decode steps counted: two profiled
    generates of 1 and 1 + ``steps`` tokens; the differences (wall, kernel time by family, CPU time of the top ops)
    divided by ``steps``. The wall time of a step comes from the same two generates run without the profiler.
    ``cpu_overhead_share`` = 1 - GPU-busy time / wall time of a step: the share of the step that the GPU waits for
    Python (``generate``, the model's modules, PEFT, ForkKV's dispatch) to launch work."""
    shared = None
    if system == "forkkv":  # one base pass for all four generates: only the generates differ
        import forkkv_hf
        from forkkv_hf import SharedContext

        forkkv_hf.enable_forkkv(pm)
        with torch.no_grad():
            shared = SharedContext.build(pm, ctx, sorted(set(names)), progress=False)
    run = lambda n, p: _profiled_generate(pm, system, ctx, prompts, names, n, profiled=p, shared=shared)  # noqa: E731
    _, g1, c1 = run(1, True)
    _, g2, c2 = run(1 + steps, True)
    w1, w2 = run(1, False)[0], run(1 + steps, False)[0]
    wall = (w2 - w1) / steps
    gpu = {k: max(0.0, (g2[k] - g1[k]) / steps) for k in g2}
    busy = sum(gpu.values())
    ops = {k: ((t - c1.get(k, (0, 0))[0]) / steps, (n - c1.get(k, (0, 0))[1]) / steps) for k, (t, n) in c2.items()}
    top_cpu = sorted(ops.items(), key=lambda kv: -kv[1][0])[:15]
    return {"system": system, "rows": len(names), "context": ctx.numel(), "steps": steps, "step_wall_s": wall,
            "gpu_busy_s": busy, "cpu_overhead_share": max(0.0, 1 - busy / wall) if wall > 0 else None,
            "gpu_s_by_family": gpu,
            "top_cpu_ops": [{"op": k[:80], "self_cpu_s_per_step": t, "calls_per_step": n} for k, (t, n) in top_cpu]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768])
    ap.add_argument("--agents", type=int, nargs="+", default=[1, 4, 8], help="N for the baseline")
    ap.add_argument("--forkkv-agents", type=int, nargs="+", default=[1, 4, 8, 32, 128])
    ap.add_argument("--budget-gib", type=float, default=60.0)
    ap.add_argument("--capacity-context", type=int, default=32768)
    ap.add_argument("--new-tokens", type=int, default=NEW)
    ap.add_argument("--adapters", type=int, default=256, help="distinct adapters built (bounds the capacity runs)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--no-capacity", action="store_true")
    ap.add_argument("--devices", nargs="+", default=None,
                    help="split the layers over these devices with accelerate (e.g. cuda:0 cuda:1); the budget is "
                         "per device")
    ap.add_argument("--tiny", action="store_true", help="toy sizes: a CPU smoke run of this script")
    ap.add_argument("--decode-agents", type=int, nargs="*", default=None,
                    help="N for the decode-step section (default: 1 8 32 128 on CUDA, none on CPU); empty: skip it")
    ap.add_argument("--decode-context", type=int, default=32768)
    ap.add_argument("--decode-tokens", type=int, nargs=2, default=[8, 40], help="the two generate lengths")
    ap.add_argument("--decode-reps", type=int, default=3)
    ap.add_argument("--compile", nargs="+", choices=["on", "off"], default=["on", "off"])
    ap.add_argument("--compile-backend", default=None,
                    help="torch.compile backend for compile on (default: transformers' default on CUDA, eager on CPU)")
    ap.add_argument("--no-anchors", action="store_true", help="skip the transformers-alone rows")
    ap.add_argument("--only-decode", action="store_true", help="only the decode-step section")
    ap.add_argument("--out", default=None)
    ap.add_argument("--resume", default=None,
                    help="a JSON of an earlier, unfinished run on the same GPU: its cases are kept, not rerun")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="seconds: start no new case after this (the JSON is saved after each case; --resume it)")
    args = ap.parse_args(argv)
    dev = default_device()
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    info = device_info()
    if dev == "cuda":
        for i in range(torch.cuda.device_count()):
            total = torch.cuda.get_device_properties(i).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.budget_gib * 2**30 / total), i)
    t0 = time.time()
    config = llama8b_config(layers=args.layers, tiny=args.tiny)
    device_map = None
    if args.devices and len(args.devices) > 1:
        model, device_map = build_model_split(config, args.devices, dtype=dtype)
    else:
        model = build_model(config, dtype=dtype)
    if args.decode_agents is None:
        args.decode_agents = [1, 8, 32, 128] if dev == "cuda" else []
    if args.only_decode:
        args.agents, args.forkkv_agents, args.no_capacity = [], [], True
    n_max = max(args.agents + args.forkkv_agents + args.decode_agents + [args.adapters])
    names_all = [f"agent{i}" for i in range(n_max)]
    g = torch.Generator(device=dev).manual_seed(0)
    vocab = model.config.vocab_size
    compile_config = decode_step.compile_config_for(dev, args.compile_backend)
    decode_step.raise_recompile_limit()
    decode_ctx = torch.randint(3, vocab, (args.decode_context,), device=dev, generator=g)
    decode_prompts = [torch.randint(3, vocab, (PROMPT,), device=dev, generator=g) for _ in range(n_max)]
    decode, anchors = [], []
    if args.resume and Path(args.resume).exists():
        old = json.loads(Path(args.resume).read_text())
        if old["device"].get("gpu") == info.get("gpu"):
            decode, anchors = old.get("decode") or [], old.get("anchors") or []
    if args.decode_agents and not args.no_anchors and not anchors:  # before PEFT wraps the model
        ids = torch.cat([decode_ctx, decode_prompts[0]])[None]
        anchors = decode_step.anchor_cases(model, ids, *args.decode_tokens, args.decode_reps, compile_config,
                                           profile=not args.no_profile)
        _free()
    pm = add_random_adapters(model, names_all, rank=16)
    weights_gib = (sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**30
                   if dev == "cuda" else 0.0)
    print(f"model + {n_max} adapters: {weights_gib:.1f} GiB, built in {time.time() - t0:.0f} s", flush=True)
    rows = []
    capacity = {}
    profile = None
    if args.resume and Path(args.resume).exists():
        old = json.loads(Path(args.resume).read_text())
        if old["device"].get("gpu") == info.get("gpu") and old["new_tokens"] == args.new_tokens:
            rows, capacity, profile = old["rows"], old.get("capacity") or {}, old.get("profile")
            print(f"resumed {len(rows)} cases from {args.resume}", flush=True)
        else:
            print(f"not resuming {args.resume}: another device or another number of new tokens", flush=True)
    started = time.time()

    def out_of_time():
        return args.time_limit is not None and time.time() - started > args.time_limit
    out_path = Path(args.out) if args.out else ROOT / "eval" / "results" / f"bench_e2e_{slug(info.get('gpu', 'cpu'))}{f'_x{len(args.devices)}' if args.devices and len(args.devices) > 1 else ''}.json"

    def save():
        result = {"benchmark": "bench_e2e", "time": time.strftime("%Y-%m-%d %H:%M:%S"), "device": info,
                  "model": {"shape": "tiny" if args.tiny else "Llama-3.1-8B", "layers": args.layers,
                            "dtype": str(dtype), "lora": "rank 16 on q/k/v/o", "adapters_built": n_max,
                            "weights_and_adapters_gib": weights_gib, "devices": args.devices or [dev],
                            "device_map": device_map},
                  "prompt_tokens": PROMPT, "new_tokens": args.new_tokens, "budget_gib": args.budget_gib,
                  "baseline_prefill_chunk": PREFILL_CHUNK, "rows": rows, "capacity": capacity, "profile": profile,
                  "decode_settings": {"context": args.decode_context, "tokens": args.decode_tokens,
                                      "reps": args.decode_reps, "compile_backend": args.compile_backend or "default"},
                  "decode": decode, "anchors": anchors}
        out_path.write_text(json.dumps(result, indent=1))

    def case(system, T, N):
        done = next((r for r in rows if (r["system"], r["context"], r["agents"]) == (system, T, N)), None)
        if done is not None:
            return done
        if out_of_time():
            return {"skipped": True}
        ctx = torch.randint(3, vocab, (T,), device=dev, generator=g)
        prompts = [torch.randint(3, vocab, (PROMPT,), device=dev, generator=g) for _ in range(N)]
        rec = {"system": system, "context": T, "agents": N}
        try:
            rec.update(run_one(pm, system, ctx, prompts, names_all[:N], args.new_tokens))
        except torch.cuda.OutOfMemoryError:
            from forkkv_hf.peft_integration import remove_stale_peft_hooks

            rec["oom"] = True
            remove_stale_peft_hooks(pm)  # PEFT leaves its adapter_names hooks when generate raises
            _free()
        rows.append(rec)
        print(json.dumps(rec), flush=True)
        save()
        return rec

    for T in args.contexts:
        for N in args.agents:
            case("baseline", T, N)
        for N in args.forkkv_agents:
            case("forkkv", T, N)

    # capacity under the budget, at one context: peak(N) is linear in N; fit it on the measured runs, run the max N
    T = args.capacity_context
    for system in ("baseline", "forkkv"):
        if args.no_capacity or system in capacity or out_of_time():
            continue
        listed = args.agents if system == "baseline" else args.forkkv_agents
        pts = sorted((r["agents"], r["peak_gib"]) for r in rows if r["system"] == system and r["context"] == T
                     and r["agents"] in listed and not r.get("oom"))
        if len(pts) < 2:
            continue
        (n1, p1), (n2, p2) = pts[-2], pts[-1]
        slope = (p2 - p1) / (n2 - n1)
        n_cap = int(math.floor(n2 + (args.budget_gib * 0.97 - p2) / slope)) if slope > 0 else n2
        cap = {"context": T, "fit_points": pts, "gib_per_agent": slope, "predicted_max_agents": n_cap}
        if n_cap > n_max:  # agents are distinct adapters: no more agents than adapters built
            cap["limited_by_adapters_built"] = n_max
            n_cap = n_max
        finished = True
        while n_cap > n2:
            rec = case(system, T, n_cap)
            if rec.get("skipped"):
                finished = False
                break
            if not rec.get("oom"):
                break
            n_cap = int(n_cap * 0.9)
        if not finished:
            continue
        cap["max_agents_run"] = max(n_cap, n2)
        capacity[system] = cap
        print(json.dumps({"capacity": system, **cap}), flush=True)
        save()

    if not args.no_profile and not args.only_decode and not profile and not out_of_time():
        profile = []
        T = args.capacity_context
        for system, N in ((("forkkv", 32), ("forkkv", 1), ("baseline", 1)) if not args.tiny else (("forkkv", 2),)):
            ctx = torch.randint(3, vocab, (T,), device=dev, generator=g)
            prompts = [torch.randint(3, vocab, (PROMPT,), device=dev, generator=g) for _ in range(N)]
            try:
                p = profile_decode(pm, system, ctx, prompts, names_all[:N])
            except Exception as e:  # noqa: BLE001 - keep the measurements even if the profiler fails
                p = {"system": system, "rows": N, "error": repr(e)[:500]}
                from forkkv_hf.peft_integration import remove_stale_peft_hooks

                remove_stale_peft_hooks(pm)
            _free()
            profile.append(p)
            print(json.dumps({"profile": p}), flush=True)
            save()

    cap = capacity.get("forkkv", {}).get("max_agents_run")
    at_capacity = [cap] if args.decode_agents and cap and cap <= n_max and cap not in args.decode_agents else []
    for N in args.decode_agents + at_capacity:
        decode_step.forkkv_cases(pm, decode_ctx, decode_prompts[:N], names_all[:N], [c == "on" for c in args.compile],
                                 *args.decode_tokens, args.decode_reps, compile_config,
                                 profile=not args.no_profile, done=decode, save=save,
                                 out_of_time=out_of_time)
        _free()
    save()
    print("wrote", out_path)


if __name__ == "__main__":
    main()
