"""Tensor parallelism (transformers ``tp_plan``, DTensor): what ForkKV needs to know about a sharded model.

Under ``from_pretrained(..., tp_plan="auto")`` (one process per GPU, ``torchrun``), transformers shards ``q/k/v_proj``
by output features ("colwise": each rank computes its own KV heads) and ``o_proj``/``down_proj`` by input features
("rowwise": each rank holds a slice of the input and the outputs are summed across ranks). PEFT's LoRA on a colwise
projection keeps ``lora_A`` whole on every rank and shards ``lora_B`` by output rows, so on each rank:

- the attention module sees only its ranks' KV heads: ForkKV's base K/V (bCache) is built from them and is sharded
  by KV head like the model's own cache; the ``B_k``/``B_v`` factors are the local rows of ``lora_B``;
- the residuals ``u = x·Aᵀ`` (r numbers per token, not per head) are computed from the replicated input and the whole
  ``A``: every rank holds all of them (replicated).

This module reads the local shard of a DTensor parameter and its placement; the rest of ForkKV works on local
tensors, so it needs nothing else. Nothing here imports ``torch.distributed`` unless a DTensor is present.
"""

from __future__ import annotations

import torch


def is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank's own shard of ``t`` (``t`` itself for a plain tensor): the DTensor's local tensor object itself, so
    that identities, version counters and memos attached to it persist from call to call."""
    if not is_dtensor(t):
        return t
    inner = getattr(t, "_local_tensor", None)
    return inner if inner is not None else t.to_local()


def shard_dim(t) -> int | None:
    """The tensor dimension a DTensor is sharded on over its (1-D) mesh; ``None`` for plain or replicated tensors."""
    if not is_dtensor(t):
        return None
    for p in t.placements:
        if type(p).__name__ == "Shard":
            return p.dim
    return None


def process_group(t):
    """The process group a DTensor is laid out over (its mesh's only dimension)."""
    return t.device_mesh.get_group()


def tp_world(model) -> tuple[int, int]:
    """``(rank, world size)`` of ``model``'s tensor-parallel mesh; ``(0, 1)`` when it is not tensor-parallel."""
    for p in model.parameters():
        if is_dtensor(p):
            mesh = p.device_mesh
            return mesh.get_local_rank(), mesh.size()
    return 0, 1


def lora_shard(factor: torch.Tensor, base_weight: torch.Tensor, dim: int) -> torch.Tensor:
    """This rank's part of a LoRA factor whose base layer is sharded on ``dim`` (``lora_B`` rows, dim 0, for a colwise
    layer; ``lora_A`` columns, dim 1, for a rowwise one); the factor whole when the layer is not sharded that way.

    Taken from the factor's own sharding when PEFT sharded it, else sliced like the base weight (PEFT releases
    without DTensor support leave the factors whole on every rank while the base layer computes only its shard).
    """
    if shard_dim(factor) == dim:
        return local(factor)
    f = local(factor)
    if shard_dim(base_weight) != dim:
        return f
    n, n_local = base_weight.shape[dim], local(base_weight).shape[dim]
    if f.shape[dim] == n_local:
        return f
    if f.shape[dim] != n:
        raise ValueError(f"a LoRA factor of shape {tuple(f.shape)} does not match its base layer's {n} features")
    mesh = base_weight.device_mesh
    start = mesh.get_local_rank() * -(-n // mesh.size())  # torch.chunk's split, as DTensor's Shard
    return f.narrow(dim, start, n_local)


def rowwise_group(base_weight: torch.Tensor):
    """The process group over which a rowwise layer's partial products are summed; ``None`` if not rowwise."""
    return process_group(base_weight) if shard_dim(base_weight) == 1 else None


def gathered_projections(model, attn) -> list[str]:
    """The attention projections a tensor-parallel ``model``'s plan shards but gathers the output of
    (``colwise_gather_output``: OLMo 2/3, OLMoE, ... keep every KV head on every rank for their q/k norms); empty
    when its attention ``attn``'s K projection is not sharded (one look, not a walk of every parameter). ForkKV's
    factors and heads follow the colwise layout, not these."""
    proj = getattr(attn, "k_proj", None) or getattr(attn, "qkv_proj", None)
    if not is_dtensor(getattr(getattr(proj, "base_layer", proj), "weight", None)):
        return []
    plans = [getattr(m, "_tp_plan", None) or {} for m in model.modules() if hasattr(m, "_tp_plan")]
    plans.append(getattr(getattr(model, "config", None), "base_model_tp_plan", None) or {})
    return sorted({k.rsplit(".", 1)[-1] for plan in plans for k, v in plan.items()
                   if "gather" in str(v) and any(p in k for p in ("q_proj", "k_proj", "v_proj", "qkv_proj"))})
