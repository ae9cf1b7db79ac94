"""The Triton kernels as PyTorch custom ops (``torch.ops.forkkv.*``), so that a compiled graph calls them without a
graph break and a CUDA graph captures their launches.

Each op takes only tensors and a few plain numbers: the host-side planning (which rows read which residual, how rows
are packed into work items and tiles) is done before the step, from the rows of the batch, and arrives as device
tensors. The fake implementations give the output's shape and dtype to the compiler. The attention ops take their
scratch buffers fresh per call (``fresh_scratch``: inside a CUDA-graph capture they come from the graph's memory pool;
the eager path's shared workspaces must not be handed out to a graph).

``forkkv_kernels`` (and Triton) is imported only when an op runs, never at import.
"""

from typing import Optional

import torch

# shapes: query [B, H, NQ, D]; key/value [H_kv, T, D] (the shared base); cos/sin [T, D]; private_k/private_v
# [B, H_kv, P, D]; mask int8 [B, NQ, T + P] (1 = attend); k_u/v_u [n, T, r], k_b/v_b [n, H_kv·D, r] (None: no residual
# of that kind); output [B, NQ, H, D] in the query's dtype.


@torch.library.custom_op("forkkv::cascade_attention", mutates_args=())
def cascade_attention_op(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    private_k: torch.Tensor, private_v: torch.Tensor, mask: torch.Tensor,
    k_u: Optional[torch.Tensor], k_b: Optional[torch.Tensor], v_u: Optional[torch.Tensor], v_b: Optional[torch.Tensor],
    k_slot: Optional[torch.Tensor], k_order: Optional[torch.Tensor], v_slot: Optional[torch.Tensor],
    k_agents: int, k_max_rows: int, rope_half: bool, scaling: float, lowp_rope: Optional[bool] = None,
    res_f16: Optional[bool] = None, k_b16: Optional[torch.Tensor] = None, context_visible: bool = False,
    cos16: Optional[torch.Tensor] = None, sin16: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``forkkv_kernels.cascade_attention``; ``k_slot``/``v_slot [B]`` int32 (each row's slot, -1: none), ``k_order``
    the rows sorted by K slot, ``k_agents`` distinct K slots, ``k_max_rows`` the most rows one K slot has,
    ``lowp_rope`` the configuration's, ``res_f16`` False for a K residual beyond fp16's range (``None``: the kernel's
    defaults), ``k_b16`` its B in fp16 for that form (``None``: converted per call), ``context_visible``: the mask
    shows every row the whole shared context, so only the private part reads it, ``cos16``/``sin16`` the RoPE tables
    in fp16 for that form (``None``: converted per tile)."""
    from forkkv_kernels.attention_common import fresh_scratch
    from forkkv_kernels.cascade import cascade_attention

    return cascade_attention(query, key, value, cos, sin, private_k, private_v, scaling, k_u=k_u, k_B=k_b,
                             k_slot=k_slot, v_u=v_u, v_B=v_b, v_slot=v_slot, mask=mask, rope_half=rope_half,
                             k_order=k_order, k_agents=k_agents, k_max_rows=k_max_rows, lowp_rope=lowp_rope,
                             res_f16=res_f16, k_B16=k_b16, context_visible=context_visible,
                             rope16=None if cos16 is None else (cos16, sin16), scratch=fresh_scratch)


def _attention_fake(query, *args):
    B, H, NQ, D = query.shape
    return query.new_empty(B, NQ, H, D)


cascade_attention_op.register_fake(_attention_fake)


@torch.library.custom_op("forkkv::lora_add_", mutates_args=("out",))
def lora_add_op(
    out: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: torch.Tensor,
    tile_adapter: torch.Tensor,
    tile_start: torch.Tensor,
    tile_count: torch.Tensor,
    perm: torch.Tensor,
    block_m: int,
) -> None:
    """``out [B, L, d_out]`` (contiguous, in ``B``'s dtype) += the mixed-adapter LoRA delta of ``x [B, L, d_in]`` (in
    ``A``'s dtype) with the stacked factors ``A [n, r, d_in]``, ``B [n, d_out, r]``, ``scale [n]`` over pre-planned
    tiles of token-rows (``forkkv_kernels.lora.padded_plan``); rows no tile covers are left as they are. In place, so
    that the projection's output takes the delta with no zero-filled buffer and no separate add (inductor runs the
    op on the output's own buffer when nothing else reads it)."""
    from forkkv_kernels.attention_common import on_device
    from forkkv_kernels.lora import lora_delta_planned

    with on_device(x.device):
        lora_delta_planned(x, A, B, scale, out, block_m, tile_adapter, tile_start, tile_count, perm)


@lora_add_op.register_fake
def _lora_add_fake(out, x, A, B, scale, tile_adapter, tile_start, tile_count, perm, block_m):
    return None


@torch.library.custom_op("forkkv::lora_add", mutates_args=())
def lora_add_functional_op(
    base: torch.Tensor,
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
    """``forkkv::lora_add_`` into a copy of ``base``, returned: for graphs whose functionalisation does not take a
    custom op that writes its input (a nested compile region's, torch 2.13)."""
    out = base.clone()
    lora_add_op(out, x, A, B, scale, tile_adapter, tile_start, tile_count, perm, block_m)
    return out


@lora_add_functional_op.register_fake
def _lora_add_functional_fake(base, *args):
    return torch.empty_like(base)
