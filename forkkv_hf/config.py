"""The library's run-time configuration, read in one place and passed down as plain values.

    import forkkv_hf
    forkkv_hf.set_config(backend="torch")            # from now on, until set_config(None)
    with forkkv_hf.config_override(lora_backend="torch"):  # for a block
        ...
    forkkv_hf.get_config()                           # what the code paths read

Without an override the configuration comes from the environment (the defaults where a variable is unset):

- ``FORKKV_BACKEND`` (``backend``): ``auto`` (default), ``torch``, ``sdpa``, ``triton``: the attention path;
- ``FORKKV_LORA_BACKEND`` (``lora_backend``): ``auto`` (default: Triton on CUDA), ``torch``, ``triton``: the
  batched LoRA's path;
- ``FORKKV_LOWP_ROPE`` (``lowp_rope``): ``0`` / ``1``: the kernels rotate the K residual in the cache dtype (unset:
  on for bf16/fp16 on the GPU);
- ``FORKKV_F16_K_PASS`` (``f16_k_pass``): ``0`` / ``1``: the kernels' K pass rebuilds and rotates the K residual in
  fp16 (unset: their rule, from 16 decode agents on Hopper with the Gluon K pass, 32 with the Triton one, in
  bf16/fp16); a K residual beyond fp16's range never takes it;
- ``FORKKV_DEFER_STOP`` (``defer_stop``): ``auto`` (default) / ``off``: whether a decode step compiled on CUDA
  reads generate's stop flag one step late (:mod:`forkkv_hf.stop_check`);
- ``FORKKV_COMPILE_REGIONS`` (``compile_regions``): ``off`` (default) / ``on``: a compiled decode step compiles the
  model's repeated decoder layer once and reuses it for every layer (:mod:`forkkv_hf.compile_regions`).

The environment is parsed once per distinct set of these values (a test may change a variable between calls); a
bad value is refused where the configuration is first read, naming the variable and its choices. The Triton kernels
(``forkkv_kernels``) never read the configuration: their launchers take these values as arguments. ``FORKKV_KERNEL``
chose between two kernel families until the fused-rebuild one was removed; set, it is ignored with a warning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from dataclasses import dataclass

from .memo import memoized

BACKENDS = ("auto", "torch", "sdpa", "triton")
LORA_BACKENDS = ("auto", "torch", "triton")
DEFER_STOP = ("auto", "off")
COMPILE_REGIONS = ("off", "on")
#: field -> environment variable
ENV_VARS = {"backend": "FORKKV_BACKEND", "lora_backend": "FORKKV_LORA_BACKEND",
            "lowp_rope": "FORKKV_LOWP_ROPE", "defer_stop": "FORKKV_DEFER_STOP",
            "compile_regions": "FORKKV_COMPILE_REGIONS", "f16_k_pass": "FORKKV_F16_K_PASS"}
#: the fields that are a bool or None (their variables: 0 / 1 / unset)
BOOL_FIELDS = ("lowp_rope", "f16_k_pass")


@dataclass(frozen=True)
class ForkKVConfig:
    """``backend``: the attention path (``auto``: on CUDA, SDPA for prompt-like calls and Triton for the rest;
    PyTorch elsewhere). ``lora_backend``: the batched LoRA's path. ``lowp_rope``: the kernels' K-residual rotation
    in the cache dtype, ``None`` for their default. ``f16_k_pass``: the K pass in fp16 (``res_f16``; eval/KERNEL_NOTES.md
    "v15"), ``None`` for the kernels' rule.
    ``defer_stop``: ``auto`` lets a decode step compiled on CUDA read the stop flag one step late, ``off`` not.
    ``compile_regions``: ``on`` compiles the repeated decoder layer once per compiled decode step (a shorter first
    call, a slower step: 50.7 s / 72.6 ms against 61.4 s / 63.5 ms on an H200 at 128 agents), ``off`` the whole
    step as one graph."""

    backend: str = "auto"
    lora_backend: str = "auto"
    lowp_rope: bool | None = None
    defer_stop: str = "auto"
    compile_regions: str = "off"
    f16_k_pass: bool | None = None

    def __post_init__(self):
        for field, choices in (("backend", BACKENDS), ("lora_backend", LORA_BACKENDS), ("defer_stop", DEFER_STOP),
                               ("compile_regions", COMPILE_REGIONS)):
            value = getattr(self, field)
            if value not in choices:
                raise ValueError(f"{field}={value!r} ({ENV_VARS[field]}): use one of {choices}")
        for field in BOOL_FIELDS:
            value = getattr(self, field)
            if value not in (None, True, False):
                raise ValueError(f"{field}={value!r} ({ENV_VARS[field]}): use True/False (1/0) or None")


def _parse_bool(name: str, text: str) -> bool:
    if text.strip() not in ("0", "1"):
        raise ValueError(f"{name}={text!r}: use 0 or 1 (or leave it unset for the default)")
    return text.strip() == "1"


@memoized(maxsize=16)
def _from_env(values: tuple) -> ForkKVConfig:
    env = dict(zip(ENV_VARS, values))
    fields = {k: v for k, v in env.items() if v is not None and k not in BOOL_FIELDS}
    for k in BOOL_FIELDS:
        if env[k] is not None:
            fields[k] = _parse_bool(ENV_VARS[k], env[k])
    return ForkKVConfig(**fields)


@memoized(maxsize=4)
def _retired(value: str) -> None:
    warnings.warn(f"FORKKV_KERNEL={value!r} is ignored: the cascade kernels serve every call (the fused-rebuild "
                  "family measured slower everywhere and was removed); unset FORKKV_KERNEL", stacklevel=3)


def config_from_env() -> ForkKVConfig:
    """The configuration the ``FORKKV_*`` environment variables give (defaults where unset)."""
    if os.environ.get("FORKKV_KERNEL"):
        _retired(os.environ["FORKKV_KERNEL"])
    return _from_env(tuple(os.environ.get(v) for v in ENV_VARS.values()))


_override: ForkKVConfig | None = None


def get_config() -> ForkKVConfig:
    """The configuration in force: the one :func:`set_config` set, else :func:`config_from_env`."""
    return _override if _override is not None else config_from_env()


def set_config(config: ForkKVConfig | None = None, **changes) -> ForkKVConfig | None:
    """Pin the configuration: ``config`` as given, or the one in force with ``changes`` (field=value) applied;
    ``set_config(None)`` goes back to the environment. Returns the previous override (``None``: there was none)."""
    global _override
    previous = _override
    if config is not None and changes:
        raise TypeError("set_config: pass a ForkKVConfig or field=value changes, not both")
    if config is not None and not isinstance(config, ForkKVConfig):
        raise TypeError(f"set_config takes a ForkKVConfig (or field=value changes, e.g. set_config(backend='torch')), "
                        f"got {config!r}")
    if config is None and changes:
        unknown = set(changes) - {f.name for f in dataclasses.fields(ForkKVConfig)}
        if unknown:
            raise TypeError(f"set_config: unknown field(s) {sorted(unknown)}; use {list(ENV_VARS)}")
        config = dataclasses.replace(get_config(), **changes)
    _override = config
    return previous


@contextlib.contextmanager
def config_override(**changes):
    """``with config_override(backend="torch"): ...``: the configuration in force with ``changes``, restored on
    exit. Yields the configuration."""
    previous = set_config(**changes) if changes else set_config(get_config())  # (unknown fields named, as set_config)
    try:
        yield get_config()
    finally:
        set_config(previous)
