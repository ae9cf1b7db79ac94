"""The Triton ResidualAttention kernels (the cascade, through ``forkkv_hf``'s ``residual_attention_triton`` adapter)
against the fp32 reference, over the attention case space of tests/cases.py and the launcher's knobs. On CPU
they run in the Triton interpreter (``TRITON_INTERPRET=1``, set by conftest when there is no GPU); ``gpu`` tests use
real sizes. The cascade launcher's own checks: test_cascade_kernel.py."""

import pytest
import torch

from cases import ATTN_CASES, GPU_CASES, LOW_DTYPES, LOWP_CASES, TUNINGS, parametrize
from forkkv_hf import reference_attention
from views import lowp_attention_error, padding_mask, random_view

triton = pytest.importorskip("triton")
from forkkv_hf.ops.dispatch import residual_attention_triton  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


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


def _fp32_matches_reference(case, masked, **knobs):
    view, q = case.view(), case.query()
    mask = case.mask() if masked else None
    scale = case.D**-0.5
    ref = reference_attention(q, view, mask, scale)
    out = residual_attention_triton(q.to(DEV), _to(view, DEV), None if mask is None else mask.to(DEV), scale, **knobs)
    assert out.shape == (case.B, case.Q, case.H, case.D)
    torch.testing.assert_close(out.cpu(), ref, rtol=2e-5, atol=2e-5)


@pytest.mark.version_independent
@parametrize("masked", [False, True])
@parametrize("case", ATTN_CASES)
def test_kernel_fp32_matches_reference(case, masked):
    _fp32_matches_reference(case, masked)


@pytest.mark.version_independent
@parametrize("masked", [False, True])
@parametrize("case,knobs", TUNINGS)
def test_kernel_tunings_match_reference(case, knobs, masked):
    """The launcher's knobs (tile sizes, splits, vectors per program, programs per SM) change the schedule, not the
    result."""
    _fp32_matches_reference(case, masked, **knobs)


@pytest.mark.version_independent
@parametrize("scores", ["fp16", "fp32"])
@parametrize("lowp_rope", [False, True], fast=lambda lowp_rope: lowp_rope)
@parametrize("dtype", LOW_DTYPES, fast=lambda dtype: dtype == torch.bfloat16)
@parametrize("case", LOWP_CASES, fast=lambda case: case.Q > 1)
def test_kernel_low_precision_pass_rule(case, dtype, lowp_rope, scores):
    """Error against the fp32 reference at most 3x that of PyTorch doing the same attention in the low dtype; with the
    K residual's rotation in fp32 or in the low dtype (the GPU default; the interpreter emulates its roundings); the
    K-residual scores kept in fp16 (default) or fp32."""
    extra = {"scores_fp32": True} if scores == "fp32" else {}
    view = case.view(dtype)
    q = case.query(dtype)
    scale = case.D**-0.5
    mask = padding_mask(case.B, case.Q, case.T, case.P, [1] * case.B)
    for m in (None, mask):
        ref = reference_attention(q.float(), view, m, scale)
        base_err = lowp_attention_error(q.float(), view, m, scale, ref)
        out = residual_attention_triton(q.to(DEV), _to(view, DEV), None if m is None else m.to(DEV), scale,
                                        lowp_rope=lowp_rope, **extra)
        assert out.dtype == dtype
        err = (out.float().cpu() - ref).abs().max().item()
        assert err <= 3 * base_err + 1e-5, (err, base_err)
        view = _to(view, "cpu")


@pytest.mark.version_independent
def test_kernel_notices_the_residual():
    """Not a test that cannot fail: with the residual removed (the view's host slots, which the adapter reads first)
    the kernel's output changes."""
    view = _to(random_view(B=2, Hkv=2, D=16, T=30, P=2, rows=[0, 1]), DEV)
    q = torch.randn(2, 4, 1, 16, generator=torch.Generator().manual_seed(3)).to(DEV)
    a = residual_attention_triton(q, view, None, 0.25)
    view.k_slots = view.v_slots = (-1, -1)
    b = residual_attention_triton(q, view, None, 0.25)
    assert (a - b).abs().max() > 1e-2


@pytest.mark.version_independent
def test_f16_k_pass_kept_off_beyond_fp16s_range():
    """The K pass's fp16 form (``res_f16``) holds only while the K residual's values and rebuilt values stay within
    fp16's range: the adapter checks each residual once (memoised on it) and keeps the fp32 rebuild beyond that, so
    the output still equals the reference. Not a test that cannot fail: the launcher given the fp16 form directly on
    the same residual overflows (non-finite output)."""
    from forkkv_kernels import cascade_attention
    from forkkv_hf.ops.dispatch import k_residual_fits_f16
    from forkkv_kernels.kres_pass import F16_LIMIT, f16_range_ok

    view = _to(random_view(B=2, Hkv=2, D=16, T=30, P=2, rows=[0, 1], v_res=False), DEV)
    res = view.shared.k_res
    assert f16_range_ok(res.u, res.B)
    res.u = res.u * (4 * F16_LIMIT / res.u.abs().max())  # rebuilt values beyond fp16's 65504
    assert not f16_range_ok(res.u, res.B)
    q = torch.randn(2, 4, 1, 16, generator=torch.Generator().manual_seed(3)).to(DEV)
    ref = reference_attention(q.cpu(), _to(view, "cpu"), None, 0.25)
    view = _to(view, DEV)
    out = residual_attention_triton(q, view, None, 0.25, res_form="joined", res_f16=True)
    torch.testing.assert_close(out.cpu(), ref, rtol=2e-5, atol=2e-5)
    assert k_residual_fits_f16(res) is False and res._fits_f16[2] is False  # memoised
    sh = view.shared
    raw = cascade_attention(q, sh.key[0], sh.value[0], sh.cos, sh.sin, view.key, view.value, 0.25, k_u=res.u,
                            k_B=res.B, k_slot=view.k_rows.to(DEV), res_form="joined", res_f16=True)
    assert not torch.isfinite(raw).all()


@pytest.mark.version_independent
def test_f16_queries_are_exact_where_fp16_holds_their_bits():
    """The fp16 form's queries (``f16_queries``: bf16 scaled by 2^-8 into fp16, the score scale divided by it): every
    bf16 value from 2^-9 in magnitude up to 1e7 (fp16's range, scaled back, ends near 1.68e7) converts exactly; below
    2^-9 fp16's subnormals round it, by at most 2^-17 absolute (half their spacing, scaled back), which the README
    states; fp16 queries pass as they are."""
    from forkkv_kernels.kres_pass import Q_F16_SCALE, f16_queries

    g = torch.Generator().manual_seed(0)
    mags = torch.logspace(-7, 7, 200_000, dtype=torch.float64)  # 1e-7 .. 1e7
    q = (torch.randn(200_000, generator=g, dtype=torch.float64).sign() * mags).to(torch.bfloat16).view(1, 1, 1, -1)
    q16, scale = f16_queries(q, 0.125)
    assert q16.dtype == torch.float16 and scale == 0.125 / Q_F16_SCALE and torch.isfinite(q16).all()
    back, ref = q16.double() / Q_F16_SCALE, q.double()
    big = ref.abs() >= 2.0**-9
    assert torch.equal(back[big], ref[big])  # exact where fp16 holds all 8 of bf16's bits
    err = (back - ref).abs()[~big]
    assert err.max() <= 2.0**-17 and err.max() > 0  # rounded below it, within half a subnormal step
    half = torch.randn(1, 2, 1, 8, generator=g).half()
    assert f16_queries(half, 0.125)[0] is half and f16_queries(half, 0.125)[1] == 0.125


@pytest.mark.version_independent
def test_f16_k_pass_takes_the_residuals_fp16_b():
    """With the fp16 form the adapter passes the K residual's ``B`` in fp16, converted once and kept with the residual
    (not pickled with it): the same output as the launcher converting it per call, bit for bit; a ``k_B16`` that is
    not ``k_B`` in fp16 is refused."""
    import pickle

    from forkkv_kernels import cascade_attention
    from forkkv_hf.ops.dispatch import k_residual_b16

    view = _to(random_view(B=2, Hkv=2, D=16, T=30, P=2, rows=[0, 1], v_res=False, dtype=torch.bfloat16), DEV)
    res, sh = view.shared.k_res, view.shared
    q = torch.randn(2, 4, 1, 16, generator=torch.Generator().manual_seed(3)).to(DEV, torch.bfloat16)
    out = residual_attention_triton(q, view, None, 0.25, res_form="joined", res_f16=True)
    assert "_b16" in res.__dict__  # the adapter made the copy and kept it
    b16 = k_residual_b16(res)
    assert b16.dtype == torch.float16 and k_residual_b16(res) is b16  # kept, not converted again
    kw = dict(k_u=res.u, k_B=res.B, k_slot=view.k_rows.to(DEV), res_form="joined", res_f16=True)
    per_call = cascade_attention(q, sh.key[0], sh.value[0], sh.cos, sh.sin, view.key, view.value, 0.25, **kw)
    assert torch.equal(out, per_call)
    assert "_b16" not in pickle.loads(pickle.dumps(res)).__dict__
    with pytest.raises(ValueError, match="k_B16 must be k_B in fp16"):
        cascade_attention(q, sh.key[0], sh.value[0], sh.cos, sh.sin, view.key, view.value, 0.25, k_B16=res.B, **kw)
    res.B = res.B * 2  # a new B: a new copy
    assert torch.equal(k_residual_b16(res), res.B.to(torch.float16))


def test_f16_k_pass_takes_the_rope_tables_in_fp16(monkeypatch):
    """With the fp16 form the adapter also passes the RoPE tables in fp16 (``rope16``), made once per table and kept
    while it lives (layers and calls sharing a table share the copy; a compiled step's plan holds the same): the same
    output as the kernels converting them per tile, bit for bit; a ``rope16`` that is not the tables in fp16 is
    refused with what to pass."""
    import gc

    import forkkv_kernels
    from forkkv_kernels import cascade_attention
    from forkkv_kernels.kres_pass import rope_f16
    from forkkv_hf.ops import dispatch
    from forkkv_hf.ops.decode_ops import plan_decode_attention

    view = _to(random_view(B=2, Hkv=2, D=16, T=30, P=2, rows=[0, 1], v_res=False, dtype=torch.bfloat16), DEV)
    res, sh = view.shared.k_res, view.shared
    q = torch.randn(2, 4, 1, 16, generator=torch.Generator().manual_seed(3)).to(DEV, torch.bfloat16)
    seen, launcher = [], forkkv_kernels.cascade_attention

    def spy(*args, **kw):
        seen.append(kw.get("rope16"))
        return launcher(*args, **kw)

    monkeypatch.setattr(forkkv_kernels, "cascade_attention", spy)
    out = residual_attention_triton(q, view, None, 0.25, res_form="joined", res_f16=True)
    residual_attention_triton(q, view, None, 0.25, res_form="joined", res_f16=True)
    c16, s16 = seen[0]
    assert c16.dtype == s16.dtype == torch.float16 and seen[1][0] is c16 and seen[1][1] is s16
    assert torch.equal(c16, sh.cos.to(torch.float16)) and torch.equal(s16, sh.sin.to(torch.float16))
    plan = plan_decode_attention(sh, (0, 1), None)
    assert plan.rope16[0] is c16 and plan.rope16[1] is s16  # the compiled step's plan: the same copy
    kw = dict(k_u=res.u, k_B=res.B, k_slot=view.k_rows.to(DEV), res_form="joined", res_f16=True)
    per_tile = cascade_attention(q, sh.key[0], sh.value[0], sh.cos, sh.sin, view.key, view.value, 0.25, **kw)
    assert torch.equal(out, per_tile)
    for bad in ((sh.cos, sh.sin), rope_f16(sh.cos[:-1], sh.sin[:-1])):
        with pytest.raises(ValueError, match="rope16's cos must be the cos table in fp16"):
            cascade_attention(q, sh.key[0], sh.value[0], sh.cos, sh.sin, view.key, view.value, 0.25, rope16=bad, **kw)
    n = len(dispatch._ROPE16)
    sh.cos = sh.cos.clone()  # a new table: a new copy, and the old one's goes with it
    seen.clear()
    residual_attention_triton(q, view, None, 0.25, res_form="joined", res_f16=True)
    assert seen[0][0] is not c16
    del c16, s16, seen[:], plan
    gc.collect()
    assert len(dispatch._ROPE16) <= n


@pytest.mark.version_independent
def test_compiled_decode_plan_keeps_the_f16_k_pass_off_beyond_fp16s_range():
    """The compiled decode's plan (what the custom op receives) carries ``res_f16=False`` for a K residual beyond
    fp16's range and leaves the kernel's rule (``None``) otherwise."""
    from forkkv_hf.ops.decode_ops import plan_decode_attention

    view = random_view(B=2, Hkv=2, D=16, T=30, P=2, rows=[0, 1], v_res=False)
    assert plan_decode_attention(view.shared, (0, 1), None).res_f16 is None
    far = random_view(B=2, Hkv=2, D=16, T=30, P=2, rows=[0, 1], v_res=False)
    far.shared.k_res.u = far.shared.k_res.u * 1e5
    assert plan_decode_attention(far.shared, (0, 1), None).res_f16 is False


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


def _two_rows():
    """A tiny ForkKV model, a 21-token context and two rows (a ``planner`` row and a ``__base__`` row, padded)."""
    import forkkv_hf
    from forkkv_hf import batch_inputs
    from models import tiny_llama, with_adapters

    pm = with_adapters(tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2, seed=6), {"planner": dict(r=4)}).to(DEV)
    forkkv_hf.enable_forkkv(pm)
    ctx = torch.randint(3, 128, (21,), generator=torch.Generator().manual_seed(0)).to(DEV)
    names = ["planner", "__base__"]
    return pm, ctx, names, batch_inputs(ctx, [torch.tensor([5, 6, 7]), torch.tensor([8])], pad_token_id=0, device=DEV)


def test_masks_reach_the_shared_part_only_where_they_may_hide_context(monkeypatch):
    """Padded rows in an eager generate, and a direct forward with a 2-D mask (both checked: a mask hiding context
    tokens is refused), call the kernels with ``context_visible`` (their shared part reads no mask); a direct forward
    with a 4-D mask of the caller's own keeps the mask everywhere."""
    import forkkv_kernels
    from forkkv_hf import ForkKVCache, cache_kwargs

    monkeypatch.setenv("FORKKV_BACKEND", "triton")
    calls, launcher = [], forkkv_kernels.cascade_attention

    def spy(*args, **kw):
        calls.append((kw["mask"] is not None, kw["context_visible"]))
        return launcher(*args, **kw)

    monkeypatch.setattr(forkkv_kernels, "cascade_attention", spy)
    pm, ctx, names, inputs = _two_rows()
    pm.generate(**inputs, adapter_names=names, max_new_tokens=3, do_sample=False, pad_token_id=0,
                disable_compile=True, **cache_kwargs(ForkKVCache.from_context(pm, ctx, adapter_names=names)))
    assert calls == [(True, True)] * 6  # the prompts' forward and two decode steps, two layers each
    ids, m2 = inputs["input_ids"], inputs["attention_mask"]
    T, (B, S) = ctx.numel(), ids.shape
    pos = (m2.cumsum(-1) - 1).clamp(min=0)[:, T:]
    causal = torch.ones(S, S, dtype=torch.bool, device=DEV).tril()
    m4 = (m2[:, None, None, :].bool() & causal[None, None]).expand(B, 1, S, S)[:, :, T:]
    for mask, visible in ((m2, True), (m4, False)):
        calls.clear()
        pm(input_ids=ids[:, T:], attention_mask=mask, position_ids=pos, adapter_names=names,
           **cache_kwargs(ForkKVCache.from_context(pm, ctx, adapter_names=names)))
        assert calls == [(True, visible)] * 2, mask.dim()


@pytest.mark.slow
def test_a_compiled_forward_reads_its_mask_everywhere_after_an_eager_one(monkeypatch):
    """A forward of a ``torch.compile``d model runs its cache's pre-hook traced, where no mask value is checked: after an
    eager forward with a 2-D mask set ``context_visible`` on the cache, a compiled step with a 4-D mask of the caller's
    own that hides a context token must still reach the shared part and give the eager step's logits (the flag was
    stale before: the hidden token was attended to)."""
    import forkkv_kernels
    from forkkv_hf import ForkKVCache, cache_kwargs

    monkeypatch.setenv("FORKKV_BACKEND", "triton")
    calls, launcher = [], forkkv_kernels.cascade_attention

    def spy(*args, **kw):  # runs the kernels outside the trace (the interpreter cannot be traced)
        calls.append(kw["context_visible"])
        return torch._dynamo.disable(launcher)(*args, **kw)

    monkeypatch.setattr(forkkv_kernels, "cascade_attention", spy)
    pm, ctx, names, inputs = _two_rows()
    ids, m2 = inputs["input_ids"], inputs["attention_mask"]
    T, (B, S) = ctx.numel(), ids.shape
    pos = (m2.cumsum(-1) - 1).clamp(min=0)[:, T:]
    step = dict(input_ids=torch.tensor([[9], [10]], device=DEV), position_ids=pos[:, -1:] + 1, adapter_names=names)
    hiding = torch.ones(B, 1, 1, S + 1, dtype=torch.bool, device=DEV)
    hiding[0, ..., 3] = False  # row 0 does not see context token 3
    base, logits = pm.get_base_model(), {}
    for mode in ("eager", "compiled", "unmasked"):
        cache = ForkKVCache.from_context(pm, ctx, adapter_names=names)
        with torch.no_grad():
            pm(input_ids=ids[:, T:], attention_mask=m2, position_ids=pos, adapter_names=names, **cache_kwargs(cache))
            calls.clear()
            run = torch.compile(base, backend="eager") if mode == "compiled" else base
            kw = dict(attention_mask=hiding if mode != "unmasked" else hiding | True, **step, **cache_kwargs(cache))
            with pm._enable_peft_forward_hooks(**kw):  # PeftModel.forward's own way to the rows' adapters
                logits[mode] = run(**{k: v for k, v in kw.items() if k != "adapter_names"}).logits
        assert calls == [False, False], mode
    torch.testing.assert_close(logits["compiled"], logits["eager"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits["unmasked"][0], logits["eager"][0], atol=1e-2)  # the token hidden matters


@pytest.mark.slow
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


@pytest.mark.version_independent
@pytest.mark.gpu
@parametrize("dtype", LOW_DTYPES)
@parametrize("case", GPU_CASES)
def test_kernel_real_sizes_gpu(case, dtype):
    """Llama-3.1-8B-shaped heads (32 query, 8 KV, D=128), rank 16, on the GPU."""
    view, q = case.view(dtype), case.query(dtype)
    ref = reference_attention(q.float(), view, None, 128**-0.5)
    base_err = lowp_attention_error(q.float(), view, None, 128**-0.5, ref)
    out = residual_attention_triton(q.cuda(), _to(view, "cuda"), None, 128**-0.5)
    err = (out.float().cpu() - ref).abs().max().item()
    assert err <= 3 * base_err + 1e-5, (err, base_err)


@pytest.mark.version_independent
@pytest.mark.gpu
@parametrize("dtype", LOW_DTYPES)
def test_sdpa_prompt_path_real_sizes_gpu(dtype):
    """The path CUDA takes for prompts (rebuild rows, SDPA), 8B-shaped heads, 64-token prompts: flash-attention's pass
    rule against the fp32 reference, with padding between context and prompt."""
    from forkkv_hf.ops.dispatch import residual_attention_sdpa

    T, N, Q = 3001, 6, 64
    view = random_view(B=N + 1, Hkv=8, D=128, T=T, P=Q + 3, n_agents=N, ranks=(16,) * N, dtype=dtype,
                       rows=list(range(N)) + [-1])
    q = torch.randn(N + 1, 32, Q, 128, generator=torch.Generator().manual_seed(3)).to(dtype)
    mask = padding_mask(N + 1, Q, T, Q + 3, [b % 4 for b in range(N + 1)])
    ref = reference_attention(q.float(), view, mask, 128**-0.5)
    base_err = lowp_attention_error(q.float(), view, mask, 128**-0.5, ref)
    out = residual_attention_sdpa(q.cuda(), _to(view, "cuda"), mask.cuda(), 128**-0.5, workspace_bytes=1 << 28)
    err = (out.float().cpu() - ref).abs().max().item()
    assert err <= 3 * base_err + 1e-5, (err, base_err)


@pytest.mark.version_independent
def test_launch_takes_fewer_stages_where_shared_memory_runs_out(monkeypatch):
    """A launch rule whose pipeline needs more shared memory than the GPU has (a wider head, a higher rank, fp32 tiles
    than the rule was measured on) runs with fewer stages, and remembers it; other errors, and one stage that still
    does not fit, are raised."""
    from forkkv_kernels import attention_common as ac

    monkeypatch.setattr(ac, "_FITTED_STAGES", {})

    class OutOfResources(Exception):
        pass

    class FakeKernel:
        def __init__(self, fits: int, other_error=False):
            self.fits, self.other_error, self.tried = fits, other_error, []

        def __getitem__(self, grid):
            def run(*args, num_warps, num_stages, **kw):
                self.tried.append(num_stages)
                if self.other_error:
                    raise RuntimeError("not a resource error")
                if num_stages > self.fits:
                    raise OutOfResources("out of resource: shared memory, Required: 237568, Hardware limit: 232448.")
                return ("ran", grid, args, kw, num_stages)
            return run

    x = torch.zeros(2, dtype=torch.bfloat16)
    k = FakeKernel(fits=1)
    assert ac.launch(k, (1, 2), x, 7, num_warps=8, num_stages=3, BLOCK_T=128)[-1] == 1
    assert k.tried == [3, 2, 1]
    assert ac.launch(k, (1, 2), x, 9, num_warps=8, num_stages=3, BLOCK_T=128)[-1] == 1  # remembered: no retries
    assert k.tried == [3, 2, 1, 1]
    ac.launch(k, (1, 2), x.float(), 9, num_warps=8, num_stages=3, BLOCK_T=128)  # other dtypes: their own entry
    assert k.tried[4:] == [3, 2, 1]
    fits = FakeKernel(fits=3)
    assert ac.launch(fits, (1,), x, num_warps=4, num_stages=3, maxnreg=128, BLOCK_T=64)[-1] == 3
    assert fits.tried == [3]
    with pytest.raises(OutOfResources):
        ac.launch(FakeKernel(fits=0), (1,), x, num_warps=4, num_stages=2, BLOCK_T=64)
    bad = FakeKernel(fits=3, other_error=True)
    with pytest.raises(RuntimeError, match="not a resource error"):
        ac.launch(bad, (1,), x, num_warps=4, num_stages=3, BLOCK_T=64)
    assert bad.tried == [3]
