"""Triton ResidualAttention kernels (both families, through ``forkkv_hf``'s ``residual_attention_triton`` adapter)
against the fp32 reference. On CPU they run in the Triton interpreter (``TRITON_INTERPRET=1``, set by conftest when
there is no GPU) on small shapes; ``gpu`` tests use real sizes. The cascade kernels' own cases: test_cascade_kernel.py."""

import pytest
import torch

from forkkv_hf import reference_attention
from views import lowp_attention_error, padding_mask, random_view

triton = pytest.importorskip("triton")
from forkkv_hf.residual_attention import residual_attention_triton  # noqa: E402

KERNELS = ["cascade", "fused"]

DEV = "cuda" if torch.cuda.is_available() else "cpu"

# id, view kwargs, query heads, queries per row, kernel kwargs
CASES = [
    ("G2-T37-P5-decode", dict(B=3, Hkv=2, D=16, T=37, P=5), 4, 1, {}),
    ("G1-T23-P7-shared-rows", dict(B=4, Hkv=2, D=32, T=23, P=7, rows=[0, 0, 1, -1]), 2, 1, {}),
    ("G3-T70-P4-rank1-8", dict(B=3, Hkv=1, D=32, T=70, P=4, ranks=(1, 8)), 3, 1, {}),
    ("G4-T129-P2-rank16", dict(B=5, Hkv=2, D=64, T=129, P=2, n_agents=3, ranks=(16, 16, 4)), 8, 1, {}),
    ("G8-T45-P3", dict(B=2, Hkv=1, D=32, T=45, P=3, rows=[1, 0]), 8, 1, {}),
    ("extend-Q3", dict(B=3, Hkv=2, D=32, T=41, P=6), 4, 3, {}),
    ("extend-Q5-G3", dict(B=2, Hkv=2, D=16, T=19, P=5, rows=[0, 0]), 6, 5, {}),
    ("splits-block16", dict(B=3, Hkv=2, D=32, T=77, P=3), 4, 1, dict(block_t=16, n_splits=3)),
    ("bias-column", dict(B=3, Hkv=2, D=16, T=29, P=4, bias=True), 4, 2, {}),
    ("k-res-only", dict(B=3, Hkv=2, D=16, T=29, P=4, v_res=False), 4, 1, {}),
    ("v-res-only", dict(B=3, Hkv=2, D=16, T=29, P=4, k_res=False), 4, 1, {}),
    ("no-res-rows", dict(B=2, Hkv=2, D=16, T=29, P=4, rows=[-1, -1]), 4, 1, {}),
    ("rank64-D128", dict(B=2, Hkv=1, D=128, T=33, P=3, n_agents=2, ranks=(64, 8)), 2, 1, {}),
]


def _query(view, H, Q, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(view.batch_size, H, Q, view.shared.key.shape[-1], generator=g)


def _to(view, device):
    sh = view.shared
    for name in ("key", "value", "cos", "sin"):
        setattr(sh, name, getattr(sh, name).to(device))
    for res in (sh.k_res, sh.v_res):
        if res is not None:
            res.u, res.B = res.u.to(device), res.B.to(device)
    view.key, view.value = view.key.to(device), view.value.to(device)
    for name in ("k_rows", "v_rows"):
        if getattr(view, name) is not None:
            setattr(view, name, getattr(view, name).to(device))
    return view


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "padded"])
@pytest.mark.parametrize("name,kw,H,Q,kk", CASES, ids=[c[0] for c in CASES])
def test_kernel_fp32_matches_reference(name, kw, H, Q, kk, masked, kernel):
    view = random_view(**kw)
    q = _query(view, H, Q)
    B, T, P = view.batch_size, view.shared_len, view.private_len
    mask = padding_mask(B, Q, T, P, [(b + 1) % max(1, P - Q + 1) for b in range(B)]) if masked else None
    scale = q.shape[-1] ** -0.5
    ref = reference_attention(q, view, mask, scale)
    if kernel == "cascade":  # its knobs differ; its splits are exercised in test_cascade_kernel.py
        kk = {"block_t": kk["block_t"]} if "block_t" in kk else {}
    out = residual_attention_triton(q.to(DEV), _to(view, DEV), None if mask is None else mask.to(DEV), scale,
                                    kernel=kernel, **kk)
    assert out.shape == (B, Q, H, q.shape[-1])
    torch.testing.assert_close(out.cpu(), ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "kw,H,Q",
    [(dict(B=4, Hkv=2, D=64, T=70, P=5, rows=[0, 1, 1, -1]), 8, 1), (dict(B=2, Hkv=2, D=32, T=39, P=6), 6, 4)],
    ids=["decode-G4", "extend-G3"],
)
@pytest.mark.parametrize("lowp_rope", [False, True], ids=["rope-fp32", "rope-lowp"])
@pytest.mark.parametrize("kernel", KERNELS + ["cascade-scores-fp32"])
def test_kernel_low_precision_pass_rule(dtype, kw, H, Q, lowp_rope, kernel):
    """Error against the fp32 reference at most 3x that of PyTorch doing the same attention in the low dtype; with the
    K residual's rotation in fp32 or in the low dtype (the GPU default; the interpreter emulates its roundings); the
    cascade kernels with their K-residual scores kept in fp16 (default) or fp32."""
    extra = {"scores_fp32": True} if kernel == "cascade-scores-fp32" else {}
    kernel = kernel.split("-")[0]
    view = random_view(dtype=dtype, **kw)
    q = _query(view, H, Q).to(dtype)
    scale = q.shape[-1] ** -0.5
    mask = padding_mask(view.batch_size, Q, view.shared_len, view.private_len, [1] * view.batch_size)
    for m in (None, mask):
        ref = reference_attention(q.float(), view, m, scale)
        base_err = lowp_attention_error(q.float(), view, m, scale, ref)
        out = residual_attention_triton(q.to(DEV), _to(view, DEV), None if m is None else m.to(DEV), scale,
                                        kernel=kernel, lowp_rope=lowp_rope, **extra)
        assert out.dtype == dtype
        err = (out.float().cpu() - ref).abs().max().item()
        assert err <= 3 * base_err + 1e-5, (err, base_err)
        view = _to(view, "cpu")


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_notices_the_residual(kernel):
    """Not a test that cannot fail: with the residual removed (the view's host slots, which the adapter reads first)
    the kernel's output changes."""
    view = _to(random_view(B=2, Hkv=2, D=16, T=30, P=2, rows=[0, 1]), DEV)
    q = _query(view, 4, 1).to(DEV)
    a = residual_attention_triton(q, view, None, 0.25, kernel=kernel)
    view.k_slots = view.v_slots = (-1, -1)
    b = residual_attention_triton(q, view, None, 0.25, kernel=kernel)
    assert (a - b).abs().max() > 1e-2


def test_kernel_choice(monkeypatch):
    """By default the family the measurements chose for the call's shape; ``FORKKV_KERNEL`` overrides it; unknown
    names are refused with the choices."""
    import importlib

    ra = importlib.import_module("forkkv_hf.residual_attention")
    monkeypatch.delenv("FORKKV_KERNEL", raising=False)
    many = ra.FUSED_MIN_K_QUERIES
    assert [ra._triton_kernel(many, 1, True), ra._triton_kernel(many - 1, 1, True), ra._triton_kernel(many, 1, False)] \
        == ["fused", "cascade", "cascade"]
    monkeypatch.setenv("FORKKV_KERNEL", "fused")
    assert ra._triton_kernel(4, 1, True) == "fused"
    monkeypatch.setenv("FORKKV_KERNEL", "flash")
    with pytest.raises(ValueError, match="use one of"):
        ra._triton_kernel(4, 1, True)


def test_generate_with_triton_backend_equals_torch(monkeypatch):
    """End to end on a tiny model: greedy generate through the Triton kernels gives the PyTorch path's tokens."""
    import forkkv_hf
    from forkkv_hf import ForkKVCache, batch_inputs, cache_kwargs
    from models import tiny_llama, with_adapters

    pm = with_adapters(tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2, seed=6),
                       {"planner": dict(r=4), "coder": dict(r=8, lora_alpha=8)}).to(DEV)
    forkkv_hf.enable_forkkv(pm)
    ctx = torch.randint(3, 128, (21,), generator=torch.Generator().manual_seed(0))
    names = ["planner", "coder", "__base__"]
    inputs = batch_inputs(ctx, [torch.tensor([5, 6, 7]), torch.tensor([8]), torch.tensor([9, 10])], pad_token_id=0,
                          device=DEV)
    outs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("FORKKV_BACKEND", backend)
        cache = ForkKVCache.from_context(pm, ctx.to(DEV), adapter_names=names)
        outs[backend] = pm.generate(**inputs, adapter_names=names, max_new_tokens=5, do_sample=False,
                                    pad_token_id=0, output_scores=True, return_dict_in_generate=True,
                                    **cache_kwargs(cache))
    assert torch.equal(outs["torch"].sequences, outs["triton"].sequences)
    for a, b in zip(outs["torch"].scores, outs["triton"].scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_generate_long_prompts_all_backends_agree(monkeypatch):
    """Prompts of 16+ tokens: ``auto`` (on CUDA: SDPA for the prompts, Triton for decode), ``sdpa`` and ``triton``
    give the PyTorch path's greedy tokens."""
    import forkkv_hf
    from forkkv_hf import ForkKVCache, batch_inputs, cache_kwargs
    from models import tiny_llama, with_adapters

    pm = with_adapters(tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2, seed=7),
                       {"planner": dict(r=4), "coder": dict(r=8, lora_alpha=8)}).to(DEV)
    forkkv_hf.enable_forkkv(pm)
    g = torch.Generator().manual_seed(1)
    ctx = torch.randint(3, 128, (33,), generator=g)
    names = ["planner", "coder", "__base__", "coder"]
    prompts = [torch.randint(3, 128, (n,), generator=g) for n in (16, 21, 18, 17)]
    inputs = batch_inputs(ctx, prompts, pad_token_id=0, device=DEV)
    outs = {}
    for backend in ("torch", "sdpa", "triton", "auto"):
        monkeypatch.setenv("FORKKV_BACKEND", backend)
        cache = ForkKVCache.from_context(pm, ctx.to(DEV), adapter_names=names)
        outs[backend] = pm.generate(**inputs, adapter_names=names, max_new_tokens=4, do_sample=False,
                                    pad_token_id=0, output_scores=True, return_dict_in_generate=True,
                                    **cache_kwargs(cache))
    for backend in ("sdpa", "triton", "auto"):
        assert torch.equal(outs["torch"].sequences, outs[backend].sequences), backend
        for a, b in zip(outs["torch"].scores, outs[backend].scores):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("T,N,Q", [(4096, 8, 1), (2053, 5, 1), (1500, 4, 17)], ids=["T4096-N8", "T2053-N5", "T1500-Q17"])
def test_kernel_real_sizes_gpu(dtype, T, N, Q, kernel):
    """Llama-3.1-8B-shaped heads (32 query, 8 KV, D=128), rank 16, on the GPU."""
    view = random_view(B=N + 2, Hkv=8, D=128, T=T, P=9 + Q, n_agents=N, ranks=(16,) * N, dtype=dtype,
                       rows=list(range(N)) + [0, -1])
    q = _query(view, 32, Q).to(dtype)
    ref = reference_attention(q.float(), view, None, 128**-0.5)
    base_err = lowp_attention_error(q.float(), view, None, 128**-0.5, ref)
    out = residual_attention_triton(q.cuda(), _to(view, "cuda"), None, 128**-0.5, kernel=kernel)
    err = (out.float().cpu() - ref).abs().max().item()
    assert err <= 3 * base_err + 1e-5, (err, base_err)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_sdpa_prompt_path_real_sizes_gpu(dtype):
    """The path CUDA takes for prompts (rebuild rows, SDPA), 8B-shaped heads, 64-token prompts: flash-attention's pass
    rule against the fp32 reference, with padding between context and prompt."""
    from forkkv_hf.residual_attention import residual_attention_sdpa

    T, N, Q = 3001, 6, 64
    view = random_view(B=N + 1, Hkv=8, D=128, T=T, P=Q + 3, n_agents=N, ranks=(16,) * N, dtype=dtype,
                       rows=list(range(N)) + [-1])
    q = _query(view, 32, Q).to(dtype)
    mask = padding_mask(N + 1, Q, T, Q + 3, [b % 4 for b in range(N + 1)])
    ref = reference_attention(q.float(), view, mask, 128**-0.5)
    base_err = lowp_attention_error(q.float(), view, mask, 128**-0.5, ref)
    out = residual_attention_sdpa(q.cuda(), _to(view, "cuda"), mask.cuda(), 128**-0.5, workspace_bytes=1 << 28)
    err = (out.float().cpu() - ref).abs().max().item()
    assert err <= 3 * base_err + 1e-5, (err, base_err)
