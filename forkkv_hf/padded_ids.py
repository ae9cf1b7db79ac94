"""What generate's logits processors and stopping criteria read of padded rows: the ids as a left-padded batch holds
them.

:func:`~forkkv_hf.batch_inputs` pads each row between the shared context and its prompt (``[context | pad | prompt]``:
the context must start every row), and a continued row may hold padding between turns. Processors that read the ids
(``repetition_penalty``, ``no_repeat_ngram_size``, multi-token ``bad_words_ids`` and ``sequence_bias``,
``stop_strings``, a watermark's context) took those pads for tokens of the row: with ``pad_token_id == eos_token_id``
a padded row's EOS was penalised, a banned word could be emitted, a stop string spanning the prompt never fired
(tokens differed from each agent's own run; found by an audit). Transformers handles left padding
(``repetition_penalty`` skips each row's leading pads), so in every ForkKV generate call whose mask (given, or built
by generate from the pad id) has padding, the processors and criteria it builds see each row's masked columns moved to
its front (a stable reordering of the columns; the shape, the tail and the generated tokens unchanged), and the
``repetition_penalty`` it builds skips the row's pads (transformers 5.24+, which takes a per-row prefix; before, it
reads them as the row's first token, which it penalises anyway): what each agent's own, unpadded run shows them. A
processor the caller passes reads the same reordered ids, as it would in a left-padded batch, and is not changed. The
``encoder_repetition_penalty`` and ``encoder_no_repeat_ngram_size`` it builds read generate's input ids once, not the
running ids: they are given each row's own tokens (:func:`_own_encoder_ids`; before, they read the pads too: found
by an audit).

The hook is :class:`~transformers.GenerationMixin`'s processor and criteria builders, wrapped once at import; they
act only inside a ForkKV generate call of the same model on the same thread (state per thread and model: nothing on
the model, which stays picklable and copyable).
"""

from __future__ import annotations

import inspect
import threading

import torch

from .peft import wrappers

_state = threading.local()  # .calls: {id(model): {"current": its last build's {"order", "pads", "built"} or None}}


def _calls() -> dict:
    if not hasattr(_state, "calls"):
        _state.calls = {}
    return _state.calls


def _rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` for ``rows`` rows: as it is, or each row repeated (rows generate expanded later: beams)."""
    return t if t.shape[0] == rows or rows % t.shape[0] else t.repeat_interleave(rows // t.shape[0], 0)


def _packed(call: dict, input_ids: torch.Tensor) -> torch.Tensor:
    order = call["order"]
    if input_ids.dim() != 2 or input_ids.shape[1] < order.shape[1] or input_ids.shape[0] % order.shape[0]:
        return input_ids
    order = _rows(order, input_ids.shape[0]).to(input_ids.device)
    n = order.shape[1]
    return torch.cat([input_ids[:, :n].gather(1, order), input_ids[:, n:]], 1)


def _per_row_ignore(processor) -> bool:
    """Whether this transformers' repetition penalty takes a per-row ignored prefix (5.24+)."""
    annotation = inspect.signature(type(processor).__init__).parameters.get("prompt_ignore_length")
    return "Tensor" in str(getattr(annotation, "annotation", ""))


def _pads_as_row_token(call: dict, packed: torch.Tensor) -> torch.Tensor:
    """Packed ids (each row's pads in front) with the pads replaced by the row's first token: for a processor that
    reads a row as a set of tokens (each penalised once however often the row holds it), the row's own set."""
    pads = _rows(call["pads"], packed.shape[0]).to(packed.device)[:, None]
    first = packed.gather(1, pads.clamp(max=call["order"].shape[1] - 1))
    return torch.where(torch.arange(packed.shape[1], device=packed.device) < pads, first, packed)


class _PadsAsRowToken:
    """A built repetition penalty of transformers before 5.24 (no per-row ignored prefix) reading each row's pads
    (in front, packed) as the row's first token: it penalises a token once however often the row holds it, so the
    penalty is the row's own (before, a padded row's pad id was penalised: its EOS, where pad == EOS)."""

    def __init__(self, processor, call: dict):
        self.processor, self.call = processor, call

    def __call__(self, input_ids, scores):
        return self.processor(_pads_as_row_token(self.call, input_ids), scores)


def _own_encoder_ids(call: dict, processors, encoder_ids, visible: torch.Tensor) -> None:
    """The built ``encoder_repetition_penalty`` and ``encoder_no_repeat_ngram_size`` of a decoder-only model read
    generate's input ids (the whole rows), pads between the context and a shorter prompt included: a padded row's
    pad id was boosted (its EOS, where pad == EOS) and the n-grams spanning the context's end and the prompt's start
    were never banned (found by an audit). Now the penalty reads the row's tokens packed, pads as its first token
    (exact: a set of tokens), and the n-grams are the row's own, from its visible tokens: its own, unpadded run's."""
    from transformers.generation.logits_process import (EncoderNoRepeatNGramLogitsProcessor,
                                                        EncoderRepetitionPenaltyLogitsProcessor)

    if not isinstance(encoder_ids, torch.Tensor) or encoder_ids.dim() != 2:
        return
    ids = _rows(encoder_ids, visible.shape[0])  # as the mask: expanded for beams / num_return_sequences already
    if ids.shape != visible.shape:
        return
    for p in processors:
        if id(p) not in call["built"]:
            continue
        if isinstance(p, EncoderRepetitionPenaltyLogitsProcessor):
            p.encoder_input_ids = _pads_as_row_token(call, _packed(call, ids))
        elif isinstance(p, EncoderNoRepeatNGramLogitsProcessor):
            rows = zip(ids, visible.to(ids.device))
            p.batch_size, p.generated_ngrams = ids.shape[0], [
                EncoderNoRepeatNGramLogitsProcessor(p.ngram_size, row[seen]).generated_ngrams[0] for row, seen in rows]


def _wrap_processors(call: dict, processors):
    from transformers.generation.logits_process import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    # the repetition penalties this call built (not the caller's own): on 5.24+ given the rows' pads at the first
    # step (the rows are then known: generate may expand them), once; before, reading the pads as a row's token
    built = [p for p in processors if id(p) in call["built"] and isinstance(p, RepetitionPenaltyLogitsProcessor)]
    unset = [p for p in built if _per_row_ignore(p)]
    processors = [_PadsAsRowToken(p, call) if p in built and p not in unset and not p.prompt_ignore_length else p
                  for p in processors]

    class PackedProcessors(LogitsProcessorList):
        def __call__(self, input_ids, scores, **kwargs):
            while unset:
                unset.pop().prompt_ignore_length = _rows(call["pads"], input_ids.shape[0]).to(input_ids.device)
            return super().__call__(_packed(call, input_ids), scores, **kwargs)

    return PackedProcessors(processors)


def _wrap_criteria(call: dict, criteria):
    from transformers.generation.stopping_criteria import StoppingCriteriaList

    class PackedCriteria(StoppingCriteriaList):
        def __call__(self, input_ids, scores, **kwargs):
            return super().__call__(_packed(call, input_ids), scores, **kwargs)

    return PackedCriteria(criteria)


def _get_logits_processor(self, *args, **kwargs):
    made = _BUILDERS["_get_logits_processor"](self, *args, **kwargs)
    entry = _calls().get(id(self))
    if entry is None:
        return made
    model_kwargs = kwargs.get("model_kwargs") or {}
    cache = model_kwargs.get("past_key_values", model_kwargs.get("cache"))
    mask = model_kwargs.get("attention_mask")  # given, or the one generate built
    entry["current"] = None  # (a generate of this model nested in the call, without a ForkKV cache: left as it is)
    if not hasattr(cache, "prepare_forward") or not isinstance(mask, torch.Tensor) or mask.dim() != 2 or bool(
            mask.bool().all()):
        return made
    visible = mask.bool()
    own = {id(p) for p in (kwargs.get("logits_processor") or ())}
    entry["current"] = call = {  # this build's: its processors keep it, whatever a nested call builds later
        "order": torch.sort(visible.to(torch.int8), dim=1, stable=True).indices,  # masked columns first, in order
        "pads": (~visible).sum(1), "built": {id(p) for p in made if id(p) not in own}}
    _own_encoder_ids(call, made, kwargs.get("encoder_input_ids"), visible)
    return _wrap_processors(call, made)


def _get_stopping_criteria(self, *args, **kwargs):
    made = _BUILDERS["_get_stopping_criteria"](self, *args, **kwargs)
    call = (_calls().get(id(self)) or {}).get("current")
    return made if call is None else _wrap_criteria(call, made)


_BUILDERS: dict = {}
_INSTALLING = threading.Lock()  # two threads' first calls at once: the second would wrap the wrapper (a recursion)


def _install() -> None:
    """Wrap transformers' processor and criteria builders (once; inert outside a ForkKV generate call)."""
    from transformers.generation.utils import GenerationMixin

    with _INSTALLING:
        for name, wrapper in (("_get_logits_processor", _get_logits_processor),
                              ("_get_stopping_criteria", _get_stopping_criteria)):
            if getattr(GenerationMixin, name) is not wrapper:
                _BUILDERS[name] = getattr(GenerationMixin, name)
                setattr(GenerationMixin, name, wrapper)


def prepare_generate(model, cache, input_ids, kwargs: dict, generate):
    """The ForkKV generate call with this model's processors reading left-packed ids where its mask has padding."""
    _install()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model

    def run(*a, **kw):
        calls, key = _calls(), id(base)
        outer = calls.get(key)
        calls[key] = {"current": None}
        try:
            return generate(*a, **kw)
        finally:
            if outer is None:
                calls.pop(key, None)
            else:
                calls[key] = outer

    return run


if prepare_generate not in wrappers.GENERATE_PREPARERS:
    wrappers.GENERATE_PREPARERS.insert(0, prepare_generate)
