"""The Triton kernels as PyTorch custom ops (``torch.ops.forkkv.*``), so that a compiled graph calls them without a
graph break and a CUDA graph captures their launches.

Each op takes only tensors and a few plain numbers: the host-side planning (which rows read which residual, how rows
are packed into work items and tiles) is done before the step, from the rows of the batch, and arrives as device
tensors. The fake implementations give the output's shape and dtype to the compiler. The ops allocate their scratch
buffers per call (inside a CUDA-graph capture they come from the graph's memory pool).

``forkkv_kernels`` (and Triton) is imported only when an op runs, never at import.
"""

from typing import Optional

import torch


@torch.library.custom_op("forkkv::residual_attention", mutates_args=())
def residual_attention_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    u_k: Optional[torch.Tensor],
    b_k: Optional[torch.Tensor],
    u_v: Optional[torch.Tensor],
    b_v: Optional[torch.Tensor],
    private_k: torch.Tensor,
    private_v: torch.Tensor,
    mask: Optional[torch.Tensor],
    slot_row: torch.Tensor,
    slot_q: torch.Tensor,
    slot_agent: torch.Tensor,
    agent_k: torch.Tensor,
    agent_v: torch.Tensor,
    row_vslot: torch.Tensor,
    block_m: int,
    a_max: int,
    rope_half: bool,
    scaling: float,
) -> torch.Tensor:
    """ResidualAttention (``forkkv_kernels``) over pre-planned work items. ``query [B, H, NQ, D]``; shared base
    ``key``/``value`` ``[H_kv, T, D]``, ``cos``/``sin`` ``[T, D]``; residuals ``u [n, T, r]``, ``b [n, H_kv·D, r]``
    (``None``: none of that kind); ``private_k``/``private_v`` ``[B, H_kv, P, D]``; ``mask`` int8 ``[B, NQ, T + P]``
    (1 = attend); the work plan's tensors (``forkkv_kernels.residual_attention.WorkPlan``). Returns
    ``[B, NQ, H, D]``."""
    from forkkv_kernels.residual_attention import WorkPlan, launch_residual_attention

    plan = WorkPlan(block_m, a_max, slot_row, slot_q, slot_agent, agent_k, agent_v, row_vslot)
    return launch_residual_attention(query, key, value, cos, sin, u_k, b_k, u_v, b_v, private_k, private_v, mask,
                                     plan, scaling, rope_half=rope_half)


@residual_attention_op.register_fake
def _residual_attention_fake(query, key, value, cos, sin, u_k, b_k, u_v, b_v, private_k, private_v, mask, slot_row,
                             slot_q, slot_agent, agent_k, agent_v, row_vslot, block_m, a_max, rope_half, scaling):
    B, H, NQ, D = query.shape
    return query.new_empty(B, NQ, H, D)


@torch.library.custom_op("forkkv::lora_delta", mutates_args=())
def lora_delta_op(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: torch.Tensor,
    tile_adapter: torch.Tensor,
    tile_start: torch.Tensor,
    tile_count: torch.Tensor,
    perm: torch.Tensor,
    block_m: int,
) -> torch.Tensor:
    """Mixed-adapter LoRA delta ``[B, L, d_out]`` (in ``B``'s dtype) of ``x [B, L, d_in]`` (in ``A``'s dtype) with the
    stacked factors ``A [n, r, d_in]``, ``B [n, d_out, r]``, ``scale [n]`` over pre-planned tiles of token-rows
    (``forkkv_kernels.lora.padded_plan``); rows no tile covers get zero."""
    from forkkv_kernels.lora import lora_delta_planned
    from forkkv_kernels.residual_attention import _on_device

    out = torch.zeros(x.shape[0], x.shape[1], B.shape[1], dtype=B.dtype, device=x.device)
    with _on_device(x.device):
        return lora_delta_planned(x, A, B, scale, out, block_m, tile_adapter, tile_start, tile_count, perm)


@lora_delta_op.register_fake
def _lora_delta_fake(x, A, B, scale, tile_adapter, tile_start, tile_count, perm, block_m):
    return x.new_empty(x.shape[0], x.shape[1], B.shape[1], dtype=B.dtype)
