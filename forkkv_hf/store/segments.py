"""The tensors of a store segment, and the bytes the store holds.

A segment is a list of tensors whose entries may repeat one tensor object (``cos``/``sin`` shared by the layers of a
RoPE group, one ``u`` for K and V of a fused qkv_proj); every operation here keeps that sharing. Layouts (per layer
``l``): a base segment holds ``[key, value, cos, sin]`` at ``4l .. 4l+3`` (``[1, H_kv, n, D]`` and ``[n, D]``), a
residual segment ``[u_k, u_v]`` at ``2l, 2l+1`` (``[n, width]``, ``None`` where the adapter has no LoRA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..context import Residual, SharedContext
from ..context.segments import storage_bytes, unique_tensors  # noqa: F401 (re-exported)


def token_axis(t: torch.Tensor) -> int:
    return 2 if t.dim() == 4 else 0  # key/value [1, H_kv, n, D]; cos/sin [n, D]; u [n, w]


def owned(t: torch.Tensor) -> torch.Tensor:
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


def slice_tensors(tensors: list, a: int, b: int) -> list:
    """Own copies of tokens ``[a, b)`` of every tensor."""
    return _map_shared(tensors, lambda t: owned(t.narrow(token_axis(t), a, b - a)))


def head_tensors(tensors: list, k: int) -> list:
    """Views of the first ``k`` tokens of every tensor (no copy)."""
    return [t.narrow(token_axis(t), 0, k) for t in tensors]


def cat_tensors(parts: list[list]) -> list:
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
            done[key] = torch.cat([p[i] for p in parts], dim=token_axis(t))
        out.append(done[key])
    return out


class StorageLedger:
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
        for t in unique_tensors(tensors):
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
        for t in unique_tensors(tensors):
            key, nbytes = self._key(t)
            if not nbytes:
                continue
            entry = self._held[key]
            entry[0] -= 1
            if entry[0] == 0:
                del self._held[key]
                self.total -= entry[1]


# ------------------------------------------------------------------------------------------------ residuals
@dataclass
class AdapterFactor:
    """One adapter's scaled ``B`` ``[H_kv·D, width]`` for one projection of one layer; ``width = rank`` or
    ``rank + 1`` (the last column of ``u`` is then ones and this column is the scaled LoRA bias)."""

    B: torch.Tensor
    rank: int

    @property
    def width(self) -> int:
        return self.B.shape[-1]


def base_segment(seg: SharedContext, a: int, b: int) -> list:
    """Own copies of tokens ``[a, b)`` of a base pass's K/V and RoPE tables, in the base segment layout."""
    tensors = []
    for layer in seg.layers:
        tensors += [layer.key, layer.value, layer.cos, layer.sin]
    return slice_tensors(tensors, a, b)


def adapter_factors(seg: SharedContext, name: str):
    """The adapter's per-layer ``(k, v)`` :class:`AdapterFactor` (own copies) from a base pass's residual stacks,
    and their tensors. A layer keeps the bias column only if the adapter's LoRA bias is non-zero there (in K or V:
    a fused qkv_proj's K and V share one ``u``, so they share its width). This depends on the weights alone, so
    every pass over an identity gives the same widths."""
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
            pair.append(AdapterFactor(B, r))
            tensors.append(B)
        factors.append(tuple(pair))
    return factors, tensors


def residual_segment(seg: SharedContext, name: str, factors, a: int, b: int) -> list:
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
                done[key] = owned(part)
            out.append(done[key])
    return out


def stack_residuals(adapters: dict[str, tuple[list, list]], num_layers: int, kinds=(0, 1)):
    """Per layer ``(k_res, v_res)`` :class:`~forkkv_hf.context.Residual` stacks of ``adapters`` (name ->
    (per-layer factors, residual segment over the whole context), in order), and the tensors they hold. ``kinds``:
    ``(0, 1)`` for K and V residuals, ``(1,)`` for V only. One adapter reads its segment's ``u`` in place."""
    out, held = [], []
    stacked: dict[tuple, torch.Tensor] = {}
    for l in range(num_layers):
        pair = []
        for kind in (0, 1):
            present = [(name, factors[l][kind], seg[2 * l + kind])
                       for name, (factors, seg) in adapters.items() if kind in kinds and factors[l][kind] is not None]
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
    return out, unique_tensors(held)
