"""The cascade ResidualAttention kernels (``forkkv_kernels.cascade_attention``) against the fp32 reference, through its
plain-tensor launcher: the attention case space (tests/cases.py) with the rows' order derived on the device, K and V
slots that differ, refusals. On CPU they run in the Triton interpreter. (Through the adapter, with the other
kernel family, their knobs, the low-precision pass rule and end-to-end generate: test_kernels.py.)"""

import ast
from pathlib import Path

import pytest
import torch

from cases import ATTN_CASES, GPU_CASES, LOW_DTYPES, parametrize
from forkkv_hf import reference_attention
from views import lowp_attention_error, random_view

pytest.importorskip("triton")
from forkkv_kernels import cascade_attention  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _launch(q, view, mask, scale, host_order=True, **tuning):
    """``cascade_attention`` on the view's tensors: slots as tensors; with ``host_order`` also the sorted rows and the
    number of agents (what the adapter passes), else the launcher derives them on the device."""
    sh = view.shared
    kw = {}
    for kind, res, rows in (("k", sh.k_res, view.k_rows), ("v", sh.v_res, view.v_rows)):
        if res is not None and rows is not None:
            kw.update({f"{kind}_u": res.u.to(DEV), f"{kind}_B": res.B.to(DEV), f"{kind}_slot": rows.to(DEV)})
    if host_order and "k_slot" in kw:
        slots = view.k_rows.tolist()
        kw["k_order"] = torch.tensor(sorted(range(len(slots)), key=lambda i: slots[i]), device=DEV)
        used = [s for s in slots if s >= 0]
        kw["k_agents"] = len(set(used))
        kw["k_max_rows"] = max((used.count(s) for s in set(used)), default=1)
    if mask is not None:
        mask = mask[:, 0].to(torch.int8).to(DEV)
    return cascade_attention(q.to(DEV), sh.key[0].to(DEV), sh.value[0].to(DEV), sh.cos.to(DEV), sh.sin.to(DEV),
                             view.key.to(DEV), view.value.to(DEV), scale, mask=mask, **kw, **tuning).cpu()


def _query(view, H, Q, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(view.batch_size, H, Q, view.shared.key.shape[-1], generator=g)


@parametrize("masked", [False, True])
@parametrize("case", ATTN_CASES)
def test_cascade_launcher_derives_the_row_order(case, masked):
    """The launcher with the rows' order by agent derived on the device (``k_order`` not given; the adapter passes it
    from the host, and test_kernels.py runs the attention case space through the adapter)."""
    view, q = case.view(), case.query()
    mask = case.mask() if masked else None
    out = _launch(q, view, mask, case.D**-0.5, host_order=False)
    assert out.shape == (case.B, case.Q, case.H, case.D)
    torch.testing.assert_close(out, reference_attention(q, view, mask, case.D**-0.5), rtol=2e-5, atol=2e-5)


def test_cascade_k_and_v_slots_differ_per_row():
    """A row may have a K residual and no V residual (and the reverse): each kind follows its own slots."""
    view = random_view(B=4, Hkv=2, D=16, T=31, P=3, rows=[0, 1, -1, 1])
    view.v_rows = torch.tensor([-1, 0, 1, 1])
    q = _query(view, 4, 1)
    torch.testing.assert_close(_launch(q, view, None, 0.25), reference_attention(q, view, None, 0.25),
                               rtol=2e-5, atol=2e-5)


def test_cascade_notices_each_residual():
    """Not a test that cannot fail: removing either residual changes the output."""
    view = random_view(B=2, Hkv=2, D=16, T=30, P=2, rows=[0, 1])
    q = _query(view, 4, 1)
    full = _launch(q, view, None, 0.25)
    for kind in ("k_rows", "v_rows"):
        rows = getattr(view, kind)
        setattr(view, kind, torch.tensor([-1, -1]))
        assert (full - _launch(q, view, None, 0.25)).abs().max() > 1e-2, kind
        setattr(view, kind, rows)


def test_cascade_refuses_what_it_cannot_take():
    view = random_view(B=2, Hkv=2, D=16, T=20, P=2)
    with pytest.raises(ValueError, match="not a multiple of 2 KV heads"):
        _launch(_query(view, 3, 1), view, None, 0.25)
    with pytest.raises(ValueError, match="res_heads=3 does not divide"):
        _launch(_query(view, 4, 1), view, None, 0.25, res_heads=3)
    with pytest.raises(TypeError, match="query is torch.float16"):
        _launch(_query(view, 4, 1).half(), view, None, 0.25)


def test_kernels_import_nothing_from_forkkv_hf():
    """Layering: the kernels package sits below forkkv_hf (its launchers take plain tensors)."""
    for path in (Path(__file__).parents[1] / "kernels").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "forkkv_hf" for n in names), (path.name, names)


@pytest.mark.gpu
@parametrize("dtype", LOW_DTYPES)
@parametrize("case", GPU_CASES)
def test_cascade_real_sizes_gpu(case, dtype):
    """Llama-3.1-8B-shaped heads (32 query, 8 KV, D=128), rank 16, on the GPU, with the default knobs."""
    view, q = case.view(dtype), case.query(dtype)
    ref = reference_attention(q.float(), view, None, 128**-0.5)
    base_err = lowp_attention_error(q.float(), view, None, 128**-0.5, ref)
    err = (_launch(q, view, None, 128**-0.5).float() - ref).abs().max().item()
    assert err <= 3 * base_err + 1e-5, (err, base_err)
