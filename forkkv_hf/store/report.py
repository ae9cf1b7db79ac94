"""What a :class:`~forkkv_hf.store.ForkKVStore` holds and how well it served: :class:`StoreStats` (counters) and
:class:`StoreReport` (bytes of distinct storages per kind, measured by :func:`measure`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .radix import RadixTree
from .segments import storage_bytes


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


def measure(base_trees: list[RadixTree], residual_trees: list[RadixTree], view_tensors: list, *, total_bytes: int,
            max_bytes: int | None, live_caches: int, stats: StoreStats) -> StoreReport:
    """The report of a store with these trees; ``view_tensors``: what live caches read beside the trees (copies of
    several-node paths, residual stacks). Each kind counts the storages no kind before it holds."""
    base_t, res_t, fac_t, pinned_t = [], [], [], []
    base_nodes = residual_nodes = 0
    for tree in base_trees:
        for node in tree.nodes():
            base_nodes += 1
            base_t += node.tensors
            if node.ref_count:
                pinned_t += node.tensors
    for tree in residual_trees:
        fac_t += tree.root.tensors
        if tree.root.ref_count:  # a live cache pins its agent's factors (the root) beside its nodes
            pinned_t += tree.root.tensors
        for node in tree.nodes():
            residual_nodes += 1
            res_t += node.tensors
            if node.ref_count:
                pinned_t += node.tensors
    b = storage_bytes(base_t)
    r = storage_bytes(base_t + res_t) - b
    f = storage_bytes(base_t + res_t + fac_t) - b - r
    v = storage_bytes(base_t + res_t + fac_t + view_tensors) - b - r - f
    return StoreReport(
        total_bytes=total_bytes, max_bytes=max_bytes, base_bytes=b, residual_bytes=r, factor_bytes=f,
        view_bytes=v, pinned_bytes=storage_bytes(pinned_t), base_nodes=base_nodes, residual_nodes=residual_nodes,
        live_caches=live_caches, stats=dataclasses.replace(stats),
    )
