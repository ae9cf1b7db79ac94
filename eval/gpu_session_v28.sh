#!/usr/bin/env bash
# v28 (issue 19; eval/KERNEL_NOTES.md "v28"), prepared after v27: what the V residual costs in the Gluon shared
# kernel (the rule's pick for the V residual alone from 32 query vectors per KV head since v26), at 32 and 128 agents,
# 32K, one decode query per row. Parts (PARTS, in order):
# - probe: `eval.bench.probe_uv` unablated (base, V, V with every row on agent 0's u_v, K+V) and with its two Gluon
#   ablations: `gluon_no_uv_load` (the u_v copies masked off: nothing read) and `gluon_no_pu` (the P·u_v products
#   dropped), timing only (~2 minutes);
# - profile: per-kernel time of the V-only call (`eval.bench.profile_kernel --variants v`) (~1 minute).
# ABL / POINTS narrow the probe (e.g. ABL="none gluon_no_uv_load" POINTS=32768:128). Results: $OUT/v28.tgz.
set -u
FINAL=${OUT:-/tmp/out}
OUT=/tmp/v28w; rm -rf "$OUT"
source "$(dirname "$0")/gpu_env.sh"
pack() { mkdir -p "$FINAL" && tar czf "$FINAL/v28.tgz" -C "$OUT" .; }
PARTS=${PARTS:-"probe profile"}
has() { case " $PARTS " in *" $1 "*) return 0;; esac; return 1; }
if has probe; then
    for ab in ${ABL:-none gluon_no_uv_load gluon_no_pu}; do
        flag=(); [ $ab != none ] && flag=(--ablate $ab)
        timeout 100 python -m eval.bench.probe_uv --points ${POINTS:-32768:32 32768:128} "${flag[@]}" \
            --out "$OUT/probe_uv_v28_$ab.json" > "$OUT/probe_uv_v28_$ab.log" 2>&1
        echo "probe $ab rc=$?"; grep " us$" "$OUT/probe_uv_v28_$ab.log"; pack
    done
fi
if has profile; then
    timeout 100 python -m eval.bench.profile_kernel --variants v --points 32768:32 32768:128 \
        --out "$OUT/profile_kernel_v28_v.json" > "$OUT/profile_kernel_v28_v.log" 2>&1
    echo "profile rc=$?"; tail -8 "$OUT/profile_kernel_v28_v.log"; pack
fi
