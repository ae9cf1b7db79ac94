"""The run-time configuration: read from the FORKKV_* environment, pinned by set_config / config_override, refused
when a value is unknown, and what the attention paths read (the backend, low-precision RoPE); the retired
FORKKV_KERNEL is ignored with a warning."""

import logging

import pytest
import torch
from cases import parametrize

import forkkv_hf
from forkkv_hf import ForkKVConfig, config_override, get_config, reference_attention, set_config
from forkkv_hf.log import warn_once
from forkkv_hf.ops.dispatch import residual_attention
from views import random_view

pytestmark = pytest.mark.version_independent  # no transformers/PEFT code: not rerun on 5.17 (tests/conftest.py)

ENV = ("FORKKV_BACKEND", "FORKKV_LORA_BACKEND", "FORKKV_LOWP_ROPE", "FORKKV_F16_K_PASS")


@pytest.fixture
def clean_env(monkeypatch):
    for name in ENV + ("FORKKV_KERNEL",):
        monkeypatch.delenv(name, raising=False)
    previous = set_config(None)
    yield monkeypatch
    set_config(previous)


def test_environment_gives_the_configuration(clean_env):
    assert get_config() == ForkKVConfig(backend="auto", lora_backend="auto", lowp_rope=None)
    for name, value in zip(ENV, ("sdpa", "torch", "0")):
        clean_env.setenv(name, value)
    assert get_config() == ForkKVConfig(backend="sdpa", lora_backend="torch", lowp_rope=False)
    clean_env.setenv("FORKKV_LOWP_ROPE", "1")
    assert get_config().lowp_rope is True


BAD_VALUES = {  # variable: (a value it refuses, what the error must say)
    "FORKKV_BACKEND": ("flash", r"FORKKV_BACKEND.*use one of \('auto', 'torch', 'sdpa', 'triton'\)"),
    "FORKKV_LORA_BACKEND": ("sdpa", r"FORKKV_LORA_BACKEND.*use one of"),
    "FORKKV_LOWP_ROPE": ("yes", r"FORKKV_LOWP_ROPE='yes': use 0 or 1"),
}


def test_retired_kernel_choice_is_ignored_with_a_warning(clean_env):
    clean_env.setenv("FORKKV_KERNEL", "fused")
    with pytest.warns(UserWarning, match="FORKKV_KERNEL='fused' is ignored: the cascade kernels serve every call"):
        assert get_config() == ForkKVConfig()


@parametrize("name", list(BAD_VALUES))
def test_unknown_values_are_refused_with_the_choices(clean_env, name):
    value, match = BAD_VALUES[name]
    clean_env.setenv(name, value)
    with pytest.raises(ValueError, match=match):
        get_config()


def test_set_config_pins_and_override_restores(clean_env):
    clean_env.setenv("FORKKV_BACKEND", "sdpa")
    assert set_config(backend="torch") is None
    clean_env.setenv("FORKKV_BACKEND", "triton")  # a pinned configuration ignores the environment
    assert get_config().backend == "torch"
    with pytest.raises(TypeError, match=r"unknown field\(s\) \['lora_bakend'\]; use \["):  # (a bare dataclass error)
        with config_override(lora_bakend="torch"):
            pass
    with config_override(lora_backend="torch") as cfg:
        assert cfg == get_config() == ForkKVConfig(backend="torch", lora_backend="torch")
    assert get_config() == ForkKVConfig(backend="torch")
    set_config(None)
    assert get_config().backend == "triton"
    with pytest.raises(TypeError, match="unknown field"):
        set_config(kernel="fused")  # the retired kernel choice is an unknown field
    with pytest.raises(ValueError, match="use one of"):
        set_config(backend="flash")
    assert get_config().backend == "triton"  # a refused change leaves the configuration as it was


def test_dispatch_reads_the_configured_backend(clean_env, monkeypatch):
    """``backend="auto"`` takes the configured path: the SDPA path runs when configured, the PyTorch one otherwise."""
    view = random_view(B=2, T=20, P=3)
    q = torch.randn(2, 4, 3, 16, generator=torch.Generator().manual_seed(0))
    ops = forkkv_hf.ops.dispatch
    ran = []
    for name in ("residual_attention_sdpa", "residual_attention_torch"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _name=name, **kw: ran.append(_name) or _real(*a, **kw))
    ref = reference_attention(q, view, None, 0.25)
    with config_override(backend="sdpa"):
        torch.testing.assert_close(residual_attention(q, view, None, 0.25), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(residual_attention(q, view, None, 0.25), ref, rtol=1e-5, atol=1e-5)
    assert ran == ["residual_attention_sdpa", "residual_attention_torch"]


def test_forced_triton_without_a_gpu_says_so(clean_env, monkeypatch):
    """``backend="triton"`` / ``lora_backend="triton"`` on CPU tensors without the interpreter failed inside Triton
    ("0 active drivers")."""
    from forkkv_hf.peft.batched_lora import _use_triton

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    view = random_view(B=2, T=20, P=3)
    q = torch.randn(2, 4, 1, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="'triton' backend needs CUDA tensors"):
        residual_attention(q, view, None, 0.25, backend="triton")
    with config_override(lora_backend="triton"), pytest.raises(ValueError, match="needs CUDA tensors"):
        _use_triton(q)


def test_cpu_fallback_warns_once(clean_env, caplog):
    view = random_view(B=2, T=20, P=3)
    q = torch.randn(2, 4, 1, 16, generator=torch.Generator().manual_seed(0))
    warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="forkkv_hf"):
        for _ in range(3):
            residual_attention(q, view, None, 0.25)
        residual_attention(q, view, None, 0.25, backend="torch")  # asked for: no warning
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("forkkv_hf.ops.dispatch", "ForkKV attention runs the PyTorch path (the Triton kernels need a CUDA device)")]


def test_lowp_rope_reaches_the_kernels(clean_env):
    """The configured ``lowp_rope`` is what the Triton launch uses: bf16 results equal an explicit ``lowp_rope=True``
    launch and differ from ``False`` (the interpreter rounds the rotation to bf16 only when it is on)."""
    pytest.importorskip("triton")
    from forkkv_hf.ops.dispatch import residual_attention_triton

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    view = random_view(B=2, T=40, P=3, D=32, dtype=torch.bfloat16, device=dev, res_scale=2.0)
    q = torch.randn(2, 4, 1, 32, generator=torch.Generator().manual_seed(0)).to(dev, torch.bfloat16)
    outs = {flag: residual_attention_triton(q, view, None, 0.2, lowp_rope=flag)
            for flag in (False, True)}
    assert not torch.equal(outs[False], outs[True])
    for flag in (False, True):
        with config_override(lowp_rope=flag):
            assert torch.equal(residual_attention_triton(q, view, None, 0.2), outs[flag])


def test_f16_k_pass_reaches_the_kernels(clean_env):
    """The configured ``f16_k_pass`` (``FORKKV_F16_K_PASS``) is what the Triton launch and the compiled decode's plan
    use: bf16 results equal an explicit ``res_f16`` launch of the same value and differ between on and off (fp16 and
    bf16 round the rotated K residual differently); unset, the kernels' rule decides (``None``); fp32 calls keep their
    rule; a K residual beyond fp16's range stays off whatever is configured; bad values are refused."""
    pytest.importorskip("triton")
    from forkkv_hf.ops.decode_ops import plan_decode_attention
    from forkkv_hf.ops.dispatch import residual_attention_triton

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    view = random_view(B=2, T=40, P=3, D=32, dtype=torch.bfloat16, device=dev, res_scale=2.0)
    q = torch.randn(2, 4, 1, 32, generator=torch.Generator().manual_seed(0)).to(dev, torch.bfloat16)
    outs = {flag: residual_attention_triton(q, view, None, 0.2, res_f16=flag) for flag in (False, True)}
    assert not torch.equal(outs[False], outs[True])
    assert plan_decode_attention(view.shared, (0, 1), None).res_f16 is None
    for flag in (False, True):
        with config_override(f16_k_pass=flag):
            assert torch.equal(residual_attention_triton(q, view, None, 0.2), outs[flag])
            assert plan_decode_attention(view.shared, (0, 1), None).res_f16 is flag
    clean_env.setenv("FORKKV_F16_K_PASS", "1")
    assert get_config().f16_k_pass is True
    fp32 = random_view(B=2, T=40, P=3, D=32, device=dev)
    assert plan_decode_attention(fp32.shared, (0, 1), None).res_f16 is None
    far = random_view(B=2, T=40, P=3, D=32, dtype=torch.bfloat16, device=dev)
    far.shared.k_res.u = far.shared.k_res.u * 1e5
    assert plan_decode_attention(far.shared, (0, 1), None).res_f16 is False
    clean_env.setenv("FORKKV_F16_K_PASS", "yes")
    with pytest.raises(ValueError, match="FORKKV_F16_K_PASS"):
        get_config()


def test_set_config_refuses_what_is_not_a_config():
    """``set_config("torch")`` was accepted and failed at the next generate with an AttributeError."""
    from forkkv_hf import config

    with pytest.raises(TypeError, match="set_config takes a ForkKVConfig"):
        config.set_config("torch")
    assert config.get_config() != "torch"


def test_auto_backend_routes_wide_heads_to_sdpa(clean_env):
    """head_dim above 128 (Gemma's 256) on CUDA takes the SDPA path: the Triton K pass's rule needs more shared
    memory than an H100 has there and failed to compile in the kernels' GPU fuzz (v47)."""
    from forkkv_hf.ops.dispatch import TRITON_MAX_HEAD_DIM, auto_backend

    ready = lambda: True  # noqa: E731
    from forkkv_kernels.rules import MAX_HEAD_DIM

    assert auto_backend(True, 1, 128, ready) == "triton" and TRITON_MAX_HEAD_DIM == MAX_HEAD_DIM == 128
    assert auto_backend(True, 1, 256, ready) == "sdpa"
    assert auto_backend(True, 64, 64, ready) == "sdpa"
    assert auto_backend(False, 1, 256, ready) == "torch"
    assert auto_backend(True, 1, 128, lambda: False) == "torch"


@pytest.mark.gpu
def test_wide_heads_on_the_gpu_equal_the_reference(clean_env):
    """head_dim 256 on CUDA through the "auto" backend (the SDPA path): the fp32 reference within bf16's rule."""
    from views import lowp_attention_error

    view = random_view(B=3, Hkv=2, D=256, T=300, P=3, dtype=torch.bfloat16)
    q = torch.randn(3, 6, 1, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).float()
    ref = reference_attention(q, view, None, 256**-0.5)
    own = lowp_attention_error(q, view, None, 256**-0.5, ref)
    gpu = random_view(B=3, Hkv=2, D=256, T=300, P=3, dtype=torch.bfloat16, device="cuda")
    out = residual_attention(q.to("cuda", torch.bfloat16), gpu, None, 256**-0.5)
    assert (out.float().cpu() - ref).abs().max() <= 3 * own + 2e-3
    # a forced Triton backend is refused with what to do (before: ptxas's "Insufficient registers" inside the K pass)
    with config_override(backend="triton"), pytest.raises(NotImplementedError, match="head_dim 256: the kernels serve"):
        residual_attention(q.to("cuda", torch.bfloat16), gpu, None, 256**-0.5)
