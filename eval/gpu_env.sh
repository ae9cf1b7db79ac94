# Sourced by the GPU session scripts: $OUT, the device and versions in $OUT/env.txt, and the working tree importable
# without installing (forkkv_hf from the tree, forkkv_kernels through a link to kernels/).
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
} 2>&1 | tee "$OUT/env.txt"
mkdir -p /tmp/pp && ln -sfn "$PWD/kernels" /tmp/pp/forkkv_kernels
export PYTHONPATH="$PWD:/tmp/pp"
