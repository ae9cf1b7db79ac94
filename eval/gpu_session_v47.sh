#!/usr/bin/env bash
# v47 (stop 64, after the audits' fixes): every `gpu`-marked test (v46's part: the batched LoRA's int64 offsets test
# among them) and the kernels' random-shape fuzz (`python -m eval.bench.fuzz_kernels`: head_dim 48-256, GQA 1-7,
# ranks 1-80 mixed, contexts 1-700, decode and extend, three dtypes, each against its own fp32 reference).
# Parts (PARTS, default "gputests fuzz"); FUZZ_S seconds of fuzz (default 200). Results: $OUT/v47.tgz.
set -u
export SESSION=${SESSION:-v47}
PARTS=${PARTS:-"gputests fuzz"}
if [[ " $PARTS " == *" gputests "* ]]; then
    PARTS=gputests TESTS_S=${TESTS_S:-330} bash "$(dirname "$0")/gpu_session_v46.sh"
fi
KEEP_OUT=1 source "$(dirname "$0")/gpu_env.sh"  # v46's part's files stay in /tmp/${SESSION}w
if has fuzz; then
    timeout $(( ${FUZZ_S:-200} + 60 )) python -m eval.bench.fuzz_kernels --seconds ${FUZZ_S:-200} --seed 1 \
        --out "$OUT/fuzz_kernels_$SESSION.json" > "$OUT/fuzz_kernels_$SESSION.log" 2>&1
    echo "fuzz rc=$?"; tail -5 "$OUT/fuzz_kernels_$SESSION.log"; pack
fi
