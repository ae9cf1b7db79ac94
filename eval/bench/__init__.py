"""The GPU benchmarks, each a module run from the repository root (``--tiny``: a CPU smoke run of the model-level
ones):

    python -m eval.bench.e2e     # N agents over one shared context: ForkKV vs PEFT + DynamicCache (+ capacity)
    python -m eval.bench.lora    # mixed-adapter decode: PEFT's per-adapter loop vs the batched LoRA
    python -m eval.bench.tp      # tensor parallelism (torchrun --nproc_per_node 2 -m eval.bench.tp ...)
    python -m eval.bench.kernel  # the decode ResidualAttention kernels vs SDPA and the floors (GPU only)
    python -m eval.bench.sweep_kernel, python -m eval.bench.profile_kernel   # their knobs, their time per kernel

Every benchmark hands its cases and one measure function to :class:`eval.bench.runner.BenchmarkRun` and writes the
one result schema (:mod:`eval.bench.schema`) to ``eval/results/``; ``python -m eval.plots`` draws from those files.
``models`` builds the random Llama-3.1-8B-shaped model and adapters, ``measure`` holds the timing helpers.
"""
