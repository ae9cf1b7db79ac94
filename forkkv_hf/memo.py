"""``memoized``: ``functools.lru_cache`` for the package's small host-side tables, declared safe for ``torch.compile``.

A compiled forward traces through functions that read the configuration and turn the rows' adapter slots into
tensors. Dynamo ignores an ``lru_cache`` and traces the wrapped function itself, which is right for ours: each is a
pure function of its hashable arguments (the rows' slots, a device name, the environment's values), so the traced
result is the cached one (``warn_once`` logs while tracing instead of at run time). Since torch 2.13 Dynamo warns
about every such call ("Silent incorrectness is only a *potential* risk"), three warnings a user of ``torch.compile``
could do nothing about; ``memoized`` puts the wrapper on Dynamo's list of caches traced without a warning where that
list exists, and is a plain ``lru_cache`` elsewhere.
"""

from __future__ import annotations

import functools


def memoized(maxsize: int | None = 128):
    """``functools.lru_cache(maxsize)`` whose wrapper ``torch.compile`` traces through without a warning. Only for
    functions whose result depends on their arguments alone."""

    def wrap(fn):
        cached = functools.lru_cache(maxsize=maxsize)(fn)
        try:
            from torch._dynamo.utils import allow_lru_cache_wrapper_trace_without_warning as allow
        except ImportError:  # torch before the warning (2.11 has neither)
            return cached
        allow(cached)
        return cached

    return wrap
