"""Differences between the transformers versions we support (5.17 up to the newest 5.x).

transformers 5.17 calls the cache keyword ``past_key_values``; from about 5.2x it is ``cache`` and the old name is
deprecated. Everything in this package that passes a cache to a model goes through :data:`CACHE_KWARG`.
``Cache.crop(n)`` with ``n > 0`` means an absolute length on older 5.x and is refused on newer ones:
:func:`crop_takes_length`.
"""

from __future__ import annotations

import functools
import inspect

import torch
import transformers
from transformers import LlamaModel

TRANSFORMERS_VERSION = transformers.__version__

#: the keyword under which ``model(...)`` / ``model.generate(...)`` take a cache on the installed transformers
CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def cache_kwargs(cache) -> dict:
    """``{CACHE_KWARG: cache}``: pass a cache to ``model(...)`` or ``generate(...)`` on any supported version."""
    return {CACHE_KWARG: cache}


@functools.cache
def crop_takes_length() -> bool:
    """Whether the installed transformers' ``DynamicLayer.crop(n)`` with ``n > 0`` keeps the first ``n`` tokens (5.17
    and 5.18, deprecated there) rather than refusing it (5.24; only ``n <= 0``, "remove ``-n`` tokens", remains).
    Asked of ``DynamicLayer`` itself, so that a ``ForkKVCache`` follows whatever version is installed."""
    from transformers.cache_utils import DynamicLayer
    from transformers.utils import logging

    layer = DynamicLayer()
    kv = torch.zeros(1, 1, 2, 1)
    layer.update(kv, kv)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the deprecation warning of the old meaning is ours to know, not the user's
    try:
        layer.crop(1)
    except ValueError:
        return False
    finally:
        logging.set_verbosity(verbosity)
    return layer.get_seq_length() == 1


@functools.cache
def chunked_prefill_skips_cache() -> bool:
    """Whether the installed transformers' chunked prefill (``prefill_chunk_size``) starts after the tokens a passed
    cache holds (5.2x) rather than at the rows' first token (5.17, which re-runs the shared context a ForkKVCache
    holds). Read from ``GenerationMixin._prefill``'s source: it slices the rows by ``next_sequence_length``."""
    from transformers.generation.utils import GenerationMixin

    try:
        return "next_sequence_length:]" in inspect.getsource(GenerationMixin._prefill)
    except (AttributeError, OSError, TypeError):
        return True


def text_config(config):
    """``config``'s text model's config (a multimodal model's, e.g. Llava's ``text_config``), else ``config``: the
    top-level config of such a model holds no positions, window, layer count, RoPE or vocabulary (read there before,
    found by an audit: nothing was checked)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config
