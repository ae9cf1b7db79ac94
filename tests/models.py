"""Tiny random models and adapters for the tests (CPU, seconds)."""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM


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
    """An independent build of ForkKV's *defined* context K/V, as a plain ``DynamicCache``.

    ForkKV's semantics: every agent's context K/V come from its own k_proj/v_proj (base + LoRA, through PEFT's own
    forward) applied to the hidden states of ONE base-model pass, then RoPE. This computes exactly that with PEFT's
    and transformers' own code (no forkkv_hf code involved), one full K/V copy per row.
    """
    from transformers import DynamicCache
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from forkkv_hf.compat import cache_kwargs

    base = peft_model.get_base_model()
    attns = [layer.self_attn for layer in base.model.layers]
    xs, pes = {}, {}
    hooks = []
    for i, attn in enumerate(attns):
        hooks.append(attn.k_proj.register_forward_pre_hook(lambda m, a, i=i: xs.__setitem__(i, a[0])))
        hooks.append(
            attn.register_forward_pre_hook(
                lambda m, a, kw, i=i: pes.__setitem__(i, kw["position_embeddings"]), with_kwargs=True
            )
        )
    ids = torch.as_tensor(context_ids).reshape(1, -1)
    with torch.no_grad(), peft_model.disable_adapter():
        base.model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    cache = DynamicCache()
    B = len(rows)
    with torch.no_grad():
        for i, attn in enumerate(attns):
            x = xs[i].expand(B, -1, -1)
            T = x.shape[1]
            D = attn.head_dim
            k = attn.k_proj(x, adapter_names=list(rows)) if hasattr(attn.k_proj, "lora_A") else attn.k_proj(x)
            v = attn.v_proj(x, adapter_names=list(rows)) if hasattr(attn.v_proj, "lora_A") else attn.v_proj(x)
            k = k.view(B, T, -1, D).transpose(1, 2)
            v = v.view(B, T, -1, D).transpose(1, 2)
            cos, sin = pes[i]
            _, k = apply_rotary_pos_emb(k, k, cos, sin)
            cache.update(k, v, i)
    return cache
