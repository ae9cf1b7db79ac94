#!/usr/bin/env bash
# v48 (stop 65): the int64 offsets' cost in the batched LoRA kernel (`python -m eval.bench.lora_offsets`: the kernel
# against its own source without the int64 casts, Llama-3.1-8B's LoRA shapes), every `gpu`-marked test after stop
# 64's fixes (v47's selection collected none), then the kernels' random-shape fuzz (FUZZ_S seconds, default 120).
# Parts (PARTS, default "loraoff gputests fuzz"). Results: $OUT/v48.tgz.
set -u
export SESSION=${SESSION:-v48}
PARTS=${PARTS:-"loraoff gputests fuzz"}
source "$(dirname "$0")/gpu_env.sh"
if has loraoff; then
    timeout 120 python -m eval.bench.lora_offsets --out "$OUT/lora_offsets_$SESSION.json" \
        > "$OUT/lora_offsets_$SESSION.log" 2>&1
    echo "lora offsets rc=$?"; tail -8 "$OUT/lora_offsets_$SESSION.log"; pack
fi
if has gputests; then
    timeout ${TESTS_S:-330} python -m pytest -v -m gpu tests -n ${WORKERS:-8} -p no:cacheprovider \
        --durations=20 > "$OUT/gpu_tests_all_$SESSION.log" 2>&1
    echo "tests rc=$?"; grep -E "FAILED|ERROR|[0-9]+ passed|[0-9]+ failed" "$OUT/gpu_tests_all_$SESSION.log" | tail -20
    pack
fi
if has fuzz; then
    timeout $(( ${FUZZ_S:-120} + 60 )) python -m eval.bench.fuzz_kernels --seconds ${FUZZ_S:-120} --seed 2 \
        --out "$OUT/fuzz_kernels_$SESSION.json" > "$OUT/fuzz_kernels_$SESSION.log" 2>&1
    echo "fuzz rc=$?"; tail -5 "$OUT/fuzz_kernels_$SESSION.log"; pack
fi
