"""Answer metrics and context-cluster bootstrap confidence intervals.

Exact match, F1 and ROUGE-L are those of the ``context_qa`` evaluate module kept in the repository
(:mod:`eval.metrics.context_qa.context_qa`; ``evaluate.load("eval/metrics/context_qa")``), called as plain functions
(the GPU machine has no ``evaluate``); ``python -m eval.fidelity report FILE --rewrite`` recomputes a result file's
per-prompt scores through the module itself where ``evaluate`` is installed.
Prompts over one context are not independent (a variant that misreads a context misreads it for every question), so
intervals resample whole contexts (cluster bootstrap), and comparisons between variants are paired: the same
resampled contexts for both.
"""

from __future__ import annotations

import random

from ..metrics.context_qa.context_qa import exact_match, f1, rouge_l  # noqa: F401  (re-exported)

#: characters of an output a record keeps (shorter ones are whole: their scores can be recomputed exactly)
OUTPUT_CHARS = 200


def _cluster_means(values: list[float], clusters: list, rng: random.Random, n: int) -> list[float]:
    groups: dict = {}
    for v, c in zip(values, clusters):
        groups.setdefault(c, []).append(v)
    keys = list(groups)
    sums = {k: (sum(groups[k]), len(groups[k])) for k in keys}
    out = []
    for _ in range(n):
        pick = [keys[rng.randrange(len(keys))] for _ in keys]
        total = sum(sums[k][0] for k in pick)
        count = sum(sums[k][1] for k in pick)
        out.append(total / count)
    return out


def bootstrap_ci(values: list[float], clusters: list, n: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of ``values`` and its ``level`` percentile interval from ``n`` cluster-bootstrap resamples (clusters:
    one label per value, e.g. its context)."""
    if len(values) != len(clusters):  # (zip dropped the rest from the resamples, silently: an interval off the mean)
        raise ValueError(f"{len(values)} values but {len(clusters)} cluster labels: give one label per value")
    if not values:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    means = sorted(_cluster_means(values, clusters, random.Random(seed), n))
    k = round((1 - level) / 2 * n)  # as many resamples below lo as above hi, at any level
    lo, hi = means[min(k, n - 1)], means[max(n - 1 - k, 0)]
    return {"mean": sum(values) / len(values), "lo": lo, "hi": hi, "n": len(values)}


def paired_difference_ci(a: list[float], b: list[float], clusters: list, n: int = 2000, seed: int = 0) -> dict:
    """``mean(a - b)`` over paired values (same prompts) with its cluster-bootstrap interval."""
    if len(a) != len(b):
        raise ValueError(f"paired values differ in length: {len(a)} vs {len(b)}")
    return bootstrap_ci([x - y for x, y in zip(a, b)], clusters, n=n, seed=seed)
