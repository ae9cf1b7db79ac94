"""Training for fitted residuals: the agent fine-tuned on the context K/V that ``SharedContext.fit_residuals`` serves.

A fitted residual (:mod:`forkkv_hf.context.fitted`) keeps, per layer and kind, the best rank-``r`` approximation of
the agent's own context K/V minus the base's (K taken back before RoPE). At rank 64 it serves standard agents within
the interval of their exact-inference score on the context benchmark; at rank 8 it loses 25 points by generation
(README, "Fitted residuals by generation"). Training the agent *under* the rank-``r`` fit lets it learn to put what
its answers need into the top ``r`` directions of its drift, so that a smaller residual serves it.

``residual=FittedResidual(8)`` in :func:`~forkkv_hf.training.forkkv_loss` (and everywhere a ``residual`` is taken)
computes, per layer, the agent's own pass over the context (with grad, as ``"exact"`` does) and replaces its K/V by
``base + P_r(own - base)`` (K through ``RoPE⁻¹`` and back), ``P_r`` the projection onto the top-``r`` right singular
vectors of that context's drift, found as at inference (float64 Gram matrix, :func:`~forkkv_hf.context.fitted.
top_subspace`), per context of a :class:`~forkkv_hf.training.TrainingContext` over its own tokens (not its padding).
The forward equals fitted inference. Gradients flow through the drift and treat the subspace as fixed (it is computed
without grad): the projected drift's gradient, not the subspace's rotation, whose derivative divides by gaps between
singular values and is unstable where they meet. At ``r = H_kv·D`` over a context of at least that many tokens the
projection is the identity and the step is ordinary fine-tuning (``"exact"``), gradients included (over fewer tokens
the subspace is the drift's row space: the same forward, the gradient projected onto it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..context.fitted import check_full_rope, fit_ranks, top_subspace
from ..ops.rope import apply_rope, unapply_rope


@dataclass(frozen=True)
class FittedResidual:
    """The ``residual`` of a training call that trains for ``SharedContext.fit_residuals(model, names, rank,
    k_rank=k_rank)``: V's rank ``rank``, K's ``k_rank`` (``None``: ``rank``)."""

    rank: int
    k_rank: int | None = None

    def __post_init__(self):
        fit_ranks(self.rank, self.k_rank)  # refuses what fit_residuals refuses

    @property
    def ranks(self) -> tuple[int, int]:
        """(K's rank, V's rank)."""
        return fit_ranks(self.rank, self.k_rank)


#: the share of a drift's energy (‖m‖²) outside its top-``rank`` subspace below which the fit is the drift itself
WHOLE_DRIFT = 1e-10


def project_drift(d: torch.Tensor, rank: int, lengths: list[int]) -> torch.Tensor:
    """``d [n, H_kv, T, D]`` with each context's rows replaced by their best rank-``rank`` fit: per context ``i``, the
    ``[T, H_kv·D]`` drift times ``B·Bᵀ``, ``B`` the top right singular vectors of its first ``lengths[i]`` rows
    (no grad through ``B``). Where the drift's rank is within ``rank`` (all but :data:`WHOLE_DRIFT` of its energy
    kept), the fit is the drift itself and so is its gradient: ``B`` would hold directions of numerically zero
    singular values there, arbitrary, and the gradient through ``B·Bᵀ`` depended on rounding noise (0.7-0.9 off the
    true gradient at layer 0 of rank-4 agents under ``FittedResidual(8-16)``; an audit's finding)."""
    n, H, T, D = d.shape
    out = []
    for i in range(n):
        m = d[i].transpose(0, 1).reshape(T, H * D)
        _, B, kept = top_subspace(m[: lengths[i]].detach(), rank)
        B = B.to(m.dtype)
        fit = (m @ B) @ B.T
        if 1.0 - kept <= WHOLE_DRIFT:  # the context's own rows are kept whole, its padding projected as before
            fit = torch.cat([m[: lengths[i]], fit[lengths[i]:]])
        out.append(fit.reshape(T, H, D).transpose(0, 1))
    return torch.stack(out)


def fitted_kv(context, own: list, spec: FittedResidual) -> list:
    """Per layer ``(key, value)`` ``[n, H_kv, T, D]``: ``context``'s base K/V plus the rank-``spec`` fit of ``own``
    (the agent's own K/V over the same padded contexts, K after RoPE) minus them."""
    k_rank, v_rank = spec.ranks
    check_full_rope(context.layers)
    out = []
    for layer, (ke, ve) in zip(context.layers, own):
        kb, vb = layer.key, layer.value
        cos, sin = layer.cos.to(ke.dtype), layer.sin.to(ke.dtype)
        dk = project_drift(unapply_rope(ke - kb, cos, sin), k_rank, context.lengths)
        dv = project_drift(ve - vb, v_rank, context.lengths)
        out.append((kb + apply_rope(dk, cos, sin).to(kb.dtype), vb + dv.to(vb.dtype)))
    return out
