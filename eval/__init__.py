"""Evaluation of forkkv-hf: fidelity on a real model with trained agents, and the GPU benchmarks.

Everything here runs as a module from the repository root (``forkkv_hf`` installed, e.g. ``make install``):

    python -m eval.quality            # fidelity: exact vs ForkKV vs naive sharing (CPU)
    python -m eval.train_adapters     # train and score the four agents of eval/adapters/
    python -m eval.bench.e2e          # GPU benchmarks: e2e, lora, tp (eval/bench/); one result schema
    python -m eval.plots              # every plot of eval/results/, from the JSON files
    python -m eval.device             # the device and versions every result records

Layers, imports pointing down only: ``device`` and ``smollm2`` (no project imports) <- ``agents`` <- ``quality``,
``train_adapters``; ``bench.schema`` <- ``bench.runner`` <- the benchmarks; ``plots`` reads result files through
``bench.schema`` and is imported by ``quality`` (which writes its figure), never the other way.
"""
