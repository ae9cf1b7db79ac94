#!/usr/bin/env bash
# v30 (issue 19; eval/KERNEL_NOTES.md "v30"): the Gluon shared kernel's V products transposed (u_vᵀ·Pᵀ per row and
# half of its warp's vectors: 8 mma.sync per 32-token tile and warp in 4 independent chains, nothing zeroed) and the
# rescale factor moved to the products' layout without shared memory; never run before. Parts (PARTS, in order):
# - smoke: two small V calls through the rule's Gluon pick against the exact attention, 60 s limit;
# - sweep: whole calls, V only, at 8 / 32 / 128 agents: transposed against untransposed products, two orders;
# - tests: the V residual's GPU tests in bf16 (case space with both product forms, real sizes) and the pair kernel's
#   real sizes (its products, untransposed, take the new rescale) (TESTS_K: another -k; ~3 minutes);
# - bench (not in the default parts): the library's path (`eval.bench.kernel`) at 1 / 8 / 32 / 128 agents.
# Results: $OUT/v30.tgz, copy to eval/results.
set -u
FINAL=${OUT:-/tmp/out}
OUT=/tmp/v30w; rm -rf "$OUT"
source "$(dirname "$0")/gpu_env.sh"
pack() { mkdir -p "$FINAL" && tar czf "$FINAL/v30.tgz" -C "$OUT" .; }
PARTS=${PARTS:-"smoke sweep tests"}
has() { case " $PARTS " in *" $1 "*) return 0;; esac; return 1; }
ok=1
if has smoke; then
    PYTHONPATH="$PWD:$PWD/tests" timeout 60 python - > "$OUT/smoke_v30.log" 2>&1 <<'PY'
import torch
from cases import AttnCase as A
from forkkv_hf import reference_attention
from test_cascade_kernel import _launch
from views import lowp_attention_error
for case in (A(B=5, H=8, Hkv=2, D=64, T=129, P=2, N=3, ranks=(16, 16, 16), k_res=False),
             A(B=6, H=8, Hkv=2, D=128, T=1000, P=3, Q=2, N=3, ranks=(8, 16, 32)),
             A(B=9, H=4, Hkv=4, D=64, T=90, P=3, N=3, ranks=(16, 16, 16), k_res=False)):
    q, view, scale = case.query(torch.bfloat16), case.view(torch.bfloat16), case.D**-0.5
    ref = reference_attention(q.float(), view, None, scale)
    lowp = lowp_attention_error(q.float(), view, None, scale, ref)
    for pu_t in (True, False):
        err = (_launch(q, view, None, scale, shared_form="gluon", shared_pu_t=pu_t).float() - ref).abs().max().item()
        print(f"T={case.T} pu_t={pu_t} err={err:.3g} lowp={lowp:.3g} ok={err <= 3 * lowp + 1e-5}", flush=True)
PY
    rc=$?; echo "smoke rc=$rc"; tail -6 "$OUT/smoke_v30.log"; pack
    [ $rc = 0 ] || ok=0
fi
if has sweep && [ $ok = 1 ]; then
    GT='{"shared_form": "gluon"}'; GU='{"shared_form": "gluon", "shared_pu_t": false}'
    for pass in a b; do
        if [ $pass = a ]; then C="{\"shared\": [$GT, $GU]}"; else C="{\"shared\": [$GU, $GT]}"; fi
        timeout 100 python -m eval.bench.sweep_kernel --stage shared --variants v --waves 1 \
            --points 32768:8 32768:32 32768:128 --candidates "$C" --time-limit 85 \
            --out "$OUT/sweep_kernel_v30$pass.json" > "$OUT/sweep_v30$pass.log" 2>&1
        echo "sweep $pass rc=$?"; grep "^BEST" "$OUT/sweep_v30$pass.log"; pack
    done
fi
if has tests && [ $ok = 1 ]; then
    timeout 220 python -m pytest -q -m gpu tests/test_shared_gluon.py tests/test_shared_gluon_pair.py \
        -k "${TESTS_K:-(v_residual or (pair and real_sizes)) and bf16}" \
        -p no:cacheprovider > "$OUT/gpu_tests_v30.log" 2>&1
    echo "tests rc=$?"; grep -E "^FAILED|passed|failed" "$OUT/gpu_tests_v30.log" | head -12; pack
fi
if has bench && [ $ok = 1 ]; then
    timeout 150 python -m eval.bench.kernel --contexts 32768 --agents 1 8 32 128 --out "$OUT/bench_kernel_v30.json" \
        > "$OUT/bench_kernel_v30.log" 2>&1
    echo "bench rc=$?"; tail -12 "$OUT/bench_kernel_v30.log"; pack
fi
