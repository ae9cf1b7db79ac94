"""Triton kernels of forkkv-hf, installed as the package ``forkkv_kernels``.

(The source folder is ``kernels/``; it is never imported under that name, which would shadow Hugging Face's
``kernels`` package that transformers probes for.) The attention launcher takes plain tensors (``forkkv_hf``'s
adapter :func:`forkkv_hf.ops.dispatch.residual_attention_triton` unpacks a ``ForkKVView`` for it, and the compiled
decode step's op passes the rows' order planned before the step); nothing here imports ``forkkv_hf``. The
fused-rebuild kernels of v6 were removed once the cascade measured faster at every point (eval/KERNEL_NOTES.md,
"Which family serves a call").
"""

from .cascade import cascade_attention

__all__ = ["cascade_attention"]
