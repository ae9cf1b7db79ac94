"""The K pass compiled for sm_90 (H100/H200) on a machine without a GPU: registers, spill stack and shared memory of
each launch configuration, from Triton's own compiler and the ptxas/cuobjdump it ships. Predicts residency (programs
per SM, :func:`eval.bench.sweep_kernel.resident_programs`) before a GPU run; the GPU's Triton (3.6) may differ in
detail from the one here.

    python -m eval.bench.offline_kernel                     # the v9 sweep's K-pass candidates
    python -m eval.bench.offline_kernel --configs '[{"res_score": "fma", "res_block_t": 64}]'

Shapes: the kernel benchmark's (32 query heads, 8 KV heads, D=128, rank 16, bf16, one query per row, one row per
agent); knobs over the GPU's bf16 K+V rule at 32 agents (``forkkv_kernels.cascade.launch_defaults``; its Triton K
pass's knobs, ``TRITON_K_RULE``, for the Triton kernel).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

from .sweep_kernel import CANDIDATES, default_rule, resident_programs


#: the K pass's arguments that the benchmark's launches pass 16-divisible (pointers: 16-byte aligned)
DIVISIBLE = ["Q", "UK", "BK", "COS", "SIN", "KSLOT", "ORDER", "R", "s_qb", "s_qh", "s_qq", "B", "T", "RS", "RK",
             "split_len"]


def compile_kres(knobs: dict) -> dict:
    """Compile ``_kres_scores_kernel`` for sm_90 with ``knobs`` over the bf16 K+V rule (``res_form="gluon"``: the Gluon
    K pass, :mod:`forkkv_kernels.kres_gluon`, with its own rule under ``knobs``); its resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from forkkv_kernels.kres_pass import _kres_scores_kernel, score_pack

    if knobs.get("res_form") == "gluon":
        return _compile_gluon_kres(knobs)
    from forkkv_kernels.rules import TRITON_K_RULE

    # the Triton pass's rule at 32 agents (there the launcher's where the Gluon pass cannot serve a call, v39)
    rule = {**default_rule("kv", 32), **TRITON_K_RULE, **knobs}
    fma = rule.get("res_score", "mma") == "fma"
    form = knobs.get("res_form") or ("halves" if fma else rule["res_form"])  # as the launcher: fma in the halves form
    f16 = bool(rule.get("res_f16")) and form == "joined"  # as the launcher: the fp16 form is the joined form's
    args = _kres_args(f16)
    MQ = rule.get("mq") or (4 if fma else 16)
    const = dict(HKV=8, G=4, HALF=64, HALF_B=64, RKB=16, VPR=4, NQG=4, MQ=MQ,
                 BLOCK_T=rule["res_block_t"], HG=rule.get("res_heads") or 8,
                 HA=score_pack(rule.get("res_pack") or 1, fma, rule.get("res_heads") or 8, MQ, 4), ROPE_HALF=True,
                 LOWP_ROPE=True, CLAMP=True, DOT_PREC="tf32", UPCAST=False,
                 PAIRS=form == "pairs", JOINED=form == "joined",
                 SCORE_FMA=fma, SATF=bool(rule.get("res_satfinite")), F16=f16,
                 PDL=rule.get("pdl") in (True, "early"))  # the K pass lets the shared kernel start in "early" only
    opts = {"num_warps": rule["res_warps"], "num_stages": rule["res_stages"]}
    if rule.get("res_maxnreg"):
        opts["maxnreg"] = rule["res_maxnreg"]
    return _inspect(triton.compile(_source(ASTSource, _kres_scores_kernel, args, const),
                                   target=GPUTarget("cuda", 90, 32), options=opts), opts)


#: the K pass's runtime arguments (both kernels take the same)
_KRES_ARGS = {"Q": "*bf16", "s_qb": "i32", "s_qh": "i32", "s_qq": "i32", "UK": "*bf16", "BK": "*bf16", "COS": "*bf16",
              "SIN": "*bf16", "KSLOT": "*i32", "ORDER": "*i32", "R": "*fp16", "B": "i32", "T": "i32", "RS": "i32",
              "RK": "i32",
              "split_len": "i32", "qk_scale": "fp32"}


def _kres_args(f16: bool) -> dict:
    """Both K passes' runtime arguments; the fp16 form's queries and ``B_k`` arrive converted by the launcher."""
    return {**_KRES_ARGS, **({"Q": "*fp16", "BK": "*fp16"} if f16 else {})}


def _source(source_cls, fn, args: dict, const: dict, divisible: list | None = None):
    sig = {**args, **dict.fromkeys(const, "constexpr")}
    names = list(sig)
    # what a launch on the GPU specialises: 16-byte aligned pointers and integers that are multiples of 16 (the
    # benchmark's strides, sizes and split lengths; default: the K pass's); without it the loads compile unvectorised
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in (DIVISIBLE if divisible is None else divisible)}
    return source_cls(fn, sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)


def _compile_gluon_kres(knobs: dict) -> dict:
    """The Gluon K pass at the benchmark's decode shapes (one row of G = 4 vectors per agent) with ``knobs`` over
    ``GLUON_RULE``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from forkkv_kernels.kres_gluon import GLUON_RULE, _kres_scores_gluon, score_columns

    rule = {**GLUON_RULE, **knobs}
    mq = rule.get("mq") or score_columns(4, rule["res_score"])
    const = dict(HKV=8, G=4, HALF=64, RKB=16, VPR=4, NQG=4, MQ=mq,
                 BLOCK_T=rule["res_block_t"], ROPE_HALF=True, SATF=bool(rule["res_satfinite"]))
    kernel = _kres_scores_gluon
    if rule.get("res_rebuild") == "mma_sync":  # the rebuild by mma.sync (kres_gluon_sync: the fp16 form only)
        from forkkv_kernels.kres_gluon_sync import _kres_scores_gluon_sync as kernel
    else:
        const.update(SYNC_SCORE=rule["res_score"] == "mma_sync", F16=bool(rule.get("res_f16")),
                     HP=rule.get("res_step_heads") or 1, RT_ZEROS=bool(rule.get("res_runtime_zeros")))
    args = _kres_args(bool(rule.get("res_f16")))
    if rule.get("rope16"):  # the RoPE tables given in fp16 (the adapter's rope16 for the fp16 form)
        args.update(COS="*fp16", SIN="*fp16")
    opts = {"num_warps": rule["res_block_t"] // 16, "num_stages": 1}
    if rule.get("res_maxnreg"):
        opts["maxnreg"] = rule["res_maxnreg"]
    return _inspect(triton.compile(_source(GluonASTSource, kernel, args, const),
                                   target=GPUTarget("cuda", 90, 32), options=opts), opts)


def _inspect(kernel, opts: dict) -> dict:
    """A compiled K pass's resources, hot-loop counts and ptxas's serialisation reports."""
    import triton

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    sass = _sass(kernel)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        # ptxas's own report of the same PTX: its "Potential Performance Loss" lines say when it serialises MMAs
        reg_cap = [f"--maxrregcount={opts['maxnreg']}"] if "maxnreg" in opts else []
        info = subprocess.run([os.path.join(bindir, "ptxas"), "-arch=sm_90a", "-v", ptx, "-o",
                               os.path.join(tmp, "again.cubin"), *reg_cap], capture_output=True, text=True).stderr
    out = {k: v for k, v in _resources(kernel, opts).items() if k != "stages"}
    out.update(wgmma=kernel.asm["ptx"].count("wgmma.mma_async"), mma_sync=kernel.asm["ptx"].count("mma.sync"))
    return {**out, **hot_loop(sass), "mma_serialised": sorted(set(re.findall(r"\((C751[2-6])\)", info)))}


def _sass(kernel) -> str:
    """A compiled kernel's SASS (the nvdisasm Triton ships)."""
    import triton

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        return subprocess.run([os.path.join(bindir, "nvdisasm"), "-c", cubin], capture_output=True, text=True,
                              check=True).stdout


def _resources(kernel, opts: dict) -> dict:
    """Registers, spill stack, shared memory and residency of a compiled kernel (cuobjdump's resource usage)."""
    import triton

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([os.path.join(bindir, "cuobjdump"), "-res-usage", cubin], capture_output=True,
                               text=True, check=True).stdout
    fields = dict(kv.split(":") for kv in next(line for line in usage.splitlines() if "REG:" in line).split())
    out = {"regs": int(fields["REG"]), "spill_bytes": int(fields["STACK"]), "shared": kernel.metadata.shared,
           "warps": opts["num_warps"], "stages": opts["num_stages"]}
    out["programs_per_sm"] = resident_programs(out["regs"], out["warps"], out["shared"])
    return out


def compile_shared(rank_v: int, block_m: int = 64, block_t: int = 64, num_warps: int = 4, num_stages: int = 3,
                   has_k: bool = True, pdl_trigger: int = 2, has_v: bool = True) -> dict:
    """Compile ``_cascade_shared_kernel`` (the shared base's part and the V residual's ``P·u_v``; ``has_v=False``: the
    base alone, or with ``has_k`` the K residual's scores) for sm_90 at V rank ``rank_v`` with these launch settings,
    the kernel benchmark's shapes (G = 4, one query per row: VPR = 4); its resources and ``loops``, the
    :func:`loop_counts` of its innermost loops of more than 8 instructions, longest first (its context loop; v20's
    measured form had two), or the compiler's error (e.g. more shared memory than an SM has). ``pdl_trigger``: where
    the kernel lets the merge start (2: after its context loop, the rule's ``pdl="merge"``; 0: plain launches)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from forkkv_kernels.attention_common import pow2
    from forkkv_kernels.cascade import _cascade_shared_kernel
    from forkkv_kernels.tiles import sub_blocks

    ptr = {"Q": "*bf16", "KB": "*bf16", "VB": "*bf16", "R": "*fp16", "KSLOT": "*i32", "UV": "*bf16",
           "VSLOT": "*i32", "MASK": "*i8", "M_WS": "*fp32", "L_WS": "*fp32", "ACC_WS": "*fp32", "UV_WS": "*fp32"}
    order = ["Q", "s_qb", "s_qh", "s_qq", "KB", "VB", "R", "KSLOT", "UV", "VSLOT", "MASK", "s_mb", "s_mq", "s_mt",
             "M_WS", "L_WS", "ACC_WS", "UV_WS", "B", "T", "RS", "NQ", "RV", "split_len", "n_splits", "qk_scale"]
    args = {n: ptr.get(n, "fp32" if n == "qk_scale" else "i32") for n in order}  # the rest: strides and sizes
    VPR, RVB = 4, pow2(rank_v)
    const = dict(HKV=8, G=4, D=128, DB=128, HALF=64, HALF_B=64, VPR=VPR, NQG=4, RVB=RVB, BLOCK_M=block_m,
                 BLOCK_T=block_t, **sub_blocks(block_m, VPR, RVB), HAS_K=has_k, HAS_V=has_v, HAS_MASK=False,
                 DOT_PREC="tf32", UPCAST=False, PDL_WAIT=False, PDL_TRIGGER=pdl_trigger, V_FMA=False)
    sig = {**args, **dict.fromkeys(const, "constexpr")}
    names = list(sig)
    # what a launch specialises: 16-byte aligned pointers and 16-divisible strides, sizes and V ranks (RV = 16 on the
    # GPU: without it the u_v loads compile as 16-bit scalar loads, a code the GPU never runs)
    divisible = [n for n in order if n in ptr or n in ("s_qb", "s_qh", "s_qq", "T", "RS", "split_len", "RV")]
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in divisible}
    src = ASTSource(_cascade_shared_kernel, sig, constexprs={(names.index(k),): v for k, v in const.items()},
                    attrs=attrs)
    opts = {"num_warps": num_warps, "num_stages": num_stages}
    try:
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    except Exception as e:  # noqa: BLE001 - the compiler's refusal is the answer for that setting
        return {"error": str(e).splitlines()[0][:200], "warps": num_warps, "stages": num_stages}
    return {**_resources(kernel, opts), "acc_uv_values": const["N_SUB"] * const["SB"] * const["SBC"] if has_v else 0,
            "loops": [c for c in map(loop_counts, loop_bodies(_sass(kernel))) if c["loop_instructions"] > 8]}


def compile_shared_gluon(knobs: dict) -> dict:
    """Compile the Gluon shared kernel (:mod:`forkkv_kernels.shared_gluon`) for sm_90 at the benchmark's shapes (base
    only unless ``knobs["has_k"]``) with ``knobs`` (``block_t``, ``num_warps``, ``num_stages``, ``shared_k_early``,
    ``shared_q_regs``, ``shared_k_load``, ``has_mask``, ``has_v`` and ``v_rank``: a V residual) over its rule:
    resources, ptxas's serialisation reports and :func:`context_loop`'s counts."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    from forkkv_kernels.attention_common import pow2
    from forkkv_kernels.shared_gluon import K_LOADS, _cascade_shared_gluon, descriptors, rule_for
    from forkkv_kernels.shared_gluon_pair import GLUON_PAIR_RULE, PAIR_REGS, _cascade_shared_gluon_pair

    pair = bool(knobs.get("pair"))
    has_v, rv = bool(knobs.get("has_v")) or pair, knobs.get("v_rank", 16)
    k_ring = bool(knobs.get("has_k")) and knobs.get("shared_k_load") == "ring"
    rule = {**(GLUON_PAIR_RULE if pair else rule_for(has_v, k_ring=k_ring)), **knobs}  # 32-token tiles (V)
    desc = mangle_type(descriptors(*[torch.zeros(8, 256, 128, dtype=torch.bfloat16)] * 2, rule["block_t"])[0])
    args = {"Q": "*bf16", "s_qb": "i32", "s_qh": "i32", "s_qq": "i32", "k_desc": desc, "v_desc": desc,
            "R": "*fp16", "KSLOT": "*i32", "UV": "*bf16", "VSLOT": "*i32", "MASK": "*i8", "s_mb": "i32",
            "s_mq": "i32", "s_mt": "i32", "M_WS": "*fp32", "L_WS": "*fp32", "ACC_WS": "*fp32", "UV_WS": "*fp32",
            "B": "i32", "T": "i32", "RS": "i32", "NQ": "i32", "split_len": "i32", "n_splits": "i32",
            "qk_scale": "fp32"}
    const = dict(HKV=8, G=4, D=128, HALF=64, HALF_B=64, VPR=4, NQG=4, BLOCK_T=rule["block_t"],
                 STAGES=rule["num_stages"], RV=rv, HAS_K=bool(rule.get("has_k")), HAS_V=has_v,
                 HAS_MASK=bool(rule.get("has_mask")), K_EARLY=rule.get("shared_k_early", True),
                 Q_REGS=bool(rule.get("shared_q_regs")), RVB=pow2(rv),
                 K_LOAD=K_LOADS.index(rule.get("shared_k_load", "softmax")), R_PAD=bool(rule.get("r_pad")))
    divisible = [n for n, t in args.items() if t.startswith("*")] + ["s_qb", "s_qh", "s_qq", "T", "RS", "split_len"]
    opts = {"num_warps": rule["num_warps"], "num_stages": 1}
    kernel_fn = _cascade_shared_gluon
    if pair:  # two KV heads per program: no HAS_V/Q_REGS (a V residual, queries in shared memory), its registers
        const = {k: v for k, v in const.items() if k not in ("HAS_V", "Q_REGS", "K_LOAD", "R_PAD")}
        const["WORKER_REGS"], opts["maxnreg"], kernel_fn = PAIR_REGS, PAIR_REGS, _cascade_shared_gluon_pair
    kernel = triton.compile(_source(GluonASTSource, kernel_fn, args, const, divisible),
                            target=GPUTarget("cuda", 90, 32), options=opts)
    out = _inspect(kernel, opts)
    return {**{k: v for k, v in out.items() if not k.startswith("loop_")}, "stages": rule["num_stages"],
            **context_loop(_sass(kernel))}


def shared_rule(agents: int, has_k: bool, has_v: bool, rank_v: int = 16) -> dict:
    """:func:`compile_shared` under the bf16 rule (``launch_defaults``) for ``agents`` rows of one decode query."""
    import torch

    from forkkv_kernels.attention_common import pow2
    from forkkv_kernels.cascade import launch_defaults

    rule = launch_defaults(agents, 1, 4, has_k, has_v, torch.bfloat16, rank_v)
    return compile_shared(rank_v, min(64, pow2(agents * 4)), rule["block_t"], rule["num_warps"], rule["num_stages"],
                          has_k=has_k, has_v=has_v, pdl_trigger=0 if rule["pdl"] is False else 2)


def _loops(sass: str) -> list[list[str]]:
    """Every loop of a kernel's SASS: its lines from its label to the branch back to it."""
    lines = sass.splitlines()
    label_at = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    loops = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if m and label_at.get(m.group(1), i) < i:
            loops.append(lines[label_at[m.group(1)]:i + 1])
    return loops


def loop_bodies(sass: str) -> list[list[str]]:
    """The innermost loops of a kernel's SASS, longest first: each loop's lines from its label to the branch back to
    it, for loops whose body holds no other label (the end's one-instruction trap loop is one such too)."""
    inner = [body for body in _loops(sass) if not any(re.match(r"^\.L_x_\d+:", b) for b in body[1:])]
    return sorted(inner, key=len, reverse=True)


def loop_counts(body: list[str]) -> dict:
    """Instruction counts of one loop body: how many instructions, MMAs (``HGMMA``), waits for them
    (``WARPGROUP.DEPBAR``), conversions and packed rotations (``F2FP``, ``HMUL2``, ``HFMA2``), byte shuffles
    (``PRMT``), local-memory (spill) accesses, and the softmax's per-score instructions: selects (``FSEL``),
    multiplies, adds and FMAs, exponentials (``MUFU.EX2``)."""
    ops = [m.group(1) for b in body if (m := re.match(r"^\s*/\*[0-9a-f]+\*/\s*(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", b))]
    count = lambda *names: sum(op in names for op in ops)  # noqa: E731
    return {"loop_instructions": len(ops), "loop_hgmma": count("HGMMA"),
            "loop_mma_waits": sum("WARPGROUP.DEPBAR" in b for b in body),
            "loop_rotation": count("F2FP", "HMUL2", "HFMA2"), "loop_prmt": count("PRMT"),
            "loop_local": count("LDL", "STL"), "loop_fsel": count("FSEL"), "loop_fmul": count("FMUL"),
            "loop_fadd": count("FADD"), "loop_ffma": count("FFMA"), "loop_ex2": count("MUFU")}


def context_loop(sass: str) -> dict:
    """:func:`loop_counts` of the shortest loop that issues MMAs, closed by a conditional branch back, inner labels
    allowed (a Gluon kernel's context loop holds the re-entry points of its mbarrier waits, whose spin loops sit out
    of line and jump back unconditionally)."""
    lines = sass.splitlines()
    label_at = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    bodies = [lines[label_at[m.group(1)]:i + 1] for i, line in enumerate(lines)
              if (m := re.search(r"@!?U?P\w+\s+BRA `\((\.L_x_\d+)\)", line)) and label_at.get(m.group(1), i) < i]
    bodies = [b for b in bodies if any("HGMMA" in line for line in b)]
    return loop_counts(min(bodies, key=len, default=[]))


def hot_loop(sass: str) -> dict:
    """:func:`loop_counts` of the kernel's longest innermost loop (the K pass: the loop over one tile's KV heads), and
    ``tile_loop_instructions``: the longest loop's static span, inner loops counted once (the K pass's tile loop; a
    kernel without nested loops: its innermost one)."""
    longest = max((loop_counts(body)["loop_instructions"] for body in _loops(sass)), default=0)
    return {**loop_counts(next(iter(loop_bodies(sass)), [])), "tile_loop_instructions": longest}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", help="JSON list of K-pass knob dicts (default: the sweep's kres candidates)")
    ap.add_argument("--out", help="also write the rows as JSON here")
    ap.add_argument("--shared-ranks", type=int, nargs="*", metavar="RV",
                    help="instead: the shared kernel (base + V residual) at these V ranks, over BLOCK_M 64/32/16 and "
                         "1-3 pipeline stages (16 agents' rule otherwise: 64-token tiles, 4 warps)")
    ap.add_argument("--shared-variants", type=int, nargs="*", metavar="AGENTS",
                    help="instead: the shared kernel of each variant (base only, V residual only, K+V) under the bf16 "
                         "rule at these agent counts, with its context loop's instruction counts")
    ap.add_argument("--gluon-shared", metavar="JSON",
                    help="instead: the Gluon shared kernel (forkkv_kernels.shared_gluon) under each of these knob "
                         "dicts (block_t, num_warps, num_stages, shared_k_early, shared_q_regs, shared_k_load, has_k, "
                         "has_mask, has_v, v_rank; pair: the two-head kernel, forkkv_kernels.shared_gluon_pair)")
    args = ap.parse_args(argv)
    import triton

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("the offline compile needs Triton's compiler: unset TRITON_INTERPRET")
    print(f"triton {triton.__version__}, sm_90, bf16 K+V rule at 32 agents: "
          f"{json.dumps(default_rule('kv', 32), sort_keys=True)}")
    rows, meta = [], {}
    if args.gluon_shared:
        meta = {"kernel": "_cascade_shared_gluon"}
        for knobs in json.loads(args.gluon_shared):
            rows.append({"knobs": knobs, **compile_shared_gluon(knobs)})
            print(json.dumps(rows[-1]), flush=True)
    elif args.shared_variants:
        meta = {"kernel": "_cascade_shared_kernel", "rule": "launch_defaults, bf16, one query per row"}
        for agents in args.shared_variants:
            for variant, has_k, has_v in (("base", False, False), ("v", False, True), ("kv", True, True)):
                rows.append({"variant": variant, "agents": agents, **shared_rule(agents, has_k, has_v)})
                print(json.dumps(rows[-1]), flush=True)
    elif args.shared_ranks:
        meta = {"kernel": "_cascade_shared_kernel"}
        for rv in args.shared_ranks:
            for block_m in (64, 32, 16):
                for stages in (3, 2, 1):
                    rows.append({"rank_v": rv, "block_m": block_m, **compile_shared(rv, block_m, num_stages=stages)})
                    print(json.dumps(rows[-1]), flush=True)
    else:
        for knobs in json.loads(args.configs) if args.configs else CANDIDATES["kres"]:
            rows.append({"knobs": knobs, **compile_kres(knobs)})
            print(json.dumps(knobs, sort_keys=True), json.dumps({k: v for k, v in rows[-1].items() if k != "knobs"}),
                  flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"triton": triton.__version__, "target": "sm_90", **meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
