"""Compile the decoder layer once: regional compilation of a compiled decode step (``compile_regions="on"``).

transformers compiles the whole decode step, so dynamo traces and inductor compiles every decoder layer anew: 32
copies of one layer's code for an 8B model (on the H200 most of a first call's ~55 s, eval/results/
bench_decode_compiled_nvidia_h200.json). ``torch.compiler.nested_compile_region`` marks a function whose compiled
code is reused wherever it is called again with inputs of the same kind, and recompiled where they differ (a
different attention type, say). :func:`compile_regions` marks the decoder layers' ``forward`` for the duration of a
compiled ``generate`` and takes the mark off afterwards (the user's model is left as it was). Each layer gets its
own bound method, made once and reused by every later call, so dynamo's guards on it hold from call to call.
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn

from .peft.lora_factors import decoder_of, transformers_model

_REGIONS: dict = {}  # decoder layer class -> its forward marked as a nested compile region


def available() -> bool:
    """Whether this torch has nested compile regions (2.8 and later)."""
    return hasattr(torch.compiler, "nested_compile_region")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers (``get_decoder().layers``); empty where the model has no such list."""
    base = transformers_model(model)
    decoder = decoder_of(base) or getattr(base, "model", base)
    layers = getattr(decoder, "layers", None)
    return list(layers) if isinstance(layers, nn.ModuleList) else []


def _region_forward(layer: nn.Module):
    """``layer``'s forward marked as a nested compile region: one per layer, made at its first use."""
    bound = layer.__dict__.get("_forkkv_region_forward")
    if bound is None:
        cls = type(layer)
        if cls not in _REGIONS:
            _REGIONS[cls] = torch.compiler.nested_compile_region(cls.forward)
        bound = types.MethodType(_REGIONS[cls], layer)
        layer._forkkv_region_forward = bound
    return bound


@contextlib.contextmanager
def compile_regions(model: nn.Module):
    """Within: each decoder layer of ``model`` runs its forward as a nested compile region (a no-op outside a
    compiled region); on exit the layers' own ``forward`` is back. Does nothing where torch has no such regions or
    the model no decoder-layer list, or where a layer's ``forward`` is already set on the instance (someone else
    wraps it)."""
    layers = [m for m in decoder_layers(model) if "forward" not in m.__dict__] if available() else []
    marked = []
    try:
        for layer in layers:
            layer.forward = _region_forward(layer)
            marked.append(layer)
        yield len(marked)
    finally:
        for layer in marked:
            layer.__dict__.pop("forward", None)
