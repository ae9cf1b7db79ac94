"""The attention ops over a ForkKV view, below the cache and above the Triton kernels:

- :mod:`.dispatch`: :func:`~.dispatch.residual_attention` (chooses the path from the call and the configuration),
  the chunked PyTorch path, the rebuild-and-SDPA path and the adapter to the ``forkkv_kernels`` Triton kernels;
- :mod:`.decode_ops` and :mod:`.custom_ops`: the compile-friendly decode step and the kernels as ``torch.ops.forkkv``;
- :mod:`.masks` and :mod:`.rope`: what every path shares;
- :mod:`.naive`: the materialising fp32 reference (ground truth for the tests; no fast path imports it).

Nothing is imported here, so a fast path that imports one of these modules does not load the others.
"""
