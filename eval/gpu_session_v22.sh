#!/usr/bin/env bash
# v22 (issue 19), what v21's adoption left unrun (eval/KERNEL_NOTES.md "v21 measured"), one device call of ~6 minutes:
# 1. the GPU tests of the Gluon shared kernel's final knob list and of the launcher's rule picking it
#    (tests/test_shared_gluon.py, every test: on a Hopper GPU the rule test checks the Gluon kernel ran), and the
#    cascade and library kernel tests (their base-only calls from 512 vectors per KV head now take the Gluon kernel);
# 2. the library's path with the rule at 1-128 agents (`eval.bench.kernel`), on whichever card comes;
# 3. where the rule's threshold belongs: whole calls, base only, at 64 and 96 agents (256 and 384 vectors per KV
#    head, between v21's tie at 32 and gain at 128), the Triton rule against the Gluon kernel, both orders; and at 32
#    and 128 agents the Gluon kernel with the score MMAs' queries from registers (`shared_q_regs`, built after v21's
#    calls: 192 registers offline, still two programs per SM; half the score MMAs' shared-memory reads).
# Each step can be left out: TESTS=0, BENCH=0, SWEEP=0.
# Results: $OUT/v22.tgz (the device returns at most 8 files; packed again after each step), copy to eval/results.
set -u
SESSION=v22
source "$(dirname "$0")/gpu_env.sh"  # the tree importable, the device and versions in $OUT/env.txt
if [ "${TESTS:-1}" = 1 ]; then
    timeout ${TEST_TIMEOUT:-300} python -m pytest -q tests/test_shared_gluon.py -p no:cacheprovider \
        > "$OUT/gpu_tests_v22_gluon.log" 2>&1
    echo "gluon tests rc=$?"; tail -3 "$OUT/gpu_tests_v22_gluon.log"; pack
    timeout ${TEST_TIMEOUT:-300} python -m pytest -q -m gpu tests/test_cascade_kernel.py tests/test_kernels.py \
        -p no:cacheprovider > "$OUT/gpu_tests_v22.log" 2>&1
    echo "tests rc=$?"; tail -3 "$OUT/gpu_tests_v22.log"; pack
fi
if [ "${BENCH:-1}" = 1 ]; then
    timeout 200 python -m eval.bench.kernel --contexts 32768 --agents 1 8 32 128 --out "$OUT/bench_kernel_v22.json" \
        > "$OUT/bench_kernel_v22.log" 2>&1
    echo "bench rc=$?"; tail -8 "$OUT/bench_kernel_v22.log"; pack
fi
if [ "${SWEEP:-1}" = 1 ]; then
    for pass in a b; do
        QR='{"shared_form": "gluon", "shared_q_regs": true}'
        if [ $pass = a ]; then C="{\"shared\": [{\"shared_form\": \"triton\"}, {\"shared_form\": \"gluon\"}, $QR]}"
        else C="{\"shared\": [$QR, {\"shared_form\": \"gluon\"}, {\"shared_form\": \"triton\"}]}"; fi
        timeout 150 python -m eval.bench.sweep_kernel --stage shared --variants base --waves 1 \
            --points 32768:32 32768:64 32768:96 32768:128 --candidates "$C" --time-limit 120 \
            --out "$OUT/sweep_kernel_v22$pass.json" > "$OUT/sweep_v22$pass.log" 2>&1
        echo "sweep $pass rc=$?"; tail -4 "$OUT/sweep_v22$pass.log"; pack
    done
fi
