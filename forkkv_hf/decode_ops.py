"""The compile-friendly op layer of the decode step: ForkKV attention over a static cache layer and the batched
mixed-adapter LoRA, in forms a compiled graph traces without a break.

Nothing here reads tensor values on the host or plans work while tracing: what depends on which row runs which
adapter was built before the step, from the rows, as device tensors (the cache layer's ``agents``/``work``, the
LoRA layer's :class:`LoRADecodePlan`, made when a call's prefill plans that layer). The Triton kernels are reached
through the custom ops of :mod:`forkkv_hf.custom_ops`; the PyTorch paths are plain tensor code.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import custom_ops  # noqa: F401  (registers torch.ops.forkkv.*)
from .reference import kv_mask
from .residual_attention import residual_attention, residual_attention_torch


# ---------------------------------------------------------------------------------------------------------------------
# attention over a StaticForkKVView
def visible_mask(view, Q: int) -> torch.Tensor:
    """``[1, 1, Q, T + capacity]`` bool: what a ``None`` mask means over a static layer (the whole shared context,
    causal among the ``view.length`` private tokens written; the rest of the buffer unwritten)."""
    T, P = view.shared_len, view.private_len
    dev = view.key.device
    last = T + view.length - Q + torch.arange(Q, device=dev)  # absolute position of each query
    return (torch.arange(T + P, device=dev)[None, :] <= last[:, None])[None, None]


def static_attention(query: torch.Tensor, view, attention_mask, scaling: float, softcap: float | None = None):
    """``query [B, H, Q, D]`` over a :class:`~forkkv_hf.static_cache.StaticForkKVView`; returns ``[B, Q, H, D]``.

    Eager (the prefill) it takes the usual dispatch (:func:`~forkkv_hf.residual_attention.residual_attention`).
    Compiled, a decode query goes to the Triton custom op when the layer planned work for it, else (CPU, soft-capping)
    to the PyTorch path, which reads the layer's precomputed agents."""
    Q = query.shape[2]
    if attention_mask is None:
        attention_mask = visible_mask(view, Q)
    if not torch.compiler.is_compiling():
        return residual_attention(query, view, attention_mask, scaling, softcap=softcap)
    if view.work is not None and softcap is None and Q == 1:
        return _triton_attention(query, view, attention_mask, scaling)
    return residual_attention_torch(query, view, attention_mask, scaling, softcap=softcap)


def _triton_attention(query, view, attention_mask, scaling):
    B, _, Q, _ = query.shape
    sh, work, agents = view.shared, view.work, view.agents
    mask, additive = kv_mask(attention_mask, B, Q, view.shared_len, view.private_len, query.device)
    if additive:  # 0 / -inf biases as a bool mask ("forkkv" registers the bool sdpa mask; this is for safety)
        mask = mask > torch.finfo(mask.dtype).min / 2
    has_k, has_v = agents.k_used is not None, agents.v_slot is not None
    return torch.ops.forkkv.residual_attention(
        query, sh.key[0], sh.value[0], sh.cos, sh.sin,
        sh.k_res.u if has_k else None, sh.k_res.B if has_k else None,
        sh.v_res.u if has_v else None, sh.v_res.B if has_v else None,
        view.key, view.value, mask.view(torch.int8),
        work.slot_row, work.slot_q, work.slot_agent, work.agent_k, work.agent_v, work.row_vslot,
        work.block_m, work.a_max, bool(view.rope_half and has_k), float(scaling),
    )


# ---------------------------------------------------------------------------------------------------------------------
# batched mixed-adapter LoRA
@functools.lru_cache(maxsize=256)
def row_slots(slots: tuple, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B] long, [B] fp32)``: each row's adapter slot (clamped to 0) and whether it has one. Memoised: the same
    rows give the same tensors."""
    idx = torch.tensor([max(s, 0) for s in slots], dtype=torch.long, device=device)
    valid = torch.tensor([float(s >= 0) for s in slots], dtype=torch.float32, device=device)
    return idx, valid


def lora_delta_rows(x: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, stack) -> torch.Tensor:
    """``[B, L, d_out]`` LoRA delta (bias included) of ``x [B, L, d_in]``, row ``b`` with the stacked adapter
    ``idx[b]`` scaled by ``valid[b]``: per-row gather of ``A``/``B`` and two ``bmm`` (the partial ``u`` of a rowwise
    tensor-parallel layer summed across its ranks in between)."""
    A = stack.A[idx]  # [B, r, d_in]
    Bm = stack.B[idx]  # [B, d_out, r]
    u = torch.bmm(x.to(A.dtype), A.transpose(1, 2))  # [B, L, r]
    if stack.reduce_group is not None:
        import torch.distributed as dist

        u = u.float()
        dist.all_reduce(u, group=stack.reduce_group)
    y = torch.bmm(u.to(Bm.dtype), Bm.transpose(1, 2))  # [B, L, d_out]
    y = y * (stack.scale[idx] * valid).to(y.dtype)[:, None, None]
    if stack.bias is not None:
        y = y + bias_rows(idx, valid, stack).to(y.dtype)
    return y


def bias_rows(idx: torch.Tensor, valid: torch.Tensor, stack) -> torch.Tensor:
    """``[B, 1, d_out]``: each row's scaled LoRA bias (zero for rows without this layer's adapter)."""
    return (stack.bias[idx].float() * (stack.scale[idx] * valid)[:, None])[:, None, :]


@dataclass(frozen=True)
class LoRADecodePlan:
    """What a LoRA layer's compiled decode step reads: the stacked factors (``None``: no row of the call uses an
    adapter of this layer), each row's slot and validity, and for the Triton kernels the tiles of one token per row
    (``forkkv_kernels.lora.padded_plan``; ``None``: the PyTorch path)."""

    stack: object = None
    idx: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    tiles: tuple | None = None
    block_m: int = 0


def remember_decode_plan(layer, stack, slots: tuple, batchable: bool, use_triton: bool) -> None:
    """Store on ``layer`` the plan its compiled decode steps of this call read (run eagerly, when the call's first
    forward, the prefill, plans the layer). The stacked factors are marked as static addresses for CUDA graphs."""
    if not batchable:
        layer._forkkv_decode = None
        return
    if stack.keys is None:
        layer._forkkv_decode = LoRADecodePlan()
        return
    dev = str(stack.A.device)
    idx, valid = row_slots(tuple(slots), dev)
    plan = None
    if use_triton:
        from forkkv_kernels.lora import padded_plan

        plan = padded_plan(tuple(slots), 1, dev)
    if not getattr(stack, "_static", False):
        for t in (stack.A, stack.B, stack.scale, stack.bias):
            if t is not None:
                torch._dynamo.mark_static_address(t)
        stack._static = True
    layer._forkkv_decode = LoRADecodePlan(stack, idx, valid, None if plan is None else plan[1],
                                          0 if plan is None else plan[0])


def decode_lora_forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The batched mixed-adapter forward of a LoRA ``Linear`` inside a compiled decode step, from the plan this
    call's prefill stored (:func:`remember_decode_plan`)."""
    from peft.tuners.lora.layer import VARIANT_KWARG_KEYS

    plan = getattr(layer, "_forkkv_decode", None)
    if plan is None:
        raise RuntimeError(
            "a compiled forward reached a LoRA layer that its call's eager prefill did not plan (or cannot batch); "
            "generate with a ForkKVCache through the model's generate (forkkv_hf.enable_forkkv installs it)"
        )
    for k in VARIANT_KWARG_KEYS:
        kwargs.pop(k, None)
    result = layer.base_layer(x, *args, **kwargs)
    stack = plan.stack
    if stack is None:
        return result
    if plan.tiles is None:
        return result + lora_delta_rows(x, plan.idx, plan.valid, stack).to(result.dtype)
    delta = torch.ops.forkkv.lora_delta(x.to(stack.A.dtype), stack.A, stack.B, stack.scale, *plan.tiles, plan.block_m)
    result = result + delta.to(result.dtype)
    if stack.bias is not None:
        result = result + bias_rows(plan.idx, plan.valid, stack).to(result.dtype)
    return result
