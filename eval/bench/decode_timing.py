"""How :mod:`eval.bench.decode` times one case: ``generate`` calls of two lengths (the step as their difference, and
the decode steps alone between each call's step marks), the first call of a shape with where its compile time went,
what happened inside the timed calls, and the profilers' GPU time by kernel family and host time per step."""

from __future__ import annotations

import gc
import statistics
import time

import torch

from .measure import (KERNEL_FAMILIES, TRITON_COMPILES, FullCollections, StepMarks, compile_counters, counters_since,
                      kernel_seconds_by_family, kernels_by_name, sync, watch_triton_compiles)

NAMES = "kernels by name"


def _wall(run, n: int) -> tuple[float, object]:
    sync()
    t = time.perf_counter()
    out = run(n)
    sync()
    return time.perf_counter() - t, out


def _first_call(run, n: int) -> tuple[float, object, dict]:
    """The first call of a shape, with where its compile time went: dynamo's timed phases summed over the call
    (``torch._dynamo.utils.compilation_time_metrics``: ``compile_inner`` is all of dynamo and its backend,
    ``bytecode_tracing`` the tracing, ``OutputGraph.call_user_compiler`` inductor and AOT autograd, ...), the
    graphs compiled and the compile caches' hits and misses (inductor's FX graph cache, AOT autograd's)."""
    from torch._dynamo import utils as du

    metrics = getattr(du, "compilation_time_metrics", {})
    before = {k: sum(v) for k, v in metrics.items()}
    counts = {k: dict(du.counters[k]) for k in ("stats", "inductor", "aot_autograd")}
    dt, out = _wall(run, n)
    phases = {k: round(sum(v) - before.get(k, 0.0), 3) for k, v in metrics.items()}
    caches = {f"{k}.{name}": c - counts[k].get(name, 0) for k in ("stats", "inductor", "aot_autograd")
              for name, c in du.counters[k].items()
              if "cache" in name or name in ("unique_graphs", "calls_captured")}
    return dt, out, {"seconds": {k: v for k, v in sorted(phases.items(), key=lambda kv: -kv[1]) if v > 0.05},
                     "counts": {k: v for k, v in caches.items() if v}}


def _gpu_seconds(run, n: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    sync()
    with profile(activities=acts) as prof:
        run(n)
        sync()
    return {**kernel_seconds_by_family(prof, KERNEL_FAMILIES, "elementwise/other"), NAMES: kernels_by_name(prof)}


def measure(run, rows: int, n1: int, n2: int, reps: int, profile: bool, host: bool = False,
            log: str | None = None, freeze_gc: bool = False, on_timed=None,
            marks: StepMarks | None = None) -> tuple[dict, object]:
    """``run(n)``: one ``generate`` of ``n`` new tokens for ``rows`` rows (a fresh cache each call). The first call is
    the first of its shape; then ``n1`` is warmed up and ``n1``/``n2`` are timed ``reps`` times each, alternating.
    ``host``: also the host's per-step profile (:func:`host_profile`); ``log``: a name to print each phase's end
    with; ``freeze_gc``: ``gc.freeze()`` after the warm-up (what was allocated so far, the compiled graphs among it,
    leaves the collector's walks; undone at the end); ``on_timed``: called with the timed phase's measurements before
    the profiles (a call cut in them keeps these, :meth:`BenchmarkRun.partial`); ``marks``: the :class:`StepMarks`
    that ``run`` passes to ``generate``, read after each timed call. Returns the measurements and the last ``n2``
    output."""
    say = (lambda what: print(f"{log}: {what} ({time.strftime('%H:%M:%S')})", flush=True)) if log else \
        (lambda what: None)
    watch_triton_compiles()
    jits = len(TRITON_COMPILES)
    first, out, compile_info = _first_call(run, n2)
    compile_info["triton_jit_compiles"] = len(TRITON_COMPILES) - jits
    say(f"first call {first:.1f} s: {compile_info}")
    _wall(run, n1)
    if freeze_gc:
        gc.collect()
        gc.freeze()
    before, jits = compile_counters(), len(TRITON_COMPILES)
    times = {n1: [], n2: []}
    each = {"n1": [], "n2": []}  # per timed call, in the order of generate_each_s: what happened inside it
    full_gc = {"n1": [], "n2": []}  # per timed call: [full collections, their seconds]
    marked = {"n1": [], "n2": []}  # per timed call: ms per step between its first and last token's marks
    for _ in range(reps):
        for n, key in ((n1, "n1"), (n2, "n2")):
            call_before = compile_counters()
            if marks is not None:
                marks.begin()  # the earlier calls' marks cleared
            with FullCollections() as gcs:
                dt, o = _wall(run, n)
            if marks is not None:
                marked[key].append(round(1e3 * (marks.step_seconds() or 0.0), 3))
            times[n].append(dt)
            each[key].append(counters_since(call_before))
            full_gc[key].append([gcs.collections, round(gcs.seconds, 4)])
            out = o if n == n2 else out
    events = counters_since(before)  # over the timed calls: a warm step should add none
    all_times = {"n1": [round(t, 4) for t in times[n1]], "n2": [round(t, 4) for t in times[n2]]}
    t1, t2 = statistics.median(times[n1]), statistics.median(times[n2])  # of an even count: the middle two's mean
    step = (t2 - t1) / (n2 - n1)
    # each rep's own estimate (its n1 call and the n2 call after it): their spread is the step's uncertainty, which
    # the prefill's jitter divided by n2 - n1 dominates (v37: 106.8 and 125.6 ms around a median of 116.2)
    step_each = [round(1e3 * (b - a) / (n2 - n1), 3) for a, b in zip(times[n1], times[n2])]
    peak = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB so far" if torch.cuda.is_available() else ""
    say(f"timed: step {1e3 * step:.2f} ms (each rep {step_each}), {rows / step if step > 0 else 0:.1f} tok/s, "
        f"generate {t1:.2f} / {t2:.2f} s (each {all_times}), marked {marked}, events {events}{peak}")
    # (a call cut after the line above, in the profile or the eager check, keeps these figures in its log)
    rec = {"rows": rows, "n1": n1, "n2": n2, "reps": reps, "generate_s": [t1, t2], "generate_each_s": all_times,
           "first_call_s": first, "first_call_extra_s": first - t2, "first_call_compile": compile_info,
           "step_ms": 1e3 * step, "step_ms_each": step_each, "tok_s": rows / step if step > 0 else None,
           "events_while_timed": events,
           "events_each_call": each, "triton_compiled_while_timed": TRITON_COMPILES[jits:],
           "full_gc_each_call": full_gc, "gc_frozen": gc.get_freeze_count() if freeze_gc else None}
    if marks is not None:  # the decode steps alone (the n2 calls: more steps between their marks)
        rec.update(step_ms_marked=statistics.median(marked["n2"]), step_ms_marked_each=marked)
    if freeze_gc:
        gc.unfreeze()
    if on_timed is not None:
        on_timed(dict(rec))
    if host:
        try:
            rec["host_profile"] = host_profile(run, n1, n2)
        except Exception as e:  # noqa: BLE001
            rec["host_profile_error"] = repr(e)[:300]
    if profile:
        try:
            g1, g2 = _gpu_seconds(run, n1), _gpu_seconds(run, n2)
            n1s, n2s = g1.pop(NAMES), g2.pop(NAMES)
            names = {k: [(c - n1s.get(k, [0, 0.0])[0]) / (n2 - n1), 1e6 * (t - n1s.get(k, [0, 0.0])[1]) / (n2 - n1)]
                     for k, (c, t) in n2s.items()}
            kernels = sum(c for c, _ in names.values())
            top = sorted(names.items(), key=lambda kv: -kv[1][0])[:40]
            by_family = {k: 1e3 * max(0.0, (g2[k] - g1[k]) / (n2 - n1)) for k in g2}
            busy = sum(by_family.values())
            rec.update(gpu_busy_ms=busy, step_over_busy=1e3 * step / busy if busy > 0 else None,
                       gpu_ms_by_family=by_family, kernels_per_step=kernels,
                       kernels_per_step_by_name={k: {"launches": round(c, 2), "us": round(t, 1)} for k, (c, t) in top})
        except Exception as e:  # noqa: BLE001 - keep the timings if the profiler fails
            rec["profile_error"] = repr(e)[:300]
    return rec, out


def host_profile(run, n1: int, n2: int, top: int = 40) -> list[dict]:
    """Where the host spends a decode step: ``cProfile`` over one ``run(n1)`` and one ``run(n2)``, the difference of
    each function's own time (tottime) and cumulative time per step, the ``top`` functions by own time. cProfile
    slows Python calls, so the figures rank the host's work rather than time it; C-level work (dynamo's guards, a
    CUDA-graph replay, a device sync) is charged to the function that calls it."""
    import cProfile
    import pstats

    def stats(n):
        prof = cProfile.Profile()
        sync()
        prof.enable()
        run(n)
        sync()
        prof.disable()
        return {f"{k[0].split('site-packages/')[-1]}:{k[1]}({k[2]})": (v[2], v[3], v[1])
                for k, v in pstats.Stats(prof).stats.items()}

    s1, s2 = stats(n1), stats(n2)
    per = max(1, n2 - n1)
    rows = []
    for k, (tt, ct, calls) in s2.items():
        t1, c1, n1_calls = s1.get(k, (0.0, 0.0, 0))
        rows.append({"function": k, "own_ms": 1e3 * (tt - t1) / per, "cum_ms": 1e3 * (ct - c1) / per,
                     "calls": (calls - n1_calls) / per})
    rows.sort(key=lambda r: -r["own_ms"])
    return [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows[:top]]
