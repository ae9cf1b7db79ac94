#!/usr/bin/env bash
# v23 (issue 19): where the Gluon shared kernel's threshold belongs. v22's first call (sweep_kernel_v22a) had it ahead
# of the Triton rule from 64 agents (256 query vectors per KV head) on, behind at 32; its opposite-order pass was cut
# by the call's limit. The rule now picks it from 256 vectors (launch_defaults). One call of ~5 minutes:
# 1. the rule test on Hopper (it checks the Gluon kernel ran, exact);
# 2. whole calls, base only, at 32 / 48 / 64 / 96 / 128 agents: Gluon against the Triton kernel, two passes in
#    opposite orders (b, c);
# 3. the library's path with the rule at 48 / 64 / 96 agents (`eval.bench.kernel`);
# 4. per-kernel profiles at 64 agents, base only: the rule (Gluon) and the Triton kernel.
# Each step can be left out: TESTS=0, SWEEP=0, BENCH=0, PROFILE=0; PASSES names the sweep passes (b, d: Gluon first).
# BOUNDARY=1 (after the threshold moved to 192): instead of the steps, the boundary's GPU test at real sizes (48 rows
# take the Gluon kernel, 47 the Triton one, both exact) and the library's path at 47 / 48 agents.
# The calls as made (H100): `bash eval/gpu_session_v23.sh`, then `TESTS=0 BENCH=0 PROFILE=0 PASSES="d e"`. Since
# then the rule's threshold is 192 vectors (eval/KERNEL_NOTES.md "v23 measured"): the script is the record of those calls.
# Results: $OUT/v23.tgz (the device returns at most 8 files; packed again after each step), copy to eval/results.
set -u
SESSION=v23
source "$(dirname "$0")/gpu_env.sh"  # the tree importable, the device and versions in $OUT/env.txt
if [ "${BOUNDARY:-0}" = 1 ]; then
    timeout 150 python -m pytest -q tests/test_shared_gluon.py -k "rule" -p no:cacheprovider > "$OUT/gpu_tests_v23f.log" 2>&1
    echo "boundary tests rc=$?"; tail -3 "$OUT/gpu_tests_v23f.log"; pack
    timeout 120 python -m eval.bench.kernel --contexts 32768 --agents 47 48 --out "$OUT/bench_kernel_v23f.json" \
        > "$OUT/bench_kernel_v23f.log" 2>&1
    echo "bench rc=$?"; tail -3 "$OUT/bench_kernel_v23f.log"; pack
    exit 0
fi
if [ "${TESTS:-1}" = 1 ]; then
    timeout 150 python -m pytest -q tests/test_shared_gluon.py -k rule -p no:cacheprovider \
        > "$OUT/gpu_tests_v23.log" 2>&1
    echo "rule test rc=$?"; tail -3 "$OUT/gpu_tests_v23.log"; pack
fi
if [ "${SWEEP:-1}" = 1 ]; then
    T='{"shared_form": "triton"}'; G='{"shared_form": "gluon"}'
    for pass in ${PASSES:-b c}; do
        if [ $pass = b ] || [ $pass = d ]; then C="{\"shared\": [$G, $T]}"; else C="{\"shared\": [$T, $G]}"; fi
        timeout 150 python -m eval.bench.sweep_kernel --stage shared --variants base --waves 1 \
            --points 32768:32 32768:48 32768:64 32768:96 32768:128 --candidates "$C" --time-limit 120 \
            --out "$OUT/sweep_kernel_v23$pass.json" > "$OUT/sweep_v23$pass.log" 2>&1
        echo "sweep $pass rc=$?"; tail -5 "$OUT/sweep_v23$pass.log"; pack
    done
fi
if [ "${BENCH:-1}" = 1 ]; then
    timeout 150 python -m eval.bench.kernel --contexts 32768 --agents 48 64 96 --out "$OUT/bench_kernel_v23.json" \
        > "$OUT/bench_kernel_v23.log" 2>&1
    echo "bench rc=$?"; tail -5 "$OUT/bench_kernel_v23.log"; pack
fi
if [ "${PROFILE:-1}" = 1 ]; then
    for form in gluon triton; do
        timeout 90 python -m eval.bench.profile_kernel --variants base --points 32768:64 \
            --knobs "{\"shared_form\": \"$form\"}" --out "$OUT/profile_kernel_v23_$form.json" \
            > "$OUT/profile_v23_$form.log" 2>&1
        echo "profile $form rc=$?"; grep "µs:" "$OUT/profile_v23_$form.log"; pack
    done
fi
