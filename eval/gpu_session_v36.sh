#!/usr/bin/env bash
# v36 (issue 19; eval/KERNEL_NOTES.md "v36"): the Gluon K pass with its u tile and cos/sin loaded one tile ahead into
# registers and the rebuild accumulated in fp16 (`res_form="gluon", res_f16=True`) against the rule's Triton K pass,
# whole K+V calls; and what v35b left unrun (the ring's GPU tests at contexts not a multiple of 16 tokens, the K pass's
# stall reasons, the library's path).
# Parts (PARTS, in order):
# - tests: the ring's and the rule's boundary GPU tests (test_shared_gluon.py) and the Gluon K pass's real-size GPU
#   tests (test_kres_gluon.py, res_f16 among its knobs); TESTS_K / TESTS narrow them;
# - sweep: the K pass stage, rule vs the Gluon fp16 form (since v36c also with two KV heads per step, and so at 168
#   registers; the run at 23b9bb1 had the first two only), K+V at 8 / 32 / 128 agents (32K), two orders;
# - ncu: the K pass's stall reasons, the rule's and the Gluon fp16 form's (since v36c also two KV heads per step at 168
#   registers; NCU_FORMS narrows them), K+V at 32 agents;
# - bench (not in the default): the library's path at 1 / 8 / 32 / 128 agents;
# - decode (not in the default): the capacity decode end to end (256 agents, ~5-9 minutes).
# Ran (H100, 2026-12-07): at 23b9bb1 `TESTS_S=150 SWEEP_S=130` (the default parts; the tests part timed out after 37
# passed), then `TESTS="tests/test_shared_gluon.py" TESTS_K="ring or rules_boundary" PARTS=tests` (48 passed), then
# `TESTS="tests/test_kres_gluon.py" TESTS_K="real_sizes" PARTS="tests bench"` (8 passed), then the decode part's
# command by hand with `--reps 2` (eval/KERNEL_NOTES.md "v36 measured"). v36b (the Gluon K pass's stores and score
# chains since) has not run: KERNEL_NOTES "v36b" says what to run next.
# A later session (2026-12-07) got no machine in twenty-two calls: still unrun (KERNEL_NOTES "v36b and v36c still unrun").
# The session after it (2026-12-07, H100): `PARTS=sweep PASSES=a`, then `TESTS="tests/test_kres_gluon.py" TESTS_K="gluon_k_pass
# and real_sizes" PARTS="tests sweep ncu" PASSES=b` (KERNEL_NOTES "v36b measured"; the result files named v36b{a,b}).
# Results: $OUT/v36.tgz.
set -u
SESSION=v36
source "$(dirname "$0")/gpu_env.sh"
PARTS=${PARTS:-"tests sweep ncu"}
if has tests; then
    timeout ${TESTS_S:-240} python -m pytest -q -m gpu ${TESTS:-tests/test_shared_gluon.py tests/test_kres_gluon.py} \
        -k "${TESTS_K:-ring or rules_boundary or gluon_k_pass_real_sizes}" -p no:cacheprovider -x \
        > "$OUT/gpu_tests_v36.log" 2>&1
    echo "tests rc=$?"; grep -E "^FAILED|passed|failed|Error" "$OUT/gpu_tests_v36.log" | head -12; pack
fi
if has sweep; then
    R='{}'; G='{"res_form": "gluon", "res_f16": true}'
    G2='{"res_form": "gluon", "res_f16": true, "res_step_heads": 2}'  # v36c: two KV heads per step
    G2M='{"res_form": "gluon", "res_f16": true, "res_step_heads": 2, "res_maxnreg": 168}'  # ... at 3 programs per SM
    for pass in ${PASSES:-a b}; do  # PASSES=a: the first order only
        if [ $pass = a ]; then C="{\"kres\": [$R, $G, $G2, $G2M]}"; else C="{\"kres\": [$G2M, $G2, $G, $R]}"; fi
        timeout ${SWEEP_S:-150} python -m eval.bench.sweep_kernel --stage kres --variants kv --waves 1 \
            --points 32768:32 32768:128 32768:8 --candidates "$C" --time-limit $(( ${SWEEP_S:-150} - 30 )) \
            --out "$OUT/sweep_kernel_v36$pass.json" > "$OUT/sweep_v36$pass.log" 2>&1
        echo "sweep $pass rc=$?"; grep -E "^BEST|graph" "$OUT/sweep_v36$pass.log" | head -20; pack
    done
fi
if has ncu; then
    for form in ${NCU_FORMS:-rule gluon16 gluon16x2}; do
        case $form in
            rule) K='{}';;
            gluon16) K='{"res_form": "gluon", "res_f16": true}';;
            gluon16x2) K='{"res_form": "gluon", "res_f16": true, "res_step_heads": 2, "res_maxnreg": 168}';;
        esac
        ncu_stalls 100 _kres_scores 1 "$OUT/ncu_v36_$form.txt" --variants kv --points 32768:32 --knobs "$K"
        echo "ncu $form rc=$?"; grep -E "gpu__time_duration|inst_executed|Warp Cycles Per Issued" \
            "$OUT/ncu_v36_$form.txt" | head -4; pack
    done
fi
if has bench; then
    library_path ${BENCH_S:-200} v36 ${AGENTS:-1 8 32 128}; pack
fi
if has decode; then
    capacity_decode ${DECODE_S:-540} v36 3; pack
fi
