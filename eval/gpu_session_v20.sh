#!/usr/bin/env bash
# v20 (issue 19), one device call: the shared kernel's context loop split into whole tiles read and scored without
# a token mask and the split's masked last tile, and the softmax scale fused into exp2's argument (one FMA per score).
# 1. the shared kernel's SASS under this Triton, this tree's and v19's (`eval.bench.offline_kernel
#    --shared-variants`), for the instruction counts of each context loop;
# 2. the per-kernel profile (`eval.bench.profile_kernel`) of this tree and of v19's kernels (.ref/v19, carried: the
#    kernels of commit 32fed87), each twice in opposite orders (the run-to-run spread);
# 3. the GPU tests of the cascade kernels (every knob set, odd contexts, bf16/fp16) and the library's kernel tests;
# 4. the library's path at 1-128 agents (`eval.bench.kernel`).
# Each step can be left out: OFFLINE=0, PROFILE=0, TESTS=0, BENCH=0; SWEEP=1 adds (before the tests) `sweep_kernel
# --stage merge` of whole calls at 1-128 agents, the rule against `whole_tiles=False`, twice in opposite orders (the
# knob exists at commit 0c6e7ba only: v20's whole tiles were measured there and removed after; eval/KERNEL_NOTES.md
# "v20 measured"). The calls as made: `bash eval/gpu_session_v20.sh` (H200; its profiles' v19 side ran v20's kernels,
# `python -m` putting the working directory first, so they were discarded), `BENCH=0 TEST_TIMEOUT=330 ...` (H200,
# the A/B profiles), `OFFLINE=0 PROFILE=0 SWEEP=1 BENCH=0 TEST_TIMEOUT=200 ...` (H100), then at commit 0d85c44 (the
# scale fused, one masked loop) `OFFLINE=0 PROFILE=0 TEST_TIMEOUT=330 ...` and `OFFLINE=0 TESTS=0 BENCH=0
# PTS="32768:128 32768:32" ...` (H100); last, with the kernels back at v19's, a `sweep_kernel --stage shared` of wider
# score tiles written out in the call (its command: eval/KERNEL_NOTES.md "v20").
# Results: $OUT/v20.tgz (the device returns at most 8 files; packed again after each step), copy to eval/results.
set -u
SESSION=v20
source "$(dirname "$0")/gpu_env.sh"  # the tree importable, the device and versions in $OUT/env.txt
ROOT=$PWD
REF="$ROOT/.ref/v19"
[ -d "$REF/forkkv_kernels" ] || { echo "no $REF: make it here (mkdir -p .ref/v19/forkkv_kernels; for f in \$(git ls-files \
forkkv_kernels); do git show 32fed87:\$f > .ref/v19/\$f; done) and pass carry=[\".ref\"]"; exit 2; }
if [ "${OFFLINE:-1}" = 1 ]; then
    python -m eval.bench.offline_kernel --shared-variants 128 32 8 1 --out "$OUT/offline_shared_v20.json" \
        > "$OUT/offline_shared.log" 2>&1
    # v19's kernels: run from $REF, since `python -m` puts the working directory ahead of PYTHONPATH
    (cd "$REF" && PYTHONPATH="$ROOT" python -m eval.bench.offline_kernel --shared-variants 128 32 8 1 \
        --out "$OUT/offline_shared_v19.json" >> "$OUT/offline_shared.log" 2>&1)
    echo "offline rc=$?"; pack
fi
PTS=${PTS:-"32768:1 32768:8 32768:32 32768:128"}
prof() {  # $1: tag, $2: the directory whose forkkv_kernels runs
    (cd "$2" && python -c "import forkkv_kernels.cascade as c; print(c.__file__)" && timeout 150 python -m eval.bench.profile_kernel --points $PTS --out "$OUT/profile_kernel_$1.json" \
        > "$OUT/profile_$1.log" 2>&1)
    echo "profile $1 rc=$?"; head -1 "$OUT/profile_$1.log"; grep "µs:" "$OUT/profile_$1.log"; pack
}
[ "${PROFILE:-1}" = 1 ] && { prof v20a "$ROOT"; prof v19a "$REF"; prof v19b "$REF"; prof v20b "$ROOT"; }
if [ "${SWEEP:-0}" = 1 ]; then  # whole tiles (the rule) against every tile masked, whole calls, twice in opposite orders
    for pass in a b; do
        if [ $pass = a ]; then C='{"merge": [{}, {"whole_tiles": false}]}'; else C='{"merge": [{"whole_tiles": false}, {}]}'; fi
        timeout 170 python -m eval.bench.sweep_kernel --stage merge --points $PTS --candidates "$C" --time-limit 150 \
            --out "$OUT/sweep_kernel_v20$pass.json" > "$OUT/sweep_v20$pass.log" 2>&1
        echo "sweep $pass rc=$?"; tail -14 "$OUT/sweep_v20$pass.log"; pack
    done
fi
if [ "${TESTS:-1}" = 1 ]; then
    timeout ${TEST_TIMEOUT:-220} python -m pytest -q -m gpu tests/test_cascade_kernel.py tests/test_kernels.py \
        -p no:cacheprovider > "$OUT/gpu_tests_v20.log" 2>&1
    echo "tests rc=$?"; tail -3 "$OUT/gpu_tests_v20.log"; pack
fi
if [ "${BENCH:-1}" = 1 ]; then
    timeout 150 python -m eval.bench.kernel --contexts 32768 --agents 1 8 32 128 --out "$OUT/bench_kernel_v20.json" \
        > "$OUT/bench_kernel_v20.log" 2>&1
    echo "bench rc=$?"; tail -8 "$OUT/bench_kernel_v20.log"; pack
fi
