"""End-to-end benchmark: N LoRA agents over one shared context, ForkKV vs what a PEFT user does today.

Llama-3.1-8B shapes (random bf16 weights), N rank-16 LoRA adapters on q/k/v/o (non-zero B), a shared context of T
tokens, a 64-token prompt per agent, 128 generated tokens per agent (``min_new_tokens = max_new_tokens``).

- ``baseline``: one ``PeftModel``, ``generate(adapter_names=...)`` over rows "context + prompt" (PEFT's mixed batch,
  ``DynamicCache``, SDPA): every agent prefills the context with its own adapter and keeps its own K/V.
- ``forkkv``: ``enable_forkkv`` (ResidualAttention kernels + batched LoRA), one base pass over the context
  (``SharedContext.build``), ``fork(names)``, ``generate`` over the prompts.

For each (T, N): time to first token (the whole batch's first token, prefill included), decode tokens/s, total time,
peak GPU memory (``max_memory_allocated``) and cache bytes; the times from each new token's mark on the GPU's timeline
(:class:`~.measure.StepMarks`: no synchronisation inside the call; results before 2026-12-07 waited for the GPU at
every step). Capacity: under a memory budget (``--budget-gib``,
enforced with ``set_per_process_memory_fraction``), peak memory is measured at two N, the largest N that fits is
derived from that line and searched for up to it (:func:`_capacity`: no case after an out-of-memory one where it can
be avoided), and the N found is run (and must fit) to report its throughput. ``torch.profiler`` over decode steps
of ``generate`` (ForkKV at N=32 and N=1, the baseline at N=1, at the capacity context) says where the time goes.
ForkKV's decode runs eager here (``disable_compile=True``); :mod:`eval.bench.decode` measures it compiled. Result: the one schema (eval/bench/schema.py), rows keyed by (system, context, agents); capacity and profile in
``extra``.

    python -m eval.bench.e2e [--contexts 4096 16384 32768] [--agents 1 4 8] [--forkkv-agents 1 4 8 32 128]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from .measure import (KERNEL_FAMILIES, StepMarks, free_memory, is_cuda_event, kernel_seconds_by_family, oom_record,
                      peak_bytes, peaks_gib, sync)
from .models import add_random_adapters, build_model, build_model_split, default_device, llama8b_config
from .runner import BenchmarkRun

PROMPT, NEW, PREFILL_CHUNK = 64, 128, 4096
CASE_KEYS = ("system", "context", "agents")


def cache_bytes(cache) -> int:
    from forkkv_hf import ForkKVCache

    if isinstance(cache, ForkKVCache):
        return cache.memory_report().forkkv_bytes
    return sum(t.numel() * t.element_size() for l in cache.layers for t in (l.keys, l.values) if t is not None)


def _generate(pm, system, ctx, inputs, names, gen, shared=None, baseline_batched_lora=False):
    """One ``generate`` of the agents as ``system`` does it; returns the output and the cache it filled.
    ForkKV: one base pass over ``ctx`` (or the given ``shared``), a fork per call. Baseline: every row prefills the
    context with its own adapter, with PEFT's per-adapter LoRA loop or (``baseline_batched_lora``) forkkv_hf's
    batched LoRA (eval/bench/tp.py: PEFT 0.21.0's mixed-adapter loop fails under tensor parallelism)."""
    import forkkv_hf
    from forkkv_hf import SharedContext, cache_kwargs

    if system == "forkkv":
        forkkv_hf.enable_forkkv(pm)
        shared = shared or SharedContext.build(pm, ctx, sorted(set(names)), progress=False)
        cache = shared.fork(names)
        gen = {"disable_compile": True, **gen}  # per-step timed eager decode (eval.bench.decode times compiled)
        return pm.generate(**inputs, adapter_names=names, **gen, **cache_kwargs(cache)), cache
    forkkv_hf.disable_forkkv(pm)
    if baseline_batched_lora:
        from forkkv_hf.peft.batched_lora import enable_batched_lora

        enable_batched_lora(pm)
    # chunked prefill bounds the activations of N long rows (what a careful HF user would do)
    out = pm.generate(**inputs, adapter_names=names, prefill_chunk_size=PREFILL_CHUNK, **gen)
    return out, getattr(out, "cache", None) or getattr(out, "past_key_values", None)


def run_one(pm, system, ctx, prompts, names, new_tokens, baseline_batched_lora=False):
    """One generate of N agents; returns the measurements (raises torch.cuda.OutOfMemoryError if it does not fit)."""
    from transformers import LogitsProcessorList

    from forkkv_hf import batch_inputs

    free_memory()
    marks = StepMarks()  # each new token marked on the GPU's timeline, no synchronisation inside the call
    dev = ctx.device
    inputs = batch_inputs(ctx, prompts, pad_token_id=0, device=dev)
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
               return_dict_in_generate=True, logits_processor=LogitsProcessorList([marks]))
    sync()
    marks.begin(pm.get_output_embeddings().weight.device)
    with torch.no_grad():
        out, cache = _generate(pm, system, ctx, inputs, names, gen, baseline_batched_lora=baseline_batched_lora)
    times = marks.elapsed()  # each token's seconds since the start
    steps = sorted(b - a for a, b in zip(times, times[1:]))
    rec = {
        "ttft_s": times[0],
        "total_s": times[-1],
        "decode_s": times[-1] - times[0],
        "decode_tok_s": len(names) * (len(times) - 1) / max(times[-1] - times[0], 1e-9),
        "step_ms_median": 1e3 * steps[(len(steps) - 1) // 2] if steps else None,
        "peak_gib": peak_bytes() / 2**30,
        "peak_gib_per_gpu": peaks_gib(),
        "cache_gib": cache_bytes(cache) / 2**30,
        "new_tokens": out.sequences.shape[1] - inputs["input_ids"].shape[1],
    }
    del out, cache
    free_memory()
    return rec


def measure_case(pm, system, ctx, prompts, names, new_tokens, baseline_batched_lora=False) -> dict:
    """:func:`run_one`'s measurements, or ``{"oom": True}`` when the case does not fit (PEFT's stale hooks removed)."""
    from forkkv_hf.peft.wrappers import remove_stale_peft_hooks

    try:
        return run_one(pm, system, ctx, prompts, names, new_tokens, baseline_batched_lora)
    except torch.cuda.OutOfMemoryError as e:
        rec = oom_record(e)
    remove_stale_peft_hooks(pm)  # PEFT leaves its adapter_names hooks when generate raises
    free_memory()  # outside the except block: its exception held the failed call's frames, and their tensors
    return rec


def _profiled_generate(pm, system, ctx, prompts, names, new_tokens, profiled=True, shared=None):
    """Wall time, kernel time by family and CPU time of the ops of one ``generate`` of ``new_tokens`` tokens
    (without ``profiled``: wall time only, free of the profiler's own overhead)."""
    import contextlib

    from torch.profiler import ProfilerActivity, profile

    from forkkv_hf import batch_inputs

    inputs = batch_inputs(ctx, prompts, pad_token_id=0, device=ctx.device)
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        sync()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with (profile(activities=acts) if profiled else contextlib.nullcontext()) as prof:
            t0 = time.perf_counter()
            _generate(pm, system, ctx, inputs, names, gen, shared=shared)
            sync()
            wall = time.perf_counter() - t0
    cpu = {}
    if not profiled:
        return wall, {k: 0.0 for k in KERNEL_FAMILIES}, cpu
    gpu = kernel_seconds_by_family(prof, KERNEL_FAMILIES, "elementwise/other")
    for ev in prof.key_averages():
        if not is_cuda_event(ev):
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


#: the widest gap between the largest measured N and the fit's that the capacity search walks one N at a time
STEP_LIMIT = 8


def _capacity(run, measure, system, T, listed, budget_gib, n_max) -> None:
    """The largest N of ``system`` that fits ``budget_gib`` at context ``T``: peak(N) is linear in N; fit it on the
    two largest measured N of ``listed`` and search up to the fit's N, into ``run.extra``. A case that runs after an
    out-of-memory one in the same process may inherit the failed case's allocator fragments (not measured: v44's
    baseline ran 7, 6 and 5 agents out of memory, but what failed 5 was ForkKV's stacked factors left alive by
    ``disable_forkkv``, since fixed), so within :data:`STEP_LIMIT` of the largest measured N the search goes up one N
    at a time and stops at the first that does not fit; beyond it (ForkKV) it runs the fit's N, then 10% fewer until
    one fits, flagging ``after_oom`` where that lower N ran after an OOM."""
    pts = sorted((r["agents"], r["peak_gib"]) for r in run.rows if r["system"] == system and r["context"] == T
                 and r["agents"] in listed and not r.get("oom"))
    if len(pts) < 2:
        return
    (n1, p1), (n2, p2) = pts[-2], pts[-1]
    slope = (p2 - p1) / (n2 - n1)
    n_cap = int(math.floor(n2 + (budget_gib * 0.97 - p2) / slope)) if slope > 0 else n2
    cap = {"context": T, "fit_points": pts, "gib_per_agent": slope, "predicted_max_agents": n_cap}
    if n_cap > n_max:  # agents are distinct adapters: no more agents than adapters built
        cap["limited_by_adapters_built"] = n_max
        n_cap = n_max
    fits, tries = n2, (list(range(n2 + 1, n_cap + 1)) if n_cap - n2 <= STEP_LIMIT else [n_cap])
    while tries:
        n = tries.pop(0)
        rec = measure(system, T, n)
        if rec.get("skipped"):
            return
        if rec.get("oom"):
            cap["first_oom_agents"] = n
            if n_cap - n2 <= STEP_LIMIT:
                break
            cap["after_oom"] = True
            if int(n * 0.9) > n2:
                tries.append(int(n * 0.9))
            continue
        fits = n
        if n_cap - n2 > STEP_LIMIT:
            break
    cap["max_agents_run"] = fits
    run.extra["capacity"][system] = cap
    print(json.dumps({"capacity": system, **cap}), flush=True)
    run.save()


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
    ap.add_argument("--out", default=None)
    ap.add_argument("--resume", default=None,
                    help="a JSON of an earlier, unfinished run on the same GPU: its cases are kept, not rerun")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="seconds: start no new case after this (the JSON is saved after each case; --resume it)")
    args = ap.parse_args(argv)
    dev = default_device()
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    if dev == "cuda":
        for i in range(torch.cuda.device_count()):
            total = torch.cuda.get_device_properties(i).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.budget_gib * 2**30 / total), i)
    t0 = time.time()
    config = llama8b_config(layers=args.layers, tiny=args.tiny)
    device_map = None
    split = bool(args.devices and len(args.devices) > 1)
    if split:
        model, device_map = build_model_split(config, args.devices, dtype=dtype)
    else:
        model = build_model(config, dtype=dtype)
    n_max = max(args.agents + args.forkkv_agents + [args.adapters])
    names_all = [f"agent{i}" for i in range(n_max)]
    pm = add_random_adapters(model, names_all, rank=16)
    weights_gib = (sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**30
                   if dev == "cuda" else 0.0)
    print(f"model + {n_max} adapters: {weights_gib:.1f} GiB, built in {time.time() - t0:.0f} s", flush=True)
    g = torch.Generator(device=dev).manual_seed(0)
    vocab = model.config.vocab_size
    params = {"model": {"shape": "tiny" if args.tiny else "Llama-3.1-8B", "layers": args.layers, "dtype": str(dtype),
                        "lora": "rank 16 on q/k/v/o", "adapters_built": n_max, "weights_and_adapters_gib": weights_gib,
                        "devices": args.devices or [dev], "device_map": device_map},
              "prompt_tokens": PROMPT, "new_tokens": args.new_tokens, "budget_gib": args.budget_gib,
              "baseline_prefill_chunk": PREFILL_CHUNK}
    run = BenchmarkRun("bench_e2e", params, CASE_KEYS, out=args.out, suffix=f"_x{len(args.devices)}" if split else "",
                       resume=args.resume, time_limit=args.time_limit)
    run.extra.setdefault("capacity", {})
    run.extra.setdefault("profile", None)

    def draw(T, N):  # a context and N prompts, drawn only for the cases that run (resumed cases draw nothing)
        ctx = torch.randint(3, vocab, (T,), device=dev, generator=g)
        return ctx, [torch.randint(3, vocab, (PROMPT,), device=dev, generator=g) for _ in range(N)]

    def measure(system, T, N):
        return run.measure({"system": system, "context": T, "agents": N},
                           lambda: measure_case(pm, system, *draw(T, N), names_all[:N], args.new_tokens))

    for T in args.contexts:
        for N in args.agents:
            measure("baseline", T, N)
        for N in args.forkkv_agents:
            measure("forkkv", T, N)

    for system in ("baseline", "forkkv"):
        if args.no_capacity or system in run.extra["capacity"] or run.out_of_time():
            continue
        listed = args.agents if system == "baseline" else args.forkkv_agents
        _capacity(run, measure, system, args.capacity_context, listed, args.budget_gib, n_max)

    if not args.no_profile and not run.extra["profile"] and not run.out_of_time():
        run.extra["profile"] = profile = []
        for system, N in ((("forkkv", 32), ("forkkv", 1), ("baseline", 1)) if not args.tiny else (("forkkv", 2),)):
            ctx, prompts = draw(args.capacity_context, N)
            try:
                p = profile_decode(pm, system, ctx, prompts, names_all[:N])
            except Exception as e:  # noqa: BLE001 - keep the measurements even if the profiler fails
                p = {"system": system, "rows": N, "error": repr(e)[:500]}
                from forkkv_hf.peft.wrappers import remove_stale_peft_hooks

                remove_stale_peft_hooks(pm)
            free_memory()
            profile.append(p)
            print(json.dumps({"profile": p}), flush=True)
            run.save()
    run.finish()


if __name__ == "__main__":
    main()
