#!/usr/bin/env bash
# v49b: v49 with the tiles fitted to shared memory only (block_t first; v49's register bound cost 6x at 64 MHA rows of
# V rank 32): the MHA GPU tests on 6 workers, then the fitted tiles against the old ones at 64 rows, V ranks 32/64.
set -u
export SESSION=${SESSION:-v49b}
source "$(dirname "$0")/gpu_env.sh"
timeout ${TESTS_S:-110} python -m pytest -q -m gpu tests/test_cascade_kernel.py -k mha_wide -n 6 -p no:cacheprovider \
    > "$OUT/gpu_tests_mha_$SESSION.log" 2>&1
echo "tests rc=$?"; tail -3 "$OUT/gpu_tests_mha_$SESSION.log"; pack
timeout ${VTILES_S:-70} python -m eval.bench.v_tiles --agents 64 --ranks 32 64 \
    --out "$OUT/bench_v_tiles_$SESSION.json" > "$OUT/bench_v_tiles_$SESSION.log" 2>&1
echo "v_tiles rc=$?"; tail -4 "$OUT/bench_v_tiles_$SESSION.log"; pack
