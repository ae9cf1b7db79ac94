#!/usr/bin/env bash
# v35 (issue 19; eval/KERNEL_NOTES.md "v35", "v35 measured", "v35b", "v35b measured"): the Gluon shared kernel reading
# the K residual's scores from a cp.async ring beside u_v's (`shared_k_load="ring"`, 2 buffers; the rule's pick for
# decode calls with both residuals from 32 query vectors per KV head since v35b) against its plain form (the scores
# loaded in the softmax) and the Triton kernel, K+V calls.
# Parts (PARTS, in order):
# - smoke: the Triton kernel, the Gluon one and the Gluon one with the ring against the exact attention with K and V
#   residuals (decode, extend, a mask; contexts of multiples of 16), 90 s limit (a fault stops the rest);
# - sweep: whole K+V calls at 8 / 32 / 128 agents (32K): Triton, Gluon plain, the rule, two orders;
# - ncu (not in the default): stall reasons of the Gluon shared kernel, plain and with the ring, K+V at 32 agents;
# - ncu_kpass (not in the default): the K pass's stall reasons, K+V at 32 agents;
# - tests: the Gluon kernel's real-size and ring GPU tests (TESTS_K narrows them);
# - bench (not in the default): the library's path at 1 / 8 / 32 / 128 agents (`eval.bench.kernel`, all four columns);
# - decode (not in the default): the capacity decode end to end (`eval.bench.decode`, 256 agents, ~5-9 minutes).
# Ran: at 8ef240c the first smoke / sweep / ncu (H100; a tile-ahead load then measured, since removed), at f474e79 the
# second (H200; the ring, the plain form on 2 buffers, the tile-ahead load), the ring's case space
# (eval/ring_check_v35.py, since moved into tests/test_shared_gluon.py) and two more sweeps; this form of the script is
# what runs on the code that adopted the ring (no GPU time was left to run it).
# Results: $OUT/v35.tgz.
set -u
SESSION=v35
source "$(dirname "$0")/gpu_env.sh"
PARTS=${PARTS:-"smoke sweep tests"}
ok=1
if has smoke; then
    PYTHONPATH="$PWD:$PWD/tests" timeout 90 python - > "$OUT/smoke_v35.log" 2>&1 <<'PY'
import torch
from cases import AttnCase as A
from forkkv_hf import reference_attention
from test_cascade_kernel import _launch
from views import lowp_attention_error
for case, masked in ((A(B=6, H=8, Hkv=2, D=128, T=3008, P=3, N=3, ranks=(8, 16, 32)), False),
                     (A(B=9, H=4, Hkv=4, D=64, T=912, P=3, N=3, ranks=(16, 16, 16)), True),
                     (A(B=4, H=8, Hkv=2, D=128, T=1040, P=5, Q=3, N=2, ranks=(16, 16)), False)):
    for dtype in (torch.bfloat16, torch.float16):
        q, view, scale = case.query(dtype), case.view(dtype), case.D**-0.5
        mask = case.mask() if masked else None
        ref = reference_attention(q.float(), view, mask, scale)
        lowp = lowp_attention_error(q.float(), view, mask, scale, ref)
        for knobs in ({}, {"shared_form": "gluon"}, {"shared_form": "gluon", "shared_k_load": "ring"}):
            err = (_launch(q, view, mask, scale, **knobs).float() - ref).abs().max().item()
            print(f"{knobs} T={case.T} Q={case.Q} {dtype} mask={masked} err={err:.3g} lowp={lowp:.3g} "
                  f"ok={err <= 3 * lowp + 1e-5}", flush=True)
            assert err <= 3 * lowp + 1e-5
PY
    rc=$?; echo "smoke rc=$rc"; tail -6 "$OUT/smoke_v35.log"; pack
    [ $rc = 0 ] || ok=0
fi
if has sweep && [ $ok = 1 ]; then
    T='{"shared_form": "triton"}'; G='{"shared_form": "gluon", "shared_k_load": "softmax"}'; R='{}'
    for pass in a b; do
        if [ $pass = a ]; then C="{\"shared\": [$T, $G, $R]}"; else C="{\"shared\": [$R, $G, $T]}"; fi
        timeout ${SWEEP_S:-170} python -m eval.bench.sweep_kernel --stage shared --variants kv --waves 1 \
            --points 32768:8 32768:32 32768:128 --candidates "$C" --time-limit $(( ${SWEEP_S:-170} - 30 )) \
            --out "$OUT/sweep_kernel_v35$pass.json" > "$OUT/sweep_v35$pass.log" 2>&1
        echo "sweep $pass rc=$?"; grep "^BEST" "$OUT/sweep_v35$pass.log"; pack
    done
fi
if has ncu && [ $ok = 1 ]; then
    for form in sync ring; do
        K='{"shared_form": "gluon"}'; [ $form = ring ] && K='{"shared_form": "gluon", "shared_k_load": "ring"}'
        ncu_stalls 120 _cascade_shared 1 "$OUT/ncu_v35_$form.txt" --variants kv --points 32768:32 --knobs "$K"
        echo "ncu $form rc=$?"; grep -E "gpu__time_duration|inst_executed|Warp Cycles Per Issued" \
            "$OUT/ncu_v35_$form.txt" | head -6; pack
    done
fi
if has ncu_kpass && [ $ok = 1 ]; then  # the K pass's stall reasons (never taken apart by ncu's warp states)
    ncu_stalls 120 _kres_scores 1 "$OUT/ncu_v35_kpass.txt" --variants kv --points 32768:32
    echo "ncu_kpass rc=$?"; grep -E "gpu__time_duration|inst_executed|Warp Cycles Per Issued" \
        "$OUT/ncu_v35_kpass.txt" | head -4; pack
fi
if has bench && [ $ok = 1 ]; then
    library_path ${BENCH_S:-200} v35 ${AGENTS:-1 8 32 128}; pack
fi
if has decode && [ $ok = 1 ]; then  # the capacity decode with the rule (256 agents, 32K, compiled, 60 GiB cap)
    capacity_decode ${DECODE_S:-540} v35 3; pack
fi
if has tests && [ $ok = 1 ]; then
    timeout ${TESTS_S:-200} python -m pytest -q -m gpu ${TESTS:-tests/test_shared_gluon.py} \
        -k "${TESTS_K:-real_sizes_gpu or ring}" -p no:cacheprovider > "$OUT/gpu_tests_v35.log" 2>&1
    echo "tests rc=$?"; grep -E "^FAILED|passed|failed" "$OUT/gpu_tests_v35.log" | head -12; pack
fi
