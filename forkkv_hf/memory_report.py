"""What a :class:`~forkkv_hf.cache.ForkKVCache` holds, in bytes, against one ``DynamicCache`` per row
(:meth:`ForkKVCache.memory_report <forkkv_hf.cache.ForkKVCache.memory_report>`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MemoryReport:
    """Bytes held by a :class:`ForkKVCache`, against one ``DynamicCache`` per row of the batch."""

    rows: int
    agents: int
    shared_tokens: int
    private_tokens: int
    shared_base_bytes: int
    residual_bytes: int
    residual_bytes_per_agent: dict
    factor_bytes: int
    rope_bytes: int
    private_bytes: int
    dynamic_cache_bytes: int
    #: a compiled decode's private K/V buffers at their whole capacity (pooled per model and reused by its next
    #: compiled call; not in ``forkkv_bytes``, which counts the tokens held, as ``dynamic_cache_bytes`` does)
    static_buffer_bytes: int = 0

    @property
    def forkkv_bytes(self) -> int:
        return self.shared_base_bytes + self.residual_bytes + self.factor_bytes + self.rope_bytes + self.private_bytes

    @property
    def saving(self) -> float:
        """How many times less memory than one DynamicCache per row."""
        return self.dynamic_cache_bytes / max(self.forkkv_bytes, 1)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["forkkv_bytes"] = self.forkkv_bytes
        d["saving"] = self.saving
        return d

    def __str__(self) -> str:
        mib = lambda b: f"{b / 2**20:10.2f} MiB"  # noqa: E731
        lines = [
            f"ForkKV cache: {self.rows} rows, {self.agents} agents with residuals, "
            f"{self.shared_tokens} shared + {self.private_tokens} private tokens",
            f"  shared base (bCache, once)      {mib(self.shared_base_bytes)}",
            f"  residuals (rCache, per agent)   {mib(self.residual_bytes)}",
        ]
        for a, b in self.residual_bytes_per_agent.items():
            lines.append(f"    {a:<30}{mib(b)}")
        lines += [
            f"  LoRA B factors + RoPE tables    {mib(self.factor_bytes + self.rope_bytes)}",
            f"  private K/V (per row)           {mib(self.private_bytes)}",
            f"  total                           {mib(self.forkkv_bytes)}",
        ]
        if self.static_buffer_bytes:
            lines.append(f"  compiled decode's K/V buffers   {mib(self.static_buffer_bytes)}   (capacity, pooled per "
                         "model)")
        lines += [
            f"  one DynamicCache per row        {mib(self.dynamic_cache_bytes)}   ({self.saving:.1f}x more)",
        ]
        return "\n".join(lines)
