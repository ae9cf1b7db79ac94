"""``ForkKVStore``: shared contexts of one model kept in base and residual radix trees (the package docstring,
:mod:`forkkv_hf.store`, describes the design); forks compute only what the trees miss."""

from __future__ import annotations

import heapq
import itertools
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ..cache import ForkKVCache
from ..context import SharedContext
from ..context.base_pass import check_chunk_size
from ..context.identity import adapter_fingerprints, base_fingerprint
from ..inputs import context_token_ids, vocab_size_of
from ..peft.lora_factors import BASE_ADAPTER, check_adapter_names, refuse_offloaded
from ..model_lock import model_lock
from .fingerprint import CallIdentities, Fingerprints
from .radix import RadixNode, RadixTree
from .report import StoreReport, StoreStats, measure
from .segments import (
    StorageLedger,
    adapter_factors,
    base_segment,
    cat_tensors,
    head_tensors,
    residual_segment,
    stack_residuals,
)


@dataclass
class _Lease:
    """What one live cache pins (nodes, counted once each) and reads (a base view, residual stacks)."""

    nodes: list[RadixNode]
    base_view: tuple
    residual_tensors: list


class ForkKVStore:
    """A DualRadixTree store of shared contexts for one model (see the :mod:`forkkv_hf.store` docstring).

    ``model``: a ``PeftModel`` (or a plain transformers model: ``"__base__"`` rows only), in eval mode.
    ``max_bytes``: evict unpinned nodes, least recently used first, while the store holds more (``None``:
    unbounded). Pinned nodes are never evicted, so while caches are live the store may hold more than this.
    ``chunk_size``/``progress``: as in :meth:`SharedContext.build`. ``rehash_adapters``: probe the contents of
    the base weights and the adapters' K/V LoRA factors at every call even when the model's weight checks are
    ``"versions"`` (:func:`~forkkv_hf.context.identity.set_weight_checks`; the default ``"content"`` already
    does), so that writes through ``.data`` are caught.

    Thread-safe: every method holds the model's lock (:mod:`forkkv_hf.model_lock`), so forks, extends and
    generates on the model from several threads run one after the other. A cache from :meth:`fork` pins its nodes
    until :meth:`release` (or until it is garbage collected; the store then unpins them at its next call). The
    cache stays valid after that (nothing it reads is ever written), but the store no longer counts or keeps what
    it reads.
    """

    def __reduce__(self):  # a copy kept references to the original model's layers and storages (its forks were
        raise TypeError(  # refused, evict failed with a KeyError); pickle failed inside on a weakref
            "a ForkKVStore cannot be pickled or copied (it indexes the model's layers and its own storages); save the "
            "SharedContexts or caches it forks (they pickle), or make a new store for the copy of the model")

    def __deepcopy__(self, memo):
        self.__reduce__()

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
        self._fingerprints = Fingerprints(model)
        self._base_trees: dict[tuple, RadixTree] = {}
        self._residual_trees: dict[tuple, RadixTree] = {}
        self._ledger = StorageLedger()
        self._clock = itertools.count(1)
        self._leases: dict[int, _Lease] = {}
        self._lease_ids = itertools.count(1)
        self._pending_release: list[int] = []
        self._base_views: dict[tuple, list] = {}  # path serials -> [per-layer tensors, readers]
        self._identities: CallIdentities | None = None  # of the latest call; a fork's context records them

    # ---------------------------------------------------------------------------------------------- identities
    def base_identity(self) -> str:
        """The base model's fingerprint (:func:`~forkkv_hf.context.identity.base_fingerprint`)."""
        return base_fingerprint(self.model, self._fingerprints.probes(self.rehash_adapters))[0]

    def adapter_identity(self, name: str) -> str:
        """An adapter's fingerprint (:func:`~forkkv_hf.context.identity.adapter_fingerprints`)."""
        return adapter_fingerprints(self.model, [name], self._fingerprints.probes(self.rehash_adapters))[name]

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
        ids = context_token_ids(token_ids, vocab_size_of(self.model)).cpu()
        refuse_offloaded(self.model.named_parameters())  # (its fingerprint failed inside on meta weights)
        names = list(dict.fromkeys(a for a in rows if a != BASE_ADAPTER))
        self._begin()
        base_tree, trees = self._ensure(ids, names if residual != "none" else [])
        self.stats.forks += 1
        clock = next(self._clock)
        base_path = self._compact(base_tree, base_tree.path_to(ids))
        res_paths = {}
        for tree in dict.fromkeys(trees.values()):
            res_paths[tree.identity] = self._compact(tree, tree.path_to(ids))
        pinned = list(base_path)
        for tree in dict.fromkeys(trees.values()):
            pinned += [tree.root] + res_paths[tree.identity]
        for node in pinned:
            node.ref_count += 1
            node.last_used = clock
        base_key, base_layers = self._base_view(base_path)
        kinds = (0, 1) if residual == "kv" else (1,)  # "v": the K residuals are never read
        layout = base_tree.layout
        # per adapter name its factors and its residual segment over the whole context (read in place for one node)
        adapters = {name: (tree.factors, cat_tensors([n.tensors for n in res_paths[tree.identity]]))
                    for name, tree in trees.items()}
        residuals, residual_tensors = stack_residuals(adapters, layout.num_layers, kinds)
        self._ledger.hold(residual_tensors)
        lease_id = next(self._lease_ids)
        self._leases[lease_id] = _Lease(pinned, base_key, residual_tensors)

        # what the cache was computed from: generate refuses it if the weights change before it runs
        identity = self._identities.context_identity(names)
        shared = SharedContext.from_tensors(layout, base_layers, residuals, ids, names, identity)
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
        ids = context_token_ids(token_ids, vocab_size_of(self.model)).cpu()
        refuse_offloaded(self.model.named_parameters())  # (its fingerprint failed inside on meta weights)
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
        view_t = [t for entry in self._base_views.values() for layer in entry[0] for t in layer]
        view_t += [t for lease in self._leases.values() for t in lease.residual_tensors]
        return measure(list(self._base_trees.values()), list(self._residual_trees.values()), view_t,
                       total_bytes=self._ledger.total, max_bytes=self.max_bytes, live_caches=len(self._leases),
                       stats=self.stats)

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
        self._identities = self._fingerprints.live(names, self.rehash_adapters)
        return self._identities.base, self._identities.adapters

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

    def _cover(self, tree: RadixTree, ids: torch.Tensor) -> int:
        """Length of the longest cached prefix of ``ids`` in ``tree``, with a node boundary made there."""
        _, length, partial = tree.match(ids)
        if partial is not None:
            node = partial[0]
            upper, lower = tree.split(node, partial[1], self._ledger)
            if node.ref_count:  # the leases that pin node pin both parts now
                for lease in self._leases.values():
                    lease.nodes = [x for y in lease.nodes for x in ((upper, lower) if y is node else (y,))]
            self.stats.splits += 1
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
            if fp in by_fp or not self._fingerprints.may_need_residual(n):
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
            base_tree.layout = seg.layout()
            if m < T:
                base_tree.insert(ids, m, base_segment(seg, m - s, T - s), self._ledger)
            for fp, m_a in starts.items():
                tree = self._residual_trees.get((base_fp, fp))
                if tree is None:
                    tree = self._residual_trees[(base_fp, fp)] = RadixTree("residual", (base_fp, fp))
                    tree.factors, tree.root.tensors = adapter_factors(seg, by_fp[fp])
                    self._ledger.hold(tree.root.tensors)
                if tree.has_residuals:
                    tree.insert(ids, m_a, residual_segment(seg, by_fp[fp], tree.factors, m_a - s, T - s), self._ledger)

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
            parts.append(head_tensors(node.tensors, k))
        if length != S:
            raise RuntimeError(f"internal error: the base tree holds {length} of the {S} past tokens")
        tensors = cat_tensors(parts)
        return [(tensors[4 * l], tensors[4 * l + 1]) for l in range(len(tensors) // 4)]

    def _compact(self, tree: RadixTree, path: list[RadixNode]) -> list[RadixNode]:
        """``path`` as one merged node where nothing else reads its nodes (:meth:`RadixTree.compact`)."""
        merged = tree.compact(path, self._ledger)
        if merged is None:
            return path
        self.stats.merges += 1
        return [merged]

    def _base_view(self, path: list[RadixNode]):
        """Per layer ``(key, value, cos, sin)`` over the whole path: the node's own tensors for one node, else a
        concatenation shared by every live cache over the same path."""
        key = tuple(n.serial for n in path)
        entry = self._base_views.get(key)
        if entry is None:
            tensors = cat_tensors([n.tensors for n in path])
            layers = [tuple(tensors[4 * l : 4 * l + 4]) for l in range(len(tensors) // 4)]
            entry = self._base_views[key] = [layers, 0]
            self._ledger.hold(tensors)
        entry[1] += 1
        return key, entry[0]

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

