"""The shared part of a ForkKV cache: one base-model pass over a context, kept once, forked by many agents.

``SharedContext.build`` runs the base model (adapters disabled) over the context once. It keeps, per layer,
- the bCache: ``key``/``value`` ``[1, H_kv, T, D]`` exactly as the base model caches them (``key`` after RoPE);
- the rCache: for every forked adapter with LoRA on ``k_proj``/``v_proj``, ``u = x Aᵀ`` ``[T, r]`` computed by hooks
  from the projections' input ``x`` during that same pass (nothing ``d_model``-wide is kept), with the scaled ``B``;
- ``cos``/``sin`` ``[T, D]`` of the context positions, to rotate the K residual after ``B`` is applied.

``SharedContext.fork(adapter_names)`` then gives a :class:`~forkkv_hf.cache.ForkKVCache` for a batch whose row ``i``
is agent ``adapter_names[i]``; any number of caches can be forked, nothing shared is copied or ever written again.
The context sits below the cache and names no cache class: :mod:`forkkv_hf.cache` registers the class ``fork``
builds when it is imported (:func:`register_fork`), which importing ``forkkv_hf`` does.

``SharedContext.build_continuation`` is the same base pass over tokens that continue an already computed context
(its base K/V given as ``past``): the building block of :class:`~forkkv_hf.store.ForkKVStore`, which keeps context
segments in radix trees and computes only what is missing.

A context records what it was computed from (:mod:`forkkv_hf.context.identity`); ``generate`` refuses it once the
model's base weights or its rows' K/V LoRA factors differ. Builds hold the model's lock (:mod:`forkkv_hf.model_lock`);
``fork`` only reads, from any thread. ``pickle``/``torch.save`` work; a loaded context is usable with any model
whose weights are the recorded ones (checked by content at its first generate).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..inputs import context_token_ids, vocab_size_of
from ..peft.lora_factors import (
    BASE_ADAPTER,
    available_adapters,
    check_adapter_names,
    find_attention_modules,
    transformers_model,
)
from ..model_lock import calls_in_flight, model_lock
from ..peft.wrappers import remove_stale_peft_hooks
from .base_pass import check_chunk_size, check_past_layout, past_length, segment_layers
from .identity import ContextIdentity, check_context, record_adapters, record_context
from .segments import ContextLayout, SharedLayer, base_bytes, factor_bytes, merge_residuals, residual_bytes, rope_bytes

#: what :meth:`SharedContext.fork` builds, ``(context, adapter_names, residual=...) -> cache``; registered by
#: :mod:`forkkv_hf.cache` (above this module) when it is imported
_fork_factory: Callable | None = None


def register_fork(factory: Callable) -> None:
    """Make ``factory(context, adapter_names, residual=...)`` the cache :meth:`SharedContext.fork` returns."""
    global _fork_factory
    _fork_factory = factory


def _refuse_media_tokens(model: nn.Module, ids: torch.Tensor) -> None:
    """A multimodal model's image/video/audio placeholders in a context: its pass runs on token ids alone (transformers
    failed inside with "image features and image tokens do not match")."""
    cfg = getattr(transformers_model(model), "config", None)
    for name in ("image_token_id", "image_token_index", "video_token_id", "audio_token_id"):
        tok = getattr(cfg, name, None)
        if isinstance(tok, int) and bool((ids == tok).any()):
            raise ValueError(f"the context holds {name.rsplit('_', 2)[0]} placeholder tokens ({name}={tok}): a shared "
                             "context is computed from token ids alone; put images, video and audio in the prompts")


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
    #: what the base K/V and residuals were computed from (:mod:`forkkv_hf.context.identity`); checked before each
    #: generate
    identity: ContextIdentity | None = field(default=None, repr=False)
    #: per fitted agent (:meth:`fit_residuals`), per kind (``"k"``, ``"v"``), per layer: the share of the squared
    #: drift ``‖own − base‖²`` its rank-r fit keeps (1.0: exact)
    fit_retained: dict = field(default_factory=dict, repr=False)

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
        (:mod:`forkkv_hf.context.identity`): a generate after they change is refused.
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
        if calls_in_flight(model):  # its PEFT hooks would be removed under it (its rows then ran one adapter)
            raise ValueError("a shared context (or a ForkKVStore call) cannot run inside a running generate or forward "
                             "of the same model (a logits processor, a stopping criterion, a hook); run it before or "
                             "after the call")
        remove_stale_peft_hooks(model)  # left by an earlier call that raised; they would break the base pass
        ids = context_token_ids(context_ids, vocab_size_of(model))
        _refuse_media_tokens(model, ids)
        past = None if past is None else list(past)  # (a generator was used up by its first reading)
        base = transformers_model(model)
        S = past_length(past, base)
        check_past_layout(past, model)
        if adapter_names is None:
            adapter_names = available_adapters(model)
        adapters = tuple(dict.fromkeys(a for a in check_adapter_names(model, adapter_names) if a != BASE_ADAPTER))
        layers = segment_layers(model, base, ids, adapters, past, chunk_size=chunk_size, progress=progress,
                                keep_kv=keep_kv)
        return cls(
            layers=layers, token_ids=ids.detach().cpu(), adapters=adapters, config=base.config, model_id=id(base),
            start=S, identity=record_context(model, adapters) if record_identity else None,
        )

    @classmethod
    def from_tensors(cls, layout: ContextLayout, kv: list[tuple], residuals: list[tuple], token_ids: torch.Tensor,
                     adapters, identity: ContextIdentity | None) -> SharedContext:
        """A whole context (start 0) over tensors computed before, e.g. by a :class:`~forkkv_hf.store.ForkKVStore`
        from the nodes of its radix trees. ``layout``: the model it belongs to (:meth:`layout` of a context built
        with it). Per layer ``l``: ``kv[l] = (key, value, cos, sin)`` (``[1, H_kv, T, D]``, ``[T, D]``) and
        ``residuals[l] = (k_res, v_res)`` (:class:`~forkkv_hf.context.segments.Residual` or ``None``).
        ``token_ids``: ``[T]``. ``identity``: what the tensors were computed from (``None``: not checkable)."""
        if not (len(kv) == len(residuals) == layout.num_layers):
            raise ValueError(f"give one (key, value, cos, sin) and one (k_res, v_res) per layer of the layout "
                             f"({layout.num_layers}), got {len(kv)} and {len(residuals)}")
        T = token_ids.numel()
        for idx, ((k, v, c, s), pair) in enumerate(zip(kv, residuals)):  # one length, or a bare error deep inside
            lengths = {"key": k.shape[-2], "value": v.shape[-2], "cos": c.shape[0], "sin": s.shape[0],
                       **{f"{kind}_res.u": res.u.shape[1] for kind, res in zip("kv", pair) if res is not None}}
            if any(n != T for n in lengths.values()):
                raise ValueError(f"layer {idx}: the tensors cover {lengths} tokens, token_ids {T}; give every "
                                 "tensor over the same tokens")
        layers = [
            SharedLayer(k, v, c, s, k_res, v_res, source=source, sliding_window=window)
            for (k, v, c, s), (k_res, v_res), source, window
            in zip(kv, residuals, layout.sources, layout.sliding_windows)
        ]
        return cls(layers=layers, token_ids=token_ids, adapters=tuple(adapters), config=layout.config,
                   model_id=layout.model_id, start=0, identity=identity)

    def layout(self) -> ContextLayout:
        """What ties this context to its model besides its tensors (a
        :class:`~forkkv_hf.context.segments.ContextLayout`)."""
        return ContextLayout(self.config, self.model_id, tuple(l.source for l in self.layers),
                             tuple(l.sliding_window for l in self.layers))

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

    def fit_residuals(self, model: nn.Module, adapter_names, rank: int = 16, *, k_rank: int | None = None,
                      chunk_size: int | None = 4096, progress: bool = True) -> SharedContext:
        """A new context whose agents ``adapter_names`` read residuals fitted to their own pass over the context.

        Runs each agent's own forward over the context once (the plain path's prefill compute; one agent's full
        K/V alive at a time) and keeps per layer and kind the best rank-``rank`` approximation of its K/V minus the
        base K/V (:mod:`forkkv_hf.context.fitted`): far more faithful than ForkKV's ``x_base·Aᵀ`` for agents whose
        LoRA on q/o/MLP shapes the context's later layers, at the memory of a rank-``rank`` residual; exact at
        ``rank = H_kv·D``; :attr:`fit_retained` says, per agent, kind and layer, the share of the drift the fit
        keeps (a guide to the rank). Agents with no K/V LoRA get one too. The new context shares this one's base
        K/V (nothing is copied); this one and the caches forked from it are unchanged. A generate with it is
        refused once any LoRA weight of a fitted agent changes. Works on a whole context (start 0) built by
        :meth:`build`. ``k_rank``: the K residual's rank where it differs from ``rank`` (V's): the attention's K
        pass costs in proportion to it, the V residual far less.
        """
        from .fitted import fit_residuals, without

        if self.start:
            raise ValueError("fit_residuals works on a whole context (start 0), not on a continuation segment")
        if self.identity is None:
            raise ValueError("this SharedContext records no weight identity (a store-internal segment); fit "
                             "residuals on a context from SharedContext.build")
        with model_lock(model):
            self.check_weights(model, [])  # the drift is measured against this context's base K/V
            fitted, retained = fit_residuals(self, model, adapter_names, rank, k_rank=k_rank, chunk_size=chunk_size,
                                             progress=progress)
            names = fitted[0][0].adapters
            layers = [
                SharedLayer(l.key, l.value, l.cos, l.sin, merge_residuals(without(l.k_res, names), k),
                            merge_residuals(without(l.v_res, names), v), source=l.source,
                            sliding_window=l.sliding_window)
                for l, (k, v) in zip(self.layers, fitted)
            ]
            adapters = tuple(a for a in self.adapters if a not in names) + names
            old = self.identity  # the base was just checked: only the fitted agents' records are new
            records = record_adapters(model, names, fitted=names)
            identity = ContextIdentity(old.base, {**{a: r for a, r in old.adapters.items() if a not in names},
                                                  **records}, old.fitted | frozenset(names), old.settings)
        kept = {a: r for a, r in getattr(self, "fit_retained", {}).items() if a not in names}
        return type(self)(layers=layers, token_ids=self.token_ids, adapters=adapters, config=self.config,
                          model_id=self.model_id, start=0, identity=identity, fit_retained={**kept, **retained})

    @property
    def fitted_adapters(self) -> tuple[str, ...]:
        """The agents whose residuals were fitted to their own pass (:meth:`fit_residuals`)."""
        fitted = self.identity.fitted if self.identity is not None else frozenset()
        return tuple(a for a in self.adapters if a in fitted)

    def _merge(self, seg: SharedContext) -> None:
        for layer, extra in zip(self.layers, seg.layers):
            # a fused qkv_proj's K and V residuals share one u: merged, they keep sharing it only where the existing
            # ones did too (fitted residuals have a u per kind: sharing K's gave V the K fit's u, silently)
            fused = extra.v_res is not None and extra.k_res is not None and extra.v_res.u is extra.k_res.u
            shared = fused and (layer.k_res is None) == (layer.v_res is None) and (
                layer.k_res is None or layer.v_res.u is layer.k_res.u)
            layer.k_res = merge_residuals(layer.k_res, extra.k_res)
            layer.v_res = merge_residuals(layer.v_res, extra.v_res, share_u_with=layer.k_res if shared else None)
        if self.identity is not None and seg.identity is not None:
            self.identity.adapters.update(seg.identity.adapters)
        self.adapters = self.adapters + seg.adapters

    def check_weights(self, model: nn.Module, adapter_names=None) -> None:
        """Raise :class:`~forkkv_hf.context.identity.StaleContextError` (what changed, what to do) unless
        ``model``'s base weights and the K/V LoRA factors of ``adapter_names`` (default: all of this context's
        adapters) are the ones this context was computed from: serving it would be silently wrong. Cheap or by
        content, see :mod:`forkkv_hf.context.identity`. A context loaded from a file is bound to ``model`` by its
        first successful check."""
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
        if _fork_factory is None:
            raise RuntimeError("no cache class is registered to fork into; import forkkv_hf (its cache module "
                               "registers ForkKVCache) before forking a SharedContext")
        return _fork_factory(self, adapter_names, residual=residual)

    @property
    def num_tokens(self) -> int:
        return self.token_ids.numel()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def base_bytes(self) -> int:
        """Bytes of the shared bCache (K and V of every layer, held once)."""
        return base_bytes(self.layers)

    def rope_bytes(self) -> int:
        """Bytes of the RoPE tables (a table shared by several layers counts once)."""
        return rope_bytes(self.layers)

    def residual_bytes(self, adapter: str, kinds: str = "kv") -> int:
        """Bytes of one adapter's rCache (its ``u`` over all layers; ``0`` for adapters without k/v LoRA).
        ``kinds``: count the K residuals (``"k"``), the V residuals (``"v"``) or both (``"kv"``)."""
        return residual_bytes(self.layers, adapter, kinds)

    def factor_bytes(self, kinds: str = "kv", adapters=None) -> int:
        """Bytes of the stacked, scaled ``B`` factors kept with the residuals of ``kinds`` (as
        :meth:`residual_bytes`), of ``adapters`` only where given."""
        return factor_bytes(self.layers, kinds, adapters)

    def __repr__(self) -> str:
        return (
            f"SharedContext(tokens={self.num_tokens}, layers={self.num_layers}, adapters={list(self.adapters)}, "
            f"base={self.base_bytes() / 2**20:.1f} MiB)"
        )
