#!/usr/bin/env bash
# v38 (issue 19; eval/KERNEL_NOTES.md "v37 measured"): what v37 left open.
# Parts (PARTS, default "tests decode"; SYSTEMS, default "gluon triton"):
# - tests: the rule's boundary GPU test at GLUON_K_FROM = 384 (96 / 95 rows, and res_f16=False; 6 cases, ~130 s);
#   calls of two sizes replaying their CUDA graphs (test_two_sizes_replay_their_cuda_graphs_gpu, the pooled buffers);
# - decode: the capacity decode (256 agents) once per K pass in SYSTEMS, each its own process: "gluon" the rule,
#   "triton" the Triton K pass at every count (`--k-pass triton`: the rule before v36b, fp16 rebuild kept; v37's
#   baseline, FORKKV_F16_K_PASS=0, also dropped the fp16 rebuild); 8 / 64 tokens (56 steps, one private capacity), REPS reps (default 2), the
#   profiler's GPU-busy time per step (CAPACITY_PROFILE=1: not the prefill's jitter), ~250 s each, so one system per
#   call: `PARTS=tests` (~250 s with the two-sizes test's inductor compiles), then `PARTS=decode SYSTEMS=gluon` and
#   `PARTS=decode SYSTEMS=triton` on the same machine (calls back to back: it goes back after 30 s idle).
# Results: $OUT/v38.tgz.
set -u
FINAL=${OUT:-/tmp/out}
OUT=/tmp/v38w; rm -rf "$OUT"
source "$(dirname "$0")/gpu_env.sh"
pack() { mkdir -p "$FINAL" && tar czf "$FINAL/v38.tgz" -C "$OUT" .; }
PARTS=${PARTS:-"tests decode"}
has() { case " $PARTS " in *" $1 "*) return 0;; esac; return 1; }
if has tests; then
    timeout ${TESTS_S:-330} python -m pytest -q -m gpu tests/test_kres_gluon.py tests/test_compiled_decode.py \
        -k "rules_k_pass_boundary or two_sizes" -p no:cacheprovider > "$OUT/gpu_tests_v38.log" 2>&1
    echo "tests rc=$?"; grep -E "^FAILED|passed|failed|Error" "$OUT/gpu_tests_v38.log" | head -12; pack
fi
if has decode; then
    for s in ${SYSTEMS:-gluon triton}; do
        K=rule; [ "$s" = triton ] && K=triton
        CAPACITY_PROFILE=1 capacity_decode ${DECODE_S:-380} "v38$s" ${REPS:-2} --tokens 8 64 --k-pass $K
        grep -E "timed|busy" "$OUT/bench_decode_capacity_v38$s.log" | cut -c1-300; pack
    done
fi
