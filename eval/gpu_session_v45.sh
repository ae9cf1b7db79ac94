#!/usr/bin/env bash
# v45 (after v44; eval/RESULTS.md "v44"): the baseline's capacity under 60 GiB with the end-to-end benchmark's new
# search (eval.bench.e2e._capacity: one N at a time up from the largest measured, stopping at the first out of memory):
# whether 5 agents fail with no OOM before them (they did: ForkKV's leftover factors, fixed; run again after the fix).
# Parts (PARTS, default "capacity"): capacity (~5 min; the baseline at 1 and 4 agents, ForkKV at 1, then 5, 6, 7 until
# one does not fit); tests (v44's user-compiled tests, ~60 s). Results: $OUT/v45.tgz. The parts are v44's script's.
SESSION=v45 PARTS=${PARTS:-capacity} exec bash "$(dirname "$0")/gpu_session_v44.sh"
