"""Content probes: exact, order-independent linear checksums of a tensor's bits, computed on its device.

Integer sums modulo 2^64, the same on every device and thread count, so a probe saved in one process can be checked
in another. Two forms:
- :func:`tensor_probe` (base weights, read at up to ~15 GB/s on one CPU core): the sums of the rows and of the
  columns of the tensor's bytes read as 64-bit words (rows of 256 words), each weighted by fixed pseudo-random odd
  numbers;
- :func:`factor_probe` (LoRA factors, small): the bilinear form ``Σ R_i Q_j x_ij`` of the elements' bit patterns,
  which is the same whether a factor lives alone or zero-padded in a batched-LoRA stack.
A changed word or element always changes a probe; other changes go unseen with probability about 2^-64. Not a
cryptographic hash. :class:`Probes` gathers the values of one call (one device sync per device) and remembers them on
each tensor, keyed by its version counter and storage, for calls that trust those.
"""

from __future__ import annotations

import torch

from ..peft.tp import local

_MEMO_ATTR = "_forkkv_probe"
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_ROW_WORDS = 256


_S = lambda c: c - (1 << 64) if c >= 1 << 63 else c  # noqa: E731  (uint64 constant as int64)
_C1, _C2, _C3 = _S(0x9E3779B97F4A7C15), _S(0xBF58476D1CE4E5B9), _S(0x94D049BB133111EB)
_WEIGHTS: dict[tuple, torch.Tensor] = {}


def _weights(n: int, device, salt: int) -> torch.Tensor:
    """``[n]`` fixed pseudo-random odd int64 (splitmix64 of the index), cached per device."""
    key = (n, str(device), salt)
    w = _WEIGHTS.get(key)
    if w is None:
        z = torch.arange(n, dtype=torch.int64, device=device) * _C1 + _S(salt * _C2 % (1 << 64))
        z = (z ^ (z >> 30)) * _C2
        z = (z ^ (z >> 27)) * _C3
        w = _WEIGHTS[key] = (z ^ (z >> 31)) | 1
    return w


def tensor_probe(t: torch.Tensor) -> torch.Tensor:
    """``[2]`` int64 on ``t``'s device: the weighted column and row sums of ``t``'s bytes read as 64-bit words."""
    t = local(t).detach()
    if t.device.type == "meta":
        return torch.zeros(2, dtype=torch.int64)
    if not t.is_contiguous():
        t = t.contiguous()
    b = t.reshape(-1).view(torch.uint8)
    if b.storage_offset() % 8:
        b = b.clone()
    n8 = b.numel() // 8
    m = n8 // _ROW_WORDS
    full = b[: m * _ROW_WORDS * 8].view(torch.int64).view(m, _ROW_WORDS)
    cols, rows = full.sum(0), full.sum(1)
    if b.numel() > m * _ROW_WORDS * 8:  # a partial last row: zero-padded to a whole one
        last = torch.zeros(8 * _ROW_WORDS, dtype=torch.uint8, device=t.device)
        rest = b[m * _ROW_WORDS * 8 :]
        last[: rest.numel()] = rest
        last = last.view(torch.int64)
        cols, rows = cols + last, torch.cat([rows, last.sum()[None]])
    return torch.stack([(cols * _weights(_ROW_WORDS, t.device, 1)).sum(),
                        (rows * _weights(rows.numel(), t.device, 2)).sum()])


def factor_probe(x: torch.Tensor) -> torch.Tensor:
    """``Σ_ij R_i Q_j bits(x[..., i, j])`` (int64, modulo 2^64) per leading index: ``[...]`` for ``x [..., M, N]``
    (``[1]`` for a 1-D ``x``). Zero rows or columns appended at the end (a factor padded in a stack) change nothing."""
    x = local(x).detach()
    if x.dim() == 1:
        x = x[None]
    bits = x.view(_INT_OF_SIZE[x.element_size()]).to(torch.int64)
    per_row = (bits * _weights(x.shape[-1], x.device, 3)).sum(-1)
    return (per_row * _weights(x.shape[-2], x.device, 4)).sum(-1)


class Probes:
    """Probe values for one call, each tensor probed at most once. ``fresh``: read every tensor (content mode);
    otherwise a probe remembered on the tensor is reused while its version counter and storage are unchanged."""

    def __init__(self, fresh: bool):
        self.fresh = fresh
        self.seen: dict[tuple, object] = {}

    def values(self, tensors, kind: str = "tensor") -> list:
        """Host values: ``(p0, p1)`` per tensor (``kind="tensor"``) or one int per factor (``kind="factor"``);
        ``None`` for ``None``. One device sync per device."""
        out, todo = [], {}
        for i, t in enumerate(tensors):
            if t is None:
                out.append(None)
                continue
            key = (id(t), kind)
            if key in self.seen:
                out.append(self.seen[key])
                continue
            memo = None if self.fresh else _memo(t, kind)
            out.append(memo)
            if memo is None:
                todo.setdefault(local(t).device, []).append(i)
        for device, idxs in todo.items():
            fn = tensor_probe if kind == "tensor" else factor_probe
            vals = torch.stack([fn(tensors[i]).reshape(-1) for i in idxs]).cpu().tolist()
            for i, v in zip(idxs, vals):
                out[i] = tuple(v) if kind == "tensor" else v[0]
                _remember(tensors[i], kind, out[i])
        for t, v in zip(tensors, out):
            if t is not None:
                self.seen[(id(t), kind)] = v
        return out


def stamp(t: torch.Tensor):
    """``(version, data pointer)`` of ``t``: moved by every write through ``t`` itself and by a new storage."""
    t = local(t)
    try:
        return t._version, t.data_ptr()
    except RuntimeError:  # inference-mode tensors have no version counter
        return None


def _memo(t, kind):
    cached, now = getattr(local(t), _MEMO_ATTR, None), stamp(t)
    if cached is None or now is None:
        return None
    return cached.get(kind) if cached.get("stamp") == now else None


def _remember(t, kind, value) -> None:
    now = stamp(t)
    if now is None:
        return
    t = local(t)
    cached = getattr(t, _MEMO_ATTR, None)
    if cached is None or cached.get("stamp") != now:
        cached = {"stamp": now}
    cached[kind] = value
    try:
        setattr(t, _MEMO_ATTR, cached)
    except (AttributeError, RuntimeError):  # tensor subclasses that take no attributes: no memo
        pass
