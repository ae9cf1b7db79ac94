#!/usr/bin/env bash
# v19 (issue 19), one device call: programmatic dependent launch between the cascade's three kernels (the shared
# kernel after the K pass, the merge after the shared kernel; `pdl`), checked and timed against the rule.
# 1. the GPU tests of PDL: bit for bit against plain launches in a CUDA graph, and the launch-knob cases;
# 2. `sweep_kernel --stage merge` at 1/8/32/128 agents (32K), K+V / V only / base only: the rule, pdl with the
#    merge's partials first (the rule's order), pdl with the private part before the wait; then the same in reverse
#    order (the run-to-run spread); with MODES=1 instead the rule against the three pdl modes (early, late, merge);
#    with RULE=1 the rule (pdl "merge" since v19) against plain launches;
# 3. the per-kernel profile of the rule on this machine (PROFILE=1; the H200 profile was never measured).
# KNOB_TESTS=0 leaves out the launch-knob cases on the GPU (the PDL graph test still runs).
# Results under $OUT (copy to eval/results).
set -u
source "$(dirname "$0")/gpu_env.sh"  # $OUT, the tree importable, the device and versions in $OUT/env.txt
timeout 240 python -m pytest -q -m gpu tests/test_cascade_kernel.py -k "pdl or launch_knobs" -p no:cacheprovider \
    > "$OUT/gpu_tests_pdl.log" 2>&1
echo "tests rc=$?"; tail -3 "$OUT/gpu_tests_pdl.log"
if [ "${KNOB_TESTS:-1}" = 1 ]; then
    timeout 240 python -m pytest -q tests/test_cascade_kernel.py -k "launch_knobs" -p no:cacheprovider \
        >> "$OUT/gpu_tests_pdl.log" 2>&1
    echo "knob tests rc=$?"; tail -2 "$OUT/gpu_tests_pdl.log"
fi
PTS="32768:1 32768:8 32768:32 32768:128"
for pass in a b; do
    if [ "${RULE:-0}" = 1 ]; then  # the adopted rule (pdl "merge" but V only beyond 32 vectors) against no pdl
        name=v19r$pass
        if [ $pass = a ]; then C='{"merge": [{}, {"pdl": false}]}'; else C='{"merge": [{"pdl": false}, {}]}'; fi
    elif [ "${MODES:-0}" = 1 ]; then
        name=v19m$pass
        if [ $pass = a ]; then C='{"merge": [{}, {"pdl": "early"}, {"pdl": "late"}, {"pdl": "merge"}]}'
        else C='{"merge": [{"pdl": "merge"}, {"pdl": "late"}, {"pdl": "early"}, {}]}'; fi
    else
        name=v19$pass
        if [ $pass = a ]; then C='{"merge": [{}, {"pdl": true}, {"pdl": true, "merge_first": false}]}'
        else C='{"merge": [{"pdl": true, "merge_first": false}, {"pdl": true}, {}]}'; fi
    fi
    timeout 200 python -m eval.bench.sweep_kernel --stage merge --points $PTS --candidates "$C" --time-limit 170 \
        --out "$OUT/sweep_kernel_$name.json" > "$OUT/sweep_$name.log" 2>&1
    echo "sweep $pass rc=$?"; tail -14 "$OUT/sweep_$name.log"
done
if [ "${PROFILE:-1}" = 1 ]; then
    timeout 200 python -m eval.bench.profile_kernel --points $PTS \
        --out "$OUT/profile_kernel_v19.json" > "$OUT/profile_kernel_v19.log" 2>&1
    echo "profile rc=$?"; grep "µs:" "$OUT/profile_kernel_v19.log"
fi
