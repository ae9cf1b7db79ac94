"""Fidelity of ForkKV on a real model with trained agents: exact vs ForkKV vs naive sharing (CPU).

    python -m eval.quality             # default: eval/results/quality.json + .png (~33 min on 2 cores:
                                       #   the committed run's 41 min less its forkkv_v phases)
    python -m eval.quality --variants exact forkkv forkkv_v naive   # the committed results (41 min)
    python -m eval.quality --quick     # a tiny slice (about a minute), what tests/test_quality.py runs

Four trained LoRA agents of SmolLM2-135M-Instruct (:mod:`eval.agents`) read one long shared context and then each
answers its own prompts, greedily, in one mixed-adapter batch. Scenarios (each context >= ``--context-tokens``):
- ``gsm8k_fewshot``: solved GSM8K problems (training split); the math agent answers held-out problems;
- ``hamlet_act``: Hamlet from Act I, Scene I; the writer continues it (from its end, and from points inside it), the
  QA agent is asked who says a given line;
- ``code_module``: a Python module of HumanEval solutions (training split); the coder completes held-out functions.
Agents the context is not about answer their own held-out prompts after it.

Variants, same rows, same prompts:
- ``exact``: every agent prefills the context with its own adapter (PEFT, ``DynamicCache``, SDPA): the reference;
- ``forkkv``: this library (one base pass; K and V residuals ``u = x Aᵀ`` per agent);
- ``forkkv_v``: V residual only (K from the base), the cheaper option;
- ``naive``: the base model's K/V for every agent, no residual (adapter-blind prefix caching).

Metrics per agent and variant: task score (GSM8K accuracy, HumanEval pass@1 through its harness, ROUGE-L F1, answer
found), greedy-token agreement with ``exact`` and the first divergence, mean per-token KL(exact || variant) and
top-1 agreement of next-token distributions under teacher forcing on the exact output. Over the context, per layer:
cosine similarity of each agent's k/v-projection input (and residual stream) with the base model's, and the relative
error of the context K and V each variant uses against the agent's exact K and V.

Modules: ``scenarios`` (the shared contexts and each agent's prompts), ``context_passes`` (the base pass and each
agent's own prefill over the context, with the per-layer drift and K/V errors), ``metrics`` (greedy generation,
teacher forcing, the per-prompt and summary metrics), ``runner`` (a scenario's variants end to end), ``__main__``
(the command line; the figure comes from :func:`eval.plots.plot_quality`).
"""

import os

# With its threads spin-waiting, OpenMP made small matmuls 10-70x slower when the 2 cores are shared with other jobs
# (measured here); passive waiting costs nothing when they are not. Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
