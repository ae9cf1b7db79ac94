"""The data of a shared context: per layer the base K/V, RoPE tables and residual stacks every fork reads and nobody
writes (:class:`SharedLayer`, :class:`Residual`), what ties them to a model (:class:`ContextLayout`), and their bytes.

Plain data: :mod:`forkkv_hf.cache` and :mod:`forkkv_hf.store` read these types without the base pass that makes them
(:mod:`forkkv_hf.context.base_pass`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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

    def __getstate__(self):
        # what the kernels' adapter memoises on a residual (forkkv_hf.ops.dispatch: its fp16 range check and fp16 B)
        # is derived, not data: not pickled
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


@dataclass
class SharedLayer:
    """Everything one layer of every fork reads and nobody writes.

    ``key``/``value``: ``[1, H_kv, T, D]`` as the base model caches them (``key`` after RoPE); ``cos``/``sin``:
    ``[T, D]`` of the context positions; ``k_res``/``v_res``: the adapters' residuals (``None``: no adapter has LoRA
    on that projection).
    """

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


@dataclass(frozen=True)
class ContextLayout:
    """What ties a context's layers to a model besides their tensors: the model's ``config``, the ``id`` of the
    transformers model, per layer the attention module (``sources``, weakrefs) and its sliding window. A
    :class:`~forkkv_hf.store.ForkKVStore` keeps one per base tree to assemble contexts from node tensors
    (:meth:`~forkkv_hf.context.SharedContext.from_tensors`)."""

    config: object = field(repr=False)
    model_id: int
    sources: tuple = field(repr=False)
    sliding_windows: tuple[int | None, ...]

    @property
    def num_layers(self) -> int:
        return len(self.sources)


def merge_residuals(old: Residual | None, new: Residual | None, share_u_with: Residual | None = None):
    """Stack the residuals of newly added adapters after the existing ones (slots of existing adapters unchanged;
    ranks zero-padded to the larger). ``share_u_with``: take ``u`` from this (already merged) residual, for a fused
    qkv_proj whose K and V residuals share one ``u``."""
    if new is None:
        return old
    if old is None:
        return new
    r = max(old.rank, new.rank)
    pad = lambda t: torch.nn.functional.pad(t, (0, r - t.shape[-1]))  # noqa: E731
    u = share_u_with.u if share_u_with is not None else torch.cat([pad(old.u), pad(new.u)], dim=0)
    return Residual(old.adapters + new.adapters, u, torch.cat([pad(old.B), pad(new.B)], dim=0), old.ranks + new.ranks)


# ------------------------------------------------------------------------------------------------------ bytes
def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def base_bytes(layers: list[SharedLayer]) -> int:
    """Bytes of the shared bCache (K and V of every layer, held once)."""
    return sum(nbytes(l.key) + nbytes(l.value) for l in layers)


def rope_bytes(layers: list[SharedLayer]) -> int:
    """Bytes of the RoPE tables (a table shared by several layers counts once)."""
    seen, total = set(), 0
    for l in layers:
        for t in (l.cos, l.sin):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += nbytes(t)
    return total


def residual_bytes(layers: list[SharedLayer], adapter: str, kinds: str = "kv") -> int:
    """Bytes of one adapter's rCache (its ``u`` over all layers; ``0`` for adapters without k/v LoRA).
    ``kinds``: count the K residuals (``"k"``), the V residuals (``"v"``) or both (``"kv"``)."""
    total, seen = 0, set()
    for l in layers:
        for kind, res in (("k", l.k_res), ("v", l.v_res)):
            if kind in kinds and res is not None and adapter in res.adapters and res.u.data_ptr() not in seen:
                seen.add(res.u.data_ptr())  # a fused qkv_proj's K and V residuals share one u
                total += nbytes(res.u[0])
    return total


def factor_bytes(layers: list[SharedLayer], kinds: str = "kv", adapters=None) -> int:
    """Bytes of the stacked, scaled ``B`` factors kept with the residuals of ``kinds`` (as :func:`residual_bytes`),
    of ``adapters`` only where given (their slots of the stacks, as :func:`residual_bytes` counts their ``u``)."""
    total = 0
    for l in layers:
        for kind, res in (("k", l.k_res), ("v", l.v_res)):
            if kind in kinds and res is not None:
                n = res.B.shape[0] if adapters is None else sum(1 for a in set(adapters) if a in res.adapters)
                total += n * nbytes(res.B[0])
    return total


def unique_tensors(tensors) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in tensors:
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one storage count once)."""
    seen, total = set(), 0
    for t in unique_tensors(tensors):
        st = t.untyped_storage()
        key = (t.device, st.data_ptr())
        if st.nbytes() and key not in seen:
            seen.add(key)
            total += st.nbytes()
    return total
