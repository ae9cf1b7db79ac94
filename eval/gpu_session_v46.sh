#!/usr/bin/env bash
# v46 (stop 64): the parts chosen by the card that comes.
# - on an H200 (issue 19's card; no H200 came in v41-v45), PARTS default "path capacity": the library's path at 1 / 8 /
#   16 / 32 / 128 agents (replaces the README's H200 row of v20, 2026-12-06) and the compiled capacity decode at 256
#   agents under 60 GiB (the issue's end-to-end target is 3,000 tok/s on an H200; v11c's 2,336 is the last H200 figure);
# - on an H100, PARTS default "gputests": every `gpu`-marked test (224 on CPU's count; no session ran them all in one
#   go since the kernels' v6 run), eight pytest-xdist workers, verbose so that a run cut by the limit keeps each
#   test's outcome.
# Results: $OUT/v46.tgz (or $SESSION.tgz where SESSION is set, for a later call of the same script).
set -u
SESSION=${SESSION:-v46}
source "$(dirname "$0")/gpu_env.sh"
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$card" in *H200*) default="path capacity";; *) default="gputests";; esac
PARTS=${PARTS:-$default}
echo "card: $card; parts: $PARTS"
if has path; then
    library_path ${PATH_S:-150} "$SESSION" 1 8 16 32 128; pack
fi
if has capacity; then
    capacity_decode ${CAP_S:-400} "$SESSION" 2 --tokens 8 64; pack
fi
if has gputests; then
    timeout ${TESTS_S:-540} python -m pytest -v -m gpu tests -n ${WORKERS:-8} -p no:cacheprovider \
        --durations=20 ${TEST_ARGS:-} > "$OUT/gpu_tests_all_$SESSION.log" 2>&1
    echo "tests rc=$?"; grep -E "FAILED|ERROR|[0-9]+ passed|[0-9]+ failed" "$OUT/gpu_tests_all_$SESSION.log" | tail -20
    grep -cE "PASSED" "$OUT/gpu_tests_all_$SESSION.log"; pack
fi
