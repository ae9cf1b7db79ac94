#!/usr/bin/env bash
# v51 (planned for the next session with device time): the GPU checks of 2026-12-08's fixes, not yet run on a GPU (the
# rows check before generate, the `prepared` flag of every forward, probes at direct forwards, the TP per-adapter loop
# in sorted order, composite configs, the CUDA-core V form as the rule's pick from 1,024 sub-block columns): every
# `gpu`-marked test (TESTS_S, default 240; v48 took 188 s for all of them); then, if an H200 comes (issue 19's targets
# are stated on one; no H200 since v20), the library's path at 32K and the capacity decode ("path", "decode").
# Parts (PARTS, default "tests path decode"). Results: $OUT/$SESSION.tgz.
set -u
export SESSION=${SESSION:-v51}
PARTS=${PARTS:-"tests path decode"}
source "$(dirname "$0")/gpu_env.sh"
if has tests; then
    gpu_tests ${TESTS_S:-240} "$SESSION" "not nothing" tests -n 6
fi
if has path; then
    library_path ${PATH_S:-150} "$SESSION" 1 8 16 32 128; pack
fi
if has decode; then
    capacity_decode ${DECODE_S:-280} "$SESSION" 2 --tokens 8 64; pack
fi
