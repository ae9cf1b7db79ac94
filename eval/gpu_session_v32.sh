#!/usr/bin/env bash
# v31 + v32 (issue 19; eval/KERNEL_NOTES.md "v31", "v32"), prepared, not run: first v31 (gpu_session_v31.sh: the two
# new probe ablations and ncu of the shared part's kernels), then v32, the V kernel with a producer warp
# (forkkv_kernels/shared_gluon_ws.py, shared_form="gluon_ws"; never run before). Parts (PARTS, in order; the default
# "smoke sweep tests" takes ~6 minutes, v31 ~5 more: run `PARTS=v31` as a call of its own, a call stops at 10 minutes):
# - v31: `bash eval/gpu_session_v31.sh` (its probe and ncu parts; V31_PARTS narrows it);
# - smoke: three small V calls of the producer-warp kernel against the exact attention, 60 s limit (a hang or a
#   fault stops the v32 parts);
# - sweep: whole calls, V only, at 8 / 32 / 128 agents: the rule's Gluon V kernel against the producer-warp kernel,
#   two orders;
# - tests: tests/test_shared_gluon_ws.py on the GPU (TESTS_K narrows it; ~3 minutes);
# - ncu (not in the default): the producer-warp kernel's counters at 32 / 128 agents, as v31's for the rule's kernels
#   (barrier stalls against the single-head kernel's).
# Results: $OUT/v32.tgz (and v31's $OUT/v31.tgz).
set -u
FINAL=${OUT:-/tmp/out}
PARTS=${PARTS:-"smoke sweep tests"}
has() { case " $PARTS " in *" $1 "*) return 0;; esac; return 1; }
if has v31; then OUT=$FINAL PARTS=${V31_PARTS:-"probe ncu"} bash "$(dirname "$0")/gpu_session_v31.sh"; fi
OUT=/tmp/v32w; rm -rf "$OUT"
source "$(dirname "$0")/gpu_env.sh"
pack() { mkdir -p "$FINAL" && tar czf "$FINAL/v32.tgz" -C "$OUT" .; }
ok=1
if has smoke; then
    PYTHONPATH="$PWD:$PWD/tests" timeout 60 python - > "$OUT/smoke_v32.log" 2>&1 <<'PY'
import torch
from cases import AttnCase as A
from forkkv_hf import reference_attention
from test_cascade_kernel import _launch
from views import lowp_attention_error
for case in (A(B=5, H=8, Hkv=2, D=64, T=129, P=2, N=3, ranks=(16, 16, 16), k_res=False),
             A(B=6, H=8, Hkv=2, D=128, T=1000, P=3, Q=2, N=3, ranks=(8, 16, 32)),
             A(B=9, H=4, Hkv=4, D=64, T=90, P=3, N=3, ranks=(16, 16, 16), k_res=False)):
    q, view, scale = case.query(torch.bfloat16), case.view(torch.bfloat16), case.D**-0.5
    ref = reference_attention(q.float(), view, None, scale)
    lowp = lowp_attention_error(q.float(), view, None, scale, ref)
    err = (_launch(q, view, None, scale, shared_form="gluon_ws").float() - ref).abs().max().item()
    print(f"ws T={case.T} err={err:.3g} lowp={lowp:.3g} ok={err <= 3 * lowp + 1e-5}", flush=True)
PY
    rc=$?; echo "smoke rc=$rc"; tail -4 "$OUT/smoke_v32.log"; pack
    [ $rc = 0 ] || ok=0
fi
if has sweep && [ $ok = 1 ]; then
    GV='{"shared_form": "gluon"}'; GW='{"shared_form": "gluon_ws"}'
    for pass in a b; do
        if [ $pass = a ]; then C="{\"shared\": [$GV, $GW]}"; else C="{\"shared\": [$GW, $GV]}"; fi
        timeout 100 python -m eval.bench.sweep_kernel --stage shared --variants v --waves 1 \
            --points 32768:8 32768:32 32768:128 --candidates "$C" --time-limit 85 \
            --out "$OUT/sweep_kernel_v32$pass.json" > "$OUT/sweep_v32$pass.log" 2>&1
        echo "sweep $pass rc=$?"; grep "^BEST" "$OUT/sweep_v32$pass.log"; pack
    done
fi
if has tests && [ $ok = 1 ]; then
    timeout 240 python -m pytest -q -m gpu tests/test_shared_gluon_ws.py ${TESTS_K:+-k "$TESTS_K"} \
        -p no:cacheprovider > "$OUT/gpu_tests_v32.log" 2>&1
    echo "tests rc=$?"; grep -E "^FAILED|passed|failed" "$OUT/gpu_tests_v32.log" | head -12; pack
fi
if has ncu && [ $ok = 1 ]; then
    timeout 200 ncu --clock-control none --kernel-name regex:"_cascade_shared" --launch-count 2 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
        --section MemoryWorkloadAnalysis \
        python3 -m eval.bench.profile_kernel --ncu-once --variants v --points 32768:32 32768:128 \
        --knobs '{"shared_form": "gluon_ws"}' > "$OUT/ncu_v32.txt" 2>&1
    echo "ncu rc=$?"; grep -E "Duration|Issue Slots Busy|Stall|_cascade_shared" "$OUT/ncu_v32.txt" | head -30; pack
fi
