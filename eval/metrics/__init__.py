"""Metric modules of the `evaluate` library kept in this repository (``evaluate.load("name")`` needs the Hub; these
load by path, offline): ``evaluate.load("eval/metrics/context_qa")``. Each module's plain functions work without
``evaluate`` (the GPU machine has none), and the evaluation code computes its per-prompt scores with them."""
