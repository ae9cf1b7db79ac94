"""The Gluon shared kernel with two KV heads per program (``forkkv_kernels.shared_gluon_pair``,
``shared_form="gluon_pair"``): on CPU what it refuses and why, its shared memory, and its sm_90 compile (warp
specialised: two 4-warp partitions at 240 registers, no spills, one program per SM, each partition's context loop
one tile's MMAs under a single wait) with this machine's Triton; on a Hopper GPU its attention against the fp32
reference (the low-precision pass rule) over the V case space of the single-head kernel's tests (even KV head counts)
and at real sizes. Gluon has no interpreter, so the kernel itself runs only on the GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cases import LOW_DTYPES, AttnCase, parametrize

pytest.importorskip("triton")
from forkkv_kernels import shared_gluon, shared_gluon_pair  # noqa: E402
from test_cascade_kernel import _launch  # noqa: E402
from test_shared_gluon import GLUON_SHARED_V_CASES, HOPPER, _assert_exact_under, _real_view  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.version_independent  # no transformers/PEFT code: not rerun on 5.17 (tests/conftest.py)
PAIR = {"shared_form": "gluon_pair"}


def test_the_pair_kernel_says_why_it_cannot_serve_a_call():
    """Through ``cascade_attention``: no V residual (nothing to share), an odd number of KV heads, the single-head
    kernel's limits (a rank it cannot take) and (off Hopper) the device raise, each naming the way out."""
    no_v = AttnCase(B=3, H=4, Hkv=2, D=64, T=29, P=4, v_res=False)
    with pytest.raises(ValueError, match="without a V residual use shared_form='gluon'"):
        _launch(no_v.query(torch.bfloat16), no_v.view(torch.bfloat16), None, 0.125, **PAIR)
    odd = AttnCase(B=3, H=3, Hkv=3, D=64, T=29, P=4, ranks=(16, 16), k_res=False)
    with pytest.raises(ValueError, match="serves KV heads in pairs; this model has 3: use shared_form='gluon'"):
        _launch(odd.query(torch.bfloat16), odd.view(torch.bfloat16), None, 0.125, **PAIR)
    rank4 = AttnCase(B=3, H=4, Hkv=2, D=64, T=29, P=4)  # V ranks 4 and 2
    with pytest.raises(ValueError, match="shared_form='gluon_pair' cannot serve this call: a V residual of rank 4"):
        _launch(rank4.query(torch.bfloat16), rank4.view(torch.bfloat16), None, 0.125, **PAIR)
    if not HOPPER:
        rank16 = AttnCase(B=3, H=4, Hkv=2, D=64, T=29, P=4, ranks=(16, 16), k_res=False)
        with pytest.raises(ValueError, match="shared_form='gluon_pair' cannot serve this call: it runs on CUDA "
                                             "devices .* use shared_form='triton'"):
            _launch(rank16.query(torch.bfloat16), rank16.view(torch.bfloat16), None, 0.125, **PAIR)


def test_the_pair_kernels_shared_memory():
    """Two heads' queries and K/V rings and one ``u_v`` ring: at the rule's knobs (32-token tiles, 3 buffers, rank 16,
    16 rows) 176 KB, within the limit; 4 buffers or 64-token tiles are not."""
    rule = shared_gluon_pair.GLUON_PAIR_RULE
    kv = 2 * shared_gluon.shared_bytes(128, 32, 4, 3)
    assert shared_gluon_pair.pair_bytes(128, 32, 4, 3) == kv + 2 * 3 * 16 * 32 * 16 + 48 == 180368
    assert shared_gluon_pair.pair_bytes(128, rule["block_t"], rule["num_warps"], rule["num_stages"]) \
        <= shared_gluon.SMEM_LIMIT
    assert shared_gluon_pair.pair_bytes(128, 32, 4, 4) > shared_gluon.SMEM_LIMIT
    assert shared_gluon_pair.pair_bytes(128, 64, 4, 2) > shared_gluon.SMEM_LIMIT
    assert rule["programs_per_sm"] == 1 and rule["block_t"] == 32


@pytest.mark.slow
def test_offline_sm90_compile_of_the_pair_kernel(tmp_path):
    """`eval.bench.offline_kernel --gluon-shared '[{"pair": true}, ...]'` compiles the warp-specialised kernel for
    sm_90 here: within its 240 registers without spills, one program per SM, no MMA serialised, and in the context loop
    one tile's 10 MMAs (8 score steps, 2 P·V steps of a 32-token tile) under one wait and the ``P·u_v`` products; at
    rank 8 half the ``mma.sync``; with K-residual scores and a mask too."""
    pytest.importorskip("triton.backends.nvidia")
    pytest.importorskip("triton.experimental.gluon")
    out = tmp_path / "offline.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    configs = json.dumps([{"pair": True}, {"pair": True, "v_rank": 8}, {"pair": True, "has_k": True,
                                                                         "has_mask": True}])
    proc = subprocess.run([sys.executable, "-m", "eval.bench.offline_kernel", "--gluon-shared", configs, "--out",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    for row in rows:
        assert row["regs"] <= shared_gluon_pair.PAIR_REGS and row["spill_bytes"] == 0, row
        assert row["programs_per_sm"] == 1 and not row["mma_serialised"], row
        assert row["loop_hgmma"] == 10 and row["loop_mma_waits"] == 1 and row["mma_sync"] > 0, row
    assert rows[1]["mma_sync"] == rows[0]["mma_sync"] // 2


#: the single-head kernel's V case space with an even number of KV heads (the pair kernel's), where two heads' rings
#: and the rows' tiles fit (not one vector per row: 64 rows' tiles)
PAIR_CASES = [case for case in GLUON_SHARED_V_CASES if case.Hkv % 2 == 0 and case.Q * case.H // case.Hkv >= 2]


@pytest.mark.gpu
@parametrize("dtype", LOW_DTYPES)
@parametrize("masked", [False, True])
@parametrize("case", PAIR_CASES)
def test_the_pair_kernel_case_space_gpu(case, masked, dtype):
    """:data:`PAIR_CASES` (ranks 8-32, GQA 1-8, head dims 64/128, rows sharing an agent and base rows, short contexts,
    extend calls, K residuals too) in bf16/fp16, with and without a padding mask, K tiles refilled early or with V's:
    within 3x PyTorch's low-precision error of the fp32 reference."""
    if not HOPPER:
        pytest.skip("the Gluon pair kernel runs on sm_90 only")
    knob_sets = [{**PAIR, "shared_k_early": k_early} for k_early in (True, False)]
    _assert_exact_under(knob_sets, case.query(dtype), case.view(dtype), case.mask() if masked else None, case.D**-0.5)


@pytest.mark.gpu
@parametrize("dtype", LOW_DTYPES)
@parametrize("T,k_res,Q", [(4096, False, 1), (2053, True, 1), (1500, True, 3)])
def test_the_pair_kernel_real_sizes_gpu(T, k_res, Q, dtype):
    """Llama-3.1-8B-shaped heads, 8 agents of rank 16 plus an agent-0 row and a base row, V residuals (and K's): the
    pair kernel under its rule, on 2 buffers and over 3 splits, within 3x PyTorch's low-precision error of the fp32
    reference."""
    if not HOPPER:
        pytest.skip("the Gluon pair kernel runs on sm_90 only")
    view, q = _real_view(dtype, T, k_res, Q, v_res=True)
    _assert_exact_under([PAIR, {**PAIR, "num_stages": 2}, {**PAIR, "n_splits": 3}], q, view, None, 128**-0.5)
