#!/usr/bin/env bash
# v44 (after v43; eval/RESULTS.md "v43"): the baseline's capacity under 60 GiB, searched in one process as the
# end-to-end benchmark does, now that an out-of-memory case frees memory after its except block.
# Parts (PARTS, default "capacity tests"):
# - capacity: `python -m eval.bench.e2e` with the baseline at 1 and 4 agents, ForkKV at 1 (no ForkKV capacity: one
#   point), then the baseline's capacity search (the fit's N, then 10% fewer until one fits), ~6 min: v41's search
#   ran 7, 6, 5 and all three ran out of memory, while 5 alone (v43, its own process) peaked at 46.7 GiB; each OOM row
#   now keeps the allocator's message;
# - tests: v43's user-compiled model tests, the LoRA one at the tolerance v43's H100 run called for (~60 s).
# Results: $OUT/v44.tgz ($OUT/$SESSION.tgz where a later session's script sets SESSION, as v45's does).
set -u
SESSION=${SESSION:-v44}
source "$(dirname "$0")/gpu_env.sh"
PARTS=${PARTS:-"capacity tests"}
if has tests; then
    timeout ${TESTS_S:-150} python -m pytest -q tests/test_batched_lora.py tests/test_kernels.py \
        tests/test_robustness.py -k "user_compiled or compiled_forward_reads or compiled_model_still" \
        -p no:cacheprovider > "$OUT/gpu_tests_$SESSION.log" 2>&1
    echo "tests rc=$?"; grep -E "^FAILED|passed|failed|Error" "$OUT/gpu_tests_$SESSION.log" | head -8; pack
fi
if has capacity; then
    timeout ${CAP_S:-420} python -m eval.bench.e2e --contexts 32768 --agents 1 4 --forkkv-agents 1 --no-profile \
        --time-limit $(( ${CAP_S:-420} - 90 )) --out "$OUT/bench_e2e_${SESSION}cap.json" > "$OUT/bench_e2e_${SESSION}cap.log" 2>&1
    echo "capacity rc=$?"; cut -c1-400 "$OUT/bench_e2e_${SESSION}cap.log" | tail -8; pack
fi
