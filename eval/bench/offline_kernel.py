"""The K pass compiled for sm_90 (H100/H200) on a machine without a GPU: registers, spill stack and shared memory of
each launch configuration, from Triton's own compiler and the ptxas/cuobjdump it ships. Predicts residency (programs
per SM, :func:`eval.bench.sweep_kernel.resident_programs`) before a GPU run; the GPU's Triton (3.6) may differ in
detail from the one here.

    python -m eval.bench.offline_kernel                     # the v9 sweep's K-pass candidates
    python -m eval.bench.offline_kernel --configs '[{"res_score": "fma", "res_block_t": 64}]'

Shapes: the kernel benchmark's (32 query heads, 8 KV heads, D=128, rank 16, bf16, one query per row, one row per
agent); knobs over the GPU's bf16 K+V rule (``forkkv_kernels.cascade.launch_defaults``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile

from .sweep_kernel import CANDIDATES, default_rule, resident_programs


#: the K pass's arguments that the benchmark's launches pass 16-divisible (pointers: 16-byte aligned)
DIVISIBLE = ["Q", "UK", "BK", "COS", "SIN", "KSLOT", "ORDER", "R", "s_qb", "s_qh", "s_qq", "B", "T", "RK", "split_len"]


def compile_kres(knobs: dict) -> dict:
    """Compile ``_kres_scores_kernel`` for sm_90 with ``knobs`` over the bf16 K+V rule; its resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from forkkv_kernels.kres_pass import _kres_scores_kernel

    rule = {**default_rule("kv", 32), **knobs}
    fma = rule.get("res_score", "mma") == "fma"
    args = {"Q": "*bf16", "s_qb": "i32", "s_qh": "i32", "s_qq": "i32", "UK": "*bf16", "BK": "*bf16", "COS": "*bf16",
            "SIN": "*bf16", "KSLOT": "*i32", "ORDER": "*i32", "R": "*fp16", "B": "i32", "T": "i32", "RK": "i32",
            "split_len": "i32", "qk_scale": "fp32"}
    const = dict(HKV=8, G=4, HALF=64, HALF_B=64, RKB=16, VPR=4, NQG=4, MQ=rule.get("mq") or (4 if fma else 16),
                 BLOCK_T=rule["res_block_t"], HG=rule.get("res_heads") or 8,
                 HA=1 if fma else (rule.get("res_pack") or 1), ROPE_HALF=True, LOWP_ROPE=True, CLAMP=True,
                 DOT_PREC="tf32", UPCAST=False, PAIRS=rule.get("res_form", "halves") == "pairs",
                 JOINED=rule.get("res_form") == "joined", SCORE_FMA=fma)
    sig = {**args, **dict.fromkeys(const, "constexpr")}
    names = list(sig)
    # what a launch on the GPU specialises: 16-byte aligned pointers and integers that are multiples of 16 (the
    # benchmark's strides, sizes and split lengths); without it the loads compile unvectorised
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in DIVISIBLE}
    src = ASTSource(_kres_scores_kernel, sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    opts = {"num_warps": rule["res_warps"], "num_stages": rule["res_stages"]}
    if rule.get("res_maxnreg"):
        opts["maxnreg"] = rule["res_maxnreg"]
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    fields = dict(kv.split(":") for kv in next(line for line in usage.splitlines() if "REG:" in line).split())
    out = {"regs": int(fields["REG"]), "spill_bytes": int(fields["STACK"]), "shared": kernel.metadata.shared,
           "warps": rule["res_warps"], "wgmma": kernel.asm["ptx"].count("wgmma.mma_async"),
           "mma_sync": kernel.asm["ptx"].count("mma.sync")}
    out["programs_per_sm"] = resident_programs(out["regs"], out["warps"], out["shared"])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", help="JSON list of K-pass knob dicts (default: the sweep's kres candidates)")
    ap.add_argument("--out", help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    import triton

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("the offline compile needs Triton's compiler: unset TRITON_INTERPRET")
    print(f"triton {triton.__version__}, sm_90, bf16 K+V rule: {json.dumps(default_rule('kv', 32), sort_keys=True)}")
    rows = []
    for knobs in json.loads(args.configs) if args.configs else CANDIDATES["kres"]:
        rows.append({"knobs": knobs, **compile_kres(knobs)})
        print(json.dumps(knobs, sort_keys=True), json.dumps({k: v for k, v in rows[-1].items() if k != "knobs"}),
              flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"triton": triton.__version__, "target": "sm_90", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
