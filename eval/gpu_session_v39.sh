#!/usr/bin/env bash
# v39 (issue 19; eval/KERNEL_NOTES.md "v39"): the Gluon K pass's MMAs from plain zero accumulators (118 instructions
# per head and 148 registers offline, against 125 and 166 with v36b's runtime zeros, the same results bit for bit).
# Parts (PARTS, default "tests sweep"):
# - tests: the Gluon K pass's real-size GPU tests (its knobs with res_runtime_zeros; plain and runtime zeros compared
#   bit for bit) and the rule's boundary test (96 / 95 rows; ~250 s);
# - sweep: the rule's Gluon fp16 K pass against it with res_runtime_zeros (v38's rule) and against the Triton K pass
#   (`res_form="joined"`, the rule below 96 agents: whether the threshold moves), whole K+V calls at 32K, at
#   SWEEP_POINTS (default 8 / 32 / 64 / 128 agents), two orders (~180 s);
# - path (not in the default): the library's path at 1 / 8 / 32 / 128 agents (`python -m eval.bench.kernel`, ~150 s);
# - profile (not in the default, a call of its own): the capacity decode (256 agents) once, 8 / 24 tokens (one private
#   capacity), one rep, with the profiler's GPU time per step by kernel family (v38's profiled run at 8 / 64 tokens
#   and two reps was cut by its call's limit; this one ~400 s);
# - threshold (not in the default): the Gluon fp16 K pass against the Triton one at 12 / 16 / 20 / 24 agents (v39's
#   sweep: Gluon 3% slower at 8 agents, 3% faster at 32), two orders (~70 s);
# - decode (not in the default): the capacity decode (256 agents) as v38's, 8 / 64 tokens, two reps (~240 s).
# Results: $OUT/v39.tgz.
set -u
SESSION=v39
source "$(dirname "$0")/gpu_env.sh"
PARTS=${PARTS:-"tests sweep"}
if has tests; then
    gpu_tests ${TESTS_S:-300} v39 "rules_k_pass_boundary or (gluon_k_pass and real_sizes)" tests/test_kres_gluon.py
fi
if has sweep; then
    C='{"kres": [{"res_form": "gluon", "res_f16": true}, {"res_form": "gluon", "res_f16": true, "res_runtime_zeros": true},'
    C+=' {"res_form": "joined"}]}'
    kres_sweep v39 "$C" ${SWEEP_POINTS:-32768:8 32768:32 32768:64 32768:128}
fi
if has path; then
    library_path ${PATH_S:-240} v39 1 8 32 128; pack
fi
if has threshold; then
    kres_sweep v39t '{"kres": [{"res_form": "gluon", "res_f16": true}, {"res_form": "joined"}]}' \
        32768:12 32768:16 32768:20 32768:24
fi
if has decode; then
    capacity_decode ${DECODE_S:-330} v39 2 --tokens 8 64; pack
fi
if has profile; then
    CAPACITY_PROFILE=1 capacity_decode ${DECODE_S:-560} v39prof 1 --tokens 8 24
    grep -E "timed|busy" "$OUT/bench_decode_capacity_v39prof.log" | cut -c1-300; pack
fi
