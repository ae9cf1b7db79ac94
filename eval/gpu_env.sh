# Sourced by the GPU session scripts: $OUT, the device and versions in $OUT/env.txt, and the working tree importable
# without installing (forkkv_hf, forkkv_kernels and the eval package from the tree).
# Everything under eval/ runs as a module from the repository root: python3 -m eval.bench.e2e, -m eval.quality, ...
# A session script sets SESSION (its version, e.g. v39) before sourcing this: its files then go to /tmp/${SESSION}w,
# and `pack` puts them into $FINAL/$SESSION.tgz, $FINAL being the $OUT it was given (the device's); `has PART`: PARTS
# names PART
if [ -n "${SESSION:-}" ]; then
  FINAL=${OUT:-/tmp/out}
  OUT=/tmp/${SESSION}w; [ -n "${KEEP_OUT:-}" ] || rm -rf "$OUT"  # KEEP_OUT=1: a second part of one session's call
  pack() { mkdir -p "$FINAL" && tar czf "$FINAL/$SESSION.tgz" -C "$OUT" .; }
fi
has() { case " $PARTS " in *" $1 "*) return 0;; esac; return 1; }
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -m eval.device  # the device info every result file records (eval/device.py)
} 2>&1 | tee "$OUT/env.txt"
# ncu_stalls LIMIT_S KERNEL_REGEX LAUNCHES OUTFILE ARGS...: ncu's warp-state stall reasons, issue counts and times of
# the first LAUNCHES launches of the kernels matching KERNEL_REGEX in `python3 -m eval.bench.profile_kernel --ncu-once
# ARGS` (clocks not locked), written to OUTFILE; its status is the run's (timeout's: 124 when cut off). NCU_PIPES=1
# adds each pipe's share of its peak issue rate and cycles (which pipe "math pipe throttle" waits on)
ncu_stalls() {
  local limit=$1 kernel=$2 launches=$3 out=$4; shift 4
  local metrics="regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,smsp__inst_executed.sum"
  metrics+=",gpu__time_duration.sum"
  if [ "${NCU_PIPES:-0}" = 1 ]; then
    metrics+=",regex:sm__inst_executed_pipe_.*\.avg\.pct_of_peak_sustained_active"
    metrics+=",regex:sm__pipe_.*_cycles_active\.avg\.pct_of_peak_sustained_active"
  fi
  timeout "$limit" ncu --clock-control none --kernel-name regex:"$kernel" --launch-count "$launches" \
    --section SchedulerStats --section WarpStateStats --section Occupancy --metrics "$metrics" \
    python3 -m eval.bench.profile_kernel --ncu-once "$@" > "$out" 2>&1
}
# gpu_tests LIMIT TAG EXPR FILES...: the GPU tests (`-m gpu`) of FILES that pytest's `-k EXPR` selects, into
# $OUT/gpu_tests_TAG.log; prints its status and summary lines and packs ($SESSION's scripts)
gpu_tests() {
  local limit=$1 tag=$2 expr=$3; shift 3
  timeout "$limit" python -m pytest -q -m gpu "$@" -k "$expr" -p no:cacheprovider > "$OUT/gpu_tests_$tag.log" 2>&1
  echo "tests rc=$?"; grep -E "^FAILED|passed|failed|Error" "$OUT/gpu_tests_$tag.log" | head -12
  if type pack > /dev/null 2>&1; then pack; fi
}
# library_path LIMIT TAG AGENTS...: the library's path at 32K (`python -m eval.bench.kernel`) at these agent counts,
# into $OUT/bench_kernel_TAG.{json,log}; prints its status and the log's tail
library_path() {
  local limit=$1 tag=$2; shift 2
  timeout "$limit" python -m eval.bench.kernel --contexts 32768 --agents "$@" \
    --out "$OUT/bench_kernel_$tag.json" > "$OUT/bench_kernel_$tag.log" 2>&1
  echo "bench rc=$?"; tail -8 "$OUT/bench_kernel_$tag.log"
}
# capacity_decode LIMIT TAG REPS [ARGS...]: the capacity decode with the rule (256 agents, 32K, compiled through
# `generate`, 60 GiB cap; `python -m eval.bench.decode`, ARGS added, e.g. --tokens 8 64), into
# $OUT/bench_decode_capacity_TAG.{json,log}; prints its status and tail. CAPACITY_PROFILE=1: with the profiler's
# GPU-busy time per step (two more calls; the step's kernels by family), else --no-profile
capacity_decode() {
  local limit=$1 tag=$2 reps=$3; shift 3
  local profile=--no-profile; [ "${CAPACITY_PROFILE:-0}" = 1 ] && profile=
  timeout "$limit" python -m eval.bench.decode --agents 256 --compile on --budget-gib 60 --reps "$reps" \
    --freeze-gc $profile --no-anchors --out "$OUT/bench_decode_capacity_$tag.json" "$@" \
    > "$OUT/bench_decode_capacity_$tag.log" 2>&1
  echo "decode rc=$?"; tail -4 "$OUT/bench_decode_capacity_$tag.log"
}
# kres_sweep TAG CANDIDATES POINTS...: the K pass stage over whole K+V calls (`python -m eval.bench.sweep_kernel
# --stage kres`) at POINTS with the CANDIDATES (JSON), once per order in PASSES (default "a b"; b reverses the points),
# each cut at SWEEP_S seconds (default 150), into $OUT/sweep_kernel_TAG{a,b}.json and $OUT/sweep_TAG{a,b}.log; prints
# each order's status and best rows and calls the session script's `pack` after it
kres_sweep() {
  local tag=$1 cand=$2; shift 2
  local limit=${SWEEP_S:-150} pass p
  for pass in ${PASSES:-a b}; do
    p="$*"; [ "$pass" = b ] && p=$(echo "$*" | tr ' ' '\n' | tac | tr '\n' ' ')
    timeout "$limit" python -m eval.bench.sweep_kernel --stage kres --variants kv --waves 1 --points $p \
      --candidates "$cand" --time-limit $(( limit - 30 )) --out "$OUT/sweep_kernel_$tag$pass.json" \
      > "$OUT/sweep_$tag$pass.log" 2>&1
    echo "sweep $pass rc=$?"; grep -E "^BEST" "$OUT/sweep_$tag$pass.log" | head -5; pack
  done
}
# kernel_fuzz SECONDS TAG SEED [ARGS...]: the kernels' random-shape fuzz on the GPU (`python -m eval.bench.fuzz_kernels`,
# ARGS added, e.g. --knobs '{"v_form": "fma"}') for SECONDS, into $OUT/fuzz_kernels_TAG.{json,log}; prints its status
# and tail, and packs (the session scripts' `pack`)
kernel_fuzz() {
  local seconds=$1 tag=$2 seed=$3; shift 3
  timeout $(( seconds + 60 )) python -m eval.bench.fuzz_kernels --seconds "$seconds" --seed "$seed" "$@" \
    --out "$OUT/fuzz_kernels_$tag.json" > "$OUT/fuzz_kernels_$tag.log" 2>&1
  echo "fuzz $tag rc=$?"; tail -5 "$OUT/fuzz_kernels_$tag.log"
  if type pack > /dev/null 2>&1; then pack; fi
}
# mha_tiles LIMIT TAG: the V-residual tiles on MHA shapes (`python -m eval.bench.v_tiles`, 8 / 64 agents, V ranks
# 16-128) into $OUT/bench_v_tiles_TAG.{json,log}; prints its status and tail, and packs
mha_tiles() {
  timeout "$1" python -m eval.bench.v_tiles --agents 8 64 --ranks 16 32 64 128 \
    --out "$OUT/bench_v_tiles_$2.json" > "$OUT/bench_v_tiles_$2.log" 2>&1
  echo "v_tiles rc=$?"; tail -12 "$OUT/bench_v_tiles_$2.log"
  if type pack > /dev/null 2>&1; then pack; fi
}
