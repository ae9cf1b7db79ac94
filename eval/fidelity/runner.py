"""Evaluate trained agents on the held-out contexts under every inference variant, prompt by prompt.

Per evaluation context, every agent of every training kind answers its questions in one mixed-adapter batch
(``rows``: one adapter name per question), greedily, under each inference variant:
- ``exact``: each adapter prefills the context itself (PEFT, ``DynamicCache``, SDPA): no sharing; the mixed-adapter
  batch runs its LoRA layers through :func:`forkkv_hf.batched_lora` (one gathered matmul per layer, equal to PEFT's
  loop over adapters to float tolerance, a quarter of its operators per decode step);
- ``forkkv``: one base pass (``SharedContext.build``), forks with K and V residuals;
- ``forkkv_v``: the same forks with the V residual only;
- ``naive``: the base model's K/V for every agent (adapter-blind prefix caching);
- ``fitted_<r>`` (asked for by name): the forks of ``SharedContext.fit_residuals(..., rank=r)``, each agent's
  residuals fitted to its own pass over the context; ``fitted_<k>_<v>``: the K residual at rank k, V's at rank v.
Then, under teacher forcing on each row's exact output, the per-token KL(exact || variant) and top-1 agreement.
"""

from __future__ import annotations

import importlib.util
import time

import torch

from ..agents import END
from ..quality.context_passes import stacked_cache
from ..quality.metrics import first_divergence, generate_rows
from .metrics import OUTPUT_CHARS, exact_match, f1, rouge_l
from .train import adapter_name, context_ids, prompt_ids

#: ROUGE-L needs rouge_score, which the GPU machine lacks: its records go without, and ``python -m eval.fidelity report
#: FILE --rewrite`` adds it on CPU
HAS_ROUGE = importlib.util.find_spec("rouge_score") is not None

VARIANTS = ("exact", "forkkv", "forkkv_v", "naive")
RESIDUAL_OF = {"forkkv": "kv", "forkkv_v": "v", "naive": "none"}


def fitted_rank(variant: str) -> tuple[int, int] | None:
    """``(K rank, V rank)`` of a ``fitted_<r>`` (both ``r``) or ``fitted_<k>_<v>`` variant, ``None`` for the others;
    unknown names are refused."""
    if variant in VARIANTS:
        return None
    parts = variant.split("_")[1:] if variant.startswith("fitted_") else []
    if len(parts) in (1, 2) and all(p.isdigit() and int(p) > 0 for p in parts):
        return int(parts[0]), int(parts[-1])
    raise ValueError(f"unknown inference variant {variant!r}: one of {list(VARIANTS)}, fitted_<rank> or "
                     "fitted_<K rank>_<V rank>")


@torch.no_grad()
def own_prefill(pm, name: str, ids: torch.Tensor):
    """Adapter ``name``'s own pass over the context: its ``DynamicCache`` (the exact variant)."""
    from transformers import DynamicCache

    from forkkv_hf import cache_kwargs

    cache = DynamicCache()
    pm.set_adapter(name)
    pm.get_base_model().model(input_ids=ids[None], use_cache=True, **cache_kwargs(cache))
    return cache


@torch.no_grad()
def teacher_forced(pm, inputs: dict, rows: list[str], cache, targets: list[list[int]], pad: int) -> torch.Tensor:
    """Log-probabilities ``[B, N, V]`` (fp32) of the positions that predict ``targets`` (right-padded to N), each
    row with its own adapter, the shared context in ``cache``."""
    from forkkv_hf import cache_kwargs

    dev = inputs["input_ids"].device
    B, N = len(targets), max(len(t) for t in targets)
    out_ids = torch.full((B, N), pad, dtype=torch.long, device=dev)
    out_mask = torch.zeros((B, N), dtype=torch.long, device=dev)
    for i, t in enumerate(targets):
        out_ids[i, : len(t)] = torch.tensor(t, dtype=torch.long, device=dev)
        out_mask[i, : len(t)] = 1
    T = cache.get_seq_length()
    ids = torch.cat([inputs["input_ids"], out_ids], 1)
    mask = torch.cat([inputs["attention_mask"], out_mask], 1)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    out = pm(input_ids=ids[:, T:], attention_mask=mask, position_ids=positions[:, T:], adapter_names=rows,
             use_cache=True, logits_to_keep=N + 1, **cache_kwargs(cache))
    return torch.log_softmax(out.logits[:, :N].float(), -1)


def evaluate_context(pm, tok, context: dict, examples: list[dict], kinds, variants, max_new_tokens: int) -> list[dict]:
    """Every (kind, variant) answer to every question of one context, with its metrics (one record each)."""
    import forkkv_hf
    from forkkv_hf import SharedContext, batch_inputs

    dev = next(pm.parameters()).device
    eos, pad = tok.convert_tokens_to_ids(END), tok.pad_token_id
    ctx = context_ids(tok, context).to(dev)
    rows = [adapter_name(ex["agent"], kind) for kind in kinds for ex in examples]
    row_examples = [ex for _ in kinds for ex in examples]
    prompts = [prompt_ids(tok, ex) for ex in row_examples]
    inputs = batch_inputs(ctx, prompts, pad_token_id=pad, device=dev)
    names = list(dict.fromkeys(rows))

    forkkv_hf.disable_forkkv(pm)  # the exact variant: PEFT + DynamicCache + SDPA
    own = {n: own_prefill(pm, n, ctx) for n in names}
    with forkkv_hf.batched_lora(pm):
        outputs = {"exact": generate_rows(pm, inputs, rows, stacked_cache(own, rows), max_new_tokens, eos, pad)}
        targets = [o if o else [eos] for o in outputs["exact"]]
        logprobs = {"exact": teacher_forced(pm, inputs, rows, stacked_cache(own, rows), targets, pad)}
    del own
    forkkv_hf.enable_forkkv(pm)
    shared = SharedContext.build(pm, ctx, names, progress=False)
    for v in variants:
        if v == "exact":
            continue
        r = fitted_rank(v)
        source = shared if r is None else shared.fit_residuals(pm, names, rank=r[1], k_rank=r[0], progress=False)
        residual = "kv" if r is not None else RESIDUAL_OF[v]
        outputs[v] = generate_rows(pm, inputs, rows, source.fork(rows, residual=residual), max_new_tokens, eos, pad)
        logprobs[v] = teacher_forced(pm, inputs, rows, source.fork(rows, residual=residual), targets, pad)
    records = []
    for i, ex in enumerate(row_examples):
        n = len(targets[i])
        lp_e = logprobs["exact"][i, :n]
        target = torch.tensor(targets[i], device=lp_e.device)
        for v in variants:
            text = tok.decode(outputs[v][i], skip_special_tokens=True).strip()
            lp_v = logprobs[v][i, :n]
            kl = (lp_e.exp() * (lp_e - lp_v)).sum(-1).clamp_min(0).mean().item()
            records.append({
                "context": context["id"], "agent": ex["agent"], "kind": kinds[i // len(examples)], "variant": v,
                "id": ex["id"], "answer": ex["answer"], "output": text[:OUTPUT_CHARS], "em": exact_match(text, ex["answer"]),
                "f1": f1(text, ex["answer"]), "kl": kl, "tf_top1": (lp_v.argmax(-1) == target).float().mean().item(),
                "identical": first_divergence(outputs["exact"][i], outputs[v][i]) is None,
                **({"rouge_l": rouge_l(text, ex["answer"])} if HAS_ROUGE else {}),
            })
    return records


def evaluate(pm, tok, data_eval: dict, kinds, variants=VARIANTS, max_new_tokens: int = 24,
             time_budget_s: float | None = None, progress: bool = True, checkpoint=None) -> dict:
    """Records of every evaluation context (while the next one, at the mean pace so far, still ends within
    ``time_budget_s``), and the seconds spent; ``checkpoint`` (if given) is called with the partial result after
    each context."""
    from tqdm.auto import tqdm

    by_context: dict[int, list[dict]] = {}
    for ex in data_eval["examples"]:
        by_context.setdefault(ex["context_index"], []).append(ex)
    t0 = time.perf_counter()
    records, done = [], 0
    out = {"records": records, "contexts_evaluated": 0, "contexts_planned": len(data_eval["contexts"]), "seconds": 0.0}
    for context in tqdm(data_eval["contexts"], desc="evaluate contexts", unit="context", disable=not progress):
        spent = time.perf_counter() - t0
        if time_budget_s is not None and done and spent + spent / done > time_budget_s:
            break
        records += evaluate_context(pm, tok, context, by_context[context["context_index"]], list(kinds), variants,
                                    max_new_tokens)
        done += 1
        out = {"records": records, "contexts_evaluated": done, "contexts_planned": len(data_eval["contexts"]),
               "seconds": round(time.perf_counter() - t0, 1)}
        if checkpoint is not None:
            checkpoint(out)
    return out
