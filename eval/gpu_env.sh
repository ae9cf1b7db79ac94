# Sourced by the GPU session scripts: $OUT, the device and versions in $OUT/env.txt, and the working tree importable
# without installing (forkkv_hf, forkkv_kernels and the eval package from the tree).
# Everything under eval/ runs as a module from the repository root: python3 -m eval.bench.e2e, -m eval.quality, ...
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -m eval.device  # the device info every result file records (eval/device.py)
} 2>&1 | tee "$OUT/env.txt"
