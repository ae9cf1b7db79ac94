"""Tune the cascade decode kernels on the GPU within a time limit: launch configurations of each pass, timed and
checked.

Stages, in priority order (the K pass dominates K+V calls; eval/KERNEL_NOTES.md "v8" says why these candidates):

- ``kres``: the K-residual score pass (:mod:`forkkv_kernels.kres_pass`: form, tile, warps, register cap, KV heads per
  program), K+V residuals;
- ``shared``: the shared-part kernel (tile, vectors per program) for each variant (K+V, V only, base only);
- ``merge``: the private-part + log-sum-exp merge (unrolled split loop, warps), on the best shared configuration;
- ``combined``: the best configuration of every stage together, per variant (what a default change would adopt).

Each ``kres``/``shared`` launch configuration runs with the launcher's split rule and with split counts that fill
``--waves`` whole waves of the compiled kernel's resident programs (from its registers, warps and shared memory), so
no wave ends in a tail. Every configuration's output is checked against the exact attention (fp32, from the same
low-precision inputs): it passes when its max error is at most max(3x that of SDPA in the cache dtype, 2x that of the
default configuration) + 1e-5; only passing configurations are timed (GPU time of one call, CUDA-graph replay) and can
be best. Points run in order: the K pass at the first two points first, then every stage point by point; no new
configuration starts after ``--time-limit`` seconds. Result: the one schema, rows keyed by (stage, variant, context,
agents, config); ``extra["best"]`` per (stage, variant, point), ``extra["summary"]`` per (variant, point): default vs
best time and the best knobs.

    python -m eval.bench.sweep_kernel [--points 32768:32 32768:128 32768:8] [--time-limit 190] [--out sweep.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from .kernel import D, HKV, make_case, reference, variant_view
from .measure import graph_time
from .runner import BenchmarkRun

#: candidate configurations per stage, in priority order ({}: the launcher's defaults); the reasons are in
#: eval/KERNEL_NOTES.md ("v8: launch configurations", "v9 measured")
CANDIDATES = {
    # measured: the v8 list (its winner is the default now) and v9's score step on CUDA cores, which lost to it at
    # every point (eval/results/sweep_kernel_v8_nvidia_h200.json and sweep_kernel_v9_nvidia_h200.json,
    # params.candidates; eval/KERNEL_NOTES.md "v9 measured"). v11/v11b (sweep_kernel_v11{,b}_nvidia_h200.json): KV
    # heads sharing a score tile on 64-token tiles of 4 warps, 3 stages won. v11c (sweep_kernel_v11c_nvidia_h200.json):
    # the joined form (one rebuild MMA split in registers, one score MMA) without packs won on 128-token tiles of 8
    # warps, 3 stages (the rule since) and tied on 64-token tiles of 4 warps. Now: v11b's rule and the joined form's
    # runner-up, for a same-run comparison; v11e: the saturating fp16 conversion of the scores (16 fewer instructions
    # per step offline) on the rule, on the runner-up's tile and with programs of 4 KV heads. v14
    # (sweep_kernel_v14_nvidia_h200.json): the Gluon K pass (res_form="gluon", both score steps) lost to the rule at 32
    # and 128 agents by 20-32%, not in the list
    "kres": [{}, {"res_satfinite": True}, {"res_satfinite": True, "res_block_t": 64, "res_warps": 4},
             {"res_satfinite": True, "res_heads": 4},
             {"res_form": "halves", "res_pack": 4, "res_block_t": 64, "res_warps": 4, "res_stages": 3}],
    "shared": [{}, {"block_t": 32}, {"block_t": 64}, {"block_t": 128, "num_warps": 8}],
    # v10 / v10b / v10c (measured: sweep_kernel_v10{,b,c}_nvidia_h200.json): the merge taking the splits' partials 16
    # at a time won at 1 and 8 agents (the rule until v12b); its warps, stages and private tile changed nothing; the
    # private part on CUDA cores (v10c, removed since: commit 2ea4d11) lost everywhere; several decode rows per
    # program (v12, sweep_kernel_v12_nvidia_h200.json; removed since: commit 458e02a) changed nothing measurable.
    # v12b (sweep_kernel_v12b_nvidia_h200.json, the rule now): the splits' partials merged before the private part
    # (``merge_first``), against both of v10's rules in the same run
    "merge": [{"merge_chunk": 1, "merge_unroll": 2}, {"merge_chunk": 16, "merge_unroll": 1},
              {"merge_chunk": 1, "merge_unroll": 2, "merge_first": True},
              {"merge_chunk": 16, "merge_unroll": 1, "merge_first": True}],
}
STAGE_VARIANTS = {"kres": ["kv"], "shared": ["kv", "v", "base"], "merge": ["kv", "v", "base"],
                  "combined": ["kv", "v", "base"]}
#: the example grid of ``--full-grid`` (every combination, spilling ones left out)
GRIDS = {
    "shared": {"block_t": [32, 64], "num_warps": [4, 8], "block_m": [None, 128], "programs_per_sm": [2, 4]},
    "kres": {"res_block_t": [64, 128], "res_warps": [4, 8], "res_heads": [8, 2], "res_programs_per_sm": [2, 4]},
}
#: configurations left out of grids: 128 vectors on 4 warps spill (ptxas for sm_90: 80-990 bytes of stack)
SPILLS = [{"block_m": 128, "num_warps": 4}]
#: per-SM limits of sm_90 (H100/H200): registers, their allocation unit per warp, warps, programs, shared memory
SM90 = {"regs": 65536, "reg_unit": 256, "warps": 64, "programs": 32, "smem": 233472, "smem_reserved": 1024}


def configs(stage: str, only: dict | None = None, grids: dict | None = None) -> list[dict]:
    """Every combination of ``grids[stage]`` (default :data:`GRIDS`) without the :data:`SPILLS`, keeping those that
    match ``only``."""
    grid = (grids or GRIDS)[stage]
    out = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    out = [c for c in out if not any(all(c.get(k) == v for k, v in bad.items()) for bad in SPILLS)]
    return [c for c in out if all(c.get(k) == v for k, v in (only or {}).items())]


def resident_programs(n_regs: int, num_warps: int, shared: int, limits: dict = SM90) -> int:
    """How many programs of a compiled kernel one SM holds at once (registers per warp rounded up to the allocation
    unit, each of the 4 sub-partitions holding a quarter of the register file; shared memory plus the per-program
    reserve)."""
    per_warp = -(-n_regs * 32 // limits["reg_unit"]) * limits["reg_unit"]
    by_regs = 4 * (limits["regs"] // 4 // max(per_warp, 1)) // num_warps
    by_smem = limits["smem"] // (shared + limits["smem_reserved"])
    return max(1, min(by_regs, by_smem, limits["warps"] // num_warps, limits["programs"]))


def effective_splits(T: int, block_t: int, n: int) -> int:
    """How many splits the launchers make of a ``T``-token context asked for ``n`` (each a whole number of tiles):
    the launchers' own ``split_length`` with that split count (at least 1)."""
    from forkkv_kernels.attention_common import split_length

    return -(-T // split_length(T, block_t, 1, 1, splits=max(1, n)))


def wave_splits(waves: int, resident: int, sms: int, items: int, T: int, block_t: int) -> int:
    """The split count whose grid (``items`` programs per split) fills at most ``waves`` whole waves."""
    return effective_splits(T, block_t, waves * resident * sms // items)


def default_rule(variant: str, N: int) -> dict:
    """The launcher's GPU launch rule (``forkkv_kernels.cascade.launch_defaults``) for the benchmark's bf16 decode
    step of ``variant`` with ``N`` rows (one query each, 4 query vectors per row and KV head)."""
    from forkkv_kernels.cascade import launch_defaults

    return launch_defaults(N, 1, 4, variant == "kv", variant in ("kv", "v"), torch.bfloat16)


def default_block_t(stage: str, variant: str, N: int) -> int:
    """The launcher's default tile of ``stage`` for the benchmark's bf16 decode step with ``N`` rows."""
    return default_rule(variant, N)["res_block_t" if stage == "kres" else "block_t"]


def launch_geometry(stage: str, variant: str, cfg: dict, N: int, T: int, sms: int) -> dict:
    """Programs per split, tile and the launcher's own split count for a configuration of ``stage`` on the
    benchmark's decode step (``N`` rows, one agent and one query each, 4 query vectors per row and KV head), as the
    launchers size them: ``cfg``'s knobs over the launcher's GPU rule (:func:`default_rule`)."""
    from forkkv_kernels.attention_common import split_length
    from forkkv_kernels.kres_gluon import GLUON_RULE
    from forkkv_kernels.rules import TRITON_K_RULE, asks_triton_k_pass
    from forkkv_kernels.shared_gluon import rule_for
    from forkkv_kernels.shared_gluon_pair import GLUON_PAIR_RULE

    # a Gluon K pass or shared kernel takes its own knobs under the given ones, as the launcher does; where the rule
    # picks the Gluon K pass and the knobs ask for the Triton one, the Triton pass's rule
    default = default_rule(variant, N)
    if default["res_form"] == "gluon" and asks_triton_k_pass(**{k: v for k, v in cfg.items() if k.startswith("res_")}):
        default = {**default, **TRITON_K_RULE}
    knobs = {**default, **cfg}
    form = knobs.get("shared_form")  # given, or the rule's pick
    gluon_shared = form in ("gluon", "gluon_pair")
    k_load = knobs.get("shared_k_load") if form == "gluon" else None
    shared_rule = {"gluon_pair": GLUON_PAIR_RULE}.get(form) or \
        rule_for(variant in ("v", "kv"), vectors=4 * N, k_ring=variant == "kv" and k_load == "ring")
    rule = {**default, **(GLUON_RULE if cfg.get("res_form") == "gluon" else {}),
            **(shared_rule if gluon_shared else {}), **cfg}
    if stage == "kres":
        items, block_t = N * (HKV // (cfg.get("res_heads") or HKV)), rule["res_block_t"]
        per_sm, whole = rule["res_programs_per_sm"], rule["res_whole_waves"]
    else:
        block_m = (16 * rule["num_warps"] if gluon_shared
                   else cfg.get("block_m") or min(64, 1 << (4 * N - 1).bit_length()))
        items, block_t = -(-4 * N // block_m) * (HKV // 2 if form == "gluon_pair" else HKV), rule["block_t"]
        per_sm, whole = rule["programs_per_sm"], rule["whole_waves"]
    return {"items": items, "block_t": block_t,
            "splits": -(-T // split_length(T, block_t, items, per_sm * sms, whole_waves=whole))}


def resources(compiled) -> dict:
    md = getattr(compiled, "metadata", None)
    out = {"n_regs": getattr(compiled, "n_regs", None), "n_spills": getattr(compiled, "n_spills", None),
           "shared": getattr(md, "shared", None), "num_warps": getattr(md, "num_warps", None)}
    if None not in (out["n_regs"], out["shared"], out["num_warps"]):
        out["resident"] = resident_programs(out["n_regs"], out["num_warps"], out["shared"])
    return out


class Sweep:
    """The cases of one run, their references, and the measurement of a configuration. ``cases``: (context, agents)
    -> (query, view) of :func:`eval.bench.kernel.make_case`; ``timer(fn)``: seconds per call of ``fn``; ``sms``: the
    GPU's SM count; ``waves``: see :meth:`launch_config`; ``variants``: only these of each stage's variants
    (default: all of :data:`STAGE_VARIANTS`)."""

    def __init__(self, run: BenchmarkRun, timer, cases: dict, waves: list[int], sms: int,
                 variants: list[str] | None = None):
        from forkkv_hf.ops.dispatch import residual_attention_triton

        self.run, self.timer, self.cases, self.waves, self.sms = run, timer, cases, waves, sms
        self.variants = variants
        self.attn = residual_attention_triton
        self.checks: dict = {}
        self.best = run.extra.setdefault("best", {})

    def check(self, point, variant) -> dict:
        """The exact output, SDPA's low-precision error and the default configuration's error (computed once)."""
        key = (point, variant)
        if key not in self.checks:
            q, view = self.cases[point]
            vv = variant_view(view, variant)
            ref, sdpa_err = reference(q, vv, D**-0.5)
            default_err = (self.call(point, variant, {}, {}).float() - ref).abs().max().item()
            self.checks[key] = {"ref": ref, "sdpa_err": sdpa_err, "default_err": default_err,
                                "bound": max(3 * sdpa_err, 2 * default_err) + 1e-5}
            self.run.extra.setdefault("checks", {})[f"{variant}/{point[0]}:{point[1]}"] = {
                k: v for k, v in self.checks[key].items() if k != "ref"}
        return self.checks[key]

    def call(self, point, variant, knobs: dict, launched: dict):
        q, view = self.cases[point]
        return self.attn(q, variant_view(view, variant), None, D**-0.5, launches=launched, **knobs)

    def measure(self, stage: str, variant: str, point, knobs: dict, extra: dict | None = None) -> dict:
        """One configuration: checked against the exact output, timed if it passes, recorded (the best kept)."""
        if self.run.out_of_time():
            return {"skipped": True}
        chk = self.check(point, variant)
        launched: dict = {}

        def fn():
            try:
                err = (self.call(point, variant, knobs, launched).float() - chk["ref"]).abs().max().item()
                row = {"max_abs_err": err, "bound": chk["bound"], "ok": err <= chk["bound"], **(extra or {})}
                if row["ok"]:
                    row["graph_s"] = self.timer(lambda: self.call(point, variant, knobs, {}))
                row["resources"] = {name: resources(k) for name, k in launched.items()}
                return row
            except Exception as e:  # noqa: BLE001 - a configuration that fails to compile or run is a result too
                return {"error": repr(e)[:300], **(extra or {})}

        row = self.run.measure({"stage": stage, "variant": variant, "context": point[0], "agents": point[1],
                                "config": json.dumps(knobs, sort_keys=True)}, fn)
        key = f"{stage}/{variant}/{point[0]}:{point[1]}"
        if "graph_s" in row and (key not in self.best or row["graph_s"] < self.best[key]["graph_s"]):
            self.best[key] = {"config": knobs, "rule": row.get("rule", knobs), "graph_s": row["graph_s"]}
        return row

    def launch_config(self, stage: str, variant: str, point, cfg: dict) -> None:
        """``cfg`` with the launcher's split rule, then at whole-wave split counts of its compiled kernel."""
        T, N = point
        geo = launch_geometry(stage, variant, cfg, N, T, self.sms)
        row = self.measure(stage, variant, point, cfg, {"splits": geo["splits"]})
        resident = row.get("resources", {}).get("kres" if stage == "kres" else "shared", {}).get("resident")
        if resident is None:
            return
        tried = {geo["splits"]}
        for waves in self.waves:
            splits = wave_splits(waves, resident, self.sms, geo["items"], T, geo["block_t"])
            if splits not in tried:
                tried.add(splits)
                # the rule that gives this split count at any size: at most `waves` whole waves of resident programs
                rule = ({"res_whole_waves": True, "res_programs_per_sm": waves * resident} if stage == "kres" else
                        {"whole_waves": True, "programs_per_sm": waves * resident})
                self.measure(stage, variant, point, {**cfg, "res_splits" if stage == "kres" else "n_splits": splits},
                             {"splits": splits, "waves": waves, "resident": resident, "rule": {**cfg, **rule}})

    def best_time(self, stage: str, variant: str, point) -> float:
        return self.best.get(f"{stage}/{variant}/{point[0]}:{point[1]}", {}).get("graph_s", float("inf"))

    def best_config(self, stage: str, variant: str, point, rule: bool = False) -> dict:
        """The knobs of the fastest passing configuration of ``stage`` ({} if none); ``rule``: with a whole-wave split
        count expressed as the split rule that gives it."""
        best = self.best.get(f"{stage}/{variant}/{point[0]}:{point[1]}", {})
        return dict(best.get("rule" if rule else "config", {}))

    def stage(self, stage: str, point, candidates: dict) -> None:
        for variant in STAGE_VARIANTS[stage]:
            if self.variants and variant not in self.variants:
                continue
            if self.run.out_of_time():
                return
            if stage == "combined":
                knobs = self.best_config("kres", variant, point, rule=True)
                after = min(("shared", "merge"), key=lambda st: self.best_time(st, variant, point))
                knobs.update(self.best_config(after, variant, point, rule=True))
                self.measure(stage, variant, point, knobs)
            elif stage == "merge":
                fixed = self.best_config("shared", variant, point)
                fixed_rule = self.best_config("shared", variant, point, rule=True)
                for cfg in candidates["merge"]:
                    self.measure(stage, variant, point, {**fixed, **cfg}, {"rule": {**fixed_rule, **cfg}})
            else:
                for cfg in candidates[stage]:
                    if stage == "shared" and cfg == {"block_t": default_block_t(stage, variant, point[1])}:
                        continue  # the defaults again
                    self.launch_config(stage, variant, point, cfg)

    def run_jobs(self, jobs: list, candidates: dict) -> None:
        """Each (stage, point) of ``jobs`` until the run's time limit; the summary into the run's ``extra``."""
        started = time.time()
        for stage, point in jobs:
            if self.run.out_of_time():
                print(f"time limit reached: {stage} at {point} not run", flush=True)
                self.run.extra.setdefault("not_run", []).append(f"{stage}/{point[0]}:{point[1]}")
                continue
            self.stage(stage, point, candidates)
        self.run.extra["summary"] = self.summary()
        self.run.extra["sweep_s"] = time.time() - started

    def summary(self) -> list[dict]:
        """Per (point, variant): the default configuration's time, the fastest passing one's (its stage, knobs, and
        the knobs with whole-wave split counts as the rule that gives them)."""
        out = []
        for (point, variant) in self.checks:
            default = next((r for r in self.run.rows if r["variant"] == variant and r["config"] == "{}"
                            and (r["context"], r["agents"]) == point and "graph_s" in r), {})
            ranked = [(b["graph_s"], key.split("/")[0], b) for key, b in self.best.items()
                      if key.split("/")[1:] == [variant, f"{point[0]}:{point[1]}"]]
            if ranked:
                t, stage, b = min(ranked, key=lambda x: x[0])
                out.append({"variant": variant, "context": point[0], "agents": point[1], "stage": stage,
                            "default_s": default.get("graph_s"), "best_s": t, "best_config": b["config"],
                            "best_rule": b["rule"]})
        return out


def job_order(points: list, stages: list[str]) -> list[tuple[str, tuple]]:
    """(stage, point) in priority order: the K pass at the first two points, then every stage point by point."""
    jobs = [("kres", p) for p in points[:2] if "kres" in stages]
    jobs += [(s, p) for p in points for s in ("kres", "shared", "merge", "combined")
             if s in stages and (s, p) not in jobs]
    return jobs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", nargs="+", default=["32768:32", "32768:128", "32768:8"])
    ap.add_argument("--stage", nargs="+", default=["kres", "shared", "merge", "combined"],
                    choices=["kres", "shared", "merge", "combined"])
    ap.add_argument("--time-limit", type=float, default=190.0,
                    help="seconds (from the start) after which no new configuration starts")
    ap.add_argument("--waves", type=int, nargs="+", default=[1, 2],
                    help="whole waves of resident programs to size the splits for, per launch configuration")
    ap.add_argument("--candidates", default=None,
                    help='JSON {stage: [config, ...]} replacing those stages\' candidate lists')
    ap.add_argument("--full-grid", action="store_true", help="the kres/shared stages try every GRIDS combination")
    ap.add_argument("--variants", nargs="+", default=None, choices=["kv", "v", "base"],
                    help="only these variants of each stage (default: all of STAGE_VARIANTS)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    run = BenchmarkRun("sweep_kernel", params={"stages": args.stage, "points": args.points, "waves": args.waves,
                                               "time_limit_s": args.time_limit, "variants": args.variants},
                       case_keys=["stage", "variant", "context", "agents", "config"], out=args.out,
                       time_limit=args.time_limit)
    if not torch.cuda.is_available():
        raise SystemExit("sweep_kernel needs a CUDA GPU")
    from triton.testing import do_bench

    candidates = {**CANDIDATES, **({s: configs(s) for s in GRIDS} if args.full_grid else {}),
                  **(json.loads(args.candidates) if args.candidates else {})}
    run.result.params["candidates"] = {s: candidates[s] for s in ("kres", "shared", "merge")}
    points = [tuple(map(int, p.split(":"))) for p in args.points]
    sweep = Sweep(run, lambda fn: graph_time(fn, do_bench), {p: make_case(*p) for p in points}, args.waves,
                  torch.cuda.get_device_properties(0).multi_processor_count, args.variants)
    sweep.run_jobs(job_order(points, args.stage), candidates)
    for s in run.extra["summary"]:
        t0 = f"{s['default_s'] * 1e6:.1f}" if s["default_s"] else "-"
        print(f"BEST {s['variant']:4s} {s['context']}:{s['agents']:<4d} default {t0} us -> {s['best_s'] * 1e6:.1f} us "
              f"({s['stage']}) {json.dumps(s['best_config'], sort_keys=True)}", flush=True)
    run.finish()


if __name__ == "__main__":
    main()
