"""The Gluon shared kernel with the V residual and a producer warp (``forkkv_kernels.shared_gluon_ws``,
``shared_form="gluon_ws"``): on CPU what it refuses and why, and its sm_90 compile (warp specialised: a 4-warp
consumer and a 1-warp producer, two programs per SM, no spills, the consumer's context loop with one tile's MMAs under
a single wait and no CTA-wide barrier) with this machine's Triton; on a Hopper GPU its attention against the fp32
reference (the low-precision pass rule) over the single-head kernel's V case space and at real sizes. Gluon has no
interpreter, so the kernel itself runs only on the GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cases import LOW_DTYPES, AttnCase, parametrize

pytest.importorskip("triton")
from forkkv_kernels import shared_gluon_ws  # noqa: E402
from test_cascade_kernel import _launch  # noqa: E402
from test_shared_gluon import GLUON_SHARED_V_CASES, HOPPER, _assert_exact_under, _real_view  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.version_independent  # no transformers/PEFT code: not rerun on 5.17 (tests/conftest.py)
WS = {"shared_form": "gluon_ws"}


def test_the_producer_warp_kernel_says_why_it_cannot_serve_a_call():
    """Through ``cascade_attention``: no V residual, a consumer of other than 4 warps, the single-head kernel's limits
    (a rank it cannot take) and (off Hopper) the device raise, each naming the way out."""
    no_v = AttnCase(B=3, H=4, Hkv=2, D=64, T=29, P=4, v_res=False)
    with pytest.raises(ValueError, match="without one use shared_form='gluon'"):
        _launch(no_v.query(torch.bfloat16), no_v.view(torch.bfloat16), None, 0.125, **WS)
    rank16 = AttnCase(B=3, H=4, Hkv=2, D=64, T=29, P=4, ranks=(16, 16), k_res=False)
    with pytest.raises(ValueError, match="one consumer warpgroup \\(num_warps=4\\), not 8"):
        _launch(rank16.query(torch.bfloat16), rank16.view(torch.bfloat16), None, 0.125, **WS, num_warps=8)
    rank4 = AttnCase(B=3, H=4, Hkv=2, D=64, T=29, P=4)  # V ranks 4 and 2
    with pytest.raises(ValueError, match="shared_form='gluon_ws' cannot serve this call: a V residual of rank 4"):
        _launch(rank4.query(torch.bfloat16), rank4.view(torch.bfloat16), None, 0.125, **WS)
    if not HOPPER:
        with pytest.raises(ValueError, match="shared_form='gluon_ws' cannot serve this call: it runs on CUDA devices"):
            _launch(rank16.query(torch.bfloat16), rank16.view(torch.bfloat16), None, 0.125, **WS)


@pytest.mark.slow
def test_offline_sm90_compile_of_the_producer_warp_kernel(tmp_path):
    """`eval.bench.offline_kernel --gluon-shared '[{"ws": true}, ...]'` compiles the kernel for sm_90 here: within its
    128-register cap (the consumer takes 232 by setmaxnreg) without spills, two programs per SM (83 KB at rank 16), no
    MMA serialised, in the consumer's loop one tile's 10 MMAs under one wait; at rank 8 half the ``mma.sync``; with
    K-residual scores and a mask too."""
    pytest.importorskip("triton.backends.nvidia")
    pytest.importorskip("triton.experimental.gluon")
    out = tmp_path / "offline.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    configs = json.dumps([{"ws": True}, {"ws": True, "v_rank": 8}, {"ws": True, "has_k": True, "has_mask": True}])
    proc = subprocess.run([sys.executable, "-m", "eval.bench.offline_kernel", "--gluon-shared", configs, "--out",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    for row in rows:
        assert row["regs"] <= shared_gluon_ws.WS_MAXNREG and row["spill_bytes"] == 0, row
        assert row["programs_per_sm"] >= 2 and row["shared"] < 116 * 1024 and not row["mma_serialised"], row
        assert row["loop_hgmma"] == 10 and row["loop_mma_waits"] == 1 and row["mma_sync"] > 0, row
    assert rows[1]["mma_sync"] == rows[0]["mma_sync"] // 2


@pytest.mark.gpu
@parametrize("dtype", LOW_DTYPES)
@parametrize("masked", [False, True])
@parametrize("case", GLUON_SHARED_V_CASES)
def test_the_producer_warp_kernel_case_space_gpu(case, masked, dtype):
    """The single-head kernel's V case space (ranks 8-32, GQA 1-8, head dims 64/128, rows sharing an agent and base
    rows, short contexts, extend calls, K residuals too) in bf16/fp16, with and without a padding mask: within 3x
    PyTorch's low-precision error of the fp32 reference."""
    if not HOPPER:
        pytest.skip("the Gluon producer-warp kernel runs on sm_90 only")
    _assert_exact_under([WS], case.query(dtype), case.view(dtype), case.mask() if masked else None, case.D**-0.5)


@pytest.mark.gpu
@parametrize("dtype", LOW_DTYPES)
@parametrize("T,k_res,Q", [(4096, False, 1), (2053, True, 1), (1500, True, 3)])
def test_the_producer_warp_kernel_real_sizes_gpu(T, k_res, Q, dtype):
    """Llama-3.1-8B-shaped heads, 8 agents of rank 16 plus an agent-0 row and a base row, V residuals (and K's): the
    kernel under its rule and over 3 splits within 3x PyTorch's low-precision error of the fp32 reference."""
    if not HOPPER:
        pytest.skip("the Gluon producer-warp kernel runs on sm_90 only")
    view, q = _real_view(dtype, T, k_res, Q, v_res=True)
    _assert_exact_under([WS, {**WS, "n_splits": 3}], q, view, None, 128**-0.5)
