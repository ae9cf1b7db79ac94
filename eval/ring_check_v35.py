"""v35b's GPU check: the Gluon shared kernel with K's scores from the cp.async ring against the exact attention on
the case space (GQA 1-8, head dims 64/128, ranks 4-64, masks, extend, bf16/fp16), contexts of multiples of 16."""
import torch
from cases import AttnCase as A
from forkkv_hf import reference_attention
from test_cascade_kernel import _launch
from views import lowp_attention_error
cases = [A(B=5, H=8, Hkv=2, D=64, T=144, P=2, N=3, ranks=(16, 16, 4)),
         A(B=2, H=2, Hkv=1, D=128, T=48, P=3, ranks=(64, 8)),
         A(B=4, H=8, Hkv=2, D=64, T=80, P=5, rows=(0, 1, 1, -1)),
         A(B=3, H=4, Hkv=4, D=64, T=208, P=4, Q=3),
         A(B=3, H=16, Hkv=2, D=128, T=304, P=4),
         A(B=70, H=4, Hkv=1, D=64, T=160, P=2),
         A(B=6, H=8, Hkv=2, D=128, T=1008, P=3, Q=2, N=3, ranks=(8, 16, 32)),
         A(B=10, H=32, Hkv=8, D=128, T=4096, P=9, N=8, ranks=(16,) * 8),
         A(B=10, H=32, Hkv=8, D=128, T=1504, P=12, Q=3, N=8, ranks=(16,) * 8)]
bad = 0
for case in cases:
    for masked in (False, True):
        for dtype in (torch.bfloat16, torch.float16):
            q, view, scale = case.query(dtype), case.view(dtype), case.D**-0.5
            mask = case.mask() if masked else None
            ref = reference_attention(q.float(), view, mask, scale)
            lowp = lowp_attention_error(q.float(), view, mask, scale, ref)
            for knobs in ({"shared_form": "gluon", "shared_k_load": "ring", "num_stages": 2},
                          {"shared_form": "gluon", "shared_k_load": "ring", "num_stages": 3, "block_t": 64}):
                try:
                    err = (_launch(q, view, mask, scale, **knobs).float() - ref).abs().max().item()
                except ValueError as e:
                    print("refused", case.T, knobs, str(e)[:120])
                    continue
                ok = err <= 3 * lowp + 1e-5
                bad += not ok
                print(f"T={case.T} H={case.H}/{case.Hkv} Q={case.Q} {dtype} mask={masked} {knobs} err={err:.3g} "
                      f"bound={3 * lowp:.3g} ok={ok}", flush=True)
print("FAILED", bad)
