"""What the V residual's reads cost the shared-part kernel: the same decode call timed with every row on its own
agent's ``u_v`` (the benchmark's case) and with every row reading agent 0's (same instructions, same grid, same
arithmetic; only the working set of ``u_v`` shrinks from N agents' to one agent's, which stays in L2).

Each KV head's programs read a row's ``u_v [T, r]`` again (it is shared by the KV heads: ``B_v`` maps the rank to every
head), so the kernel moves ``H_kv`` x N x T x r x 2 bytes through L2 beside the base: at 32 agents and 32K, 268 MB
against the base's 134 MB per copy read (eval/KERNEL_NOTES.md, "v13"; measured there: the working set did not matter). If those reads are what the V residual costs,
the "one agent" column is close to base only; if it is the arithmetic, close to the V-only time.

    python -m eval.bench.probe_uv [--points 32768:32 32768:128] [--out probe.json]
    python -m eval.bench.probe_uv --ablate no_uv_load     # the same calls with the V residual's parts removed

``--ablate`` (timing only: the results are wrong, and the call is not checked) runs a copy of the shared-part kernel
with a part of the V residual's loop removed, to see which part costs the time: ``no_uv_load`` multiplies a zero
tile instead of loading ``u_v`` (the ``P·u_v`` MMA, its layout changes and the rescale stay; offline for sm_90 the
loop keeps its 32 ``mma.sync`` per 64-token tile and loses 65 of 603 instructions). A removal of the MMA that keeps
the load alive without costing more than the MMA was not found (sums of the tile within each thread: 2,060
instructions and spills).

Times: GPU time per call (CUDA graph of ``GRAPH_CALLS`` calls replayed, ``do_bench`` median); the kernels'
launch defaults, or ``--knobs`` (JSON) over them.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import json
import os
import tempfile

import torch

from .kernel import D, make_case, variant_view
from .measure import graph_time
from .runner import BenchmarkRun


def one_agent_v(view):
    """The same view with every row reading agent 0's V residual (its K residual slots unchanged)."""
    rows = torch.zeros_like(view.v_rows)
    return dataclasses.replace(view, v_rows=rows, v_slots=(0,) * len(view.v_slots))


#: the lines of ``_cascade_shared_kernel``'s V-residual step that an ablation replaces
UV_LOAD = ("u3 = tl.load(UV + u_off[:, None, :] + t[None, :, None] * RV, mask=u_ok[:, None, :] & tm[None, :, None],\n"
           "                         other=0.0)")
ABLATIONS = {
    "no_uv_load": (UV_LOAD, "u3 = tl.zeros([N_SUB, BLOCK_T, SBC], dtype)"),
}


def ablated_kernel(name: str):
    """A copy of the shared-part kernel with the ablation ``name`` (:data:`ABLATIONS`), compiled from a file (Triton
    reads a kernel's source)."""
    from forkkv_kernels import cascade

    old, new = ABLATIONS[name]
    src = inspect.getsource(cascade._cascade_shared_kernel.fn)
    if old not in src:
        raise SystemExit(f"the shared-part kernel changed: {old!r} not found; update probe_uv.ABLATIONS")
    src = src.replace(old, new, 1)
    head = ("import triton\nimport triton.language as tl\n"
            "from forkkv_kernels.attention_common import mma, softmax_step\n\n")
    path = os.path.join(tempfile.mkdtemp(prefix="forkkv_ablate_"), f"shared_{name}.py")
    with open(path, "w") as f:
        f.write(head + src)
    spec = importlib.util.spec_from_file_location(f"shared_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod._cascade_shared_kernel


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", nargs="+", default=["32768:32", "32768:128"])
    ap.add_argument("--knobs", default="{}", help="JSON launch knobs over the defaults, for every call")
    ap.add_argument("--ablate", choices=sorted(ABLATIONS), default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("probe_uv needs a CUDA GPU")
    from triton.testing import do_bench

    from forkkv_hf.ops.dispatch import residual_attention_triton

    knobs = json.loads(args.knobs)
    if args.ablate:
        from forkkv_kernels import cascade

        cascade._cascade_shared_kernel = ablated_kernel(args.ablate)
    run = BenchmarkRun("probe_uv", params={"knobs": knobs, "points": args.points, "ablate": args.ablate},
                       case_keys=["context", "agents", "variant"], out=args.out)
    for point in args.points:
        T, N = map(int, point.split(":"))
        q, view = make_case(T, N)
        views = {"base": variant_view(view, "base"), "v": variant_view(view, "v"),
                 "v_one_agent": one_agent_v(variant_view(view, "v")), "kv": view, "kv_one_v_agent": one_agent_v(view)}
        for name, vv in views.items():
            def fn(vv=vv):
                call = lambda: residual_attention_triton(q, vv, None, D**-0.5, **knobs)  # noqa: E731
                call()
                return {"graph_s": graph_time(call, do_bench)}

            row = run.measure({"context": T, "agents": N, "variant": name}, fn)
            print(f"{T}:{N} {name:15s} {row.get('graph_s', float('nan')) * 1e6:8.1f} us", flush=True)
        del q, view, views
        torch.cuda.empty_cache()
    run.finish()


if __name__ == "__main__":
    main()
