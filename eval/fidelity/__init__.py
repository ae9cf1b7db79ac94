"""The context benchmark (issue 20): agents whose answers depend on a shared Shakespeare scene, trained the standard
way and ForkKV-aware (:mod:`forkkv_hf.training`), evaluated under exact, ForkKV, V-only and naive inference. Modules:
``tasks`` (data), ``train``, ``runner`` (evaluation), ``metrics``, ``report``; the command line is ``__main__``
(``python -m eval.fidelity``), the GPU recipe ``gpu.sh``."""
