#!/usr/bin/env bash
# v24 and v25 (issue 19), prepared after v23's calls (eval/KERNEL_NOTES.md "v24", "v25"), not yet run. Parts (PARTS,
# default all, in this order; each packs its results):
# - tests: the rule's boundary at real sizes (48 rows take the Gluon shared kernel, 47 the Triton one), the Gluon
#   kernel's real-size knob list (now with 32-token tiles), and the V residual in the Gluon kernel (v25: case space
#   with masks, real sizes with and without K residuals) (~4 minutes);
# - base: whole calls, base only, at 1 / 32 / 48 / 128 agents: the Gluon rule (64-token tiles, 3 buffers), 32-token
#   tiles with 3 buffers and three programs per SM, with 4 and with 6 buffers (two per SM), and the Triton kernel; two
#   passes in opposite orders (a, b);
# - v: whole calls with the V residual (V only, K+V) at 1 / 8 / 32 / 128 agents: the Triton rule against the Gluon
#   kernel's V rule (32-token tiles, 3 buffers) and on 2 buffers, two passes in opposite orders (va, vb);
# - bench: the library's path at 47 / 48 agents (`eval.bench.kernel`).
# e.g. `PARTS="tests v" bash eval/gpu_session_v24.sh`. Results: $OUT/v24.tgz, copy to eval/results.
set -u
SESSION=v24
source "$(dirname "$0")/gpu_env.sh"  # the tree importable, the device and versions in $OUT/env.txt
PARTS=${PARTS:-"tests base v bench"}
if has tests; then
    timeout 300 python -m pytest -q tests/test_shared_gluon.py -k "rule or real_sizes or v_residual" -p no:cacheprovider \
        > "$OUT/gpu_tests_v24.log" 2>&1
    echo "tests rc=$?"; tail -3 "$OUT/gpu_tests_v24.log"; pack
fi
if has base; then
    G='{"shared_form": "gluon"}'
    G32='{"shared_form": "gluon", "block_t": 32, "programs_per_sm": 3}'
    G32S4='{"shared_form": "gluon", "block_t": 32, "num_stages": 4}'
    G32S6='{"shared_form": "gluon", "block_t": 32, "num_stages": 6}'
    T='{"shared_form": "triton"}'
    for pass in a b; do
        if [ $pass = a ]; then C="{\"shared\": [$G, $G32, $G32S4, $G32S6, $T]}"
        else C="{\"shared\": [$T, $G32S6, $G32S4, $G32, $G]}"; fi
        timeout 150 python -m eval.bench.sweep_kernel --stage shared --variants base --waves 1 \
            --points 32768:1 32768:32 32768:48 32768:128 --candidates "$C" --time-limit 130 \
            --out "$OUT/sweep_kernel_v24$pass.json" > "$OUT/sweep_v24$pass.log" 2>&1
        echo "sweep $pass rc=$?"; tail -6 "$OUT/sweep_v24$pass.log"; pack
    done
fi
if has v; then
    T='{"shared_form": "triton"}'; GV='{"shared_form": "gluon"}'; GV2='{"shared_form": "gluon", "num_stages": 2}'
    for pass in va vb; do
        if [ $pass = va ]; then C="{\"shared\": [$T, $GV, $GV2]}"; else C="{\"shared\": [$GV2, $GV, $T]}"; fi
        timeout 170 python -m eval.bench.sweep_kernel --stage shared --variants v kv --waves 1 \
            --points 32768:1 32768:8 32768:32 32768:128 --candidates "$C" --time-limit 150 \
            --out "$OUT/sweep_kernel_v25$pass.json" > "$OUT/sweep_v25$pass.log" 2>&1
        echo "sweep $pass rc=$?"; tail -9 "$OUT/sweep_v25$pass.log"; pack
    done
fi
if has bench; then
    timeout 120 python -m eval.bench.kernel --contexts 32768 --agents 47 48 --out "$OUT/bench_kernel_v24.json" \
        > "$OUT/bench_kernel_v24.log" 2>&1
    echo "bench rc=$?"; tail -3 "$OUT/bench_kernel_v24.log"; pack
fi
