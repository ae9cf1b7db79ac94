#!/usr/bin/env bash
# v41 (issue 19; eval/KERNEL_NOTES.md "v41"): where the library stands on an H200, the machine the issue's targets
# name (its path table in the README was v20's, 2026-12-06), and the end-to-end benchmark timed by step marks.
# Parts (PARTS, default "path e2e"):
# - path: the library's path at 1 / 8 / 16 / 32 / 128 agents (`python -m eval.bench.kernel`, ~60 s);
# - e2e: `python -m eval.bench.e2e` at 32K (baseline 1 / 4 agents, ForkKV 1 / 8 / 32 / 128, then both capacities
#   under the 60 GiB budget), each token timed by its mark on the GPU's timeline; no new case after E2E_LIMIT seconds
#   (default 400); E2E_RESUME=path/to/unfinished.json goes on from an earlier call's JSON;
# - ncu (not in the default): the K pass at 32 agents under the rule (the Gluon fp16 pass), its stall reasons with each
#   pipe's share of its peak (`NCU_PIPES=1`): which pipe v36b's "math pipe throttle" (1.01 per issue) waits on (~100 s).
# Results: $OUT/v41.tgz.
set -u
SESSION=v41
source "$(dirname "$0")/gpu_env.sh"
PARTS=${PARTS:-"path e2e"}
if has path; then
    library_path ${PATH_S:-150} v41 1 8 16 32 128; pack
fi
if has e2e; then
    resume=(); [ -n "${E2E_RESUME:-}" ] && resume=(--resume "$E2E_RESUME")
    timeout $(( ${E2E_LIMIT:-400} + 150 )) python -m eval.bench.e2e --contexts 32768 --agents 1 4 \
        --forkkv-agents 1 8 32 128 --no-profile --time-limit ${E2E_LIMIT:-400} "${resume[@]}" \
        --out "$OUT/bench_e2e_v41.json" > "$OUT/bench_e2e_v41.log" 2>&1
    echo "e2e rc=$?"; grep -vE "^\{" "$OUT/bench_e2e_v41.log" | tail -12; pack
fi
if has ncu; then
    NCU_PIPES=1 ncu_stalls ${NCU_S:-150} _kres_scores 1 "$OUT/ncu_v41_kpass.txt" --variants kv --points 32768:32
    echo "ncu rc=$?"; grep -E "gpu__time_duration|pct_of_peak|math_pipe|Issued Warp" "$OUT/ncu_v41_kpass.txt" \
        | sort -k3 -n -r | head -16; pack
fi
