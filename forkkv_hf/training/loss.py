"""ForkKV-aware forward and loss: an agent's suffix (prompt + answer) over the context K/V it reads at inference.

For agent ``a`` and a :class:`~forkkv_hf.training.TrainingContext` (base K/V and k/v-projection inputs ``x`` of one
base pass), layer by layer the context K/V are (``residual="kv"``, what ``SharedContext.fork(names)`` serves)::

    K = K_base + RoPE(s_k · B_k A_k x_k)      V = V_base + s_v · B_v A_v x_v

computed with PEFT's own LoRA modules (dropout, LoRA bias and scaling included), so gradients reach ``A`` and ``B``
through the residual. The suffix then runs through the model with ``a`` active (PEFT, gradients to every LoRA
module) over ``[context | suffix]``. Other semantics, for comparison and for the standard baseline:
``"v"`` (K from the base alone: ``fork(..., residual="v")``), ``"none"`` (the base model's K/V: adapter-blind
sharing), ``"exact"`` (the agent's own pass over the context, with grad: ordinary fine-tuning with the context
in the input, one context pass per call shared by the batch rows) and ``FittedResidual(r)`` (that pass's K/V fitted
to rank ``r`` as ``SharedContext.fit_residuals`` serves them: :mod:`.fitted`). A batch may mix rows of several contexts (a
:class:`~forkkv_hf.training.TrainingContext` over several, ``batch["context_index"]``): one forward serves them all.
"""

from __future__ import annotations

import torch
from torch import nn

from ..compat import cache_kwargs, text_config
from ..context.base_pass import check_rope_layout, sliding_window
from ..log import get_logger, warn_once
from ..model_lock import calls_in_flight
from ..peft.lora_factors import (check_adapter_names, check_saved_copies, decoder_of, find_attention_modules,
                                 kv_projections, kv_transform, lora_layer_of, refuse_merged, transformers_model)
from ..ops.rope import apply_rope
from ..peft.wrappers import remove_stale_peft_hooks
from ..rope_checks import check_rope_tables
from .context import TrainingContext
from .fitted import FittedResidual, fitted_kv

RESIDUALS = ("kv", "v", "none", "exact")


_logger = get_logger(__name__)


def check_residual(residual, what: str = "residual", hint: str = "") -> None:
    """Refuse a ``residual`` that is neither one of :data:`RESIDUALS` nor a :class:`FittedResidual`."""
    if not isinstance(residual, FittedResidual) and residual not in RESIDUALS:
        raise ValueError(f"{what} must be one of {RESIDUALS} or a FittedResidual(rank) (training for "
                         f"SharedContext.fit_residuals), got {residual!r}{hint}")


def _lora_delta(proj: nn.Module, adapter: str, x: torch.Tensor, where: str) -> torch.Tensor | None:
    """What ``adapter``'s LoRA adds to ``proj``'s output for input ``x [T, d_in]`` (``None``: no LoRA there)."""
    check_saved_copies(proj, [adapter], where)
    layer = lora_layer_of(proj, where)
    if layer is None or adapter not in layer.lora_A:
        return None
    if layer.use_dora.get(adapter, False) or getattr(layer, "lora_variant", {}).get(adapter) is not None:
        raise ValueError(
            f"adapter {adapter!r} on {where} is a LoRA variant (DoRA, aLoRA, ...); ForkKV-aware training supports "
            "plain LoRA on k_proj/v_proj. Train this adapter with plain PEFT."
        )
    if getattr(layer, "merged", False):
        raise ValueError(f"{where} has merged LoRA adapters; call peft_model.unmerge_adapter() before training")
    x = x.to(layer.lora_A[adapter].weight.dtype)  # as PEFT's forward does (a bf16 model keeps fp32 adapters)
    return layer.lora_B[adapter](layer.lora_A[adapter](layer.lora_dropout[adapter](x))) * layer.scaling[adapter]


def check_kv_transform_free(attn: nn.Module, config, idx: int, adapter: str, kind: str) -> None:
    why = kv_transform(attn, config, kind)
    if why:
        raise ValueError(
            f"layer {idx}: {type(attn).__name__} {why}, so ForkKV cannot add a {kind.upper()} residual, but adapter "
            f"{adapter!r} has LoRA on {kind}_proj. Retarget it away from {kind}_proj, or train it for fitted "
            "residuals (residual=FittedResidual(rank); served by SharedContext.fit_residuals): inference refuses "
            f"{kind}_proj LoRA on this model in every fork, so residual='v' or 'none' would train an agent it "
            "cannot serve."
        )


def context_kv(model: nn.Module, context: TrainingContext, adapter_name: str, residual: str = "kv"):
    """Per layer ``(key, value)``, each ``[n, H_kv, T, D]`` (``n`` contexts right-padded to ``T`` tokens): the
    context K/V agent ``adapter_name`` reads under ``residual`` (module docstring), differentiable in its LoRA
    weights (except ``"none"``). ``adapter_name`` must be the active adapter for ``"exact"`` and a
    :class:`FittedResidual`."""
    if isinstance(residual, FittedResidual):
        return fitted_kv(context, context_kv(model, context, adapter_name, "exact"), residual)
    if residual == "exact":
        from transformers import DynamicCache

        cache = DynamicCache()
        base = transformers_model(model)
        decoder = decoder_of(base) or base
        ids = context.padded_ids  # right padding: no context token attends to it (causal)
        decoder(input_ids=ids, position_ids=torch.arange(ids.shape[1], device=ids.device)[None],
                use_cache=True, **cache_kwargs(cache))
        return [(layer.keys, layer.values) for layer in cache.layers]
    attns = find_attention_modules(model)
    config = transformers_model(model).config
    out = []
    for idx, layer in enumerate(context.layers):
        key, value = layer.key, layer.value
        attn = attns[idx]
        n, Hkv, T, D = key.shape
        if residual == "kv":
            dk = _lora_delta(attn.k_proj, adapter_name, layer.x_k, f"layer {idx} k_proj")
            if dk is not None:
                check_kv_transform_free(attn, config, idx, adapter_name, "k")
                _check_k_rope(idx, attn, layer)
                dk = dk.view(n, T, Hkv, D).transpose(1, 2)
                key = key + apply_rope(dk, layer.cos, layer.sin).to(key.dtype)
        if residual in ("kv", "v"):
            dv = _lora_delta(kv_projections(attn, config).v[0], adapter_name, layer.x_v, f"layer {idx} v_proj")
            if dv is not None:
                check_kv_transform_free(attn, config, idx, adapter_name, "v")
                value = value + dv.view(n, T, Hkv, D).transpose(1, 2).to(value.dtype)
        out.append((key, value))
    return out


def _check_k_rope(idx: int, attn: nn.Module, layer) -> None:
    """Refuse a K residual on a layer whose cached K is not rotate-half RoPE of k_proj's output over its whole head
    (partial rotary failed inside; interleaved RoPE trained what inference refuses, silently): inference's checks
    (:func:`forkkv_hf.context.base_pass.check_rope_layout`), once per layer of a context."""
    if getattr(layer, "k_rope_checked", False):
        return
    D = layer.key.shape[-1]
    if layer.cos.shape[-1] != D:
        raise ValueError(f"layer {idx} rotates only {layer.cos.shape[-1]} of its {D} head dimensions (partial "
                         "rotary); ForkKV's K residual assumes full rotate-half RoPE. Retarget the adapters away from "
                         "the K projection (LoRA on V is still shared; inference refuses k_proj LoRA here in every fork)")
    proj = attn.k_proj
    with torch.no_grad():
        head = getattr(proj, "base_layer", proj)(layer.x_k[0, :8])
    check_rope_layout(idx, head, layer)
    layer.k_rope_checked = True


def _check_call(model, context, adapter_name, residual) -> None:
    check_residual(residual)
    if not isinstance(context, TrainingContext):
        raise TypeError(
            f"context must be a forkkv_hf.training.TrainingContext (the base pass over the context), got "
            f"{type(context).__name__}; build one with TrainingContext(model, context_ids)"
        )
    context.check_model(model)
    if not isinstance(adapter_name, str):
        raise TypeError(f"adapter_name must be the name of one LoRA adapter, got {adapter_name!r}")
    check_adapter_names(model, [adapter_name])
    if adapter_name == "__base__":
        raise ValueError("adapter_name '__base__' has no LoRA weights to train; name an adapter of the model")


def _activate(model, adapter_name: str) -> None:
    """Make ``adapter_name`` the one active adapter, as ``PeftModel.set_adapter`` does (which also marks its
    weights trainable); left as is when it already is. ``set_adapter`` also sets ``requires_grad=False`` on every
    other adapter; that is undone here, because a loss of another adapter computed before this call (a sum of two
    agents' losses, or a student's loss before its teacher's forward) would otherwise get no gradients at
    ``backward()``: nothing this function turned trainable is turned off again."""
    if list(model.active_adapters) == [adapter_name]:
        return
    trainable = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    model.set_adapter(adapter_name)
    for p in trainable:
        p.requires_grad_(True)


def _suffix_tensors(batch: dict, context: TrainingContext, device):
    """The batch on ``device``: ``input_ids``/``attention_mask [B, L]``, the mask over ``[context | suffix]``
    ``[B, T + L]`` (each row's context tokens, not its padding) and the suffix positions ``[B, L]`` (after each
    row's own context), and ``rows [B]``: the context of each row (``None``: the one context, for every row)."""
    ids = batch["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError(f"batch['input_ids'] must be a [B, L] tensor of the tokens after the context, got "
                         f"{getattr(ids, 'shape', type(ids))}")
    ids = ids.to(device, non_blocking=True)
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.to(device, non_blocking=True)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask {tuple(mask.shape)} must match input_ids {tuple(ids.shape)} (the suffix only: "
                         "the context is always attended)")
    rows = _context_rows(batch, context, ids.shape[0])
    valid = context.valid.expand(ids.shape[0], -1) if rows is None else context.valid[rows.to(device)]
    full = torch.cat([valid.to(mask.dtype), mask], dim=1)
    positions = (full.cumsum(-1) - 1).clamp_min(0)[:, valid.shape[1]:]
    return ids, mask, full, positions, rows


def _context_rows(batch: dict, context: TrainingContext, B: int) -> torch.Tensor | None:
    """``batch["context_index"]`` checked against ``context`` (``[B]`` long, on the CPU), or ``None`` when the
    context is one and the batch gives no index (or only zeros)."""
    index = batch.get("context_index")
    if index is None:
        if context.num_contexts > 1:
            raise ValueError(f"the TrainingContext holds {context.num_contexts} contexts; give batch['context_index'] "
                             "[B], the context each row follows")
        return None
    index = torch.as_tensor(index).cpu()
    if index.shape != (B,) or index.is_floating_point() or index.dtype == torch.bool:
        raise ValueError(f"batch['context_index'] must be [B] = [{B}] integer indices of contexts, got "
                         f"{tuple(index.shape)} {index.dtype}")
    if B and not 0 <= int(index.min()) <= int(index.max()) < context.num_contexts:
        raise IndexError(f"batch['context_index'] holds {int(index.min())}..{int(index.max())}, outside the "
                         f"{context.num_contexts} contexts of this TrainingContext")
    return None if context.num_contexts == 1 else index.long()


def _hidden(model, context: TrainingContext, batch: dict, adapter_name: str, residual: str):
    """Last hidden states ``[B, L, d_model]`` of the suffix rows over the context K/V of ``residual``."""
    from transformers import DynamicCache

    _check_call(model, context, adapter_name, residual)
    if not calls_in_flight(model):  # PEFT's adapter_names hooks of a forward that raised: they would pick the rows'
        remove_stale_peft_hooks(model)  # adapters of that call, silently
    _activate(model, adapter_name)
    base = transformers_model(model)
    ids, _, full_mask, positions, rows = _suffix_tensors(batch, context, context.layers[0].key.device)
    _check_runnable(model, full_mask, residual, context)
    B = ids.shape[0]
    cache = DynamicCache()
    picked = None if rows is None else rows.to(ids.device)
    for idx, (key, value) in enumerate(context_kv(model, context, adapter_name, residual)):
        if picked is None:  # one context: every row reads it (a view, no copy)
            key, value = key.expand(B, -1, -1, -1), value.expand(B, -1, -1, -1)
        else:
            key, value = key.index_select(0, picked), value.index_select(0, picked)
        cache.update(key, value, idx)
    decoder = decoder_of(base) or base
    out = decoder(input_ids=ids, attention_mask=full_mask, position_ids=positions, use_cache=True,
                  **cache_kwargs(cache))
    return out.last_hidden_state


def _check_runnable(model, full_mask: torch.Tensor, residual, context: TrainingContext) -> None:
    """Refuse what the training forward cannot run as inference would: transformers' gradient checkpointing (its
    decoder layers drop the cache in training mode, and the cache is how the context's K/V reach them: the context
    was silently left out), adapters merged since the context's base pass, rows of
    ``length`` (context + suffix) past a length-dependent RoPE's limit (the context was rotated for its own length:
    neither ForkKV nor ``"exact"`` is then the model's own pass), and rows beyond a sliding window, which ForkKV
    inference refuses (ordinary fine-tuning, ``"exact"``, runs them unless padding sits inside them: transformers
    places the window by column, not position, so a row of a shorter context or a left-padded one lost tokens of
    its window, silently)."""
    base = transformers_model(model)
    length = full_mask.shape[1]
    refuse_merged(model, "the TrainingContext's pass over the context")
    check_rope_tables(base.config, context.layers[0].cos, context.layers[0].sin, model, length,
                      what="a pass over context + suffix of these training rows")
    if any(getattr(m, "gradient_checkpointing", False) is True and m.training for m in base.modules()):
        raise ValueError(
            "gradient checkpointing is on (model.gradient_checkpointing_enable() or TrainingArguments("
            "gradient_checkpointing=True)): in training mode transformers' checkpointed decoder layers drop the "
            "cache through which ForkKV-aware training passes the context's K/V, so the context would be left out. "
            "Turn it off (model.gradient_checkpointing_disable(), gradient_checkpointing=False)"
        )
    holes = None  # padding before a real token (contexts of unequal lengths, left pads): read once, where it matters
    for idx, attn in find_attention_modules(model).items():
        w = sliding_window(attn, base.config)
        if w is None or length <= w:
            continue
        if residual == "exact":
            if holes is None:
                m = full_mask.bool()
                holes = bool((~m[:, :-1] & m[:, 1:]).any())
            if holes:
                raise ValueError(
                    f"layer {idx} uses sliding-window attention (window {w}) and these rows ({length} tokens with the "
                    "context) hold padding before real tokens (contexts of unequal lengths in one TrainingContext, or "
                    "left-padded rows): transformers would place the window by column, not position. Use one "
                    "TrainingContext per context and pad the rows on the right")
        else:
            raise ValueError(
                f"layer {idx} uses sliding-window attention (window {w}) and context + suffix rows reach {length} "
                "tokens: ForkKV inference refuses such rows (it computes full attention), so an agent cannot be "
                "trained for them; shorten the context or the rows, or train with residual='exact'"
            )


def output_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits of final hidden states as the model's own forward makes them: its output projection, then
    what some families apply to it (Cohere's ``logit_scale``, Granite's ``logits_scaling``, Gemma 2/3's
    ``final_logit_softcapping``; before, left out: Gemma 2's logits were 8 apart from its own)."""
    base = transformers_model(model)
    logits = base.get_output_embeddings()(hidden)
    scale = getattr(base, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    cfg = text_config(base.config)
    if getattr(cfg, "logits_scaling", None):
        logits = logits / cfg.logits_scaling
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def forkkv_logits(model: nn.Module, context: TrainingContext, batch: dict, adapter_name: str,
                  residual: str = "kv") -> torch.Tensor:
    """Logits ``[B, L, V]`` of the suffix rows ``batch["input_ids"] [B, L]`` (with ``attention_mask [B, L]``,
    optional) after the context, for agent ``adapter_name`` under ``residual``: what a ``ForkKVCache`` forked with
    that residual mode computes at inference, differentiable in the adapter's LoRA weights."""
    return output_logits(model, _hidden(model, context, batch, adapter_name, residual))


def forkkv_loss(model: nn.Module, context: TrainingContext, batch: dict, adapter_name: str, residual: str = "kv",
                num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """Causal-LM loss of agent ``adapter_name`` on suffix rows after a shared context, as it will run under ForkKV.

    ``model``: a ``PeftModel`` (LoRA). ``context``: a :class:`~forkkv_hf.training.TrainingContext` of that model.
    ``batch``: ``input_ids [B, L]`` (the tokens after the context: prompt and answer), ``labels [B, L]`` (as for
    ``AutoModelForCausalLM``: aligned with ``input_ids``, shifted inside, ``-100`` ignored), optionally
    ``attention_mask [B, L]`` (0 on padding) and, when ``context`` holds several contexts, ``context_index [B]``
    (the context each row follows). ``residual``: ``"kv"`` (ForkKV, default), ``"v"``, ``"none"``, ``"exact"`` or
    a :class:`FittedResidual` (module docstring). Activates ``adapter_name`` (``PeftModel.set_adapter``) if it is not the active
    adapter, keeping other adapters' trainable weights trainable (losses of several adapters may be summed before
    one ``backward()``). Returns the mean cross-entropy over the labelled tokens, or their sum divided by
    ``num_items_in_batch`` when given (gradient accumulation, as ``transformers.Trainer`` passes it). The vocabulary
    projection runs on the labelled positions only.
    """
    keep, target = labelled_targets(batch)
    logits = labelled_logits(model, _hidden(model, context, batch, adapter_name, residual), keep)
    total = torch.nn.functional.cross_entropy(logits, target.to(logits.device, non_blocking=True), reduction="sum")
    return total / (keep.sum() if num_items_in_batch is None else num_items_in_batch)


def learned_labels(labels: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``labels`` with -100 where the loss learns nothing: the first column (its logits come from the context's last
    position, which every agent shares) and a label right after padding of the row's own (a padding position predicts
    nothing). The one rule: :func:`labelled_targets` and ``ForkKVTrainer``'s item count and collator read it."""
    out = labels.clone()
    out[:, 0] = -100
    if mask is not None:
        out[:, 1:] = out[:, 1:].masked_fill(mask[:, :-1].to(out.device) == 0, -100)
    return out


def labelled_targets(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``keep [B, L-1]`` (bool, where the labels are: on the CPU, no wait for the device): the labelled positions
    of ``batch["labels"] [B, L]`` after the causal shift, and their targets ``[N]`` (``N = keep.sum()`` > 0)."""
    labels = batch.get("labels")
    if labels is None:
        raise ValueError("batch has no 'labels'; give labels [B, L] aligned with input_ids (-100 where not learned)")
    labels, ids = torch.as_tensor(labels), batch.get("input_ids")
    if isinstance(ids, torch.Tensor) and ids.dim() == 2 and labels.shape != ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {tuple(ids.shape)}")
    if bool((labels[:, 0] != -100).any()):
        warn_once(_logger, "labels on the first token after the context are not learned: its logits would come from "
                           "the context's last position, which ForkKV computes with the base model for every agent "
                           "(at inference the prompt's own tokens predict the answer); start each row with its "
                           "prompt, or put the first answer token after at least one prompt token")
    mask = batch.get("attention_mask")
    target = learned_labels(labels, None if mask is None else torch.as_tensor(mask))[:, 1:]
    keep = target != -100
    if bool((keep != (labels[:, 1:] != -100)).any()):
        warn_once(_logger, "labels right after padding are not learned: the padding position before them sees "
                           "only the context (at inference it predicts nothing); pad the rows on the right")
    if not bool(keep.any()):
        raise ValueError("no labelled token after the first position of any row (labels are all -100, or only the "
                         "first token, which follows the context, is labelled: see the warning); nothing to learn")
    return keep, target[keep]


def labelled_logits(model: nn.Module, hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Logits ``[N, V]`` of the positions ``keep [B, L-1]`` of ``hidden [B, L, d_model]`` (the vocabulary projection
    runs on those positions only), in fp32 at least (fp64 kept: finite-difference checks)."""
    where = keep.flatten().nonzero().flatten().to(hidden.device, non_blocking=True)
    picked = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, where)
    logits = output_logits(model, picked)
    return logits.to(torch.promote_types(logits.dtype, torch.float32))
