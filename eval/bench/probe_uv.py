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

The V residual alone runs in the Gluon shared kernel from 32 query vectors per KV head (v26), and two ablations patch
a copy of that module (``forkkv_kernels/shared_gluon.py``): ``gluon_no_uv_load`` masks off every ``u_v`` copy
(``cp.async`` with nothing read: the tiles zero-filled, no load leaves the SM; the products, their shared-memory
reads and the waits stay), ``gluon_no_pu`` drops the ``P·u_v`` products (the copies and their waits stay). Against
the unablated call at the same point: what the ``u_v`` reads cost, and what the products cost. Two more (v31, after
v28 found the products' part and v30 found their instructions were not it): ``gluon_pu_fixed_tile`` reads every
tile's ``u_v`` from the ring's first slot (the same shared-memory reads, none waiting on the newest copies) and
``gluon_no_uv_wait`` drops the wait for each tile's copies and the CTA barrier before the products.

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


#: the Gluon shared kernel's lines each of its ablations replaces (every occurrence)
GLUON_FETCH_U = "_cp_async(u_smem.index(stage), UV + (u_off + t * RV), mask=(t + u_t) < T)"
GLUON_PU = "acc_u = _pu(p, alpha, acc_u, u_smem, {}, ACC_S, MMA2, NW, RPW, VPR, BLOCK_T, dtype)"
GLUON_PU_TILE = "b = u_smem.index(stage).slice(j * NW, NW, dim=0).load("
GLUON_UV_WAIT = "{0}if not KR:\n{0}    async_copy.wait_group(STAGES - 1)\n{0}    _cta_barrier()\n"
GLUON_ABLATIONS = {
    "gluon_no_uv_load": [(GLUON_FETCH_U, GLUON_FETCH_U.replace("< T)", "< 0)"))],
    "gluon_no_pu": [(GLUON_PU.format("st"), "acc_u = acc_u"), (GLUON_PU.format("sp"), "acc_u = acc_u")],
    # (v31) the products kept, every tile's read from stage 0's ring slot: the same shared-memory reads, none of them
    # waiting on the newest copies
    "gluon_pu_fixed_tile": [(GLUON_PU_TILE, GLUON_PU_TILE.replace("index(stage)", "index(0)"))],
    # (v31) the products kept, without the wait for the tile's copies and the CTA barrier before them
    "gluon_no_uv_wait": [(GLUON_UV_WAIT.format(" " * 16), ""), (GLUON_UV_WAIT.format(" " * 12), "")],
}


def _module_from_source(src: str, name: str):
    """Import ``src`` from a file of its own (Triton and Gluon read a kernel's source from its file)."""
    path = os.path.join(tempfile.mkdtemp(prefix="forkkv_ablate_"), f"{name}.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def ablated_gluon(name: str):
    """The Gluon shared kernel's launcher from a copy of its module with the ablation ``name``
    (:data:`GLUON_ABLATIONS`)."""
    from forkkv_kernels import shared_gluon

    src = inspect.getsource(shared_gluon)
    for old, new in GLUON_ABLATIONS[name]:
        if old not in src:
            raise SystemExit(f"the Gluon shared kernel changed: {old!r} not found; update probe_uv.GLUON_ABLATIONS")
        src = src.replace(old, new)
    return _module_from_source(src.replace("from .", "from forkkv_kernels."), f"shared_gluon_{name}").launch_shared_gluon


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
    return _module_from_source(head + src, f"shared_{name}")._cascade_shared_kernel


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", nargs="+", default=["32768:32", "32768:128"])
    ap.add_argument("--knobs", default="{}", help="JSON launch knobs over the defaults, for every call")
    ap.add_argument("--ablate", choices=sorted([*ABLATIONS, *GLUON_ABLATIONS]), default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("probe_uv needs a CUDA GPU")
    from triton.testing import do_bench

    from forkkv_hf.ops.dispatch import residual_attention_triton

    knobs = json.loads(args.knobs)
    if args.ablate:
        from forkkv_kernels import cascade

        if args.ablate in GLUON_ABLATIONS:
            cascade.launch_shared_gluon = ablated_gluon(args.ablate)
        else:
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
