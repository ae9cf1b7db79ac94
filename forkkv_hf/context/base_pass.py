"""The base-model pass of a shared context: one forward of the base model (adapters disabled) over the context
tokens, chunked, after the K/V of a past, with hooks that capture what the forks need besides the K/V
(:class:`ResidualCapture`); the model limits it must respect (positions, sliding windows) and the RoPE layout the K
residual relies on. :func:`segment_layers` runs it and returns the :class:`~forkkv_hf.context.segments.SharedLayer`
of every layer."""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..peft.adapter_probe import install_adapter_probe
from ..compat import cache_kwargs, text_config
from ..peft.lora_factors import (
    ProjectionLoRA,
    check_kv_transforms,
    collect_projection_lora,
    decoder_of,
    find_attention_modules,
    is_peft_model,
    kv_projections,
    lora_layer_of,
    refuse_merged,
    refuse_offloaded,
)
from ..ops.rope import apply_rope
from .segments import Residual, SharedLayer


def max_positions(config) -> int | None:
    return getattr(text_config(config), "max_position_embeddings", None)


def check_chunk_size(chunk_size) -> None:
    """``chunk_size`` must be a positive int (tokens per forward of a base pass) or ``None`` (one pass)."""
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of tokens per forward of the base pass (e.g. 4096) or "
                         f"None for one pass over the whole context, got {chunk_size!r}")


def sliding_window(attn: nn.Module, config) -> int | None:
    """The layer's sliding window, ``None`` for full attention: the module's own (Qwen2, Gemma), else its config's
    when the model passes it to every attention call (Mistral, Phi-3). 0 means none (Qwen2-MoE's config without
    ``use_sliding_window`` sets 0). A model that sets the attribute on its sliding layers only and keeps a window in
    its config (Qwen2-MoE with ``use_sliding_window``) gets its full layers refused beyond that window: a false
    refusal, never a silently wrong result. The config is the attention module's own, else the text model's: a
    multimodal model's top-level config (Llava over Mistral) holds no window (read there before, found by an audit:
    the build failed deep inside, and a compiled decode was allowed past the window)."""
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window or None
    own = getattr(attn, "config", None)
    window = getattr(own if own is not None else text_config(config), "sliding_window", None)
    return window or None


def cache_dtype(base: nn.Module) -> torch.dtype:
    """The dtype the model's K/V come out in (its compute dtype)."""
    dtype = getattr(base, "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    return torch.get_default_dtype()


def past_length(past, base: nn.Module | None = None) -> int:
    """Tokens in ``past`` (one ``(key, value)`` pair ``[1, H_kv, S, D]`` per layer, or ``None``, a list); validates
    it, against the K/V ``base`` (the transformers model) makes where given: its dtype, and one head layout."""
    if past is None:
        return 0
    lengths = set()
    dtype = None if base is None else cache_dtype(base)
    for idx, pair in enumerate(past):
        if len(pair) != 2 or any(not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[0] != 1 for t in pair):
            raise ValueError(f"past layer {idx}: expected a (key, value) pair of [1, H_kv, S, D] tensors")
        if dtype is not None and any(t.dtype != dtype for t in pair):  # (a bf16 past was taken by an fp32 model)
            raise TypeError(f"past layer {idx} holds {pair[0].dtype} K/V but the model computes {dtype}; give the "
                            "K/V of the same model in its dtype")
        lengths.update(t.shape[-2] for t in pair)
    if len(lengths) != 1:
        raise ValueError(f"past layers hold different numbers of tokens {sorted(lengths)}; each must hold the same S")
    return lengths.pop()


def check_past_layout(past, model: nn.Module) -> None:
    """Refuse a ``past`` whose K/V heads or head size differ from what the model's attention makes, layer by layer,
    where the modules say (``head_dim``, the config's ``num_key_value_heads``; before: a size mismatch inside
    ``torch.cat``)."""
    from ..peft.tp import tp_world

    if past is None:
        return
    world = tp_world(model)[1]
    for idx, attn in find_attention_modules(model).items():
        if idx >= len(past):
            return
        cfg = getattr(attn, "config", None)
        heads, dim = getattr(cfg, "num_key_value_heads", None), getattr(attn, "head_dim", None)
        want = (None if heads is None else heads // world, dim)
        got = (past[idx][0].shape[1], past[idx][0].shape[-1])
        if None not in want and got != want:
            raise ValueError(f"past layer {idx} has {got[0]} K/V heads of {got[1]} dims, the model's have {want[0]} "
                             f"of {want[1]}; give the K/V of the same model")


def run_base_pass(model, base, ids: torch.Tensor, chunk_size, progress, on_chunk, past=None, adapter=None):
    """One forward of the base model (adapters disabled) over ``ids`` ``[T]``, chunked, after the ``S`` tokens of
    ``past`` (per layer ``(key, value)``, or ``None``); ``on_chunk(t0)`` is called before the forward of the chunk
    that starts at token ``t0``. Returns its ``DynamicCache`` (``S + T`` tokens). ``adapter``: run that adapter's own
    pass instead (the PEFT model with ``adapter_names=[adapter]``, what :mod:`forkkv_hf.context.fitted` fits)."""
    from transformers import DynamicCache

    decoder = decoder_of(base)
    runner = decoder if decoder is not None else base
    T = ids.numel()
    step = T if not chunk_size or chunk_size >= T else int(chunk_size)
    starts = list(range(0, T, step))
    if adapter is not None:  # PEFT's adapter_names on the whole model: only its last position's logits
        runner, desc = model, f"forkkv: {adapter}'s own pass"
        extra = {"adapter_names": [adapter], "logits_to_keep": 1}
    else:
        extra, desc = {"logits_to_keep": 1} if runner is base else {}, "forkkv: base pass over shared context"
    disable = model.disable_adapter() if is_peft_model(model) and adapter is None else contextlib.nullcontext()
    if adapter is None:
        refuse_merged(model, "a shared context's base pass")
        _refuse_active_adapters(model)
    cache = DynamicCache(config=base.config)
    S = 0
    if past is not None:
        past = list(past)
        num_layers = getattr(text_config(base.config), "num_hidden_layers", len(past))
        if len(past) != num_layers:
            raise ValueError(
                f"past has {len(past)} layers but the model has {num_layers}; give one (key, value) pair per layer"
            )
        for idx, (key, value) in enumerate(past):
            cache.update(key, value, idx)
        S = past[0][0].shape[-2]
    with disable:
        for t0 in tqdm(starts, desc=desc, unit="chunk", leave=adapter is None,
                       disable=not progress or len(starts) == 1):
            on_chunk(t0)
            chunk = ids[t0 : t0 + step][None]
            positions = torch.arange(S + t0, S + t0 + chunk.shape[1], device=ids.device)[None]
            runner(input_ids=chunk, position_ids=positions, use_cache=True, **extra, **cache_kwargs(cache))
    return cache


def _refuse_active_adapters(model: nn.Module) -> None:
    """Refuse a transformers model given with PEFT's adapter layers inside and an adapter on (the model inside a
    ``PeftModel``, or one with adapters loaded by transformers): its pass would not be the base model's."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if is_peft_model(model):
        return  # its base pass runs under disable_adapter()
    on = [name for name, m in model.named_modules()
          if isinstance(m, BaseTunerLayer) and not m.disable_adapters and m.active_adapters]
    if on:
        raise ValueError(
            f"this model has PEFT adapter layers with an adapter on ({on[0]!r} and {len(on) - 1} more), so its pass "
            "over the context would not be the base model's; pass the PeftModel itself (peft_model, not "
            "peft_model.get_base_model()), or turn its adapters off first (model.disable_adapters())"
        )


def check_rope_layout(idx: int, k_out_head: torch.Tensor | None, layer) -> None:
    """Refuse models whose cached K is not rotate-half RoPE applied directly to k_proj's output: the K residual is
    rebuilt on that assumption (a K norm, partial rotary or interleaved RoPE would make it wrong)."""
    if k_out_head is None:
        return
    n = k_out_head.shape[0]
    Hkv, D = layer.key.shape[1], layer.key.shape[-1]
    k = k_out_head.view(n, Hkv, D).transpose(0, 1)
    expect = apply_rope(k, layer.cos[:n].to(k.dtype), layer.sin[:n].to(k.dtype))
    got = layer.key[0, :, :n]
    err = (expect.float() - got.float()).abs().max().item()
    scale = got.float().abs().max().item() + 1e-6
    if err > 2e-2 * scale:
        raise ValueError(
            f"layer {idx}: the cached keys are not rotate-half RoPE of k_proj's output (max deviation {err:.3g} "
            f"against |K| {scale:.3g}); this model transforms K in a way ForkKV cannot split (a K norm, partial or "
            "interleaved rotary). Retarget the adapters away from k_proj (LoRA on v_proj is still shared)."
        )


# ------------------------------------------------------------------------------------------- residual capture
@dataclass
class _LayerCapture:
    """What the hooks of one attention layer write during the pass."""

    k_lora: ProjectionLoRA | None
    v_lora: ProjectionLoRA | None
    u_k: torch.Tensor | None = None
    u_v: torch.Tensor | None = None
    rope_group: int | None = None
    writes_rope: bool = False  # the first layer of its RoPE group writes the group's cos/sin tables
    k_out_head: torch.Tensor | None = None  # first tokens of k_proj's output, to check the RoPE layout


def _form(value) -> str:
    """A short description of ``value``: a tensor's dtype and shape (Llama 4 passes one complex tensor), else its
    type."""
    if isinstance(value, torch.Tensor):
        return f"one {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


class ResidualCapture:
    """The hooks of one base pass over ``T`` tokens. Per attention layer they capture ``u = x·Aᵀ`` ``[n, T, r]`` for
    the ``n`` adapters with LoRA on its K/V projections (from the projections' input ``x``; nothing ``d_model``-wide
    is kept), the first tokens of ``k_proj``'s output (to check the RoPE layout), and the RoPE tables ``cos``/``sin``
    ``[T, D]``, one pair per group of layers whose tables hold the same values. ``offset``: the first token of the
    chunk running now (set through :meth:`at_chunk`)."""

    def __init__(self, layers: dict[int, _LayerCapture], T: int, dtype: torch.dtype):
        self.layers = layers
        self.T = T
        self.dtype = dtype
        self.rope_tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.offset = 0

    def at_chunk(self, t0: int) -> None:
        self.offset = t0

    def _u_buffer(self, lora: ProjectionLoRA, like: torch.Tensor) -> torch.Tensor:
        u = torch.zeros(len(lora.adapters), self.T, lora.rank, dtype=self.dtype, device=like.device)
        if lora.ones_column is not None:
            u[:, :, lora.ones_column] = 1
        return u

    def _write_u(self, lora: ProjectionLoRA, u: torch.Tensor, x: torch.Tensor) -> None:
        """``u[:, offset : offset + C, :r] = x[0] Aᵀ`` for the chunk's input ``x`` ``[1, C, d_in]``."""
        n, r = lora.A.shape[0], lora.A.shape[1]
        t0, C = self.offset, x.shape[1]
        for dtype in (lora.A.dtype,) if lora.a_dtypes is None else dict.fromkeys(lora.a_dtypes):
            # adapters of several dtypes: each in its own, as PEFT's forward (x cast to lora_A's dtype)
            idx = slice(None) if lora.a_dtypes is None else [i for i, d in enumerate(lora.a_dtypes) if d == dtype]
            A = lora.A[idx].to(dtype)
            uc = (x[0].to(dtype) @ A.reshape(A.shape[0] * r, -1).t()).view(C, A.shape[0], r)
            u[idx, t0 : t0 + C, :r] = uc.transpose(0, 1).to(u.dtype)

    def projection_hook(self, idx: int, kinds: tuple):
        """Pre-hook on a projection feeding K and/or V: ``u = x·Aᵀ`` for its adapters. A fused qkv_proj has one
        ``A`` for K and V, so one ``u`` serves both residuals."""
        cap = self.layers[idx]

        def hook(module, args):
            x = args[0]
            for which in kinds:
                lora = cap.k_lora if which == "k" else cap.v_lora
                if lora is None:
                    continue
                name = "u_k" if which == "k" else "u_v"
                if which == "v" and "k" in kinds and cap.k_lora is not None:
                    cap.u_v = cap.u_k  # fused: the same A, the same activations
                    continue
                if getattr(cap, name) is None:
                    setattr(cap, name, self._u_buffer(lora, x))
                self._write_u(lora, getattr(cap, name), x)

        return hook

    def k_out_hook(self, idx: int, out_slice):
        """Forward hook on the K projection: keep its output over the first tokens of the pass."""
        cap = self.layers[idx]

        def hook(module, args, output):  # over chunks until 8 tokens (a first chunk of 1 token is position 0 alone,
            # where every rotation is the identity: that checked nothing)
            have = 0 if cap.k_out_head is None else cap.k_out_head.shape[0]
            if have < 8 and self.offset == have:
                out = output[0, : 8 - have]
                out = out if out_slice is None else out[:, out_slice[0] : out_slice[1]]
                out = out.detach().clone()
                cap.k_out_head = out if cap.k_out_head is None else torch.cat([cap.k_out_head, out])

        return hook

    def attention_hook(self, idx: int):
        """Pre-hook on the attention module: write the chunk's ``cos``/``sin`` into the layer's RoPE group."""
        cap = self.layers[idx]
        tables = self.rope_tables

        def hook(module, args, kwargs):
            pe = kwargs.get("position_embeddings")
            if pe is None and len(args) > 1:
                pe = args[1]
            if pe is None or not (isinstance(pe, (tuple, list)) and len(pe) == 2):
                got = "no position_embeddings" if pe is None else f"position_embeddings of another form ({_form(pe)})"
                raise ValueError(
                    f"layer {idx}: the attention module got {got}; ForkKV needs a RoPE model that passes (cos, sin) "
                    "to its attention (Llama, Mistral, Qwen2)"
                )
            cos, sin = pe
            if cap.rope_group is None:  # first chunk: join the group whose table holds the same values
                n = cos.shape[-2]
                cap.rope_group = next(
                    (g for g, (c, s_) in tables.items() if c.device == cos.device and c.dtype == cos.dtype
                     and c.shape[-1] == cos.shape[-1] and torch.equal(c[:n], cos[0]) and torch.equal(s_[:n], sin[0])),
                    None)
            if cap.rope_group is None:
                g = cap.rope_group = len(tables)
                D = cos.shape[-1]
                tables[g] = (
                    torch.empty(self.T, D, dtype=cos.dtype, device=cos.device),
                    torch.empty(self.T, D, dtype=sin.dtype, device=sin.device),
                )
                cap.writes_rope = True
            g, t0, n = cap.rope_group, self.offset, cos.shape[-2]
            if not cap.writes_rope and not (torch.equal(tables[g][0][t0 : t0 + n], cos[0])
                                            and torch.equal(tables[g][1][t0 : t0 + n], sin[0])):
                # the group's tables differ from this layer's in this chunk (before it, they were equal: a first
                # chunk of one token is position 0, the same for every table): a group of its own from here on
                old, g = g, len(tables)
                tables[g] = (tables[old][0].clone(), tables[old][1].clone())
                cap.rope_group, cap.writes_rope = g, True
            if cap.writes_rope:
                tables[g][0][t0 : t0 + n] = cos[0]
                tables[g][1][t0 : t0 + n] = sin[0]

        return hook

    @contextlib.contextmanager
    def installed(self, attn_modules: dict[int, nn.Module], projections: dict):
        """The hooks on every attention layer and its K/V projections, removed on exit (also on an error)."""
        handles = []
        try:
            for idx, attn in attn_modules.items():
                proj = projections[idx]
                handles.append(attn.register_forward_pre_hook(self.attention_hook(idx), with_kwargs=True))
                if proj.fused:
                    handles.append(proj.k[0].register_forward_pre_hook(self.projection_hook(idx, ("k", "v"))))
                else:
                    handles.append(proj.k[0].register_forward_pre_hook(self.projection_hook(idx, ("k",))))
                    handles.append(proj.v[0].register_forward_pre_hook(self.projection_hook(idx, ("v",))))
                if self.layers[idx].k_lora is not None:
                    handles.append(proj.k[0].register_forward_hook(self.k_out_hook(idx, proj.k[1])))
            yield self
        finally:
            for h in handles:
                h.remove()


def _residual(lora: ProjectionLoRA | None, u: torch.Tensor | None) -> Residual | None:
    if lora is None:
        return None
    if u is None:
        raise RuntimeError("the base pass did not reach a LoRA projection's input hook")
    return Residual(lora.adapters, u, lora.B.to(u.device), lora.ranks)


# ------------------------------------------------------------------------------------------------ the pass
def segment_layers(model: nn.Module, base: nn.Module, ids: torch.Tensor, adapters: tuple[str, ...], past, *,
                   chunk_size, progress, keep_kv: bool = True) -> list[SharedLayer]:
    """The base pass over ``ids`` ``[T]`` at positions ``S, S+1, ...`` after ``past`` (``S`` tokens, see
    :func:`past_length`), capturing the residuals of ``adapters``. Returns one :class:`SharedLayer` per attention
    layer over these ``T`` tokens only (``key``/``value`` empty ``[1, H_kv, 0, D]`` with ``keep_kv=False``).
    ``model``: the model the adapters live on; ``base``: its transformers model. Refuses a context beyond the
    model's positions or a sliding window, and a K projection whose output is not plain rotate-half RoPE."""
    config = base.config
    S = past_length(past)
    max_pos = max_positions(config)
    if max_pos is not None and S + ids.numel() > max_pos:
        raise ValueError(
            f"the shared context has {S + ids.numel()} tokens but {type(base).__name__} supports at most "
            f"max_position_embeddings={max_pos}; shorten the context"
        )
    attn_modules = find_attention_modules(model)
    refuse_offloaded(model.named_parameters())
    dtype = cache_dtype(base)
    projections = {idx: kv_projections(attn, config) for idx, attn in attn_modules.items()}
    windows = {idx: sliding_window(attn, config) for idx, attn in attn_modules.items()}
    for idx, w in windows.items():
        if w is not None and S + ids.numel() >= w:  # (at w, a sliding layer's cache keeps w - 1 of them)
            raise ValueError(
                f"layer {idx} uses sliding-window attention (window {w}) and the shared context has "
                f"{S + ids.numel()} tokens; ForkKV computes full attention, which equals sliding-window attention only "
                f"while the whole sequence fits in the window. Use a context of at most {w - 1} tokens (context, "
                f"prompt and output at most {w}), or a model without sliding-window layers."
            )
    captures: dict[int, _LayerCapture] = {}
    for idx, attn in attn_modules.items():
        proj = projections[idx]
        name_k = f"layer {idx} {'qkv_proj' if proj.fused else 'k_proj'}"
        name_v = f"layer {idx} {'qkv_proj' if proj.fused else 'v_proj'}"
        k_lora = collect_projection_lora(proj.k[0], list(adapters), name_k, dtype, out_slice=proj.k[1])
        v_lora = collect_projection_lora(proj.v[0], list(adapters), name_v, dtype, out_slice=proj.v[1])
        check_kv_transforms(attn, idx, config, k_lora, v_lora)
        captures[idx] = _LayerCapture(k_lora, v_lora)
        for module in {id(proj.k[0]): proj.k[0], id(proj.v[0]): proj.v[0]}.values():
            if lora_layer_of(module, f"layer {idx}") is not None:
                install_adapter_probe(module)

    T = ids.numel()
    device = next(base.parameters()).device
    ids = ids.to(device)
    capture = ResidualCapture(captures, T, dtype)
    with capture.installed(attn_modules, projections):
        kv_cache = run_base_pass(model, base, ids, chunk_size, progress, capture.at_chunk, past)

    layers = []
    for idx in range(len(attn_modules)):
        cap = captures[idx]
        key, value = kv_cache.layers[idx].keys, kv_cache.layers[idx].values
        if key is None or key.shape[-2] != S + T:
            got = None if key is None else key.shape[-2]
            raise RuntimeError(f"layer {idx}: the base pass cached {got} tokens, expected {S + T}")
        key, value = key[:, :, S:], value[:, :, S:]  # a segment holds its own tokens only, not the past
        cos, sin = capture.rope_tables[cap.rope_group]
        k_res = _residual(cap.k_lora, cap.u_k)
        v_res = _residual(cap.v_lora, cap.u_v)
        if k_res is not None and cos.shape[-1] != key.shape[-1]:
            fused = hasattr(attn_modules[idx], "qkv_proj")  # its LoRA changes K whatever it is meant for
            raise ValueError(
                f"layer {idx} rotates only {cos.shape[-1]} of its {key.shape[-1]} head dimensions (partial "
                "rotary); ForkKV's K residual assumes full rotate-half RoPE. "
                + ("Its K and V come from one fused qkv_proj: retarget the adapters away from qkv_proj (LoRA on "
                   "o_proj and the MLP is shared)." if fused else
                   "Retarget the adapters away from the K projection (LoRA on V is still shared).")
            )
        layer = SharedLayer(key, value, cos, sin, k_res, v_res, source=weakref.ref(attn_modules[idx]),
                            sliding_window=windows[idx])
        if k_res is not None:
            check_rope_layout(idx, cap.k_out_head, layer)
        if not keep_kv:
            layer.key = key.new_empty((1, key.shape[1], 0, key.shape[-1]))
            layer.value = value.new_empty((1, value.shape[1], 0, value.shape[-1]))
        elif S:  # a copy, so that the past's K/V (the head of the cache's storage) can be freed
            layer.key, layer.value = key.clone(), value.clone()
        layers.append(layer)
    return layers
