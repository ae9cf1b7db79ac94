"""``ForkKVCache``: a transformers ``Cache`` whose rows share one base copy of a context and keep rank-r residuals.

Per layer (:class:`ForkKVLayer`) it holds
- the :class:`~forkkv_hf.context.SharedLayer` (base K/V, residuals, cos/sin), read-only and shared by every
  cache forked from the same :class:`~forkkv_hf.context.SharedContext`;
- for each batch row, the slot of its agent in that layer's K and V residual stacks (``-1``: no residual);
- the private K/V of each row (``[B, H_kv, P, D]``: its prompt and generated tokens, exact, as in ``DynamicLayer``).

``update()`` appends to the private part and returns a :class:`ForkKVView` as both "key" and "value"; the ``"forkkv"``
attention function (:mod:`forkkv_hf.attention`) consumes it. The cache's sequence axis is
``[shared context (T) | private (P)]``, the same absolute positions the attention mask uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .compat import TRANSFORMERS_VERSION, crop_takes_length
from .cache_failures import FailedCalls
from .context import Residual, SharedContext, SharedLayer, register_fork
from .guards import check_forward_inputs, check_generate_inputs, embedded_ids
from .memory_report import MemoryReport
from .peft.adapter_probe import check_generate_rows, install_kv_probes
from .peft.lora_factors import BASE_ADAPTER


@dataclass
class ForkKVView:
    """What ``ForkKVLayer.update`` hands to the attention function for one layer.

    ``shared``: the layer's shared base/residual data. ``k_rows``/``v_rows``: ``[B]`` long tensors, the slot of each
    row in ``shared.k_res``/``shared.v_res`` (``-1``: the row has no residual there), ``None`` if the layer has no
    residual of that kind. ``key``/``value``: private K/V ``[B, H_kv, P, D]`` (P counts the tokens just appended).
    ``row_adapters``: the agent of each row. ``k_slots``/``v_slots``: the same slots as host tuples (kernels plan
    their work from them without a device sync). ``context_visible``: this forward's mask is known to show every row
    the whole shared context (a 2-D mask the forward checks refused otherwise, or generate's extension of one, or no
    mask), so the Triton kernels read a mask in the private part only. ``prepared``: :meth:`ForkKVCache.prepare_forward`
    checked this forward (the attention refuses a view it did not prepare: the "forkkv" attention selected without
    ``enable_forkkv``, whose hooks run the checks).
    """

    shared: SharedLayer
    k_rows: torch.Tensor | None
    v_rows: torch.Tensor | None
    key: torch.Tensor
    value: torch.Tensor
    row_adapters: tuple[str, ...]
    k_slots: tuple[int, ...] | None = None
    v_slots: tuple[int, ...] | None = None
    context_visible: bool = False
    prepared: bool = True

    @property
    def batch_size(self) -> int:
        return self.key.shape[0]

    @property
    def shared_len(self) -> int:
        return self.shared.num_tokens

    @property
    def private_len(self) -> int:
        return self.key.shape[-2]


def _slots(res: Residual | None, rows: tuple[str, ...]) -> list[int] | None:
    if res is None:
        return None
    slot = res.slot
    return [slot.get(a, -1) for a in rows]


class ForkKVLayer(CacheLayerMixin):
    """One layer of a :class:`ForkKVCache`: shared base + per-row residual slots + per-row private K/V."""

    is_compileable = False
    is_sliding = False
    is_croppable = True
    context_visible = False  # this forward's ForkKVView.context_visible, set by ForkKVCache.prepare_forward
    prepared = False  # ForkKVCache.prepare_forward checked this forward (taken by the update of the layer)

    def __init__(self, shared: SharedLayer, rows: tuple[str, ...], residual: str = "kv"):
        super().__init__()
        self.shared = shared
        self.residual = residual
        self._fork_rows = rows
        self._set_rows(rows)

    # -- rows --------------------------------------------------------------------------------------------------
    def _set_rows(self, rows: tuple[str, ...]) -> None:
        self.rows = tuple(rows)
        dev = self.shared.key.device
        k = _slots(self.shared.k_res, self.rows) if "k" in self.residual else None
        v = _slots(self.shared.v_res, self.rows) if "v" in self.residual else None
        self.k_slots = None if k is None else tuple(k)
        self.v_slots = None if v is None else tuple(v)
        self.k_rows = None if k is None else torch.tensor(k, dtype=torch.long, device=dev)
        self.v_rows = None if v is None else torch.tensor(v, dtype=torch.long, device=dev)

    def _reindex_rows(self, index: torch.Tensor) -> None:
        idx = index.detach().cpu().tolist()
        self._set_rows(tuple(self.rows[i] for i in idx))

    # -- CacheLayerMixin ---------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        base = self.shared.key
        if key_states.dtype != base.dtype:
            raise TypeError(
                f"the model computes K/V in {key_states.dtype} but this ForkKVCache's shared context holds "
                f"{base.dtype}; build the shared context with the model in the dtype you generate with"
            )
        if key_states.device != base.device:
            raise ValueError(
                f"the model computes this layer on {key_states.device} but its shared context lives on "
                f"{base.device}; build the shared context after moving the model"
            )
        if key_states.shape[1] != base.shape[1] or key_states.shape[-1] != base.shape[-1]:
            raise ValueError(
                f"K/V heads {tuple(key_states.shape[1::2])} do not match the shared context's "
                f"{(base.shape[1], base.shape[-1])}: this cache was built for another model"
            )
        B = key_states.shape[0]
        if B != len(self.rows):
            if B % len(self.rows):
                raise ValueError(
                    f"the batch has {B} rows but this ForkKVCache was forked for {len(self.rows)} rows "
                    f"({list(self.rows)}); fork it with one adapter name per row"
                )
            # generate expands rows with repeat_interleave for num_beams / num_return_sequences
            k = B // len(self.rows)
            self._set_rows(tuple(a for a in self.rows for _ in range(k)))
        empty = key_states[:, :, :0]
        self.keys, self.values = empty, value_states[:, :, :0]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif key_states.shape[0] != self.keys.shape[0]:
            raise ValueError(
                f"the batch has {key_states.shape[0]} rows but this ForkKVCache holds {self.keys.shape[0]}; "
                "call cache.reset() before reusing it for another batch (to continue its rows with "
                "num_return_sequences or beams, cache.batch_repeat_interleave(k) first)"
            )
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        view = ForkKVView(self.shared, self.k_rows, self.v_rows, self.keys, self.values, self.rows, self.k_slots,
                          self.v_slots, self.context_visible, self.prepared)
        if not torch.compiler.is_compiling():
            self.prepared = False
        return view, view

    def private_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.shared.num_tokens + self.private_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # transformers 5.17 still asks
        return -1

    def reset(self) -> None:
        """Drop the private part and go back to the forked rows; the shared part is untouched."""
        self.keys = self.values = None
        self.is_initialized = False
        self._set_rows(self._fork_rows)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self.keys = self.keys.index_select(0, beam_idx.to(self.keys.device))
            self.values = self.values.index_select(0, beam_idx.to(self.values.device))
            self._reindex_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)
        self._set_rows(tuple(a for a in self.rows for _ in range(repeats)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.keys = self.keys[indices, ...]
            self.values = self.values[indices, ...]
        index = torch.arange(len(self.rows))[indices.cpu()] if isinstance(indices, torch.Tensor) else indices
        self._reindex_rows(torch.as_tensor(index).reshape(-1))

    def crop(self, tokens_to_remove: int) -> None:
        """Remove tokens from the end of the private part, as ``DynamicLayer.crop`` of the installed transformers
        does: ``n <= 0`` removes ``-n`` tokens (``0``: none); ``n > 0`` keeps the first ``n`` tokens of the whole
        sequence where transformers still takes that meaning (5.17) and is refused where it does not (5.24). The
        shared context cannot be cropped."""
        T, P = self.shared.num_tokens, self.private_length()
        if tokens_to_remove > 0 and not crop_takes_length():
            raise ValueError(
                f"crop({tokens_to_remove}): transformers {TRANSFORMERS_VERSION} takes only n <= 0 (remove -n tokens), "
                "as DynamicLayer.crop does"
            )
        keep = P + tokens_to_remove if tokens_to_remove <= 0 else min(P, tokens_to_remove - T)
        if keep < 0:
            raise ValueError(
                f"cannot crop into the shared context ({T} tokens, {P} private); fork a new cache from a shorter context"
            )
        if self.is_initialized and keep < P:
            self.keys = self.keys[..., :keep, :]
            self.values = self.values[..., :keep, :]

    def offload(self):  # the shared part is not ours to move
        if self.is_initialized:
            super().offload()

    def prefetch(self):  # back to the shared part's device (the base class reads a `device` this layer never set)
        if self.is_initialized and self.keys.device != self.shared.key.device:
            self.keys = self.keys.to(self.shared.key.device, non_blocking=True)
            self.values = self.values.to(self.shared.key.device, non_blocking=True)


class ForkKVCache(FailedCalls, Cache):
    """A cache for a batch of agents over one shared context. Row ``i`` is agent ``adapter_names[i]``.

    Build with :meth:`from_context` (one base pass, then fork) or ``SharedContext.build(...).fork(names)`` (to fork
    several caches from one base pass). Pass it to ``generate`` together with the same ``adapter_names``.

    ``residual``: which residuals the rows apply over the shared context: ``"kv"`` (ForkKV, the default), ``"v"``
    (V residual only, K from the base alone: cheaper, less faithful) or ``"none"`` (every agent reads the base model's
    K/V: what adapter-blind prefix caching does; for comparisons).
    """

    RESIDUAL_MODES = ("kv", "v", "none")

    def __init__(self, shared: SharedContext, adapter_names, residual: str = "kv"):
        if residual not in self.RESIDUAL_MODES:
            raise ValueError(f"residual must be one of {self.RESIDUAL_MODES}, got {residual!r}")
        self.residual = residual
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names must be a list with one name per row, not the string {adapter_names!r}")
        rows = tuple(adapter_names)
        if not rows:
            raise ValueError("fork at least one row")
        if shared.start:  # (ForkKVCache(segment, names) was served as if the segment were the whole context)
            raise ValueError(
                f"this SharedContext is a segment starting at position {shared.start} (made by build_continuation); "
                "concatenate it with the segments before it, or use forkkv_hf.ForkKVStore, which does that")
        missing = sorted({a for a in rows if a != BASE_ADAPTER and a not in shared.adapters})
        if missing:
            raise ValueError(
                f"adapter(s) {missing} have no residuals in this shared context (built for {list(shared.adapters)}); "
                f"compute them with shared.add_adapters(model, {missing}) (or build it with adapter_names that "
                "include them)"
            )
        for a in rows:
            if not isinstance(a, str):
                raise TypeError(f"adapter names must be strings, got {a!r}")
        self.shared = shared
        #: token ids each row appended after the shared context ([B, P], recorded at every forward), to tell a
        #: continuation of the same rows from a reuse with other inputs
        self.private_ids: torch.Tensor | None = None
        super().__init__(layers=[ForkKVLayer(layer, rows, residual) for layer in shared.layers])

    @classmethod
    def from_context(cls, model, context_ids, adapter_names, **build_kwargs) -> ForkKVCache:
        """One base-model pass over ``context_ids``, residuals for the distinct names in ``adapter_names``, and a
        cache whose row ``i`` is agent ``adapter_names[i]``. ``build_kwargs`` go to :meth:`SharedContext.build`."""
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names must be a list with one name per row, not the string {adapter_names!r}")
        names = list(adapter_names)
        shared = SharedContext.build(model, context_ids, list(dict.fromkeys(names)), **build_kwargs)
        return cls(shared, names)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx == 0 and self.shared.layers[0].source is None:
            raise ValueError(  # a loaded or copied context is bound at its first checked call: none ran
                "this ForkKVCache's shared context was loaded or copied and the forward that reads it ran none of "
                "ForkKV's checks; call forkkv_hf.enable_forkkv(model) before generating with it"
            )
        if layer_idx == 0 and self.shared.config._attn_implementation != "forkkv":
            raise ValueError(
                f"the model runs {self.shared.config._attn_implementation!r} attention, which cannot read a "
                "ForkKVCache; call forkkv_hf.enable_forkkv(model) before generating with it"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    # -- row-level bookkeeping mirrored from the layers ---------------------------------------------------------
    def record_tokens(self, input_ids: torch.Tensor) -> None:
        """Remember the tokens a forward appends (called by the hook :func:`forkkv_hf.enable_forkkv` installs)."""
        ids = input_ids.detach()
        if self.private_ids is None or self.private_ids.shape[0] != ids.shape[0]:
            if self.private_ids is not None and ids.shape[0] % self.private_ids.shape[0] == 0:
                self.private_ids = self.private_ids.repeat_interleave(ids.shape[0] // self.private_ids.shape[0], 0)
            else:
                self.private_ids = ids[:, :0]
        self.private_ids = torch.cat([self.private_ids.to(ids.device), ids], dim=1)

    def reset(self):
        super().reset()
        self.private_ids = None
        self.__dict__.pop("_rows_changed_by_failure", None)

    def reorder_cache(self, beam_idx):
        super().reorder_cache(beam_idx)
        if self.private_ids is not None:
            self.private_ids = self.private_ids.index_select(0, beam_idx.to(self.private_ids.device))

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        if self.private_ids is not None:
            self.private_ids = self.private_ids.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices):
        super().batch_select_indices(indices)
        if self.private_ids is not None:
            self.private_ids = self.private_ids[indices]

    def crop(self, tokens_to_remove: int):
        if tokens_to_remove == 0:  # removes nothing (every version); generate's deferred stop check calls it per step
            return
        super().crop(tokens_to_remove)
        if self.private_ids is not None:
            self.private_ids = self.private_ids[:, : self.layers[0].private_length()]

    def check_generate_inputs(self, model, input_ids, kwargs) -> None:
        """Refuse, before ``generate`` runs, every input this cache would silently serve wrong
        (:func:`forkkv_hf.guards.check_generate_inputs`: rows, masks, token ids, ``use_cache``, static caches,
        Activated LoRA) and a cache that does not fit the model: another instance, another dtype, adapters
        changed since their residuals were computed."""
        self.undo_failed_forward()
        self.check_whole()
        check_generate_inputs(self, model, input_ids, kwargs)
        from .peft.lora_factors import find_attention_modules, transformers_model

        model_dtype = getattr(transformers_model(model), "dtype", None)
        base_dtype = self.shared.layers[0].key.dtype
        if isinstance(model_dtype, torch.dtype) and model_dtype != base_dtype:
            raise TypeError(
                f"the model computes K/V in {model_dtype} but this ForkKVCache's shared context holds {base_dtype}; "
                "build the shared context with the model in the dtype you generate with"
            )
        src, attention = self.shared.layers[0].source, find_attention_modules(model)
        if src is not None and src() is not attention.get(0):
            raise ValueError("this ForkKVCache's shared context was built for another model instance; build a "
                             "SharedContext with the model you generate with")
        check_generate_rows(model, attention, kwargs.get("adapter_names"), input_ids.shape[0], self.adapter_names)
        self.shared.check_weights(model, list(dict.fromkeys(self.adapter_names)))
        self._weights_checked = True  # this call's prefill forward need not check again

    def prepare_forward(self, module, args: tuple, kwargs: dict):
        """Before each forward of ``module`` (the transformers model) that appends to this cache (the hook
        :func:`forkkv_hf.enable_forkkv` installs): refuse inputs it would serve wrong, cut whole rows to the new
        tokens (:func:`forkkv_hf.guards.check_forward_inputs`; generate's decode steps skip the checks that read
        tensor values), check the weights at the first forward of a fork not run by ``generate`` (which checks them
        at each call), record the tokens appended (all a traced forward does); returns new ``(args, kwargs)`` or None"""
        # the shared kernels skip a 2-D mask (checked below: one hiding context tokens is refused; decode steps extend
        # checked ones); a traced forward checks none (compiled generate steps pass context_visible themselves)
        compiling, mask = torch.compiler.is_compiling(), kwargs.get("attention_mask")
        for layer in self.layers:  # (prepared: once checked, below; a traced forward checks nothing)
            layer.context_visible = not compiling and (mask is None or torch.is_tensor(mask) and mask.dim() == 2)
            layer.prepared = compiling
        if compiling:
            ids = kwargs.get("input_ids", args[0] if args else None)
            return None if ids is None else self.record_tokens(ids)
        n = self.__dict__.get("_generate_forwards")  # set by the generate wrapper: after its first, decode steps
        if n is not None:
            self._generate_forwards = n + 1
        else:  # a direct forward: what an earlier one that raised appended is undone (generate's wrapper does so)
            self.undo_failed_forward()
        if not n:
            self.check_whole()
        changed = check_forward_inputs(self, module, args, kwargs, decode_step=bool(n))
        checked, self._weights_checked = getattr(self, "_weights_checked", False), False
        if not checked and not n and (self.layers[0].private_length() == 0 or self.shared.layers[0].source is None):
            # a direct forward on a fresh fork, or on a loaded / copied one its first model has not yet bound: its
            # context must match the weights, as generate checks each call
            self.shared.check_weights(module, list(dict.fromkeys(self.adapter_names)))
        if n is None:  # taken back by the model's forward hook when it returns (forkkv_hf.peft.wrappers)
            self._direct_mark = self.mark()
            install_kv_probes(module)  # the attention checks the rows its K/V LoRA layers run (added adapters too)
        run_args, run_kwargs = changed or (args, kwargs)
        ids = run_kwargs.get("input_ids", run_args[0] if run_args else None)
        ids = embedded_ids(self, run_kwargs.get("inputs_embeds"), n) if ids is None else ids
        if ids is not None:
            self.record_tokens(ids)
        for layer in self.layers:
            layer.prepared = True
        return changed

    def __getstate__(self):
        """``pickle``/``torch.save``: the shared context travels with the cache, a ForkKVStore's pin does not (a
        loaded cache belongs to no store). At its first generate the loaded context is checked against the model
        by content (:meth:`SharedContext.check_weights`)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_forkkv_store_lease", "_weights_checked")}

    @property
    def adapter_names(self) -> list[str]:
        """The agent of each row (after any expansion by ``generate``)."""
        return list(self.layers[0].rows)

    @property
    def num_shared_tokens(self) -> int:
        return self.shared.num_tokens

    def memory_report(self) -> MemoryReport:
        rows = self.adapter_names
        agents = [a for a in dict.fromkeys(rows) if a != BASE_ADAPTER]
        per_agent = {a: self.shared.residual_bytes(a, self.residual) for a in agents}
        P = self.layers[0].private_length()
        held = [l for l in self.layers if l.is_initialized]
        # the tokens' bytes, as a DynamicCache's below; a compiled decode's static buffers hold its capacity beside
        private = sum(l.keys[:, :, :1].numel() * P * l.keys.element_size() * 2 for l in held)
        buffers = sum(l.keys.numel() * l.keys.element_size() * 2 for l in held if getattr(l, "capacity", None))
        T = self.shared.num_tokens
        per_token_all_layers = sum(
            2 * l.shared.key.shape[1] * l.shared.key.shape[-1] * l.shared.key.element_size() for l in self.layers
        )
        return MemoryReport(
            rows=len(rows),
            agents=sum(1 for b in per_agent.values() if b > 0),
            shared_tokens=T,
            private_tokens=P,
            shared_base_bytes=self.shared.base_bytes(),
            residual_bytes=sum(per_agent.values()),
            residual_bytes_per_agent=per_agent,
            factor_bytes=self.shared.factor_bytes(self.residual, agents),  # the rows' agents', as their u
            rope_bytes=self.shared.rope_bytes(),
            private_bytes=private,
            static_buffer_bytes=buffers,
            dynamic_cache_bytes=len(rows) * (T + P) * per_token_all_layers,
        )

    def __repr__(self) -> str:
        return f"ForkKVCache(rows={self.adapter_names}, shared_tokens={self.num_shared_tokens}, private_tokens={self.layers[0].private_length()})"


register_fork(ForkKVCache)  # what SharedContext.fork builds (the context sits below this module)
