#!/usr/bin/env bash
# Issue 18 (compiled decode) on the GPU machine, within one call's limit: the GPU tests of compiled decode, the
# kernel/generate suites (eager paths, cascade default), then the decode-step benchmark (python -m eval.bench.decode)
# in the time left. Everything under $OUT.
#   PART=tests|bench|all (default all); LIMIT: seconds the whole script may take (default 570); the benchmark starts
#   no new case once fewer than CASE_S seconds (default 130) are left; RESUME: a bench_decode JSON from an earlier
#   call (its cases are kept); AGENTS: the N of the benchmark (default "1 8 32 128").
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
PART=${PART:-all}
LIMIT=${LIMIT:-570}
if [ "$PART" = tests ] || [ "$PART" = all ]; then
  timeout ${COMPILED_TEST_TIMEOUT:-200} python3 -m pytest -q -s -p no:cacheprovider -m gpu -rs tests/test_compiled_decode.py \
    > "$OUT/gpu_tests_compiled_decode.txt" 2>&1
  tail -n 12 "$OUT/gpu_tests_compiled_decode.txt"
  timeout ${KERNEL_TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider tests/test_cascade_kernel.py \
    tests/test_kernels.py tests/test_generate.py > "$OUT/gpu_tests_kernels_generate.txt" 2>&1
  tail -n 12 "$OUT/gpu_tests_kernels_generate.txt"
fi
if [ "$PART" = bench ] || [ "$PART" = all ]; then
  left=$((LIMIT - SECONDS))
  timeout $left python3 -m eval.bench.decode --agents ${AGENTS:-1 8 32 128} --context 32768 \
    --time-limit $((left - ${CASE_S:-130})) ${RESUME:+--resume "$RESUME"} --out "$OUT/bench_decode.json" \
    > "$OUT/bench_decode.txt" 2>&1
  grep -v -i warn "$OUT/bench_decode.txt" | tail -n 30
fi
