"""The library's warn-once logger (forkkv_hf.log): one record per (logger, message), under the ``forkkv_hf``
logger's level, pointing at the caller."""

import logging

import pytest

from forkkv_hf.log import get_logger, warn_once

pytestmark = pytest.mark.version_independent  # no transformers/PEFT code: not rerun on 5.17 (tests/conftest.py)


@pytest.fixture
def fresh():
    warn_once.cache_clear()
    yield
    warn_once.cache_clear()


def _fallback(logger, adapter):
    warn_once(logger, f"adapter {adapter!r}: PEFT's own forward")


def test_warns_once_per_message_and_logger(fresh, caplog):
    a, b = get_logger("forkkv_hf.peft.batched_lora"), get_logger("forkkv_hf.ops.dispatch")
    with caplog.at_level(logging.WARNING, logger="forkkv_hf"):
        for _ in range(3):
            _fallback(a, "dora")
        _fallback(a, "other")
        _fallback(b, "dora")
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("forkkv_hf.peft.batched_lora", logging.WARNING, "adapter 'dora': PEFT's own forward"),
        ("forkkv_hf.peft.batched_lora", logging.WARNING, "adapter 'other': PEFT's own forward"),
        ("forkkv_hf.ops.dispatch", logging.WARNING, "adapter 'dora': PEFT's own forward"),
    ]
    assert {r.funcName for r in caplog.records} == {"_fallback"}  # the caller, not warn_once


def test_library_level_silences_and_cache_clear_forgets(fresh, caplog):
    log = get_logger("forkkv_hf.peft.batched_lora")
    root = logging.getLogger("forkkv_hf")
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with caplog.at_level(logging.NOTSET):
            _fallback(log, "dora")
        assert caplog.records == []
    finally:
        root.setLevel(level)
    warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="forkkv_hf"):
        _fallback(log, "dora")
    assert [r.getMessage() for r in caplog.records] == ["adapter 'dora': PEFT's own forward"]


def test_logger_names_stay_under_the_library():
    assert get_logger("forkkv_hf").name == "forkkv_hf"
    assert get_logger("forkkv_hf.store.radix").parent.name in {"forkkv_hf", "forkkv_hf.store"}
    with pytest.raises(ValueError, match="pass __name__ of a forkkv_hf module"):
        get_logger("transformers.generation")
