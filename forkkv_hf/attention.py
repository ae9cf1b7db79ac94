"""The ``"forkkv"`` attention implementation for transformers (selected on a model by
:func:`forkkv_hf.enable.enable_forkkv`).

``forkkv_attention_forward`` is registered with ``AttentionInterface`` under ``"forkkv"`` (and the sdpa mask function
with ``AttentionMaskInterface`` under the same name, so the model builds causal/padding masks for it). When the
cache hands it a :class:`~forkkv_hf.cache.ForkKVView` it runs ResidualAttention; given plain tensors (a pass with
no cache, or with a ``DynamicCache``) it falls back to SDPA, so a model with ``"forkkv"`` selected behaves exactly
as with ``"sdpa"`` outside ForkKV.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from .cache import ForkKVView
from .ops.decode_ops import static_attention
from .peft.adapter_probe import rows_mismatch, rows_run_by
from .ops.dispatch import residual_attention

ATTN_NAME = "forkkv"


def check_rows(module: nn.Module, view: ForkKVView) -> None:
    """Raise if the adapters this forward runs per row are not the agents the cache rows were forked for, or if no
    ForkKV check prepared this forward (the "forkkv" attention selected without ``enable_forkkv``: before, found by
    an audit, every input check was skipped and rows that do not start with the shared context were served)."""
    if not view.prepared:
        raise ValueError("this forward reads a ForkKVCache, but forkkv-hf did not check its inputs (the \"forkkv\" "
                         "attention was selected without enable_forkkv); call forkkv_hf.enable_forkkv(model) before "
                         "generating with it")
    for proj_name in ("k_proj", "v_proj", "qkv_proj"):
        proj = getattr(module, proj_name, None)
        if proj is None:
            continue
        seen = rows_run_by(proj, view.batch_size)
        if seen is None:
            continue
        if seen != view.row_adapters:
            raise rows_mismatch(seen, view.row_adapters)
        return  # PEFT passes every LoRA layer of a forward the same names (one projection per layer and step)


def _softcap_attention(query, key, value, attention_mask, scaling, softcap, dropout=0.0, training=False):
    """Soft-capped attention over plain tensors ``[B, H(kv), S, D]`` with the sdpa-style mask this implementation
    registers (bool, or ``None`` = causal, bottom-right aligned); returns ``[B, Q, H, D]``. Attention dropout
    ``dropout`` on the probabilities where ``training``, as the eager attention (before, ignored: a training forward
    got none; found by an audit)."""
    B, H, Q, D = query.shape
    G = H // key.shape[1]
    k = key.repeat_interleave(G, dim=1)
    v = value.repeat_interleave(G, dim=1)
    s = torch.matmul(query, k.transpose(-1, -2)) * (scaling if scaling is not None else D**-0.5)
    s = torch.tanh(s / softcap) * softcap
    S = k.shape[-2]
    low = torch.finfo(s.dtype).min  # as the eager attention masks: a pad row that sees no key stays finite (with -inf
    if attention_mask is None:      # it was NaN, carried into the row's later tokens through the next layers' K/V)
        allowed = torch.arange(S, device=s.device)[None, :] <= (S - Q + torch.arange(Q, device=s.device))[:, None]
        s = s.masked_fill(~allowed, low)
    elif attention_mask.dtype == torch.bool:
        s = s.masked_fill(~attention_mask[..., :S], low)
    else:
        s = s + attention_mask[..., :S]
    p = torch.softmax(s.float(), dim=-1).to(v.dtype)
    p = nn.functional.dropout(p, p=dropout, training=training)
    return torch.matmul(p, v).transpose(1, 2).contiguous()


# ---------------------------------------------------------------------------------------------------------------------
def forkkv_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key,
    value,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
):
    """transformers attention interface: ``query [B, H, Q, D]`` -> ``([B, Q, H, D], None)``."""
    if kwargs.get("s_aux") is not None:  # neither SDPA nor ResidualAttention adds sink logits to the softmax
        raise ValueError(f"{type(module).__name__} passes attention sinks (s_aux), which the \"forkkv\" attention "
                         "does not compute; this model is not supported (forkkv_hf.disable_forkkv(model) restores "
                         "its attention)")
    if not isinstance(key, ForkKVView):
        if kwargs.get("softcap") is not None:  # sdpa has no soft-capping (Gemma 2)
            return _softcap_attention(query, key, value, attention_mask, scaling, kwargs["softcap"], dropout,
                                      module.training), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if dropout:
        raise ValueError("ForkKV attention is for inference; call model.eval() (attention dropout is active)")
    view, static = key, getattr(key, "static", False)  # static: a StaticForkKVView (forkkv_hf.static_cache)
    if not torch.compiler.is_compiling():
        _check_view(module, view, kwargs)
    elif not static:  # a model its user compiled: nothing checked this call's rows eagerly
        torch.compiler.disable(_check_view)(module, view, kwargs)  # (a compiled generate's step: its eager prefill did)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if static:
        return static_attention(query, view, attention_mask, scaling, softcap=kwargs.get("softcap")), None
    return residual_attention(query, view, attention_mask, scaling, softcap=kwargs.get("softcap")), None


def _check_view(module: nn.Module, view: ForkKVView, kwargs) -> None:
    """Refuse a view of another model instance, one that outgrew a sliding window, or rows run by other adapters."""
    source = view.shared.source() if view.shared.source is not None else None
    if view.shared.source is not None and source is not module:
        raise ValueError(
            f"this ForkKVCache's shared context was built for another model instance (layer {module.layer_idx} "
            "differs); build a SharedContext with the model you generate with"
        )
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    # a static view's buffers hold its capacity: count the tokens written (before, the capacity was counted, and a
    # call that fits the window was refused; found by an audit)
    private = (int(view.length) if getattr(view, "static", False) else view.private_len) if window else 0
    if window and view.shared_len + private > window:
        raise ValueError(
            f"layer {module.layer_idx}: the sequence ({view.shared_len} shared + {private} private tokens) "
            f"outgrew the sliding window of {window}; ForkKV computes full attention, which equals sliding-window "
            "attention only within the window. Generate fewer tokens or use a shorter context."
        )
    check_rows(module, view)


def register_forkkv() -> None:
    """Register ``"forkkv"`` with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(ATTN_NAME, forkkv_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
