#!/usr/bin/env bash
# v31 (issue 19; eval/KERNEL_NOTES.md "v30 measured", "v31"), prepared, not run: where the V residual's extra time
# goes in the Gluon shared kernel. ncu reads hardware counters on the Firecracker H100 machines (the device library's
# KINDS.md): base only and V only at 32 and 128 agents through the rule (32 agents base only: the Triton kernel; the
# rest the Gluon kernels): shared-memory wavefronts and bank conflicts of the u_v ring's ldmatrix reads against
# the base's, L2 bytes, issue slots, stall reasons, tensor pipes). Parts (PARTS, in order):
# - probe: `eval.bench.probe_uv` unablated and with the Gluon ablations v28 did not have, `gluon_pu_fixed_tile` (every
#   tile's products read the u_v ring's first slot: the same shared-memory reads, none waiting on new copies) and
#   `gluon_no_uv_wait` (no wait for the tile's copies, no CTA barrier before the products), at 32 / 128 agents (~2
#   minutes; timing only);
# - ncu: the counters above (~3 minutes).
# Results: $OUT/v31.tgz.
set -u
SESSION=v31
source "$(dirname "$0")/gpu_env.sh"
PARTS=${PARTS:-"probe ncu"}
if has probe; then
    for ab in ${ABL:-none gluon_pu_fixed_tile gluon_no_uv_wait}; do
        flag=(); [ $ab != none ] && flag=(--ablate $ab)
        timeout 100 python -m eval.bench.probe_uv --points ${POINTS:-32768:32 32768:128} "${flag[@]}" \
            --out "$OUT/probe_uv_v31_$ab.json" > "$OUT/probe_uv_v31_$ab.log" 2>&1
        echo "probe $ab rc=$?"; grep " us$" "$OUT/probe_uv_v31_$ab.log"; pack
    done
fi
has ncu || exit 0
METRICS=l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum
METRICS=$METRICS,lts__t_bytes.sum,smsp__inst_executed.sum
METRICS=$METRICS,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active
METRICS=$METRICS,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active
timeout 270 ncu --clock-control none --kernel-name regex:"_cascade_shared" --launch-count 4 \
    --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
    --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
    --metrics "$METRICS" \
    python3 -m eval.bench.profile_kernel --ncu-once --variants base v --points ${POINTS:-32768:32 32768:128} \
    > "$OUT/ncu_v31.txt" 2>&1
echo "ncu rc=$?"
grep -E "Duration|Throughput|wavefronts|bank_conflicts|lts__t_bytes|inst_executed|tensor_op|Issue Slots Busy|_cascade_shared" \
    "$OUT/ncu_v31.txt" | head -60
pack
