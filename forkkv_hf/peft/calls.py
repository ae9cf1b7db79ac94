"""The *call epoch*: a counter bumped at every user-level call of a ``PeftModel`` (an outer ``forward``, a
``generate``) by the wrappers (:mod:`forkkv_hf.peft.wrappers`). Per-layer plans of batched LoRA
(:mod:`forkkv_hf.peft.batched_lora`) are keyed by it: made at a call's first forward, reused by its decode steps,
rebuilt (and the adapters' weights checked again) at the next call.
"""

from __future__ import annotations

#: bumped at every user-level call (outer forward, generate); per-layer plans are reused within one epoch only
CALL_EPOCH = [0]


def new_call(*args, **kwargs) -> None:
    """Start a new call epoch (arguments ignored: usable as a hook)."""
    CALL_EPOCH[0] += 1
