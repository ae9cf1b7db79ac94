#!/usr/bin/env bash
# v38 (issue 19; eval/KERNEL_NOTES.md "v37 measured", "v38"): what v37 left open, and the K pass's cos/sin loads.
# Parts (PARTS, default "tests decode"; SYSTEMS, default "gluon triton"):
# - tests: the rule's boundary GPU test at GLUON_K_FROM = 384 (96 / 95 rows, and res_f16=False; 6 cases, ~130 s);
#   calls of two sizes replaying their CUDA graphs (test_two_sizes_replay_their_cuda_graphs_gpu, the pooled buffers);
#   the Gluon K pass's real-size tests (its knobs now with res_cs_direct, and capped at 128 registers, 4 per SM);
# - sweep (not in the default): the Gluon fp16 K pass as the rule has it, with res_cs_direct (its cos/sin loaded in the
#   rotation's layout: 8 KiB less shared memory, 152 registers instead of 166 offline), and with res_cs_direct capped at
#   128 registers for 4 programs per SM (3 otherwise), at SWEEP_POINTS (default 32 / 128 agents; 32K, K+V, two orders);
# - decode: the capacity decode (256 agents) once per K pass in SYSTEMS, each its own process: "gluon" the rule,
#   "triton" the Triton K pass at every count (`--k-pass triton`: the rule before v36b, fp16 rebuild kept; v37's
#   baseline, FORKKV_F16_K_PASS=0, also dropped the fp16 rebuild); 8 / 64 tokens (56 steps, one private capacity), REPS reps (default 2), the
#   profiler's GPU-busy time per step (CAPACITY_PROFILE=1: not the prefill's jitter), ~250 s each, so one system per
#   call: `PARTS=tests` (~300 s with the two-sizes test's inductor compiles), then `PARTS=sweep` (~100 s),
#   `PARTS=decode SYSTEMS=gluon` and `PARTS=decode SYSTEMS=triton` on the same machine (calls back to back: it goes
#   back after 30 s idle).
# Results: $OUT/v38.tgz. Run at 3fad091 (eval/KERNEL_NOTES.md "v38 measured"); res_cs_direct was removed after it
# (slower or level), so PARTS=sweep needs that commit.
set -u
SESSION=v38
source "$(dirname "$0")/gpu_env.sh"
PARTS=${PARTS:-"tests decode"}
if has tests; then
    gpu_tests ${TESTS_S:-330} v38 "rules_k_pass_boundary or two_sizes or (gluon_k_pass and real_sizes)" \
        tests/test_kres_gluon.py tests/test_compiled_decode.py
fi
if has sweep; then
    C='{"kres": [{"res_form": "gluon", "res_f16": true}, {"res_form": "gluon", "res_f16": true, "res_cs_direct": true},'
    C+=' {"res_form": "gluon", "res_f16": true, "res_cs_direct": true, "res_maxnreg": 128, "res_programs_per_sm": 4}]}'
    kres_sweep v38 "$C" ${SWEEP_POINTS:-32768:32 32768:128}
fi
if has decode; then
    for s in ${SYSTEMS:-gluon triton}; do
        K=rule; [ "$s" = triton ] && K=triton
        CAPACITY_PROFILE=1 capacity_decode ${DECODE_S:-380} "v38$s" ${REPS:-2} --tokens 8 64 --k-pass $K
        grep -E "timed|busy" "$OUT/bench_decode_capacity_v38$s.log" | cut -c1-300; pack
    done
fi
