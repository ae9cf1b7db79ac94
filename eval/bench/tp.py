"""Tensor-parallel benchmark: ForkKV and the PEFT baseline on a model loaded with ``tp_plan="auto"`` (one process per
GPU, ``torchrun``) vs the same model on one GPU.

Llama-3.1-8B shapes (random bf16 weights, written once as a checkpoint: ``tp_plan`` loads through
``from_pretrained``), rank-16 LoRA on q/k/v/o (random B, sharded as PEFT shards a user's adapters), a shared
context of ``--context`` tokens, 64-token prompts, ``--new-tokens`` generated tokens. For ForkKV at each N in
``--forkkv-agents`` and the baseline at each N in ``--agents`` (see eval/bench/e2e.py for the two systems; here the
baseline's LoRA is forkkv_hf's batched LoRA, because PEFT 0.21.0's mixed-adapter loop fails under tensor parallelism):
time to first token, decode tokens/s, every rank's peak GPU memory and its share of the cache. Every rank measures;
rank 0 writes the result (the one schema, eval/bench/schema.py; rows keyed by (system, context, agents)).

    python -m eval.bench.tp --make-checkpoint DIR                      # once (16 GB for 8B shapes)
    python -m eval.bench.tp --checkpoint DIR --out one_gpu.json         # 1 GPU
    torchrun --nproc_per_node 2 -m eval.bench.tp --checkpoint DIR --out tp2.json
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from .e2e import PROMPT, measure_case
from .models import add_random_adapters, build_model, default_device, llama8b_config
from .runner import BenchmarkRun


def make_checkpoint(path: str, layers: int, tiny: bool) -> None:
    dev = default_device()
    model = build_model(llama8b_config(layers=layers, tiny=tiny), device=dev,
                        dtype=torch.bfloat16 if dev == "cuda" else torch.float32)
    model.save_pretrained(path)
    print("wrote", path, flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--make-checkpoint", default=None)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--agents", type=int, nargs="+", default=[4], help="N for the baseline")
    ap.add_argument("--forkkv-agents", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tiny", action="store_true", help="toy sizes: a CPU smoke run (gloo) of this script")
    ap.add_argument("--time-limit", type=float, default=None, help="seconds: start no new case after this")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.make_checkpoint:
        return make_checkpoint(args.make_checkpoint, args.layers, args.tiny)
    if not args.checkpoint:
        ap.error("--checkpoint DIR is needed (write one first with --make-checkpoint DIR)")

    from transformers import AutoModelForCausalLM

    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = default_device()
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    t0 = time.time()
    if world > 1:
        model = AutoModelForCausalLM.from_pretrained(args.checkpoint, tp_plan="auto", dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=dtype, device_map=dev)
    import torch.distributed as dist

    rank = dist.get_rank() if world > 1 else 0
    device = model.model.embed_tokens.weight.device
    n_max = max(args.agents + args.forkkv_agents)
    names = [f"agent{i}" for i in range(n_max)]
    pm = add_random_adapters(model, names, rank=16)
    local = device.index if device.type == "cuda" else None
    if local is not None:
        torch.cuda.set_device(local)  # run_one reads the current device's peak memory

    def gather(x):  # one value per rank, on every rank
        if world == 1:
            return [x]
        res = [None] * world
        dist.all_gather_object(res, x)
        return res

    weights_gib = gather(torch.cuda.memory_allocated(local) / 2**30 if local is not None else 0.0)
    if rank == 0:
        print(f"world {world}: model + {n_max} adapters {weights_gib} GiB per rank in {time.time() - t0:.0f} s",
              flush=True)
    g = torch.Generator(device=device).manual_seed(0)
    vocab = model.config.vocab_size
    params = {"world_size": world, "mode": "tp_plan=auto" if world > 1 else "one GPU",
              "model": {"shape": "tiny" if args.tiny else "Llama-3.1-8B", "layers": args.layers, "dtype": str(dtype),
                        "lora": "rank 16 on q/k/v/o", "adapters": n_max},
              "weights_and_adapters_gib_per_rank": weights_gib, "new_tokens": args.new_tokens,
              "context": args.context, "prompt_tokens": PROMPT}
    run = BenchmarkRun("bench_tp", params, ("system", "context", "agents"), out=args.out, suffix=f"_x{world}",
                       time_limit=args.time_limit, write=rank == 0)

    cases = [("baseline", n) for n in args.agents] + [("forkkv", n) for n in args.forkkv_agents]
    for system, N in cases:
        # every rank must run the same cases: rank 0 decides about the time limit
        if gather(run.out_of_time())[0]:
            break
        ctx = torch.randint(3, vocab, (args.context,), device=device, generator=g)
        prompts = [torch.randint(3, vocab, (PROMPT,), device=device, generator=g) for _ in range(N)]
        # the baseline's LoRA is forkkv_hf's batched LoRA on one GPU and on two: PEFT 0.21.0's own mixed-adapter
        # loop fails under tensor parallelism (it leaves the LoRA factors whole while the base layers compute shards)
        rec = {"system": system, "context": args.context, "agents": N,
               **measure_case(pm, system, ctx, prompts, names[:N], args.new_tokens, baseline_batched_lora=True)}
        rec.pop("peak_gib_per_gpu", None)
        rec["peak_gib_per_rank"] = gather(rec.get("peak_gib"))
        rec["cache_gib_per_rank"] = gather(rec.get("cache_gib"))
        run.add(rec)
    run.finish()  # rank 0 writes
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
