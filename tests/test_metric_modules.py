"""The `evaluate` metric modules kept in the repository (eval/metrics/): they load by path offline, score as their
plain functions do (which the evaluation code calls, the GPU machine having no `evaluate`), and a result file's
per-prompt scores are rechecked through them (``python -m eval.fidelity report FILE --rewrite``)."""

from pathlib import Path

import pytest

from eval.metrics.context_qa import context_qa as cq

pytestmark = pytest.mark.version_independent  # no transformers/PEFT code: not rerun on 5.17 (tests/conftest.py)

MODULE = Path(__file__).resolve().parents[1] / "eval" / "metrics" / "context_qa"
PAIRS = [("King Claudius", "the King"), ("the King.", "King"), ("Ber.", "Bernardo"), ("", ""), ("680,000", "680000"),
         ("Long live the king!", "Long live the King"), ("Horatio", "Marcellus"), ("An answer", "")]


def test_context_qa_scores():
    assert cq.normalize_answer("The  King, of Denmark!") == "king of denmark"
    assert [cq.exact_match(p, r) for p, r in PAIRS] == [0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert cq.f1("King Claudius", "the King") == pytest.approx(2 / 3)
    assert cq.f1("", "") == 1.0 and cq.f1("An answer", "") == 0.0
    assert cq.rouge_l("King Claudius", "the King") == pytest.approx(0.5)  # LCS 1 of 2 tokens each side
    assert cq.rouge_l("Long live the king!", "Long live the King") == 1.0


@pytest.mark.slow
def test_context_qa_loads_by_path_and_equals_its_plain_functions():
    evaluate = pytest.importorskip("evaluate")
    metric = evaluate.load(str(MODULE))
    preds, refs = [p for p, _ in PAIRS], [r for _, r in PAIRS]
    out = metric.compute(predictions=preds, references=refs)
    for name, fn in cq.SCORES.items():
        want = [fn(p, r) for p, r in PAIRS]
        assert out["per_example"][name] == want
        assert out[name] == pytest.approx(sum(want) / len(want))


@pytest.mark.slow
def test_rescore_adds_rouge_and_refuses_scores_the_module_does_not_give():
    pytest.importorskip("evaluate")
    from eval.fidelity import report

    def records():
        return [{"id": f"q{i}", "output": p, "answer": r, "em": cq.exact_match(p, r), "f1": cq.f1(p, r)}
                for i, (p, r) in enumerate(PAIRS)]

    recs = records()
    checked = report.rescore(recs)
    assert checked["em_f1_rechecked"] == len(PAIRS) and [r["rouge_l"] for r in recs] == [
        cq.rouge_l(p, r) for p, r in PAIRS]
    bad = records()
    bad[1]["em"] = 0.0  # a run that scored otherwise
    with pytest.raises(ValueError, match="scores 1 records otherwise"):
        report.rescore(bad)
    cut = records()  # an output kept cut to OUTPUT_CHARS is not rechecked (its full text scored the run)
    cut[0]["output"] = "x" * report.OUTPUT_CHARS
    cut[0]["em"] = 1.0
    assert report.rescore(cut)["em_f1_rechecked"] == len(PAIRS) - 1
