"""Triton kernels of forkkv-hf (the package ``forkkv_kernels``).

(The folder was ``kernels/`` until transformers 5.25, which imports Hugging Face's own ``kernels`` package when it
loads: run from the repository root, where the root is on the import path, our folder shadowed it and transformers
failed to import.) The attention launcher takes plain tensors (``forkkv_hf``'s
adapter :func:`forkkv_hf.ops.dispatch.residual_attention_triton` unpacks a ``ForkKVView`` for it, and the compiled
decode step's op passes the rows' order planned before the step); nothing here imports ``forkkv_hf``. The
fused-rebuild kernels of v6 were removed once the cascade measured faster at every point (eval/KERNEL_NOTES.md,
"Which family serves a call").
"""

from .attention_common import release_workspaces
from .cascade import cascade_attention

__all__ = ["cascade_attention", "release_workspaces"]
