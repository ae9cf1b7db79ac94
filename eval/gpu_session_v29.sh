#!/usr/bin/env bash
# v28 + v29 (issue 19; eval/KERNEL_NOTES.md "v28", "v29"): what the V residual costs in the Gluon shared kernel, and
# the kernel with two KV heads per program sharing the rows' u_v tiles (forkkv_kernels/shared_gluon_pair.py,
# shared_form="gluon_pair", warp specialised; never run before). Parts (PARTS, in order):
# - probe: v28, `eval.bench.probe_uv` unablated and with its two Gluon ablations at 32 / 128 agents (~2 minutes;
#   the loop of v28's script, which this one replaced);
# - smoke: one small pair call against the exact attention, 60 s limit (a hang or a fault stops the pair parts);
# - tests: tests/test_shared_gluon_pair.py on the GPU (case space, real sizes) (~2 minutes);
# - sweep: whole calls, V only, at 8 / 32 / 128 agents: the Gluon V kernel against the pair kernel, two orders.
# Results: $OUT/v29.tgz, copy to eval/results.
set -u
SESSION=v29
source "$(dirname "$0")/gpu_env.sh"
PARTS=${PARTS:-"probe smoke tests sweep"}
if has probe; then
    for ab in ${ABL:-none gluon_no_uv_load gluon_no_pu}; do
        flag=(); [ $ab != none ] && flag=(--ablate $ab)
        timeout 100 python -m eval.bench.probe_uv --points ${POINTS:-32768:32 32768:128} "${flag[@]}" \
            --out "$OUT/probe_uv_v28_$ab.json" > "$OUT/probe_uv_v28_$ab.log" 2>&1
        echo "probe $ab rc=$?"; grep " us$" "$OUT/probe_uv_v28_$ab.log"; pack
    done
fi
pair_ok=1
if has smoke; then
    PYTHONPATH="$PWD:$PWD/tests" timeout 60 python - > "$OUT/pair_smoke_v29.log" 2>&1 <<'PY'
import torch
from cases import AttnCase as A
from forkkv_hf import reference_attention
from test_cascade_kernel import _launch
from views import lowp_attention_error
for case in (A(B=5, H=8, Hkv=2, D=64, T=129, P=2, N=3, ranks=(16, 16, 8), k_res=False),
             A(B=6, H=8, Hkv=2, D=128, T=1000, P=3, Q=2, N=3, ranks=(8, 16, 32))):
    q, view, scale = case.query(torch.bfloat16), case.view(torch.bfloat16), case.D**-0.5
    ref = reference_attention(q.float(), view, None, scale)
    lowp = lowp_attention_error(q.float(), view, None, scale, ref)
    out = _launch(q, view, None, scale, shared_form="gluon_pair")
    err = (out.float() - ref).abs().max().item()
    print(f"pair T={case.T} err={err:.3g} lowp={lowp:.3g} ok={err <= 3 * lowp + 1e-5}", flush=True)
PY
    rc=$?; echo "smoke rc=$rc"; cat "$OUT/pair_smoke_v29.log" | tail -5; pack
    [ $rc = 0 ] || pair_ok=0
fi
if has tests && [ $pair_ok = 1 ]; then
    timeout 240 python -m pytest -q -m gpu tests/test_shared_gluon_pair.py -p no:cacheprovider \
        > "$OUT/gpu_tests_v29.log" 2>&1
    echo "tests rc=$?"; grep -E "^FAILED|passed|failed" "$OUT/gpu_tests_v29.log" | head -12; pack
fi
if has sweep && [ $pair_ok = 1 ]; then
    GV='{"shared_form": "gluon"}'; GP='{"shared_form": "gluon_pair"}'
    for pass in a b; do
        if [ $pass = a ]; then C="{\"shared\": [$GV, $GP]}"; else C="{\"shared\": [$GP, $GV]}"; fi
        timeout 120 python -m eval.bench.sweep_kernel --stage shared --variants v --waves 1 \
            --points ${SWEEP_POINTS:-32768:8 32768:32 32768:128} --candidates "$C" --time-limit 105 \
            --out "$OUT/sweep_kernel_v29$pass.json" > "$OUT/sweep_v29$pass.log" 2>&1
        echo "sweep $pass rc=$?"; grep "^BEST" "$OUT/sweep_v29$pass.log"; grep -E "gluon" "$OUT/sweep_v29$pass.log" | cut -c1-200 | head -12; pack
    done
fi
