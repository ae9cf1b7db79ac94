"""Greedy generation and teacher forcing of a mixed-adapter batch over a shared-context cache, and the metrics made
from them: per prompt (token agreement, first divergence, KL and top-1 under teacher forcing) and summed up."""

from __future__ import annotations

import torch

from ..agents import AGENT_NAMES


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


def summarize(scenarios: list[dict], variants) -> dict:
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
