"""The base-model pass over training contexts: what every agent's ForkKV-aware training step reads.

At inference an agent's context K/V are the base model's K/V plus its own LoRA delta applied to the base model's
k/v-projection inputs (:mod:`forkkv_hf.context`). To train under those semantics, a step needs, per layer,
the base K/V and those inputs ``x`` (not only ``u = x·Aᵀ``: the gradient of ``A`` is ``(∂L/∂u)ᵀ x``).
:class:`TrainingContext` runs the base model once over one context, or over several at once (right-padded to the
longest: a batch whose rows read different contexts costs one forward, not one per context), with adapters
disabled, no grad, eval mode, and keeps them; any number of agents' steps then read it. Base weights must stay
frozen while it is used.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ..compat import cache_kwargs
from ..context.segments import storage_bytes
from ..rope_checks import length_dependent_rope
from ..inputs import context_token_ids, vocab_size_of
from ..peft.lora_factors import (decoder_of, find_attention_modules, is_peft_model, kv_projections, refuse_merged,
                                 transformers_model)


@dataclass
class ContextLayer:
    """One layer of a :class:`TrainingContext` (``n`` contexts, right-padded to ``T`` tokens, the longest).

    ``key``/``value``: ``[n, H_kv, T, D]``, the base model's cached K (after RoPE) and V. ``x_k``/``x_v``: ``[n, T,
    d_in]``, the inputs of ``k_proj``/``v_proj`` in the base pass (one tensor when both read the same input).
    ``cos``/``sin``: ``[T, D]``, the rotary tables of positions ``0..T-1`` (the same for every context). Entries
    past a context's length are padding (``TrainingContext.valid``).
    """

    key: torch.Tensor
    value: torch.Tensor
    x_k: torch.Tensor
    x_v: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor

    def tensors(self) -> tuple:
        return (self.key, self.value, self.x_k, self.x_v, self.cos, self.sin)

    def nbytes(self) -> int:
        return storage_bytes(self.tensors())


def check_trainable_model(model: nn.Module) -> None:
    """Refuse what ForkKV-aware training cannot train: a model that is not a PEFT model with LoRA, fused qkv
    projections, and base weights that require grad (the shared base pass is computed once, without grad)."""
    if not is_peft_model(model):
        raise TypeError(
            f"ForkKV-aware training trains LoRA adapters of a PeftModel, got {type(model).__name__}; wrap the model "
            "with peft.get_peft_model(model, LoraConfig(...)) first"
        )
    for idx, attn in find_attention_modules(model).items():
        if not (hasattr(attn, "k_proj") and hasattr(attn, "v_proj")):
            raise NotImplementedError(
                f"layer {idx} computes K and V in a fused {type(attn).__name__}.qkv_proj; ForkKV-aware training "
                "supports models with separate k_proj/v_proj (Llama, Mistral, Qwen2, ...). Fine-tune this model "
                "with plain PEFT."
            )
    frozen = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    if frozen:
        shown = ", ".join(frozen[:3]) + (f" and {len(frozen) - 3} more" if len(frozen) > 3 else "")
        raise ValueError(
            f"parameters outside the LoRA adapters require grad ({shown}); ForkKV-aware training computes the base "
            "model's pass over a context once, without grad, so base weights (modules_to_save, trainable "
            "embeddings or norms) cannot be trained with it. Freeze them (requires_grad_(False)) or train them "
            "with plain PEFT."
        )


class TrainingContext:
    """The base model's pass over one shared context, or over several, kept for ForkKV-aware training.

    ``TrainingContext(model, context_ids)``: ``context_ids`` is one context (``[T]`` or ``[1, T]`` ids, or a list of
    ints) or a list of contexts (each ``[T_i]`` ids or a list of ints). The base model (adapters disabled,
    ``torch.no_grad``, modules in eval mode for the pass and restored after) runs once over all of them, right-padded
    to the longest, and per layer the base K/V, the k/v-projection inputs and the rotary tables are kept
    (:class:`ContextLayer`; :meth:`nbytes` tells the memory: about ``(2·H_kv·D + d_in)·4`` bytes per token and layer
    in fp32, ``d_in`` once when k_proj and v_proj read the same input). With several contexts, a training batch
    says which one each row follows in ``batch["context_index"]`` (:func:`forkkv_hf.training.forkkv_loss`). The
    padding never reaches a row: it comes after every context token (causal attention) and is masked for the rows.
    One context serves every agent's training steps. The base weights must not change while it is used.
    """

    def __init__(self, model: nn.Module, context_ids):
        check_trainable_model(model)
        refuse_merged(model, "ForkKV-aware training's pass over the context")
        base = transformers_model(model)
        vocab = vocab_size_of(model)
        several = _is_context_list(context_ids)
        items = list(context_ids) if several else [context_ids]
        if several and not items:
            raise ValueError("context_ids is an empty list; give one context (token ids) or a list of contexts")
        self.contexts = [context_token_ids(c, vocab) for c in items]
        if len(self.contexts) > 1 and length_dependent_rope(base.config):
            raise ValueError(
                "this model's RoPE depends on the sequence length (dynamic NTK / longrope), so contexts padded to the "
                "longest would be rotated with other frequencies than each alone; build one TrainingContext per "
                "context"
            )
        self.lengths = [c.numel() for c in self.contexts]
        self._model = weakref.ref(base)
        device = next(base.parameters()).device
        width = max(self.lengths)
        ids = torch.zeros(len(self.contexts), width, dtype=torch.long)
        for i, c in enumerate(self.contexts):
            ids[i, : c.numel()] = c  # the padding id is never attended (see the class docstring)
        self.padded_ids = ids.to(device)
        #: ``[n, T]`` bool: True on each context's own tokens, False on its padding
        self.valid = (torch.arange(width)[None] < torch.tensor(self.lengths)[:, None]).to(device)
        self.layers = _base_pass(model, base, self.padded_ids)

    @property
    def num_contexts(self) -> int:
        return len(self.contexts)

    @property
    def num_tokens(self) -> int:
        """Tokens of the context, or of the longest when there are several (the width of the kept K/V)."""
        return max(self.lengths)

    @property
    def token_ids(self) -> torch.Tensor:
        """``[T]``: the token ids of the (one) context."""
        if len(self.contexts) != 1:
            raise ValueError(f"this TrainingContext holds {len(self.contexts)} contexts; read .contexts[i]")
        return self.contexts[0]

    def nbytes(self) -> int:
        """Bytes held (base K/V, projection inputs, rotary tables), each storage once (the layers share the rotary
        tables, and k_proj and v_proj their input where they read the same)."""
        return storage_bytes(t for layer in self.layers for t in layer.tensors())

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model other than the one this context was computed with."""
        if self._model() is not transformers_model(model):
            raise ValueError(
                "this TrainingContext was computed with another model instance; build it with the model you train"
            )

    def __repr__(self) -> str:
        what = f"tokens={self.num_tokens}" if len(self.contexts) == 1 else \
            f"contexts={len(self.contexts)}, tokens={sum(self.lengths)}"
        return f"TrainingContext({what}, layers={len(self.layers)}, {self.nbytes() / 2**20:.1f} MiB)"


def _is_context_list(context_ids) -> bool:
    """Whether ``context_ids`` is a list of contexts (its items are sequences) rather than one list of ids."""
    if not isinstance(context_ids, (list, tuple)):
        return False
    return all(isinstance(c, (list, tuple)) or getattr(c, "ndim", 0) > 0 for c in context_ids)


@torch.no_grad()
def _base_pass(model: nn.Module, base: nn.Module, ids: torch.Tensor) -> list[ContextLayer]:
    """One forward of the base model over ``ids [n, T]`` with hooks that record each layer's k/v-projection inputs
    and rotary tables; the K/V come from its ``DynamicCache``."""
    from transformers import DynamicCache

    attns = find_attention_modules(model)
    inputs: dict[int, dict[str, torch.Tensor]] = {i: {} for i in attns}
    rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def proj_hook(idx: int, kind: str):
        def hook(module, args):
            inputs[idx][kind] = args[0]

        return hook

    def attn_hook(idx: int):
        def hook(module, args, kwargs):
            pe = kwargs.get("position_embeddings")
            if pe is None and len(args) > 1:
                pe = args[1]
            if pe is None:
                raise ValueError(f"layer {idx}: the attention module got no position_embeddings; ForkKV-aware "
                                 "training needs a RoPE model that passes (cos, sin) to its attention")
            rope[idx] = (pe[0][0], pe[1][0])

        return hook

    handles = []
    for idx, attn in attns.items():
        handles.append(attn.k_proj.register_forward_pre_hook(proj_hook(idx, "k")))
        handles.append(kv_projections(attn, base.config).v[0].register_forward_pre_hook(proj_hook(idx, "v")))
        handles.append(attn.register_forward_pre_hook(attn_hook(idx), with_kwargs=True))
    modes = {m: m.training for m in model.modules()}
    # disable_adapter() marks every inactive adapter frozen on its way out: a loss computed before this base pass
    # would get no gradients at backward(); the flags are put back as they were
    flags = [(p, p.requires_grad) for n, p in model.named_parameters() if "lora_" in n]
    cache = DynamicCache()
    decoder = decoder_of(base) or base
    try:
        model.eval()
        with model.disable_adapter():
            decoder(input_ids=ids, position_ids=torch.arange(ids.shape[1], device=ids.device)[None],
                    use_cache=True, **cache_kwargs(cache))
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)
    layers = []
    for idx in range(len(attns)):
        x_k, x_v = inputs[idx]["k"], inputs[idx]["v"]
        if x_v.data_ptr() == x_k.data_ptr() and x_v.shape == x_k.shape:
            x_v = x_k
        cos, sin = rope[idx]
        layers.append(ContextLayer(cache.layers[idx].keys, cache.layers[idx].values, x_k, x_v, cos, sin))
    return layers
