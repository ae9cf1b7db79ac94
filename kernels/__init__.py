"""Triton kernels of forkkv-hf, installed as the package ``forkkv_kernels``.

(The source folder is ``kernels/``; it is never imported under that name, which would shadow Hugging Face's
``kernels`` package that transformers probes for.)
"""

from .residual_attention import residual_attention_triton

__all__ = ["residual_attention_triton"]
