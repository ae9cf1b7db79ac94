#!/usr/bin/env bash
# v27 (issue 19; eval/KERNEL_NOTES.md "v27"): the V residual's P·u_v in the Gluon shared kernel as one batched
# mma.sync per warp and tile against the warp's rows' u_v tiles side by side (`shared_uv_wide=True`), instead of one
# per row with the other rows' probabilities zeroed. Run once (both parts, 172 s, one H100) at 20e085c: exact, and 15-28%
# slower than the rule (KERNEL_NOTES "v27 measured"); the knob was removed after, so this script needs that commit.
# Parts (PARTS, in order):
# - tests: the V residual's GPU tests (case space with the new knob, real sizes) (~2 minutes);
# - v: whole calls, V only, at 8 / 32 / 128 agents: the Gluon V rule against it, two orders.
# Results: $OUT/v27.tgz, copy to eval/results.
set -u
FINAL=${OUT:-/tmp/out}
OUT=/tmp/v27w; rm -rf "$OUT"
source "$(dirname "$0")/gpu_env.sh"
pack() { mkdir -p "$FINAL" && tar czf "$FINAL/v27.tgz" -C "$OUT" .; }
PARTS=${PARTS:-"tests v"}
has() { case " $PARTS " in *" $1 "*) return 0;; esac; return 1; }
if has tests; then
    timeout 200 python -m pytest -q tests/test_shared_gluon.py -k "v_residual" -p no:cacheprovider \
        > "$OUT/gpu_tests_v27.log" 2>&1
    echo "tests rc=$?"; grep -E "^FAILED|passed|failed" "$OUT/gpu_tests_v27.log" | head -12; pack
fi
if has v; then
    G='{"shared_form": "gluon"}'; W='{"shared_form": "gluon", "shared_uv_wide": true}'
    for pass in a b; do
        if [ $pass = a ]; then C="{\"shared\": [$G, $W]}"; else C="{\"shared\": [$W, $G]}"; fi
        timeout 100 python -m eval.bench.sweep_kernel --stage shared --variants v --waves 1 \
            --points 32768:8 32768:32 32768:128 --candidates "$C" --time-limit 90 \
            --out "$OUT/sweep_kernel_v27$pass.json" > "$OUT/sweep_v27$pass.log" 2>&1
        echo "sweep $pass rc=$?"; grep "^BEST" "$OUT/sweep_v27$pass.log"; grep -o '"config": "[^}]*}", "max_abs_err": [0-9.e-]*, "bound": [0-9.e-]*, "ok": [a-z]*, "splits": [0-9]*, "graph_s": [0-9.e-]*' "$OUT/sweep_v27$pass.log"; pack
    done
fi
