"""Fitted residuals: an agent's rCache fitted to its own pass over the context.

ForkKV's residual ``u = x_base·Aᵀ`` restores what the agent's K/V LoRA makes of the *base model's* hidden states;
the drift that its LoRA on q/o/MLP causes in later layers' K/V is lost. On the context benchmark that is most of the
agent's score (README, "Training agents for ForkKV": 38.5 against 73.4 under exact inference), while the best
rank-8 residual fitted to the agent's own K/V keeps 62.0, rank 64 keeps 70.3.

:func:`fit_residuals` runs each agent's own pass over the context once (the compute of the plain path's prefill, one
agent's full K/V alive at a time) and keeps, per layer and kind, the best rank-``r`` approximation of ``own − base``
(K taken back before RoPE; truncated SVD through the ``[H_kv·D]²`` Gram matrix in float64): ``u = M·V_r`` ``[T, r]``
and ``B = V_r`` ``[H_kv·D, r]``, the rCache layout every fork, kernel and memory report already reads. The shared
base is untouched; at ``r = H_kv·D`` the fork reproduces the agent's own K/V (up to the cache dtype's rounding).
K and V may take different ranks (``k_rank``; a V rank costs the decode step more than a K rank): which kind needs
the rank depends on the agent (on that benchmark ``next_speaker`` keeps at K 64 / V 16 the answers of 64 / 64,
``next_line`` loses 6.2 points there and is exact only at 64 / 64).
Because the residual now depends on every LoRA weight of the agent (not only its K/V factors), the context's
identity records all of them for fitted agents: a generate after any of them changes is refused.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..ops.rope import unapply_rope
from ..peft.lora_factors import check_adapter_names, is_peft_model, transformers_model
from .base_pass import cache_dtype, check_chunk_size, run_base_pass
from .segments import Residual


def check_fittable(model: nn.Module, names) -> list[str]:
    """The distinct adapter names, after refusing what a fitted residual cannot stand for."""
    if not is_peft_model(model):
        raise TypeError("fit_residuals needs a peft.PeftModel with the agents' LoRA adapters (the base model's rows "
                        "need no residual)")
    if isinstance(names, str):
        raise TypeError(f"adapter_names must be a list of adapter names, not the string {names!r}")
    names = list(dict.fromkeys(names))
    if not names:
        raise ValueError("fit_residuals got no adapter names; name the agents whose residuals to fit")
    check_adapter_names(model, names)
    if "__base__" in names:
        raise ValueError("'__base__' reads the shared base K/V as they are; it has nothing to fit")
    for n in names:
        cfg = model.peft_config[n]
        if type(cfg).__name__ != "LoraConfig":
            raise ValueError(f"adapter {n!r} is a {type(cfg).__name__}; fitted residuals are for LoRA adapters")
        if getattr(cfg, "modules_to_save", None):
            raise ValueError(f"adapter {n!r} trains whole modules ({cfg.modules_to_save}); the context identity "
                             "cannot record them, so a fitted residual could go stale silently. Merge or drop them.")
    _refuse_unfittable(model, names)
    return names


def _refuse_unfittable(model: nn.Module, names) -> None:
    """Refuse disabled adapters (the agents' own passes would be the base model's) and agents with a LoRA variant
    anywhere (DoRA, KaSA, aLoRA, ...): a variant's own tensors (KaSA's ``lora_diag``, DoRA's magnitudes) are not in
    the context's record of a fitted agent, so a fit could go stale silently after they change (KaSA: 0.016 off,
    unrefused), and PEFT's per-row forward refuses DoRA."""
    from peft.tuners.lora import LoraLayer

    for where, module in transformers_model(model).named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if module.disable_adapters:  # an agent's own pass would be the base model's: a zero drift, "fit" 1.0
            raise ValueError(f"the adapters are disabled ({where}: disable_adapter_layers(), or inside "
                             "disable_adapter()); the agents' own passes would be the base model's. Enable them "
                             "before fitting residuals")
        for n in names:
            variant = module.lora_variant.get(n) if hasattr(module, "lora_variant") else None
            if module.use_dora.get(n, False) or variant is not None:
                kind = "DoRA" if module.use_dora.get(n, False) else type(variant).__name__
                raise ValueError(
                    f"adapter {n!r} on {where} is a LoRA variant ({kind}); fitted residuals serve plain LoRA agents "
                    "(an Activated LoRA agent needs no fit: ForkKV's own residual is exact for it). Serve this agent "
                    "with plain PEFT.")


def _own_pass(model: nn.Module, ids: torch.Tensor, adapter: str, chunk_size, progress: bool):
    """The agent's own K/V over ``ids`` ``[T]`` (its adapter active through PEFT's ``adapter_names``): per layer
    ``(key, value)`` ``[1, H_kv, T, D]``, key after RoPE."""
    cache = run_base_pass(model, transformers_model(model), ids, chunk_size, progress, lambda t0: None,
                          adapter=adapter)
    return [(layer.keys, layer.values) for layer in cache.layers]


def top_subspace(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(u [T, r], B [W, r], retained)`` with ``u·Bᵀ`` the best rank-``r`` approximation of ``m`` ``[T, W]``
    (Eckart-Young): ``B`` the top right singular vectors, from the float64 Gram matrix; ``r = min(rank, T, W)``;
    ``retained``: the share of ``‖m‖²`` the fit keeps (1.0 for a zero ``m``)."""
    r = min(rank, *m.shape)
    m = m.double()
    evals, evecs = torch.linalg.eigh(m.T @ m)
    order = evals.argsort(descending=True)
    B = evecs[:, order[:r]]
    total = evals.clamp_min(0).sum().item()
    retained = evals[order[:r]].clamp_min(0).sum().item() / total if total > 0 else 1.0
    return m @ B, B, min(retained, 1.0)


def fit_ranks(rank, k_rank=None) -> tuple[int, int]:
    """``(K's rank, V's rank)`` of a fit at ``rank`` (K at ``k_rank`` where given), refusing what is not a positive
    int."""
    for what, r in (("rank", rank), ("k_rank", rank if k_rank is None else k_rank)):
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"{what} must be a positive int (the residual's rank per layer and kind), got {r!r}")
    return (rank if k_rank is None else k_rank, rank)


def check_full_rope(layers) -> None:
    """Refuse layers (with ``key``, ``cos`` and ``sin``) whose rotary tables are narrower than the head or not
    rotate-half tables (each half the same angles): a fitted K residual is taken back through rotate-half RoPE over
    the whole head and rotated again by the attention, which undo each other only with such tables (Cohere's
    interleaved tables, repeated per pair of dimensions, made a full-width fit 0.04 off its agent, silently)."""
    for idx, layer in enumerate(layers):
        if layer.cos.shape[-1] != layer.key.shape[-1]:
            raise ValueError(
                f"layer {idx} rotates only {layer.cos.shape[-1]} of its {layer.key.shape[-1]} head dimensions "
                "(partial rotary); a fitted K residual assumes full rotate-half RoPE")
        half = layer.cos.shape[-1] // 2
        if not all(torch.equal(t[..., :half], t[..., half:]) for t in (layer.cos, layer.sin)):
            raise ValueError(
                f"layer {idx}'s rotary tables are not rotate-half tables (their two halves differ: interleaved RoPE, "
                "as Cohere's); a fitted K residual assumes rotate-half RoPE. Serve these agents with plain PEFT, or "
                "with ForkKV's own residual where their LoRA is on v_proj only")


@torch.no_grad()
def fit_residuals(context, model: nn.Module, adapter_names, rank: int, *, k_rank: int | None = None,
                  chunk_size=4096, progress: bool = True):
    """``(per layer (k_res, v_res), retained)``: one :class:`Residual` per kind holding the fitted residuals of
    ``adapter_names`` (in that order), rank ``min(rank, T, H_kv·D)`` (K: ``k_rank`` where given), u and B in the
    cache's dtype; ``retained``: per adapter, per kind, per layer, the share of the drift the fit keeps.
    ``context``: the whole :class:`~forkkv_hf.context.SharedContext` (its base K/V and RoPE tables)."""
    ranks = fit_ranks(rank, k_rank)  # per kind: K, V
    check_chunk_size(chunk_size)
    names = check_fittable(model, adapter_names)
    if model.training:
        raise ValueError("the model is in training mode; call model.eval() before fitting residuals")
    dtype = cache_dtype(transformers_model(model))
    check_full_rope(context.layers)
    device = context.layers[0].key.device
    ids = context.token_ids.to(device)
    per_layer = [([], []) for _ in context.layers]  # per layer: per kind, per agent (u, B)
    retained = {n: {"k": [], "v": []} for n in names}
    for name in tqdm(names, desc="forkkv: fitting residuals", unit="agent", disable=not progress):
        own = _own_pass(model, ids, name, chunk_size, progress)
        if len(own) != len(context.layers):
            raise RuntimeError(f"{name}'s pass cached {len(own)} layers, the context has {len(context.layers)}")
        for idx, ((ke, ve), layer) in enumerate(zip(own, context.layers)):
            kb, vb = layer.key, layer.value
            if ke.shape != kb.shape:
                raise RuntimeError(f"layer {idx}: {name}'s own K is {tuple(ke.shape)}, the base K {tuple(kb.shape)}")
            n, H, T, D = kb.shape
            dk = unapply_rope(ke.float() - kb.float(), layer.cos.float(), layer.sin.float())
            for kind, d in enumerate((dk, ve.float() - vb.float())):
                u, B, kept = top_subspace(d[0].transpose(0, 1).reshape(T, H * D), ranks[kind])
                per_layer[idx][kind].append((u.to(dtype), B.to(dtype)))
                retained[name]["kv"[kind]].append(round(kept, 6))
        del own
    out = []
    for kinds in per_layer:
        pair = []
        for entries in kinds:
            r = max(u.shape[-1] for u, _ in entries)
            pad = lambda t: torch.nn.functional.pad(t, (0, r - t.shape[-1]))  # noqa: E731
            pair.append(Residual(tuple(names), torch.stack([pad(u) for u, _ in entries]),
                                 torch.stack([pad(B) for _, B in entries]), tuple(u.shape[-1] for u, _ in entries)))
        out.append(tuple(pair))
    return out, retained


def without(res: Residual | None, names) -> Residual | None:
    """``res`` less the slots of ``names`` (``None`` when nothing is left)."""
    if res is None:
        return None
    keep = [i for i, a in enumerate(res.adapters) if a not in set(names)]
    if len(keep) == len(res.adapters):
        return res
    if not keep:
        return None
    idx = torch.tensor(keep, device=res.u.device)
    return Residual(tuple(res.adapters[i] for i in keep), res.u.index_select(0, idx),
                    res.B.index_select(0, idx.to(res.B.device)), tuple(res.ranks[i] for i in keep))
