"""Triton ResidualAttention kernels (installed as forkkv_kernels)."""
