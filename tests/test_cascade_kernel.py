"""The cascade ResidualAttention kernels (``forkkv_kernels.cascade_attention``) against the fp32 reference, through its
plain-tensor launcher. On CPU they run in the Triton interpreter on small, odd shapes. (Their low-precision pass rule
and end-to-end generate are in test_kernels.py, with the other kernel family.)"""

import ast
from pathlib import Path

import pytest
import torch

from forkkv_hf import reference_attention
from views import lowp_attention_error, padding_mask, random_view

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


# view kwargs, query heads, queries per row, launcher knobs
CASES = {
    "G1-D16-T37": (dict(B=3, Hkv=2, D=16, T=37, P=5), 2, 1, {}),
    "G2-D48-T53-halves-not-pow2": (dict(B=3, Hkv=2, D=48, T=53, P=4), 4, 1, {}),
    "G3-rank1-rank3": (dict(B=4, Hkv=1, D=32, T=70, P=4, n_agents=2, ranks=(1, 3)), 3, 1, {}),
    "G4-rank64": (dict(B=2, Hkv=2, D=32, T=29, P=3, n_agents=2, ranks=(64, 16)), 8, 1, {}),
    "G6-odd-B5": (dict(B=5, Hkv=1, D=16, T=41, P=2, n_agents=3, ranks=(2, 5, 7)), 6, 1, {}),
    "G8-base-rows": (dict(B=3, Hkv=1, D=32, T=45, P=3, rows=[1, -1, -1]), 8, 1, {}),
    "rows-share-an-agent-x9": (dict(B=10, Hkv=2, D=16, T=33, P=2, rows=[0] * 9 + [1]), 4, 1, {}),
    "shared-agent-chunks-mq16": (dict(B=7, Hkv=1, D=16, T=31, P=2, rows=[1, 0, 1, 1, 0, 1, 1]), 4, 2, dict(mq=16)),
    "extend-Q3": (dict(B=3, Hkv=2, D=32, T=41, P=6), 4, 3, {}),
    "extend-Q5-G3-one-agent": (dict(B=2, Hkv=2, D=16, T=19, P=5, rows=[0, 0]), 6, 5, {}),
    "bias-column": (dict(B=3, Hkv=2, D=16, T=29, P=4, bias=True), 4, 2, {}),
    "k-res-only": (dict(B=3, Hkv=2, D=16, T=29, P=4, v_res=False), 4, 1, {}),
    "v-res-only": (dict(B=3, Hkv=2, D=16, T=29, P=4, k_res=False), 4, 1, {}),
    "no-residual": (dict(B=3, Hkv=2, D=16, T=29, P=4, k_res=False, v_res=False), 4, 1, {}),
    "all-base-rows": (dict(B=2, Hkv=2, D=16, T=29, P=4, rows=[-1, -1]), 4, 1, {}),
    "block_m16-n_sub1": (dict(B=6, Hkv=2, D=16, T=37, P=3), 4, 1, dict(block_m=16, n_sub=1)),
    "block_m32-n_sub2-block_t16": (dict(B=9, Hkv=1, D=16, T=50, P=3), 4, 1, dict(block_m=32, n_sub=2, block_t=16)),
    "block_m128-n_sub4": (dict(B=5, Hkv=2, D=16, T=23, P=2), 8, 1, dict(block_m=128, n_sub=4)),
    "res_heads1-many-splits": (dict(B=3, Hkv=2, D=16, T=77, P=3), 4, 1,
                               dict(res_heads=1, res_block_t=16, res_programs_per_sm=64, programs_per_sm=64)),
    "one-split": (dict(B=3, Hkv=2, D=16, T=77, P=3), 4, 1, dict(programs_per_sm=1, res_programs_per_sm=1)),
    "device-order": (dict(B=5, Hkv=2, D=16, T=21, P=2, rows=[2, 0, -1, 0, 1], n_agents=3, ranks=(4, 2, 3)), 4, 1,
                     dict(host_order=False)),
}


@pytest.mark.parametrize("masked", [False, True], ids=["implicit", "padded"])
@pytest.mark.parametrize("name", list(CASES))
def test_cascade_fp32_matches_reference(name, masked):
    kw, H, Q, tuning = CASES[name]
    view = random_view(**kw)
    q = _query(view, H, Q)
    B, T, P = view.batch_size, view.shared_len, view.private_len
    mask = padding_mask(B, Q, T, P, [(b + 1) % max(1, P - Q + 1) for b in range(B)]) if masked else None
    scale = q.shape[-1] ** -0.5
    out = _launch(q, view, mask, scale, **tuning)
    assert out.shape == (B, Q, H, q.shape[-1])
    torch.testing.assert_close(out, reference_attention(q, view, mask, scale), rtol=2e-5, atol=2e-5)


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
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("T,N,Q,rows_per_agent", [(4096, 8, 1, 1), (2053, 5, 1, 3), (1500, 4, 7, 1)],
                         ids=["T4096-N8", "T2053-N5-shared-agents", "T1500-Q7"])
def test_cascade_real_sizes_gpu(dtype, T, N, Q, rows_per_agent):
    """Llama-3.1-8B-shaped heads (32 query, 8 KV, D=128), rank 16, on the GPU, with the default knobs."""
    rows = [i // rows_per_agent for i in range(N * rows_per_agent)] + [0, -1]
    view = random_view(B=len(rows), Hkv=8, D=128, T=T, P=9 + Q, n_agents=N, ranks=(16,) * N, dtype=dtype, rows=rows)
    q = _query(view, 32, Q).to(dtype)
    ref = reference_attention(q.float(), view, None, 128**-0.5)
    base_err = lowp_attention_error(q.float(), view, None, 128**-0.5, ref)
    err = (_launch(q, view, None, 128**-0.5).float() - ref).abs().max().item()
    assert err <= 3 * base_err + 1e-5, (err, base_err)
