"""What generate's logits processors and stopping criteria read of padded rows: the ids as a left-padded batch holds
them.

:func:`~forkkv_hf.batch_inputs` pads each row between the shared context and its prompt (``[context | pad | prompt]``:
the context must start every row), and a continued row may hold padding between turns. Processors that read the ids
(``repetition_penalty``, ``no_repeat_ngram_size``, multi-token ``bad_words_ids`` and ``sequence_bias``,
``stop_strings``, a watermark's context) took those pads for tokens of the row: with ``pad_token_id == eos_token_id``
a padded row's EOS was penalised, a banned word could be emitted, a stop string spanning the prompt never fired
(tokens differed from each agent's own run; found by an audit). Transformers handles left padding
(``repetition_penalty`` skips each row's leading pads), so for every generate call whose mask has padding, the
processors and criteria it builds see each row's masked columns moved to its front (a stable reordering of the
columns; the shape, the tail and the generated tokens unchanged), with ``repetition_penalty``'s ignored prefix the
row's pad count: what each agent's own, unpadded run shows them. Rows that generate expands (``num_return_sequences``,
beams) take their source row's order.
"""

from __future__ import annotations

import inspect
import threading

import torch

from .peft import wrappers

_state = threading.local()  # the column order of this thread's current generate call, or None


def _packed(input_ids: torch.Tensor) -> torch.Tensor:
    order = getattr(_state, "order", None)
    if order is None or input_ids.dim() != 2 or input_ids.shape[1] < order.shape[1]:
        return input_ids
    if input_ids.shape[0] != order.shape[0]:
        if input_ids.shape[0] % order.shape[0]:
            return input_ids
        order = order.repeat_interleave(input_ids.shape[0] // order.shape[0], 0)  # expanded rows
    n = order.shape[1]
    order = order.to(input_ids.device)
    tail = input_ids[:, n:]
    return torch.cat([input_ids[:, :n].gather(1, order), tail], 1)


def _pads(rows: int) -> torch.Tensor | None:
    pads = _state.pads
    return pads.repeat_interleave(rows // pads.shape[0]) if rows != pads.shape[0] and rows % pads.shape[0] == 0 \
        else pads


def _per_row_ignore(processor) -> bool:
    """Whether this repetition penalty, not yet given the rows' pad counts, takes a per-row ignored prefix."""
    annotation = inspect.signature(type(processor).__init__).parameters.get("prompt_ignore_length")
    return not getattr(processor, "_forkkv_pads", False) and "Tensor" in str(getattr(annotation, "annotation", ""))


def _wrap_processors(processors):
    from transformers.generation.logits_process import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    class PackedProcessors(LogitsProcessorList):
        def __call__(self, input_ids, scores, **kwargs):
            for p in self:  # (transformers before 5.24 skips no pads: its own left-padded batch penalises them too)
                if isinstance(p, RepetitionPenaltyLogitsProcessor) and _per_row_ignore(p):
                    p.prompt_ignore_length, p._forkkv_pads = _pads(input_ids.shape[0]), True
            return super().__call__(_packed(input_ids), scores, **kwargs)

    return PackedProcessors(processors)


def _wrap_criteria(criteria):
    from transformers.generation.stopping_criteria import StoppingCriteriaList

    class PackedCriteria(StoppingCriteriaList):
        def __call__(self, input_ids, scores, **kwargs):
            return super().__call__(_packed(input_ids), scores, **kwargs)

    return PackedCriteria(criteria)


def _install(model) -> None:
    """The model's ``_get_logits_processor`` / ``_get_stopping_criteria`` wrapped once: they wrap what they build while
    this thread's generate call has an order."""
    if getattr(model, "_forkkv_packed_ids", False):
        return
    for name, wrap in (("_get_logits_processor", _wrap_processors), ("_get_stopping_criteria", _wrap_criteria)):
        built = getattr(model, name, None)
        if built is None:
            continue

        def method(*a, _built=built, _wrap=wrap, **kw):
            made = _built(*a, **kw)
            return _wrap(made) if getattr(_state, "order", None) is not None else made

        object.__setattr__(model, name, method)
    object.__setattr__(model, "_forkkv_packed_ids", True)


def prepare_generate(model, cache, input_ids, kwargs: dict, generate):
    """The generate call with its processors reading left-packed ids where its mask has padding (else ``generate``)."""
    mask = kwargs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or bool(mask.bool().all()):
        return generate
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    _install(base)
    visible = mask.bool()
    order = torch.sort(visible.to(torch.int8), dim=1, stable=True).indices  # masked columns first, each in order
    pads = (~visible).sum(1)

    def run(*a, **kw):
        outer = getattr(_state, "order", None), getattr(_state, "pads", None)
        _state.order, _state.pads = order, pads
        try:
            return generate(*a, **kw)
        finally:
            _state.order, _state.pads = outer

    return run


if prepare_generate not in wrappers.GENERATE_PREPARERS:
    wrappers.GENERATE_PREPARERS.insert(0, prepare_generate)
