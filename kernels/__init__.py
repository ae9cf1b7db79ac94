"""Triton kernels of forkkv-hf, installed as the package ``forkkv_kernels``.

(The source folder is ``kernels/``; it is never imported under that name, which would shadow Hugging Face's
``kernels`` package that transformers probes for.) The attention launchers take plain tensors (``forkkv_hf``'s
adapter :func:`forkkv_hf.ops.dispatch.residual_attention_triton` unpacks a ``ForkKVView`` for them; the fused
family also takes a plan made beforehand, :func:`plan_work`, for a launch with no host work, as a CUDA graph needs);
nothing here imports ``forkkv_hf``.
"""

from .cascade import cascade_attention
from .residual_attention import WorkPlan, fused_rebuild_attention, fused_rebuild_attention_planned, plan_work

__all__ = ["cascade_attention", "fused_rebuild_attention", "fused_rebuild_attention_planned", "plan_work", "WorkPlan"]
