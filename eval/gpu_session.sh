#!/usr/bin/env bash
# One GPU-machine session: install the working tree, run the tests (GPU-marked ones included), then the benchmarks
# named in $BENCH (default: kernel). Everything it writes goes under $OUT (the device tool fetches it).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
} 2>&1 | tee "$OUT/env.txt"
# importable without installing: forkkv_hf from the tree, forkkv_kernels through a link to kernels/
mkdir -p /tmp/pp && ln -sfn "$PWD/kernels" /tmp/pp/forkkv_kernels
export PYTHONPATH="$PWD:/tmp/pp"
if [ "${TESTS:-1}" = "1" ]; then
  timeout 300 python3 -m pytest -q -x ${PYTEST_ARGS:-tests} 2>&1 | tail -25 | tee "$OUT/tests.txt"
fi
for b in ${BENCH:-kernel}; do
  timeout ${BENCH_TIMEOUT:-400} python3 eval/bench_$b.py ${BENCH_ARGS:-} --out "$OUT/bench_$b.json" 2>&1 | tail -40 | tee "$OUT/bench_$b.txt"
done
