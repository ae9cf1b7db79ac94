"""The radix trees of a :class:`~forkkv_hf.store.ForkKVStore`: nodes are spans of token ids, the path from the root
spells the tokens before a node, and a node holds the tensors computed for its span (:mod:`.segments` layouts).

Node tensors are never written after they are made: :meth:`RadixTree.split` and :meth:`RadixTree.compact` build new
tensors, and every tensor a node takes or gives up enters or leaves the store's :class:`~.segments.StorageLedger`.
"""

from __future__ import annotations

import itertools

import torch

from ..context import ContextLayout
from .segments import AdapterFactor, StorageLedger, cat_tensors, slice_tensors

_serials = itertools.count(1)


class RadixNode:
    """A span of a context in one radix tree: token ids ``tokens [n]`` (CPU) at positions ``start .. start+n-1``,
    after the tokens spelled by the path from the root, and the tensors computed for that span. ``ref_count``: live
    caches that read it (pinned while > 0). A root has no tokens; a residual tree's root holds the adapter's ``B``
    factors."""

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


class RadixTree:
    """One radix tree: ``kind`` ``"base"`` (``identity = (base_fp,)``) or ``"residual"`` (``(base_fp, adapter_fp)``).

    Node tensors, per layer ``l``: base ``[key, value, cos, sin]`` at ``4l .. 4l+3``; residual ``[u_k, u_v]`` at
    ``2l, 2l+1`` (``None`` where the adapter has no LoRA). ``layout``: the model a fork's ``SharedContext`` is
    assembled for (base trees). ``factors``: per layer ``(k, v)`` :class:`~.segments.AdapterFactor` or ``None``;
    all ``None`` for an adapter that needs no residual (no LoRA on K/V)."""

    def __init__(self, kind: str, identity: tuple):
        self.kind = kind
        self.identity = identity
        self.root = RadixNode(torch.zeros(0, dtype=torch.long), 0, [], None)
        self.layout: ContextLayout | None = None
        self.factors: list[tuple[AdapterFactor | None, AdapterFactor | None]] | None = None

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
            k = common_prefix(child.tokens, ids[pos : pos + n])
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

    # ---------------------------------------------------------------------------------------------- changes
    def insert(self, ids: torch.Tensor, start: int, tensors: list, ledger: StorageLedger) -> RadixNode:
        """A new leaf for tokens ``ids[start:]`` under the node that ends at ``start`` (a node boundary)."""
        parent = self.root if start == 0 else self.path_to(ids[:start])[-1]
        node = RadixNode(ids[start:].clone(), start, tensors, parent)
        parent.children[int(ids[start])] = node
        ledger.hold(tensors)
        return node

    @staticmethod
    def split(node: RadixNode, k: int, ledger: StorageLedger) -> tuple[RadixNode, RadixNode]:
        """Replace ``node`` by two nodes (new tensors) for its first ``k`` tokens and the rest; its pins move to
        both. Returns ``(upper, lower)``; ``node`` is left detached (a live cache that read it in place keeps reading
        its old tensors)."""
        n = node.tokens.numel()
        upper = RadixNode(node.tokens[:k].clone(), node.start, slice_tensors(node.tensors, 0, k), node.parent)
        lower = RadixNode(node.tokens[k:].clone(), node.start + k, slice_tensors(node.tensors, k, n), upper)
        lower.children = node.children
        for child in lower.children.values():
            child.parent = lower
        upper.children = {int(lower.tokens[0]): lower}
        node.parent.children[int(upper.tokens[0])] = upper
        for part in (upper, lower):
            part.ref_count, part.last_used = node.ref_count, node.last_used
        ledger.hold(upper.tensors + lower.tensors)
        ledger.drop(node.tensors)
        node.children, node.parent = {}, None
        return upper, lower

    @staticmethod
    def compact(path: list[RadixNode], ledger: StorageLedger) -> RadixNode | None:
        """Merge a path of several nodes into one when nothing else reads them (no pins, no branches), so that a
        cache reads the merged node in place instead of a copy beside the tree. Returns the merged node, or
        ``None`` when the path stays as it is."""
        if len(path) < 2 or any(n.ref_count for n in path) or any(len(n.children) != 1 for n in path[:-1]):
            return None
        first, last = path[0], path[-1]
        merged = RadixNode(torch.cat([n.tokens for n in path]), first.start,
                           cat_tensors([n.tensors for n in path]), first.parent)
        merged.children = last.children
        for child in merged.children.values():
            child.parent = merged
        merged.last_used = max(n.last_used for n in path)
        first.parent.children[int(merged.tokens[0])] = merged
        ledger.hold(merged.tensors)
        for n in path:
            ledger.drop(n.tensors)
            n.children, n.parent = {}, None
        return merged


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the common prefix of two 1-D token tensors."""
    n = min(a.numel(), b.numel())
    diff = (a[:n] != b[:n]).nonzero()
    return n if diff.numel() == 0 else int(diff[0])
