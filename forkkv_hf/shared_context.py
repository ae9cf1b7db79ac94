"""The shared part of a ForkKV cache: one base-model pass over a context, kept once, forked by many agents.

``SharedContext.build`` runs the base model (adapters disabled) over the context once. It keeps, per layer,
- the bCache: ``key``/``value`` ``[1, H_kv, T, D]`` exactly as the base model caches them (``key`` after RoPE);
- the rCache: for every forked adapter with LoRA on ``k_proj``/``v_proj``, ``u = x Aᵀ`` ``[T, r]`` computed by hooks
  from the projections' input ``x`` during that same pass (nothing ``d_model``-wide is kept), with the scaled ``B``;
- ``cos``/``sin`` ``[T, D]`` of the context positions, to rotate the K residual after ``B`` is applied.

``SharedContext.fork(adapter_names)`` then gives a :class:`~forkkv_hf.cache.ForkKVCache` for a batch whose row ``i``
is agent ``adapter_names[i]``; any number of caches can be forked, nothing shared is copied or ever written again.

``SharedContext.build_continuation`` is the same base pass over tokens that continue an already computed context
(its base K/V given as ``past``): the building block of :class:`~forkkv_hf.store.ForkKVStore`, which keeps context
segments in radix trees and computes only what is missing.

A context records what it was computed from (:mod:`forkkv_hf.identity`); ``generate`` refuses it once the model's
base weights or its rows' K/V LoRA factors differ. Builds hold the model's lock (:mod:`forkkv_hf.model_lock`);
``fork`` only reads, from any thread. ``pickle``/``torch.save`` work; a loaded context is usable with any model
whose weights are the recorded ones (checked by content at its first generate).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from .base_pass import (
    cache_dtype,
    check_chunk_size,
    check_rope_layout,
    max_positions,
    past_length,
    run_base_pass,
    sliding_window,
)
from .inputs import context_token_ids as _as_context_ids
from .inputs import vocab_size_of
from .lora_factors import (
    BASE_ADAPTER,
    ProjectionLoRA,
    available_adapters,
    check_adapter_names,
    check_k_norm,
    collect_projection_lora,
    find_attention_modules,
    kv_projections,
    lora_layer_of,
    transformers_model,
)
from .identity import ContextIdentity, check_context, record_context
from .model_lock import model_lock


@dataclass
class Residual:
    """rCache of one projection of one layer, for the adapters that have LoRA there.

    ``u``: ``[n, T, r]`` (``x_src Aᵀ`` per adapter; a bias column holds 1), ``B``: ``[n, H_kv·D, r]`` (scaled).
    """

    adapters: tuple[str, ...]
    u: torch.Tensor
    B: torch.Tensor
    ranks: tuple[int, ...]

    @property
    def slot(self) -> dict[str, int]:
        return {a: i for i, a in enumerate(self.adapters)}

    @property
    def rank(self) -> int:
        return self.u.shape[-1]


@dataclass
class SharedLayer:
    """Everything one layer of every fork reads and nobody writes. Shapes in the module docstring."""

    key: torch.Tensor
    value: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    k_res: Residual | None = None
    v_res: Residual | None = None
    #: the attention module this layer was computed for (a cache must not be read by another model's layer); a
    #: weakref, dropped when pickled and set again when the context is first checked against a model
    source: object = field(default=None, repr=False, compare=False)
    #: the layer's sliding-window size (None: full attention); ForkKV is exact while the sequence fits in it
    sliding_window: int | None = None

    @property
    def num_tokens(self) -> int:
        return self.key.shape[-2]

    def __getstate__(self):
        return {**self.__dict__, "source": None}


@dataclass
class _Capture:
    """Per-layer buffers the hooks of the base pass write into."""

    k_lora: ProjectionLoRA | None
    v_lora: ProjectionLoRA | None
    u_k: torch.Tensor | None = None
    u_v: torch.Tensor | None = None
    rope_group: int | None = None
    writes_rope: bool = False  # the first layer of its RoPE group writes the group's cos/sin buffers
    k_out_head: torch.Tensor | None = None  # first tokens of k_proj's output, to check the RoPE layout


@dataclass
class SharedContext:
    """The shared context's bCache and rCache. Build with :meth:`build`, use with :meth:`fork`."""

    layers: list[SharedLayer]
    token_ids: torch.Tensor
    adapters: tuple[str, ...]
    config: object = field(repr=False)
    model_id: int = 0
    #: position of ``token_ids[0]``: 0 for a context, > 0 for a segment made by :meth:`build_continuation`
    start: int = 0
    #: what the base K/V and residuals were computed from (:mod:`forkkv_hf.identity`); checked before each generate
    identity: ContextIdentity | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ build
    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model: nn.Module,
        context_ids,
        adapter_names=None,
        *,
        chunk_size: int | None = 4096,
        progress: bool = True,
    ) -> SharedContext:
        """Run the base model once over ``context_ids`` and capture the residuals of ``adapter_names``.

        ``model``: a ``PeftModel`` (or a plain transformers model, then only ``"__base__"`` rows can fork).
        ``context_ids``: ``[T]`` or ``[1, T]`` token ids. ``adapter_names``: the adapters that may fork this context
        (default: every adapter of the model). ``chunk_size``: tokens per forward of the base pass (bounds activation
        memory on long contexts; ``None`` for one pass); a progress bar shows when there are several chunks.

        Holds the model's lock (:mod:`forkkv_hf.model_lock`) for the whole pass: builds, forks and generates from
        several threads run one after the other. Records the identity of the weights it reads
        (:mod:`forkkv_hf.identity`): a generate after they change is refused.
        """
        return cls._base_pass(model, context_ids, adapter_names, chunk_size=chunk_size, progress=progress)

    @classmethod
    @torch.no_grad()
    def build_continuation(
        cls,
        model: nn.Module,
        token_ids,
        adapter_names=None,
        *,
        past=None,
        keep_kv: bool = True,
        chunk_size: int | None = 4096,
        progress: bool = True,
        record_identity: bool = True,
    ) -> SharedContext:
        """The base pass of :meth:`build` over ``token_ids`` that continue a context of ``S`` tokens.

        ``past``: the base model's K/V of those ``S`` tokens, one ``(key, value)`` pair per layer, each
        ``[1, H_kv, S, D]`` (``key`` after RoPE, as a ``SharedLayer`` holds it), or ``None`` for ``S = 0``.
        The base model runs over ``token_ids`` only, at positions ``S, S+1, ...``, with ``past`` as its cache.
        Returns a segment (``start = S``): per layer the K/V (``[1, H_kv, T, D]``; empty ``[1, H_kv, 0, D]`` with
        ``keep_kv=False``, when only residuals are wanted), ``cos``/``sin`` ``[T, D]`` and the residuals of
        ``adapter_names`` over these ``T`` tokens. Concatenated along T with the segments before it, it equals
        :meth:`build` over the whole context (up to float rounding). A segment with ``start > 0`` cannot be forked.
        ``record_identity=False``: no identity (the caller records it, as :class:`~forkkv_hf.store.ForkKVStore` does).
        """
        return cls._base_pass(model, token_ids, adapter_names, chunk_size=chunk_size, progress=progress, past=past,
                              keep_kv=keep_kv, record_identity=record_identity)

    @classmethod
    def _base_pass(cls, model, context_ids, adapter_names, *, chunk_size, progress, past=None, keep_kv: bool = True,
                   record_identity: bool = True) -> SharedContext:
        check_chunk_size(chunk_size)
        with model_lock(model):
            return cls._locked_base_pass(model, context_ids, adapter_names, chunk_size, progress, past, keep_kv,
                                         record_identity)

    @classmethod
    def _locked_base_pass(cls, model, context_ids, adapter_names, chunk_size, progress, past, keep_kv,
                          record_identity) -> SharedContext:
        if model.training:
            raise ValueError("the model is in training mode; call model.eval() before building a shared context")
        from .peft_integration import remove_stale_peft_hooks

        remove_stale_peft_hooks(model)  # left by an earlier call that raised; they would break the base pass
        ids = _as_context_ids(context_ids, vocab_size_of(model))
        S = past_length(past)
        if adapter_names is None:
            adapter_names = available_adapters(model)
        adapters = tuple(dict.fromkeys(a for a in check_adapter_names(model, adapter_names) if a != BASE_ADAPTER))
        base = transformers_model(model)
        config = base.config
        max_pos = max_positions(config)
        if max_pos is not None and S + ids.numel() > max_pos:
            raise ValueError(
                f"the shared context has {S + ids.numel()} tokens but {type(base).__name__} supports at most "
                f"max_position_embeddings={max_pos}; shorten the context"
            )
        attn_modules = find_attention_modules(model)
        dtype = cache_dtype(base)
        captures: dict[int, _Capture] = {}
        projections = {idx: kv_projections(attn, config) for idx, attn in attn_modules.items()}
        windows = {idx: sliding_window(attn, config) for idx, attn in attn_modules.items()}
        for idx, w in windows.items():
            if w is not None and S + ids.numel() > w:
                raise ValueError(
                    f"layer {idx} uses sliding-window attention (window {w}) and the shared context has "
                    f"{S + ids.numel()} tokens; ForkKV computes full attention, which equals sliding-window attention only "
                    f"while the whole sequence fits in the window. Use a context (plus prompt and output) of at most {w} "
                    "tokens, or a model without sliding-window layers."
                )
        from .attention import install_adapter_probe

        for idx, attn in attn_modules.items():
            proj = projections[idx]
            name_k = f"layer {idx} {'qkv_proj' if proj.fused else 'k_proj'}"
            name_v = f"layer {idx} {'qkv_proj' if proj.fused else 'v_proj'}"
            k_lora = collect_projection_lora(proj.k[0], list(adapters), name_k, dtype, out_slice=proj.k[1])
            v_lora = collect_projection_lora(proj.v[0], list(adapters), name_v, dtype, out_slice=proj.v[1])
            check_k_norm(attn, idx, k_lora)
            captures[idx] = _Capture(k_lora, v_lora)
            for module in {id(proj.k[0]): proj.k[0], id(proj.v[0]): proj.v[0]}.values():
                if lora_layer_of(module, f"layer {idx}") is not None:
                    install_adapter_probe(module)

        T = ids.numel()
        device = next(base.parameters()).device
        ids = ids.to(device)
        rope_buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        offset = [0]

        def u_buffer(lora: ProjectionLoRA | None, like: torch.Tensor):
            if lora is None:
                return None
            u = torch.zeros(len(lora.adapters), T, lora.rank, dtype=dtype, device=like.device)
            if lora.ones_column is not None:
                u[:, :, lora.ones_column] = 1
            return u

        def write_u(lora: ProjectionLoRA, u: torch.Tensor, x: torch.Tensor):
            n, r = lora.A.shape[0], lora.A.shape[1]
            t0 = offset[0]
            xs = x[0].to(lora.A.dtype)  # [C, d_in]
            uc = (xs @ lora.A.reshape(n * r, -1).t()).view(xs.shape[0], n, r)
            u[:, t0 : t0 + xs.shape[0], :r] = uc.transpose(0, 1).to(u.dtype)

        def make_proj_hook(idx: int, kinds: tuple):
            """Pre-hook on a projection feeding K and/or V: ``u = x·Aᵀ`` for its adapters. A fused qkv_proj has one
            ``A`` for K and V, so one ``u`` serves both residuals."""
            cap = captures[idx]

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
                        setattr(cap, name, u_buffer(lora, x))
                    write_u(lora, getattr(cap, name), x)

            return hook

        def make_k_out_hook(idx: int, out_slice):
            cap = captures[idx]

            def hook(module, args, output):
                if offset[0] == 0 and cap.k_out_head is None:
                    out = output[0, :8] if out_slice is None else output[0, :8, out_slice[0] : out_slice[1]]
                    cap.k_out_head = out.detach().clone()

            return hook

        def make_attn_hook(idx: int):
            cap = captures[idx]

            def hook(module, args, kwargs):
                pe = kwargs.get("position_embeddings")
                if pe is None and len(args) > 1:
                    pe = args[1]
                if pe is None:
                    raise ValueError(
                        f"layer {idx}: the attention module got no position_embeddings; ForkKV needs a RoPE model "
                        "that passes (cos, sin) to its attention (Llama, Mistral, Qwen2)"
                    )
                cos, sin = pe
                if cap.rope_group is None:  # first chunk: join the group whose table holds the same values
                    n = cos.shape[-2]
                    cap.rope_group = next(
                        (g for g, (c, s_) in rope_buffers.items() if c.device == cos.device and c.dtype == cos.dtype
                         and c.shape[-1] == cos.shape[-1] and torch.equal(c[:n], cos[0]) and torch.equal(s_[:n], sin[0])),
                        None)
                if cap.rope_group is None:
                    g = cap.rope_group = len(rope_buffers)
                    D = cos.shape[-1]
                    rope_buffers[g] = (
                        torch.empty(T, D, dtype=cos.dtype, device=cos.device),
                        torch.empty(T, D, dtype=sin.dtype, device=sin.device),
                    )
                    cap.writes_rope = True
                g = cap.rope_group
                if cap.writes_rope:
                    t0 = offset[0]
                    rope_buffers[g][0][t0 : t0 + cos.shape[-2]] = cos[0]
                    rope_buffers[g][1][t0 : t0 + sin.shape[-2]] = sin[0]

            return hook

        handles = []
        try:
            for idx, attn in attn_modules.items():
                proj = projections[idx]
                handles.append(attn.register_forward_pre_hook(make_attn_hook(idx), with_kwargs=True))
                if proj.fused:
                    handles.append(proj.k[0].register_forward_pre_hook(make_proj_hook(idx, ("k", "v"))))
                else:
                    handles.append(proj.k[0].register_forward_pre_hook(make_proj_hook(idx, ("k",))))
                    handles.append(proj.v[0].register_forward_pre_hook(make_proj_hook(idx, ("v",))))
                if captures[idx].k_lora is not None:
                    handles.append(proj.k[0].register_forward_hook(make_k_out_hook(idx, proj.k[1])))
            kv_cache = run_base_pass(model, base, ids, chunk_size, progress, offset, past)
        finally:
            for h in handles:
                h.remove()

        layers = []
        for idx in range(len(attn_modules)):
            cap = captures[idx]
            key, value = kv_cache.layers[idx].keys, kv_cache.layers[idx].values
            if key is None or key.shape[-2] != S + T:
                got = None if key is None else key.shape[-2]
                raise RuntimeError(f"layer {idx}: the base pass cached {got} tokens, expected {S + T}")
            key, value = key[:, :, S:], value[:, :, S:]  # a segment holds its own tokens only, not the past
            cos, sin = rope_buffers[cap.rope_group]
            k_res = _residual(cap.k_lora, cap.u_k)
            v_res = _residual(cap.v_lora, cap.u_v)
            if k_res is not None and cos.shape[-1] != key.shape[-1]:
                raise ValueError(
                    f"layer {idx} rotates only {cos.shape[-1]} of its {key.shape[-1]} head dimensions (partial "
                    "rotary); ForkKV's K residual assumes full rotate-half RoPE. Retarget the adapters away from the "
                    "K projection (LoRA on V is still shared)."
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
        del kv_cache
        return cls(
            layers=layers, token_ids=ids.detach().cpu(), adapters=adapters, config=config, model_id=id(base), start=S,
            identity=record_context(model, adapters) if record_identity else None,
        )

    # ------------------------------------------------------------------ adapters
    @torch.no_grad()
    def add_adapters(self, model: nn.Module, adapter_names, *, chunk_size: int | None = 4096,
                     progress: bool = True) -> SharedContext:
        """Compute the residuals of adapters this context was not built for (e.g. loaded later) and add them.

        One base pass over the context with hooks (no K/V kept), as :meth:`build` does for its adapters. Caches
        already forked keep working: existing adapters keep their slots. The base weights must be those the context
        was built from. Returns ``self``.
        """
        if self.start:
            raise ValueError("add_adapters works on a whole context (start 0), not on a continuation segment")
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names must be a list of adapter names, not the string {adapter_names!r}")
        with model_lock(model):
            new = [a for a in dict.fromkeys(adapter_names) if a != BASE_ADAPTER and a not in self.adapters]
            if not new:
                return self
            self.check_weights(model, [])  # the new residuals must read the base this context's K/V came from
            seg = type(self).build_continuation(model, self.token_ids, new, keep_kv=False, chunk_size=chunk_size,
                                                progress=progress)
            self._merge(seg)
        return self

    def _merge(self, seg: SharedContext) -> None:
        for layer, extra in zip(self.layers, seg.layers):
            layer.k_res = _merge_residuals(layer.k_res, extra.k_res)
            if extra.v_res is not None and extra.k_res is not None and extra.v_res.u is extra.k_res.u:
                layer.v_res = _merge_residuals(layer.v_res, extra.v_res, share_u_with=layer.k_res)
            else:
                layer.v_res = _merge_residuals(layer.v_res, extra.v_res)
        if self.identity is not None and seg.identity is not None:
            self.identity.adapters.update(seg.identity.adapters)
        self.adapters = self.adapters + seg.adapters

    def check_weights(self, model: nn.Module, adapter_names=None) -> None:
        """Raise :class:`~forkkv_hf.identity.StaleContextError` (what changed, what to do) unless ``model``'s base
        weights and the K/V LoRA factors of ``adapter_names`` (default: all of this context's adapters) are the
        ones this context was computed from: serving it would be silently wrong. Cheap or by content, see
        :mod:`forkkv_hf.identity`. A context loaded from a file is bound to ``model`` by its first successful check."""
        if self.identity is None:
            raise ValueError("this SharedContext records no weight identity (a store-internal segment); fork caches "
                             "from SharedContext.build or ForkKVStore.fork")
        names = self.adapters if adapter_names is None else [a for a in adapter_names if a in self.adapters]
        check_context(self.identity, model, names)
        if self.layers and self.layers[0].source is None:
            self._bind(model)

    def _bind(self, model: nn.Module) -> None:
        """Tie an unpickled context to ``model`` (whose weights were just found to be the recorded ones)."""
        attention = find_attention_modules(model)
        if len(attention) != len(self.layers):
            raise ValueError(f"this shared context has {len(self.layers)} layers but the model has {len(attention)}; "
                             "build a new SharedContext with this model")
        base = transformers_model(model)
        for idx, layer in enumerate(self.layers):
            layer.source = weakref.ref(attention[idx])
        self.config, self.model_id = base.config, id(base)

    # ------------------------------------------------------------------ use
    def fork(self, adapter_names, residual: str = "kv"):
        """A :class:`~forkkv_hf.cache.ForkKVCache` whose row ``i`` is agent ``adapter_names[i]`` (``"__base__"`` for
        the base model). Rows may repeat an agent; they then share its residual. ``residual``: ``"kv"`` (default),
        ``"v"`` or ``"none"``, see :class:`~forkkv_hf.cache.ForkKVCache`."""
        from .cache import ForkKVCache

        if self.start:
            raise ValueError(
                f"this SharedContext is a segment starting at position {self.start} (made by build_continuation); "
                "concatenate it with the segments before it, or use forkkv_hf.ForkKVStore, which does that"
            )

        return ForkKVCache(self, adapter_names, residual=residual)

    @property
    def num_tokens(self) -> int:
        return self.token_ids.numel()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def base_bytes(self) -> int:
        """Bytes of the shared bCache (K and V of every layer, held once)."""
        return sum(_nbytes(l.key) + _nbytes(l.value) for l in self.layers)

    def rope_bytes(self) -> int:
        seen, total = set(), 0
        for l in self.layers:
            for t in (l.cos, l.sin):
                if t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += _nbytes(t)
        return total

    def residual_bytes(self, adapter: str, kinds: str = "kv") -> int:
        """Bytes of one adapter's rCache (its ``u`` over all layers; ``0`` for adapters without k/v LoRA).
        ``kinds``: count the K residuals (``"k"``), the V residuals (``"v"``) or both (``"kv"``)."""
        total, seen = 0, set()
        for l in self.layers:
            for kind, res in (("k", l.k_res), ("v", l.v_res)):
                if kind in kinds and res is not None and adapter in res.adapters and res.u.data_ptr() not in seen:
                    seen.add(res.u.data_ptr())  # a fused qkv_proj's K and V residuals share one u
                    total += _nbytes(res.u[0])
        return total

    def factor_bytes(self) -> int:
        """Bytes of the stacked, scaled ``B`` factors kept with the residuals."""
        return sum(_nbytes(res.B) for l in self.layers for res in (l.k_res, l.v_res) if res is not None)

    def __repr__(self) -> str:
        return (
            f"SharedContext(tokens={self.num_tokens}, layers={self.num_layers}, adapters={list(self.adapters)}, "
            f"base={self.base_bytes() / 2**20:.1f} MiB)"
        )


def _merge_residuals(old: Residual | None, new: Residual | None, share_u_with: Residual | None = None):
    """Stack the residuals of newly added adapters after the existing ones (slots of existing adapters unchanged;
    ranks zero-padded to the larger)."""
    if new is None:
        return old
    if old is None:
        return new
    r = max(old.rank, new.rank)
    pad = lambda t: torch.nn.functional.pad(t, (0, r - t.shape[-1]))  # noqa: E731
    u = share_u_with.u if share_u_with is not None else torch.cat([pad(old.u), pad(new.u)], dim=0)
    return Residual(old.adapters + new.adapters, u, torch.cat([pad(old.B), pad(new.B)], dim=0), old.ranks + new.ranks)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _residual(lora: ProjectionLoRA | None, u: torch.Tensor | None) -> Residual | None:
    if lora is None:
        return None
    if u is None:
        raise RuntimeError("the base pass did not reach a LoRA projection's input hook")
    return Residual(lora.adapters, u, lora.B.to(u.device), lora.ranks)
