"""What shared K/V were computed from, and whether the model still has it: one mechanism for ``SharedContext``,
``ForkKVStore`` and batched LoRA.

A shared context's base K/V depend on every base weight; an agent's residuals ``u = x·Aᵀ`` and scaled ``B`` depend on
its K/V LoRA factors. Both are recorded when the context is computed (:func:`record_context`) and compared with the
model before each use (:func:`check_context`); the store keys its radix trees by fingerprints made of the same
values (:func:`base_fingerprint`, :func:`adapter_fingerprints`). Two kinds of evidence:

- **stamps** (free): the tensor object and its version counter. Every in-place write through the tensor
  (``param.mul_()`` under ``no_grad``, ``load_state_dict``, an optimizer step) bumps the counter; a reloaded or
  replaced tensor is another object. Writes through ``.data`` bump nothing.
- **content probes** (one read of the tensors, :mod:`forkkv_hf.context.probes`): an exact, order-independent linear
  checksum of the tensor's bits, computed on its device, portable across processes and devices.

Modes (:func:`set_weight_checks`, per model): ``"content"`` (the default) probes the base weights and the K/V LoRA
factors of the rows' adapters at every ``generate`` with a ForkKV cache and every store call, so writes through
``.data`` are caught too; it costs one read of the base weights per call (no cost per decode step). ``"versions"``
probes only tensors whose stamps moved (catches everything but ``.data`` writes, at no cost).
"""

from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from ..peft.lora_factors import (find_attention_modules, is_peft_model, kv_projections, lora_layer_of, refuse_offloaded,
                                 transformers_model)
from ..peft.tp import tp_world
from ..rope_checks import length_dependent_rope
from .probes import Probes, factor_probe, stamp
from .settings import base_modules, base_name, changed_settings, is_adapter_name, module_settings

MODES = ("content", "versions")
_MODE_ATTR = "_forkkv_weight_checks"


def set_weight_checks(model: nn.Module, mode: str) -> nn.Module:
    """``"content"`` (default): probe the weights' contents at every generate/store call (catches writes through
    ``.data``); ``"versions"``: trust version counters (free; misses ``.data`` writes). Returns ``model``."""
    if mode not in MODES:
        raise ValueError(f"weight checks must be one of {MODES}, got {mode!r}")
    setattr(transformers_model(model), _MODE_ATTR, mode)
    return model


def weight_checks(model: nn.Module) -> str:
    return getattr(transformers_model(model), _MODE_ATTR, "content")


# ----------------------------------------------------------------------------------------------- what is read
def base_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every base weight and buffer of the transformers model (LoRA and modules-to-save copies excluded), sorted by
    name; tied weights once. The walk skips the insides of PEFT tuner layers but for their base layer."""
    found: dict[int, tuple[str, torch.Tensor]] = {}
    # a length-dependent RoPE's frequency buffers are transformers' own state, replaced as sequences cross its limit
    # (a false "weights changed" after a long generate); the tables the context was rotated with are checked instead
    # (forkkv_hf.rope_checks)
    moving = length_dependent_rope(getattr(transformers_model(model), "config", None))
    for prefix, m in base_modules(model):
        for kind in (m._parameters, m._buffers):
            for n, t in kind.items():
                if moving and kind is m._buffers and n.endswith("inv_freq"):
                    continue
                if t is not None and id(t) not in found:
                    found[id(t)] = (prefix + n, t)
    named = [(base_name(n), t) for n, t in found.values() if not is_adapter_name(n)]
    return sorted(named, key=lambda x: x[0])


class Factor(NamedTuple):
    """One adapter's LoRA on one K/V projection: ``where`` (e.g. ``"layer 0 k_proj"``), the PEFT LoRA layer, its
    ``A [r, d_in]``, ``B [d_out, r]``, bias ``[d_out]`` or ``None``, and scaling."""

    where: str
    name: str
    layer: nn.Module
    A: torch.Tensor
    B: torch.Tensor
    bias: torch.Tensor | None
    scaling: float

    @property
    def tensors(self) -> tuple:
        return self.A, self.B, self.bias


def kv_factors(model: nn.Module, names, attention=None) -> dict[str, list[Factor]]:
    """Per adapter: a :class:`Factor` for each K/V projection it has LoRA on, in layer order."""
    out: dict[str, list[Factor]] = {n: [] for n in names}
    attention = find_attention_modules(model) if attention is None else attention
    config = transformers_model(model).config
    for idx, attn in sorted(attention.items()):
        proj = kv_projections(attn, config)
        mods = [(proj.k[0], "qkv_proj")] if proj.fused else [(proj.k[0], "k_proj"), (proj.v[0], "v_proj")]
        for module, label in mods:
            layer = lora_layer_of(module, f"layer {idx}")
            if layer is None:
                continue
            # direct dict reads: this runs for every adapter and K/V layer at every generate
            lora_a, lora_b = layer._modules["lora_A"]._modules, layer._modules["lora_B"]._modules
            for n in names:
                if n in lora_a:
                    pb = lora_b[n]._parameters
                    out[n].append(Factor(f"layer {idx} {label}", n, layer, lora_a[n]._parameters["weight"],
                                         pb["weight"], pb.get("bias"), float(layer.scaling[n])))
    return out


def all_factors(model: nn.Module, names) -> dict[str, list[Factor]]:
    """Per adapter: a :class:`Factor` for every LoRA layer it has, K/V or not (``where``: the module's name), in
    module order: what a residual fitted to the agent's own pass depends on (:mod:`forkkv_hf.context.fitted`)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    out: dict[str, list[Factor]] = {n: [] for n in names}
    for where, module in transformers_model(model).named_modules():
        if isinstance(module, TrainableTokensLayer):  # its new embedding rows change the agent's own pass too
            for n in names:
                if n in module.trainable_tokens_delta:
                    delta = module.trainable_tokens_delta[n]
                    out[n].append(Factor(where, n, module, delta, delta, None, 1.0))
            continue
        if not isinstance(module, LoraLayer):
            continue
        for n in names:
            if n in module.lora_A:
                pb = module.lora_B[n]._parameters
                out[n].append(Factor(where, n, module, module.lora_A[n].weight, pb["weight"], pb.get("bias"),
                                     float(module.scaling[n])))
            elif n in getattr(module, "lora_embedding_A", {}):
                out[n].append(Factor(where, n, module, module.lora_embedding_A[n], module.lora_embedding_B[n], None,
                                     float(module.scaling[n])))
    return out


def _factors(model: nn.Module, names, fitted) -> dict[str, list[Factor]]:
    """:func:`kv_factors` for ForkKV's residuals, :func:`all_factors` for the ``fitted`` ones."""
    names = list(names)
    plain = [n for n in names if n not in fitted]
    out = kv_factors(model, plain) if plain else {}
    if len(plain) < len(names):
        out.update(all_factors(model, [n for n in names if n in fitted]))
    return out


def _factor_values(entries: list[Factor], probes: Probes) -> list[tuple]:
    """Per entry: ``(A, B, bias)`` probe values. In content mode, factors that a batched-LoRA stack holds as their
    storage are probed in one pass per stack (all its adapters at once); the others one by one."""
    keys = [("factors", id(e.A), id(e.B), id(e.bias)) for e in entries]
    vals: list = [probes.seen.get(k) for k in keys]  # entries this call already probed
    by_stack: dict[int, list[int]] = {}
    for i, e in enumerate(entries):
        stack = e.layer.__dict__.get("_forkkv_stack")
        # the stack is the factors' storage: read it instead (one pass for all its adapters)
        if vals[i] is None and probes.fresh and getattr(stack, "views", False) and stack.holds(e):
            by_stack.setdefault(id(stack), []).append(i)
    pending = {}
    for idxs in by_stack.values():
        stack = entries[idxs[0]].layer._forkkv_stack
        slots = torch.tensor([stack.slot[entries[i].name] for i in idxs], device=stack.A.device)
        parts = [factor_probe(stack.A[slots]), factor_probe(stack.B[slots])]
        parts.append(factor_probe(stack.bias[slots][:, None]) if stack.bias is not None else parts[0])
        pending.setdefault(stack.A.device, []).append((idxs, torch.stack(parts, 1)))
    for groups in pending.values():  # one device sync per device
        host = torch.cat([v for _, v in groups]).cpu().tolist()
        for i, v in zip([i for idxs, _ in groups for i in idxs], host):
            vals[i] = (v[0], v[1], v[2] if entries[i].bias is not None else None)
    rest = [i for i, v in enumerate(vals) if v is None]
    flat = probes.values([t for i in rest for t in entries[i].tensors], kind="factor")
    for k, i in enumerate(rest):
        vals[i] = tuple(flat[3 * k : 3 * k + 3])
    probes.seen.update(zip(keys, vals))
    return vals


# ----------------------------------------------------------------------------------------------------- records
@dataclass
class WeightRecord:
    """Named entries and their values (probes, shapes, scalings: portable), plus, in the process that made it,
    per entry the tensor objects and version counters they had (to skip unchanged tensors in ``"versions"`` mode;
    dropped when pickled)."""

    names: tuple[str, ...]
    values: tuple
    refs: list | None = field(default=None, repr=False, compare=False)
    versions: list | None = field(default=None, repr=False, compare=False)

    def __getstate__(self):
        return {"names": self.names, "values": self.values, "refs": None, "versions": None}

    def adopt(self, groups) -> None:
        """Remember these tensor objects (per entry a tuple; their contents were just found equal to the record)."""
        self.refs = [tuple(None if t is None else weakref.ref(t) for t in g) for g in groups]
        self.versions = [tuple(None if t is None else stamp(t) for t in g) for g in groups]

    def unchanged(self, i: int, group) -> bool:
        """Stamp test: the same tensor objects, none written through itself since they were recorded."""
        if self.refs is None:
            return False
        return all((r is None and t is None) or (r is not None and r() is t and v == stamp(t))
                   for r, v, t in zip(self.refs[i], self.versions[i], group))

    def same_objects(self, i: int, group) -> bool:
        return self.refs is not None and all((r is None) == (t is None) and (r is None or r() is t)
                                             for r, t in zip(self.refs[i], group))


def _base_values(tensors, probes: Probes) -> list[tuple]:
    return [(str(t.dtype), tuple(t.shape), v) for t, v in zip(tensors, probes.values(tensors))]


def _base_record(model, probes: Probes) -> WeightRecord:
    named = base_tensors(model)
    tensors = [t for _, t in named]
    record = WeightRecord(tuple(n for n, _ in named), tuple(_base_values(tensors, probes)))
    record.adopt([(t,) for t in tensors])
    return record


def _adapter_values(entries: list[Factor], probes: Probes) -> list[tuple]:
    return [(tuple(e.A.shape), tuple(e.B.shape), e.scaling, v) for e, v in zip(entries, _factor_values(entries, probes))]


def _values_by_adapter(factors: dict, names, probes: Probes, todo: dict | None = None) -> dict[str, dict]:
    """Per adapter, ``{entry index: value}`` for its :class:`Factor` entries (only those in ``todo[name]`` if
    given): one pass over all adapters, so factors held by one stack are probed together."""
    flat = [(n, i, e) for n in names for i, e in enumerate(factors[n]) if todo is None or i in todo[n]]
    out: dict[str, dict] = {n: {} for n in names}
    for (n, i, _), v in zip(flat, _adapter_values([e for _, _, e in flat], probes)):
        out[n][i] = v
    return out


def adapter_records(factors: dict, names, probes: Probes) -> dict[str, WeightRecord]:
    """Per adapter in ``names``, the record of its K/V LoRA factors (``factors``: from :func:`kv_factors`)."""
    values = _values_by_adapter(factors, names, probes)
    records = {}
    for n in names:
        entries = factors[n]
        records[n] = WeightRecord(tuple(e.where for e in entries), tuple(values[n][i] for i in range(len(entries))))
        records[n].adopt([e.tensors for e in entries])
    return records


@dataclass
class ContextIdentity:
    """What a shared context was computed from: the base weights, and each adapter's K/V LoRA factors (all its LoRA
    factors for the adapters in ``fitted``, whose residuals were fitted to their own pass)."""

    base: WeightRecord
    adapters: dict[str, WeightRecord]
    fitted: frozenset = frozenset()
    settings: tuple | None = None  # :func:`~forkkv_hf.context.settings.module_settings` (None: not recorded)

    def __setstate__(self, state):  # files saved before ``fitted`` or ``settings`` existed
        self.__dict__.update({"fitted": frozenset(), "settings": None, **state})


def record_adapters(model: nn.Module, adapters, probes: Probes | None = None, fitted=()) -> dict[str, WeightRecord]:
    """The records of ``adapters``' LoRA factors now (K/V ones; all of them for those in ``fitted``, fitted to their
    own pass), without reading the base weights."""
    probes = probes or Probes(fresh=weight_checks(model) == "content")
    adapters = list(adapters)
    factors = _factors(model, adapters, frozenset(fitted)) if is_peft_model(model) else {n: [] for n in adapters}
    return adapter_records(factors, adapters, probes)


def record_context(model: nn.Module, adapters, probes: Probes | None = None, fitted=()) -> ContextIdentity:
    """The identity of the model's weights now, for a context with residuals of ``adapters`` (those in ``fitted``
    fitted to their own pass: all their LoRA factors are recorded)."""
    probes = probes or Probes(fresh=weight_checks(model) == "content")
    return ContextIdentity(_base_record(model, probes), record_adapters(model, adapters, probes, fitted),
                           frozenset(fitted), module_settings(model))


class StaleContextError(ValueError):
    """The weights a shared context was computed from are not the model's any more."""


_WHAT_TO_DO = ("build a new SharedContext with the model as it is now (a ForkKVStore recomputes what changed by "
               "itself)")


def _listed(items: list[str]) -> str:
    head = ", ".join(repr(x) for x in items[:3])
    return head + (f" and {len(items) - 3} more" if len(items) > 3 else "")


def check_context(identity: ContextIdentity, model: nn.Module, adapters, what: str = "this shared context") -> None:
    """Raise :class:`StaleContextError` (saying what changed and what to do) unless ``model``'s base weights and the
    K/V LoRA factors of ``adapters`` are those ``identity`` recorded. See the module docstring for the modes."""
    probes = Probes(fresh=weight_checks(model) == "content")
    _check_base(identity.base, model, probes, what)
    changed = [] if identity.settings is None else changed_settings(identity.settings, model)
    if changed:
        raise StaleContextError(
            f"the model's settings changed since {what} computed its K/V ({_listed(changed)}), so they no longer "
            f"match the model; {_WHAT_TO_DO}")
    adapters = [a for a in adapters if a in identity.adapters]
    if not adapters:
        return
    loaded = set(getattr(model, "peft_config", None) or {})
    gone = [a for a in adapters if a not in loaded]
    if gone:
        raise StaleContextError(
            f"adapter(s) {gone} were deleted from the model after {what} computed their residuals; load them "
            f"again and {_WHAT_TO_DO}, or fork rows without them")
    _check_adapters(identity, _factors(model, adapters, identity.fitted), adapters, probes, what)


def _check_base(record: WeightRecord, model, probes: Probes, what: str) -> None:
    named = base_tensors(model)
    refuse_offloaded(named)
    names = tuple(n for n, _ in named)
    if names != record.names:
        missing, new = sorted(set(record.names) - set(names)), sorted(set(names) - set(record.names))
        raise StaleContextError(
            f"the model's base weights are not those {what} was computed from (missing: {_listed(missing)}; "
            f"not there before: {_listed(new)}); {_WHAT_TO_DO}")
    tensors = [t for _, t in named]
    todo = [i for i, t in enumerate(tensors) if probes.fresh or not record.unchanged(i, (t,))]
    now = _base_values([tensors[i] for i in todo], probes)
    changed = [i for i, v in zip(todo, now) if v != record.values[i]]
    if changed:
        how = ("written (in place, through .data or by load_state_dict) or replaced" if record.refs is not None
               else "not the ones it was computed from (it was saved and loaded in another process)")
        raise StaleContextError(
            f"the model's base weights changed since {what} computed its base K/V: "
            f"{_listed([names[i] for i in changed])} {'was' if len(changed) == 1 else 'were'} {how}, so its K/V no "
            f"longer match the model; {_WHAT_TO_DO}")
    if todo and (not probes.fresh or record.refs is None):  # remember the objects for stamp checks
        record.adopt([(t,) for t in tensors])


def _check_adapters(identity: ContextIdentity, factors: dict, names, probes: Probes, what: str) -> None:
    todo = {}
    for name in names:
        record, entries = identity.adapters[name], factors[name]
        where = tuple(e.where for e in entries)
        if where != record.names:
            on = "the modules" if name in identity.fitted else "the K/V projections"
            raise StaleContextError(
                f"adapter {name!r} changed since {what} computed its residuals: it has LoRA on {on} "
                f"{list(where)} now, {list(record.names)} then (it was deleted and added again, or reloaded); "
                f"{_WHAT_TO_DO}")
        todo[name] = {i for i, e in enumerate(entries)
                      if probes.fresh or not record.unchanged(i, e.tensors) or e.scaling != record.values[i][2]}
    values = _values_by_adapter(factors, names, probes, todo)
    for name in names:
        record, entries = identity.adapters[name], factors[name]
        changed = sorted(i for i, v in values[name].items() if v != record.values[i])
        if changed:
            if record.refs is None:
                how = "differ from the ones it was computed from (it was saved and loaded in another process)"
            elif all(record.same_objects(i, entries[i].tensors) for i in changed):
                how = "were written (in place, through .data or by load_state_dict) or rescaled"
            else:
                how = "were replaced: the adapter was deleted and added again, or reloaded, with other weights"
            factors_of = "LoRA factors (its residuals were fitted to its own pass)" if name in identity.fitted \
                else "K/V LoRA factors"
            raise StaleContextError(
                f"adapter {name!r} changed since {what} computed its residuals: its {factors_of} at "
                f"{_listed([entries[i].where for i in changed])} {how}; {_WHAT_TO_DO}")
        if todo[name] and (not probes.fresh or record.refs is None):
            record.adopt([e.tensors for e in entries])


# ---------------------------------------------------------------------------------------- store fingerprints
#: config keys that do not change what the model computes (runtime switches, provenance)
_BASE_CONFIG_IGNORED = {"transformers_version", "use_cache", "return_dict", "output_attentions",
                        "output_hidden_states", "dtype", "torch_dtype"}
_ADAPTER_CONFIG_IGNORED = {"base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping"}


def _json(d: dict, ignored: set) -> bytes:
    kept = {k: v for k, v in d.items() if k not in ignored and not k.startswith("_")}
    return json.dumps(kept, sort_keys=True, default=lambda x: sorted(map(str, x)) if isinstance(x, (set, frozenset))
                      else str(x)).encode()


def base_fingerprint(model: nn.Module, probes: Probes) -> tuple[str, WeightRecord]:
    """The base model's identity for a store's trees: sha256 over its class, config, device, compute dtype, tensor
    parallel rank and :func:`base_tensors`' names and probes; and the record of those (for a fork's context)."""
    base = transformers_model(model)
    record = _base_record(model, probes)
    first = next(base.parameters())
    tp_rank, tp_size = tp_world(base)  # a rank's shards are other bytes than its peers'
    h = hashlib.sha256(type(base).__name__.encode())
    h.update(_json(base.config.to_dict(), _BASE_CONFIG_IGNORED))
    h.update(f"{first.device}|{getattr(base, 'dtype', first.dtype)}|tp{tp_rank}/{tp_size}".encode())
    h.update(repr((record.names, record.values, module_settings(model))).encode())
    return h.hexdigest(), record


def adapter_fingerprints(model: nn.Module, names, probes: Probes, factors: dict | None = None) -> dict[str, str]:
    """Each adapter's identity for a store's trees, independent of its name: sha256 over its ``LoraConfig``
    (provenance fields excluded) and its K/V LoRA factors' places, shapes, scalings and probes (what its residuals
    depend on; its LoRA elsewhere does not change them)."""
    names = list(names)
    for name in names:
        if not is_peft_model(model) or name not in model.peft_config:
            raise ValueError(f"{name!r} is not an adapter of this model; load it with peft first")
    factors = factors or kv_factors(model, names)
    values = _values_by_adapter(factors, names, probes)
    out = {}
    for name in names:
        h = hashlib.sha256(_json(model.peft_config[name].to_dict(), _ADAPTER_CONFIG_IGNORED))
        h.update(repr(([e.where for e in factors[name]], [values[name][i] for i in range(len(factors[name]))])).encode())
        out[name] = h.hexdigest()
    return out
