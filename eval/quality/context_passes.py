"""The passes over the shared context: the base pass (inside ``SharedContext.build``, recorded by :class:`BaseStates`)
and each agent's own prefill (:func:`agent_prefill`), with what they tell per layer: how far the agent's states drift
from the base model's, and the error of the context K/V each variant uses against the agent's exact K/V."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_layers(pm):
    return [layer.self_attn for layer in pm.get_base_model().model.layers]


def decoder_layers(pm):
    return list(pm.get_base_model().model.layers)


def _first_tensor(x):
    return x[0] if isinstance(x, (tuple, list)) else x


class BaseStates:
    """Hooks that record, during the base pass over the context, each layer's k/v-projection input and output
    residual stream (``[T, d_model]`` each; k_proj and v_proj read the same input)."""

    def __init__(self, pm):
        self.x: dict[int, list[torch.Tensor]] = {}
        self.h: dict[int, list[torch.Tensor]] = {}
        self.handles = []
        for i, attn in enumerate(attention_layers(pm)):
            self.handles.append(attn.k_proj.register_forward_pre_hook(
                lambda m, args, i=i: self.x.setdefault(i, []).append(args[0][0].detach().clone())))
        for i, layer in enumerate(decoder_layers(pm)):
            self.handles.append(layer.register_forward_hook(
                lambda m, args, out, i=i: self.h.setdefault(i, []).append(_first_tensor(out)[0].detach().clone())))

    def remove(self):
        for h in self.handles:
            h.remove()
        # the base pass may run in chunks: join them along the tokens
        self.x = {i: torch.cat(v) for i, v in self.x.items()}
        self.h = {i: torch.cat(v) for i, v in self.h.items()}


def _lora_delta(module, adapter: str, x: torch.Tensor) -> torch.Tensor | None:
    """What ``adapter``'s LoRA adds to this projection's output for input ``x`` (None: no LoRA here)."""
    if adapter not in getattr(module, "lora_A", {}):
        return None
    return module.lora_B[adapter](module.lora_A[adapter](x)) * module.scaling[adapter]


def _truncated(m: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-``rank`` approximation of ``m [T, d]`` (truncated SVD, in fp32)."""
    U, S, Vh = torch.linalg.svd(m.float(), full_matrices=False)
    return ((U[:, :rank] * S[:rank]) @ Vh[:rank]).to(m.dtype)


def _rel_err(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx - exact).norm() / exact.norm().clamp_min(1e-12)).item()


@torch.no_grad()
def agent_prefill(pm, adapter: str, context_ids: torch.Tensor, base: BaseStates):
    """The agent's own pass over the context (its adapter active, plain PEFT): its ``DynamicCache`` for the exact
    variant, and per layer the drift of its states from the base pass and the error of each variant's context K/V.

    K errors are taken before RoPE: RoPE rotates each position by an orthogonal matrix, so the relative error of the
    rotated keys is the same. ``*_err_fitted``: the error of the best residual of the same size as ForkKV's (rank r of
    the adapter on that projection: ``u [T, r]`` and ``B [d_out, r]``) fitted to the agent's own K/V, i.e. the base K/V
    plus the rank-r truncated SVD of (exact - base); what a residual fitted after the agent's own prefill could reach
    (ForkKV's where the adapter has no LoRA on the projection: neither stores a residual there).
    """
    from transformers import DynamicCache

    from forkkv_hf import cache_kwargs

    n = len(attention_layers(pm))
    stats = {key: [0.0] * n for key in ("kv_input_cosine", "residual_cosine", "k_err_forkkv", "k_err_naive",
                                        "k_err_fitted", "v_err_forkkv", "v_err_naive", "v_err_fitted")}

    def proj_hook(i: int, kind: str):
        def hook(module, args, output):
            x_agent, exact = args[0][0], output[0]
            x_base = base.x[i].to(x_agent.dtype)
            if kind == "k":
                stats["kv_input_cosine"][i] = F.cosine_similarity(x_agent, x_base, dim=-1).mean().item()
            naive = module.base_layer(x_base)
            delta = _lora_delta(module, adapter, x_base)
            fork = naive if delta is None else naive + delta
            stats[f"{kind}_err_forkkv"][i] = _rel_err(fork, exact)
            stats[f"{kind}_err_naive"][i] = _rel_err(naive, exact)
            stats[f"{kind}_err_fitted"][i] = stats[f"{kind}_err_forkkv"][i] if delta is None else \
                _rel_err(naive + _truncated(exact - naive, module.r[adapter]), exact)

        return hook

    def layer_hook(i: int):
        def hook(module, args, out):
            h = _first_tensor(out)[0]
            stats["residual_cosine"][i] = F.cosine_similarity(h, base.h[i].to(h.dtype), dim=-1).mean().item()

        return hook

    handles = []
    for i, attn in enumerate(attention_layers(pm)):
        handles.append(attn.k_proj.register_forward_hook(proj_hook(i, "k")))
        handles.append(attn.v_proj.register_forward_hook(proj_hook(i, "v")))
    for i, layer in enumerate(decoder_layers(pm)):
        handles.append(layer.register_forward_hook(layer_hook(i)))
    cache = DynamicCache()
    try:
        pm.set_adapter(adapter)
        pm.get_base_model().model(input_ids=context_ids[None], use_cache=True, **cache_kwargs(cache))
    finally:
        for h in handles:
            h.remove()
    return cache, stats


def context_passes(pm, ctx: torch.Tensor, names, done=None):
    """The base pass over ``ctx`` (``SharedContext.build`` with ForkKV on, recorded by :class:`BaseStates`), then
    each agent's own prefill with ForkKV off (:func:`agent_prefill`). Returns ``(shared, own caches by agent,
    per-layer stats by agent)``; ForkKV is left off. ``done(phase, t0)``: called after each of the two parts
    (``base_pass_s``, ``agent_prefills_s``) with its start time."""
    import time

    import forkkv_hf
    from forkkv_hf import SharedContext

    done = done or (lambda phase, t0: None)
    t = time.perf_counter()
    forkkv_hf.enable_forkkv(pm)
    base = BaseStates(pm)
    try:
        shared = SharedContext.build(pm, ctx, list(names), progress=False)
    finally:
        base.remove()
    done("base_pass_s", t)
    t = time.perf_counter()
    forkkv_hf.disable_forkkv(pm)  # the exact variant is plain PEFT + DynamicCache + SDPA
    caches, stats = {}, {}
    for name in names:
        caches[name], stats[name] = agent_prefill(pm, name, ctx, base)
    done("agent_prefills_s", t)
    return shared, caches, stats


def stacked_cache(agent_caches: dict, rows: list[str]):
    """A ``DynamicCache`` whose row i is a copy of agent ``rows[i]``'s own context cache (the exact variant)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    n_layers = len(agent_caches[rows[0]].layers)
    for l in range(n_layers):
        keys = torch.cat([agent_caches[a].layers[l].keys for a in rows])
        values = torch.cat([agent_caches[a].layers[l].values for a in rows])
        cache.update(keys, values, l)
    return cache
