#!/usr/bin/env bash
# v18 (issue 19), one device call: the per-kernel profile of the library's rule at 1/8/32/128 agents (32K) on this
# machine, then the K pass's fp16 form (res_f16) against the rule at 1 and 8 agents, where the rule keeps the fp32
# form: v15 measured res_f16 there with B_k converted per call; the library keeps B_k's fp16 copy with the residual
# since v16, so only the queries' conversion is left against it. Results under $OUT (copy to eval/results).
# Shorter: PROFILE=0, SWEEP=0.
set -u
source "$(dirname "$0")/gpu_env.sh"  # $OUT, the tree importable, the device and versions in $OUT/env.txt
if [ "${PROFILE:-1}" = 1 ]; then
    timeout 240 python -m eval.bench.profile_kernel --points 32768:1 32768:8 32768:32 32768:128 \
        --out "$OUT/profile_kernel_v18.json" > "$OUT/profile_kernel_v18.log" 2>&1
    echo "profile rc=$?"; grep "µs:" "$OUT/profile_kernel_v18.log"
fi
if [ "${SWEEP:-1}" = 1 ]; then
    timeout 150 python -m eval.bench.sweep_kernel --stage kres --points 32768:8 32768:1 \
        --candidates '{"kres": [{}, {"res_f16": true}]}' --waves 1 --time-limit 120 \
        --out "$OUT/sweep_kernel_v18.json" > "$OUT/sweep_v18.log" 2>&1
    echo "sweep rc=$?"; grep -i "best\|graph" "$OUT/sweep_v18.log" | tail -8; tail -2 "$OUT/sweep_v18.log"
fi
