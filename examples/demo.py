"""forkkv-hf demo: four trained LoRA agents of SmolLM2-135M-Instruct answer over one shared Hamlet scene.

The agents are the adapters in ``eval/adapters/`` (trained by ``python -m eval.train_adapters``, see
:mod:`eval.agents`): ``writer`` continues the scene in Shakespeare's style, ``qa`` says who speaks a line of it,
``math`` solves a word problem and ``coder`` completes a Python function, each after reading the same scene. Runs on
CPU in a few minutes.
It prints each agent's answer from the exact run (every agent prefills the scene with its own adapter: PEFT mixed
batch + DynamicCache) and from ForkKV (one base pass over the scene, shared by all agents, plus a rank-r residual
each), their token agreement, and the cache memory of both.

    python -m examples.demo [--tokens 2000] [--max-new-tokens 48]     # from the repository root (make demo)
"""

from __future__ import annotations

import argparse
import time

import torch

import forkkv_hf
from eval.cli import positive_int
from eval import agents
from eval.agents import AGENTS, context_text, format_speeches, load_agents, prompt_text, speeches
from forkkv_hf import SharedContext, batch_inputs, cache_kwargs

# the math and coder prompts are written here (not drawn from their data sets) so the demo needs no data packages
MATH_QUESTION = ("Question: A theatre sells 120 tickets on Monday and twice as many on Tuesday. Each ticket costs $5. "
                 "How much money does the theatre take in on the two days?")
CODER_FUNCTION = '''def count_words(line: str) -> int:
    """Return the number of words in a line of verse.
    >>> count_words("To be, or not to be")
    6
    """
'''


def hamlet_scene(tokenizer, max_tokens: int):
    """Hamlet from Act I, Scene I (``shakespeare`` package), whole speeches up to about ``max_tokens`` tokens;
    returns the text and how many speeches it holds."""
    sp = speeches("hamlet")
    n = 1
    while n < len(sp) and len(tokenizer(format_speeches(sp[: n + 1])).input_ids) <= max_tokens:
        n += 1
    return format_speeches(sp[:n]), n


def agent_instructions(n_speeches: int) -> dict[str, str]:
    """Each agent's own prompt after the scene."""
    return {
        "writer": agents.continuation_item("hamlet", n_speeches - 3).instruction,  # continue from the scene's end
        "qa": agents.speaker_item("hamlet", 10).instruction,
        "math": MATH_QUESTION,
        "coder": f"{agents.CODER_INSTRUCTION}{CODER_FUNCTION}```",
    }


def _context_tokens(text: str) -> int:
    """``--tokens``: at least 300 (a shorter scene lacks the speech the QA agent asks about, and the writer's passage)."""
    value = int(text)
    if value < 300:
        raise argparse.ArgumentTypeError(f"must be at least 300, got {value}")
    return value


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=_context_tokens, default=2000,
                    help="shared context length (tokens of the scene; at least 300: the agents ask about its lines)")
    ap.add_argument("--max-new-tokens", type=positive_int, default=48)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    names = list(AGENTS)
    peft_model, tok = load_agents(names)
    print("Agents (trained LoRA adapters, eval/adapters/): "
          + ", ".join(f"{n} = {AGENTS[n].description} (r={AGENTS[n].rank})" for n in names))

    scene, n_speeches = hamlet_scene(tok, args.tokens)
    questions = agent_instructions(n_speeches)
    ctx = tok(context_text(f"Here is a scene from Hamlet.\n\n{scene}")).input_ids
    prompts = [tok(prompt_text(questions[n])).input_ids for n in names]
    inputs = batch_inputs(ctx, prompts, pad_token_id=tok.pad_token_id)
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
               eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    print(f"Shared context: Hamlet I.1, {len(ctx)} tokens; {len(names)} agents: {names}\n")

    t0 = time.perf_counter()
    with torch.no_grad():
        exact = peft_model.generate(**inputs, adapter_names=names, **gen)
    t_exact = time.perf_counter() - t0

    forkkv_hf.enable_forkkv(peft_model)
    t0 = time.perf_counter()
    with torch.no_grad():
        shared = SharedContext.build(peft_model, ctx, names)
        cache = shared.fork(names)
        fork = peft_model.generate(**inputs, adapter_names=names, **gen, **cache_kwargs(cache))
    t_fork = time.perf_counter() - t0

    L, eos = inputs["input_ids"].shape[1], gen["eos_token_id"]

    def answer(row):  # generated tokens up to and including the end of the turn (padding after it dropped)
        row = row.tolist()
        return row[: row.index(eos) + 1] if eos in row else row

    for i, name in enumerate(names):
        a, b = answer(exact[i, L:]), answer(fork[i, L:])
        agree = sum(x == y for x, y in zip(a, b)) / max(1, len(a))
        first = next((j for j in range(min(len(a), len(b))) if a[j] != b[j]), None)
        if first is None and len(a) != len(b):
            first = min(len(a), len(b))
        print(f"=== {name}: {questions[name].splitlines()[0]}")
        print(f"--- exact : {tok.decode(a, skip_special_tokens=True).strip()!r}")
        print(f"--- forkkv: {tok.decode(b, skip_special_tokens=True).strip()!r}")
        print(f"    token agreement {agree:.0%}" + ("" if first is None else f", first divergence at token {first}"))
        print()
    print(cache.memory_report())
    print(f"\nwall time on {'CUDA' if torch.cuda.is_available() else 'CPU'}: exact {t_exact:.1f} s "
          f"({len(names)} prefills of the context), forkkv {t_fork:.1f} s (1 base pass + residuals)")
    print("Fidelity over many prompts and three scenarios: python -m eval.quality (figures in the README).")


if __name__ == "__main__":
    main()
