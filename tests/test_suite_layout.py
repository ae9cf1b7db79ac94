"""The test suite's own rules: every parametrized test takes its ids from tests/cases.py (one scheme, generated from
the parameters), and the scheme reads as documented."""

import ast
from pathlib import Path

import pytest
import torch

from cases import ATTN_CASES, case_id

pytestmark = pytest.mark.version_independent  # no transformers/PEFT code: not rerun on 5.17 (tests/conftest.py)

TESTS = Path(__file__).resolve().parent


def _parametrize_calls(tree):
    """(line, what) of every ``pytest.mark.parametrize``/``pytest.param`` and every ``ids=``/``id=`` keyword."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in ("parametrize", "param") and isinstance(func.value, (
                ast.Attribute, ast.Name)):
            owner = func.value.attr if isinstance(func.value, ast.Attribute) else func.value.id
            if owner in ("mark", "pytest"):
                yield node.lineno, f"pytest.{'mark.' if owner == 'mark' else ''}{func.attr}"
        for kw in node.keywords:
            if kw.arg in ("ids", "id"):
                yield node.lineno, f"{kw.arg}="


def test_every_parametrized_test_uses_the_one_id_scheme():
    sample = ("@pytest.mark.parametrize('x', [1], ids=['one'])\ndef test_a(x): pass\n"
              "@parametrize('x', [pytest.param(1, id='one')])\ndef test_b(x): pass\n")
    assert sorted(what for _, what in _parametrize_calls(ast.parse(sample))) == [
        "id=", "ids=", "pytest.mark.parametrize", "pytest.param"]  # the scan finds each hand-written form
    offenders = [f"{path.name}:{line}: {what}" for path in sorted(TESTS.glob("*.py")) if path.name != "cases.py"
                 for line, what in _parametrize_calls(ast.parse(path.read_text()))]
    assert offenders == [], ("parametrize with tests/cases.py's parametrize (ids generated from the parameters), "
                             f"not by hand: {offenders}")


def test_id_scheme():
    assert case_id({"B": 3, "T": 37, "H": 4, "D": 16}) == "B3-T37-H4-D16"
    assert case_id({"dtype": torch.bfloat16, "kernel": "cascade", "masked": True}) == \
        "dtype=bf16-kernel=cascade-masked=True"
    assert case_id({"mode": {"do_sample": True, "num_beams": 2}}) == "do_sample=True-num_beams=2"
    assert case_id({"chunk_size": "4096"}) != case_id({"chunk_size": 4096})
    assert case_id({"rows": (0, -1)}) == "rows=0,-1"
    ids = [c.id for c in ATTN_CASES]
    assert len(set(ids)) == len(ids), "two attention cases with one id"
    assert ATTN_CASES[1].id == "B4-H2-Hkv2-D32-T23-P7-Q1-rows=0,0,1,-1"
