"""Examples of forkkv-hf on SmolLM2-135M (CPU), each run as a module from the repository root:

    python -m examples.demo              # what `make demo` runs: four trained agents over one Hamlet scene
    python -m examples.agent_workflow    # a multi-turn workflow over a growing transcript with ForkKVStore

They import the installed ``forkkv_hf`` and, for the trained agents and the SmolLM2 loader, :mod:`eval.agents` and
:mod:`eval.smollm2` (nothing in eval/ imports them back).
"""
