"""The one result schema every benchmark writes (``eval/results/<benchmark>_<gpu>[_suffix].json``).

    {"schema": "forkkv-bench/1",
     "benchmark": "bench_e2e",            # the benchmark's name (its module: eval/bench/e2e.py)
     "time": "2026-11-27 23:22:09",       # last save
     "device": {...},                     # eval.device.device_info(): GPU, CPU, torch/triton/transformers/peft
     "params": {...},                     # what the run was asked for and its fixed set-up (model shape, tokens, ...)
     "case_keys": ["system", "context", "agents"],   # the fields of a row that name its case
     "rows": [{...}, ...],                # one measured case each: its case_keys + its measurements
     "extra": {...},                      # results about the run as a whole (capacity, profiles, summary, checks)
     "note": "..."}                       # optional: a person's note added after the run

Files written before this schema (one JSON shape per script) are converted once by ``python -m
eval.bench.upgrade_results FILE...``; :func:`load` refuses them and says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA = "forkkv-bench/1"
_FIELDS = ("schema", "benchmark", "time", "device", "params", "case_keys", "rows", "extra")


@dataclass
class BenchResult:
    """One benchmark run: see the module docstring for the meaning of each field."""

    benchmark: str
    device: dict
    params: dict
    case_keys: list[str]
    rows: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    time: str = ""
    note: str | None = None

    def case_of(self, row: dict) -> tuple:
        """The values of ``row``'s case keys, in ``case_keys`` order."""
        return tuple(row.get(k) for k in self.case_keys)

    def find(self, case: dict) -> dict | None:
        """The row measured for ``case`` (a dict of the case keys), or None."""
        want = tuple(case.get(k) for k in self.case_keys)
        return next((r for r in self.rows if self.case_of(r) == want), None)

    def to_dict(self) -> dict:
        d = {"schema": SCHEMA, "benchmark": self.benchmark, "time": self.time, "device": self.device,
             "params": self.params, "case_keys": list(self.case_keys), "rows": self.rows, "extra": self.extra}
        if self.note is not None:
            d["note"] = self.note
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "result") -> BenchResult:
        """Checks the schema tag, the fields and that every row names its case; raises ValueError saying what to do."""
        if d.get("schema") != SCHEMA:
            if "schema" not in d and "benchmark" in d:
                raise ValueError(f"{source} was written before the one result schema ({SCHEMA}); convert it once: "
                                 f"python -m eval.bench.upgrade_results {source}")
            raise ValueError(f"{source} is not a {SCHEMA} result (schema {d.get('schema')!r}); write it with "
                             "eval.bench.runner.BenchmarkRun")
        missing = [k for k in _FIELDS if k not in d]
        unknown = sorted(set(d) - set(_FIELDS) - {"note"})
        if missing or unknown:
            raise ValueError(f"{source}: fields missing {missing}, unknown {unknown}; a {SCHEMA} result has exactly "
                             f"{list(_FIELDS)} (+ optional 'note'): put run-level results under 'extra'")
        for i, row in enumerate(d["rows"]):
            absent = [k for k in d["case_keys"] if k not in row]
            if absent:
                raise ValueError(f"{source}: row {i} lacks its case keys {absent}; every row carries all of "
                                 f"{d['case_keys']}")
        return cls(d["benchmark"], d["device"], d["params"], list(d["case_keys"]), d["rows"], d["extra"], d["time"],
                   d.get("note"))

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path


def load(path) -> BenchResult:
    """The result in the JSON file ``path`` (checked as :meth:`BenchResult.from_dict` does)."""
    return BenchResult.from_dict(json.loads(Path(path).read_text()), source=str(path))
