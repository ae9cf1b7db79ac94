"""What the batched LoRA kernel's int64 offsets cost: :func:`forkkv_kernels.lora.lora_delta_planned` as it is (row and
adapter offsets widened to int64, b5f2c11: int32 wrapped from ~150K tokens of 14K features) against the same source
with the two ``.to(tl.int64)`` casts removed (the int32 offsets before it), on Llama-3.1-8B's LoRA shapes (d_in 4096;
q/o 4096 and k/v 1024 outputs, rank 16, one adapter per row): decode (1 token per row) at 1 / 32 / 256 rows and a
prefill of 8 rows x 512 tokens. Each shape: the two kernels' outputs compared, then ``triton.testing.do_bench``
medians in four alternating rounds (a b b a ...), the median of each kernel's rounds reported.

    python -m eval.bench.lora_offsets --out lora_offsets.json      # GPU
    TRITON_INTERPRET=1 python -m eval.bench.lora_offsets --small    # CPU: the two kernels agree (no timing)
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from ..device import device_info

SHAPES = [  # (name, rows, tokens per row, d_out)
    ("decode_qo", 1, 1, 4096), ("decode_qo", 32, 1, 4096), ("decode_qo", 256, 1, 4096),
    ("decode_kv", 1, 1, 1024), ("decode_kv", 32, 1, 1024), ("decode_kv", 256, 1, 1024),
    ("prefill_qo", 8, 512, 4096), ("prefill_kv", 8, 512, 1024),
]
SMALL = [("decode", 5, 1, 48), ("prefill", 3, 7, 40)]


def int32_variant():
    """:mod:`forkkv_kernels.lora` compiled from its own source with the int64 casts removed."""
    from forkkv_kernels import lora

    src = inspect.getsource(lora)
    if src.count(".to(tl.int64)") != 2:
        raise RuntimeError("forkkv_kernels/lora.py no longer has the two int64 casts this benchmark removes")
    path = Path(tempfile.mkdtemp()) / "forkkv_lora_int32.py"  # a file: Triton's JIT reads the kernel's source
    path.write_text(src.replace(".to(tl.int64)", ""))
    spec = importlib.util.spec_from_file_location("forkkv_lora_int32", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return lora, mod


def _inputs(rows: int, tokens: int, d_in: int, d_out: int, rank: int, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(rows * 7 + tokens)
    mk = lambda *s: (torch.randn(*s, generator=g) * 0.05).to(dtype).to(device)  # noqa: E731
    n = rows
    return (mk(rows, tokens, d_in), mk(n, rank, d_in), mk(n, d_out, rank),
            torch.full((n,), 2.0, device=device), torch.zeros(rows, tokens, d_out, dtype=dtype, device=device),
            tuple(range(rows)))


def measure(shapes, small: bool) -> list[dict]:
    new, old = int32_variant()
    device = "cpu" if small else "cuda"
    dtype = torch.float32 if small else torch.bfloat16
    d_in, rank = (64, 4) if small else (4096, 16)
    rows_out = []
    for name, rows, tokens, d_out in shapes:
        x, A, B, scale, out, slots = _inputs(rows, tokens, d_in, d_out, rank, dtype, device)
        plan = new._plan(slots, tokens, str(x.device))
        run = {k: (lambda m=m: m.lora_delta_planned(x, A, B, scale, out.zero_(), plan[0], *plan[1]))
               for k, m in (("int64", new), ("int32", old))}
        y64, y32 = run["int64"]().clone(), run["int32"]().clone()
        row = dict(shape=name, rows=rows, tokens=tokens, d_in=d_in, d_out=d_out, rank=rank,
                   equal=bool(torch.equal(y64, y32)))
        if not small:
            import triton.testing

            times = {"int64": [], "int32": []}
            for order in (("int64", "int32"), ("int32", "int64")) * 2:
                for k in order:
                    times[k].append(triton.testing.do_bench(run[k], warmup=50, rep=200) * 1e3)
            row.update({f"{k}_us": statistics.median(v) for k, v in times.items()},
                       **{f"{k}_rounds_us": v for k, v in times.items()})
            row["cost"] = row["int64_us"] / row["int32_us"] - 1
        rows_out.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("rounds_us")}), flush=True)
    return rows_out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="lora_offsets.json")
    ap.add_argument("--small", action="store_true", help="CPU interpreter (TRITON_INTERPRET=1): agreement only")
    args = ap.parse_args(argv)
    rows = measure(SMALL if args.small else SHAPES, args.small)
    with open(args.out, "w") as f:
        json.dump(dict(device=device_info(), rows=rows), f, indent=1)
    if not all(r["equal"] for r in rows):
        raise SystemExit("the int64 and int32 kernels disagree")


if __name__ == "__main__":
    main()
