#!/usr/bin/env bash
# v42 (issue 19; eval/KERNEL_NOTES.md "v41 measured"): the compiled step's kernels with `context_visible` (the mask read
# in the private part only; v41: compiled 103.78 against eager 99.22 ms per step at 256 agents on one H100).
# Parts (PARTS, default "tests decode"):
# - tests: `context_visible` bit for bit against the masked shared part at 8 and 20 agents, the compiled decode's GPU
#   tests (compiled against eager tokens, graphs replayed) (~150 s);
# - decode: the capacity decode (256 agents, 8 / 64 tokens, two reps, marked steps) compiled, then eager, back to back
#   on one machine (~2 x 220 s; DECODE_PARTS="comp" or "eager" for one of them). Prediction: compiled ~99-100 ms;
# - path (not in the default; on an H200 when one comes): the library's path at 1 / 8 / 16 / 32 / 128 agents.
# Results: $OUT/v42.tgz.
set -u
SESSION=v42
source "$(dirname "$0")/gpu_env.sh"
PARTS=${PARTS:-"tests decode"}
if has tests; then
    gpu_tests ${TESTS_S:-300} v42 "context_visible or default_compile_equals_eager or two_sizes_replay" \
        tests/test_cascade_kernel.py tests/test_compiled_decode.py
fi
if has decode; then
    for arm in ${DECODE_PARTS:-comp eager}; do
        case $arm in
            comp) capacity_decode ${DECODE_S:-285} v42comp 2 --tokens 8 64 ;;
            eager) capacity_decode ${DECODE_S:-285} v42eager 2 --tokens 8 64 --compile off ;;
        esac
        pack
    done
fi
if has path; then
    library_path ${PATH_S:-150} v42 1 8 16 32 128; pack
fi
