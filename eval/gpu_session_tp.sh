#!/usr/bin/env bash
# A 2-GPU session for tensor parallelism: the GPU tests of the multi-GPU paths, then eval.bench.tp on one GPU and
# under torchrun with tp_plan="auto" on two (a random Llama-3.1-8B-shaped checkpoint is written first: tp_plan loads
# through from_pretrained). Everything it writes goes under $OUT.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
start=$(date +%s)
timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -m gpu ${TESTS:-tests/test_tensor_parallel.py tests/test_multi_device.py tests/test_batched_lora.py} 2>&1 | tail -15 | tee "$OUT/tests.txt"
echo "tests done at $(( $(date +%s) - start )) s" | tee -a "$OUT/tests.txt"
CK=${CK:-/tmp/ck8b}
[ -d "$CK" ] || timeout 300 python3 -m eval.bench.tp --make-checkpoint "$CK" 2>&1 | tail -2
echo "checkpoint at $(( $(date +%s) - start )) s"
ARGS=${ARGS:-}
timeout ${ONE_TIMEOUT:-200} python3 -m eval.bench.tp --checkpoint "$CK" $ARGS --out "$OUT/bench_tp_x1.json" 2>&1 | grep -v -i warn | tail -8 | tee "$OUT/bench_tp_x1.txt"
echo "one GPU done at $(( $(date +%s) - start )) s"
timeout ${TP_TIMEOUT:-240} python3 -m torch.distributed.run --standalone --nproc_per_node 2 -m eval.bench.tp --checkpoint "$CK" $ARGS --out "$OUT/bench_tp_x2.json" 2>&1 | grep -v -i warn | tail -8 | tee "$OUT/bench_tp_x2.txt"
echo "tp done at $(( $(date +%s) - start )) s"
