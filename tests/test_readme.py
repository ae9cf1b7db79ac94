"""The README's python snippets run as written, on a tiny random model.

Every fenced ``python`` block of README.md runs, in README order, in one namespace (as a reader would run them in one
session), so a snippet may use what an earlier one defined. The test binds only what the README leaves to the
reader, again before each snippet (a snippet that loads its own model does not change the one the next is given):
the data (``peft_model`` with adapters planner/coder/critic, ``context_ids``, ``tok``, ``p0``..``p2``, ``doc_ids``,
``transcript_ids``, ``prompt``, ``reply``), a checkpoint ``path`` with its adapters under ``adapters/``, and the
third-party names ``torch``, ``AutoModelForCausalLM``, ``PeftModel``; every forkkv_hf name must come from a
snippet's own imports. Skipped by rule: snippets that need several processes (they mention ``torchrun`` or
``tp_plan``) or a GPU (they mention ``cuda``).
"""

import contextlib
import io
import re
import types
from pathlib import Path

import pytest
import torch

from models import tiny_llama, with_adapters

pytestmark = pytest.mark.slow  # every snippet's generate, a checkpoint saved and loaded

README = Path(__file__).resolve().parents[1] / "README.md"
NEEDS = {"several processes": ("torchrun", "tp_plan"), "a GPU": ("cuda",)}

#: snippets that cannot run as written, by their first line, with the error they give: the README fix is owed (once
#: it is made, the snippet runs and this test fails until its entry is removed)
KNOWN_BROKEN: dict[str, str] = {}  # snippet's first line -> the error it gives, while the README is being fixed


def snippets() -> list[tuple[int, str]]:
    """(line number, code) of every fenced python block of README.md."""
    text = README.read_text()
    return [(text[: m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```", text, re.M | re.S)]


def _skip_reason(code: str) -> str | None:
    return next((need for need, words in NEEDS.items() if any(w in code for w in words)), None)


def _namespace(tmp_path) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, 128, (n,), generator=g)  # noqa: E731
    tiny_llama(layers=2, seed=3).save_pretrained(tmp_path / "checkpoint")
    peft_model = with_adapters(tiny_llama(layers=2, seed=3), {"planner": dict(r=4), "coder": dict(r=8),
                                                               "critic": dict(r=2)})
    peft_model.save_pretrained(tmp_path / "adapters")  # non-default adapters go to adapters/<name>
    doc = ids(40).tolist()
    return {
        "peft_model": peft_model, "context_ids": ids(30), "tok": types.SimpleNamespace(pad_token_id=0),
        "p0": ids(5), "p1": ids(3), "p2": ids(7), "path": str(tmp_path / "checkpoint"),
        "batch": {"input_ids": (suffix := ids(6)[None]), "labels": suffix.clone(),
                  "attention_mask": torch.ones_like(suffix)},
        "doc_ids": doc, "transcript_ids": doc + ids(6).tolist(), "prompt": ids(4).tolist(), "reply": ids(5).tolist(),
        "torch": torch, "AutoModelForCausalLM": AutoModelForCausalLM, "PeftModel": PeftModel,
    }


# a snippet a user copies shows them no warning of ours or of how it calls transformers (max_length, past_key_values)
@pytest.mark.filterwarnings("error::UserWarning")
@pytest.mark.filterwarnings("error:.*past_key_values.*deprecated:FutureWarning")
def test_readme_python_snippets_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the snippets' relative paths (adapters/planner) resolve here
    given = _namespace(tmp_path)
    ns = {}
    ran, skipped, broken, printed, outs = [], [], {}, io.StringIO(), []
    for line, code in snippets():
        ns.update(given)
        before = ns.get("out")
        first = code.strip().splitlines()[0]
        if (reason := _skip_reason(code)) is not None:
            skipped.append((line, reason))
            continue
        try:
            with contextlib.redirect_stdout(printed):
                exec(compile(code, f"README.md:{line}", "exec"), ns)
        except Exception as e:  # noqa: BLE001 - reported below with the snippet's line
            broken[first] = f"README.md:{line}: {type(e).__name__}: {e}"
            continue
        ran.append(code)
        if ns.get("out") is not before:
            outs.append(ns["out"])
    unexpected = {k: v for k, v in broken.items() if KNOWN_BROKEN.get(k) is None or KNOWN_BROKEN[k] not in v}
    assert not unexpected, f"README snippets that do not run as written: {unexpected}"
    fixed = sorted(set(KNOWN_BROKEN) - set(broken))
    assert not fixed, f"these snippets run now: remove them from KNOWN_BROKEN: {fixed}"
    assert len(ran) >= 3 and [r for _, r in skipped] == ["several processes"], (ran, skipped)
    # what the snippets promise: generated rows that start with the shared context they were given, the forks of
    # one SharedContext, the memory and store reports
    contexts = [torch.as_tensor(given[k]) for k in ("context_ids", "transcript_ids")]
    # every snippet generates but the one forking two caches and the three training ones (which leave a loss)
    assert len(outs) == len(ran) - 4
    assert torch.isfinite(ns["loss"]) and ns["loss"].grad_fn is not None  # a loss that trains the adapter
    for out in outs:
        assert out.dtype == torch.long and any(out.shape[1] > len(c) and torch.equal(out[0, : len(c)], c)
                                               for c in contexts)
    assert ns["cache_a"].adapter_names == ["planner", "planner", "coder"] and ns["cache_b"].adapter_names == ["critic"]
    assert "one DynamicCache per row" in printed.getvalue()
    assert ("ForkKVStore:" in printed.getvalue()) == any("store.report()" in code for code in ran)


@pytest.mark.version_independent
def test_readme_contents_list_names_every_section():
    """The contents list after the introduction links every ``##`` section, in order, by the anchor GitHub gives it
    (lower case, punctuation but ``-``/``_`` dropped, spaces as ``-``): a renamed or added section fails here."""
    text = README.read_text()
    heads = re.findall(r"^## (.+)$", text, flags=re.M)
    listed = re.findall(r"^- \[[^\]]+\]\(#([^)]+)\)$", text.split("Contents:\n", 1)[1].split("\n\n", 1)[0], flags=re.M)
    assert listed == [_anchor(h) for h in heads]


def _anchor(head: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", head.strip().lower()).replace(" ", "-")


@pytest.mark.version_independent
def test_docs_links_and_named_results_exist():
    """Every relative link of README.md and eval/RESULTS.md into the repository reaches a file (and, with ``#``, a
    heading of it), and every result file they name in backticks (``*.json``/``*.png``/``*.txt``/``*.log``, by path
    or by name under ``eval/results/`` or ``raw/``) is committed: moving or renaming a result, or a section, fails
    here. Abbreviated names (``_next_line.json`` after a full one) and files a run writes at run time are not
    results."""
    root = README.parent
    run_time = {"torchrun_attempt1.log"}
    missing = []
    for doc in (README, root / "eval" / "RESULTS.md"):
        text = doc.read_text()
        for m in re.finditer(r"\]\(([^)#\s]*)(?:#([^)\s]+))?\)", text):
            target, anchor = m.group(1), m.group(2)
            if target.startswith("http"):
                continue
            path = ((doc.parent / target) if target else doc).resolve()
            if not path.is_relative_to(root.resolve()):  # beside the repository (the design card): not ours to check
                continue
            if not path.exists():
                missing.append((doc.name, target))
            elif anchor and path.suffix == ".md":
                if anchor not in {_anchor(h) for h in re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)}:
                    missing.append((doc.name, f"{target}#{anchor}"))
        for m in re.finditer(r"`((?:eval/results/|raw/)?[\w./-]+\.(?:json|png|txt|log))`", text):
            name = m.group(1)
            if name.startswith(("_", ".")) or name in run_time:
                continue
            results = root / "eval" / "results"
            if not any(p.exists() for p in (root / name, results / name, results / "raw" / name)):
                missing.append((doc.name, name))
    assert not missing, missing
