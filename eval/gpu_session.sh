#!/usr/bin/env bash
# One GPU-machine session: make the working tree importable, run the tests named in $TESTS (pytest args; empty to
# skip), then the benchmarks in $SCRIPTS (default: the kernel benchmark, eval.bench.kernel), each a module run with
# python3 -m (or a path to a .py file); each gets --out $OUT/<name>.json (name: the module without "eval." and with
# dots as underscores, e.g. bench_kernel for eval.bench.kernel; the file's name for a .py path). Everything it writes
# goes under $OUT.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
if [ -n "${TESTS-tests/test_kernels.py}" ]; then
  timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q ${TESTS-tests/test_kernels.py} ${TEST_K:+-k "$TEST_K"} 2>&1 | tail -25 | tee "$OUT/tests.txt"
fi
if [ -n "${NCU:-}" ]; then  # NCU="script.py args" or NCU="-m module args": hardware counters of the cascade kernels'
  # launches (the K pass, the shared part, the private part + merge), e.g. NCU="-m eval.bench.profile_kernel --ncu-once"
  timeout 240 ncu --clock-control none --kernel-name regex:"${NCU_KERNELS:-_kres_scores|_cascade_shared|_private_merge}" \
    --launch-count ${NCU_LAUNCHES:-12} --section SpeedOfLight --section LaunchStats --section Occupancy \
    --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    python3 $NCU > "$OUT/ncu.txt" 2>&1
  tail -5 "$OUT/ncu.txt"
fi
for script in ${SCRIPTS:-eval.bench.kernel}; do
  if [[ "$script" == *.py ]]; then
    name=$(basename "$script" .py); run=("$script")
  else
    name=${script#eval.}; name=${name//./_}; run=(-m "$script")
  fi
  timeout ${SCRIPT_TIMEOUT:-400} python3 "${run[@]}" ${ARGS:-} --out "$OUT/$name.json" 2>&1 | tail -${TAIL:-30} | tee "$OUT/$name.txt"
done
