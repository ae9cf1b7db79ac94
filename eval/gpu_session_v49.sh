#!/usr/bin/env bash
# v49: the Triton shared kernel's fitted V-residual tiles (forkkv_kernels.cascade.v_tiles; v48's fuzz failed on 17 MHA
# rows at V rank 48: 540,672 bytes of shared memory): the new GPU test of MHA shapes at V ranks 32-128 with the
# real-size tests beside it, the fitted tiles against the old ones and SDPA on MHA shapes (`python -m
# eval.bench.v_tiles`), then the kernels' random-shape fuzz (FUZZ_S seconds, default 150, seed 3).
# Parts (PARTS, default "tests vtiles fuzz"). Results: $OUT/v49.tgz.
set -u
export SESSION=${SESSION:-v49}
PARTS=${PARTS:-"tests vtiles fuzz"}
source "$(dirname "$0")/gpu_env.sh"
if has tests; then
    gpu_tests ${TESTS_S:-240} mha "mha_wide or real_sizes" tests/test_cascade_kernel.py
fi
if has vtiles; then
    mha_tiles ${VTILES_S:-240} "$SESSION"
fi
if has fuzz; then
    kernel_fuzz ${FUZZ_S:-150} "$SESSION" 3
fi
