#!/usr/bin/env bash
# v45 (after v44; eval/RESULTS.md "v44"): the baseline's capacity under 60 GiB with the end-to-end benchmark's new
# search (eval.bench.e2e._capacity: one N at a time up from the largest measured, stopping at the first out of memory,
# since v44 showed a case after an OOM in the same process is no measure).
# Parts (PARTS, default "capacity"): capacity (~5 min; the baseline at 1 and 4 agents, ForkKV at 1, then 5, 6, 7 until
# one does not fit); tests (v44's user-compiled tests, ~60 s). Results: $OUT/v45.tgz.
set -u
SESSION=v45
source "$(dirname "$0")/gpu_env.sh"
PARTS=${PARTS:-"capacity"}
if has tests; then
    timeout ${TESTS_S:-150} python -m pytest -q tests/test_batched_lora.py tests/test_kernels.py \
        tests/test_robustness.py -k "user_compiled or compiled_forward_reads or compiled_model_still" \
        -p no:cacheprovider > "$OUT/gpu_tests_v45.log" 2>&1
    echo "tests rc=$?"; grep -E "^FAILED|passed|failed|Error" "$OUT/gpu_tests_v45.log" | head -8; pack
fi
if has capacity; then
    timeout ${CAP_S:-420} python -m eval.bench.e2e --contexts 32768 --agents 1 4 --forkkv-agents 1 --no-profile \
        --time-limit $(( ${CAP_S:-420} - 90 )) --out "$OUT/bench_e2e_v45cap.json" > "$OUT/bench_e2e_v45cap.log" 2>&1
    echo "capacity rc=$?"; cut -c1-400 "$OUT/bench_e2e_v45cap.log" | tail -8; pack
fi
