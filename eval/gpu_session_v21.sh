#!/usr/bin/env bash
# v21 (issue 19): the shared part in Gluon (forkkv_kernels/shared_gluon.py, shared_form="gluon"): the K/V tiles by TMA
# into an mbarrier ring, the next tile's score MMA in flight under this tile's softmax (or FlashAttention-3's order,
# shared_schedule="fa3"), base only or with K-residual scores (no V residual). Steps:
# 1. its sm_90 compile under this Triton (`eval.bench.offline_kernel --gluon-shared`): registers, spills, the loop;
# 2. its GPU tests (tests/test_shared_gluon.py: real sizes under every knob set, odd shapes, bf16/fp16, masks);
# 3. whole calls, base only, 1-128 agents at 32K (`sweep_kernel --stage shared`): the Triton rule against the Gluon
#    kernel under its knobs, in pass a, and the same in the opposite order in pass b (the run-to-run drift);
# 4. per-kernel profiles (`profile_kernel --variants base`), Gluon / Triton / Triton / Gluon.
# Each step can be left out: OFFLINE=0, TESTS=0, SWEEP_A=0, SWEEP_B=0, PROFILE=0; TESTS_K selects tests (-k).
# SECOND=1 (the second call, after the first had shown 3 stages as the only Gluon setting ahead of the rule, at 128
# agents): instead of steps 3-4, whole calls in the opposite order with the K tiles refilled one tile earlier
# (shared_k_early) against 3 stages, 2 stages and the rule (pass c), and profiles of the three at 32 and 128 agents.
# The calls as made: `SWEEP_B=0 TEST_TIMEOUT=200 bash eval/gpu_session_v21.sh` and `SECOND=1 OFFLINE=0 TESTS_K=real_sizes
# TEST_TIMEOUT=120 ...` (H100). Since then the FA3 order (`shared_schedule`) is removed and 3 buffers are the default:
# the script is the record of those calls; its candidates name knobs as they were then. Next: eval/gpu_session_v22.sh.
# Results: $OUT/v21.tgz (the device returns at most 8 files; packed again after each step), copy to eval/results.
set -u
SESSION=v21
source "$(dirname "$0")/gpu_env.sh"  # the tree importable, the device and versions in $OUT/env.txt
PTS=${PTS:-"32768:1 32768:8 32768:32 32768:128"}
GLUON='{"shared_form": "gluon"}, {"shared_form": "gluon", "shared_schedule": "fa3"}, {"shared_form": "gluon", "num_stages": 3}, {"shared_form": "gluon", "num_warps": 8}, {"shared_form": "gluon", "block_t": 128}'
if [ "${OFFLINE:-1}" = 1 ]; then
    python -m eval.bench.offline_kernel --gluon-shared "[{}, {\"shared_schedule\": \"fa3\"}, {\"num_stages\": 3}, \
{\"num_warps\": 8}, {\"block_t\": 128}, {\"has_k\": true, \"has_mask\": true}]" --out "$OUT/offline_shared_gluon_v21.json" \
        > "$OUT/offline.log" 2>&1
    echo "offline rc=$?"; grep -o '"knobs": {[^}]*}, "regs": [0-9]*, "spill_bytes": [0-9]*' "$OUT/offline.log"; pack
fi
if [ "${TESTS:-1}" = 1 ]; then
    timeout ${TEST_TIMEOUT:-240} python -m pytest -q -m gpu tests/test_shared_gluon.py -p no:cacheprovider -k "${TESTS_K:-gpu}" \
        > "$OUT/gpu_tests_v21.log" 2>&1
    echo "tests rc=$?"; tail -3 "$OUT/gpu_tests_v21.log"; pack
fi
sweep() {  # $1: pass, $2: candidates
    timeout 200 python -m eval.bench.sweep_kernel --stage shared --variants base --waves 1 --points $PTS \
        --candidates "{\"shared\": [$2]}" --time-limit 170 --out "$OUT/sweep_kernel_v21$1.json" > "$OUT/sweep_v21$1.log" 2>&1
    echo "sweep $1 rc=$?"; tail -12 "$OUT/sweep_v21$1.log"; pack
}
if [ "${SECOND:-0}" = 1 ]; then
    G3='{"shared_form": "gluon", "num_stages": 3}'
    G3K='{"shared_form": "gluon", "num_stages": 3, "shared_k_early": true}'
    sweep c "$G3K, $G3, {\"shared_form\": \"gluon\"}, {}"
    PTS="32768:32 32768:128"
    prof() {
        timeout 120 python -m eval.bench.profile_kernel --variants base --points $PTS --knobs "$2" \
            --out "$OUT/profile_kernel_$1.json" > "$OUT/profile_$1.log" 2>&1
        echo "profile $1 rc=$?"; grep "µs:" "$OUT/profile_$1.log"; pack
    }
    prof v21g3k "$G3K"; prof v21t3 '{}'; prof v21g3 "$G3"
    exit 0
fi
[ "${SWEEP_A:-1}" = 1 ] && sweep a "{}, $GLUON"
[ "${SWEEP_B:-1}" = 1 ] && sweep b "$GLUON, {}"
prof() {  # $1: tag, $2: knobs
    timeout 120 python -m eval.bench.profile_kernel --variants base --points $PTS --knobs "$2" \
        --out "$OUT/profile_kernel_$1.json" > "$OUT/profile_$1.log" 2>&1
    echo "profile $1 rc=$?"; grep "µs:" "$OUT/profile_$1.log"; pack
}
if [ "${PROFILE:-1}" = 1 ]; then
    prof v21ga '{"shared_form": "gluon"}'; prof v21ta '{}'; prof v21tb '{}'; prof v21gb '{"shared_form": "gluon"}'
fi
