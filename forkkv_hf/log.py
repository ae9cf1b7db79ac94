"""The library's loggers, in the transformers style: one ``logging.getLogger(__name__)`` per module, all children of
the ``forkkv_hf`` logger (``logging.getLogger("forkkv_hf").setLevel(logging.ERROR)`` silences the library), and
:func:`warn_once` for fallbacks: a path that still gives the right result with other, slower code (a DoRA layer
left to PEFT's own forward, the PyTorch attention path where the Triton kernels cannot run). A decode loop reaches
the same fallback at every step and layer; the user needs to read it once.

    from .log import get_logger, warn_once

    logger = get_logger(__name__)
    warn_once(logger, "DoRA adapter 'x': PEFT's own LoRA forward for these layers (the batched LoRA cannot batch it)")

No handler is added: with logging unconfigured, Python prints warnings to stderr (its last-resort handler); an
application's logging configuration takes over as soon as it has one.
"""

from __future__ import annotations

import logging

from .memo import memoized

ROOT_LOGGER = "forkkv_hf"


def get_logger(name: str) -> logging.Logger:
    """The logger of module ``name`` (pass ``__name__``); refuses names outside the ``forkkv_hf`` hierarchy, whose
    records would not follow the library's level."""
    if name != ROOT_LOGGER and not name.startswith(ROOT_LOGGER + "."):
        raise ValueError(f"get_logger({name!r}): pass __name__ of a forkkv_hf module (a name under {ROOT_LOGGER!r})")
    return logging.getLogger(name)


@memoized(maxsize=None)
def warn_once(logger: logging.Logger, message: str) -> None:
    """``logger.warning(message)`` the first time this (logger, message) pair comes, nothing after that (for the life
    of the process; ``warn_once.cache_clear()`` forgets). Format the message before the call: the formatted text is
    the key, so a fallback that names its adapter warns once per adapter."""
    # stacklevel 2: the record points at the caller (the cache wrapper is C code and adds no Python frame)
    logger.warning(message, stacklevel=2)
