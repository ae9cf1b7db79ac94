"""Convert result files written before the one schema (one JSON shape per script) into it, once, in place.

    python -m eval.bench.upgrade_results eval/results/bench_*.json

Each legacy top-level field goes to one place of the schema (:data:`SECTIONS`): the device info to ``device``, the
run's set-up to ``params``, run-level results to ``extra``, the rows unchanged; a field this script does not know
stops it. Nothing is recomputed: before a file is written, the legacy dict is rebuilt from the converted one and must
equal the original (every value identical). The device-map comparison (two runs in one file, a README table) becomes
two files, ``<name>_two_gpus.json`` and ``<name>_one_gpu.json``, each with the comparison's note. Files already in
the schema are left alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..cli import existing_file
from .schema import SCHEMA, BenchResult

#: per legacy benchmark: (case keys, legacy fields that are params, legacy fields that are run-level results)
SECTIONS = {
    "bench_e2e": (["system", "context", "agents"],
                  ["model", "prompt_tokens", "new_tokens", "budget_gib", "baseline_prefill_chunk"],
                  ["capacity", "profile"]),
    "bench_lora": (["rows", "mix", "path"], ["model"], ["check", "summary"]),
    "bench_tp": (["system", "context", "agents"],
                 ["world_size", "mode", "model", "weights_and_adapters_gib_per_rank", "new_tokens"], []),
    "bench_kernel": (["context", "agents"], ["shape"], ["ceilings"]),
}
_COMMON = {"benchmark", "time", "device", "rows", "note"}


def from_legacy(old: dict, source: str) -> BenchResult:
    name = old.get("benchmark")
    if name not in SECTIONS:
        raise ValueError(f"{source}: no conversion for benchmark {name!r} (known: {sorted(SECTIONS)}); add its "
                         "fields to SECTIONS or rerun the benchmark with eval.bench.runner")
    case_keys, params, extra = SECTIONS[name]
    unknown = sorted(set(old) - _COMMON - set(params) - set(extra))
    if unknown:
        raise ValueError(f"{source}: fields {unknown} have no place in the schema; add them to SECTIONS[{name!r}]")
    return BenchResult(name, old["device"], {k: old[k] for k in params if k in old}, list(case_keys), old["rows"],
                       {k: old[k] for k in extra if k in old}, old["time"], old.get("note"))


def to_legacy(new: dict) -> dict:
    """The legacy dict a converted result came from (the check that nothing changed)."""
    old = {"benchmark": new["benchmark"], "time": new["time"], "device": new["device"], "rows": new["rows"],
           **new["params"], **new["extra"]}
    if "note" in new:
        old["note"] = new["note"]
    return old


def _converted(old: dict, source: str) -> BenchResult:
    res = from_legacy(old, source)
    again = json.loads(json.dumps(res.to_dict()))  # as it will be read back
    BenchResult.from_dict(again, source)
    if to_legacy(again) != old:
        raise AssertionError(f"{source}: the converted result does not give back the original values")
    return res


def upgrade(path: Path) -> list[Path]:
    """Convert one file in place (or into two for the device-map comparison); returns the files written."""
    old = json.loads(path.read_text())
    if old.get("schema") == SCHEMA:
        return []
    if old.get("benchmark") == "bench_e2e_device_map":
        parts = {k: v for k, v in old.items() if k not in ("benchmark", "note")}
        if set(parts) != {"two_gpus", "one_gpu"}:
            raise ValueError(f"{path}: a device-map comparison holds the runs 'two_gpus' and 'one_gpu', not "
                             f"{sorted(parts)}")
        written = []
        for part, run in parts.items():
            res = _converted({**run, "note": old["note"]}, f"{path} [{part}]")
            written.append(res.save(path.with_name(f"{path.stem}_{part}.json")))
        path.unlink()
        return written
    return [_converted(old, str(path)).save(path)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=existing_file)
    args = ap.parse_args(argv)
    for path in args.files:
        for out in upgrade(path):
            print("wrote", out)


if __name__ == "__main__":
    main()
