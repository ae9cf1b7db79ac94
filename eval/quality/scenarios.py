"""The scenarios of the fidelity evaluation: a long shared context each, and every agent's own prompts after it."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .. import agents
from ..agents import AGENT_NAMES, TaskItem, context_text


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
