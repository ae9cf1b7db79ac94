#!/usr/bin/env bash
# v40 (issue 19; eval/KERNEL_NOTES.md "v39 measured", "v40"): after v39's threshold change (the Gluon K pass from 16
# agents) and the decode benchmark's step marks (`step_ms_marked`: the decode steps alone, CUDA events between each
# call's first and last token, no synchronisation).
# Parts (PARTS, default "decode"):
# - path (run on 2026-12-07, twice: bench_kernel_nvidia_h100_v40{,r}.json): the library's path at 1 / 8 / 16 / 32 /
#   128 agents under the new rule (`python -m eval.bench.kernel`, ~40 s);
# - decode: the capacity decode (256 agents, 8 / 64 tokens, two reps) with the rule, then with v38's runtime zeros
#   (`--k-pass runtime-zeros`), each with its step marks, back to back in one call (~2 x 220 s; DECODE_PARTS="rule"
#   or "rz" for one of them): whether the marks resolve what v39's wall-clock differences (reps 6-17% apart) could not;
# - tests (not in the default): the Gluon K pass's real-size tests, the rule's boundary (16 / 15 rows) and the step
#   marks on CUDA (~200 s).
# Results: $OUT/v40.tgz.
set -u
SESSION=v40
source "$(dirname "$0")/gpu_env.sh"
PARTS=${PARTS:-"decode"}
if has tests; then
    gpu_tests ${TESTS_S:-300} v40 "rules_k_pass_boundary or (gluon_k_pass and real_sizes) or step_marks" \
        tests/test_kres_gluon.py tests/test_eval_scripts.py
fi
if has path; then
    library_path ${PATH_S:-240} v40 1 8 16 32 128; pack
fi
if has decode; then
    for arm in ${DECODE_PARTS:-rule rz}; do
        case $arm in
            rule) capacity_decode ${DECODE_S:-285} v40 2 --tokens 8 64 ;;
            rz) capacity_decode ${DECODE_S:-285} v40rz 2 --tokens 8 64 --k-pass runtime-zeros ;;
        esac
        pack
    done
fi
