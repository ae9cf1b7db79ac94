#!/usr/bin/env bash
# v26 (issue 19; eval/KERNEL_NOTES.md "v26"), after v24's call: the V residual in the Gluon shared kernel was exact at
# the real sizes and 20% faster than the Triton kernel from 32 agents (V only), but two case-space shapes failed: rank
# 8 (wrong results) and a rank-32 call at 2 vectors per row (32 rows per program: 262 KB of shared memory at the rule's
# 3 buffers, refused). The rule now drops to 2 buffers where the tiles need the room; the first call of this script
# (aeea780's diag: the u_v ring's layout, NVMMA or plain, changed nothing at rank 8) led to the rank-8 fault: the kernel wrote
# P·u_v rows RV wide where the merge reads them RVB = max(16, RV) wide; now RVB wide, zeros past the rank.
# Parts (PARTS, in order):
# - diag: the failing shapes (and rank 16 on the same rows), each row's error (~30 s);
# - tests: the V residual's GPU tests (case space, real sizes) and the rule's (~3 minutes);
# - graph: the cascade's PDL calls captured in CUDA graphs (V only there is the rule's Gluon pick) (~1 minute);
# - vt: whole calls, V only, at 8 / 12 / 16 / 24 agents: the Triton kernel against the Gluon V rule and 2 buffers,
#   two orders (where the Gluon kernel starts to win);
# - base: v24's 32-token tiles for the base part, whole calls at 1 / 32 / 48 / 128 agents, one pass;
# - bench: the library's path (`eval.bench.kernel`) at 1 / 8 / 32 / 128 agents (after a rule change).
# Calls: "diag tests vt base" (aeea780's script), then "diag tests graph bench" after the V rule's adoption.
# Results: $OUT/v26.tgz, copy to eval/results.
set -u
SESSION=v26
source "$(dirname "$0")/gpu_env.sh"
PARTS=${PARTS:-"diag tests vt base"}
if has diag; then
    PYTHONPATH="$PWD:$PWD/tests" timeout 120 python - "$OUT/gluon_v_layouts_v26.json" > "$OUT/gluon_v_layouts_v26.log" 2>&1 <<'PY'
import json, sys
import torch
from cases import AttnCase as A
from forkkv_hf import reference_attention
from test_cascade_kernel import _launch
from views import lowp_attention_error
from eval.device import device_info
cases = {
    "rank 8, rows 0,1,1,-1": A(B=4, H=8, Hkv=2, D=64, T=70, P=5, rows=(0, 1, 1, -1), ranks=(8, 8), k_res=False),
    "rank 16, rows 0,1,1,-1": A(B=4, H=8, Hkv=2, D=64, T=70, P=5, rows=(0, 1, 1, -1), ranks=(16, 16), k_res=False),
    "rank 8, four agents": A(B=4, H=8, Hkv=2, D=64, T=70, P=5, N=4, rows=(0, 1, 2, 3), ranks=(8,) * 4, k_res=False),
    "ranks 32,8, 2 vectors per row": A(B=2, H=2, Hkv=1, D=128, T=33, P=3, ranks=(32, 8)),
}
rows = []
for name, case in cases.items():
    q, view, scale = case.query(torch.bfloat16), case.view(torch.bfloat16), case.D**-0.5
    ref = reference_attention(q.float(), view, None, scale)
    lowp = lowp_attention_error(q.float(), view, None, scale, ref)
    err = (_launch(q, view, None, scale, shared_form="gluon").float() - ref).abs().amax(dim=(1, 2, 3))
    row = {"case": name, "max_abs_err": err.max().item(), "per_row": err.tolist(), "lowp_err": lowp,
           "ok": err.max().item() <= 3 * lowp + 1e-5}
    print(json.dumps(row), flush=True)
    rows.append(row)
open(sys.argv[1], "w").write(json.dumps({"device": device_info(), "rows": rows}, indent=1))
PY
    echo "diag rc=$?"; cut -c1-220 "$OUT/gluon_v_layouts_v26.log"; pack
fi
if has tests; then
    timeout 240 python -m pytest -q tests/test_shared_gluon.py -k "v_residual or rule" -p no:cacheprovider \
        > "$OUT/gpu_tests_v26.log" 2>&1
    echo "tests rc=$?"; grep -E "^FAILED|passed|failed" "$OUT/gpu_tests_v26.log" | head -12; pack
fi
if has graph; then  # the rule's Gluon V pick (10 rows: 40 vectors) in CUDA graphs with each PDL mode, bit for bit
    timeout 150 python -m pytest -q -m gpu tests/test_cascade_kernel.py -k "pdl_calls" -p no:cacheprovider \
        > "$OUT/gpu_tests_v26_graph.log" 2>&1
    echo "graph rc=$?"; grep -E "^FAILED|passed|failed" "$OUT/gpu_tests_v26_graph.log" | head -5; pack
fi
if has vt; then
    T='{"shared_form": "triton"}'; GV='{"shared_form": "gluon"}'; GV2='{"shared_form": "gluon", "num_stages": 2}'
    for pass in ta tb; do
        if [ $pass = ta ]; then C="{\"shared\": [$T, $GV, $GV2]}"; else C="{\"shared\": [$GV2, $GV, $T]}"; fi
        timeout 100 python -m eval.bench.sweep_kernel --stage shared --variants v --waves 1 \
            --points 32768:8 32768:12 32768:16 32768:24 --candidates "$C" --time-limit 90 \
            --out "$OUT/sweep_kernel_v26$pass.json" > "$OUT/sweep_v26$pass.log" 2>&1
        echo "sweep $pass rc=$?"; grep "^BEST" "$OUT/sweep_v26$pass.log"; pack
    done
fi
if has base; then
    G='{"shared_form": "gluon"}'
    G32='{"shared_form": "gluon", "block_t": 32, "programs_per_sm": 3}'
    G32S6='{"shared_form": "gluon", "block_t": 32, "num_stages": 6}'
    T='{"shared_form": "triton"}'
    C="{\"shared\": [$G, $G32, $G32S6, $T]}"
    timeout 130 python -m eval.bench.sweep_kernel --stage shared --variants base --waves 1 \
        --points 32768:1 32768:32 32768:48 32768:128 --candidates "$C" --time-limit 115 \
        --out "$OUT/sweep_kernel_v26base.json" > "$OUT/sweep_v26base.log" 2>&1
    echo "sweep base rc=$?"; grep "^BEST" "$OUT/sweep_v26base.log"; pack
fi
if has bench; then
    timeout 150 python -m eval.bench.kernel --contexts 32768 --agents 1 8 32 128 --out "$OUT/bench_kernel_v26.json" \
        > "$OUT/bench_kernel_v26.log" 2>&1
    echo "bench rc=$?"; tail -12 "$OUT/bench_kernel_v26.log"; pack
fi
