#!/usr/bin/env bash
# Issue 18 (compiled decode) on the GPU machine: the GPU tests, then the decode-step benchmark. Everything under $OUT.
#   PART=tests|bench|all (default all); TIME_LIMIT: seconds after which the benchmark starts no new case (default 400);
#   RESUME: a JSON in the working tree from an earlier call (its cases are kept) -- the benchmark spans calls that way.
#   AGENTS: the N of the decode section (default "1 8 32 128 230"; 230 = capacity at 32K under 60 GiB, README).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
PART=${PART:-all}
if [ "$PART" = tests ] || [ "$PART" = all ]; then
  # compiled decode (4K and 32K, default compile: inductor + CUDA graphs) and the kernel/generate suites that cover the
  # refactored Triton launchers in eager mode
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -s -p no:cacheprovider -m gpu -rs tests/test_compiled_decode.py \
    2>&1 | tail -30 | tee "$OUT/gpu_tests_compiled_decode.txt"
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_generate.py \
    2>&1 | tail -15 | tee "$OUT/gpu_tests_kernels_generate.txt"
fi
if [ "$PART" = bench ] || [ "$PART" = all ]; then
  timeout ${BENCH_TIMEOUT:-560} python3 eval/bench_e2e.py --only-decode --decode-agents ${AGENTS:-1 8 32 128 230} \
    --decode-context 32768 --compile on off --time-limit ${TIME_LIMIT:-400} ${RESUME:+--resume "$RESUME"} \
    --out "$OUT/bench_e2e_compile.json" 2>&1 | grep -v Warning | tail -40 | tee "$OUT/bench_e2e_compile.txt"
fi
