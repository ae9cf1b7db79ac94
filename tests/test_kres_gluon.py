"""The Gluon K pass (``forkkv_kernels.kres_gluon``, ``res_form="gluon"``): on CPU what it refuses and why, and its
sm_90 compile (registers, spills, ptxas's serialisation reports) with this machine's Triton; on a Hopper GPU its
attention against the fp32 reference (the low-precision pass rule) over the real-size cases, both score steps and its
launch knobs, and over the attention case space's shapes it takes (the ones it does not take are refused with the
reason). Gluon has no interpreter, so the kernel itself runs only on the GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cases import ATTN_CASES, GPU_CASES, LOW_DTYPES, parametrize
from forkkv_hf import reference_attention
from views import lowp_attention_error, random_view

pytest.importorskip("triton")
from forkkv_kernels import kres_gluon  # noqa: E402
from forkkv_kernels.kres_pass import rope_f16  # noqa: E402
from forkkv_kernels.rules import GLUON_K_FROM, TRITON_K_RULE, launch_defaults  # noqa: E402
from test_cascade_kernel import _launch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
pytestmark = pytest.mark.version_independent  # no transformers/PEFT code: not rerun on 5.17 (tests/conftest.py)


def _why(D=128, dtype=torch.bfloat16, hkv=8, rank=16, vpr=4, mq=8, block_t=64, res_score="mma_sync", device="cpu"):
    return kres_gluon.unsupported(device, dtype, D, hkv, rank, vpr, mq, block_t, res_score)


def test_gluon_k_pass_says_why_it_cannot_serve_a_call():
    """Each limit of the Gluon K pass is named (the CPU reaches the device check last, so every other reason shows
    here): dtype, head dim, rank, score step, score width, tile, shared memory, then the device."""
    assert "bf16/fp16" in _why(dtype=torch.float32)
    assert "head dim 48" in _why(D=48) and "head dim 16" in _why(D=16) and "head dim 512" in _why(D=512)
    assert "K rank 65" in _why(rank=65)
    assert "res_score='fma'" in _why(res_score="fma")
    assert "mq=8" in _why(mq=8, res_score="mma")  # the warpgroup MMA takes 16 columns and up
    assert "mq=8" in _why(mq=8, vpr=16) and "mq=12" in _why(mq=12)
    assert "res_block_t=32" in _why(block_t=32)
    assert "shared memory" in _why(hkv=32, D=256, rank=64, mq=64)
    assert "compute capability 9.x" in _why()
    assert kres_gluon.score_columns(4, "mma_sync") == 8 and kres_gluon.score_columns(4, "mma") == 16
    assert kres_gluon.score_columns(12, "mma_sync") == 16 and kres_gluon.score_columns(200, "mma") == 64


def test_gluon_form_refuses_cpu_and_mma_sync_belongs_to_it():
    """Through the launcher: on CPU ``res_form="gluon"`` raises with the reason and the way out; ``mma_sync`` scores
    and two KV heads per step are the Gluon form's, refused in the Triton forms."""
    case = ATTN_CASES[4]  # D=64, Hkv=2, ranks 16/16/4
    view, q = case.view(torch.bfloat16), case.query(torch.bfloat16)
    if not HOPPER:
        with pytest.raises(ValueError, match="res_form='gluon' cannot serve this call: it runs on CUDA devices .* "
                                             "use res_form='joined'"):
            _launch(q, view, None, case.D**-0.5, res_form="gluon")
    with pytest.raises(ValueError, match="res_score='mma_sync' is the Gluon K pass's"):
        _launch(q, view, None, case.D**-0.5, res_form="joined", res_score="mma_sync")
    with pytest.raises(ValueError, match="res_step_heads=2 is the Gluon K pass's"):
        _launch(q, view, None, case.D**-0.5, res_form="joined", res_step_heads=2)
    with pytest.raises(ValueError, match="res_runtime_zeros is the Gluon K pass's"):
        _launch(q, view, None, case.D**-0.5, res_form="joined", res_runtime_zeros=True)
    with pytest.raises(ValueError, match="res_rebuild='mma_sync' is the Gluon K pass's"):
        _launch(q, view, None, case.D**-0.5, res_form="joined", res_rebuild="mma_sync")
    # the rebuild by mma.sync is the fp16 form's, one head per step, mma.sync scores (before any device check)
    for knobs in ({}, {"res_f16": True, "res_score": "mma"}, {"res_f16": True, "res_step_heads": 2},
                  {"res_f16": True, "res_runtime_zeros": True}):
        with pytest.raises(ValueError, match="res_rebuild='mma_sync': 'wgmma', or 'mma_sync' with res_f16=True"):
            _launch(q, view, None, case.D**-0.5, res_form="gluon", res_rebuild="mma_sync", **knobs)
    with pytest.raises(ValueError, match="res_rebuild='hgmma'"):
        _launch(q, view, None, case.D**-0.5, res_form="gluon", res_rebuild="hgmma")


def test_the_rule_takes_the_gluon_k_pass_for_k_and_v_decode_from_64_vectors():
    """``launch_defaults``: the Gluon K pass's knobs (fp16 rebuild) for K+V decode calls from :data:`GLUON_K_FROM`
    query vectors per KV head (16 agents of G = 4) whose agents have at most two rows (8-column score tiles, as
    measured), the Triton K pass's rule below them and for every other call (K alone, extend calls, three rows per
    agent, fp32: unmeasured or not faster)."""
    assert GLUON_K_FROM == 64
    for agents in (16, 31, 96):  # the fp16 form from 16 agents, below v15's 128 vectors for the Triton pass
        rule = launch_defaults(agents, 1, 4, True, True, torch.bfloat16)
        assert {k: rule[k] for k in kres_gluon.GLUON_RULE} == kres_gluon.GLUON_RULE and rule["res_f16"] is True
    assert launch_defaults(16, 1, 4, True, True, torch.bfloat16, agent_rows=2)["res_form"] == "gluon"
    for args in ((15, 1, 4, True, True, torch.bfloat16), (16, 1, 4, True, False, torch.bfloat16),
                 (8, 2, 8, True, True, torch.bfloat16), (16, 1, 4, True, True, torch.bfloat16, 16, 3)):
        rule = launch_defaults(*args)
        assert {k: rule[k] for k in TRITON_K_RULE} == TRITON_K_RULE and rule["res_f16"] is False, args
    assert launch_defaults(128, 1, 4, True, True, torch.float32)["res_form"] == "halves"


def test_which_given_knobs_ask_for_the_triton_k_pass():
    """Where the rule picks the Gluon K pass, a call still gets the Triton one when its knobs ask for it: a Triton form
    named, the fp16 rebuild refused (``res_f16=False``), CUDA-core scores, or one of the Triton pass's own knobs;
    knobs the Gluon pass takes (its form, its score steps, splits, tiles, register caps) keep it."""
    from forkkv_kernels.rules import TRITON_K_KNOBS, asks_triton_k_pass

    for knobs in ({"res_form": "joined"}, {"res_form": "halves"}, {"res_form": "pairs"}, {"res_f16": False},
                  {"res_score": "fma"}, *({k: 2} for k in TRITON_K_KNOBS)):
        assert asks_triton_k_pass(**knobs), knobs
    for knobs in ({}, {"res_form": "gluon"}, {"res_f16": True}, {"res_score": "mma"}, {"res_score": "mma_sync"},
                  {"res_splits": 4, "res_block_t": 128, "res_maxnreg": 168, "res_programs_per_sm": 3}):
        assert not asks_triton_k_pass(**knobs), knobs


def test_the_gluon_k_pass_threshold_follows_the_latest_sweeps():
    """The rule's K pass at the counts v39 measured (the Gluon pass's MMAs from plain zeros; T=32K, K+V, one H100, two
    orders each: sweep_kernel_v39{a,b} and its repeat _v39r{a,b} at 8 / 32 / 64 / 128 agents, _v39t{a,b} at 12 / 16 /
    20 / 24): the Gluon fp16 form where it measured faster than the Triton pass (``res_form="joined"``) by more than
    the run-to-run spread (1.5%) in every order and run, the Triton pass where it did not; every row within its
    exactness bound. Between them (48 and 96 agents, measured with v37's form) the rule keeps the Gluon pass."""
    gluon = json.dumps({"res_f16": True, "res_form": "gluon"}, sort_keys=True)
    triton = json.dumps({"res_form": "joined"})
    times = {}
    for name in ("v39a", "v39b", "v39ra", "v39rb", "v39ta", "v39tb"):
        for r in json.loads((ROOT / f"eval/results/sweep_kernel_{name}_nvidia_h100.json").read_text())["rows"]:
            if "graph_s" in r and r["config"] in (gluon, triton):
                assert r["ok"], r
                times.setdefault((r["agents"], r["config"]), []).append(r["graph_s"])
    counts = sorted({agents for agents, _ in times})
    assert counts == [8, 12, 16, 20, 24, 32, 64, 128], counts
    for agents in counts:
        g, t = times[agents, gluon], times[agents, triton]
        assert len(g) == len(t) in (2, 4), (agents, g, t)
        faster = all(a < 0.985 * b for a, b in zip(g, t))
        form = launch_defaults(agents, 1, 4, True, True, torch.bfloat16)["res_form"]
        assert (form == "gluon") == faster == (agents * 4 >= GLUON_K_FROM), (agents, form, g, t)
    assert all(launch_defaults(n, 1, 4, True, True, torch.bfloat16)["res_form"] == "gluon" for n in range(16, 129))


def test_the_rules_gluon_k_pass_falls_back_where_a_call_cannot_take_it(monkeypatch):
    """Where the rule picks the Gluon K pass but the call cannot take it (here: no Hopper GPU; elsewhere a K residual
    beyond fp16's range, ``lowp_rope=False``, the Triton pass's own knobs given, a limit of
    :func:`~forkkv_kernels.kres_gluon.refusal`) the launcher runs the Triton K pass under its rule: exact, no error.
    128 rows of one decode query and G = 4 (512 vectors), one agent each (the rule's pick, shown below, is Gluon)."""
    if HOPPER:
        pytest.skip("on a Hopper GPU the rule's Gluon K pass serves this call (test_the_rules_k_pass_boundary_gpu)")
    view = random_view(B=128, Hkv=1, D=16, T=20, P=2, n_agents=128, ranks=(4,) * 128, rows=list(range(128)))
    assert launch_defaults(128, 1, 4, True, True, torch.bfloat16, agent_rows=1)["res_form"] == "gluon"
    q = torch.randn(128, 4, 1, 16, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="res_form='gluon' cannot serve this call"):
        _launch(q, view, None, 0.25, res_form="gluon")
    import forkkv_kernels.cascade as cascade

    forms, launch = [], cascade.launch_kres_scores
    monkeypatch.setattr(cascade, "launch_kres_scores", lambda *a, **kw: forms.append(kw) or launch(*a, **kw))
    out = _launch(q, view, None, 0.25)
    assert forms[0]["res_form"] == "joined" and forms[0]["res_warps"] == TRITON_K_RULE["res_warps"], forms
    torch.testing.assert_close(out, reference_attention(q, view, None, 0.25), rtol=2e-5, atol=2e-5)
    # bf16: the fallback's fp16 rebuild from the Triton pass's own threshold (v15: 128 vectors), not the Gluon one's
    for rows, f16 in ((16, False), (32, True)):
        forms.clear()
        view = random_view(B=rows, Hkv=1, D=16, T=20, P=2, n_agents=rows, ranks=(4,) * rows, rows=list(range(rows)),
                           dtype=torch.bfloat16)
        assert launch_defaults(rows, 1, 4, True, True, torch.bfloat16)["res_f16"] is True
        _launch(torch.randn(rows, 4, 1, 16, generator=torch.Generator().manual_seed(4)).bfloat16(), view, None, 0.25)
        assert forms[0]["res_form"] == "joined" and forms[0]["res_f16"] is f16, (rows, forms[0]["res_f16"])


@pytest.mark.slow
def test_offline_sm90_compile_of_the_gluon_k_pass(tmp_path):
    """`eval.bench.offline_kernel` compiles the Gluon K pass for sm_90 here: the default (mma.sync scores, 64-token
    tiles of 4 warps) fits 3 programs per SM without spills, ptxas serialises none of its MMAs (a head loop unrolled,
    or a rebuild in flight across the loop's back edge, gets them all serialised: eval/KERNEL_NOTES.md "v14"), and its
    hot loop is shorter than the Triton joined form's with the same arithmetic (bf16 rotation of an fp32 rebuild; the
    rule's fp16 form, v15, has fewer) per step of equal work (64 rotated elements per thread)."""
    pytest.importorskip("triton.backends.nvidia")
    pytest.importorskip("triton.experimental.gluon")
    out = tmp_path / "offline.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    configs = json.dumps([{"res_f16": False}, {"res_f16": True}, {"res_form": "gluon"},
                          {"res_form": "gluon", "res_score": "mma"}, {"res_form": "gluon", "res_f16": True},
                          {"res_form": "gluon", "res_f16": True, "res_runtime_zeros": True},
                          {"res_form": "gluon", "res_runtime_zeros": True},
                          {"res_form": "gluon", "res_f16": True, "res_rebuild": "mma_sync", "res_maxnreg": 160},
                          {"res_form": "gluon", "res_f16": True, "rope16": True}])
    proc = subprocess.run([sys.executable, "-m", "eval.bench.offline_kernel", "--configs", configs, "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    rule, rule16, gluon, gluon_wgmma, gluon16, gluon16_rt, gluon_rt, sync16, gluon16_rope16 = rows
    for row in (gluon, gluon_wgmma):
        assert row["spill_bytes"] == 0 and row["programs_per_sm"] >= 3 and not row["mma_serialised"], row
        assert row["loop_instructions"] < rule["loop_instructions"], (row, rule)
    assert gluon["wgmma"] == 1 and gluon["mma_sync"] == 8  # the rebuild on the warpgroup MMA, the scores by mma.sync
    assert gluon_wgmma["mma_sync"] == 0
    # the fp16 form (its loads a tile ahead in registers): three programs per SM, shorter than the Triton fp16 form per
    # head although its tile is half as long; ptxas may report C7514 (Gluon unpacks the fp16 accumulator before the
    # wait), which costs nothing with its one warpgroup MMA per head waited at once: one wait in the loop
    assert gluon16["spill_bytes"] == 0 and gluon16["programs_per_sm"] >= 3, gluon16
    assert gluon16["loop_instructions"] < rule16["loop_instructions"] and gluon16["loop_mma_waits"] == 1, gluon16
    assert set(gluon16["mma_serialised"]) <= {"C7514"}, gluon16
    # plain zero accumulators (the score chains start from RZ) against v36b's runtime zeros (0 · qk_scale, copied into
    # the chains' start registers at every head): fewer instructions per head, no more registers, no new
    # serialisation (Triton 3.6: 118 against 125 instructions, 148 against 166 registers; 3.9: 120 against 127; v39)
    for new, old in ((gluon16, gluon16_rt), (gluon, gluon_rt)):
        assert new["loop_instructions"] < old["loop_instructions"] and new["regs"] <= old["regs"], (new, old)
        assert set(new["mma_serialised"]) <= set(old["mma_serialised"]), (new, old)
    # the rebuild by mma.sync (kres_gluon_sync): no warpgroup MMA, the 8 heads in straight-line code (16 rebuild and
    # 8 score mma.sync each) with nothing serialised, 3 programs per SM under its 160-register cap (Triton 3.6: 1,283
    # instructions per tile of 8 heads, no spill; 3.9: 56 bytes spilled)
    assert sync16["wgmma"] == 0 and sync16["mma_sync"] == 8 * 24 and not sync16["mma_serialised"], sync16
    assert sync16["programs_per_sm"] >= 3 and sync16["spill_bytes"] <= 64, sync16
    # the RoPE tables given in fp16 (rope16): the tile's cos/sin conversions gone (Triton 3.6: the tile loop's span 519
    # -> 422 instructions), the head loop and the registers as they were
    assert gluon16_rope16["tile_loop_instructions"] <= gluon16["tile_loop_instructions"] - 64, (gluon16_rope16, gluon16)
    assert (gluon16_rope16["loop_instructions"], gluon16_rope16["regs"]) == (gluon16["loop_instructions"],
                                                                             gluon16["regs"]), gluon16_rope16


#: the Gluon K pass's launch knobs the GPU tests run (the sweep's candidates, eval/bench/sweep_kernel.py)
GLUON_KNOBS = [
    {"res_form": "gluon"},
    {"res_form": "gluon", "res_score": "mma"},
    {"res_form": "gluon", "res_block_t": 128},
    {"res_form": "gluon", "res_maxnreg": 128, "res_programs_per_sm": 8},
    {"res_form": "gluon", "mq": 64},
    {"res_form": "gluon", "res_satfinite": False},
    {"res_form": "gluon", "res_f16": True},
    {"res_form": "gluon", "res_f16": True, "res_step_heads": 2},
    {"res_form": "gluon", "res_f16": True, "res_runtime_zeros": True},
    {"res_form": "gluon", "res_f16": True, "res_rebuild": "mma_sync"},
    {"res_form": "gluon", "res_f16": True, "res_rebuild": "mma_sync", "res_maxnreg": 160},
]


@pytest.mark.gpu
@parametrize("dtype", LOW_DTYPES)
@parametrize("case", GPU_CASES)
def test_gluon_k_pass_real_sizes_gpu(case, dtype):
    """Llama-3.1-8B-shaped heads (32 query, 8 KV, D=128), rank 16: the attention with the Gluon K pass under each of
    :data:`GLUON_KNOBS` within 3x PyTorch's own low-precision error of the fp32 reference (decode, rows sharing an
    agent, extend calls of 7 and 17 queries: 32 and 128 vectors per row, the latter beyond one score tile); where a
    row's vectors fit one 8-column tile, plain zero accumulators and v36b's runtime zeros agree bit for bit."""
    if not HOPPER:
        pytest.skip("the Gluon K pass runs on sm_90 only")
    view, q = case.view(dtype), case.query(dtype)
    ref = reference_attention(q.float(), view, None, 128**-0.5)
    base_err = lowp_attention_error(q.float(), view, None, 128**-0.5, ref)
    vpr = 1 << (case.Q * 4 - 1).bit_length()
    for knobs in GLUON_KNOBS:
        if vpr > 64 or knobs.get("mq", 64) < vpr:
            with pytest.raises(ValueError, match="res_form='gluon' cannot serve this call"):
                _launch(q, view, None, 128**-0.5, **knobs)
            continue
        err = (_launch(q, view, None, 128**-0.5, **knobs).float() - ref).abs().max().item()
        assert err <= 3 * base_err + 1e-5, (knobs, err, base_err)
    if vpr <= 8:  # plain zero accumulators give v36b's runtime zeros' results bit for bit (the same MMAs from +0.0)
        for f16 in (True, False):
            plain = _launch(q, view, None, 128**-0.5, res_form="gluon", res_f16=f16)
            assert torch.equal(plain, _launch(q, view, None, 128**-0.5, res_form="gluon", res_f16=f16,
                                              res_runtime_zeros=True)), f16
        # the RoPE tables given in fp16 (rope16): the per-tile conversion made once, the same output bit for bit
        rope16 = rope_f16(view.shared.cos.cuda(), view.shared.sin.cuda())
        for rebuild in ("wgmma", "mma_sync"):
            kw = dict(res_form="gluon", res_f16=True, res_rebuild=rebuild)
            assert torch.equal(_launch(q, view, None, 128**-0.5, **kw),
                               _launch(q, view, None, 128**-0.5, rope16=rope16, **kw)), rebuild


@pytest.mark.gpu
@parametrize("dtype", LOW_DTYPES)
@parametrize("rows,f16", [(16, True), (15, True), (16, False)])
def test_the_rules_k_pass_boundary_gpu(rows, f16, dtype):
    """Llama-3.1-8B-shaped heads, one decode query per row, K and V residuals of rank 16 (64 agents, one or two rows
    each), a context of 2,053 tokens: 16 rows (64 query vectors per KV head) take the Gluon K pass by the rule, 15 the
    Triton one, and so does a call whose K pass may not run in fp16 (``res_f16=False``, as the adapter passes for a K
    residual beyond fp16's range); each within 3x PyTorch's low-precision error of the fp32 reference."""
    if not HOPPER:
        pytest.skip("the rule picks the Gluon K pass on sm_90 only")
    view = random_view(B=rows, Hkv=8, D=128, T=2053, P=9, n_agents=64, ranks=(16,) * 64, dtype=dtype,
                       rows=[i % 64 for i in range(rows)])
    q = torch.randn(rows, 32, 1, 128, generator=torch.Generator().manual_seed(4)).to(dtype)
    ref = reference_attention(q.float(), view, None, 128**-0.5)
    launches = {}
    out = _launch(q, view, None, 128**-0.5, launches=launches, **({} if f16 else {"res_f16": False})).float()
    err = (out - ref).abs().max().item()
    assert err <= 3 * lowp_attention_error(q.float(), view, None, 128**-0.5, ref) + 1e-5, err
    name = getattr(getattr(launches["kres"], "metadata", None), "name", "")
    assert ("gluon" in name) == (rows * 4 >= GLUON_K_FROM and f16), name


#: the case space once, bf16 and fp16 in turn, every third case masked (each call compiles the kernel anew)
GLUON_CASES = [(case, LOW_DTYPES[i % 2], i % 3 == 0) for i, case in enumerate(ATTN_CASES)]


@pytest.mark.gpu
@parametrize("case,dtype,masked", GLUON_CASES)
def test_gluon_k_pass_case_space_gpu(case, dtype, masked):
    """The attention case space in bf16/fp16 with ``res_form="gluon"``: GQA 1-8, head dims 32-128 (16, 8 and 48 are
    refused with the reason), ranks 1-64, rows sharing an agent or without one, extend calls, padding masks; within
    3x PyTorch's low-precision error of the fp32 reference (the pass rule of every low-precision kernel test)."""
    if not HOPPER:
        pytest.skip("the Gluon K pass runs on sm_90 only")
    view, q = case.view(dtype), case.query(dtype)
    mask = case.mask() if masked else None
    half = case.D // 2
    if not (16 <= half <= 128 and half & (half - 1) == 0) and case.k_res:
        with pytest.raises(ValueError, match=f"head dim {case.D}"):
            _launch(q, view, mask, case.D**-0.5, res_form="gluon")
        return
    ref = reference_attention(q.float(), view, mask, case.D**-0.5)
    base_err = lowp_attention_error(q.float(), view, mask, case.D**-0.5, ref)
    for score, f16, rebuild in (("mma_sync", False, "wgmma"), ("mma", False, "wgmma"), ("mma_sync", True, "wgmma"),
                                ("mma_sync", True, "mma_sync")):
        err = (_launch(q, view, mask, case.D**-0.5, res_form="gluon", res_score=score, res_f16=f16,
                       res_rebuild=rebuild).float() - ref).abs().max()
        assert err.item() <= 3 * base_err + 1e-5, (score, f16, rebuild, err.item(), base_err)
