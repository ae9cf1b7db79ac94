"""``ForkKVStore``: the DualRadixTree store. Multi-turn agent workflows fork caches from a growing shared transcript
without prefilling it again and without one copy per agent.

Two kinds of radix trees over token ids hold the context in segments (a node = a span of tokens, the path from the
root spells the tokens before it):

- the **base tree** of the base model's identity: a node holds the bCache of its span, per layer ``key``/``value``
  ``[1, H_kv, n, D]`` (``key`` after RoPE) and ``cos``/``sin`` ``[n, D]``;
- one **residual tree** per (base identity, adapter identity): a node holds the rCache of its span for that adapter,
  per layer ``u_k``/``u_v`` ``[n, w]`` (``w`` = the adapter's rank, plus a column of ones if it has a LoRA bias);
  the tree's root holds the adapter's scaled ``B`` factors ``[H_kv·D, w]`` per layer.

Both are functions of the tokens up to the end of the span only (causal attention, one base-model pass), so a node
is valid for every context that starts with its path, whatever follows. An identity is a fingerprint of the weights
and config (:func:`~forkkv_hf.identity.base_fingerprint`, :func:`~forkkv_hf.identity.adapter_fingerprints`), never a
name: an adapter reloaded under the same name with other weights, or base weights written in any way (``.data``
included, in the default content mode), get other trees, so a stale segment is never served: it is recomputed.

``store.fork(token_ids, adapter_names)`` finds the longest cached prefix in each tree, runs the base model once over
what is missing (from the earliest position any tree misses, with the cached K/V before it as past; K/V are kept
only where the base tree misses them), inserts the new spans as nodes (splitting a node where a context diverges
inside it), pins the path's nodes (reference counts) and returns a :class:`~forkkv_hf.cache.ForkKVCache` over a
:class:`~forkkv_hf.shared_context.SharedContext` that reads them. The attention needs each layer contiguous along
the tokens, so a path of one node is read in place and a path of several nodes is concatenated once (a copy kept,
and counted, while caches read it; a path that is an unshared chain of unpinned nodes is merged into one node
instead, so later forks read it in place). Node tensors are never written after they are made: splits and merges
build new tensors; ``generate`` appends only to a cache's private per-row part (copy-on-write).

Unpinned nodes are evicted least-recently-used, leaves first, when the store holds more than ``max_bytes``. Bytes
are counted per distinct storage (a tensor held by a node and read in place by a cache counts once).
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .base_pass import check_chunk_size
from .cache import ForkKVCache
from .identity import ContextIdentity, adapter_fingerprints, adapter_records, base_fingerprint, kv_factors, weight_checks
from .lora_factors import BASE_ADAPTER, available_adapters, check_adapter_names, find_attention_modules
from .model_lock import model_lock
from .probes import Probes
from .shared_context import Residual, SharedContext, _as_context_ids

# ---------------------------------------------------------------------------------------------------------------------
# tensors of a segment: lists whose entries may repeat one tensor object (cos/sin shared by the layers of a RoPE
# group, one u for K and V of a fused qkv_proj); every operation keeps that sharing


def _token_axis(t: torch.Tensor) -> int:
    return 2 if t.dim() == 4 else 0  # key/value [1, H_kv, n, D]; cos/sin [n, D]; u [n, w]


def _owned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if it is a contiguous tensor that fills its own storage, else a compact copy, so that a node's
    bytes are exactly what it holds."""
    if t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _map_shared(tensors: list, fn) -> list:
    done: dict[int, torch.Tensor] = {}
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        if id(t) not in done:
            done[id(t)] = fn(t)
        out.append(done[id(t)])
    return out


def _slice_tensors(tensors: list, a: int, b: int) -> list:
    """Own copies of tokens ``[a, b)`` of every tensor."""
    return _map_shared(tensors, lambda t: _owned(t.narrow(_token_axis(t), a, b - a)))


def _cat_tensors(parts: list[list]) -> list:
    """Per entry, the concatenation along the tokens of that entry in every part (parts share one layout)."""
    if len(parts) == 1:
        return list(parts[0])
    done: dict[tuple, torch.Tensor] = {}
    out = []
    for i, t in enumerate(parts[0]):
        if t is None:
            out.append(None)
            continue
        key = tuple(id(p[i]) for p in parts)
        if key not in done:
            done[key] = torch.cat([p[i] for p in parts], dim=_token_axis(t))
        out.append(done[key])
    return out


def _unique_tensors(tensors) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in tensors:
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one storage count once)."""
    seen, total = set(), 0
    for t in _unique_tensors(tensors):
        st = t.untyped_storage()
        key = (t.device, st.data_ptr())
        if st.nbytes() and key not in seen:
            seen.add(key)
            total += st.nbytes()
    return total


class _StorageLedger:
    """Reference counts of the storages the store holds (in nodes and in what live caches read), and their bytes,
    each storage counted once however many nodes, views or caches hold it."""

    def __init__(self):
        self._held: dict[tuple, list[int]] = {}
        self.total = 0

    @staticmethod
    def _key(t: torch.Tensor):
        st = t.untyped_storage()
        return (t.device, st.data_ptr()), st.nbytes()

    def hold(self, tensors) -> None:
        for t in _unique_tensors(tensors):
            key, nbytes = self._key(t)
            if not nbytes:
                continue
            entry = self._held.get(key)
            if entry is None:
                self._held[key] = [1, nbytes]
                self.total += nbytes
            else:
                entry[0] += 1

    def drop(self, tensors) -> None:
        for t in _unique_tensors(tensors):
            key, nbytes = self._key(t)
            if not nbytes:
                continue
            entry = self._held[key]
            entry[0] -= 1
            if entry[0] == 0:
                del self._held[key]
                self.total -= entry[1]


# ---------------------------------------------------------------------------------------------------------------------
# radix trees

_serials = itertools.count(1)


class RadixNode:
    """A span of a context in one radix tree: token ids ``tokens [n]`` (CPU) at positions ``start .. start+n-1``,
    after the tokens spelled by the path from the root, and the tensors computed for that span (see the module
    docstring). ``ref_count``: live caches that read it (pinned while > 0). A root has no tokens; a residual tree's
    root holds the adapter's ``B`` factors."""

    __slots__ = ("serial", "tokens", "start", "tensors", "parent", "children", "ref_count", "last_used")

    def __init__(self, tokens: torch.Tensor, start: int, tensors: list, parent: RadixNode | None):
        self.serial = next(_serials)
        self.tokens = tokens
        self.start = start
        self.tensors = tensors
        self.parent = parent
        self.children: dict[int, RadixNode] = {}
        self.ref_count = 0
        self.last_used = 0

    @property
    def end(self) -> int:
        return self.start + self.tokens.numel()

    @property
    def is_root(self) -> bool:
        return self.parent is None

    def __repr__(self) -> str:
        return f"RadixNode([{self.start}, {self.end}), refs={self.ref_count}, children={len(self.children)})"


@dataclass
class _Factor:
    """One adapter's scaled ``B`` ``[H_kv·D, width]`` for one projection of one layer; ``width = rank`` or
    ``rank + 1`` (the last column of ``u`` is then ones and this column is the scaled LoRA bias)."""

    B: torch.Tensor
    rank: int

    @property
    def width(self) -> int:
        return self.B.shape[-1]


class RadixTree:
    """One radix tree: ``kind`` ``"base"`` (``identity = (base_fp,)``) or ``"residual"`` (``(base_fp, adapter_fp)``).

    Node tensors, per layer ``l``: base ``[key, value, cos, sin]`` at ``4l .. 4l+3``; residual ``[u_k, u_v]`` at
    ``2l, 2l+1`` (``None`` where the adapter has no LoRA). ``template``: a tensor-less ``SharedContext`` of the base
    model (what a fork's ``SharedContext`` copies its other fields from). ``factors``: per layer ``(k, v)``
    :class:`_Factor` or ``None``; all ``None`` for an adapter that needs no residual (no LoRA on K/V)."""

    def __init__(self, kind: str, identity: tuple):
        self.kind = kind
        self.identity = identity
        self.root = RadixNode(torch.zeros(0, dtype=torch.long), 0, [], None)
        self.template: SharedContext | None = None
        self.factors: list[tuple[_Factor | None, _Factor | None]] | None = None

    @property
    def has_residuals(self) -> bool:
        return self.factors is not None and any(f is not None for pair in self.factors for f in pair)

    def nodes(self):
        """Every node but the root, parents before children."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def match(self, ids: torch.Tensor):
        """Longest cached prefix of ``ids``: ``(path, length, partial)``; ``path`` the nodes wholly matched,
        ``partial`` ``(node, k)`` when the match ends ``k`` tokens into ``node``, else ``None``."""
        node, pos, path, T = self.root, 0, [], ids.numel()
        while pos < T:
            child = node.children.get(int(ids[pos]))
            if child is None:
                break
            n = child.tokens.numel()
            k = _common_prefix(child.tokens, ids[pos : pos + n])
            if k < n:
                return path, pos + k, (child, k)
            path.append(child)
            node, pos = child, pos + n
        return path, pos, None

    def path_to(self, ids: torch.Tensor) -> list[RadixNode]:
        """The nodes spelling exactly ``ids`` (they must be cached, ending on a node boundary)."""
        path, length, partial = self.match(ids)
        if length != ids.numel() or partial is not None:
            raise RuntimeError(f"internal error: {self.kind} tree does not hold the {ids.numel()} tokens asked for")
        return path


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(a.numel(), b.numel())
    diff = (a[:n] != b[:n]).nonzero()
    return n if diff.numel() == 0 else int(diff[0])


# ---------------------------------------------------------------------------------------------------------------------
# the store


@dataclass
class StoreStats:
    """Counters since the store was made. Token counts are per fork/extend call; residual counts per adapter."""

    forks: int = 0
    extends: int = 0
    base_tokens_requested: int = 0
    base_tokens_hit: int = 0
    residual_tokens_requested: int = 0
    residual_tokens_hit: int = 0
    #: tokens the base model ran over (base passes and residual-only passes)
    base_model_tokens: int = 0
    base_passes: int = 0
    merges: int = 0
    splits: int = 0
    evicted_nodes: int = 0
    evicted_bytes: int = 0

    @property
    def base_hit_rate(self) -> float:
        return self.base_tokens_hit / max(self.base_tokens_requested, 1)

    @property
    def residual_hit_rate(self) -> float:
        return self.residual_tokens_hit / max(self.residual_tokens_requested, 1)

    @property
    def prefill_tokens_saved(self) -> int:
        """Tokens a from-scratch base pass per call (``SharedContext.build``) would have run, minus those run."""
        return self.base_tokens_requested - self.base_model_tokens


@dataclass
class StoreReport:
    """What a :class:`ForkKVStore` holds (bytes of distinct storages) and how well it served."""

    total_bytes: int
    max_bytes: int | None
    base_bytes: int
    residual_bytes: int
    factor_bytes: int
    view_bytes: int
    pinned_bytes: int
    base_nodes: int
    residual_nodes: int
    live_caches: int
    stats: StoreStats

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "stats"}
        d.update(dataclasses.asdict(self.stats))
        d.update(base_hit_rate=self.stats.base_hit_rate, residual_hit_rate=self.stats.residual_hit_rate,
                 prefill_tokens_saved=self.stats.prefill_tokens_saved)
        return d

    def __str__(self) -> str:
        mib = lambda b: f"{b / 2**20:9.2f} MiB"  # noqa: E731
        s = self.stats
        budget = "unbounded" if self.max_bytes is None else mib(self.max_bytes).strip()
        return "\n".join([
            f"ForkKVStore: {mib(self.total_bytes).strip()} held (budget {budget}), {self.base_nodes} base nodes, "
            f"{self.residual_nodes} residual nodes, {self.live_caches} live caches",
            f"  base segments (bCache)          {mib(self.base_bytes)}",
            f"  residual segments (rCache)      {mib(self.residual_bytes)}",
            f"  LoRA B factors                  {mib(self.factor_bytes)}",
            f"  copies read by live caches      {mib(self.view_bytes)}",
            f"  pinned by live caches           {mib(self.pinned_bytes)}",
            f"  hit rate: base {s.base_hit_rate:.1%} of {s.base_tokens_requested} tokens, residual "
            f"{s.residual_hit_rate:.1%} of {s.residual_tokens_requested}",
            f"  base model ran over {s.base_model_tokens} tokens in {s.base_passes} passes; "
            f"{s.prefill_tokens_saved} prefill tokens saved; {s.evicted_nodes} nodes evicted",
        ])


@dataclass
class _Lease:
    """What one live cache pins (nodes, counted once each) and reads (a base view, residual stacks)."""

    nodes: list[RadixNode]
    base_view: tuple
    residual_tensors: list


class ForkKVStore:
    """A DualRadixTree store of shared contexts for one model (see the module docstring).

    ``model``: a ``PeftModel`` (or a plain transformers model: ``"__base__"`` rows only), in eval mode.
    ``max_bytes``: evict unpinned nodes, least recently used first, while the store holds more (``None``:
    unbounded). Pinned nodes are never evicted, so while caches are live the store may hold more than this.
    ``chunk_size``/``progress``: as in :meth:`SharedContext.build`. ``rehash_adapters``: probe the contents of
    the base weights and the adapters' K/V LoRA factors at every call even when the model's weight checks are
    ``"versions"`` (:func:`~forkkv_hf.identity.set_weight_checks`; the default ``"content"`` already does), so that
    writes through ``.data`` are caught.

    Thread-safe: every method holds the model's lock (:mod:`forkkv_hf.model_lock`), so forks, extends and
    generates on the model from several threads run one after the other. A cache from :meth:`fork` pins its nodes
    until :meth:`release` (or until it is garbage collected; the store then unpins them at its next call). The
    cache stays valid after that (nothing it reads is ever written), but the store no longer counts or keeps what
    it reads.
    """

    def __init__(self, model: nn.Module, max_bytes: int | None = None, *, chunk_size: int | None = 4096,
                 progress: bool = True, rehash_adapters: bool = False):
        _check_bytes(max_bytes, "max_bytes", none_ok=True)
        check_chunk_size(chunk_size)
        self.model = model
        self.max_bytes = max_bytes
        self.chunk_size = chunk_size
        self.progress = progress
        self.rehash_adapters = rehash_adapters
        self.stats = StoreStats()
        self._attention = find_attention_modules(model)
        self._base_trees: dict[tuple, RadixTree] = {}
        self._residual_trees: dict[tuple, RadixTree] = {}
        self._ledger = _StorageLedger()
        self._clock = itertools.count(1)
        self._leases: dict[int, _Lease] = {}
        self._lease_ids = itertools.count(1)
        self._pending_release: list[int] = []
        self._base_views: dict[tuple, list] = {}  # path serials -> [per-layer tensors, readers]
        self._adapters_seen: dict[str, None] = {}

    # ---------------------------------------------------------------------------------------------- identities
    def _probes(self) -> Probes:
        return Probes(fresh=self.rehash_adapters or weight_checks(self.model) == "content")

    def base_identity(self) -> str:
        """The base model's fingerprint (:func:`~forkkv_hf.identity.base_fingerprint`)."""
        return base_fingerprint(self.model, self._probes())[0]

    def adapter_identity(self, name: str) -> str:
        """An adapter's fingerprint (:func:`~forkkv_hf.identity.adapter_fingerprints`)."""
        return adapter_fingerprints(self.model, [name], self._probes())[name]

    # ---------------------------------------------------------------------------------------------- public API
    @torch.no_grad()
    def fork(self, token_ids, adapter_names, residual: str = "kv") -> ForkKVCache:
        """A :class:`~forkkv_hf.cache.ForkKVCache` over the context ``token_ids`` (``[T]``) whose row ``i`` is agent
        ``adapter_names[i]`` (``"__base__"``: no adapter), as ``ForkKVCache.from_context`` would give, computing
        only what the store misses. ``residual``: see :class:`~forkkv_hf.cache.ForkKVCache` (``"none"`` computes
        no residuals). Pass it to ``generate`` with ``adapter_names`` and inputs that start with ``token_ids``."""
        with model_lock(self.model):
            return self._fork(token_ids, adapter_names, residual)

    def _fork(self, token_ids, adapter_names, residual: str) -> ForkKVCache:
        if residual not in ForkKVCache.RESIDUAL_MODES:
            raise ValueError(f"residual must be one of {ForkKVCache.RESIDUAL_MODES}, got {residual!r}")
        rows = self._rows(adapter_names)
        ids = _as_context_ids(token_ids).cpu()
        names = list(dict.fromkeys(a for a in rows if a != BASE_ADAPTER))
        self._begin()
        base_tree, trees = self._ensure(ids, names if residual != "none" else [])
        self.stats.forks += 1
        clock = next(self._clock)
        base_path = self._compact(base_tree.path_to(ids))
        res_paths = {}
        for tree in dict.fromkeys(trees.values()):
            res_paths[tree.identity] = self._compact(tree.path_to(ids))
        pinned = list(base_path)
        for tree in dict.fromkeys(trees.values()):
            pinned += [tree.root] + res_paths[tree.identity]
        for node in pinned:
            node.ref_count += 1
            node.last_used = clock
        base_key, base_layers = self._base_view(base_path)
        kinds = (0, 1) if residual == "kv" else (1,)  # "v": the K residuals are never read
        residuals, residual_tensors = self._residual_stacks(trees, res_paths, base_tree.template.num_layers, kinds)
        self._ledger.hold(residual_tensors)
        lease_id = next(self._lease_ids)
        self._leases[lease_id] = _Lease(pinned, base_key, residual_tensors)

        template = base_tree.template
        layers = [
            dataclasses.replace(t, key=k, value=v, cos=c, sin=s, k_res=residuals[l][0], v_res=residuals[l][1])
            for l, (t, (k, v, c, s)) in enumerate(zip(template.layers, base_layers))
        ]
        # what the cache was computed from: generate refuses it if the weights change before it runs
        base_record, factors, probes = self._identity_of_call
        identity = ContextIdentity(base_record, adapter_records(factors, [n for n in names if n in factors], probes))
        shared = dataclasses.replace(template, layers=layers, token_ids=ids, adapters=tuple(names), start=0,
                                     identity=identity)
        try:
            cache = ForkKVCache(shared, rows, residual=residual)
        except Exception:
            self._release(lease_id)
            raise
        cache._forkkv_store_lease = (weakref.ref(self), lease_id)
        weakref.finalize(cache, self._pending_release.append, lease_id)
        self._evict_to_budget()
        return cache

    @torch.no_grad()
    def extend(self, token_ids, adapter_names=None) -> int:
        """Commit a context (e.g. the transcript after a turn) so that later forks of it or of its continuations
        find it cached: runs the base model over the tokens the base tree misses and computes the residuals of
        ``adapter_names`` (default: the adapters whose residuals already cover the cached part of ``token_ids``,
        i.e. the agents working on this transcript; ``[]`` for none). Returns how many tokens the base model ran
        over. Pins nothing."""
        ids = _as_context_ids(token_ids).cpu()
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names must be a list of adapter names, not the string {adapter_names!r}")
        with model_lock(self.model):
            self._begin()
            if adapter_names is None:
                names = self._following_adapters(ids)
            else:
                names = [a for a in dict.fromkeys(check_adapter_names(self.model, adapter_names)) if a != BASE_ADAPTER]
            before = self.stats.base_model_tokens
            self._ensure(ids, names)
            self.stats.extends += 1
            self._evict_to_budget()
            return self.stats.base_model_tokens - before

    def release(self, cache: ForkKVCache) -> bool:
        """Unpin what ``cache`` reads (idempotent; ``False`` if it was already released). The cache stays usable.
        Raises ``ValueError`` for a cache that another store (or no store) made."""
        owner = getattr(cache, "_forkkv_store_lease", None)
        if owner is None or owner[0]() is not self:
            raise ValueError("this cache was not forked from this ForkKVStore (or it was loaded from a file, which "
                             "no store pins); release only caches that this store's fork returned")
        with model_lock(self.model):
            released = self._release(owner[1])
            self._begin()
            self._evict_to_budget()
            return released

    def evict(self, to_bytes: int = 0) -> int:
        """Evict unpinned nodes, least recently used leaves first, until the store holds at most ``to_bytes`` (or
        only pinned nodes are left). Returns the bytes freed."""
        _check_bytes(to_bytes, "to_bytes")
        with model_lock(self.model):
            self._begin()
            return self._evict(to_bytes)

    def report(self) -> StoreReport:
        """Bytes held (per kind, distinct storages), node counts and hit statistics."""
        with model_lock(self.model):
            return self._report()

    def _report(self) -> StoreReport:
        self._begin()
        base_t, res_t, fac_t, pinned_t = [], [], [], []
        base_nodes = residual_nodes = 0
        for tree in self._base_trees.values():
            for node in tree.nodes():
                base_nodes += 1
                base_t += node.tensors
                if node.ref_count:
                    pinned_t += node.tensors
        for tree in self._residual_trees.values():
            fac_t += tree.root.tensors
            for node in tree.nodes():
                residual_nodes += 1
                res_t += node.tensors
                if node.ref_count:
                    pinned_t += node.tensors
        view_t = [t for entry in self._base_views.values() for layer in entry[0] for t in layer]
        view_t += [t for lease in self._leases.values() for t in lease.residual_tensors]
        b = storage_bytes(base_t)
        r = storage_bytes(base_t + res_t) - b
        f = storage_bytes(base_t + res_t + fac_t) - b - r
        v = storage_bytes(base_t + res_t + fac_t + view_t) - b - r - f
        return StoreReport(
            total_bytes=self._ledger.total, max_bytes=self.max_bytes, base_bytes=b, residual_bytes=r,
            factor_bytes=f, view_bytes=v, pinned_bytes=storage_bytes(pinned_t), base_nodes=base_nodes,
            residual_nodes=residual_nodes, live_caches=len(self._leases), stats=dataclasses.replace(self.stats),
        )

    @property
    def nbytes(self) -> int:
        """Bytes the store holds now (distinct storages: nodes, factors and the copies live caches read)."""
        with model_lock(self.model):
            self._begin()
            return self._ledger.total

    def __repr__(self) -> str:
        return (f"ForkKVStore({self._ledger.total / 2**20:.1f} MiB, {len(self._leases)} live caches, "
                f"max_bytes={self.max_bytes})")

    # ---------------------------------------------------------------------------------------------- internals
    def _rows(self, adapter_names) -> tuple[str, ...]:
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names must be a list with one name per row, not the string {adapter_names!r}")
        rows = tuple(check_adapter_names(self.model, adapter_names))
        if not rows:
            raise ValueError("fork at least one row")
        return rows

    def _begin(self) -> None:
        """Unpin the leases of caches garbage-collected since the last call (then enforce the budget)."""
        released = False
        while self._pending_release:
            released |= self._release(self._pending_release.pop())
        if released:
            self._evict_to_budget()

    def _release(self, lease_id: int) -> bool:
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return False
        for node in lease.nodes:
            node.ref_count -= 1
        entry = self._base_views[lease.base_view]
        entry[1] -= 1
        if entry[1] == 0:
            del self._base_views[lease.base_view]
            self._ledger.drop([t for layer in entry[0] for t in layer])
        self._ledger.drop(lease.residual_tensors)
        return True

    def _live_identities(self, names) -> tuple[str, dict[str, str]]:
        """The base identity and the identity of every adapter the store has seen that the model still has
        (``names`` first)."""
        if self.model.training:
            raise ValueError("the model is in training mode; call model.eval() before forking from a ForkKVStore")
        for n in names:
            self._adapters_seen[n] = None
        loaded = set(available_adapters(self.model))
        seen = [n for n in self._adapters_seen if n in loaded]
        probes, factors = self._probes(), kv_factors(self.model, seen, self._attention)
        base_fp, base_record = base_fingerprint(self.model, probes)
        fps = adapter_fingerprints(self.model, seen, probes, factors)
        self._identity_of_call = (base_record, factors, probes)  # a fork's context records the same values
        return base_fp, fps

    def _drop_stale(self, base_fp: str, live_fps: set) -> None:
        """Evict (unless pinned) every node keyed to weights the model no longer has."""
        stale = [t for k, t in self._base_trees.items() if k != (base_fp,)]
        stale += [t for k, t in self._residual_trees.items() if k[0] != base_fp or k[1] not in live_fps]
        for tree in stale:
            self._evict(0, only=tree)
            if not tree.root.children and not tree.root.ref_count:
                self._forget_tree(tree)

    def _forget_tree(self, tree: RadixTree) -> None:
        table = self._base_trees if tree.kind == "base" else self._residual_trees
        if table.get(tree.identity) is tree:
            del table[tree.identity]
            self._ledger.drop(tree.root.tensors)

    def _following_adapters(self, ids: torch.Tensor) -> list[str]:
        """Adapters whose residual trees reach as far into ``ids`` as the base tree does (> 0)."""
        base_fp, fps = self._live_identities([])
        base_tree = self._base_trees.get((base_fp,))
        if base_tree is None:
            return []
        _, m, _ = base_tree.match(ids)
        names = []
        for n, fp in fps.items():
            tree = self._residual_trees.get((base_fp, fp))
            if m and tree is not None and tree.has_residuals and tree.match(ids)[1] >= m:
                names.append(n)
        return names

    def _may_need_residual(self, name: str) -> bool:
        """Whether the adapter has LoRA on some attention layer's K/V projection (without running the model)."""
        for attn in self._attention.values():
            for proj_name in ("k_proj", "v_proj", "qkv_proj"):
                lora_a = getattr(getattr(attn, proj_name, None), "lora_A", None)
                if lora_a is not None and name in lora_a:
                    return True
        return False

    def _cover(self, tree: RadixTree, ids: torch.Tensor) -> int:
        """Length of the longest cached prefix of ``ids`` in ``tree``, with a node boundary made there."""
        _, length, partial = tree.match(ids)
        if partial is not None:
            self._split(partial[0], partial[1])
        return length

    def _ensure(self, ids: torch.Tensor, names: list[str]) -> tuple[RadixTree, dict[str, RadixTree]]:
        """Make the base tree and the residual trees of ``names`` hold ``ids`` (node boundaries at ``len(ids)``),
        with one base pass from the earliest position any of them misses. Returns the base tree and, per adapter
        name that has residuals, its residual tree."""
        T = ids.numel()
        base_fp, fps = self._live_identities(names)
        self._drop_stale(base_fp, set(fps.values()))
        base_tree = self._base_trees.get((base_fp,))
        if base_tree is None:
            base_tree = self._base_trees[(base_fp,)] = RadixTree("base", (base_fp,))
        m = self._cover(base_tree, ids)
        self.stats.base_tokens_requested += T
        self.stats.base_tokens_hit += m

        starts: dict[str, int] = {}  # adapter fp -> cached residual length (< T)
        by_fp: dict[str, str] = {}  # one adapter name per identity
        for n in names:
            fp = fps[n]
            if fp in by_fp or not self._may_need_residual(n):
                continue
            tree = self._residual_trees.get((base_fp, fp))
            if tree is not None and not tree.has_residuals:
                continue
            by_fp[fp] = n
            m_a = 0 if tree is None else self._cover(tree, ids)
            self.stats.residual_tokens_requested += T
            self.stats.residual_tokens_hit += m_a
            if m_a < T:
                starts[fp] = m_a

        if m < T or starts:
            s = min([m, *starts.values()])
            seg = SharedContext.build_continuation(
                self.model, ids[s:], [by_fp[fp] for fp in starts], past=self._past(base_tree, ids[:s]),
                keep_kv=m < T, chunk_size=self.chunk_size, progress=self.progress, record_identity=False,
            )
            self.stats.base_passes += 1
            self.stats.base_model_tokens += T - s
            base_tree.template = _strip(seg)
            if m < T:
                tensors = []
                for layer in seg.layers:
                    tensors += [layer.key, layer.value, layer.cos, layer.sin]
                self._insert(base_tree, ids, m, _slice_tensors(tensors, m - s, T - s))
            for fp, m_a in starts.items():
                tree = self._residual_trees.get((base_fp, fp))
                if tree is None:
                    tree = self._residual_trees[(base_fp, fp)] = RadixTree("residual", (base_fp, fp))
                    tree.factors, tree.root.tensors = _factors(seg, by_fp[fp])
                    self._ledger.hold(tree.root.tensors)
                if tree.has_residuals:
                    self._insert(tree, ids, m_a, _u_segment(seg, by_fp[fp], tree.factors, m_a - s, T - s))

        clock = next(self._clock)
        trees = {}
        for n in names:
            tree = self._residual_trees.get((base_fp, fps[n]))
            if tree is not None and tree.has_residuals:
                trees[n] = tree
        for tree in [base_tree, *trees.values()]:
            tree.root.last_used = clock
            for node in tree.path_to(ids):
                node.last_used = clock
        return base_tree, trees

    def _past(self, base_tree: RadixTree, prefix: torch.Tensor):
        """Base K/V ``[1, H_kv, S, D]`` per layer of the cached ``prefix`` (``None`` if empty)."""
        S = prefix.numel()
        if S == 0:
            return None
        path, length, partial = base_tree.match(prefix)
        parts = [node.tensors for node in path]
        if partial is not None:  # the prefix ends inside a node: its head only
            node, k = partial
            parts.append([t.narrow(_token_axis(t), 0, k) for t in node.tensors])
        if length != S:
            raise RuntimeError(f"internal error: the base tree holds {length} of the {S} past tokens")
        tensors = _cat_tensors(parts)
        return [(tensors[4 * l], tensors[4 * l + 1]) for l in range(len(tensors) // 4)]

    def _insert(self, tree: RadixTree, ids: torch.Tensor, start: int, tensors: list) -> RadixNode:
        """A new leaf for tokens ``ids[start:]`` under the node that ends at ``start`` (a boundary made by
        :meth:`_cover`)."""
        parent = tree.root if start == 0 else tree.path_to(ids[:start])[-1]
        node = RadixNode(ids[start:].clone(), start, tensors, parent)
        parent.children[int(ids[start])] = node
        self._ledger.hold(tensors)
        return node

    def _split(self, node: RadixNode, k: int) -> RadixNode:
        """Replace ``node`` by two nodes (new tensors) for its first ``k`` tokens and the rest; pins move to both.
        A live cache that read ``node`` in place keeps reading its old tensors, still counted through its lease."""
        n = node.tokens.numel()
        upper = RadixNode(node.tokens[:k].clone(), node.start, _slice_tensors(node.tensors, 0, k), node.parent)
        lower = RadixNode(node.tokens[k:].clone(), node.start + k, _slice_tensors(node.tensors, k, n), upper)
        lower.children = node.children
        for child in lower.children.values():
            child.parent = lower
        upper.children = {int(lower.tokens[0]): lower}
        node.parent.children[int(upper.tokens[0])] = upper
        for part in (upper, lower):
            part.ref_count, part.last_used = node.ref_count, node.last_used
        self._ledger.hold(upper.tensors + lower.tensors)
        self._ledger.drop(node.tensors)
        if node.ref_count:
            for lease in self._leases.values():
                lease.nodes = [x for y in lease.nodes for x in ((upper, lower) if y is node else (y,))]
        node.children, node.parent = {}, None
        self.stats.splits += 1
        return upper

    def _compact(self, path: list[RadixNode]) -> list[RadixNode]:
        """Merge a path of several nodes into one when nothing else reads them (no pins, no branches), so that a
        cache reads the merged node in place instead of a copy beside the tree."""
        if len(path) < 2 or any(n.ref_count for n in path) or any(len(n.children) != 1 for n in path[:-1]):
            return path
        first, last = path[0], path[-1]
        merged = RadixNode(torch.cat([n.tokens for n in path]), first.start,
                           _cat_tensors([n.tensors for n in path]), first.parent)
        merged.children = last.children
        for child in merged.children.values():
            child.parent = merged
        merged.last_used = max(n.last_used for n in path)
        first.parent.children[int(merged.tokens[0])] = merged
        self._ledger.hold(merged.tensors)
        for n in path:
            self._ledger.drop(n.tensors)
            n.children, n.parent = {}, None
        self.stats.merges += 1
        return [merged]

    def _base_view(self, path: list[RadixNode]):
        """Per layer ``(key, value, cos, sin)`` over the whole path: the node's own tensors for one node, else a
        concatenation shared by every live cache over the same path."""
        key = tuple(n.serial for n in path)
        entry = self._base_views.get(key)
        if entry is None:
            tensors = _cat_tensors([n.tensors for n in path])
            layers = [tuple(tensors[4 * l : 4 * l + 4]) for l in range(len(tensors) // 4)]
            entry = self._base_views[key] = [layers, 0]
            self._ledger.hold(tensors)
        entry[1] += 1
        return key, entry[0]

    def _residual_stacks(self, trees: dict[str, RadixTree], paths: dict, num_layers: int, kinds=(0, 1)):
        """Per layer ``(k_res, v_res)`` :class:`Residual` stacks for the adapters in ``trees`` (in order), and the
        tensors they hold. One adapter over one node reads the node's ``u`` in place."""
        out, held = [], []
        seg_tensors = {name: _cat_tensors([n.tensors for n in paths[tree.identity]]) for name, tree in trees.items()}
        stacked: dict[tuple, torch.Tensor] = {}
        for l in range(num_layers):
            pair = []
            for kind in (0, 1):
                present = [(name, tree.factors[l][kind], seg_tensors[name][2 * l + kind])
                           for name, tree in trees.items() if kind in kinds and tree.factors[l][kind] is not None]
                if not present:
                    pair.append(None)
                    continue
                ranks = tuple(f.rank for _, f, _ in present)
                bias = any(f.width > f.rank for _, f, _ in present)
                width = max(ranks) + bias
                key = tuple(id(u) for _, _, u in present)
                if key not in stacked:
                    if len(present) == 1:
                        stacked[key] = present[0][2][None]
                    else:
                        u = present[0][2].new_zeros(len(present), present[0][2].shape[0], width)
                        for i, (_, f, seg) in enumerate(present):
                            u[i, :, : f.rank] = seg[:, : f.rank]
                        if bias:
                            u[:, :, -1] = 1
                        stacked[key] = u
                u = stacked[key]
                if len(present) == 1:
                    B = present[0][1].B[None]
                else:
                    B = present[0][1].B.new_zeros(len(present), present[0][1].B.shape[0], width)
                    for i, (_, f, _) in enumerate(present):
                        B[i, :, : f.rank] = f.B[:, : f.rank]
                        if f.width > f.rank:
                            B[i, :, -1] = f.B[:, -1]
                held += [u, B]
                pair.append(Residual(tuple(name for name, _, _ in present), u, B, ranks))
            out.append(tuple(pair))
        return out, _unique_tensors(held)

    def _evict_to_budget(self) -> None:
        if self.max_bytes is not None and self._ledger.total > self.max_bytes:
            self._evict(self.max_bytes)

    def _evict(self, to_bytes: int, only: RadixTree | None = None) -> int:
        """Evict unpinned leaves (and residual roots left without nodes), least recently used first, while the
        store holds more than ``to_bytes``; ``only``: within one tree, whatever the bytes."""
        trees = [only] if only is not None else [*self._base_trees.values(), *self._residual_trees.values()]
        heap, order = [], itertools.count()

        def offer(node: RadixNode, tree: RadixTree):
            if node.ref_count or node.children:
                return
            if node.is_root and (tree.kind == "base" or not node.tensors):
                return  # empty roots cost nothing; stale ones go in _drop_stale
            heapq.heappush(heap, (node.last_used, next(order), node, tree))

        for tree in trees:
            offer(tree.root, tree)
            for node in tree.nodes():
                offer(node, tree)
        before = self._ledger.total
        while heap and (only is not None or self._ledger.total > to_bytes):
            _, _, node, tree = heapq.heappop(heap)
            self.stats.evicted_nodes += 1
            if node.is_root:
                self._forget_tree(tree)
                continue
            self._ledger.drop(node.tensors)
            parent = node.parent
            del parent.children[int(node.tokens[0])]
            node.parent = None
            offer(parent, tree)
        freed = before - self._ledger.total
        self.stats.evicted_bytes += freed
        return freed


def _check_bytes(value, what: str, none_ok: bool = False) -> None:
    """``value`` must be an int number of bytes >= 0 (or ``None`` where that means unbounded)."""
    if value is None and none_ok:
        return
    unbounded = " or None (unbounded)" if none_ok else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be a number of bytes, an int{unbounded}, e.g. 2 * 2**30 for 2 GiB; got {value!r}")
    if value < 0:
        raise ValueError(f"{what} must be >= 0{unbounded}, got {value}")


def _strip(seg: SharedContext) -> SharedContext:
    """A copy of ``seg`` without tensors: the fields a fork's ``SharedContext``/``SharedLayer`` copy from it."""
    empty = seg.layers[0].key.new_empty(0)
    layers = [dataclasses.replace(l, key=empty, value=empty, cos=empty, sin=empty, k_res=None, v_res=None)
              for l in seg.layers]
    return dataclasses.replace(seg, layers=layers, token_ids=seg.token_ids[:0], adapters=(), start=0, identity=None)


def _factors(seg: SharedContext, name: str):
    """The adapter's per-layer ``(k, v)`` :class:`_Factor` (own copies) from a base pass's residual stacks, and
    their tensors. A layer keeps the bias column only if the adapter's LoRA bias is non-zero there (in K or V: a
    fused qkv_proj's K and V share one ``u``, so they share its width). This depends on the weights alone, so every
    pass over an identity gives the same widths."""
    factors, tensors = [], []
    for layer in seg.layers:
        pair = []
        present = [res for res in (layer.k_res, layer.v_res) if res is not None and name in res.slot]
        has_bias = any(res.B.shape[-1] > max(res.ranks) and bool(res.B[res.slot[name], :, -1].any())
                       for res in present)
        for res in (layer.k_res, layer.v_res):
            if res is None or name not in res.slot:
                pair.append(None)
                continue
            i = res.slot[name]
            r = res.ranks[i]
            B = torch.cat([res.B[i, :, :r], res.B[i, :, -1:]], dim=-1) if has_bias else res.B[i, :, :r].clone()
            pair.append(_Factor(B, r))
            tensors.append(B)
        factors.append(tuple(pair))
    return factors, tensors


def _u_segment(seg: SharedContext, name: str, factors, a: int, b: int) -> list:
    """The adapter's ``u`` over tokens ``[a, b)`` of ``seg``, per layer ``[u_k, u_v]`` (``[n, width]``, own
    copies; one tensor for both where K and V share ``u``)."""
    out, done = [], {}
    for l, layer in enumerate(seg.layers):
        for kind, res in enumerate((layer.k_res, layer.v_res)):
            f = factors[l][kind]
            if f is None:
                out.append(None)
                continue
            key = id(res.u)
            if key not in done:
                u = res.u[res.slot[name], a:b]
                part = torch.cat([u[:, : f.rank], u[:, -1:]], dim=-1) if f.width > f.rank else u[:, : f.rank]
                done[key] = _owned(part)
            out.append(done[key])
    return out
