"""Differences between the transformers versions we support (5.17 up to the newest 5.x).

transformers 5.17 calls the cache keyword ``past_key_values``; from about 5.2x it is ``cache`` and the old name is
deprecated. Everything in this package that passes a cache to a model goes through :data:`CACHE_KWARG`.
"""

from __future__ import annotations

import inspect

import transformers
from transformers import LlamaModel

TRANSFORMERS_VERSION = transformers.__version__

#: the keyword under which ``model(...)`` / ``model.generate(...)`` take a cache on the installed transformers
CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def cache_kwargs(cache) -> dict:
    """``{CACHE_KWARG: cache}``: pass a cache to ``model(...)`` or ``generate(...)`` on any supported version."""
    return {CACHE_KWARG: cache}
