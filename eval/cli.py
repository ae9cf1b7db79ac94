"""Argument types the evaluation and example command lines share."""

from __future__ import annotations

import argparse
from pathlib import Path


def positive_int(text: str) -> int:
    """``argparse`` type: an integer of at least 1 (a usage error, not a traceback after the model loads)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def existing_file(text: str) -> Path:
    """``argparse`` type: the path of a file that exists (a usage error that names it, not a traceback)."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def read_file_arg(text: str) -> str:
    """The text of a file named inside another argument (``LABEL=FILE``, ``RANK:FILE``), or the usage error that names
    it."""
    path = Path(text)
    if not path.is_file():
        raise SystemExit(f"no such file: {text}")
    return path.read_text()


def non_negative_int(text: str) -> int:
    """``argparse`` type: an integer of at least 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value
