"""Tensor parallelism (transformers ``tp_plan``, DTensor): what ForkKV needs to know about a sharded model.

Under ``from_pretrained(..., tp_plan="auto")`` (one process per GPU, ``torchrun``), transformers shards ``q/k/v_proj``
by output features ("colwise": each rank computes its own KV heads) and ``o_proj``/``down_proj`` by input features
("rowwise": each rank holds a slice of the input and the outputs are summed across ranks). PEFT's LoRA on a colwise
projection keeps ``lora_A`` whole on every rank and shards ``lora_B`` by output rows, so on each rank:

- the attention module sees only its ranks' KV heads: ForkKV's base K/V (bCache) is built from them and is sharded
  by KV head like the model's own cache; the ``B_k``/``B_v`` factors are the local rows of ``lora_B``;
- the residuals ``u = x·Aᵀ`` (r numbers per token, not per head) are computed from the replicated input and the whole
  ``A``: every rank holds all of them (replicated).

This module reads the local shard of a DTensor parameter, its placement and its layer's tensor-parallel style (only
plain "colwise"/"rowwise" layers run their LoRA on shards; a layer whose plan gathers the output or replicates the
input keeps it whole); the rest of ForkKV works on local tensors, so it needs nothing else. It also holds the
per-adapter loop that sharded layers run in place of PEFT's (same adapter order on every rank). Nothing here imports
``torch.distributed`` unless a DTensor is present.
"""

from __future__ import annotations

import re

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
    Only for a layer of the plain ``"colwise"``/``"rowwise"`` style (:func:`tp_style`; :func:`layer_factor` checks).
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


#: the tensor-parallel styles whose LoRA runs on this rank's shard: "colwise" (output features sharded: ``lora_B``'s
#: rows) and "rowwise" (input features sharded: ``lora_A``'s columns, the partial ``u`` summed across the ranks).
#: Every other style of a sharded weight gathers the output or replicates the input ("colwise_gather_output": Llama's
#: ``lm_head``, GLM's ``gate_up_proj``; "rowwise_split_input": GLM's ``down_proj``): the LoRA stays whole there, as
#: PEFT keeps it.
SHARDED_STYLES = ("colwise", "rowwise")


def _plan_key(name: str) -> str:
    return re.sub(r"\.\d+(\.|$)", lambda m: ".*" + m.group(1), name)  # as transformers and PEFT match plan keys


def tp_style(layer) -> str | None:
    """``"colwise"`` or ``"rowwise"`` where tensor parallelism shards the LoRA layer ``layer`` so that its LoRA runs
    on this rank's shard (:data:`SHARDED_STYLES`); ``None`` where the LoRA is computed whole (not tensor-parallel, or
    a style that gathers the output or replicates the input).

    Before (found by an audit), the base weight's placement alone decided: ``lm_head`` ("colwise_gather_output",
    its weight sharded by rows like a colwise layer's) got its ``lora_B`` sliced while its output is the whole
    vocabulary, and every ForkKV generate with LoRA on it crashed. Now the layer's plan decides: the style PEFT
    stamps on the base layer (``_hf_tp_plan``), else the one :func:`stamp_tp_plans` looked up in the model's plan,
    else (no plan found) the weight's placement."""
    base = layer.get_base_layer()
    dim = shard_dim(getattr(base, "weight", None))
    if dim is None:
        return None
    plan = getattr(base, "_hf_tp_plan", None)
    if plan is None:
        plan = layer.__dict__.get("_forkkv_tp_plan")
    if plan is None:
        return {0: "colwise", 1: "rowwise"}.get(dim)
    return plan if plan in SHARDED_STYLES else None


def stamp_tp_plans(model, layers) -> None:
    """Record on each LoRA layer of ``layers`` whose base weight is a DTensor, and whose style PEFT did not stamp
    (PEFT releases without DTensor support), its entry of ``model``'s tensor-parallel plan (``model``: the
    transformers model, whose ``tp_plan`` keys are its module names with ``*`` for layer numbers). Walks ``model``
    only while such a layer has no record."""
    todo = {id(m) for m in layers if "_forkkv_tp_plan" not in m.__dict__
            and is_dtensor(getattr(m.get_base_layer(), "weight", None))
            and getattr(m.get_base_layer(), "_hf_tp_plan", None) is None}
    if not todo:
        return
    try:
        plan = dict(getattr(model, "tp_plan", None) or {})
    except Exception:  # (a plan the model cannot resolve: the weights' placements decide)
        plan = {}
    for name, m in model.named_modules():
        if id(m) in todo:
            m._forkkv_tp_plan = plan.get(_plan_key(name))


def layer_factor(factor: torch.Tensor, base_weight: torch.Tensor, dim: int, style: str | None) -> torch.Tensor:
    """The part of a LoRA factor (or ``lora_B``'s bias, ``dim`` 0) this rank computes with, for a layer of
    :func:`tp_style` ``style``: its shard (:func:`lora_shard`) on a colwise or rowwise layer, else the whole factor."""
    if style in SHARDED_STYLES:
        return lora_shard(factor, base_weight, dim)
    return factor.full_tensor() if shard_dim(factor) is not None else local(factor)


def rowwise_group(layer):
    """The process group over which the LoRA layer ``layer``'s partial products are summed; ``None`` unless its
    style is "rowwise" (a "rowwise_split_input" layer's input is whole: its LoRA needs no sum)."""
    return process_group(layer.get_base_layer().weight) if tp_style(layer) == "rowwise" else None


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


def ordered_mixed_batch_forward(layer, x: torch.Tensor, *args, adapter_names, **kwargs) -> torch.Tensor:
    """PEFT's ``_mixed_batch_forward`` (one LoRA pass per adapter of the batch) for a LoRA layer that tensor
    parallelism shards (:func:`tp_style` not ``None``), with the adapters in the same order on every rank.

    Before (found by an audit), such a layer that batched LoRA hands back (adapters of mixed dtypes, LoRA variants,
    active dropout, a forward that needs gradients) ran PEFT's own loop, which iterates ``set(adapter_names)``: its
    order differs between processes (string hashes), so on a rowwise layer each rank all-reduced another adapter's
    partial ``u`` with the others' (silently wrong, or gloo aborting on a size mismatch). Now the adapters run in
    sorted order, one sum across the ranks each: plain LoRA on this rank's factors (:func:`layer_factor`; also when
    PEFT left them whole), LoRA variants through PEFT's variant code, as PEFT calls them. A forward that needs
    gradients runs PEFT's own modules and then fails in autograd, as PEFT's own loop does (the sharded base output
    is a view it forbids writing in place): not served."""
    from peft.tuners.lora.layer import VARIANT_KWARG_KEYS

    variant_kwargs = {k: kwargs.pop(k, None) for k in VARIANT_KWARG_KEYS}
    result = layer.base_layer(x, *args, **kwargs)
    style, base_w, group = tp_style(layer), layer.get_base_layer().weight, rowwise_group(layer)
    grad = torch.is_grad_enabled() and (x.requires_grad or any(  # (as batched LoRA's _needs_grad)
        p.requires_grad for m in (layer.lora_A, layer.lora_B) for p in m.parameters()))
    for name in sorted({n for n in adapter_names if n != "__base__" and n in layer.lora_A}):
        rows = [i for i, n in enumerate(adapter_names) if n == name]
        lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
        sub = x[rows].to(lora_a.weight.dtype)
        if name in getattr(layer, "lora_variant", {}):
            offsets = variant_kwargs.get("alora_offsets")
            vk = dict(variant_kwargs, **({} if offsets is None else {"alora_offsets": [offsets[j] for j in rows]}))
            out = layer.lora_variant[name].forward(layer, active_adapter=name, x=sub, result=result[rows], **vk,
                                                   **kwargs)
            result[rows] = out.to(result.dtype)
            continue
        sub = layer.lora_dropout[name](sub)
        if grad:
            y = lora_b(lora_a(sub)) * layer.scaling[name]
        else:
            A = layer_factor(lora_a.weight, base_w, 1, style)
            B = layer_factor(lora_b.weight, base_w, 0, style)
            bias = getattr(lora_b, "bias", None)
            u = torch.nn.functional.linear(sub, A)
            if group is not None:
                import torch.distributed as dist

                u = u.to(torch.promote_types(u.dtype, torch.float32))  # (summed in fp32 at least)
                dist.all_reduce(u, group=group)
            y = torch.nn.functional.linear(u.to(B.dtype), B, None if bias is None else layer_factor(
                bias, base_w, 0, style)) * layer.scaling[name]
        result[rows] += y.to(result.dtype)
    return result
