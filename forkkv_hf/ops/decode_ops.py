"""The compile-friendly op layer of the decode step: ForkKV attention over a static cache layer and the batched
mixed-adapter LoRA, in forms a compiled graph traces without a break.

Nothing here reads tensor values on the host or plans work while tracing: what depends on which row runs which
adapter was built before the step, from the rows, as device tensors (the cache layer's ``agents``/``work``, the
LoRA layer's :class:`LoRADecodePlan`, made when a call's prefill plans that layer). The Triton kernels are reached
through the custom ops of :mod:`forkkv_hf.ops.custom_ops`; the PyTorch paths are plain tensor code.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..config import get_config
from ..memo import memoized
from . import custom_ops  # noqa: F401  (registers torch.ops.forkkv.*)
from .dispatch import (f16_k_pass_args, residual_attention, residual_attention_torch, rope16_tables,
                       rope_repeats_half, slot_tensors)
from .masks import kv_mask, visible_mask


# ---------------------------------------------------------------------------------------------------------------------
# attention over a StaticForkKVView
def static_attention(query: torch.Tensor, view, attention_mask, scaling: float, softcap: float | None = None):
    """``query [B, H, Q, D]`` over a :class:`~forkkv_hf.static_cache.StaticForkKVView`; returns ``[B, Q, H, D]``.

    Eager (the prefill) it takes the usual dispatch (:func:`~forkkv_hf.ops.dispatch.residual_attention`).
    Compiled, a decode query goes to the cascade Triton kernels the eager dispatch runs, through their
    custom op, when the layer planned it (``view.work``), else (CPU, soft-capping) to the PyTorch path, which reads
    the layer's precomputed agents."""
    Q = query.shape[2]
    if attention_mask is None:
        attention_mask = visible_mask(view, Q)
    if not torch.compiler.is_compiling():
        return residual_attention(query, view, attention_mask, scaling, softcap=softcap)
    if view.work is not None and softcap is None and Q == 1:
        return _triton_attention(query, view, attention_mask, scaling)
    return residual_attention_torch(query, view, attention_mask, scaling, softcap=softcap)


@dataclass(frozen=True)
class AttentionDecodePlan:
    """What a static layer's compiled decode step hands the cascade kernels, made from the rows before the step:
    which residuals some row has, whether cos/sin repeat their halves, the configuration's ``lowp_rope`` (read when
    the plan is made) and the rows as device tensors: each row's ``k_slot``/``v_slot`` [B] int32, the rows sorted by
    K slot, the number of distinct K slots and the most rows one has."""

    has_k: bool
    has_v: bool
    rope_half: bool
    k_slot: torch.Tensor | None = None
    k_order: torch.Tensor | None = None
    k_agents: int = 0
    k_max_rows: int = 0
    v_slot: torch.Tensor | None = None
    lowp_rope: bool | None = None
    #: the configuration's ``f16_k_pass`` (None: the kernels' rule), False where the K residual is beyond fp16's range
    #: (the K pass keeps its fp32 rebuild)
    res_f16: bool | None = None
    #: the K residual's B in fp16 for that form, kept with the residual (None: beyond range, or an fp32 layer)
    k_b16: torch.Tensor | None = None
    #: the RoPE tables in fp16 for that form (``rope16``), kept with the tables (None where ``k_b16`` is)
    rope16: tuple | None = None


def plan_decode_attention(shared, k_slots: tuple | None, v_slots: tuple | None) -> AttentionDecodePlan:
    """The :class:`AttentionDecodePlan` of rows with these residual slots (host tuples; ``None``: the layer has no
    residual of that kind) over ``shared`` (a :class:`~forkkv_hf.shared_context.SharedLayer`), one query per row.
    Runs eagerly (it may read cos/sin once)."""
    dev = str(shared.key.device)
    has_k = shared.k_res is not None and k_slots is not None and any(s >= 0 for s in k_slots)
    has_v = shared.v_res is not None and v_slots is not None and any(s >= 0 for s in v_slots)
    plan = AttentionDecodePlan(has_k, has_v, has_k and rope_repeats_half(shared), lowp_rope=get_config().lowp_rope)
    if has_k:
        k_slot, order, agents, most = slot_tensors(tuple(k_slots), dev)
        res_f16, k_b16 = f16_k_pass_args(shared.k_res, shared.key.dtype)
        plan = replace(plan, k_slot=k_slot, k_order=order, k_agents=agents, k_max_rows=most, res_f16=res_f16,
                       k_b16=k_b16, rope16=None if k_b16 is None else rope16_tables(shared.cos, shared.sin))
    if has_v:
        plan = replace(plan, v_slot=slot_tensors(tuple(v_slots), dev)[0])
    return plan


def _triton_attention(query, view, attention_mask, scaling):
    """The planned Triton launch of a compiled decode step (``torch.ops.forkkv``); the same kernels, arguments and
    mask as the eager dispatch's, the mask read by the private part only (``context_visible``): transformers compiles
    decode steps of ``generate`` only, whose prefill refused any mask that hides shared-context tokens
    (:func:`~forkkv_hf.guards.check_context_mask`) and whose steps append visible columns; a ``None`` mask here is
    :func:`~.masks.visible_mask`, the whole context visible. Reading it over a 32K context cost the shared kernel 25%
    more instructions per tile (eval/KERNEL_NOTES.md "v41 measured")."""
    B, _, Q, _ = query.shape
    sh, plan = view.shared, view.work
    mask, additive = kv_mask(attention_mask, B, Q, view.shared_len, view.private_len, query.device)
    if additive:  # 0 / -inf biases ("forkkv" registers the bool sdpa mask); no host check of the values here
        mask = mask > torch.finfo(mask.dtype).min / 2
    mask = mask.to(torch.int8)  # (a dtype view of a bool tensor does not lower in inductor, torch 2.11)
    k = (sh.k_res.u, sh.k_res.B) if plan.has_k else (None, None)
    v = (sh.v_res.u, sh.v_res.B) if plan.has_v else (None, None)
    return torch.ops.forkkv.cascade_attention(query, sh.key[0], sh.value[0], sh.cos, sh.sin, view.key, view.value,
                                              mask, *k, *v, plan.k_slot, plan.k_order, plan.v_slot, plan.k_agents,
                                              plan.k_max_rows, plan.rope_half, float(scaling), plan.lowp_rope,
                                              plan.res_f16, plan.k_b16, True, *(plan.rope16 or (None, None)))


# ---------------------------------------------------------------------------------------------------------------------
# batched mixed-adapter LoRA
@memoized(maxsize=256)
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


def add_lora_delta(result: torch.Tensor, dtype: torch.dtype, add_) -> torch.Tensor:
    """``result`` plus a LoRA delta that ``add_(out)`` adds into a ``[B, L, d_out]`` tensor in the stack's ``dtype``
    (in place, or into a copy it returns): into ``result`` itself where it is contiguous and of that dtype (no
    zero-filled buffer, no separate add), else into zeros, rounded to ``result``'s dtype and added (as PEFT's
    mixed-batch forward rounds its delta)."""
    if result.dtype == dtype and result.is_contiguous():
        new = add_(result)
        return result if new is None else new
    delta = result.new_zeros(result.shape, dtype=dtype)
    new = add_(delta)
    return result + (delta if new is None else new).to(result.dtype)


def bias_rows(idx: torch.Tensor, valid: torch.Tensor, stack) -> torch.Tensor:
    """``[B, 1, d_out]``: each row's scaled LoRA bias (zero for rows without this layer's adapter)."""
    return (stack.bias[idx].float() * (stack.scale[idx] * valid)[:, None])[:, None, :]


class _NoRows:
    """The stack of a layer that no row of the call uses: tensors where a stack has them, so that dynamo can evaluate
    its guards on ``stack.A`` (a plan holding ``None`` there crashed torch's recompilation check with an
    AttributeError once the layer's rows changed between calls; an audit's finding)."""

    A = B = scale = torch.zeros(0)
    bias = None


NO_ROWS = _NoRows()


@dataclass(frozen=True)
class LoRADecodePlan:
    """What a LoRA layer's compiled decode step reads: the stacked factors (:data:`NO_ROWS`: no row of the call uses
    an adapter of this layer), each row's slot and validity, and for the Triton kernels the tiles of one token per row
    (``forkkv_kernels.lora.padded_plan``; ``None``: the PyTorch path); ``functional``: the kernels' delta goes into
    a copy (``forkkv::lora_add``) instead of in place, for nested compile regions (:mod:`forkkv_hf.compile_regions`)."""

    stack: object = NO_ROWS
    idx: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    tiles: tuple | None = None
    block_m: int = 0
    functional: bool = False


def remember_decode_plan(layer, stack, slots: tuple, batchable: bool, use_triton: bool) -> None:
    """Store on ``layer`` the plan its compiled decode steps of this call read (run eagerly, when the call's first
    forward, the prefill, plans the layer). The stacked factors are marked as static addresses for CUDA graphs."""
    if not batchable:
        layer._forkkv_decode = None
        return
    if stack.built is None:  # no row of the call has an adapter of this layer
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
                                          0 if plan is None else plan[0], get_config().compile_regions == "on")


def decode_lora_forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The batched mixed-adapter forward of a LoRA ``Linear`` inside a compiled decode step, from the plan this
    call's prefill stored (:func:`remember_decode_plan`)."""
    from peft.tuners.lora.layer import VARIANT_KWARG_KEYS

    plan = getattr(layer, "_forkkv_decode", None)
    if plan is None:
        raise RuntimeError(
            "a compiled forward reached a LoRA layer that its call's eager prefill did not plan (or cannot batch); "
            "generate with a ForkKVCache through the model's generate (forkkv_hf.enable_forkkv installs it), and if "
            "you did, pass disable_compile=True and report it: the compile policy let through a layer it cannot batch"
        )
    for k in VARIANT_KWARG_KEYS:
        kwargs.pop(k, None)
    result = layer.base_layer(x, *args, **kwargs)
    stack = plan.stack
    if stack is NO_ROWS:
        return result
    if plan.tiles is None:
        return result + lora_delta_rows(x, plan.idx, plan.valid, stack).to(result.dtype)
    args = (x.to(stack.A.dtype), stack.A, stack.B, stack.scale, *plan.tiles, plan.block_m)
    op = torch.ops.forkkv.lora_add if plan.functional else torch.ops.forkkv.lora_add_
    result = add_lora_delta(result, stack.B.dtype, lambda out: op(out, *args))
    if stack.bias is not None:
        result = result + bias_rows(plan.idx, plan.valid, stack).to(result.dtype)
    return result
