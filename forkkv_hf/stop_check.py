"""Deferred stop checks for the decode steps forkkv-hf compiles on CUDA.

After every step transformers' ``generate`` reads ``unfinished_sequences.max() == 0`` on the host (``StopCheck``):
the host waits for the GPU, then prepares the next step (inputs, mask, logits processors, dynamo's guards, the
CUDA-graph replay) while the GPU idles. With the step in CUDA graphs that host part is most of what separates a step
from its GPU time (eval/results/bench_decode_nvidia_h200.json, ``host_profile``). transformers' own
``DeferredStopCheck`` reads the flag one step late through an asynchronous copy, so the host queues step ``k + 1``
while the GPU runs step ``k``; when every row has stopped it has run one forward too many, whose token it drops and
whose cache entries it removes with ``cache.crop(-1)``. transformers turns it on for MPS only.

forkkv-hf turns it on for the calls whose decode step it compiles on CUDA (:func:`deferring`), where the static
ForkKV layout crops exactly: ``DeferredStopCheck.is_supported`` answers ``True`` for a cache :func:`deferring` marks
and exactly as transformers does for every other cache. ``ForkKVConfig.defer_stop`` (``FORKKV_DEFER_STOP``):
``auto`` (default) or ``off`` (transformers' per-step check). Tokens are the same either way; sampling calls check
every step (the extra forward would draw a sample, moving the random stream the caller's later draws read).
"""

from __future__ import annotations

import contextlib

import torch

from .config import get_config

#: device types whose compiled ForkKV decode defers the stop check (``DeferredStopCheck`` needs ``torch.Event``)
DEFER_DEVICES = ("cuda",)
_MARK = "_forkkv_defer_stop"


def _deferred_stop_check():
    try:
        from transformers.generation.utils import DeferredStopCheck
    except ImportError:  # a transformers without it: its per-step check stays
        return None
    return DeferredStopCheck if hasattr(DeferredStopCheck, "is_supported") else None


def install() -> bool:
    """Let ``DeferredStopCheck.is_supported`` accept caches :func:`deferring` marks (idempotent). Returns whether
    this transformers has the deferred check."""
    cls = _deferred_stop_check()
    if cls is None:
        return False
    original = cls.__dict__["is_supported"]
    if getattr(original, _MARK, False):
        return True
    original = original.__func__ if isinstance(original, staticmethod) else original

    def is_supported(device, cache, cache_is_returned, is_assistant):
        if getattr(cache, _MARK, False) and not is_assistant and cache.is_croppable:
            return True
        return original(device, cache, cache_is_returned, is_assistant)

    setattr(is_supported, _MARK, True)
    is_supported.__doc__ = original.__doc__
    cls.is_supported = staticmethod(is_supported)
    return True


@contextlib.contextmanager
def deferring(cache, device: torch.device, allowed: bool = True):
    """For the ``generate`` call run inside: ``cache``'s stop check deferred by a step if the configuration allows
    it (``defer_stop="auto"``) on ``device`` and the caller does (``allowed``: not for sampling calls, whose extra
    forward would draw from the random stream)."""
    on = allowed and get_config().defer_stop == "auto" and device.type in DEFER_DEVICES and install()
    if on:
        setattr(cache, _MARK, True)
    try:
        yield on
    finally:
        if on:
            cache.__dict__.pop(_MARK, None)
