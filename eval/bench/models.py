"""The benchmarks' model: a random Llama-3.1-8B-shaped causal LM (on one device or split over several) and many
random LoRA adapters added fast. Speed does not depend on weight values, so weights are random."""

from __future__ import annotations

import torch


def llama8b_config(layers: int = 32, vocab: int = 128256, max_pos: int = 131072, tiny: bool = False):
    """Llama-3.1-8B shapes; ``tiny``: the same structure at toy sizes, for CPU runs of the benchmark scripts."""
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=min(layers, 2),
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa")
    return LlamaConfig(
        vocab_size=vocab, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=max_pos,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, attn_implementation="sdpa",
    )


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_model(config, device=None, dtype=torch.bfloat16):
    """A randomly initialised causal LM built directly on ``device`` (no CPU copy, no checkpoint)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    device = device or default_device()
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return model.eval()


def build_model_split(config, devices, dtype=torch.bfloat16):
    """A random causal LM whose decoder layers are split in contiguous blocks over ``devices`` (embeddings on the
    first, final norm and head on the last), dispatched with accelerate's hooks as ``device_map`` loading does.
    Built on the meta device and materialised on each layer's device (no full copy anywhere). Returns the model
    and its device map."""
    import accelerate
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    n = config.num_hidden_layers
    per = -(-n // len(devices))
    dm = {"model.embed_tokens": devices[0], "model.rotary_emb": devices[0]}
    dm.update({f"model.layers.{i}": devices[i // per] for i in range(n)})
    dm.update({"model.norm": devices[-1], "lm_head": devices[-1]})
    with torch.no_grad():
        for name, dev in dm.items():
            module = model.get_submodule(name)
            if name == "model.rotary_emb":
                with torch.device(dev):  # its inv_freq is computed, not loaded
                    model.model.rotary_emb = LlamaRotaryEmbedding(config)
                continue
            module.to_empty(device=dev)
            for pname, p in module.named_parameters():
                if p.dim() == 1:
                    p.fill_(1.0)  # RMSNorm weights
                else:
                    p.normal_(0.0, config.initializer_range)
    accelerate.dispatch_model(model, device_map=dm, force_hooks=True)
    return model.eval(), dm


def add_random_adapters(model, names, rank=16, targets=("q_proj", "k_proj", "v_proj", "o_proj"), dtype=None,
                        b_std=0.01):
    """A ``PeftModel`` with one random LoRA adapter per name (non-zero B), all of the model's dtype.

    The first adapter comes from ``get_peft_model``; the others are written straight into each PEFT LoRA layer
    (the same ``lora_A``/``lora_B`` modules and bookkeeping ``update_layer`` creates), because ``add_adapter`` /
    ``update_layer`` move every existing adapter again for each new one, which is quadratic in the adapter count.
    On a tensor-parallel model (``tp_plan``) the new factors are sharded as PEFT shards the first adapter's.
    """
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import LoraLayer
    from torch import nn

    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), init_lora_weights=False)
    pm = get_peft_model(model, cfg, adapter_name=names[0], autocast_adapter_dtype=False)
    dtype = dtype or next(model.parameters()).dtype
    layers = [m for m in pm.modules() if isinstance(m, LoraLayer)]
    for name in names[1:]:
        pm.peft_config[name] = cfg
    with torch.no_grad():
        for layer in layers:
            dev = layer.get_base_layer().weight.device
            layer.lora_A[names[0]].to(dtype)
            layer.lora_B[names[0]].to(dtype)
            base = layer.get_base_layer()
            tp_plan = getattr(base, "_hf_tp_plan", None)  # tensor parallelism: PEFT stamps the plan on the layer
            for name in names[1:]:
                layer.lora_A[name] = nn.Linear(layer.in_features, rank, bias=False, device=dev, dtype=dtype)
                layer.lora_B[name] = nn.Linear(rank, layer.out_features, bias=False, device=dev, dtype=dtype)
                if tp_plan in ("colwise", "rowwise"):  # shard as PEFT shards the first adapter
                    from peft.tuners.lora.model import add_lora_tp_hooks_dtensor

                    part = "lora_B" if tp_plan == "colwise" else "lora_A"
                    add_lora_tp_hooks_dtensor(getattr(layer, part)[name], tp_plan, base._hf_device_mesh,
                                              base_layer=base, module_name=f"{part}.{name}")
                layer.lora_dropout[name] = nn.Identity()
                layer.r[name] = rank
                layer.lora_alpha[name] = 2 * rank
                layer.scaling[name] = 2.0
                layer.use_dora[name] = False
                layer.lora_bias[name] = False
                if hasattr(layer, "use_rslora"):
                    layer.use_rslora[name] = False
            for name in names:
                layer.lora_B[name].weight.normal_(0, b_std)
    return pm.eval()
