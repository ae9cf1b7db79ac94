#!/usr/bin/env bash
# v37 (issue 19; eval/KERNEL_NOTES.md "v36b measured", "v37"): the launch rule with the Gluon K pass for K+V decode
# calls from 512 query vectors per KV head (forkkv_kernels/rules.py GLUON_K_FROM).
# Parts (PARTS; run in the order tests, sweep, bench, decode):
# - tests: the rule's boundary GPU tests (the Gluon K pass at 128 rows, the Triton one at 127 and without fp16; the
#   shared kernel's boundary at 2,053 tokens);
# - bench: the library's path at 1 / 8 / 32 / 128 agents (AGENTS);
# - decode: the capacity decode end to end (256 agents, REPS repetitions, ~4-9 minutes);
# - sweep (not in the default): the Triton K pass against the Gluon fp16 one, each named (the rule's res_f16 either
#   way), at SWEEP_POINTS (default between the measured points, 48 / 64 / 96 agents; 32K, K+V, two orders): where
#   GLUON_K_FROM belongs.
# Run 2026-12-07 on one H100 (KERNEL_NOTES "v37 measured"); the tests now sit at GLUON_K_FROM = 384 (96 / 95 rows).
# Results: $OUT/v37.tgz.
set -u
SESSION=v37
source "$(dirname "$0")/gpu_env.sh"
PARTS=${PARTS:-"tests bench decode"}
if has tests; then
    gpu_tests ${TESTS_S:-200} v37 "${TESTS_K:-rules_k_pass_boundary or rules_boundary}" tests/test_kres_gluon.py \
        tests/test_shared_gluon.py
fi
if has sweep; then
    C='{"kres": [{"res_form": "joined"}, {"res_form": "gluon", "res_f16": true}]}'  # the Triton pass, the Gluon one
    SWEEP_S=${SWEEP_S:-120} kres_sweep v37 "$C" ${SWEEP_POINTS:-32768:48 32768:64 32768:96}
fi
if has bench; then
    library_path ${BENCH_S:-200} v37 ${AGENTS:-1 8 32 128}; pack
fi
if has decode; then
    capacity_decode ${DECODE_S:-400} v37 ${REPS:-2}; pack
fi
