"""The evaluation package: the GPU benchmarks run end to end at toy sizes on CPU (so a GPU session is not spent on a
typo) and write the one result schema; the runner resumes and stops as it says; the committed results load and
plot; every entry point starts; nothing edits sys.path."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cases import parametrize

from eval.bench.runner import BenchmarkRun
from eval.bench.schema import SCHEMA, BenchResult, load
from eval.bench.upgrade_results import upgrade

ROOT = Path(__file__).resolve().parents[1]


def _run(module, *args, tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "-m", module, *args, "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return load(out)  # checks the schema


@pytest.mark.slow
@pytest.mark.eval_harness
def test_bench_lora_tiny(tmp_path):
    res = _run("eval.bench.lora", "--tiny", "--rows", "1", "3", "--prompt", "6", "--new-tokens", "3",
               tmp_path=tmp_path)
    assert res.benchmark == "bench_lora" and res.case_keys == ["rows", "mix", "path"]
    assert {r["path"] for r in res.rows} == {"peft", "batched"} and len(res.rows) == 8
    assert all(r["step_s"] > 0 for r in res.rows)
    assert res.device["torch"] and res.params["model"]["shape"] == "tiny"
    assert res.extra["check"]["rows"] == 4  # the 3 adapters and a __base__ row
    assert [s["rows"] for s in res.extra["summary"]] == [1, 3]


@pytest.mark.slow
@pytest.mark.eval_harness
def test_bench_e2e_tiny(tmp_path):
    res = _run("eval.bench.e2e", "--tiny", "--contexts", "48", "--agents", "1", "2", "--forkkv-agents", "1", "2",
               "--capacity-context", "48", "--new-tokens", "3", "--adapters", "2", tmp_path=tmp_path)
    systems = {r["system"] for r in res.rows}
    assert systems == {"baseline", "forkkv"}
    assert all(r["new_tokens"] == 3 for r in res.rows)
    assert all(r["cache_gib"] > 0 and r["decode_tok_s"] > 0 for r in res.rows)
    for r in res.rows:  # the times of each new token's mark since the call's start
        assert 0 < r["ttft_s"] < r["total_s"] and r["decode_s"] == pytest.approx(r["total_s"] - r["ttft_s"]), r
        assert 0 < r["step_ms_median"] <= 1e3 * r["decode_s"], r
    assert set(res.extra["capacity"]) == {"baseline", "forkkv"}
    (prof,) = res.extra["profile"]
    assert "error" not in prof, prof
    assert prof["step_wall_s"] > 0 and prof["top_cpu_ops"]


@pytest.mark.slow
@pytest.mark.eval_harness
def test_bench_e2e_tiny_split_over_devices(tmp_path):
    """The device-map variant (layers split with accelerate; here over two "cpu" devices, hooks forced)."""
    res = _run("eval.bench.e2e", "--tiny", "--devices", "cpu", "cpu", "--contexts", "40", "--agents", "2",
               "--forkkv-agents", "2", "--new-tokens", "3", "--adapters", "2", "--no-profile", "--no-capacity",
               tmp_path=tmp_path)
    model = res.params["model"]
    assert model["devices"] == ["cpu", "cpu"] and model["device_map"]["model.layers.1"] == "cpu"
    assert {r["system"] for r in res.rows} == {"baseline", "forkkv"}
    assert all(r["new_tokens"] == 3 and not r.get("oom") for r in res.rows)


def test_bench_decode_refuses_lengths_of_two_capacities(capsys):
    """The decode benchmark's two ``generate`` lengths must give one private capacity (the 64-token prompt plus n in
    one multiple of 64): otherwise its compiled steps change shapes and buffers between the timed calls (v37 at 8 / 104
    tokens: CUDA graphs recorded inside the timing). Refused before anything is built; fine with compile off."""
    from eval.bench import decode

    with pytest.raises(SystemExit):
        decode.main(["--tiny", "--tokens", "8", "104"])
    assert "different private capacities" in capsys.readouterr().err
    assert len({-(-(decode.PROMPT + n) // 64) for n in (8, 40)}) == 1  # the default lengths: one capacity


def test_bench_decode_k_pass_triton_keeps_the_rule_off_the_gluon_k_pass(monkeypatch, capsys):
    """``--k-pass triton``: every K+V decode call takes the Triton K pass under its rule (fp16 rebuild kept), where the
    launch rule would take the Gluon one (128 agents): the baseline the Gluon pass is measured against end to end."""
    import forkkv_kernels.rules as rules
    from eval.bench import decode

    monkeypatch.setattr(rules, "GLUON_K_FROM", rules.GLUON_K_FROM)  # restored after the test
    assert rules.launch_defaults(128, 1, 4, True, True, torch.bfloat16)["res_form"] == "gluon"
    with pytest.raises(SystemExit):  # patched before the lengths' check stops the run
        decode.main(["--tiny", "--k-pass", "triton", "--tokens", "8", "104"])
    rule = rules.launch_defaults(128, 1, 4, True, True, torch.bfloat16)
    assert {k: rule[k] for k in rules.TRITON_K_RULE} == rules.TRITON_K_RULE and rule["res_f16"] is True, rule


def test_bench_decode_k_pass_runtime_zeros_starts_the_gluon_k_pass_from_runtime_zeros(monkeypatch):
    """``--k-pass runtime-zeros``: the rule's K pass, its Gluon launches with ``res_runtime_zeros=True`` (v38's form),
    whatever the caller passes: the end-to-end baseline of v39's plain zero accumulators."""
    import forkkv_kernels.kres_gluon as kres_gluon
    from eval.bench import decode

    calls = []
    monkeypatch.setattr(kres_gluon, "launch_kres_scores_gluon", lambda *a, **kw: calls.append(kw))
    with pytest.raises(SystemExit):  # patched before the lengths' check stops the run
        decode.main(["--tiny", "--k-pass", "runtime-zeros", "--tokens", "8", "104"])
    kres_gluon.launch_kres_scores_gluon(1, res_runtime_zeros=False, res_f16=True)
    assert calls == [{"res_runtime_zeros": True, "res_f16": True}], calls


@pytest.mark.slow
@pytest.mark.eval_harness
def test_bench_decode_tiny(tmp_path):
    """Issue 18's decode-step benchmark: ForkKV compiled (eager backend on CPU) and not, with its own residuals and
    with fitted ones (K and V at their own ranks), the transformers-alone anchors; every row measured, the compiled
    rows compare their tokens with an eager generate's, and their timed (warm) calls compile nothing."""
    res = _run("eval.bench.decode", "--tiny", "--agents", "2", "--context", "40", "--tokens", "2", "4", "--reps", "2",
               "--fit-ranks", "0", "2:4", tmp_path=tmp_path)
    assert res.benchmark == "bench_decode" and res.case_keys == ["system", "context", "agents", "compile"]
    assert "partial" not in res.extra  # every case's row replaced its timed phase's partial record
    cases = [tuple(r[k] for k in res.case_keys) for r in res.rows]
    fitted = "forkkv, fitted ranks 2/4"
    assert cases == [("transformers, DynamicCache eager", 40, 1, False), ("transformers, StaticCache + compile", 40, 1,
                     True), ("forkkv", 40, 2, True), (fitted, 40, 2, True), ("forkkv", 40, 2, False),
                     (fitted, 40, 2, False)]
    for r in res.rows:  # (a step's sign is timing noise at toy sizes on a shared CPU: not checked)
        assert "error" not in r and isinstance(r["step_ms"], float) and r["first_call_s"] > 0, r
        assert "gpu_busy_ms" in r and "gpu_ms_by_family" in r and "profile_error" not in r, r
        assert len(r["generate_each_s"]["n1"]) == len(r["generate_each_s"]["n2"]) == 2, r
        assert r["generate_s"][1] == pytest.approx(sum(r["generate_each_s"]["n2"]) / 2, abs=1e-3), r  # median of 2
        each = [1e3 * (b - a) / 2 for a, b in zip(r["generate_each_s"]["n1"], r["generate_each_s"]["n2"])]
        assert r["step_ms_each"] == pytest.approx(each, abs=0.2) and len(each) == 2, r  # each rep's own n1 / n2 pair
        marked = r["step_ms_marked_each"]  # every timed call's decode steps between its marks
        assert len(marked["n1"]) == len(marked["n2"]) == 2 and all(m > 0 for m in marked["n1"] + marked["n2"]), r
        assert r["step_ms_marked"] == pytest.approx(sum(marked["n2"]) / 2, abs=1e-3), r
    for r in res.rows[2:4]:
        assert r["first_divergence_vs_eager"] == [4, 4], r  # every new token the same as eager
        assert r["events_while_timed"] == {}, r  # warm calls: no recompile, no new graph
        assert r["events_each_call"] == {"n1": [{}, {}], "n2": [{}, {}]} and r["triton_compiled_while_timed"] == []
        assert all(len(c) == 2 and c[0] >= 0 for calls in r["full_gc_each_call"].values() for c in calls), r
    compiled, eager = res.rows[2]["first_call_compile"], res.rows[4]["first_call_compile"]
    assert any("compile_inner" in k and v > 0 for k, v in compiled["seconds"].items()), compiled
    assert compiled["counts"]["stats.unique_graphs"] >= 1 and eager["seconds"] == {} and eager["counts"] == {}


@pytest.mark.slow
@pytest.mark.eval_harness
def test_bench_tp_tiny_one_process(tmp_path):
    """The tensor-parallel benchmark's one-process run (what torchrun runs on every rank) from a written checkpoint."""
    ck = tmp_path / "ck"
    subprocess.run([sys.executable, "-m", "eval.bench.tp", "--make-checkpoint", str(ck), "--tiny", "--layers", "2"],
                   cwd=ROOT, check=True, capture_output=True, timeout=600)
    res = _run("eval.bench.tp", "--checkpoint", str(ck), "--tiny", "--layers", "2", "--context", "40", "--agents", "2",
               "--forkkv-agents", "2", "--new-tokens", "3", tmp_path=tmp_path)
    assert res.params["world_size"] == 1 and res.params["mode"] == "one GPU"
    assert [(r["system"], r["agents"]) for r in res.rows] == [("baseline", 2), ("forkkv", 2)]
    assert all(len(r["cache_gib_per_rank"]) == 1 and r["cache_gib_per_rank"][0] > 0 for r in res.rows)


# --- the runner and the schema, without a model ---------------------------------------------------------------------
def _measured(calls, value):
    def fn():
        calls.append(value)
        return {"t_s": value}

    return fn


@pytest.mark.version_independent
def test_runner_saves_every_row_and_resumes_finished_cases(tmp_path):
    out = tmp_path / "r.json"
    run = BenchmarkRun("bench_x", {"tokens": 3}, ["n"], out=out)
    calls = []
    run.measure({"n": 1}, _measured(calls, 0.5))
    assert load(out).rows == [{"n": 1, "t_s": 0.5}]  # saved after the row, before finish
    again = BenchmarkRun("bench_x", {"tokens": 3}, ["n"], out=out, resume=out)
    assert again.measure({"n": 1}, _measured(calls, 9.0)) == {"n": 1, "t_s": 0.5}
    again.measure({"n": 2}, _measured(calls, 0.7))
    assert calls == [0.5, 0.7]
    for params in ({"tokens": 4}, {"tokens": 3, "k_pass": "triton"}):  # any parameter differing: nothing resumed
        other = BenchmarkRun("bench_x", params, ["n"], out=tmp_path / "o.json", resume=out)
        assert other.rows == []


@pytest.mark.version_independent
def test_runner_keeps_a_cases_partial_measurements_until_its_row(tmp_path):
    """``partial``: what a case measured so far is in the file (``extra["partial"]``, one entry per case, replaced by a
    later call) before the case's row exists; the row drops it, other cases' entries stay."""
    out = tmp_path / "r.json"
    run = BenchmarkRun("bench_x", {}, ["n"], out=out)
    run.partial({"n": 1}, {"t_s": 0.1})
    run.partial({"n": 1}, {"t_s": 0.2})
    run.partial({"n": 2}, {"t_s": 0.3})
    assert load(out).extra["partial"] == [{"n": 1, "t_s": 0.2}, {"n": 2, "t_s": 0.3}] and load(out).rows == []
    run.measure({"n": 1}, lambda: {"t_s": 0.2, "profile": 1})
    assert load(out).extra["partial"] == [{"n": 2, "t_s": 0.3}]
    run.measure({"n": 2}, lambda: {"t_s": 0.3})
    assert "partial" not in load(out).extra and [r["n"] for r in load(out).rows] == [1, 2]


def test_bench_decode_cut_in_its_profile_keeps_the_timed_phase(tmp_path, monkeypatch):
    """A decode case cut after its timed calls (here: the profiler stopping the process, as a call's time limit does
    in v38) leaves the timed phase's measurements in the result file, not only in the log."""
    from eval.bench import decode, decode_timing

    def cut(run, n):
        raise SystemExit("cut")

    monkeypatch.setattr(decode_timing, "_gpu_seconds", cut)
    out = tmp_path / "d.json"
    with pytest.raises(SystemExit, match="cut"):
        decode.main(["--tiny", "--agents", "2", "--context", "40", "--tokens", "2", "4", "--reps", "1",
                     "--compile", "off", "--no-anchors", "--out", str(out)])
    res = load(out)
    (part,) = res.extra["partial"]
    assert res.rows == [] and (part["system"], part["agents"], part["compile"]) == ("forkkv", 2, False)
    assert isinstance(part["step_ms"], float) and len(part["step_ms_each"]) == 1 and "gpu_busy_ms" not in part


@pytest.mark.version_independent
def test_a_case_out_of_memory_keeps_what_the_allocator_said(monkeypatch):
    """A benchmark case that runs out of GPU memory is a row saying so, with the allocator's own account (allocated
    against reserved-but-unallocated), not a bare flag: v41's baseline at 5 agents failed under a 60 GiB budget with a
    predicted peak of 46.7 GiB, and nothing recorded why."""
    from eval.bench import decode, e2e

    msg = "CUDA out of memory. Tried to allocate 2.00 GiB.\n  Of the allocated memory 44.1 GiB is allocated by PyTorch"

    def boom(*a, **k):
        raise torch.cuda.OutOfMemoryError(msg)

    monkeypatch.setattr(e2e, "run_one", boom)
    rec = e2e.measure_case(torch.nn.Module(), "baseline", None, [], [], 1)
    assert rec["oom"] is True and rec["message"] == " ".join(msg.split())
    assert decode._guarded(boom) == rec
    assert decode._guarded(lambda: 1 / 0) == {"error": "ZeroDivisionError('division by zero')"}


@pytest.mark.version_independent
def test_the_capacity_search_runs_no_case_after_an_out_of_memory_one():
    """Near the largest measured N the capacity search goes up one N at a time and stops at the first that does not
    fit (a case after an OOM may inherit its allocator's fragments); far from it (a fit that predicts hundreds more)
    it runs the fit's N first, and flags a lower N measured after an OOM."""
    from types import SimpleNamespace

    from eval.bench import e2e

    def search(system, rows, fits_up_to, n_max=256):
        run = SimpleNamespace(rows=[dict(system=system, context=64, agents=n, peak_gib=p) for n, p in rows],
                              extra={"capacity": {}}, save=lambda: None)
        ran = []

        def measure(system, T, n):
            ran.append(n)
            return {"oom": True} if n > fits_up_to else {"peak_gib": 1.0}

        e2e._capacity(run, measure, system, 64, [n for n, _ in rows], 60.0, n_max)
        return ran, run.extra["capacity"][system]

    ran, cap = search("baseline", [(1, 26.5), (4, 41.6)], fits_up_to=5)  # the fit: 7
    assert ran == [5, 6] and cap["max_agents_run"] == 5 and cap["first_oom_agents"] == 6 and "after_oom" not in cap
    ran, cap = search("baseline", [(1, 26.5), (4, 41.6)], fits_up_to=9)
    assert ran == [5, 6, 7] and cap["max_agents_run"] == 7 and "first_oom_agents" not in cap
    ran, cap = search("forkkv", [(32, 29.6), (128, 37.7)], fits_up_to=256)  # the fit: 370, 256 adapters
    assert ran == [256] and cap["max_agents_run"] == 256 and cap["limited_by_adapters_built"] == 256
    ran, cap = search("forkkv", [(32, 29.6), (128, 37.7)], fits_up_to=200)
    assert ran == [256, 230, 207, 186] and cap["max_agents_run"] == 186 and cap["after_oom"] is True
    ran, cap = search("forkkv", [(32, 29.6), (128, 37.7)], fits_up_to=240)
    assert ran == [256, 230] and cap["max_agents_run"] == 230 and cap["after_oom"] is True


@pytest.mark.version_independent
def test_a_case_out_of_memory_frees_its_tensors_before_emptying_the_allocator(monkeypatch):
    """The OOM row's ``free_memory`` (garbage collection, ``empty_cache``) runs once the failed call's tensors are
    gone: inside the ``except`` block its exception still held the call's frames and every tensor in them, so the
    allocator kept their blocks (a failed ``generate``'s cache: DynamicCache, probed on a tiny model)."""
    import weakref

    from eval.bench import decode, e2e

    refs, alive_at_free = [], []

    def boom(*a, **k):
        cache = torch.empty(64)  # what the failed call had allocated
        refs.append(weakref.ref(cache))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    def free_memory():
        alive_at_free.append(refs[-1]() is not None)

    monkeypatch.setattr(e2e, "run_one", boom)
    for module in (e2e, decode):
        monkeypatch.setattr(module, "free_memory", free_memory)
    assert e2e.measure_case(torch.nn.Module(), "baseline", None, [], [], 1)["oom"] is True
    assert decode._guarded(boom)["oom"] is True
    assert alive_at_free == [False, False]


def test_runner_starts_no_case_after_the_time_limit(tmp_path):
    run = BenchmarkRun("bench_x", {}, ["n"], out=tmp_path / "r.json", time_limit=0.0)
    calls = []
    assert run.measure({"n": 1}, _measured(calls, 1.0)) == {"skipped": True}
    assert calls == [] and run.rows == []


@pytest.mark.version_independent
def test_schema_refuses_legacy_and_rows_without_their_case(tmp_path):
    with pytest.raises(ValueError, match="python -m eval.bench.upgrade_results"):
        BenchResult.from_dict({"benchmark": "bench_e2e", "rows": []})
    good = BenchResult("bench_x", {}, {}, ["n"], [{"n": 1}]).to_dict()
    assert BenchResult.from_dict(good).rows == [{"n": 1}]
    with pytest.raises(ValueError, match=r"lacks its case keys \['n'\]"):
        BenchResult.from_dict({**good, "rows": [{"t_s": 1.0}]})
    with pytest.raises(ValueError, match="unknown \\['capacity'\\]"):
        BenchResult.from_dict({**good, "capacity": {}})


@pytest.mark.version_independent
def test_upgrade_keeps_every_value(tmp_path):
    legacy = {"benchmark": "bench_e2e", "time": "t", "device": {"gpu": "G"}, "model": {"layers": 2},
              "prompt_tokens": 64, "new_tokens": 3, "budget_gib": 60.0, "baseline_prefill_chunk": 4096,
              "rows": [{"system": "forkkv", "context": 48, "agents": 2, "ttft_s": 0.1234567890123}],
              "capacity": {"forkkv": {"max_agents_run": 7}}, "profile": None, "note": "by hand"}
    path = tmp_path / "bench_e2e_g.json"
    path.write_text(json.dumps(legacy))
    assert upgrade(path) == [path] and upgrade(path) == []  # converted once; a schema file is left alone
    res = load(path)
    assert res.rows == legacy["rows"] and res.device == legacy["device"] and res.note == "by hand"
    assert res.params == {k: legacy[k] for k in ("model", "prompt_tokens", "new_tokens", "budget_gib",
                                                 "baseline_prefill_chunk")}
    assert res.extra == {"capacity": legacy["capacity"], "profile": None}
    path.write_text(json.dumps({**legacy, "surprise": 1}))
    with pytest.raises(ValueError, match="'surprise'"):
        upgrade(path)


@pytest.mark.version_independent
def test_committed_results_load_and_plot(tmp_path):
    from eval.plots import plot_all

    results = ROOT / "eval" / "results"
    for path in results.glob("bench_*.json"):
        assert json.loads(path.read_text())["schema"] == SCHEMA, path
    copy = tmp_path / "results"
    copy.mkdir()
    for path in [*results.glob("bench_*.json"), *results.glob("quality*.json"), *results.glob("profile_kernel*.json"),
                 *results.glob("kpass_ablate*.json")]:
        shutil.copy(path, copy)
    made = {p.name for p in plot_all(copy)}
    # every committed plot of these families is what plot_all draws from the committed JSON, and nothing it draws is
    # missing from the commit (the reruns of a few cases, README tables, are not drawn)
    committed = {p.name for pattern in ("bench_*.png", "quality*.png", "profile_kernel*.png", "kpass_ablate*.png")
                 for p in results.glob(pattern)}
    assert made == committed
    assert {"bench_kernel_nvidia_h200.png", "bench_e2e_nvidia_h200.png", "quality.png",
            "profile_kernel_v11f_nvidia_h200.png", "bench_decode_nvidia_h200_gc.png",
            "kpass_ablate_nvidia_h100.png"} <= made


# --- the package layout ---------------------------------------------------------------------------------------------
ENTRY_POINTS = ["eval.quality", "eval.train_adapters", "eval.plots", "eval.bench.e2e", "eval.bench.decode",
                "eval.bench.lora", "eval.bench.tp", "eval.bench.kernel", "eval.bench.sweep_kernel",
                "eval.bench.profile_kernel", "eval.bench.kpass_ablate", "eval.bench.upgrade_results", "examples.demo",
                "examples.agent_workflow", "examples.train_agent"]


@pytest.mark.slow
@pytest.mark.eval_harness
def test_entry_points_start():
    """``python -m <module> --help`` of every entry point, in one process (each import costs seconds)."""
    code = ("import runpy, sys\n"
            "for m in sys.argv[1:]:\n"
            "    sys.argv = [m, '--help']\n"
            "    try:\n"
            "        runpy.run_module(m, run_name='__main__', alter_sys=True)\n"
            "    except SystemExit as e:\n"
            "        assert e.code in (0, None), (m, e.code)\n"
            "    print('STARTED', m, flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", code, *ENTRY_POINTS], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert re.findall(r"^STARTED (\S+)$", proc.stdout, re.M) == ENTRY_POINTS
    dev = subprocess.run([sys.executable, "-m", "eval.device"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert json.loads(dev.stdout)["torch"]


@pytest.mark.version_independent
def test_kpass_ablate_replica_is_the_library_pass():
    """`eval.bench.kpass_ablate` times a replica of the K pass with parts left out: every part in, it computes the
    library pass's scores (fp16 form, as on the GPU), also with the library's masks and gathers added back; the
    rotation's switch changes them. Within one fp16 ulp: the interpreter's matmuls round as the host's BLAS does, and on
    one machine (2026-12-08) one score of 16,384 differed by one ulp where another machine's matched bit for bit."""
    import torch

    from eval.bench import kpass_ablate as K
    from forkkv_kernels.attention_common import split_length

    q, u, B, cos, sin = K.make_inputs(2, 256, device="cpu")
    scale = K.D**-0.5
    run, want, knobs = K.library_pass(q, u, B, cos, sin, scale, sms=1, interp=True)
    run()
    split_len = split_length(256, K.BLOCK_T, 2, knobs["res_programs_per_sm"], None, True)
    assert knobs["res_f16"] and split_len == K.BLOCK_T  # two splits of one tile per agent
    q16, B16, scale16 = K.f16_inputs(q, B, scale)
    assert want.abs().max() > 0.1
    for variant in ("all", "all_masked", "all_gather"):  # every part in, with and without the library's generality
        got = torch.zeros_like(want)
        K.replica(q16, u, B16, cos, sin, scale16, split_len, got, variant)
        ulp = torch.finfo(torch.float16).eps * want.float().abs().clamp_min(2**-14)
        assert bool(((got.float() - want.float()).abs() <= ulp).all()), variant
    other = torch.zeros_like(want)
    K.replica(q16, u, B16, cos, sin, scale16, split_len, other, "no_rot")
    assert (other.float() - want.float()).abs().max() > 0.1


@pytest.mark.version_independent
def test_kernel_bench_helpers_on_cpu():
    """What of the kernel benchmarks runs without a GPU: the sweep's grid (spilling configurations left out), the knobs
    a sweep result hands the benchmark (nearest swept agent count), and the floors (more residuals, more work)."""
    from eval.bench.kernel import floors, swept_knobs
    from eval.bench.sweep_kernel import configs

    grid = configs("shared")
    assert len(grid) == 12 and not any(c["block_m"] == 128 and c["num_warps"] == 4 for c in grid)
    assert configs("shared", only={"num_warps": 8}) == [c for c in grid if c["num_warps"] == 8]
    best = {"shared/kv/32768:8": {"config": {"block_t": 32, "block_m": None}},
            "shared/kv/32768:32": {"config": {"block_t": 64, "block_m": 128}},
            "kres/kv/32768:32": {"config": {"res_heads": 2}}}
    assert swept_knobs(best, "kv", 30) == {"block_t": 64, "block_m": 128, "res_heads": 2}
    assert swept_knobs(best, "kv", 9) == {"block_t": 32, "res_heads": 2}
    assert swept_knobs(best, "v", 30) == {} and swept_knobs({}, "kv", 30) == {}
    f = floors(32768, 32, {"hbm_bytes_per_s": 4e12, "bf16_flops_per_s": 7e14})
    assert f["floor_base_s"] < f["floor_v_s"] < f["floor_s"] and f["bytes_base"] < f["bytes_v"] < f["bytes"]
    f4 = floors(32768, 32, {"hbm_bytes_per_s": 4e12, "bf16_flops_per_s": 7e14}, queries=4)
    assert f4["flops_base"] == 4 * f["flops_base"] and f["flops"] < f4["flops"] < 4 * f["flops"]  # one K rebuild


def test_triton_compile_watch_counts_and_chains(monkeypatch):
    """The decode benchmark's Triton JIT watch: each compile the hook sees is one more ``triton.jit_compiles`` in the
    counters, named in TRITON_COMPILES, and a hook set before it still runs (installed once however often asked)."""
    from types import SimpleNamespace

    from triton import knobs

    from eval.bench import measure

    seen = []
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", lambda **kw: seen.append(kw["repr"]))
    monkeypatch.setattr(measure, "TRITON_COMPILES", [])
    assert measure.watch_triton_compiles() and measure.watch_triton_compiles()
    before = measure.compile_counters()
    knobs.runtime.jit_post_compile_hook(key="k", repr="_kernel[num_warps=4](x: *bf16)",
                                        fn=SimpleNamespace(name="_kernel"), compile={}, is_manual_warmup=False,
                                        already_compiled=False)
    assert measure.counters_since(before) == {"triton.jit_compiles": 1}
    assert measure.TRITON_COMPILES == ["_kernel: _kernel[num_warps=4](x: *bf16)"] and len(seen) == 1


def test_full_collections_counts_only_generation_two():
    """The decode benchmark's GC watch: a full collection inside it counts with its time, a young one does not, and
    it leaves gc.callbacks as it found them."""
    import gc

    from eval.bench.measure import FullCollections

    callbacks = list(gc.callbacks)
    with FullCollections() as young:
        gc.collect(0)
    with FullCollections() as full:
        gc.collect()
    assert (young.collections, young.seconds) == (0, 0.0) and full.collections == 1 and full.seconds > 0
    assert gc.callbacks == callbacks


def test_step_marks_time_the_decode_steps_of_a_generate_call():
    """The decode benchmark's step marks: one mark per new token of a ``generate`` call (a logits processor), the
    time per step between the first and the last mark, cleared by reading; host time off CUDA (here: a step that
    sleeps 20 ms measures at least that)."""
    import time

    from models import tiny_llama
    from transformers import LogitsProcessorList

    from eval.bench.measure import StepMarks

    model, marks = tiny_llama(), StepMarks()
    slow = lambda input_ids, scores: time.sleep(0.02) or scores  # noqa: E731
    ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                   pad_token_id=0, logits_processor=LogitsProcessorList([marks, slow]))
    assert len(marks.marks) == 6
    step = marks.step_seconds()
    assert 0.02 <= step < 1.0 and marks.marks == [] and marks.step_seconds() is None, step
    marks.begin()  # each token's time since the start: the first after the prefill and its own 20 ms step
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, min_new_tokens=3, do_sample=False,
                   pad_token_id=0, logits_processor=LogitsProcessorList([marks, slow]))
    times = marks.elapsed()
    assert len(times) == 3 and 0 < times[0] and all(b - a >= 0.02 for a, b in zip(times, times[1:])), times
    with pytest.raises(ValueError, match="different clocks"):  # a CUDA start and host-clock tokens: refused
        StepMarks._seconds(object(), 1.0)


def test_decode_plot_splits_the_profiled_step_by_kernel():
    """The decode plot's step breakdown: the ForkKV attention split into the K pass, the shared part and the merge by
    kernel name, the other families beside them; the bars add up to the step's GPU-busy time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eval.plots import _step_breakdown

    row = {"gpu_ms_by_family": {"forkkv attention kernels": 9.0, "GEMM": 2.0, "batched LoRA kernels": 0.5,
                                "elementwise/other": 0.0},
           "kernels_per_step_by_name": {"_kres_scores_gluon": {"us": 5000.0}, "_cascade_shared_gluon": {"us": 3000.0},
                                        "_private_merge_kernel": {"us": 500.0}, "nvjet_x": {"us": 2000.0}},
           "gpu_busy_ms": 11.5, "step_ms": 12.0}
    fig, ax = plt.subplots()
    _step_breakdown(ax, row)
    bars = {c.get_label(): c.patches[0].get_width() for c in ax.containers}
    plt.close(fig)
    assert bars == {"K pass: 5.0": 5.0, "shared part: 3.0": 3.0, "private part + merge: 0.5": 0.5,
                    "other ForkKV attention: 0.5": 0.5, "GEMM: 2.0": 2.0, "batched LoRA kernels: 0.5": 0.5}, bars
    assert sum(bars.values()) == pytest.approx(row["gpu_busy_ms"])


@pytest.mark.gpu
def test_step_marks_on_the_gpu_wait_for_nothing():
    """On CUDA a mark is an event on the logits' stream: marking returns while the GPU is still busy (~100 M cycles of
    ``torch.cuda._sleep``, tens of ms), and the marks' difference is the GPU's time between them."""
    import time

    from eval.bench.measure import StepMarks

    if not torch.cuda.is_available():
        pytest.skip("CUDA only")
    x, marks = torch.zeros(4, device="cuda"), StepMarks()
    marks.begin(x.device)
    marks(None, x)
    torch.cuda._sleep(100_000_000)
    t = time.perf_counter()
    marks(None, x)
    host = time.perf_counter() - t
    busy = not torch.cuda.current_stream().query()
    times = marks.elapsed()
    assert busy and host < 0.005 and times[1] - times[0] > 0.02, (host, times)


@pytest.mark.version_independent
@parametrize("queries", [1, 3])
def test_kernel_bench_sdpa_row_is_the_exact_attention(queries):
    """The benchmark's SDPA row over materialised per-agent K/V (decode and extend calls: the new tokens are the
    last private ones, causal among themselves) computes the attention the kernels compute."""
    import eval.bench.kernel as kb
    from forkkv_hf import reference_attention

    q, view = kb.make_case(40, 3, dtype=torch.float32, device="cpu", queries=queries)
    K, V = kb.materialise(view)
    out = kb.materialised_attention(q, K, V, kb.D**-0.5).transpose(1, 2)
    ref = reference_attention(q, view, None, kb.D**-0.5)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.version_independent
def test_no_sys_path_edits_and_eval_never_imports_examples():
    files = [*(ROOT / "eval").rglob("*.py"), *(ROOT / "examples").rglob("*.py"), ROOT / "tests" / "tp_worker.py"]
    edits = [str(f.relative_to(ROOT)) for f in files if "sys.path" in f.read_text()]
    assert edits == []
    back = [str(f.relative_to(ROOT)) for f in (ROOT / "eval").rglob("*.py")
            if re.search(r"^\s*(from|import)\s+examples\b", f.read_text(), re.M)]
    assert back == []


@pytest.mark.slow
@pytest.mark.eval_harness
def test_offline_sm90_compile_of_the_k_pass(tmp_path):
    """`eval.bench.offline_kernel` compiles the K pass for sm_90 here, without a GPU (Triton's compiler and the ptxas
    it ships, with the GPU launch's 16-divisible arguments): the GPU's default rule (at 32 agents the fp16 form, v15)
    stays within the 128-register cap
    at 2+ programs per SM and spills at most 32 bytes, none in the hot loop (v11c's rule, the joined form on 128-token
    tiles of 8 warps: 32 with this machine's Triton 3.9, outside the loop: eval/KERNEL_NOTES.md "v11c"), the v9 CUDA-core score
    candidate (64-token tile, 8 warps) does not spill, and the fma form has no score MMA (only the rebuild's); the hot
    loop's SASS counts and ptxas's serialisation reports are read (the joined form: fewer MMA waits, none
    serialised); the shared kernel at V rank 64 likewise, and each variant's shared kernel under the rule at 128
    agents. A kernel change that makes them spill more fails here before any GPU run."""
    pytest.importorskip("triton.backends.nvidia")
    out = tmp_path / "offline.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    halves = {"res_block_t": 128, "res_warps": 8, "res_stages": 2, "res_pack": 1, "res_form": "halves"}
    configs = json.dumps([{}, {"res_score": "fma", "res_block_t": 64, "res_warps": 8, "res_stages": 2}, halves,
                          {**halves, "res_form": "joined"}, {"res_satfinite": False}, {"res_f16": False}])
    proc = subprocess.run([sys.executable, "-m", "eval.bench.offline_kernel", "--configs", configs, "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    default, fma, halves, joined, clamp, plain = json.loads(out.read_text())["rows"]
    # the rule at 32 agents is the fp16 form (v15): no fp32 -> bf16 conversion before the rotation, fewer instructions
    assert default["loop_rotation"] <= plain["loop_rotation"] - 24, (default, plain)
    assert default["loop_instructions"] < plain["loop_instructions"] and default["spill_bytes"] == 0, (default, plain)
    # the rule's saturating conversion replaces the fp16 scores' clamp (2 FMNMX per score) by 1 conversion per 2
    assert default["loop_instructions"] <= clamp["loop_instructions"] - 12, (default, clamp)
    for row, spill in ((default, 32), (fma, 0)):
        assert row["spill_bytes"] <= spill and row["regs"] <= 128 and row["programs_per_sm"] >= 2, row
        assert row["loop_local"] == 0, row
    assert 0 < fma["wgmma"] < default["wgmma"]
    # the hot loop's statistics: the joined form waits for its MMAs fewer times per (tile, head) step than the halves
    # form (one rebuild and one score MMA group against two of each) and ptxas does not serialise its MMAs
    assert 0 < joined["loop_mma_waits"] < halves["loop_mma_waits"] and joined["mma_serialised"] == []
    assert halves["loop_instructions"] > 100 and halves["loop_rotation"] > 0 and halves["loop_local"] == 0
    # the shared kernel at V rank 64 (fitted residuals): its P·u_v accumulator grows with BLOCK_M, and so do its spills
    proc = subprocess.run([sys.executable, "-m", "eval.bench.offline_kernel", "--shared-ranks", "64", "--out",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {(r["block_m"], r["stages"]): r for r in json.loads(out.read_text())["rows"]}
    assert len(rows) == 9 and rows[(64, 1)]["acc_uv_values"] == 4 * rows[(16, 1)]["acc_uv_values"] == 16384
    assert rows[(16, 1)]["spill_bytes"] * 4 < rows[(64, 1)]["spill_bytes"], rows
    # the shared kernel of each variant under the rule at 128 agents: one context loop (v20's whole-tile loop beside
    # a masked one was measured and removed), two programs per SM, the K+V kernel's loop without spills, and a select
    # and an exponential per score (64 x 64 tile: 32 per thread)
    proc = subprocess.run([sys.executable, "-m", "eval.bench.offline_kernel", "--shared-variants", "128", "--out",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"base", "v", "kv"}
    for variant, row in rows.items():
        assert len(row["loops"]) == 1 and row["programs_per_sm"] == 2, (variant, row)
    base, kv = rows["base"]["loops"][0], rows["kv"]["loops"][0]
    assert base["loop_fsel"] >= 32 and base["loop_ex2"] >= 32 and base["loop_hgmma"] > 0, base
    assert kv["loop_local"] == 0, kv


@pytest.mark.version_independent
def test_command_lines_refuse_bad_values_before_loading_anything(capsys):
    """A scenario name outside the three (before, dropped silently; all of them unknown: a ZeroDivisionError after
    the model loaded) and counts below 1 (before, tracebacks from torch, PEFT or transformers) are usage errors."""
    from eval.quality.__main__ import main as quality
    from examples.agent_workflow import main as workflow

    for run, argv in ((quality, ["--scenarios", "hamlet_act", "hamlet"]), (quality, ["--threads", "0"]),
                      (quality, ["--prompts-per-agent", "0"]), (workflow, ["--turns", "0"]),
                      (workflow, ["--rank", "0"]), (workflow, ["--max-new-tokens", "-1"])):
        with pytest.raises(SystemExit):
            run(argv)
    assert "invalid choice: 'hamlet'" in capsys.readouterr().err


@pytest.mark.version_independent
def test_kernel_fuzz_small_on_the_interpreter(tmp_path):
    """``python -m eval.bench.fuzz_kernels --small``: random shapes through the cascade kernels against its own fp32
    reference, every case passing (the GPU run is the script's purpose; this keeps the script itself right)."""
    import json

    from eval.bench.fuzz_kernels import main

    out = tmp_path / "fuzz.json"
    main(["--small", "--cases", "4", "--seconds", "300", "--seed", "3", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["counts"]["failed"] == 0 and result["counts"]["passed"] + result["counts"]["refused"] == 4
    assert result["counts"]["passed"] >= 1


@pytest.mark.version_independent
def test_lora_offsets_benchmark_compares_two_kernels_that_agree(tmp_path):
    """``python -m eval.bench.lora_offsets --small``: the batched LoRA kernel and its int32-offset variant (the int64
    casts removed from the same source) give the same output on the interpreter; the GPU run times them."""
    import json

    from eval.bench.lora_offsets import main

    out = tmp_path / "lo.json"
    main(["--small", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 and all(r["equal"] for r in rows)


@pytest.mark.version_independent
def test_fit_plot_refuses_two_baselines_for_one_agent(tmp_path):
    """A --baseline glob matching two seeds' probe files kept the last one per agent, and the check that then failed
    named the steps; two baselines for one agent are refused by name."""
    import json

    from eval.fidelity.fit_plot import baselines

    probe = {"params": {"steps": 93}, "agents": {"speaker": {
        "variants": {"std_init": {"exact": {"per_question": [1.0, 0.0]}}},
        "reference": {"standard@exact": {"per_question": [1.0, 1.0]}}}}}
    files = []
    for seed in (0, 1):
        files.append(tmp_path / f"probe{seed}.json")
        files[-1].write_text(json.dumps(probe))
    assert baselines(files[:1])["speaker"][2] == 93
    with pytest.raises(SystemExit, match="two --baseline files have a std_init baseline for 'speaker'"):
        baselines(files)


@pytest.mark.version_independent
def test_fidelity_cli_says_what_is_wrong_with_its_arguments(tmp_path, capsys):
    """Unknown training kinds and missing result files ended in tracebacks; counts below 1 were taken as "all"."""
    from eval.fidelity.__main__ import main

    for argv, said in ((["run", "--kinds", "bogus"], "invalid choice: 'bogus'"),
                       (["report", str(tmp_path / "none.json")], "no such result file"),
                       (["merge", str(tmp_path / "out.json"), str(tmp_path / "none.json")], "no such result file"),
                       (["data", "--eval-contexts=-1"], "must be at least 1, got -1")):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2 and said in capsys.readouterr().err


@pytest.mark.version_independent
def test_result_tools_name_a_missing_file(tmp_path, capsys):
    """The result tools ended in tracebacks on a file that is not there (upgrade_results, fit_plot, forest_plot,
    rank_plot), and ``eval.plots`` said nothing for a folder without result files or one that is not there."""
    from eval.bench.upgrade_results import main as upgrade
    from eval.fidelity.fit_plot import main as fit_plot
    from eval.fidelity.forest_plot import main as forest_plot
    from eval.fidelity.rank_plot import main as rank_plot
    from eval.plots import main as plots

    none, png = str(tmp_path / "none.json"), str(tmp_path / "x.png")
    for run, argv in ((upgrade, [none]), (fit_plot, [none, "--out", png]), (forest_plot, ["--spec", none]),
                      (forest_plot, ["--series", "s", f"a={none}", "--out", png]),
                      (rank_plot, ["--series", "a", f"16:{none}", "--out", png]),
                      (plots, ["--results", str(tmp_path / "none")])):
        with pytest.raises(SystemExit) as stop:
            run(argv)
        said = f"{stop.value.code} {capsys.readouterr().err}"
        assert "no such f" in said, (run, said)
    plots(["--results", str(tmp_path)])
    assert "no result file under" in capsys.readouterr().out


@pytest.mark.version_independent
def test_speaker_answers_are_scored_by_the_name_given():
    """A speaker label of two words never matched ("First Clown." against "First Clown"), and any word starting with
    an abbreviation's stem did ("Ber." in "Berkeley"; an audit's finding): the answer's first name is scored, the
    play's abbreviation a stem of its last word."""
    from eval.agents import speaker_found

    assert speaker_found("First Clown.", "First Clown") and speaker_found("FIRST WITCH.", "first witch.")
    assert speaker_found("Ber.", "Bernardo.") and speaker_found("Lady Macbeth.", "Lady Macbeth")
    assert speaker_found("Hamlet.", "Hamlet")
    assert not speaker_found("Ber.", "University of California, Berkeley")
    assert not speaker_found("Ber.", "Not Bernardo, it was Horatio")
    assert speaker_found("Hor.", "horse")  # a stem cannot tell a name from any word it begins (left as it is)
    assert not speaker_found("First Clown.", "Clown") and not speaker_found("Hamlet.", "Hamlets")
