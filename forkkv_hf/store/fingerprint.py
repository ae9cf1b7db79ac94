"""The identities a :class:`~forkkv_hf.store.ForkKVStore` keys its radix trees by: fingerprints of the base weights
and of each adapter's K/V LoRA factors and config (:func:`~forkkv_hf.context.identity.base_fingerprint`,
:func:`~forkkv_hf.context.identity.adapter_fingerprints`), never names, taken once per store call."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..context.identity import (
    ContextIdentity,
    WeightRecord,
    adapter_fingerprints,
    adapter_records,
    base_fingerprint,
    kv_factors,
    weight_checks,
)
from ..context.probes import Probes
from ..context.settings import module_settings
from ..peft.lora_factors import available_adapters, find_attention_modules


@dataclass
class CallIdentities:
    """The identities of one store call: ``base`` fingerprint, ``adapters`` (name -> fingerprint) and the values
    they were made of, which a fork's context records (:meth:`context_identity`) so that ``generate`` refuses it
    if the weights change before it runs."""

    base: str
    adapters: dict[str, str]
    base_record: WeightRecord
    factors: dict
    probes: Probes
    settings: tuple = ()  # the base model's module settings (:mod:`forkkv_hf.context.settings`)

    def context_identity(self, names) -> ContextIdentity:
        """What a context over these weights with the adapters ``names`` was computed from."""
        return ContextIdentity(self.base_record,
                               adapter_records(self.factors, [n for n in names if n in self.factors], self.probes),
                               settings=self.settings)


class Fingerprints:
    """Fingerprints of one model's weights for a store: ``adapters_seen`` (every adapter a call named, in order) is
    fingerprinted at each call while the model still has it, so that trees of adapters changed since are found
    stale. ``attention``: the model's attention modules."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.attention = find_attention_modules(model)
        self.adapters_seen: dict[str, None] = {}

    def probes(self, rehash_adapters: bool) -> Probes:
        """Probes for one call: by content when the model's weight checks are ``"content"`` or the store rehashes
        adapters, else trusting version counters."""
        return Probes(fresh=rehash_adapters or weight_checks(self.model) == "content")

    def live(self, names, rehash_adapters: bool) -> CallIdentities:
        """The base identity and the identity of every adapter seen so far that the model still has (``names``
        first seen now)."""
        if self.model.training:
            raise ValueError("the model is in training mode; call model.eval() before forking from a ForkKVStore")
        for n in names:
            self.adapters_seen[n] = None
        loaded = set(available_adapters(self.model))
        seen = [n for n in self.adapters_seen if n in loaded]
        probes, factors = self.probes(rehash_adapters), kv_factors(self.model, seen, self.attention)
        base_fp, base_record = base_fingerprint(self.model, probes)
        fps = adapter_fingerprints(self.model, seen, probes, factors)
        return CallIdentities(base_fp, fps, base_record, factors, probes, module_settings(self.model))

    def may_need_residual(self, name: str) -> bool:
        """Whether the adapter has LoRA on some attention layer's K/V projection (without running the model)."""
        for attn in self.attention.values():
            for proj_name in ("k_proj", "v_proj", "qkv_proj"):
                lora_a = getattr(getattr(attn, proj_name, None), "lora_A", None)
                if lora_a is not None and name in lora_a:
                    return True
        return False
