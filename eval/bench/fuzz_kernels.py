"""Random shapes through ``forkkv_kernels.cascade_attention`` on the GPU, each against an fp32 reference built
without the library (materialised per-row K/V: base + RoPE-rotated K residual, base + V residual, then private
tokens; softmax attention with the private part causal). The CPU tests run the interpreter on small shapes; this
runs the real ``tl.dot``/Gluon paths the launch rule picks on shapes no test lists: head_dim 48-256, GQA 1-7, ranks
1-80 mixed in one stack, rows without an agent, contexts of 1-700 tokens, decode and extend, bf16/fp16/fp32.

Pass rule (the tests' own): the kernel's max abs error against the reference at most 3x that of PyTorch computing
the same attention in the call's dtype, plus 2e-3. A clear refusal (``ValueError``/``NotImplementedError``) is
counted apart; any other exception is a failure.

    python -m eval.bench.fuzz_kernels --seconds 300 --seed 1 --out fuzz.json [--knobs '{"v_form": "fma"}']
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from ..cli import positive_int
from ..device import device_info


def _case(rng: random.Random, small: bool = False) -> dict:
    """A random case; ``small``: shapes the CPU interpreter runs in seconds (the script's own test)."""
    c = rng.choice
    n_agents = rng.randint(1, 4)
    P = rng.randint(1, 8 if small else 40)
    return dict(B=c([1, 3] if small else [1, 3, 8, 17, 40]), Hkv=c([1, 2, 4, 8]), G=c([1, 3, 4, 5, 7]),
                D=c([16, 48] if small else [48, 64, 80, 96, 128, 256]), T=rng.randint(1, 40 if small else 700), P=P,
                Q=min(P, c([1, 1, 2, 5])),
                k_ranks=[c([1, 3, 5, 8, 16, 24, 32, 48, 80]) for _ in range(n_agents)],
                v_ranks=[c([1, 5, 8, 16, 32, 48]) for _ in range(n_agents)],
                dtype=c(["bfloat16", "float16", "float32"]), n_agents=n_agents)


def _run(case: dict, seed: int, device: str, knobs: dict | None = None) -> dict:
    from forkkv_kernels import cascade_attention

    B, Hkv, G, D, T, P, Q = (case[k] for k in ("B", "Hkv", "G", "D", "T", "P", "Q"))
    dt = getattr(torch, case["dtype"])
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(-1, case["n_agents"], (B,), generator=g)
    x = lambda *s: torch.randn(*s, generator=g).to(dt).float()  # noqa: E731  (values the dtype holds)
    freqs = torch.outer(torch.arange(T).float(), 1 / 1e4 ** (torch.arange(0, D, 2) / D))
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    kb, vb, kp, vp, q = x(Hkv, T, D), x(Hkv, T, D), x(B, Hkv, P, D), x(B, Hkv, P, D), x(B, G * Hkv, Q, D)

    def stack(ranks):
        u, b = torch.zeros(len(ranks), T, max(ranks)), torch.zeros(len(ranks), Hkv * D, max(ranks))
        for a, r in enumerate(ranks):
            u[a, :, :r], b[a, :, :r] = x(T, r), x(Hkv * D, r) * 0.5 / r**0.5
        return u.to(dt).float(), b.to(dt).float()

    ku, kB = stack(case["k_ranks"])
    vu, vB = stack(case["v_ranks"])
    K, V = kb.repeat(B, 1, 1, 1), vb.repeat(B, 1, 1, 1)
    for i, a in enumerate(rows.tolist()):
        if a >= 0:
            rk = (ku[a] @ kB[a].t()).view(T, Hkv, D).transpose(0, 1)
            K[i] += rk * cos + torch.cat([-rk[..., D // 2:], rk[..., : D // 2]], -1) * sin
            V[i] += (vu[a] @ vB[a].t()).view(T, Hkv, D).transpose(0, 1)
    K = torch.cat([K, kp], 2).repeat_interleave(G, 1)
    V = torch.cat([V, vp], 2).repeat_interleave(G, 1)
    visible = torch.ones(Q, T + P, dtype=torch.bool)
    visible[:, T:] = torch.ones(Q, P, dtype=torch.bool).tril(P - Q)

    def attend(q_, k_, v_):
        s = (q_ @ k_.transpose(-1, -2)) * D**-0.5
        return (s.masked_fill(~visible, -torch.inf).softmax(-1).to(v_.dtype) @ v_).transpose(1, 2).float()

    ref = attend(q, K, V)
    own = (attend(q.to(dt), K.to(dt), V.to(dt)) - ref).abs().max().item()
    to = lambda t: t.to(dt).to(device)  # noqa: E731
    slots = rows.to(device)
    try:
        out = cascade_attention(*map(to, (q, kb, vb, cos, sin, kp, vp)), D**-0.5, k_u=to(ku), k_B=to(kB),
                                k_slot=slots, v_u=to(vu), v_B=to(vB), v_slot=slots, **(knobs or {}))
    except (ValueError, NotImplementedError) as e:
        return dict(outcome="refused", error=str(e)[:300])
    except Exception as e:  # noqa: BLE001 (a crash inside is what the fuzz looks for)
        return dict(outcome="failed", error=f"{type(e).__name__}: {str(e)[:300]}")
    err = (out.float().cpu() - ref).abs().max().item()
    ok = err <= 3 * own + 2e-3
    return dict(outcome="passed" if ok else "failed", error_max=err, torch_error=own)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=positive_int, default=300)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="fuzz_kernels.json")
    ap.add_argument("--cases", type=positive_int, default=None, help="stop after this many cases")
    ap.add_argument("--small", action="store_true", help="CPU-interpreter shapes (TRITON_INTERPRET=1, no GPU)")
    ap.add_argument("--knobs", type=json.loads, default={}, help='launch knobs for every case, as JSON, e.g. '
                    '\'{"v_form": "fma"}\' (the CUDA-core V form)')
    args = ap.parse_args(argv)
    device = "cpu" if args.small else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("the fuzz runs the kernels on a GPU (--small: the interpreter's shapes on CPU)")
    rng, end, results = random.Random(args.seed), time.time() + args.seconds, []
    while time.time() < end and len(results) < (args.cases or 1 << 62):
        case = _case(rng, args.small)
        results.append(dict(case, **_run(case, len(results), device, args.knobs)))
        if results[-1]["outcome"] == "failed":
            print("FAILED", json.dumps(results[-1]), flush=True)
    counts = {k: sum(r["outcome"] == k for r in results) for k in ("passed", "refused", "failed")}
    print(f"{len(results)} cases: {counts}")
    with open(args.out, "w") as f:
        json.dump(dict(device=device_info(), seed=args.seed, seconds=args.seconds, knobs=args.knobs, counts=counts,
                       failed=[r for r in results if r["outcome"] == "failed"],
                       refused=[r for r in results if r["outcome"] == "refused"][:50], cases=len(results)), f,
                  indent=1)


if __name__ == "__main__":
    main()
