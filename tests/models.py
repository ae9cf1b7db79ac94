"""Tiny random models and adapters for the tests (CPU, seconds)."""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM


def plain_peft(pm, fn):
    """``fn()`` with ForkKV off (plain PEFT, DynamicCache, SDPA: the exact reference), then ForkKV on again."""
    import forkkv_hf

    forkkv_hf.disable_forkkv(pm)
    try:
        return fn()
    finally:
        forkkv_hf.enable_forkkv(pm)


def tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2, vocab=128, dtype=torch.float32, seed=0, max_pos=512, **kw):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_pos,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="sdpa",
        **kw,
    )
    model = LlamaForCausalLM(config).to(dtype).eval()
    return model


def with_adapters(model, specs: dict, seed=0) -> PeftModel:
    """``specs``: adapter name -> LoraConfig kwargs (r, lora_alpha, target_modules, layers_to_transform, ...).
    B is random (init_lora_weights=False) and scaled up so that the adapters change the outputs visibly."""
    torch.manual_seed(seed)
    peft_model = None
    for name, kw in specs.items():
        kw = dict(kw)
        kw.setdefault("r", 4)
        kw.setdefault("lora_alpha", 8)
        kw.setdefault("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj"])
        cfg = LoraConfig(init_lora_weights=False, **kw)
        if peft_model is None:
            peft_model = get_peft_model(model, cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.mul_(8.0)
    return peft_model.eval()


def semantic_reference_cache(peft_model, context_ids, rows):
    """An independent build of ForkKV's *defined* context K/V, as a plain ``DynamicCache`` (one full copy per row).

    ForkKV's semantics: an agent's context K/V are the base model's (ONE base pass), plus the LoRA delta of its own
    K/V projections (PEFT's own forward with ``adapter_names``, minus the base layer) applied to that pass's hidden
    states, the K delta rotated with the layer's own cos/sin (transformers' ``apply_rotary_pos_emb``). Works for
    separate k_proj/v_proj and for a fused qkv_proj (its K and V slices). No forkkv_hf code is involved.
    """
    from transformers import DynamicCache
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from forkkv_hf.compat import cache_kwargs

    base = peft_model.get_base_model()
    cfg = base.config
    attns = [layer.self_attn for layer in base.model.layers]
    xs, pes = {}, {}
    hooks = []
    for i, attn in enumerate(attns):
        proj = attn.qkv_proj if hasattr(attn, "qkv_proj") else attn.k_proj
        hooks.append(proj.register_forward_pre_hook(lambda m, a, i=i: xs.__setitem__(i, a[0])))
        hooks.append(
            attn.register_forward_pre_hook(
                lambda m, a, kw, i=i: pes.__setitem__(i, kw["position_embeddings"]), with_kwargs=True
            )
        )
    ids = torch.as_tensor(context_ids).reshape(1, -1)
    base_cache = DynamicCache()
    with torch.no_grad(), peft_model.disable_adapter():
        base.model(input_ids=ids, use_cache=True, **cache_kwargs(base_cache))
    for h in hooks:
        h.remove()
    cache = DynamicCache()
    B = len(rows)

    def delta(proj, x):
        if not hasattr(proj, "lora_A"):
            return None
        return proj(x, adapter_names=list(rows)) - proj.base_layer(x)

    with torch.no_grad():
        for i, attn in enumerate(attns):
            x = xs[i].expand(B, -1, -1)
            T = x.shape[1]
            D = attn.head_dim
            kv = cfg.num_key_value_heads * D
            if hasattr(attn, "qkv_proj"):
                dq = delta(attn.qkv_proj, x)
                q_size = cfg.num_attention_heads * D
                dk = None if dq is None else dq[..., q_size : q_size + kv]
                dv = None if dq is None else dq[..., q_size + kv :]
            else:
                dk, dv = delta(attn.k_proj, x), delta(attn.v_proj, x)
            k = base_cache.layers[i].keys.expand(B, -1, -1, -1).clone()
            v = base_cache.layers[i].values.expand(B, -1, -1, -1).clone()
            if dk is not None:
                dk = dk.reshape(B, T, -1, D).transpose(1, 2)
                cos, sin = pes[i]
                _, dk = apply_rotary_pos_emb(dk, dk, cos, sin)
                k = k + dk
            if dv is not None:
                v = v + dv.reshape(B, T, -1, D).transpose(1, 2)
            cache.update(k, v, i)
    return cache
