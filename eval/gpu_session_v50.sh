#!/usr/bin/env bash
# v50 (planned for the next session with device time): v49's fixes not yet run on a GPU: the MHA tests (fitted tiles
# and the CUDA-core V form, v_form="fma") with the real sizes, on 6 workers; the fitted tiles, the old ones, the
# CUDA-core V form and SDPA on MHA shapes (`python -m eval.bench.v_tiles`, 8K context, 8 / 64 agents, V ranks
# 16-128; decides whether the rule takes v_form="fma" for one vector per row at high ranks); the kernels' fuzz
# (FUZZ_S, default 150, seed 3), and the same fuzz through the CUDA-core V form (FUZZFMA_S, default 90, seed 4).
# Parts (PARTS, default "tests vtiles fuzz fuzzfma"; also "path": the library's path at 32K, 1-128 agents, and
# "decode": the capacity decode, 256 agents compiled through generate, for issue 19's table on whatever card comes).
# Results: $OUT/$SESSION.tgz.
set -u
export SESSION=${SESSION:-v50}
PARTS=${PARTS:-"tests vtiles fuzz fuzzfma"}
source "$(dirname "$0")/gpu_env.sh"
if has tests; then
    timeout ${TESTS_S:-200} python -m pytest -q -m gpu tests/test_cascade_kernel.py -k "mha_wide or real_sizes" -n 6 \
        -p no:cacheprovider > "$OUT/gpu_tests_mha_$SESSION.log" 2>&1
    echo "tests rc=$?"; grep -E "^FAILED|passed|failed|Error" "$OUT/gpu_tests_mha_$SESSION.log" | head -12; pack
fi
if has path; then
    library_path ${PATH_S:-150} "$SESSION" 1 8 16 32 128; pack
fi
if has decode; then
    capacity_decode ${DECODE_S:-280} "$SESSION" 2 --tokens 8 64; pack
fi
if has vtiles; then
    mha_tiles ${VTILES_S:-300} "$SESSION"
fi
if has fuzz; then
    kernel_fuzz ${FUZZ_S:-150} "$SESSION" 3
fi
if has fuzzfma; then
    kernel_fuzz ${FUZZFMA_S:-90} "fma_$SESSION" 4 --knobs '{"v_form": "fma"}'
fi
