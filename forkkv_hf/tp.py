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
