"""One re-entrant lock per model, held by every forkkv-hf entry point that runs the model or changes state that
other calls on the same model read.

PEFT keeps per-call state on the model itself: ``disable_adapter()`` (ForkKV's base pass) switches every LoRA layer
off, and ``generate(adapter_names=...)`` registers pre-forward hooks on every LoRA layer for the duration of the call.
Two such calls from different threads interleave that state (a base pass sees another thread's ``adapter_names``; a
thread leaves the model with its adapters disabled). So ``SharedContext.build``/``add_adapters``, every
``ForkKVStore`` method, and, once ``enable_forkkv``/``enable_batched_lora`` installed their wrappers, the
``PeftModel``'s ``generate`` and ``forward`` each hold the model's lock: calls from several threads run one after the
other, each with the model as it expects. The lock is keyed by the transformers model (a ``PeftModel`` and its base
model share it) and is not stored on the model, so models stay picklable and deep-copyable.
"""

from __future__ import annotations

import contextlib
import threading
import weakref

from torch import nn

from .peft.lora_factors import transformers_model

_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The re-entrant lock of ``model`` (created on first use)."""
    base = transformers_model(model)
    with _GUARD:
        lock = _LOCKS.get(base)
        if lock is None:
            lock = _LOCKS[base] = threading.RLock()
    return lock


_DEPTH: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def model_call(model: nn.Module):
    """Hold ``model``'s lock for a wrapped ``generate``/``forward`` call and count it as in flight; yields how many
    calls of this model were in flight before it (0 for a call from outside; more for one nested in it, e.g. from a
    logits processor)."""
    base = transformers_model(model)
    with model_lock(model):
        depth = _DEPTH.get(base, 0)
        _DEPTH[base] = depth + 1
        try:
            yield depth
        finally:
            _DEPTH[base] = depth


def calls_in_flight(model: nn.Module) -> int:
    """How many wrapped calls of ``model`` are running (in this thread, as the caller holds the lock)."""
    return _DEPTH.get(transformers_model(model), 0)
