"""What a ``ForkKVCache`` does about calls that fail: :class:`FailedCalls`, mixed into
:class:`~forkkv_hf.cache.ForkKVCache`. A call refused inside a layer (rows run by other adapters than the fork's,
a window outgrown) may have appended that layer's K/V, and the layers before it theirs; ``generate``'s wrapper
(:mod:`forkkv_hf.peft.wrappers`) marks the cache before a call and rolls it back when the call raises, a direct
forward is marked by the cache's forward pre-hook and undone at the cache's next use where the forward did not
return, and what cannot be undone is refused until ``reset()``."""

from __future__ import annotations


class FailedCalls:
    """Marks, roll back and the half-written check of a :class:`~forkkv_hf.cache.ForkKVCache` (its ``layers``,
    ``private_ids`` and ``reset``)."""

    def check_whole(self) -> None:
        """Refuse a cache a failed call left half-written: some layers hold tokens others do not (an exception inside
        a forward after its first layers appended)."""
        if self.__dict__.get("_rows_changed_by_failure"):
            raise ValueError("a call that failed changed this ForkKVCache's rows after it held tokens (beam search "
                             "reorders them); call cache.reset() to start its rows over, or fork a new cache")
        if getattr(self.layers[0], "capacity", None) is not None:
            return  # the static layout (compiled decode) counts on the device: not read here (a sync per layer)
        held = {layer.private_length() for layer in self.layers}  # (not the recorded ids: embeddings record none)
        if len(held) > 1:
            raise ValueError(f"this ForkKVCache was left half-written by a call that failed (its layers hold "
                             f"{sorted(held)} private tokens); call cache.reset() to start its rows over, or fork anew")

    def undo_failed_forward(self) -> None:
        """Undo what a direct forward appended before it raised (its mark is left where it did not return; before, a
        refusal at the last layer with K/V LoRA left a cache whose layers all held the refused call's tokens)."""
        mark = self.__dict__.pop("_direct_mark", None)
        if mark is not None:
            self.roll_back(mark)

    def mark(self) -> tuple:
        """What :meth:`roll_back` returns to: the rows, the private length (a ``generate`` call's start) and, in the
        dynamic layout, the recorded ``private_ids`` (the static one counts them on the device)."""
        rows, P = tuple(layer.rows for layer in self.layers), self.layers[0].private_length()
        return (rows, P) if getattr(self.layers[0], "capacity", None) is not None else (rows, P, self.private_ids)

    def roll_back(self, mark: tuple) -> None:
        """Undo what a failed call appended since :meth:`mark`. Where it changed the rows, a cache that held no
        private tokens goes back to its forked rows (generate's expansion for beams or ``num_return_sequences``);
        one that held tokens is refused at its next use (:meth:`check_whole`). The recorded ``private_ids`` go back
        to the mark's: a refused forward of another batch size had replaced them, not only appended (before, found
        by an audit, the next continuation of the cache's own rows was refused as not continuing them)."""
        rows, P, *ids = mark
        if rows != tuple(l.rows for l in self.layers):
            self.reset() if P == 0 else setattr(self, "_rows_changed_by_failure", True)
            return
        if getattr(self.layers[0], "capacity", None) is not None:  # static: the counters, on the device (no sync)
            for counter in [l.length for l in self.layers] + [self.__dict__.get("_ids_len")]:
                if counter is not None:
                    counter.clamp_(max=P)
            return
        for layer in self.layers:
            if layer.is_initialized and layer.private_length() > P:
                layer.keys, layer.values = layer.keys[..., :P, :], layer.values[..., :P, :]
        if ids:  # (the dynamic layout's ids are never written in place: the mark's tensor is as it was)
            self.private_ids = ids[0]
        elif self.private_ids is not None and self.private_ids.shape[1] > P:
            self.private_ids = self.private_ids[:, :P]
