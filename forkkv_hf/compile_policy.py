"""Whether a ``generate`` call with a :class:`~forkkv_hf.cache.ForkKVCache` compiles its decode step, and the cache
layout that follows from it.

transformers compiles the decode steps of ``generate`` (never the prefill; greedy search and sampling, not beam
search) when the cache is compileable and the model sits on CUDA/XPU (or ``compile_config._compile_all_devices`` is
set), unless ``disable_compile=True``; with its default ``CompileConfig`` that is inductor with
``mode="reduce-overhead"``: CUDA graphs. The ``generate`` wrapper (:mod:`forkkv_hf.peft.wrappers`, where this
module registers :func:`prepare_generate`) calls it before each call: where the step can compile, it switches the
cache to its static layout (:func:`forkkv_hf.static_cache.make_static`), whose layers are compileable, so
transformers' own compile path takes over (honouring ``disable_compile`` and the user's ``compile_config``), and a
PEFT model's ``adapter_names`` reach its LoRA layers through :class:`RowNames`; elsewhere the cache keeps (or goes
back to) the dynamic layout, which is not compileable, so decode runs eager, and
the reason is logged once.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from .compile_regions import compile_regions
from .config import get_config
from .generate_settings import generation_setting
from .ops.dispatch import TRITON_MAX_HEAD_DIM
from .peft import wrappers
from .peft.lora_factors import (
    PLANNED_ROWS,
    _modules_outside_lora,
    find_attention_modules,
    is_peft_model,
    kv_projections,
    transformers_model,
)
from .static_cache import make_dynamic, make_static, pooled_capacity
from .stop_check import deferring
from .peft.tp import is_dtensor

log = logging.getLogger(__name__)
_LOGGED: set = set()

#: a static cache's private capacity is rounded up to a multiple of this: fewer distinct shapes, fewer compiles
CAPACITY_STEP = 64
#: generate options whose decoding loop crops or re-runs the cache (assisted decoding) or compiles the prefill
EAGER_OPTIONS = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit", "prefill_chunk_size")


def _log_once(level: int, reason: str) -> None:
    if reason not in _LOGGED:
        _LOGGED.add(reason)
        log.log(level, "forkkv-hf: the decode step runs eager: %s", reason)


def round_capacity(tokens: int) -> int:
    """The private capacity a call needing ``tokens`` private tokens per row gets: a multiple of
    :data:`CAPACITY_STEP`."""
    return -(-tokens // CAPACITY_STEP) * CAPACITY_STEP


def private_capacity(cache, model, input_len: int, kwargs: dict) -> int:
    """Private tokens per row the call needs (the rows after the shared context, plus the new tokens), rounded up to
    a multiple of :data:`CAPACITY_STEP`."""
    # transformers' own rule (GenerationMixin._prepare_generated_length): max_new_tokens, from the call or its
    # generation config, wins over any max_length; without either, 20 new tokens (before, an unset max_length was
    # read as 20 in all, and a config's max_new_tokens lost to a max_length keyword: the call outgrew its static
    # buffers, an index error inside the compiled step)
    max_new = generation_setting(model, kwargs, "max_new_tokens")
    if max_new is None:
        max_length = generation_setting(model, kwargs, "max_length")
        max_new = 20 if max_length is None else max_length - input_len
    need = input_len - cache.num_shared_tokens + max(int(max_new), 1)
    return round_capacity(need)


def eager_reason(model, cache, kwargs: dict, capacity: int) -> tuple[int, str] | None:
    """``(log level, reason)`` why this call's decode step must run eager, or ``None`` if it can be compiled."""
    base = transformers_model(model)
    if generation_setting(model, kwargs, "disable_compile", False):
        return logging.INFO, "generate(disable_compile=True)"
    compile_config = generation_setting(model, kwargs, "compile_config")
    device = base.device
    if device.type not in ("cuda", "xpu") and not getattr(compile_config, "_compile_all_devices", False):
        return logging.INFO, (f"the model is on {device.type}; transformers compiles decode steps on CUDA/XPU "
                              "(CompileConfig._compile_all_devices = True compiles elsewhere)")
    devices = set(getattr(base, "hf_device_map", {}).values())
    if len(devices) > 1:
        return logging.WARNING, (f"the model is split over {sorted(map(str, devices))} (device_map); one CUDA graph "
                                 "cannot span devices")
    attn = find_attention_modules(model)
    proj = kv_projections(attn[0], base.config).k[0] if attn else None
    weight = getattr(getattr(proj, "base_layer", proj), "weight", None)
    if weight is not None and is_dtensor(weight):
        return logging.WARNING, "tensor parallelism (the batched LoRA's all-reduces are not captured)"
    if generation_setting(model, kwargs, "num_beams", 1) > 1:
        return logging.INFO, "beam search (transformers runs its decode steps eager)"
    if not generation_setting(model, kwargs, "use_cache", True):  # (the keyword is refused: guards)
        # generate then feeds whole rows at every step: eager forwards cut them to the new tokens, a compiled step
        # appended them (wrong tokens, or an index error inside the graph)
        return logging.INFO, "use_cache=False in the generation config (generate feeds whole rows at each step)"
    for name in EAGER_OPTIONS:
        if generation_setting(model, kwargs, name) is not None:
            return logging.WARNING, f"generate({name}=...) is not compiled with a ForkKVCache"
    window = _window_reason(cache, capacity)
    if window is not None:
        return logging.WARNING, window
    if is_peft_model(model):
        return _lora_reason(model, kwargs.get("adapter_names"))
    return None


def _window_reason(cache, capacity: int) -> str | None:
    """Why a sliding-window layer cannot hold the shared context plus ``capacity`` private tokens, or ``None``."""
    window = min((w for w in (getattr(l.shared, "sliding_window", None) for l in cache.layers) if w), default=None)
    if window and cache.num_shared_tokens + capacity > window:
        return (f"a sliding-window layer (window {window}) cannot hold the call's {cache.num_shared_tokens} shared "
                f"+ up to {capacity} private tokens")
    return None


def _lora_reason(model, adapter_names) -> tuple[int, str] | None:
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.utils.other import AuxiliaryTrainingWrapper

    from .peft.batched_lora import _can_batch, stacked_lora

    tuned = [m for m in _modules_outside_lora(transformers_model(model))
             if isinstance(m, (LoraLayer, AuxiliaryTrainingWrapper))]
    if not tuned:
        return None
    if model.training:
        return logging.WARNING, "the model is in training mode"
    if any(type(m) is not LoraLinear for m in tuned):
        return logging.WARNING, ("the model has LoRA on modules other than plain Linear layers (or modules_to_save / "
                                 "trainable tokens), whose mixed-adapter forward is PEFT's own")
    if adapter_names is None:
        return logging.WARNING, ("generate got no adapter_names; pass adapter_names=cache.adapter_names (one per "
                                 "row) to compile the decode step")
    if not getattr(model, "_forkkv_batched_lora", False):
        return logging.WARNING, ("batched LoRA is off (enable_forkkv(model, batched_lora=False)); PEFT's per-adapter "
                                 "loop is not compiled")
    used = set(adapter_names)
    if not all(_can_batch(layer, used) for layer in tuned):
        return logging.WARNING, ("a LoRA layer cannot be batched for these adapters (DoRA or another LoRA variant, or "
                                 "active dropout), so it runs PEFT's own code")
    if any(stacked_lora(layer, used).mixed_dtypes for layer in tuned):  # (the compiled step found no plan: a crash)
        return logging.WARNING, ("a LoRA layer holds adapters of different dtypes, which PEFT computes each in its own "
                                 "(its own code, not compiled)")
    return None


class RowNames:
    """A forward pre-hook that gives a LoRA layer ``adapter_names``, in place of the one PEFT's ``generate`` installs
    for the call: the names in eager forwards (the prefill), :data:`PLANNED_ROWS` in a compiled one. PEFT's hook holds
    the names in a ``functools.partial``, which dynamo guards name by name: every other mix of adapters would
    recompile the step. The names here are read only outside a compiled region."""

    def __init__(self, names: list):
        self.names = names

    def __call__(self, module, args, kwargs):
        kwargs["adapter_names"] = PLANNED_ROWS if torch.compiler.is_compiling() else self.names
        return args, kwargs


def compiled_generate(model, generate, args, kwargs):
    """``generate(*args, **kwargs)`` of a call whose decode step compiles: a PEFT model's ``adapter_names`` reach its
    LoRA layers through :class:`RowNames` hooks (removed afterwards) instead of PEFT's."""
    names = kwargs.get("adapter_names")
    if names is None or not is_peft_model(model):
        return generate(*args, **kwargs)
    from .peft.batched_lora import _lora_linears

    kwargs = {k: v for k, v in kwargs.items() if k != "adapter_names"}
    hook = RowNames(list(names))
    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in _lora_linears(model)]
    try:
        return generate(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()


def _use_triton(device) -> bool:
    backend = get_config().backend
    if backend not in ("auto", "triton") or (backend == "auto" and device.type != "cuda"):
        return False
    try:
        import forkkv_kernels  # noqa: F401
    except ImportError:
        return False
    return True


def prepare_generate(model, cache, input_ids, kwargs: dict, generate):
    """Before ``generate`` runs with ``cache``: the static layout if its decode step can be compiled, else the
    dynamic one (the reason logged once). Returns the callable to run the call with (``generate`` itself, or
    :func:`compiled_generate` around it)."""
    base = transformers_model(model)
    capacity = private_capacity(cache, model, input_ids.shape[1], kwargs)
    refused = eager_reason(model, cache, kwargs, capacity)
    if refused is not None:
        make_dynamic(cache)
        _log_once(*refused)
        return generate
    cfg = base.config
    device = cache.layers[0].shared.key.device
    use_triton = _use_triton(device) and cache.layers[0].shared.key.shape[-1] <= TRITON_MAX_HEAD_DIM
    if device.type == "cuda" and (not use_triton or getattr(cfg, "attn_logit_softcapping", None)):
        make_dynamic(cache)  # the PyTorch path's loop over context chunks would unroll into the graph
        _log_once(logging.WARNING, "the attention runs the PyTorch or SDPA path here (FORKKV_BACKEND, no Triton, "
                                   f"soft-capping, or head_dim above {TRITON_MAX_HEAD_DIM}), which is not compiled on "
                                   "CUDA")
        return generate
    # a longer call's pooled buffers, kept (no new buffers, no CUDA graphs recorded anew; transformers' own static
    # cache is reused so too) while at most twice the room needed: the private part reads the whole capacity
    pooled = pooled_capacity(cache)
    if capacity < pooled <= 2 * capacity and _window_reason(cache, pooled) is None:
        capacity = pooled
    make_static(cache, capacity, use_triton)

    # sampling calls check each step: the forward a deferred check runs too many draws its sample from the random
    # stream, which then was a step ahead of eager decode for the caller's next draws (tokens of a later call differed)
    sampling = bool(generation_setting(model, kwargs, "do_sample", False))

    def run(*a, **kw):
        regions = compile_regions(model) if get_config().compile_regions == "on" else contextlib.nullcontext()
        with deferring(cache, device, allowed=not sampling), regions:
            return compiled_generate(model, generate, a, kw)

    return run


if prepare_generate not in wrappers.GENERATE_PREPARERS:
    wrappers.GENERATE_PREPARERS.append(prepare_generate)
