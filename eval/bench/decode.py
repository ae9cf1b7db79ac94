"""Decode step of plain ``generate`` with a ForkKVCache, compiled (issue 18) and eager, measured as a user runs it.

Llama-3.1-8B shapes (random bf16 weights), N rank-16 LoRA agents on q/k/v/o over one ``--context``-token shared
context, a 64-token prompt per agent, greedy ``generate(**inputs, adapter_names=names, past_key_values=fork)``, no
per-step hooks or synchronisation:

- step: the difference of two ``generate`` calls of ``n1`` and ``n2`` new tokens (``min_new_tokens`` =
  ``max_new_tokens``, ``--tokens``), divided by ``n2 - n1``: the prefill and the per-call work cancel out; median of
  ``--reps``; tok/s = N / step; ``step_ms_each``: each rep's own estimate (its spread: the prefill's jitter over
  ``n2 - n1`` steps); n1 and n2 must give one private capacity (a 64-token prompt plus n in one multiple of 64);
  ``step_ms_marked``: the decode steps alone, between each call's first and last token (:class:`~.measure.StepMarks`,
  CUDA events, no synchronisation), median of the n2 calls (``step_ms_marked_each``: every timed call's);
- GPU-busy time per step: the same difference of the GPU kernel time ``torch.profiler`` records (by kernel family;
  kernels replayed from CUDA graphs count too); ``step_over_busy`` = step / GPU-busy (1.0: the GPU never waits);
  ``kernels_per_step``: the kernels a step runs (each leaves a gap of about a microsecond or more even inside a
  CUDA graph, which GPU-busy does not count); ``--host-profile``: where the host's part of a compiled step goes;
- first call: the wall time of the first ``generate`` of a shape (with compile on: dynamo, inductor, the CUDA-graph
  recording and the Triton JIT of that shape), and its excess over a warm call (``first_call_extra_s``);
  ``first_call_compile``: dynamo's timed phases within it and the compile caches' hits and misses;
  ``--first-call-only`` in a later process times it again with the compile caches an earlier run left on disk
  (Triton's kernel cache and inductor's FX-graph cache, on by default), as a user's second run meets it;
- what happened inside the timed calls: ``events_while_timed`` over all of them, ``events_each_call`` per call (in
  the order of ``generate_each_s``): recompiles, new graphs, CUDA-graph skips and re-recordings, Triton JIT compiles
  of our kernels (``triton_compiled_while_timed`` names them) and the CUDA allocator's device allocations and
  retries (``measure.compile_counters``); a warm call should show none; ``full_gc_each_call``: per call, Python's
  full garbage collections inside it and their seconds (``measure.FullCollections``);
- ``peak_gib``: the case's peak allocator memory (``max_memory_allocated``: the model and its adapters, the shared
  context, the calls, CUDA-graph pools); ``--budget-gib`` caps the GPU at that much (a case that does not fit is
  recorded as ``oom``), e.g. 60 for the capacity row of the end-to-end benchmark;
- ``--adapters``: adapters loaded beyond the rows' (the first call's compile grows with them);
- ``FORKKV_COMPILE_REGIONS=on`` in the environment: the compiled rows compile the decoder layer once
  (:mod:`forkkv_hf.compile_regions`; ``params.compile_regions`` records it).

Rows (case keys system, context, agents, compile): ``forkkv`` with the decode step compiled (transformers' default
``CompileConfig`` on CUDA: inductor, ``mode="reduce-overhead"``, i.e. CUDA graphs) and eager
(``disable_compile=True``; every N compiled first, then eager), the compiled row also gives each row's first
token that differs from an eager ``generate``'s (``first_divergence_vs_eager``); and two
transformers-alone anchors (no PEFT, one row, measured first on the plain model): eager ``DynamicCache``, and
``cache_implementation="static"`` with transformers' own compile.

    python -m eval.bench.decode [--agents 1 8 32 128] [--context 32768] [--compile on off] [--time-limit S]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from transformers import LogitsProcessorList

from forkkv_hf.compile_policy import CAPACITY_STEP, round_capacity
from forkkv_hf.config import get_config

from ..cli import positive_int
from .decode_timing import _first_call, measure
from .measure import StepMarks, free_memory, oom_record
from .models import add_random_adapters, build_model, default_device, llama8b_config
from .runner import BenchmarkRun

PROMPT = 64
CASE_KEYS = ("system", "context", "agents", "compile")
ANCHORS = ("transformers, DynamicCache eager", "transformers, StaticCache + compile")


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


def _compile_kwargs(compile_on: bool, compile_config) -> dict:
    if not compile_on:
        return {"disable_compile": True}
    return {"compile_config": compile_config} if compile_config is not None else {}


def anchor_cases(run: BenchmarkRun, model, input_ids, args, compile_config) -> None:
    """The transformers-alone rows (the plain model, no PEFT, one row): eager ``DynamicCache``; ``StaticCache`` with
    transformers' own compile."""
    T, marks = input_ids.shape[1] - PROMPT, StepMarks()
    for system, static in zip(ANCHORS, (False, True)):
        extra = {"cache_implementation": "static", **_compile_kwargs(True, compile_config)} if static else \
            {"disable_compile": True}

        def gen(n, extra=extra):
            with torch.no_grad():
                return model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                                      logits_processor=LogitsProcessorList([marks]), **extra)

        case = {"system": system, "context": T, "agents": 1, "compile": static}
        run.measure(case, lambda: _guarded(lambda: measure(gen, 1, *args.tokens, args.reps, not args.no_profile,
                                                           static and args.host_profile, marks=marks,
                                                           on_timed=lambda timed: run.partial(case, timed))[0]))
    torch._dynamo.reset()
    free_memory()


def _guarded(fn) -> dict:
    """``fn()``, or the error it raised as the row's measurement (the other cases still run)."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError as e:
        rec = oom_record(e)
    except Exception as e:  # noqa: BLE001 - a case that fails is reported, not fatal to the run
        return {"error": repr(e)[:1000]}
    free_memory()  # outside the except block: its exception held the failed call's frames, and their tensors
    return rec


def forkkv_case(run: BenchmarkRun, pm, ctx, prompts: list, names: list, compile_on: bool, args, compile_config,
                fit_rank: tuple[int, int] = (0, 0)):
    """The ForkKV row of N = ``len(names)`` with compile on or off (one base pass over ``ctx`` for it). A compiled
    row also counts the rows whose ``n2`` tokens equal one eager ``generate``'s (the same kernels, eager)."""
    import forkkv_hf
    from forkkv_hf import SharedContext, batch_inputs, cache_kwargs
    from forkkv_hf.peft.wrappers import remove_stale_peft_hooks
    from forkkv_hf.static_cache import free_static_buffers

    system = "forkkv, first call in a new process" if args.first_call_only else "forkkv"
    k_rank, v_rank = fit_rank
    if v_rank:
        system += f", fitted rank {v_rank}" if k_rank == v_rank else f", fitted ranks {k_rank}/{v_rank}"
    case = {"system": system, "context": ctx.numel(), "agents": len(names), "compile": compile_on}
    if run.done(case) or run.out_of_time():
        return
    forkkv_hf.enable_forkkv(pm)
    inputs = batch_inputs(ctx, prompts, pad_token_id=0, device=ctx.device)
    with torch.no_grad():
        shared = SharedContext.build(pm, ctx, sorted(set(names)), progress=False)
        if v_rank:  # each agent's residuals fitted to its own pass (SharedContext.fit_residuals)
            t_fit = time.perf_counter()
            shared = shared.fit_residuals(pm, sorted(set(names)), rank=v_rank, k_rank=k_rank, progress=False)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            print(f"fitted {len(set(names))} agents at ranks K {k_rank} / V {v_rank} in "
                  f"{time.perf_counter() - t_fit:.1f} s", flush=True)

    marks = StepMarks()

    def gen(n, c=compile_on):
        with torch.no_grad():
            return pm.generate(**inputs, adapter_names=names, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=0, logits_processor=LogitsProcessorList([marks]),
                               **cache_kwargs(shared.fork(names)), **_compile_kwargs(c, compile_config))

    def first_only():  # a new process with the on-disk compile caches of an earlier one (Triton's, inductor's)
        dt, _, compile_info = _first_call(gen, args.tokens[1])
        return {"rows": len(names), "n2": args.tokens[1], "first_call_s": dt, "first_call_compile": compile_info}

    def one():
        print(f"forkkv N={len(names)} compile={compile_on}: shared context built, measuring "
              f"({time.strftime('%H:%M:%S')})", flush=True)  # a case cut by a call's limit still says how far it got
        rec, out = measure(gen, len(names), *args.tokens, args.reps, not args.no_profile,
                           compile_on and args.host_profile, log=f"forkkv N={len(names)} compile={compile_on}",
                           freeze_gc=args.freeze_gc, on_timed=lambda timed: run.partial(case, timed), marks=marks)
        if compile_on:  # the step of each row's first token that differs from eager's (n2: none); random bf16
            # weights give near-ties, so rows part after some steps: the GPU pass-rule test judges those partings
            same = (gen(args.tokens[1], c=False) == out)[:, inputs["input_ids"].shape[1]:].long()
            rec["first_divergence_vs_eager"] = same.cumprod(dim=1).sum(dim=1).tolist()
        return rec

    def with_peak():  # the case's peak allocator memory: the model, its adapters, the shared context and the calls
        rec = (first_only if args.first_call_only else one)()
        if torch.cuda.is_available():
            rec["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return rec

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    row = run.measure(case, lambda: _guarded(with_peak))
    if "error" in row or "oom" in row:
        remove_stale_peft_hooks(pm)
    if compile_on:  # the next shape compiles anew: drop this one's graphs, CUDA-graph pools and static buffers
        free_static_buffers(pm)
        torch._dynamo.reset()
    del shared
    free_memory()


def _fit_rank(text: str) -> tuple[int, int]:
    """``"r"`` -> ``(r, r)``, ``"k:v"`` -> ``(k, v)``: the fitted residuals' K and V ranks (0: ForkKV's own)."""
    k, _, v = text.partition(":")
    return int(k), int(v or k)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=positive_int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--tokens", type=int, nargs=2, default=[8, 40], help="the two generate lengths n1 n2")
    ap.add_argument("--reps", type=positive_int, default=3)
    ap.add_argument("--compile", nargs="+", choices=["on", "off"], default=["on", "off"])
    ap.add_argument("--compiled-agents", type=int, nargs="+", default=None,
                    help="the N of the compiled rows where they differ from --agents (e.g. a capacity-sized N)")
    ap.add_argument("--compile-backend", default=None,
                    help="torch.compile backend for compile on (default: transformers' default on CUDA, eager on CPU)")
    ap.add_argument("--no-anchors", action="store_true", help="skip the transformers-alone rows")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--host-profile", action="store_true",
                    help="compiled rows: also where the host's part of a step goes (cProfile, per step)")
    ap.add_argument("--first-call-only", action="store_true",
                    help="only each ForkKV row's first generate (rows 'forkkv, first call in a new process'): run it "
                         "after a full run, in a new process, to time a first call with the compile caches on disk")
    ap.add_argument("--budget-gib", type=float, default=None,
                    help="cap each GPU's memory at this many GiB (set_per_process_memory_fraction): a case that does "
                         "not fit is recorded as oom")
    ap.add_argument("--adapters", type=int, default=None,
                    help="adapters loaded (default: the largest N); the rows use the first N, the others only sit "
                         "in the model, as a user's unused adapters do (dynamo's first compile grows with them)")
    ap.add_argument("--fit-ranks", type=_fit_rank, nargs="+", default=[(0, 0)],
                    help="0: ForkKV's own residuals; r > 0: the agents' residuals fitted to their own pass at rank r "
                         "(SharedContext.fit_residuals), rows 'forkkv, fitted rank r'; K:V (e.g. 16:64): the K "
                         "residual at rank K, V's at rank V, rows 'forkkv, fitted ranks K/V'")
    ap.add_argument("--freeze-gc", action="store_true",
                    help="ForkKV rows: gc.freeze() after the warm-up call, as a serving loop would after compiling "
                         "(full garbage collections then skip the compiled graphs); records gc_frozen")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tiny", action="store_true", help="toy sizes: a CPU smoke run of this module")
    ap.add_argument("--out", default=None)
    ap.add_argument("--resume", default=None,
                    help="a JSON of an earlier, unfinished run on the same GPU: its cases are kept, not rerun")
    ap.add_argument("--time-limit", type=float, default=None, help="seconds: start no new case after this")
    ap.add_argument("--k-pass", choices=["rule", "triton", "runtime-zeros", "sync"], default="rule",
                    help="the kernels' K pass: the launch rule's, the Triton one at every count (the rule before "
                         "the Gluon K pass, its fp16 rebuild kept; FORKKV_F16_K_PASS=0 drops that too), or the rule's "
                         "with the Gluon pass's MMAs from runtime zeros (res_runtime_zeros: v38's form), or its fp16 "
                         "calls with the rebuild by mma.sync at 160 registers (res_rebuild='mma_sync': v42's form)")
    args = ap.parse_args(argv)
    if args.k_pass != "rule":
        import forkkv_kernels.rules as rules

        if args.k_pass == "triton":  # read at each launch: no call reaches the Gluon K pass's threshold
            rules.GLUON_K_FROM = sys.maxsize
        else:  # the launcher is looked up at each call
            import forkkv_kernels.kres_gluon as kres_gluon

            launch = kres_gluon.launch_kres_scores_gluon
            knobs = ({"res_runtime_zeros": True} if args.k_pass == "runtime-zeros" else
                     {"res_rebuild": "mma_sync", "res_maxnreg": 160})
            kres_gluon.launch_kres_scores_gluon = lambda *a, **kw: launch(
                *a, **({**kw, **knobs} if kw.get("res_f16") or args.k_pass == "runtime-zeros" else kw))
    if "on" in args.compile and len({round_capacity(PROMPT + n) for n in args.tokens}) > 1:
        ap.error(f"--tokens {args.tokens[0]} {args.tokens[1]}: with a {PROMPT}-token prompt the two calls need "
                 f"different private capacities (multiples of {CAPACITY_STEP} tokens), so their steps may run "
                 "different shapes and buffers (v37 at 8 / 104, before the library kept a longer call's buffers for "
                 "a shorter one: 212 CUDA-graph recordings inside the timed calls); choose n1 and n2 with "
                 f"{PROMPT} + n in the same multiple of {CAPACITY_STEP}")
    dev = default_device()
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    for name in ("cache_size_limit", "recompile_limit"):  # one graph per shape; more than dynamo's default 8
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    if args.budget_gib is not None and torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            total = torch.cuda.get_device_properties(i).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.budget_gib * 2**30 / total), i)
    t0 = time.time()
    model = build_model(llama8b_config(layers=args.layers, tiny=args.tiny), dtype=dtype)
    compile_config = compile_config_for(dev, args.compile_backend)
    agents = {"on": args.compiled_agents or args.agents, "off": args.agents}
    n_max = max(max(agents[c]) for c in args.compile)
    params = {"model": {"shape": "tiny" if args.tiny else "Llama-3.1-8B", "layers": args.layers, "dtype": str(dtype),
                        "lora": "rank 16 on q/k/v/o"},
              "prompt_tokens": PROMPT, "tokens": args.tokens, "reps": args.reps, "budget_gib": args.budget_gib,
              "freeze_gc": args.freeze_gc, "adapters_loaded": max(n_max, args.adapters or 0),
              "compile_backend": args.compile_backend or "transformers default (inductor, reduce-overhead)",
              "compile_regions": get_config().compile_regions, "k_pass": args.k_pass,
              "f16_k_pass": get_config().f16_k_pass}
    run = BenchmarkRun("bench_decode", params, CASE_KEYS, out=args.out, resume=args.resume, time_limit=args.time_limit)
    g = torch.Generator(device=dev).manual_seed(0)
    vocab = model.config.vocab_size
    ctx = torch.randint(3, vocab, (args.context,), device=dev, generator=g)
    prompts = [torch.randint(3, vocab, (PROMPT,), device=dev, generator=g) for _ in range(n_max)]
    if not args.no_anchors:  # before PEFT wraps the model
        anchor_cases(run, model, torch.cat([ctx, prompts[0]])[None], args, compile_config)
    names = [f"agent{i}" for i in range(params["adapters_loaded"])]
    pm = add_random_adapters(model, names, rank=16)
    print(f"model + {len(names)} adapters built in {time.time() - t0:.0f} s", flush=True)
    for c in args.compile:  # every N compiled first (the targets), then eager
        for N in agents[c]:
            for r in args.fit_ranks:
                forkkv_case(run, pm, ctx, prompts[:N], names[:N], c == "on", args, compile_config, fit_rank=r)
    run.finish()


if __name__ == "__main__":
    main()
