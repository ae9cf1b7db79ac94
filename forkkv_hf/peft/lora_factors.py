"""Find the attention layers of a model and the LoRA factors of their ``k_proj``/``v_proj``.

For a LoRA'd projection ``y = x W + s (x Aᵀ) Bᵀ (+ s b)``, ForkKV keeps ``u = x Aᵀ`` (r numbers per token) per agent and
rebuilds ``s u Bᵀ`` when attending. This module stacks, per layer and projection, the ``A`` and the scaled ``B`` of a
set of adapters (ranks zero-padded to the largest), and refuses, with an error that says what to do, every adapter or
model for which that split would be wrong.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from ..compat import text_config
from .tp import gathered_projections, is_dtensor, lora_shard, shard_dim

#: PEFT's reserved adapter name for "no adapter" in ``adapter_names``
BASE_ADAPTER = "__base__"
#: what LoRA layers get as ``adapter_names`` inside a compiled decode step of ``generate``
#: (:class:`~forkkv_hf.compile_policy.RowNames`): they run the plan their call's eager prefill made. Other names in a
#: traced forward come from a model its user compiled: nothing planned them
PLANNED_ROWS = "forkkv-hf: rows planned at the prefill"


def in_planned_step(adapter_names) -> bool:
    """Whether a LoRA layer's forward given ``adapter_names`` runs inside a compiled decode step of ``generate`` (its
    call's eager prefill planned and checked the rows), rather than eagerly or in a model its user compiled."""
    return torch.compiler.is_compiling() and adapter_names == PLANNED_ROWS


@dataclass
class ProjectionLoRA:
    """Stacked LoRA factors of one projection (``k_proj`` or ``v_proj``) of one layer, for the adapters that have it.

    ``A``: ``[n, r, d_in]`` (the adapters' ``lora_A`` weights, rows beyond an adapter's rank are zero).
    ``B``: ``[n, d_out, r]`` (``lora_B`` weights times the adapter's scaling, columns beyond its rank are zero).
    ``ones_column``: index of a column of ``u`` that holds the constant 1 (its ``B`` column is ``scaling · lora_B.bias``)
    when some adapter has a LoRA bias, else ``None``. Slot ``i`` of every stacked tensor belongs to ``adapters[i]``.
    """

    adapters: tuple[str, ...]
    A: torch.Tensor
    B: torch.Tensor
    ranks: tuple[int, ...]
    ones_column: int | None = None
    #: each adapter's ``lora_A`` dtype where they differ (``A`` is then in the widest): ``u`` is computed per dtype,
    #: as PEFT computes each adapter's in its own; ``None`` where they are one dtype
    a_dtypes: tuple[torch.dtype, ...] | None = None

    @property
    def rank(self) -> int:
        """Columns of the residual ``u`` (padded rank, plus the bias column if any)."""
        return self.A.shape[1] + (self.ones_column is not None)


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def transformers_model(model: nn.Module) -> nn.Module:
    """The ``transformers`` model inside a ``PeftModel`` (or the model itself)."""
    if is_peft_model(model):
        return model.get_base_model()
    return model


def decoder_of(base: nn.Module) -> nn.Module | None:
    """The decoder (the module holding the layers) of a transformers model: ``get_decoder()``, unless that is not one
    (ModernBERT's decoder returns its LM head, a ``Linear`` named ``decoder``), then the base model prefix's module."""
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if isinstance(decoder, nn.Module) and any(isinstance(m, nn.ModuleList) for m in decoder.children()):
        return decoder
    inner = getattr(base, getattr(base, "base_model_prefix", "") or "model", None)
    return inner if isinstance(inner, nn.Module) and inner is not base else None


def available_adapters(model: nn.Module) -> list[str]:
    """Names of the LoRA adapters loaded in a ``PeftModel`` (empty for a plain model)."""
    config = getattr(model, "peft_config", None)
    if not config:
        return []
    return list(config.keys())


def _modules_outside_lora(root: nn.Module):
    """``root``'s modules in ``named_modules`` order, without the insides of PEFT tuner layers: with hundreds of
    adapters their per-adapter ``lora_A``/``lora_B`` children are most of the module tree (tens of thousands), and
    this walk runs at every build and before every ``generate``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    stack = [root]
    while stack:
        m = stack.pop()
        yield m
        if not isinstance(m, BaseTunerLayer):
            stack.extend(c for c in reversed(list(m._modules.values())) if c is not None)


#: what ForkKV runs on, for the errors that refuse other models
SUPPORTED_MODELS = ("decoder-only transformers models with rotary position embeddings and separate k_proj/v_proj "
                    "(or Phi-3's qkv_proj): Llama, Mistral, Mixtral, Qwen2, Qwen3, Phi-3, Gemma 2, Gemma 3, OLMo 2")


#: ``config.layer_types`` entries of self-attention layers (the others: linear attention, Mamba, ... hold a state)
ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention"})


@functools.cache
def _takes_rotary_embeddings(attn_class: type) -> bool:
    return "position_embeddings" in inspect.signature(attn_class.forward).parameters


def _unsupported_model(base: nn.Module, found: dict) -> str | None:
    """Why ForkKV cannot run ``base`` (``found``: its attention modules with k/v projections), or ``None``."""
    cfg = getattr(base, "config", None)
    name = f"{type(base).__name__} ({getattr(cfg, 'model_type', '?')})"
    if getattr(cfg, "is_encoder_decoder", False):
        return (f"{name} is an encoder-decoder model (its decoder layers also cross-attend to an encoder); ForkKV "
                f"shares the self-attention cache of {SUPPORTED_MODELS}")
    if not found:
        attns = sorted({f"{type(m).__name__}({', '.join(n for n, _ in m.named_children() if 'drop' not in n)})"
                        for m in base.modules() if type(m).__name__.endswith("Attention")})
        seen = f" Its attention: {', '.join(attns)}." if attns else ""
        return (f"{name} has no self-attention layers ForkKV can split (separate k_proj/v_proj or a qkv_proj, with a "
                f"layer_idx).{seen} ForkKV supports {SUPPORTED_MODELS}")
    text = text_config(cfg)  # a multimodal model's decoder
    n_layers = getattr(text, "num_hidden_layers", None)
    kinds = sorted(set(getattr(text, "layer_types", None) or ()) - ATTENTION_LAYER_TYPES)
    if kinds or isinstance(n_layers, int) and len(found) < n_layers:  # MiniMax's linear attention has a qkv_proj
        what = f" (layer types {', '.join(kinds)})" if kinds else ""
        some = f"{n_layers - len(found)} of its {n_layers}" if len(found) < (n_layers or 0) else "some of its"
        return (f"{name} has {some} decoder layers without a self-attention ForkKV can split{what}: what they keep "
                f"of the context (a recurrent state, another cache) is not the K/V ForkKV shares and forks; ForkKV "
                f"supports {SUPPORTED_MODELS}")
    two_way = sorted({type(m).__name__ for m in found.values() if getattr(m, "is_causal", True) is False})
    if two_way or getattr(text, "use_bidirectional_attention", False):
        return (f"{name} attends bidirectionally ({', '.join(two_way) or 'use_bidirectional_attention'}): a context "
                f"token's K/V then depend on the tokens after it, so one shared pass over the context cannot stand "
                f"for each row's; ForkKV needs causal attention (set use_bidirectional_attention=False, or serve "
                f"this model with plain PEFT)")
    sinks = sorted({type(m).__name__ for m in found.values() if getattr(m, "sinks", None) is not None})
    if sinks:
        return (f"{name}'s attention ({', '.join(sinks)}) adds learned attention sinks to its softmax (GPT-OSS's "
                f"`sinks`, passed as `s_aux`), which ForkKV's attention does not compute; ForkKV supports "
                f"{SUPPORTED_MODELS}")
    plain = sorted({type(m).__name__ for m in found.values() if not _takes_rotary_embeddings(type(m))})
    if plain:
        return (f"{name}'s attention ({', '.join(plain)}) takes no rotary position embeddings (learned or absolute "
                f"positions); ForkKV rotates the shared K residual with the context's RoPE and supports "
                f"{SUPPORTED_MODELS}")
    return None


def find_attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    """Map ``layer_idx`` to the self-attention module of each decoder layer (separate ``k_proj``/``v_proj``, or a
    fused ``qkv_proj`` as in Phi-3). Refuses models ForkKV does not support (encoder-decoder, fused ``c_attn`` or
    ``query_key_value``, no RoPE) with an error that says which models it supports."""
    refuse_other_peft_types(model)
    found: dict[int, nn.Module] = {}
    base = transformers_model(model)
    if getattr(getattr(base, "config", None), "is_encoder_decoder", False):
        raise ValueError(_unsupported_model(base, found))
    for module in _modules_outside_lora(base):
        layer_idx = getattr(module, "layer_idx", None)
        if layer_idx is None or isinstance(module, nn.Linear):
            continue
        if (hasattr(module, "k_proj") and hasattr(module, "v_proj")) or hasattr(module, "qkv_proj"):
            if layer_idx in found:
                saved = [n for n, m in base.named_modules() if type(m).__name__ == "ModulesToSaveWrapper"]
                if saved:  # PEFT's copies of a whole attention (or layer) hold the same layer_idx
                    raise ValueError(
                        f"modules_to_save keeps copies of modules that contain attention layers ({saved[0]!r} and "
                        f"{len(saved) - 1} more): ForkKV shares the base model's attention K/V and cannot serve an "
                        "adapter's own copy of an attention; save only the projections' LoRA, or run such adapters "
                        "with plain PEFT"
                    )
                raise ValueError(f"two attention modules claim layer_idx={layer_idx}: cannot map the cache layers "
                                 f"of {type(base).__name__}; ForkKV supports {SUPPORTED_MODELS}")
            found[layer_idx] = module
    why = _unsupported_model(base, found)
    if why:
        raise ValueError(why)
    gathered = gathered_projections(base, found[min(found)])
    if gathered:  # (the factors were sliced for a colwise layout the attention does not see: a crash deep inside)
        raise ValueError(f"this model's tensor-parallel plan gathers the outputs of {gathered} (every rank sees every "
                         "KV head), which ForkKV's per-rank K/V do not follow; load it with device_map instead of "
                         "tp_plan")
    if sorted(found) != list(range(len(found))):
        raise ValueError(f"attention layer indices are not 0..{len(found) - 1}: {sorted(found)}")
    return found


@dataclass
class KVProjections:
    """Where an attention layer's K and V come from: ``k``/``v`` are ``(module, out_slice)``, ``out_slice`` the
    ``(start, stop)`` output features of a fused ``qkv_proj`` (``None`` for separate projections)."""

    k: tuple
    v: tuple

    @property
    def fused(self) -> bool:
        return self.k[0] is self.v[0]


def kv_projections(attn: nn.Module, config) -> KVProjections:
    if hasattr(attn, "k_proj") and getattr(attn, "v_proj", 0) is None:  # Gemma 4's attention_k_eq_v: V is K's output
        return KVProjections((attn.k_proj, None), (attn.k_proj, None))
    if hasattr(attn, "k_proj") and hasattr(attn, "v_proj"):
        return KVProjections((attn.k_proj, None), (attn.v_proj, None))
    head_dim = getattr(attn, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q_size = config.num_attention_heads * head_dim
    kv_size = config.num_key_value_heads * head_dim
    return KVProjections((attn.qkv_proj, (q_size, q_size + kv_size)), (attn.qkv_proj, (q_size + kv_size, q_size + 2 * kv_size)))


def _lora_layer_class():
    from peft.tuners.lora import LoraLayer

    return LoraLayer


def lora_layer_of(proj: nn.Module, where: str):
    """The PEFT ``LoraLayer`` wrapping a projection, ``None`` if it is a plain module; refuse other tuner types."""
    LoraLayer = _lora_layer_class()
    if isinstance(proj, LoraLayer):
        return proj
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(proj, BaseTunerLayer):
        raise ValueError(
            f"{where} is wrapped by {type(proj).__name__}, a PEFT tuner that is not LoRA; ForkKV only splits LoRA "
            "adapters on k_proj/v_proj (retarget that adapter away from k_proj/v_proj, or use LoRA)."
        )
    return None


def refuse_other_peft_types(model: nn.Module) -> None:
    """Refuse a ``PeftMixedModel``, and a ``PeftModel`` holding adapters of other PEFT types than LoRA (prompt or
    prefix tuning, LoHa, IA3, ...): before (found by an audit), only the names passed to a call were checked, so an
    active one ran beside ForkKV, silently (prompt tuning's virtual tokens dropped, LoHa over the prompts only)."""
    if type(model).__name__ == "PeftMixedModel":  # (taken for a plain model, then refused as "not the PeftModel")
        raise ValueError("a PeftMixedModel (adapters of several PEFT types) is not supported; ForkKV serves the LoRA "
                         "adapters of a PeftModel: load them with get_peft_model / PeftModel.from_pretrained")
    if not is_peft_model(model):
        return
    from peft import PeftType

    other = {n: str(getattr(c.peft_type, "value", c.peft_type)) for n, c in model.peft_config.items()
             if c.peft_type != PeftType.LORA}
    if other:
        raise ValueError(
            f"this PeftModel holds non-LoRA adapters ({', '.join(f'{n!r}: {t}' for n, t in other.items())}); ForkKV "
            "supports LoRA adapters only (their K/V are the base model's plus a low-rank residual; other tuners "
            "change the context's K/V in ways one shared base pass does not carry). Serve LoRA agents on a "
            "PeftModel without them (peft_model.delete_adapter(name)), and the others with plain PEFT.")


def check_adapter_names(model: nn.Module, names) -> list[str]:
    """Validate adapter names against the model; returns them as a list. ``"__base__"`` is always allowed."""
    if isinstance(names, str):
        raise TypeError(f"adapter_names must be a list of names, one per row, not the string {names!r}")
    names = list(names)
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"adapter names must be strings, got {n!r} ({type(n).__name__})")
    known = available_adapters(model)
    named = sorted({n for n in names if n != BASE_ADAPTER})
    if named and not is_peft_model(model):  # (transformers' own PEFT integration: accepted, then refused as stale)
        refuse_other_peft_types(model)  # (a PeftMixedModel by name)
        raise ValueError(
            f"adapter(s) {named} requested but {type(model).__name__} is not a PeftModel; only \"{BASE_ADAPTER}\" rows "
            "are possible on it (adapters loaded through transformers' own PEFT integration, model.add_adapter / "
            "load_adapter, are not served). Load the adapters with peft: get_peft_model(model, config, "
            "adapter_name=...) or PeftModel.from_pretrained(model, path, adapter_name=...).")
    if BASE_ADAPTER in known:
        raise ValueError(
            f'this model has an adapter named "{BASE_ADAPTER}", the name ForkKV (as PEFT\'s adapter_names) gives rows '
            "that run no adapter, so its rows would run neither; load it under another name"
        )
    unknown = sorted({n for n in names if n != BASE_ADAPTER and n not in known})
    if unknown:
        raise ValueError(
            f"unknown adapter(s) {unknown}; this model has {known} (and \"{BASE_ADAPTER}\" for the base model). "
            "Load them with peft_model.load_adapter(path, adapter_name=...) first."
        )
    refuse_other_peft_types(model)
    return names


def is_activated_lora(layer, adapter: str) -> bool:
    """PEFT Activated LoRA (``alora_invocation_tokens``): inactive until its invocation sequence, so over a shared
    context that precedes the invocation its K/V are exactly the base model's and it needs no residual."""
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    return variant is not None and type(variant).__name__ == "ALoraLinearVariant"


def collect_projection_lora(
    proj: nn.Module, adapters: list[str], where: str, dtype: torch.dtype, out_slice: tuple | None = None
) -> ProjectionLoRA | None:
    """Stack the LoRA factors of ``adapters`` found on ``proj`` (rows ``out_slice`` of ``B`` for a fused projection).
    ``None`` if none of them needs a residual there (no LoRA, or Activated LoRA)."""
    check_saved_copies(proj, adapters, where)
    layer = lora_layer_of(proj, where)
    if layer is None:
        return None
    if getattr(layer, "merged", False):
        raise ValueError(
            f"{where} has merged LoRA adapters {layer.merged_adapters}; ForkKV needs unmerged adapters "
            "(call peft_model.unmerge_adapter())."
        )
    present = [a for a in adapters if a in layer.lora_A and not is_activated_lora(layer, a)]
    if not present:
        return None
    has_bias = []
    for a in present:
        if layer.use_dora.get(a, False) or a in getattr(layer, "lora_magnitude_vector", {}):
            raise ValueError(
                f"adapter {a!r} uses DoRA on {where}: DoRA rescales the whole weight per column, so its K/V are not "
                "the base K/V plus a low-rank residual and cannot be shared. Use plain LoRA for agents that fork "
                "a shared context, or run this adapter without ForkKV."
            )
        variant = getattr(layer, "lora_variant", {}).get(a)
        if variant is not None:
            raise ValueError(
                f"adapter {a!r} on {where} is a LoRA variant ({type(variant).__name__}); ForkKV supports plain LoRA "
                "and Activated LoRA on k_proj/v_proj."
            )
        has_bias.append(getattr(layer.lora_B[a], "bias", None) is not None)
    base_w = layer.get_base_layer().weight
    if out_slice is not None and is_dtensor(base_w):
        raise NotImplementedError(
            f"{where} is a fused qkv_proj sharded by tensor parallelism; ForkKV cannot tell which of its local rows "
            "are K and V. Load the model with device_map instead of tp_plan, or use a model with separate "
            "k_proj/v_proj."
        )
    if shard_dim(base_w) == 1:
        raise NotImplementedError(
            f"{where} is sharded by input features (a rowwise tensor-parallel k/v projection); ForkKV needs K/V "
            "projections sharded by output features (transformers' 'colwise' plan, the default)."
        )
    # tensor parallelism: A whole (the input is replicated), B's rows of this rank's KV heads
    As = [lora_shard(layer.lora_A[a].weight, base_w, 1) for a in present]
    Bs = [lora_shard(layer.lora_B[a].weight, base_w, 0) for a in present]
    ranks = [a.shape[0] for a in As]
    r_max = max(ranks)
    d_in = As[0].shape[1]
    lo, hi = out_slice if out_slice is not None else (0, Bs[0].shape[0])
    bias = any(has_bias)
    a_dtypes = tuple(a.dtype for a in As)
    wide = functools.reduce(torch.promote_types, a_dtypes)
    A = torch.zeros(len(present), r_max, d_in, dtype=wide, device=As[0].device)
    B = torch.zeros(len(present), hi - lo, r_max + bias, dtype=dtype, device=As[0].device)
    with torch.no_grad():
        for i, a in enumerate(present):
            r, s = ranks[i], layer.scaling[a]
            A[i, :r] = As[i]
            B[i, :, :r] = (Bs[i][lo:hi].float() * s).to(dtype)
            if has_bias[i]:
                B[i, :, r_max] = (lora_shard(layer.lora_B[a].bias, base_w, 0)[lo:hi].float() * s).to(dtype)
    return ProjectionLoRA(tuple(present), A, B, tuple(ranks), r_max if bias else None,
                          a_dtypes if len(set(a_dtypes)) > 1 else None)


def kv_transform(attn: nn.Module, config, kind: str) -> str | None:
    """What ``attn`` does to its K (``kind="k"``) or V (``"v"``) after the projection that makes ``f(base + residual)``
    differ from ``f(base) + residual`` (so a LoRA residual on that projection cannot be added to the shared one), or
    ``None``: a per-head norm (Qwen3, Gemma 3 and OLMo 2's ``k_norm``, Gemma 4's ``v_norm``) or OLMo's ``clip_qkv``."""
    for norm in (f"{kind}_norm", f"{kind}_layernorm"):
        if getattr(attn, norm, None) is not None:
            return f"applies {norm} to {kind.upper()}{' before RoPE' if kind == 'k' else ''}"
    text = text_config(config)  # a multimodal model's decoder
    clip = getattr(text, "clip_qkv", None)
    if clip is not None:
        return f"clamps q/k/v to +-{clip:g} after the projections (clip_qkv)"
    return None


def check_kv_transforms(attn: nn.Module, layer_idx: int, config, k_lora: ProjectionLoRA | None,
                        v_lora: ProjectionLoRA | None = None) -> None:
    """Refuse LoRA on k_proj / v_proj where the attention transforms K / V after the projection
    (:func:`kv_transform`): a norm of ``base + residual`` is not the norm of the base plus the residual, nor is a
    clamp."""
    for kind, lora in (("k", k_lora), ("v", v_lora)):
        why = lora is not None and kv_transform(attn, config, kind)
        if why:
            other = "v" if kind == "k" else "k"
            fine = (f"LoRA on {other}_proj, q_proj, o_proj and the MLP is fine on this model"
                    if not kv_transform(attn, config, other) else "LoRA on q_proj, o_proj and the MLP is fine")
            raise ValueError(
                f"layer {layer_idx}: {type(attn).__name__} {why}, so f(base + residual) is not f(base) + residual, "
                f"but adapter(s) {list(lora.adapters)} put LoRA on {kind}_proj. Retarget those adapters away from "
                f"{kind}_proj ({fine}), or leave them out of the build and fit their residuals to their own pass: "
                "SharedContext.build(model, ids, other_names).fit_residuals(model, those_names, rank=...)."
            )


def check_saved_copies(proj: nn.Module, adapters, where: str) -> None:
    """Refuse adapters that replace ``proj`` (a K or V projection) by a trained copy (PEFT's ``modules_to_save``):
    their context K/V is the copy's, which no rank-r residual of the base pass restores."""
    copies = getattr(proj, "modules_to_save", None)
    if not isinstance(copies, nn.ModuleDict) or not hasattr(proj, "original_module"):
        return
    saved = sorted(a for a in adapters if a in copies)
    if saved:
        raise ValueError(
            f"adapter(s) {saved} replace {where} by a trained copy (modules_to_save), so their context K/V are the "
            "copy's, not the base model's plus a LoRA residual. Train LoRA on that projection instead (target_modules),"
            " or serve those adapters with their own cache (plain PEFT + DynamicCache)."
        )


def refuse_offloaded(named) -> None:
    """Refuse weights on the meta device (``named``: ``(name, tensor)`` pairs): a ``device_map`` that offloads layers
    to the CPU or disk (accelerate keeps their weights there between forwards). ForkKV reads weights outside the
    forward (the LoRA factors of the residuals, the context's weight checks); before, a build failed inside PyTorch
    and a check called offloaded weights changed."""
    meta = [n for n, t in named if t is not None and t.device.type == "meta"]
    if meta:
        raise ValueError(
            f"{len(meta)} weights are on the meta device (e.g. {meta[0]}): the model was dispatched with offload (a "
            "device_map with 'cpu' or 'disk' entries), whose weights accelerate loads only inside their forward; "
            "ForkKV reads weights outside it. Load the model without offload (a device_map of GPUs only, or one "
            "device)."
        )


def refuse_merged(model: nn.Module, pass_name: str) -> None:
    """Refuse adapters merged into the base weights before ``pass_name`` (a pass of the base model with adapters
    off): PEFT's ``disable_adapter()`` unmerges them for the pass and leaves them unmerged, so the pass would lack
    them and the model be changed, silently; one merged after the pass is missing from what it computed."""
    merged = sorted({a for m in model.modules() for a in (getattr(m, "merged_adapters", None) or ())})
    if merged:
        raise ValueError(
            f"adapters {merged} are merged into the base weights; {pass_name} runs the base model with adapters off, "
            "which would unmerge them. Unmerge them (peft_model.unmerge_adapter()), or make the merge permanent "
            "(peft_model.merge_and_unload(), then add the agents' adapters)"
        )
