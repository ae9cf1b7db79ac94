#!/usr/bin/env bash
# Issue 18 (compiled decode) on the GPU machine, within one call's limit. PARTS (default "compiled kernels bench", run
# in that order): compiled = the GPU tests of compiled decode (bf16 pass rule, default compile); kernels = the
# kernel/generate suites (eager paths, cascade default); hostprof = the compiled N=1 row again with --host-profile (where
# the host's part of a step goes; its own JSON, bench_decode_host.json); bench = the decode-step benchmark
# (python -m eval.bench.decode); warmfirst = its compiled rows' first call again in a new process (compile caches
# on disk); kbench = the kernel benchmark (python -m eval.bench.kernel, bench_kernel.json, saved
# after each case).
# Everything under $OUT.
#   LIMIT: seconds the whole script may take (default 570); each part gets what is left (a test part at most
#   TEST_S, default 200); the benchmark starts no new case once fewer than CASE_S seconds (default 100) are left;
#   RESUME: a bench_decode JSON from an earlier call (its cases are kept); AGENTS: the benchmark's N (default
#   "1 8 32 128"); COMPILE: its compile settings in order (default "on off"); COMPILED_AGENTS: the N of its
#   compiled rows if not AGENTS; NO_ANCHORS=1: skip the
#   transformers-alone rows; KTESTS: the test files of the kernels part; KBENCH_ARGS: the kernel benchmark's arguments
#   (e.g. "--queries 4 --contexts 1024 4096"); XDIST=N: the kernels part on N pytest-xdist workers (wheels in the
#   ignored .whl/, which the call must carry: pip download --no-deps -d .whl pytest-xdist execnet).
#   REGIONS=1: the compiled decode step with its decoder layer as one nested compile region
#   (FORKKV_COMPILE_REGIONS=on, forkkv_hf.compile_regions).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
[ -n "${REGIONS:-}" ] && export FORKKV_COMPILE_REGIONS=on
LIMIT=${LIMIT:-570}
left() { echo $((LIMIT - SECONDS)); }
for part in ${PARTS:-compiled kernels bench}; do
  t=$(left); [ "$t" -gt 20 ] || break
  case $part in
    compiled)
      timeout $((t < ${TEST_S:-200} ? t : ${TEST_S:-200})) python3 -m pytest -q -s -p no:cacheprovider -m gpu -rs \
        tests/test_compiled_decode.py > "$OUT/gpu_tests_compiled_decode.txt" 2>&1
      grep -E "^T=|passed|failed|Error" "$OUT/gpu_tests_compiled_decode.txt" | tail -n 8 ;;
    kernels)
      xdist=()
      if [ -n "${XDIST:-}" ]; then  # parallel workers: each configuration's Triton compile is CPU work (16 cores there)
        python3 -m pip install -q --no-deps --no-index --target /tmp/xdist .whl/pytest_xdist-*.whl .whl/execnet-*.whl \
          && export PYTHONPATH="$PYTHONPATH:/tmp/xdist" && xdist=(-n "$XDIST")
      fi
      timeout $((t < ${TEST_S:-200} ? t : ${TEST_S:-200})) python3 -m pytest -q -p no:cacheprovider "${xdist[@]}" \
        ${KTESTS:-tests/test_cascade_kernel.py tests/test_kernels.py tests/test_generate.py} > "$OUT/gpu_tests_kernels_generate.txt" 2>&1
      tail -n 5 "$OUT/gpu_tests_kernels_generate.txt" ;;
    hostprof)
      timeout $t python3 -m eval.bench.decode --agents 1 --context 32768 --compile on --no-anchors --host-profile \
        --out "$OUT/bench_decode_host.json" > "$OUT/bench_decode_host.txt" 2>&1
      grep -v -i warn "$OUT/bench_decode_host.txt" | cut -c1-300 | tail -n 4 ;;
    bench)
      timeout $t python3 -m eval.bench.decode --agents ${AGENTS:-1 8 32 128} --context 32768 --compile ${COMPILE:-on off} \
        ${COMPILED_AGENTS:+--compiled-agents $COMPILED_AGENTS} \
        --time-limit $((t - ${CASE_S:-100})) ${RESUME:+--resume "$RESUME"} ${NO_ANCHORS:+--no-anchors} \
        --out "$OUT/bench_decode.json" \
        > "$OUT/bench_decode.txt" 2>&1
      grep -v -i warn "$OUT/bench_decode.txt" | cut -c1-400 | tail -n 12 ;;
    warmfirst)  # the compiled rows' first call again in a new process (the compile caches of the bench part on disk)
      timeout $t python3 -m eval.bench.decode --agents ${COMPILED_AGENTS:-${AGENTS:-1 8 32 128}} --context 32768 \
        --compile on --no-anchors --first-call-only --out "$OUT/bench_decode_first_call.json" \
        > "$OUT/bench_decode_first_call.txt" 2>&1
      grep -v -i warn "$OUT/bench_decode_first_call.txt" | cut -c1-300 | tail -n 6 ;;
    kbench)
      timeout $t python3 -m eval.bench.kernel ${KBENCH_ARGS:-} --out "$OUT/bench_kernel.json" > "$OUT/bench_kernel.txt" 2>&1
      grep -v -i warn "$OUT/bench_kernel.txt" | cut -c1-200 | tail -n 16 ;;
  esac
done
