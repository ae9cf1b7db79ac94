"""What a ``generate`` call uses, as transformers merges its settings (:func:`generation_setting`), and PEFT's
``adapter_names`` against the rows generate will run (:func:`check_adapter_names_per_row`)."""

from __future__ import annotations

from .peft.lora_factors import transformers_model


def generation_setting(model, kwargs: dict, name: str, default=None):
    """What a generate call with ``kwargs`` uses for ``name``, as transformers merges its settings: the keyword, else
    the ``generation_config`` passed, else (where that leaves it unset) the model's own ``generation_config``, else
    ``default`` (before, a passed config hid the model's: its ``prompt_lookup_num_tokens`` or ``max_new_tokens`` went
    unseen, and the compiled decode got a static layout it outgrew or that prompt lookup misread)."""
    if name in kwargs:
        value = kwargs[name]
    else:
        configs = (kwargs.get("generation_config"), getattr(transformers_model(model), "generation_config", None))
        value = next((v for v in (getattr(c, name, None) for c in configs if c is not None) if v is not None), None)
    return default if value is None else value


def check_adapter_names_per_row(model, kwargs: dict, rows: int) -> None:
    """PEFT's ``adapter_names``: a list, one name per row, repeated by the caller for ``num_return_sequences`` and
    for beams set in a generation config (PEFT repeats them for a ``num_beams`` keyword only)."""
    names = kwargs.get("adapter_names")
    if names is None:
        return
    if isinstance(names, str):
        raise TypeError(f"adapter_names must be a list with one name per row, not the string {names!r}")
    beams = generation_setting(model, kwargs, "num_beams", 1)
    k = generation_setting(model, kwargs, "num_return_sequences", 1) if beams == 1 else (
        1 if kwargs.get("num_beams") is not None else beams)
    if len(names) == rows * k:
        return
    if k > 1 and len(names) == rows:
        what = f"num_beams={k} from a generation config" if beams > 1 else f"num_return_sequences={k}"
        raise ValueError(
            f"{what}: PEFT does not repeat adapter_names for it; pass [n for n in names for _ in range({k})] "
            f"({rows * k} names for {rows} rows)" + (", or num_beams as a keyword" if beams > 1 else ""))
    raise ValueError(f"adapter_names has {len(names)} names but the batch has {rows} rows; give one name per row")
