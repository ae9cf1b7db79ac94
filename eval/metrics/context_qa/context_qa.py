"""context_qa: exact match, token F1 and ROUGE-L of short answers, as an `evaluate` module.

    import evaluate
    metric = evaluate.load("eval/metrics/context_qa")   # by path: offline (a bare name would ask the Hub)
    metric.compute(predictions=["King Claudius"], references=["the King"])
    # {'exact_match': 0.0, 'f1': 0.666..., 'rouge_l': 0.5, 'per_example': {'exact_match': [0.0], ...}}

Exact match and F1 follow the SQuAD v1.1 evaluation script (the ``squad`` metric of ``evaluate``): answers are lower
cased, stripped of punctuation and articles and split on white space. ROUGE-L is the F-measure of ``rouge_score`` with
stemming (as the ``rouge`` metric of ``evaluate``), on the raw strings. ``per_example`` keeps every prompt's scores:
the benchmarks' intervals resample them by context.

The plain functions (:func:`normalize_answer`, :func:`exact_match`, :func:`f1`, :func:`rouge_l`) need neither
``evaluate`` nor ``datasets``: the evaluation code calls them directly (on the GPU machine too), so this module is the
one definition of these metrics in the repository. ``ContextQA`` (the module class) is defined where ``evaluate`` is
imported already: always under ``evaluate.load``; import ``evaluate`` first to use the class from a plain import.
"""

from __future__ import annotations

import re
import string
import sys
from collections import Counter
from functools import lru_cache

_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD-style: lower case, no punctuation (so "680,000" is "680000"), no articles, single spaces."""
    text = "".join(c for c in str(text).lower() if c not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of stemmed tokens; symmetric in its arguments)."""
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


SCORES = {"exact_match": exact_match, "f1": f1, "rouge_l": rouge_l}

# The module class exists where `evaluate` is already imported, as it is when `evaluate.load` reads this file; the
# evaluation code importing the plain functions does not pay for importing `evaluate` and `datasets` (~3 s).
evaluate = sys.modules.get("evaluate")

if evaluate is not None:
    import datasets

    class ContextQA(evaluate.Metric):
        """Exact match, F1 and ROUGE-L (means, and ``per_example``) of predicted against reference answers."""

        def _info(self):
            return evaluate.MetricInfo(
                description=__doc__.split("\n\n")[0],
                citation="SQuAD v1.1 (Rajpurkar et al., 2016) for exact match and F1; ROUGE (Lin, 2004) for ROUGE-L",
                inputs_description="predictions: list of answer strings; references: one reference string each",
                features=datasets.Features({"predictions": datasets.Value("string"),
                                            "references": datasets.Value("string")}),
            )

        def _compute(self, predictions, references):
            per = {name: [fn(p, r) for p, r in zip(predictions, references)] for name, fn in SCORES.items()}
            means = {name: (sum(v) / len(v) if v else 0.0) for name, v in per.items()}
            return {**means, "per_example": per}
