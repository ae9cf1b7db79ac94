#!/usr/bin/env bash
# v43 (issue 19; eval/KERNEL_NOTES.md "v42 measured"): what the last device minutes of a session buy.
# Parts (PARTS, default "path oom tests"):
# - path: the library's path at 1 / 8 / 16 / 32 / 128 agents (`python -m eval.bench.kernel`, ~80 s): on an H200 it
#   replaces the README's H200 table of v20 (issue 19's targets are an H200's); on an H100 a second machine's v42 row;
# - oom: the end-to-end baseline at 5 agents under the 60 GiB budget (and ForkKV at 1 agent, which the script needs),
#   ~120 s: v41 ran out of memory there with a predicted peak of 46.7 GiB, and the row now keeps the allocator's
#   message (allocated against reserved-but-unallocated), so it says why;
# - tests: the tests of models their users compile (stop 62's three silent results, fixed on CPU) on the GPU's
#   kernels: each call's own adapters through the batched LoRA, the mask read everywhere, the rows' check (~60 s);
# - decode (not in the default; a call of its own): the compiled decode step at 1 / 8 / 32 / 128 agents, marked, for
#   the README's compiled-decode table (H200, 2026-12-03, before `context_visible` and rope16: 134.1 ms at 256 agents
#   where v42 measured 89.8 on an H100); ~90 s per count, `DECODE_RESUME` continues a cut run.
# Results: $OUT/v43.tgz.
set -u
SESSION=v43
source "$(dirname "$0")/gpu_env.sh"
PARTS=${PARTS:-"path oom tests"}
if has path; then
    library_path ${PATH_S:-150} v43 1 8 16 32 128; pack
fi
if has oom; then
    timeout ${OOM_S:-240} python -m eval.bench.e2e --contexts 32768 --agents 5 --forkkv-agents 1 --no-profile \
        --no-capacity --out "$OUT/bench_e2e_v43oom.json" > "$OUT/bench_e2e_v43oom.log" 2>&1
    echo "oom rc=$?"; cut -c1-1500 "$OUT/bench_e2e_v43oom.log" | tail -6; pack
fi
if has tests; then  # not `gpu`-marked (they run on CPU too), so not through gpu_tests' `-m gpu`
    timeout ${TESTS_S:-150} python -m pytest -q tests/test_batched_lora.py tests/test_kernels.py \
        tests/test_robustness.py -k "user_compiled or compiled_forward_reads or compiled_model_still" \
        -p no:cacheprovider > "$OUT/gpu_tests_v43.log" 2>&1
    echo "tests rc=$?"; grep -E "^FAILED|passed|failed|Error" "$OUT/gpu_tests_v43.log" | head -8; pack
fi
if has decode; then
    resume=(); [ -n "${DECODE_RESUME:-}" ] && resume=(--resume "$DECODE_RESUME")
    timeout $(( ${DECODE_LIMIT:-420} + 150 )) python -m eval.bench.decode --agents 1 8 32 128 --compile on \
        --tokens 8 40 --reps 2 --freeze-gc --no-profile --no-anchors --time-limit ${DECODE_LIMIT:-420} \
        "${resume[@]}" --out "$OUT/bench_decode_compiled_v43.json" > "$OUT/bench_decode_compiled_v43.log" 2>&1
    echo "decode rc=$?"; grep -E "timed:" "$OUT/bench_decode_compiled_v43.log" | cut -c1-160; pack
fi
