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
and config (:mod:`~forkkv_hf.store.fingerprint`), never a name: an adapter reloaded under the same name with other
weights, or base weights written in any way (``.data`` included, in the default content mode), get other trees, so
a stale segment is never served: it is recomputed.

``store.fork(token_ids, adapter_names)`` finds the longest cached prefix in each tree, runs the base model once over
what is missing (from the earliest position any tree misses, with the cached K/V before it as past; K/V are kept
only where the base tree misses them), inserts the new spans as nodes (splitting a node where a context diverges
inside it), pins the path's nodes (reference counts) and returns a :class:`~forkkv_hf.cache.ForkKVCache` over a
:class:`~forkkv_hf.context.SharedContext` that reads them. The attention needs each layer contiguous along
the tokens, so a path of one node is read in place and a path of several nodes is concatenated once (a copy kept,
and counted, while caches read it; a path that is an unshared chain of unpinned nodes is merged into one node
instead, so later forks read it in place). Node tensors are never written after they are made: splits and merges
build new tensors; ``generate`` appends only to a cache's private per-row part (copy-on-write).

Unpinned nodes are evicted least-recently-used, leaves first, when the store holds more than ``max_bytes``. Bytes
are counted per distinct storage (a tensor held by a node and read in place by a cache counts once).

Modules: :mod:`.store` (``ForkKVStore``), :mod:`.radix` (the trees), :mod:`.segments` (node tensors and the byte
ledger), :mod:`.fingerprint` (the identities trees are keyed by), :mod:`.report` (statistics and byte report).
"""

from .radix import RadixNode, RadixTree
from .report import StoreReport, StoreStats
from .segments import storage_bytes
from .store import ForkKVStore

__all__ = ["ForkKVStore", "RadixNode", "RadixTree", "StoreReport", "StoreStats", "storage_bytes"]
