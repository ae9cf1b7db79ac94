"""forkkv-hf: many LoRA agents of one base model share the KV cache of a long context in Hugging Face transformers.

    import forkkv_hf
    forkkv_hf.enable_forkkv(peft_model)
    cache = forkkv_hf.ForkKVCache.from_context(peft_model, context_ids, adapter_names=names)
    inputs = forkkv_hf.batch_inputs(context_ids, prompts, pad_token_id=tok.pad_token_id)
    out = peft_model.generate(**inputs, adapter_names=names, **forkkv_hf.cache_kwargs(cache), max_new_tokens=64)

(``cache_kwargs``: ``cache=`` on transformers 5.24+, where ``past_key_values=`` warns, else ``past_key_values=``.)
"""

from .attention import forkkv_attention_forward, register_forkkv
from .cache import ForkKVCache, ForkKVLayer, ForkKVView, MemoryReport
from . import compile_policy  # noqa: F401  (registers the compiled-decode layout choice with generate)
from . import padded_ids  # noqa: F401  (registers the processors' left-packed ids with generate)
from .compat import CACHE_KWARG, cache_kwargs
from .config import ForkKVConfig, config_override, get_config, set_config
from .context import SharedContext, StaleContextError, set_weight_checks
from .enable import disable_forkkv, enable_forkkv, is_forkkv_enabled
from .inputs import batch_inputs
from .peft.batched_lora import batched_lora, disable_batched_lora, enable_batched_lora
from .peft.lora_factors import BASE_ADAPTER
from .ops.dispatch import residual_attention, residual_attention_torch
from .ops.naive import reference_attention
from .store import ForkKVStore

__version__ = "0.1.0"

__all__ = [
    "BASE_ADAPTER",
    "CACHE_KWARG",
    "ForkKVCache",
    "ForkKVConfig",
    "ForkKVLayer",
    "ForkKVStore",
    "ForkKVView",
    "MemoryReport",
    "SharedContext",
    "StaleContextError",
    "batch_inputs",
    "batched_lora",
    "cache_kwargs",
    "config_override",
    "disable_batched_lora",
    "disable_forkkv",
    "enable_batched_lora",
    "enable_forkkv",
    "forkkv_attention_forward",
    "get_config",
    "is_forkkv_enabled",
    "reference_attention",
    "register_forkkv",
    "residual_attention",
    "residual_attention_torch",
    "set_config",
    "set_weight_checks",
]
