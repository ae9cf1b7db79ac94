"""What forkkv-hf installs on a ``PeftModel`` (by ``enable_forkkv`` / ``enable_batched_lora``), in one place.

Instance-level wrappers around ``generate`` and ``forward`` of the ``PeftModel``. Both hold the model's lock
(:mod:`forkkv_hf.model_lock`) for the whole call, so that calls from several threads, which would interleave PEFT's
per-call ``adapter_names`` hooks and ForkKV's base passes, run one after the other. At every call they:
- starts a new *call epoch* (:mod:`forkkv_hf.peft.calls`), so the batched-LoRA plans of the previous call (which rows
  use which adapter, checked against the adapters' weights) are rebuilt once and then reused by every decode step of
  this call;
- runs the ``BEFORE_GENERATE`` hooks (batched LoRA registers one that patches LoRA layers created since it was
  enabled: an adapter added on new modules);
- removes PEFT's ``adapter_names`` pre-forward hooks if ``generate`` raises: peft (0.21) registers them for the
  duration of the call but does not remove them on an exception, which breaks every later call of the model.
A ``save_pretrained`` wrapper runs the ``BEFORE_SAVE`` hooks (batched LoRA registers one that gives the LoRA
parameters their own storage back: they are views of its stacks), so that every format writes only the saved
adapter's tensors.
The ``forward`` wrapper starts a new epoch at each direct ``model(...)`` call too. Before a ``generate``
with a ``ForkKVCache`` it runs the cache's input checks (``ForkKVCache.check_generate_inputs``) and picks the cache's
layout (static where the decode step compiles, :mod:`forkkv_hf.compile_policy`), and a forward pre-hook on the
transformers model records the tokens each forward appends to a ``ForkKVCache``.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..guards import generate_cache
from ..model_lock import model_call
from .calls import new_call
from .lora_factors import is_peft_model

#: run before every ``generate`` of a model that has batched LoRA enabled: ``fn(model)``
#: (:mod:`forkkv_hf.peft.batched_lora` registers the patching of new LoRA layers)
BEFORE_GENERATE: list = []
#: run before every ``save_pretrained``: ``fn(model)`` (batched LoRA registers the release of its stacks)
BEFORE_SAVE: list = []
#: run before a ``generate`` with a ``ForkKVCache``, after its checks: ``fn(model, cache, input_ids, kwargs,
#: generate) -> generate`` (:mod:`forkkv_hf.compile_policy` registers the layout choice for compiled decode)
GENERATE_PREPARERS: list = []


def remove_stale_peft_hooks(model: nn.Module) -> int:
    """Remove PEFT's ``adapter_names`` pre-forward hooks left behind on LoRA layers; returns how many."""
    removed = 0
    for module in model.modules():
        hooks = module._forward_pre_hooks
        for hook_id, hook in list(hooks.items()):
            func = getattr(hook, "func", None)
            if getattr(func, "__name__", "") == "_adapter_names_pre_forward_hook":
                del hooks[hook_id]
                module._forward_pre_hooks_with_kwargs.pop(hook_id, None)
                removed += 1
    return removed


class _Wrapper:
    """An installed wrapper: ``kind`` (``"forward"``, ``"save_pretrained"``, ``"generate"``) around ``inner`` (the bound
    method it replaced) of ``target``, running against ``model``. An object, not a closure, so that a deep copy or a
    pickle of the model carries wrappers bound to the copy (a closure's captured model stayed the original's: a
    deep-copied model ran the original's forward, silently)."""

    _forkkv_wrapper = True

    def __init__(self, kind: str, model: nn.Module, target: nn.Module, inner):
        self.kind, self.model, self.target, self.__wrapped__ = kind, model, target, inner
        self.__doc__, self.__name__ = inner.__doc__, getattr(inner, "__name__", kind)

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():  # traced (generate compiles a plain model's forward, wrapper and all): the
            return self.__wrapped__(*args, **kwargs)  # eager call around the trace holds the lock
        with model_call(self.model) as outer:
            if self.kind == "generate":
                # PEFT's adapter_names hooks of no running call (a copy made mid-call carries them). Only a PeftModel's
                # own generate is sure to run before PEFT's: a transformers model's runs inside the generate of a
                # PeftModel around it, whose hooks for this very call these are (before, found by an audit, ForkKV
                # enabled on the model before get_peft_model removed them: every row ran the active adapter)
                if outer == 0 and is_peft_model(self.model):
                    remove_stale_peft_hooks(self.model)
                return _generate(self.target, self.model, self.__wrapped__, args, kwargs)
            if self.kind == "save_pretrained":
                # batched LoRA's stacks are the adapters' storage: a torch.save of a view writes its whole storage
                # (every adapter of the layer), so the parameters get their own storage back first
                for hook in BEFORE_SAVE:
                    hook(self.model)
                return self.__wrapped__(*args, **kwargs)
            new_call()
            try:
                return self.__wrapped__(*args, **kwargs)
            except BaseException:
                if outer == 0:  # PEFT leaves its adapter_names hooks when a forward raises (later calls ran them)
                    remove_stale_peft_hooks(self.model)
                raise


def install(model: nn.Module) -> None:
    """Install the ``generate`` and ``forward`` wrappers (idempotent)."""
    for name in ("forward", "save_pretrained"):
        if hasattr(model, name) and not getattr(model.__dict__.get(name), "_forkkv_wrapper", False):
            setattr(model, name, _Wrapper(name, model, model, getattr(model, name)))
    install_generate(model, model)


def install_generate(target: nn.Module, model: nn.Module) -> None:
    """Wrap ``target.generate`` (idempotent): ``model`` itself, or the transformers model inside the ``PeftModel``
    ``model``, whose own ``generate`` a caller can reach (``peft_model.get_base_model().generate``); the checks and
    hooks run against ``model`` once per call, the inner wrapper passing a call of the outer one straight through
    (before, a generate of the inner model skipped every check: a used cache served new prompts, stale residuals
    served)."""
    installed = target.__dict__.get("generate")
    if not getattr(installed, "_forkkv_wrapper", False):
        target.generate = _Wrapper("generate", model, target, target.generate)
    elif installed.model is not model and is_peft_model(model):  # ForkKV was enabled on the transformers model first:
        target.generate = _Wrapper("generate", model, target, installed.__wrapped__)  # the PeftModel's checks, once


def _generate(target: nn.Module, model: nn.Module, inner, args: tuple, kwargs: dict):
    cache = generate_cache(kwargs)  # refuses past_key_values= and cache= at once
    if target is not model and cache is not None and "_generate_forwards" in cache.__dict__:
        return inner(*args, **kwargs)  # inside the PeftModel's wrapped generate: checked there
    if getattr(model, "_forkkv_batched_lora", False):
        for hook in BEFORE_GENERATE:
            hook(model)
    call, mark = inner, None
    if cache is not None and hasattr(cache, "check_generate_inputs"):
        input_ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
        cache.check_generate_inputs(model, input_ids, kwargs)
        for prepare in GENERATE_PREPARERS:
            call = prepare(model, cache, input_ids, kwargs, call)
        # this call's forwards after its first are decode steps, on inputs generate made itself: they skip
        # the forward checks that read tensor values (ForkKVCache.prepare_forward)
        cache._generate_forwards = 0
        cache._generate_ids = input_ids  # a prefill given inputs_embeds records its tokens from them
        mark = cache.mark()
    new_call()
    try:
        return call(*args, **kwargs)
    except BaseException:
        remove_stale_peft_hooks(model)
        if mark is not None:  # what the failed call appended (a refusal inside a layer, an interrupt) is undone
            cache.roll_back(mark)
        raise
    finally:
        if cache is not None:  # a weight check of this call covers none of the next direct forwards
            cache.__dict__.pop("_weights_checked", None)
            cache.__dict__.pop("_generate_forwards", None)
            cache.__dict__.pop("_generate_ids", None)


def _forkkv_cache(module, args: tuple, kwargs: dict):
    """``(cache, args, kwargs)``: the ForkKVCache a forward of ``module`` appends to (or ``None``), with the arguments
    bound by name where it came positionally (``model(ids, mask, pos, cache)``: before, every check was skipped)."""
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    if cache is not None or not any(hasattr(a, "prepare_forward") for a in args):
        return (cache if hasattr(cache, "prepare_forward") else None), args, kwargs
    sig = inspect.signature(module.forward)
    named = {}
    for name, value in sig.bind_partial(*args, **kwargs).arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"pass the ForkKVCache to {type(module).__name__} by keyword (past_key_values=)")
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    cache = named.get("past_key_values", named.get("cache"))
    return (cache if hasattr(cache, "prepare_forward") else None), (), named


def _record_tokens_hook(module, args, kwargs):
    cache, run_args, run_kwargs = _forkkv_cache(module, args, kwargs)
    if cache is not None:  # checks the inputs, records the tokens
        changed = cache.prepare_forward(module, run_args, run_kwargs)
        return changed or (None if run_args is args else (run_args, run_kwargs))


def _forward_done_hook(module, args, kwargs, output):
    if torch.compiler.is_compiling():
        return
    cache = _forkkv_cache(module, args, kwargs)[0]
    if cache is not None:  # returned: nothing to undo at the next use
        cache.__dict__.pop("_direct_mark", None)


def install_token_recorder(base: nn.Module) -> None:
    """On the transformers model: record the tokens each forward appends to a ForkKVCache, and mark the forwards
    that returned (a direct forward that raised is undone at the cache's next use) (idempotent)."""
    handles = getattr(base, "_forkkv_recorder", None)
    if handles is not None and not isinstance(handles, tuple):  # an earlier release's pre-hook alone (a model saved
        uninstall_token_recorder(base)  # with ForkKV on): without the forward hook every direct forward was undone
    if getattr(base, "_forkkv_recorder", None) is None:
        base._forkkv_recorder = (base.register_forward_pre_hook(_record_tokens_hook, with_kwargs=True),
                                 base.register_forward_hook(_forward_done_hook, with_kwargs=True))


def uninstall_token_recorder(base: nn.Module) -> None:
    handles = getattr(base, "_forkkv_recorder", None)
    if handles is not None:
        for handle in handles if isinstance(handles, tuple) else (handles,):
            handle.remove()
        base._forkkv_recorder = None


def uninstall_if_unused(model: nn.Module) -> None:
    """Remove the wrappers once neither ForkKV nor batched LoRA is enabled on ``model``."""
    if getattr(model, "_forkkv_enabled", False) or getattr(model, "_forkkv_batched_lora", False):
        return
    for name in ("forward", "generate", "save_pretrained"):
        if getattr(model.__dict__.get(name), "_forkkv_wrapper", False):
            delattr(model, name)
