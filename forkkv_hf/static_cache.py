"""The static layout of a :class:`~forkkv_hf.cache.ForkKVCache`: what makes its decode step compileable.

transformers' ``StaticLayer`` is the template. A cache switched to this layout (:func:`make_static`, done by the
``generate`` wrapper when the call's decode step will be compiled, :mod:`forkkv_hf.compile_policy`) keeps per layer

- the private K/V in buffers ``[B, H_kv, capacity, D]`` allocated at the first ``update`` (the prefill, eager) and
  written in place (``index_copy_`` at a device-side length), so shapes and addresses stay fixed across steps;
- the private length as a 0-dim device tensor (``get_seq_length`` returns ``T + length``, like ``StaticLayer``), and
  mask sizes fixed at ``T + capacity``: positions not yet written are masked by causality;
- the row-to-agent mapping as device tensors built from the rows before the step (``agents`` for the PyTorch path,
  ``work`` for the Triton kernels: the family the eager dispatch picks and its row plan), handed to the attention in
  a :class:`StaticForkKVView`.

The token ids each row appended (what ``check_generate_inputs`` compares a continuation with) also live in a buffer
written in place. Buffers are ``torch._dynamo.mark_static_address``-ed (CUDA graphs read and write them where they
are) and pooled per attention module: the next cache of the same shape gets the same buffers, so a second
``generate`` replays the captured graphs instead of recording new ones; a shorter call takes a longer one's buffers
while they hold at most twice the room it needs (:func:`pooled_capacity`). A cache that still uses pooled buffers when
another takes them over keeps a copy of its content. :func:`free_static_buffers` drops a model's pool.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from .cache import ForkKVCache, ForkKVLayer, ForkKVView
from .config import get_config
from .memo import memoized
from .ops.decode_ops import AttentionDecodePlan, plan_decode_attention
from .ops.dispatch import BatchAgents, batch_agents

_POOL = "_forkkv_static_buffers"


@dataclass
class StaticForkKVView(ForkKVView):
    """A :class:`~forkkv_hf.cache.ForkKVView` over a static layer: ``key``/``value`` are the whole buffers
    ``[B, H_kv, capacity, D]``; ``length`` (0-dim) counts the private tokens written, this update's included;
    ``agents``/``work`` are the row plans for the PyTorch path and the Triton kernels (``work`` ``None``: PyTorch)."""

    length: torch.Tensor | None = None
    agents: BatchAgents | None = None
    work: AttentionDecodePlan | None = None
    static = True  # what the attention function dispatches on (a class attribute, not a field)


@memoized(maxsize=256)
def row_tensor(slots: tuple, device: str) -> torch.Tensor:
    """``[B]`` long: the rows' residual slots (memoised: the same rows give the same tensor)."""
    return torch.tensor(slots, dtype=torch.long, device=device)


def _mark_static(t: torch.Tensor) -> torch.Tensor:
    if not torch.compiler.is_compiling():  # not allowed while tracing; buffers are made before the step
        torch._dynamo.mark_static_address(t)
    return t


def _lease(holder, name: str, owner, attr: str, shape: tuple, dtype, device) -> torch.Tensor:
    """A tensor for ``owner.<attr>``: ``holder``'s pooled one of that name if it has this shape (its old content:
    positions not written yet are masked), else a new zero one that replaces it in the pool. A previous owner still
    using the pooled tensor gets a copy."""
    pool = holder.__dict__.setdefault(_POOL, {})
    key = (tuple(shape), dtype, str(device))
    entry = pool.get(name)
    if entry is not None and entry[0] == key:
        t, prev = entry[1], entry[2]()
        if prev is not None and prev is not owner and getattr(prev, attr, None) is t:
            setattr(prev, attr, _mark_static(t.clone()))
    else:
        t = _mark_static(torch.zeros(shape, dtype=dtype, device=device))
    pool[name] = (key, t, weakref.ref(owner))
    return t


def _holder(shared):
    """Where a layer's static buffers are pooled: its attention module (the shared layer's ``source``), else the
    shared layer itself."""
    src = shared.source() if shared.source is not None else None
    return src if src is not None else shared


def pooled_capacity(cache: ForkKVCache) -> int:
    """The private capacity of the static buffers pooled for ``cache``'s first layer if they fit its rows (their
    number, KV heads, head size, dtype and device), else 0. :func:`~forkkv_hf.compile_policy.prepare_generate` sizes a
    call so where that is at most twice the room it needs: a shorter call after a longer one keeps the longer one's
    buffers and captured graphs, where a smaller capacity would allocate new buffers that every switch between the
    two lengths records CUDA graphs for anew (v37: 212 recordings inside the timed calls of 8 / 104 new tokens)."""
    layer = cache.layers[0] if cache.layers else None
    if layer is None or getattr(layer, "shared", None) is None:
        return 0
    entry = _holder(layer.shared).__dict__.get(_POOL, {}).get("keys")
    if entry is None:
        return 0
    (B, Hkv, capacity, D), dtype, device = entry[0]
    key = layer.shared.key
    fits = (B, Hkv, D, dtype, device) == (len(layer.rows), key.shape[1], key.shape[-1], key.dtype, str(key.device))
    return capacity if fits else 0


def free_static_buffers(model) -> int:
    """Drop the pooled static buffers of ``model``'s attention modules (caches using them keep theirs); returns how
    many pools were dropped."""
    n = 0
    for module in model.modules():
        if module.__dict__.pop(_POOL, None) is not None:
            n += 1
    return n


class StaticForkKVLayer(ForkKVLayer):
    """A :class:`~forkkv_hf.cache.ForkKVLayer` whose private K/V live in fixed buffers (module docstring). Set up by
    :func:`make_static`; ``capacity`` private tokens per row, ``use_triton``
    whether the compiled step calls the Triton kernels (else the PyTorch path)."""

    is_compileable = True

    def _setup(self, capacity: int, use_triton: bool) -> None:
        held = (self.keys, self.values) if self.is_initialized else None
        self.capacity, self.use_triton = capacity, use_triton
        self.length = self.agents = self.work = None
        sh = self.shared  # read in place by CUDA graphs (a copy per replay would move the whole context)
        for t in (sh.key, sh.value, sh.cos, sh.sin, *(x for r in (sh.k_res, sh.v_res) if r is not None
                                                       for x in (r.u, r.B))):
            _mark_static(t)
        self._set_rows(self.rows)
        if held is not None:
            self._take_buffers(held[0].shape[0], held[0].shape[1], held[0].shape[-1], held[0].dtype,
                               held[0].device, held)

    def _holder(self):
        return _holder(self.shared)

    def _take_buffers(self, B, Hkv, D, dtype, device, held=None) -> None:
        holder = self._holder()
        shape = (B, Hkv, self.capacity, D)
        self.keys = _lease(holder, "keys", self, "keys", shape, dtype, device)
        self.values = _lease(holder, "values", self, "values", shape, dtype, device)
        self.length = _lease(holder, "length", self, "length", (), torch.long, device)
        P = 0 if held is None else held[0].shape[-2]
        if P > self.capacity:
            raise ValueError(f"the cache holds {P} private tokens per row, more than the capacity {self.capacity}")
        if held is not None:
            self.keys[:, :, :P].copy_(held[0])
            self.values[:, :, :P].copy_(held[1])
        self.length.fill_(P)

    # -- rows: device plans made on the host, before the step -----------------------------------------------------
    def _plan_inputs(self) -> tuple:
        cfg = get_config()
        return self.shared.k_res, self.shared.v_res, cfg.lowp_rope, cfg.f16_k_pass

    def plan_current(self) -> bool:
        """Whether the decode plan was made for the shared layer's residuals as they are (``add_adapters`` replaces
        them with wider stacks: a plan kept from before read the old ``B``, a kernel error or worse) and the kernels'
        precision settings as they are (``set_config(f16_k_pass=..., lowp_rope=...)`` between calls was ignored by
        a continued cache's compiled steps)."""
        made_for, now = self.__dict__.get("_plan_made_for"), self._plan_inputs()
        return made_for is not None and made_for[0] is now[0] and made_for[1] is now[1] and made_for[2:] == now[2:]

    def _set_rows(self, rows) -> None:
        rows = tuple(rows)
        if getattr(self, "agents", None) is not None and rows == self.rows and self.plan_current():
            return  # beam search reorders rows within groups of one agent: nothing to rebuild
        self._plan_made_for = self._plan_inputs()
        super()._set_rows(rows)
        dev = str(self.shared.key.device)
        if self.k_slots is not None:
            self.k_rows = row_tensor(self.k_slots, dev)
        if self.v_slots is not None:
            self.v_rows = row_tensor(self.v_slots, dev)
        self.agents = batch_agents(self.k_slots, self.v_slots, dev)
        self.work = plan_decode_attention(self.shared, self.k_slots, self.v_slots) if self.use_triton else None

    # -- CacheLayerMixin ---------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        B, Hkv, _, D = key_states.shape
        self._take_buffers(B, Hkv, D, key_states.dtype, key_states.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        if not torch.compiler.is_compiling():  # eager (the prefill): the batch and the room left
            B, used = key_states.shape[0], int(self.length)
            if B != self.keys.shape[0] or used + q > self.capacity:
                raise ValueError(
                    f"this ForkKVCache holds {self.keys.shape[0]} rows with room for {self.capacity} private tokens "
                    f"each ({used} used; sized by generate's max_new_tokens/max_length) and cannot take {B} rows of "
                    f"{q} more tokens; call cache.reset() before reusing it for another batch"
                )
        pos = torch.arange(q, device=self.keys.device) + self.length
        self.length.add_(q)
        self.keys.index_copy_(2, pos, key_states)
        self.values.index_copy_(2, pos, value_states)
        view = StaticForkKVView(
            self.shared, self.k_rows, self.v_rows, self.keys, self.values, self.rows, self.k_slots, self.v_slots,
            length=self.length, agents=self.agents, work=self.work,
        )
        return view, view

    def private_length(self) -> int:
        return 0 if self.length is None else int(self.length)

    def get_seq_length(self):
        """``T + length``: a device tensor once initialised (as ``StaticLayer``: no host sync, no recompile)."""
        if self.length is None:
            return self.shared.num_tokens
        return self.length + self.shared.num_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.shared.num_tokens + self.capacity, 0

    def get_max_length(self) -> int:
        return self.shared.num_tokens + self.capacity

    def get_max_cache_shape(self) -> int:  # transformers 5.17 still asks
        return self.get_max_length()

    def reset(self) -> None:
        super().reset()
        self.length = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            idx = beam_idx.to(self.keys.device)
            self.keys.copy_(self.keys.index_select(0, idx))
            self.values.copy_(self.values.index_select(0, idx))
            self._reindex_rows(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        if not self.is_initialized:
            return super().crop(tokens_to_remove)
        full = self.keys, self.values
        P = self.private_length()
        self.keys, self.values = full[0][..., :P, :], full[1][..., :P, :]  # the base class crops the held part
        try:
            super().crop(tokens_to_remove)
            keep = self.keys.shape[-2]
        finally:
            self.keys, self.values = full
        self.length.fill_(keep)

    def batch_repeat_interleave(self, repeats: int) -> None:
        _dynamic_layer(self)
        self.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        _dynamic_layer(self)
        self.batch_select_indices(indices)


class StaticForkKVCache(ForkKVCache):
    """A :class:`~forkkv_hf.cache.ForkKVCache` in the static layout (module docstring). ``capacity``: private tokens
    per row. Made by :func:`make_static`; :func:`make_dynamic` turns it back."""

    def prepare_forward(self, module, args: tuple, kwargs: dict):
        if self.__dict__.get("_generate_forwards") is None and not torch.compiler.is_compiling():
            x = kwargs.get("input_ids", args[0] if args else None)
            x = kwargs.get("inputs_embeds") if x is None else x
            # a direct forward that may pass what a compiled call left room for (whole rows counted whole): the
            # dynamic layout, which grows (it was refused, saying to reset the cache)
            if x is not None and self.layers[0].private_length() + x.shape[1] > self.capacity:
                make_dynamic(self)
                return ForkKVCache.prepare_forward(self, module, args, kwargs)
        return super().prepare_forward(module, args, kwargs)

    @property
    def private_ids(self) -> torch.Tensor | None:
        ids = self.__dict__.get("_ids")
        return None if ids is None else ids[:, : int(self._ids_len)]

    @private_ids.setter
    def private_ids(self, value: torch.Tensor | None) -> None:
        if value is None:
            self._ids = self._ids_len = None
            return
        B, P = value.shape
        if P > self.capacity:
            raise ValueError(f"{P} private tokens per row do not fit this cache's capacity of {self.capacity}")
        holder = self.layers[0]._holder()
        ids = _lease(holder, "ids", self, "_ids", (B, self.capacity), torch.long, value.device)
        n = _lease(holder, "ids_len", self, "_ids_len", (), torch.long, value.device)
        if value.data_ptr() != ids.data_ptr():  # not the buffer's own prefix (crop)
            ids[:, :P].copy_(value)
        n.fill_(P)
        self._ids, self._ids_len = ids, n

    def record_tokens(self, input_ids: torch.Tensor) -> None:
        if not torch.compiler.is_compiling():
            return super().record_tokens(input_ids)  # eager (the prefill), through the property above
        ids = input_ids.detach()
        pos = torch.arange(ids.shape[1], device=ids.device) + self._ids_len
        self._ids_len.add_(ids.shape[1])
        self._ids.index_copy_(1, pos, ids)

    def reorder_cache(self, beam_idx):
        Cache.reorder_cache(self, beam_idx)
        if self._ids is not None:
            self._ids.copy_(self._ids.index_select(0, beam_idx.to(self._ids.device)))

    def batch_repeat_interleave(self, repeats: int):
        make_dynamic(self).batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices):
        make_dynamic(self).batch_select_indices(indices)


def _static_layer(layer: ForkKVLayer, capacity: int, use_triton: bool) -> None:
    layer.__class__ = StaticForkKVLayer
    layer._setup(capacity, use_triton)


def _dynamic_layer(layer: ForkKVLayer) -> None:
    if not isinstance(layer, StaticForkKVLayer):
        return
    if layer.is_initialized:  # copies: the pooled buffers may go to another cache
        P = layer.private_length()
        layer.keys, layer.values = layer.keys[:, :, :P].clone(), layer.values[:, :, :P].clone()
    for attr in ("capacity", "use_triton", "length", "agents", "work", "_plan_made_for"):
        layer.__dict__.pop(attr, None)
    layer.__class__ = ForkKVLayer


def make_static(cache: ForkKVCache, capacity: int, use_triton: bool) -> ForkKVCache:
    """Switch ``cache`` (in place: the caller's object stays the one ``generate`` gets) to the static layout with
    room for ``capacity`` private tokens per row; what it already holds is copied over. ``use_triton``: the compiled
    step calls the Triton kernels. A static cache with enough room and the same
    settings is left as it is."""
    if isinstance(cache, StaticForkKVCache):
        layer = cache.layers[0]
        if capacity <= cache.capacity and use_triton == layer.use_triton and all(l.plan_current() for l in
                                                                                cache.layers):
            return cache
        make_dynamic(cache)
    ids = cache.__dict__.pop("private_ids", None)
    cache.__class__ = StaticForkKVCache
    cache.capacity = capacity
    cache._ids = cache._ids_len = None
    for layer in cache.layers:
        _static_layer(layer, capacity, use_triton)
    if ids is not None:
        cache.private_ids = ids
    return cache


def make_dynamic(cache: ForkKVCache) -> ForkKVCache:
    """Switch a static ``cache`` back to the default (dynamic, eager) layout, in place, keeping its content."""
    if not isinstance(cache, StaticForkKVCache):
        return cache
    ids = cache.private_ids
    ids = None if ids is None else ids.clone()
    for attr in ("_ids", "_ids_len", "capacity"):
        cache.__dict__.pop(attr, None)
    cache.__class__ = ForkKVCache
    cache.private_ids = ids
    for layer in cache.layers:
        _dynamic_layer(layer)
    return cache
