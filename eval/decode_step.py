"""The decode step of plain ``generate``, measured as a user runs it: no per-step hooks or synchronisation.

- step: the difference of two ``generate`` calls of ``n1`` and ``n2`` new tokens (``min_new_tokens`` =
  ``max_new_tokens``), divided by ``n2 - n1`` (the prefill and the per-call work cancel out); median of ``reps``;
- GPU-busy time per step: the same difference of the GPU kernel time ``torch.profiler`` records (by kernel family);
- first call: the wall time of the first ``generate`` of a shape minus that of a warm one (with compile on: the
  compile, the CUDA-graph recording and the Triton JIT of that shape).

Used by ``eval/bench_e2e.py`` (``--decode-agents``) for ForkKV with compile on and off, and for the two
transformers-alone anchors (no PEFT, one row): eager ``DynamicCache``, and ``cache_implementation="static"`` with
transformers' own compile.
"""

from __future__ import annotations

import time

import torch

from common import _sync, kernel_seconds_by_family

FAMILIES = {"forkkv attention kernels": ("_shared_part", "_private_merge"), "batched LoRA kernels": ("_gathered_mm",),
            "attention (SDPA/flash)": ("flash", "fmha", "attention", "Attention"),
            "GEMM": ("gemm", "Gemm", "cutlass", "sm90_xmma", "nvjet", "cublas"), "elementwise/other": ()}


def _wall(run, n: int) -> float:
    _sync()
    t = time.perf_counter()
    run(n)
    _sync()
    return time.perf_counter() - t


def _gpu_seconds(run, n: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    _sync()
    with profile(activities=acts) as prof:
        run(n)
        _sync()
    return kernel_seconds_by_family(prof, FAMILIES, "elementwise/other")


def measure(run, rows: int, n1: int = 8, n2: int = 40, reps: int = 3, profile: bool = True) -> dict:
    """``run(n)``: one ``generate`` of ``n`` new tokens for ``rows`` rows (a fresh cache each call). The first call
    is the first of its shape (``first_call_s``); then ``n1`` and ``n2`` are warmed up and timed ``reps`` times each.
    Returns step, tokens/s, GPU-busy time per step (and its share of the step), kernel time per step by family."""
    first = _wall(run, n2)
    _wall(run, n1)
    t1 = sorted(_wall(run, n1) for _ in range(reps))[reps // 2]
    t2 = sorted(_wall(run, n2) for _ in range(reps))[reps // 2]
    step = (t2 - t1) / (n2 - n1)
    rec = {"rows": rows, "n1": n1, "n2": n2, "reps": reps, "generate_s": [t1, t2], "first_call_s": first,
           "first_call_extra_s": first - t2, "step_ms": 1e3 * step, "tok_s": rows / step if step > 0 else None}
    if profile:
        try:
            g1, g2 = _gpu_seconds(run, n1), _gpu_seconds(run, n2)
            by_family = {k: 1e3 * max(0.0, (g2[k] - g1[k]) / (n2 - n1)) for k in g2}
            busy = sum(by_family.values())
            rec.update(gpu_busy_ms=busy, step_over_busy=1e3 * step / busy if busy > 0 else None,
                       gpu_ms_by_family=by_family)
        except Exception as e:  # noqa: BLE001 - keep the timings if the profiler fails
            rec["profile_error"] = repr(e)[:300]
    return rec


def forkkv_runner(pm, shared, inputs: dict, names: list, compile_on: bool, compile_config=None):
    """``run(n)``: ForkKV's ``generate`` over a fresh fork of ``shared`` (``disable_compile`` unless ``compile_on``;
    ``compile_config``: ``None`` for transformers' default)."""
    from forkkv_hf import cache_kwargs

    extra = {"disable_compile": True} if not compile_on else (
        {"compile_config": compile_config} if compile_config is not None else {})

    def run(n: int):
        with torch.no_grad():
            return pm.generate(**inputs, adapter_names=names, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=0, **cache_kwargs(shared.fork(names)), **extra)

    return run


def anchor_runner(model, input_ids, static: bool, compile_config=None):
    """``run(n)``: transformers alone (no PEFT) on ``input_ids`` (context + prompt): ``DynamicCache`` eager, or
    ``cache_implementation="static"`` with transformers' compile (``compile_config``: ``None`` for its default)."""
    extra = {"cache_implementation": "static"} if static else {"disable_compile": True}
    if static and compile_config is not None:
        extra["compile_config"] = compile_config

    def run(n: int):
        with torch.no_grad():
            return model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, pad_token_id=0, **extra)

    return run


def compile_config_for(device: str, backend: str | None):
    """``None`` (transformers' default: inductor, CUDA graphs) on CUDA unless a ``backend`` is named; else a
    ``CompileConfig`` with that backend (``eager`` by default off CUDA, where ``_compile_all_devices`` is set)."""
    if device == "cuda" and backend is None:
        return None
    from transformers import CompileConfig

    backend = backend or ("inductor" if device == "cuda" else "eager")
    cc = CompileConfig(backend=backend, mode="reduce-overhead" if backend == "inductor" else None)
    if device != "cuda":
        cc._compile_all_devices = True
    return cc


def raise_recompile_limit(n: int = 64) -> None:
    """One compiled graph per shape (batch, context, capacity): allow more than dynamo's default 8 before it falls
    back to eager."""
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(n, getattr(torch._dynamo.config, name)))


def anchor_cases(model, input_ids, n1: int, n2: int, reps: int, compile_config, profile: bool) -> list[dict]:
    """The transformers-alone rows (a plain model, no PEFT, one row): eager ``DynamicCache``; ``StaticCache`` with
    transformers' own compile."""
    out = []
    for static in (False, True):
        rec = {"system": "transformers, StaticCache + compile" if static else "transformers, DynamicCache eager",
               "context": input_ids.shape[1] - 64, "agents": 1, "compile": static}
        rec.update(measure(anchor_runner(model, input_ids, static, compile_config), 1, n1, n2, reps, profile))
        print({k: v for k, v in rec.items() if k != "gpu_ms_by_family"}, flush=True)
        out.append(rec)
    torch._dynamo.reset()
    return out


def forkkv_cases(pm, ctx, prompts: list, names: list, compiles: list, n1: int, n2: int, reps: int, compile_config,
                 profile: bool, done: list, save, out_of_time) -> None:
    """ForkKV rows for one N (``len(names)``) at one context, with compile on and/or off, appended to ``done``
    (cases already there are skipped; ``save()`` after each)."""
    import forkkv_hf
    from forkkv_hf import SharedContext, batch_inputs

    T, N = ctx.numel(), len(names)
    todo = [c for c in compiles if not any((r["context"], r["agents"], r["compile"]) == (T, N, c) for r in done)]
    if not todo or out_of_time():
        return
    forkkv_hf.enable_forkkv(pm)
    inputs = batch_inputs(ctx, prompts, pad_token_id=0, device=ctx.device)
    with torch.no_grad():
        shared = SharedContext.build(pm, ctx, sorted(set(names)), progress=False)
    for c in todo:
        if out_of_time():
            return
        rec = {"system": "forkkv", "context": T, "agents": N, "compile": c}
        try:
            rec.update(measure(forkkv_runner(pm, shared, inputs, names, c, compile_config), N, n1, n2, reps, profile))
        except torch.cuda.OutOfMemoryError:
            from forkkv_hf.peft_integration import remove_stale_peft_hooks

            rec["oom"] = True
            remove_stale_peft_hooks(pm)
        print({k: v for k, v in rec.items() if k != "gpu_ms_by_family"}, flush=True)
        done.append(rec)
        save()
        if c:  # the next shape compiles anew: drop this one's graphs, CUDA-graph pools and static buffers
            from forkkv_hf.static_cache import free_static_buffers

            free_static_buffers(pm)
            torch._dynamo.reset()
