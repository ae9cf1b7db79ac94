"""The chunked PyTorch ResidualAttention and the rebuild-and-SDPA path equal the materialising fp32 reference."""

import importlib
from functools import partial

import pytest
import torch

from cases import ATTN_CASES, LOW_DTYPES, LOWP_CASES, SPLIT_RANK_CASES, parametrize
from forkkv_hf import reference_attention, residual_attention_torch
from forkkv_hf.ops.dispatch import residual_attention, residual_attention_sdpa
from views import padding_mask, random_view

pytestmark = pytest.mark.version_independent  # no transformers/PEFT code: not rerun on 5.17 (tests/conftest.py)

ra_mod = importlib.import_module("forkkv_hf.ops.dispatch")


def _query(view, H, Q, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(view.batch_size, H, Q, view.shared.key.shape[-1], generator=g).to(dtype)


PATHS = {"torch": residual_attention_torch, "sdpa": residual_attention_sdpa,
         "sdpa-1row-groups": partial(residual_attention_sdpa, workspace_bytes=1)}


@parametrize("path", list(PATHS))
@parametrize("masked", [False, True])
@parametrize("case", ATTN_CASES)
def test_paths_match_reference_fp32(case, masked, path):
    view, q = case.view(), case.query()
    mask = case.mask() if masked else None
    scale = case.D**-0.5
    ref = reference_attention(q, view, mask, scale)
    out = PATHS[path](q, view, mask, scale)
    assert out.shape == (case.B, case.Q, case.H, case.D)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@parametrize("path", list(PATHS))
@parametrize("case", SPLIT_RANK_CASES)
def test_paths_with_k_and_v_residuals_of_different_ranks(case, path):
    """Fitted residuals' ``k_rank``: the K and V stacks of different widths, masked."""
    view, q = case.view(), case.query()
    ref = reference_attention(q, view, case.mask(), case.D**-0.5)
    torch.testing.assert_close(PATHS[path](q, view, case.mask(), case.D**-0.5), ref, rtol=1e-5, atol=1e-5)
    assert view.shared.k_res.rank != view.shared.v_res.rank


@parametrize("path", ["torch", "sdpa"])
@parametrize("dtype", LOW_DTYPES)
@parametrize("case", LOWP_CASES, fast=lambda case: case.Q > 1)
def test_paths_low_precision(case, dtype, path):
    """Error against the fp32 reference at most 3x that of the same computation done by PyTorch in the low dtype
    (flash-attention's pass rule): here, SDPA over the materialised rows rounded to the low dtype."""
    from forkkv_hf.ops.naive import materialize_kv

    view = case.view(dtype)
    q32 = case.query().to(dtype).float()
    q = q32.to(dtype)
    scale = case.D**-0.5
    ref = reference_attention(q32, view, None, scale)  # fp32 math on the low-precision inputs
    out = PATHS[path](q, view, None, scale).float()
    K, V = materialize_kv(view)
    G = case.H // case.Hkv
    Kd, Vd = K.to(dtype).repeat_interleave(G, 1), V.to(dtype).repeat_interleave(G, 1)
    allowed = torch.ones(case.Q, case.T + case.P, dtype=torch.bool)
    allowed[:, case.T:] = torch.ones(case.Q, case.P, dtype=torch.bool).tril(case.P - case.Q)  # causal, by hand
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, Kd, Vd, attn_mask=allowed, scale=scale)
    sdpa_err = (sdpa.transpose(1, 2).float() - ref).abs().max().item()
    err = (out - ref).abs().max().item()
    assert err <= 3 * sdpa_err + 1e-6, (err, sdpa_err)


def test_chunking_does_not_change_result(monkeypatch):
    view = random_view(B=3, T=50, P=4)
    q = _query(view, 4, 2, torch.float32)
    full = residual_attention_torch(q, view, None, 0.25)
    monkeypatch.setattr(ra_mod, "CHUNK_ELEMENTS", 1)  # 16-token chunks
    chunked = residual_attention_torch(q, view, None, 0.25)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-6)


def test_residual_matters():
    """Guard against a test that cannot fail: dropping the residual changes the result."""
    view = random_view(B=2, T=30, P=2, rows=[0, 1])
    q = _query(view, 4, 1, torch.float32)
    ref = reference_attention(q, view, None, 0.25)
    view.shared.k_res = view.shared.v_res = None
    view.k_rows = view.v_rows = None
    naive = residual_attention_torch(q, view, None, 0.25)
    assert (naive - ref).abs().max() > 1e-2


@parametrize("path", ["reference", *PATHS])
def test_v_only_fork_of_kv_context(path):
    """A ``residual="v"`` fork of a K+V context (K residual present, ``k_rows`` None) reads the V residual only:
    equal to the same view without the K residual."""
    fn = reference_attention if path == "reference" else PATHS[path]
    view = random_view(B=3, T=29, P=3, rows=[0, 1, -1])
    q = _query(view, 4, 1, torch.float32)
    view.k_rows, view.k_slots = None, None
    out = fn(q, view, None, 0.25)
    k_res, view.shared.k_res = view.shared.k_res, None
    expected = reference_attention(q, view, None, 0.25)
    view.shared.k_res = k_res
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_additive_float_mask_equals_bool_mask():
    view = random_view(B=3, T=21, P=5)
    q = _query(view, 4, 2, torch.float32)
    bool_mask = padding_mask(3, 2, 21, 5, [0, 1, 2])
    float_mask = torch.zeros(bool_mask.shape).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    for path in ("torch", "sdpa"):
        a = PATHS[path](q, view, bool_mask, 0.25)
        b = PATHS[path](q, view, float_mask, 0.25)
        torch.testing.assert_close(a, b)


def test_dispatch(monkeypatch):
    """``auto`` takes PyTorch on CPU; ``FORKKV_BACKEND`` and ``backend=`` select a path; unknown names are refused."""
    view = random_view(B=2, T=20, P=17)
    q = _query(view, 4, 17, torch.float32)
    ref = reference_attention(q, view, None, 0.25)
    for backend in ("auto", "torch", "sdpa"):
        torch.testing.assert_close(residual_attention(q, view, None, 0.25, backend=backend), ref, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("FORKKV_BACKEND", "sdpa")
    torch.testing.assert_close(residual_attention(q, view, None, 0.25), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown ForkKV attention backend"):
        residual_attention(q, view, None, 0.25, backend="flash")
