"""What the tensor-parallel test runs, on one process (the reference) and on every rank of ``tests/tp_worker.py``."""

import torch

import forkkv_hf
from forkkv_hf import SharedContext, batch_inputs, cache_kwargs

NAMES = ["planner", "coder", "__base__", "planner", "coder"]


def _case(device):
    g = torch.Generator().manual_seed(5)
    ctx = torch.randint(3, 128, (37,), generator=g)
    prompts = [torch.randint(3, 128, (n,), generator=g) for n in (3, 17, 5, 1, 9)]
    return ctx, batch_inputs(ctx, prompts, pad_token_id=0, device=device)


def run_fitted(pm, device, shared, new_tokens: int = 6):
    """The same generate with the agents' residuals fitted to their own pass at full width
    (``SharedContext.fit_residuals``): each rank fits its own KV heads. Returns the sequences."""
    ctx, inputs = _case(device)
    forkkv_hf.enable_forkkv(pm)
    with torch.no_grad():
        fitted = shared.fit_residuals(pm, ["coder", "planner"], rank=100_000, progress=False)
        out = pm.generate(**inputs, adapter_names=NAMES, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                          return_dict_in_generate=True, **cache_kwargs(fitted.fork(NAMES)))
    return out.sequences


def run_store(pm, device, new_tokens: int = 6):
    """The same generate with its cache forked from a ``ForkKVStore`` (the context extended in two turns); returns
    the sequences."""
    ctx, inputs = _case(device)
    forkkv_hf.enable_forkkv(pm)
    store = forkkv_hf.ForkKVStore(pm)
    with torch.no_grad():
        store.extend(ctx[:20].to(device), ["coder", "planner"])
        store.extend(ctx.to(device))
        cache = store.fork(ctx.to(device), NAMES)
        out = pm.generate(**inputs, adapter_names=NAMES, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                          return_dict_in_generate=True, **cache_kwargs(cache))
    return out.sequences


def run_forkkv(pm, device, new_tokens: int = 6):
    """Build the shared context of two agents, fork it for a mixed batch (two rows of one agent, a base row), and
    generate greedily; returns the SharedContext and the generate output (sequences and scores)."""
    ctx, inputs = _case(device)
    forkkv_hf.enable_forkkv(pm)
    with torch.no_grad():
        shared = SharedContext.build(pm, ctx.to(device), ["coder", "planner"], progress=False)
        out = pm.generate(**inputs, adapter_names=NAMES, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                          output_scores=True, return_dict_in_generate=True, **cache_kwargs(shared.fork(NAMES)))
    return shared, out


def run_mixed_dtypes(pm, device, new_tokens: int = 6):
    """``run_forkkv`` with the coder's ``o_proj`` LoRA in fp64 (the planner's in fp32): batched LoRA hands these
    layers (rowwise under tensor parallelism) to a per-adapter loop. Returns the generate output."""
    with torch.no_grad():
        for name, m in pm.named_modules():
            if name.endswith("o_proj") and hasattr(m, "lora_A") and "coder" in m.lora_A:
                m.lora_A["coder"].to(torch.float64)
                m.lora_B["coder"].to(torch.float64)
    return run_forkkv(pm, device, new_tokens)[1]
