"""The one benchmark runner: a benchmark hands it cases and a function that measures one; the runner owns the rest.

What the runner does for every benchmark: measures the device info once (:func:`eval.device.device_info`), names
the result file (``eval/results/<benchmark>_<gpu slug><suffix>.json`` unless ``--out``), keeps the rows in the one
schema (:class:`eval.bench.schema.BenchResult`), prints each row as a JSON line and rewrites the file after each
one (a run cut short keeps what it measured; with :meth:`BenchmarkRun.partial`, also a case's phases so far), resumes
an earlier run's cases, and stops starting new cases after a time limit. What a benchmark does: build its model, say
which cases to run, and return one ``dict`` of measurements per case (``measure``)::

    run = BenchmarkRun("bench_lora", params={"model": {...}}, case_keys=["rows", "mix", "path"], out=args.out)
    for case in cases:
        run.measure(case, lambda: {"step_s": ...})
    run.extra["summary"] = [...]
    run.finish()
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from ..device import device_info
from .schema import BenchResult, load

RESULTS = Path(__file__).resolve().parents[1] / "results"

#: what a benchmark's measure function returns for one case: the row's measurement fields
Measurements = dict[str, Any]


def slug(s: str) -> str:
    """``"NVIDIA H200"`` -> ``"nvidia_h200"`` (file-name safe)."""
    return "".join(c if c.isalnum() else "_" for c in s).strip("_").lower()


def default_path(benchmark: str, device: dict, suffix: str = "") -> Path:
    return RESULTS / f"{benchmark}_{slug(device.get('gpu', 'cpu'))}{suffix}.json"


#: what a resumed run's device record must share with this run's
RESUME_DEVICE_KEYS = ("gpu", "gpu_count", "torch", "triton", "transformers", "peft", "cuda")


class BenchmarkRun:
    """One run of a benchmark and its result file.

    ``params``: what the run was asked for (saved as the schema's ``params``); ``case_keys``: the fields of a case.
    ``out``: the result file (default :func:`default_path` with ``suffix``). ``resume``: an earlier result file of an
    unfinished run; its rows and ``extra`` are kept (not rerun) when it ran on the same GPU and software
    (:data:`RESUME_DEVICE_KEYS`) with the same ``params``, all of them (before, only those a caller named: a run with
    another K pass, budget or adapter count could be resumed into this one's file). ``time_limit``: seconds after which no new case starts. ``write``:
    False on the ranks of a distributed run that only measure (rank 0 writes).
    """

    def __init__(self, benchmark: str, params: dict, case_keys, out=None, suffix: str = "", resume=None,
                 time_limit: float | None = None, write: bool = True):
        self.result = BenchResult(benchmark, device_info(), params, list(case_keys))
        self.path = Path(out) if out else default_path(benchmark, self.result.device, suffix)
        self.time_limit = time_limit
        self.write = write
        if resume and Path(resume).exists():
            self._resume(Path(resume))
        self.started = time.time()

    @property
    def rows(self) -> list[dict]:
        return self.result.rows

    @property
    def extra(self) -> dict:
        """Run-level results (capacity, profiles, summary, checks): saved under the schema's ``extra``."""
        return self.result.extra

    @property
    def device(self) -> dict:
        return self.result.device

    def _resume(self, path: Path) -> None:
        old = load(path)
        differs = sorted(k for k in set(old.params) | set(self.result.params)
                         if old.params.get(k) != self.result.params.get(k))
        differs += [k for k in RESUME_DEVICE_KEYS if old.device.get(k) != self.device.get(k)]
        if differs:
            self._print(f"not resuming {path}: other {differs}")
            return
        self.result.rows[:] = old.rows
        self.result.extra.update(old.extra)
        self._print(f"resumed {len(old.rows)} cases from {path}")

    def out_of_time(self) -> bool:
        return self.time_limit is not None and time.time() - self.started > self.time_limit

    def done(self, case: dict) -> dict | None:
        return self.result.find(case)

    def measure(self, case: dict, fn: Callable[[], Measurements]) -> dict:
        """The row of ``case``: the one already measured (resumed), ``{"skipped": True}`` (not saved) when out of
        time, else ``case`` + ``fn()``, appended, printed and saved."""
        row = self.done(case)
        if row is not None:
            return row
        if self.out_of_time():
            return {"skipped": True}
        return self.add({**case, **fn()})

    def add(self, row: dict) -> dict:
        """Append a measured row (all its case keys present), print it, save; the case's partial record goes."""
        absent = [k for k in self.result.case_keys if k not in row]
        if absent:
            raise ValueError(f"row {row} lacks its case keys {absent}: every row carries {self.result.case_keys}")
        self._drop_partial(row)
        self.result.rows.append(row)
        self._print(json.dumps(row))
        self.save()
        return row

    def partial(self, case: dict, fields: dict) -> None:
        """Save what a case has measured so far under ``extra["partial"]`` (not a row: a resumed run measures the case
        again), so that a run cut before the case's row keeps it in the file, not only in its log; :meth:`add` drops
        it."""
        self._drop_partial(case)
        self.extra.setdefault("partial", []).append({**case, **fields})
        self.save()

    def _drop_partial(self, case: dict) -> None:
        keys = self.result.case_keys
        kept = [p for p in self.extra.get("partial", []) if any(p.get(k) != case.get(k) for k in keys)]
        if kept:
            self.extra["partial"] = kept
        else:
            self.extra.pop("partial", None)

    def save(self) -> None:
        if self.write:
            self.result.time = time.strftime("%Y-%m-%d %H:%M:%S")
            self.result.save(self.path)

    def finish(self) -> Path:
        self.save()
        self._print(f"wrote {self.path}")
        return self.path

    def _print(self, text: str) -> None:
        if self.write:
            print(text, flush=True)
