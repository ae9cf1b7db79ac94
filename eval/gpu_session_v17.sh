#!/usr/bin/env bash
# v17 (issue 19): the K residual rebuilt inside the shared part (res_form="inline") against the library's rule,
# one device call: GPU kernel tests at real sizes, then the shared-stage sweep of K+V calls at 1/8/32/128 agents.
# then (BENCH=1, default) eval.bench.kernel at 1/8/32 agents with the sweep's fastest knobs per variant.
# Shorter: TESTS=0, BENCH=0, SWEEP_S=<seconds>, POINTS="32768:8 32768:1". Results under $OUT (copy to eval/results).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/env_v17.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/env_v17.txt"
if [ "${TESTS:-1}" = 1 ]; then  # TESTS=0: skip (the sweep checks each configuration against the exact attention)
    timeout 100 python -m pytest -q -m gpu tests/test_cascade_kernel.py -k "real_sizes" -p no:cacheprovider \
        > "$OUT/gpu_tests_v17.txt" 2>&1
    echo "tests rc=$?" >> "$OUT/gpu_tests_v17.txt"
    tail -3 "$OUT/gpu_tests_v17.txt"
fi
CANDS='{"shared": [{},
 {"res_form": "inline"},
 {"res_form": "inline", "block_m": 16, "block_t": 64, "num_warps": 8, "num_stages": 3},
 {"res_form": "inline", "block_m": 16, "block_t": 64, "num_warps": 8, "num_stages": 2},
 {"res_form": "inline", "block_m": 16, "block_t": 32, "num_warps": 8, "num_stages": 3},
 {"res_form": "inline", "block_m": 32, "block_t": 64, "num_warps": 8, "num_stages": 3}]}'
timeout 340 python -m eval.bench.sweep_kernel --stage shared --variants kv --points ${POINTS:-32768:8 32768:1 32768:32 32768:128} \
    --candidates "$CANDS" --waves 1 --time-limit ${SWEEP_S:-240} --out "$OUT/sweep_kernel_v17.json" \
    > "$OUT/sweep_v17.log" 2>&1
grep BEST "$OUT/sweep_v17.log"; tail -2 "$OUT/sweep_v17.log"
if [ "${BENCH:-1}" = 1 ] && [ -s "$OUT/sweep_kernel_v17.json" ]; then
    timeout 130 python -m eval.bench.kernel --contexts 32768 --agents 1 8 32 --tuning-from "$OUT/sweep_kernel_v17.json" \
        --out "$OUT/bench_kernel_v17.json" > "$OUT/bench_kernel_v17.log" 2>&1
    tail -5 "$OUT/bench_kernel_v17.log"
fi
