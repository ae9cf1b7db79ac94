#!/usr/bin/env bash
# v42 (issue 19; eval/KERNEL_NOTES.md "v41 measured", "v42"): (a) the compiled step's kernels with `context_visible`
# (the mask read in the private part only; v41: compiled 103.78 against eager 99.22 ms per step at 256 agents on one
# H100); (b) the Gluon K pass with its rebuild by mma.sync (`res_rebuild="mma_sync"`, forkkv_kernels/kres_gluon_sync.py:
# the heads' rebuilds and rotations interleaved within a warp, never run on a GPU); (c) the fp16 K pass reading the
# RoPE tables in fp16 (`rope16`, the adapter's default since v42: no conversion per tile).
# Parts (PARTS, default "tests sweep decode"):
# - tests: `context_visible` bit for bit against the masked shared part at 8 and 20 agents; the compiled decode's GPU
#   tests; the Gluon K pass's real-size tests with the mma.sync rebuild among their knobs (~200 s);
# - sweep: whole K+V calls at 32K, the rule's Gluon K pass against its mma.sync rebuild (uncapped: 178 registers, 2
#   programs per SM; capped at 160: 3 per SM), the Triton K pass (the rule's below 16 agents) and the Gluon pass
#   converting the RoPE tables per tile as before `rope16` (`"rope16": null`), at 8 / 16 / 32 / 128 / 256 agents, two
#   orders (~2 x 200 s);
# - decode: the capacity decode (256 agents, 8 / 64 tokens, two reps, marked steps) compiled, then eager, back to back
#   (~2 x 220 s; DECODE_PARTS="comp", "eager" or "sync": compiled with `--k-pass sync`);
# - ncu (not in the default): each pipe's share of its peak (`NCU_PIPES=1`) for the K pass with the mma.sync rebuild
#   and for the shared kernel, at 128 agents (~60 s each): whether the interleaving moved the K pass's issue rate, and
#   what limits the shared part (33 of the 256-agent step's 103 ms in v39's profile);
# - path (not in the default; on an H200 when one comes): the library's path at 1 / 8 / 16 / 32 / 128 agents.
# Results: $OUT/v42.tgz.
set -u
SESSION=v42
source "$(dirname "$0")/gpu_env.sh"
PARTS=${PARTS:-"tests sweep decode"}
if has tests; then
    gpu_tests ${TESTS_S:-360} v42 \
        "context_visible or default_compile_equals_eager or two_sizes_replay or gluon_k_pass_real_sizes" \
        tests/test_cascade_kernel.py tests/test_compiled_decode.py tests/test_kres_gluon.py
fi
if has sweep; then
    C='{"kres": [{"res_form": "gluon", "res_f16": true}, {"res_form": "gluon", "res_f16": true, "res_rebuild": "mma_sync"},'
    C+=' {"res_form": "gluon", "res_f16": true, "res_rebuild": "mma_sync", "res_maxnreg": 160}, {"res_form": "joined"},'
    C+=' {"res_form": "gluon", "res_f16": true, "rope16": null}]}'
    SWEEP_S=${SWEEP_S:-200} kres_sweep v42 "$C" ${SWEEP_POINTS:-32768:8 32768:16 32768:32 32768:128 32768:256}
fi
if has decode; then
    for arm in ${DECODE_PARTS:-comp eager}; do
        case $arm in
            comp) capacity_decode ${DECODE_S:-285} v42comp 2 --tokens 8 64 ;;
            eager) capacity_decode ${DECODE_S:-285} v42eager 2 --tokens 8 64 --compile off ;;
            sync) capacity_decode ${DECODE_S:-285} v42sync 2 --tokens 8 64 --k-pass sync ;;
        esac
        pack
    done
fi
if has ncu; then
    K='{"res_form": "gluon", "res_f16": true, "res_rebuild": "mma_sync", "res_maxnreg": 160}'
    NCU_PIPES=1 ncu_stalls ${NCU_S:-120} _kres_scores 1 "$OUT/ncu_v42_kpass_sync.txt" --variants kv \
        --points 32768:128 --knobs "$K"
    echo "ncu kpass rc=$?"; grep -E "gpu__time_duration|Issued Warp|pipe_(fma|tensor)_cycles" \
        "$OUT/ncu_v42_kpass_sync.txt" | head -6; pack
    NCU_PIPES=1 ncu_stalls ${NCU_S:-120} _cascade_shared 1 "$OUT/ncu_v42_shared.txt" --variants kv --points 32768:128
    echo "ncu shared rc=$?"; grep -E "gpu__time_duration|Issued Warp|pipe_(fma|tensor)_cycles" \
        "$OUT/ncu_v42_shared.txt" | head -6; pack
fi
if has path; then
    library_path ${PATH_S:-150} v42 1 8 16 32 128; pack
fi
