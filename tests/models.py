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
