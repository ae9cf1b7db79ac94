"""What the Gluon kernels (:mod:`.kres_gluon`, :mod:`.shared_gluon`) share: Gluon's imports where this Triton has
them (``HAVE_GLUON``), the CTA barrier under its name in each Triton version, the warpgroup MMA's accumulator layout,
and the check that a call can run on this device at all. Imports nothing from ``forkkv_hf``."""

from __future__ import annotations

import torch

try:  # Gluon: triton >= 3.5
    from triton.experimental import gluon
    from triton.experimental.gluon import constexpr_function
    from triton.experimental.gluon import language as gl

    # the CTA barrier: gl.thread_barrier up to Triton 3.6 (the GPU machine's), gl.barrier after
    cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
except (ImportError, AttributeError):  # pragma: no cover - a Triton without (this) Gluon
    gluon = None

from .attention_common import sm_major

HAVE_GLUON = gluon is not None


def device_unsupported(device, have_gluon: bool = HAVE_GLUON) -> str | None:
    """Why a Gluon kernel cannot run here (no Gluon in this Triton, or, ``have_gluon`` False, not the parts of it the
    kernel imports; or not a Hopper GPU), or None. ``device``: a ``torch.device`` (the callers' other checks come
    first)."""
    if not have_gluon:
        return "this Triton has no Gluon (triton >= 3.5 has it)"
    if device.type != "cuda" or sm_major(str(device)) != 9:
        return f"it runs on CUDA devices of compute capability 9.x only (got {device})"
    return None


if HAVE_GLUON:
    @constexpr_function
    def acc_layout(nw, n):
        """The warpgroup MMA's accumulator layout for ``nw`` warps and ``n`` columns."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[nw, 1], instr_shape=[16, n, 16])
