"""The GPU benchmark scripts run end to end at toy sizes on CPU (so a GPU session is not spent on a typo)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script, *args, tmp_path):
    out = tmp_path / "out.json"
    subprocess.run([sys.executable, str(ROOT / "eval" / script), *args, "--out", str(out)], check=True,
                   capture_output=True, timeout=600)
    return json.loads(out.read_text())


def test_bench_lora_tiny(tmp_path):
    res = _run("bench_lora.py", "--tiny", "--rows", "1", "3", "--prompt", "6", "--new-tokens", "3", tmp_path=tmp_path)
    assert {r["path"] for r in res["rows"]} == {"peft", "batched"}
    assert all(r["step_s"] > 0 for r in res["rows"])
    assert res["device"]["torch"]


def test_bench_e2e_tiny(tmp_path):
    res = _run("bench_e2e.py", "--tiny", "--contexts", "48", "--agents", "1", "2", "--forkkv-agents", "1", "2",
               "--capacity-context", "48", "--new-tokens", "3", "--adapters", "2", tmp_path=tmp_path)
    systems = {r["system"] for r in res["rows"]}
    assert systems == {"baseline", "forkkv"}
    assert all(r["new_tokens"] == 3 for r in res["rows"])
    assert all(r["cache_gib"] > 0 and r["decode_tok_s"] > 0 for r in res["rows"])
    assert set(res["capacity"]) == {"baseline", "forkkv"}
    (prof,) = res["profile"]
    assert "error" not in prof, prof
    assert prof["step_wall_s"] > 0 and prof["top_cpu_ops"]


def test_bench_e2e_tiny_split_over_devices(tmp_path):
    """The device-map variant (layers split with accelerate; here over two "cpu" devices, hooks forced)."""
    res = _run("bench_e2e.py", "--tiny", "--devices", "cpu", "cpu", "--contexts", "40", "--agents", "2",
               "--forkkv-agents", "2", "--new-tokens", "3", "--adapters", "2", "--no-profile", "--no-capacity",
               tmp_path=tmp_path)
    assert res["model"]["devices"] == ["cpu", "cpu"] and res["model"]["device_map"]["model.layers.1"] == "cpu"
    assert {r["system"] for r in res["rows"]} == {"baseline", "forkkv"}
    assert all(r["new_tokens"] == 3 and not r.get("oom") for r in res["rows"])


def test_bench_e2e_tiny_decode_section(tmp_path):
    """The decode-step section: ForkKV compiled (eager backend on CPU) and not, and the transformers-alone anchors."""
    res = _run("bench_e2e.py", "--tiny", "--only-decode", "--decode-agents", "2", "--decode-context", "40",
               "--decode-tokens", "2", "4", "--decode-reps", "1", "--adapters", "2", tmp_path=tmp_path)
    assert not res["rows"] and {(r["agents"], r["compile"]) for r in res["decode"]} == {(2, True), (2, False)}
    assert [r["system"] for r in res["anchors"]] == ["transformers, DynamicCache eager",
                                                      "transformers, StaticCache + compile"]
    for r in res["decode"] + res["anchors"]:
        assert r["step_ms"] > 0 and r["tok_s"] > 0 and r["first_call_s"] > 0 and "gpu_busy_ms" in r, r
