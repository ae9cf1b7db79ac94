#!/usr/bin/env bash
# v33 (issue 19; eval/KERNEL_NOTES.md "v31 and v32 measured", "v33"): the Gluon shared kernel's lazy softmax
# (`shared_lazy=True`: a row keeps its running max until a tile's passes it by more than 2^8, and the output's rescale
# runs only on tiles that move a max, behind one program-wide test), and ncu's stall reasons of the kernels it changes.
# Parts (PARTS, in order; all four ~7 minutes):
# - smoke: the lazy form against the exact attention on keys scaled up along the context (maxima that move), base and
#   V, 60 s limit (a fault stops the rest);
# - sweep: whole calls, base only at 32 / 128 agents and V only at 8 / 32 / 128: the Gluon kernel with and without
#   the lazy softmax, two orders;
# - ncu: stall reasons (smsp__average_warps_issue_stalled_*_per_issue_active) and issue counts of the Gluon kernels at
#   128 agents, base and V only, the rule's and the lazy form;
# - tests: tests/test_shared_gluon.py on the GPU (TESTS_K narrows it; TESTS names other files).
# - bench (not in the default): the library's path at 1 / 8 / 32 / 128 agents (`eval.bench.kernel`, all four columns).
# The first four ran at e9581fa (the lazy form measured slower and removed after; KERNEL_NOTES "v33 measured"): with
# the lazy form gone, `PARTS="bench tests"` is what runs on later code.
# Results: $OUT/v33.tgz.
set -u
SESSION=v33
source "$(dirname "$0")/gpu_env.sh"
PARTS=${PARTS:-"smoke sweep ncu tests"}
ok=1
if has smoke; then
    PYTHONPATH="$PWD:$PWD/tests" timeout 60 python - > "$OUT/smoke_v33.log" 2>&1 <<'PY'
import torch
from cases import AttnCase as A
from forkkv_hf import reference_attention
from test_cascade_kernel import _launch
from views import lowp_attention_error
for case in (A(B=5, H=8, Hkv=2, D=64, T=1029, P=2, N=3, ranks=(16, 16, 16), k_res=False, v_res=False),
             A(B=6, H=8, Hkv=2, D=128, T=3000, P=3, Q=2, N=3, ranks=(8, 16, 32), k_res=False),
             A(B=9, H=4, Hkv=4, D=64, T=900, P=3, N=3, ranks=(16, 16, 16), k_res=False)):
    q, view, scale = case.query(torch.bfloat16), case.view(torch.bfloat16), case.D**-0.5
    key = view.shared.key
    key.mul_(torch.linspace(0.25, 6.0, key.shape[2]).to(key)[None, None, :, None])
    ref = reference_attention(q.float(), view, None, scale)
    lowp = lowp_attention_error(q.float(), view, None, scale, ref)
    for knobs in ({"shared_form": "gluon"}, {"shared_form": "gluon", "shared_lazy": True}):
        err = (_launch(q, view, None, scale, **knobs).float() - ref).abs().max().item()
        print(f"{knobs} T={case.T} err={err:.3g} lowp={lowp:.3g} ok={err <= 3 * lowp + 1e-5}", flush=True)
PY
    rc=$?; echo "smoke rc=$rc"; tail -6 "$OUT/smoke_v33.log"; pack
    [ $rc = 0 ] || ok=0
fi
if has sweep && [ $ok = 1 ]; then
    G='{"shared_form": "gluon"}'; L='{"shared_form": "gluon", "shared_lazy": true}'
    for pass in a b; do
        if [ $pass = a ]; then C="{\"shared\": [$G, $L]}"; else C="{\"shared\": [$L, $G]}"; fi
        timeout 150 python -m eval.bench.sweep_kernel --stage shared --variants base v --waves 1 \
            --points 32768:8 32768:32 32768:128 --candidates "$C" --time-limit 130 \
            --out "$OUT/sweep_kernel_v33$pass.json" > "$OUT/sweep_v33$pass.log" 2>&1
        echo "sweep $pass rc=$?"; grep "^BEST" "$OUT/sweep_v33$pass.log"; pack
    done
fi
if has ncu && [ $ok = 1 ]; then
    for form in rule lazy; do
        K='{}'; [ $form = lazy ] && K='{"shared_lazy": true}'
        ncu_stalls 120 _cascade_shared 2 "$OUT/ncu_v33_$form.txt" --variants base v --points 32768:128 --knobs "$K"
        echo "ncu $form rc=$?"; grep -E "_cascade_shared|gpu__time_duration|inst_executed|Warp Cycles Per Issued" \
            "$OUT/ncu_v33_$form.txt" | head -12; pack
    done
fi
if has bench && [ $ok = 1 ]; then
    library_path ${BENCH_S:-200} v33 ${AGENTS:-1 8 32 128}; pack
fi
if has tests && [ $ok = 1 ]; then
    timeout ${TESTS_S:-300} python -m pytest -q -m gpu ${TESTS:-tests/test_shared_gluon.py} ${TESTS_K:+-k "$TESTS_K"} \
        -p no:cacheprovider > "$OUT/gpu_tests_v33.log" 2>&1
    echo "tests rc=$?"; grep -E "^FAILED|passed|failed" "$OUT/gpu_tests_v33.log" | head -12; pack
fi
