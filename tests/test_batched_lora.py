"""Batched mixed-adapter LoRA equals PEFT's per-adapter loop (module outputs, logits, generate)."""

import pytest
import torch

import forkkv_hf
from forkkv_hf.peft.batched_lora import batched_lora, disable_batched_lora, enable_batched_lora, is_batched_lora_enabled
from cases import parametrize
from models import tiny_llama, with_adapters

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _agents(dtype=torch.float32, seed=0):
    m = tiny_llama(layers=3, seed=seed, dtype=dtype)
    return _with(m, seed).to(DEV)


def _with(m, seed):
    return with_adapters(
        m,
        {
            "planner": dict(r=4, target_modules=ALL),
            "coder": dict(r=8, lora_alpha=3, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True),
            "critic": dict(r=2, lora_alpha=16, target_modules=["k_proj", "o_proj"], layers_to_transform=[0, 2]),
            "biased": dict(r=4, target_modules=["v_proj", "up_proj"], lora_bias=True),
        },
        seed=seed,
    )


NAMES = ["planner", "__base__", "coder", "critic", "planner", "biased", "coder"]


def _logits(pm, ids, names):
    with torch.no_grad():
        return pm(input_ids=ids, adapter_names=names).logits.float()


@parametrize("backend", ["torch", "triton"])
@parametrize("dtype", [torch.float32, torch.bfloat16], fast=lambda dtype: dtype == torch.float32)
def test_logits_equal_peft_loop(backend, dtype, monkeypatch):
    monkeypatch.setenv("FORKKV_LORA_BACKEND", backend)
    pm = _agents(dtype)
    ids = torch.randint(3, 128, (len(NAMES), 6), generator=torch.Generator().manual_seed(1)).to(DEV)
    ref = _logits(pm, ids, NAMES)
    with batched_lora(pm):
        assert is_batched_lora_enabled(pm)
        out = _logits(pm, ids, NAMES)
    assert not is_batched_lora_enabled(pm)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
    torch.testing.assert_close(out, ref, **tol)
    if dtype == torch.float32:  # not a test that cannot fail: the adapters do change the logits
        with pm.disable_adapter():
            base = pm(input_ids=ids).logits.float()
        assert (base - ref).abs().max() > 1e-2


def test_module_output_matches_every_layer(monkeypatch):
    """Every LoRA layer, called directly with a random mix, gives PEFT's output."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    import forkkv_kernels.lora as klora

    calls = []
    real = klora.lora_delta_triton
    monkeypatch.setattr(klora, "lora_delta_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    pm = _agents()
    g = torch.Generator().manual_seed(3)
    for name, mod in pm.named_modules():
        if not isinstance(mod, LoraLinear):
            continue
        x = torch.randn(len(NAMES), 3, mod.in_features, generator=g).to(DEV)
        ref = mod(x, adapter_names=NAMES)
        for backend in ("torch", "triton"):
            monkeypatch.setenv("FORKKV_LORA_BACKEND", backend)
            enable_batched_lora(pm)
            with torch.no_grad():  # with grad, PEFT's own forward runs (test_gradients_reach_the_lora_weights)
                out = mod(x, adapter_names=NAMES)
            disable_batched_lora(pm)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=f"{name} ({backend})")
    assert len(calls) > 10  # the Triton kernels did run (in the interpreter on CPU)


def test_gradients_reach_the_lora_weights():
    """A mixed-adapter forward with grad enabled (eval mode, LoRA weights trainable) gives PEFT's gradients to every
    LoRA weight and to the input embeddings (before: the stacks cut the weights' autograd link, so they got none,
    silently, while the loss still backpropagated)."""
    pm = _agents()
    ids = torch.randint(3, 128, (len(NAMES), 6), generator=torch.Generator().manual_seed(5)).to(DEV)

    def grads():
        pm.zero_grad(set_to_none=True)
        embeds = pm.get_base_model().get_input_embeddings()(ids).detach().requires_grad_(True)
        pm(inputs_embeds=embeds, adapter_names=NAMES).logits.float().square().mean().backward()
        lora = {n: p.grad.clone() for n, p in pm.named_parameters() if "lora_" in n and p.grad is not None}
        return lora, embeds.grad

    ref_lora, ref_x = grads()
    with batched_lora(pm):
        out_lora, out_x = grads()
    assert len(ref_lora) > 10 and out_lora.keys() == ref_lora.keys()
    for n in ref_lora:
        torch.testing.assert_close(out_lora[n], ref_lora[n], rtol=1e-5, atol=1e-6, msg=n)
    torch.testing.assert_close(out_x, ref_x, rtol=1e-5, atol=1e-6)


def test_generate_tokens_equal_peft():
    pm = _agents(seed=2)
    ids = torch.randint(3, 128, (len(NAMES), 5), generator=torch.Generator().manual_seed(2)).to(DEV)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    ref = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=NAMES, **kw)
    with batched_lora(pm):
        out = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=NAMES, **kw)
    assert torch.equal(out, ref)
    beams = pm.generate(input_ids=ids[:3], attention_mask=torch.ones_like(ids[:3]), adapter_names=NAMES[:3],
                        num_beams=2, **kw)
    with batched_lora(pm):
        out = pm.generate(input_ids=ids[:3], attention_mask=torch.ones_like(ids[:3]), adapter_names=NAMES[:3],
                          num_beams=2, **kw)
    assert torch.equal(out, beams)


def test_stacks_follow_weight_changes_and_new_adapters():
    pm = _agents(seed=4)
    ids = torch.randint(3, 128, (3, 4), generator=torch.Generator().manual_seed(5)).to(DEV)
    names = ["planner", "coder", "planner"]
    enable_batched_lora(pm)
    before = _logits(pm, ids, names)
    with torch.no_grad():  # change an adapter in place, as load_state_dict would
        for n, p in pm.named_parameters():
            if "lora_B.planner" in n:
                p.mul_(-1.5)
    after = _logits(pm, ids, names)
    disable_batched_lora(pm)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, _logits(pm, ids, names), rtol=1e-4, atol=1e-4)
    # an adapter added while batched LoRA is on
    from peft import LoraConfig

    enable_batched_lora(pm)
    pm.add_adapter("late", LoraConfig(r=3, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    pm.to(DEV)
    enable_batched_lora(pm)  # enable_forkkv's generate guard does this before every generate
    names = ["late", "planner", "__base__"]
    out = _logits(pm, ids, names)
    disable_batched_lora(pm)
    torch.testing.assert_close(out, _logits(pm, ids, names), rtol=1e-4, atol=1e-4)


def test_enable_forkkv_turns_it_on():
    pm = forkkv_hf.enable_forkkv(_agents(seed=6))
    assert is_batched_lora_enabled(pm)
    forkkv_hf.disable_forkkv(pm)
    assert not is_batched_lora_enabled(pm)


def test_decode_steps_reuse_the_plan(monkeypatch):
    """Per layer, adapters are checked once per generate call, not at every decode step (that Python work cost
    ~80 ms per step with 128 adapters on an 8B model)."""
    import forkkv_hf.peft.batched_lora as bl

    pm = _agents(seed=7)
    ids = torch.randint(3, 128, (3, 4), generator=torch.Generator().manual_seed(8)).to(DEV)
    calls = []
    real = bl.stacked_lora
    monkeypatch.setattr(bl, "stacked_lora", lambda layer, used=None: calls.append(layer) or real(layer, used))
    names = ["planner", "coder", "critic"]
    with batched_lora(pm):
        pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names, max_new_tokens=6,
                    min_new_tokens=6, do_sample=False, pad_token_id=0)
    from peft.tuners.lora.layer import Linear as LoraLinear

    n_layers = sum(isinstance(m, LoraLinear) for m in pm.modules())
    assert 0 < len(calls) <= n_layers


def test_peft_argument_checks_once_per_call_and_still_enforced(monkeypatch):
    """PEFT's ``_check_forward_args`` (O(rows) per layer) runs once per layer and generate call, not per decode step;
    its errors still come: a wrong number of names, merged adapters on a later call."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    pm = _agents(seed=9)
    ids = torch.randint(3, 128, (3, 4), generator=torch.Generator().manual_seed(8)).to(DEV)
    calls = []
    real = LoraLinear._check_forward_args
    monkeypatch.setattr(LoraLinear, "_check_forward_args",
                        lambda self, x, *a, **k: calls.append(self) or real(self, x, *a, **k))
    names = ["planner", "coder", "critic"]
    with batched_lora(pm):
        pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names, max_new_tokens=6,
                    min_new_tokens=6, do_sample=False, pad_token_id=0)
        n_layers = len({id(m) for m in calls})
        assert n_layers > 0 and len(calls) == n_layers  # one check per layer for 6 forward passes
        with pytest.raises(ValueError, match="Length of `adapter_names`"):
            pm(input_ids=ids, adapter_names=names[:2])
        pm.merge_adapter(["planner"])
        with pytest.raises(ValueError, match="merged adapters"):
            pm(input_ids=ids, adapter_names=names)


@pytest.mark.slow
def test_a_model_its_user_compiled_runs_each_calls_own_adapters():
    """``torch.compile(peft_model)`` with ``adapter_names``: a traced forward outside ``generate``'s compiled decode
    runs PEFT's own mixed-batch forward (and its argument checks) for its own rows, not the plan an earlier eager call
    of other rows left on the layers (that plan is for a compiled generate's decode steps; it ran here before: the
    eager call's adapters on the compiled call's rows, silently)."""
    pm = _agents(seed=4)
    ids = torch.randint(3, 128, (3, 4), generator=torch.Generator().manual_seed(5)).to(DEV)
    names, other = ["planner", "coder", "critic"], ["critic", "planner", "coder"]
    with batched_lora(pm):
        want = _logits(pm, ids, names)
        _logits(pm, ids, other)  # leaves its rows' plan on every layer
        compiled = torch.compile(pm, backend="eager")
        # PEFT's mixed-batch forward against the plan's gathered one: fp32 rounding apart (2e-5 on an H100's GEMMs);
        # the stale plan was 0.81 away
        torch.testing.assert_close(_logits(compiled, ids, names), want, rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match="Length of `adapter_names`"):
            _logits(compiled, ids, names[:2])


def test_fallback_to_peft_warns_once(caplog):
    """Active LoRA dropout (PEFT refuses adapter_names on a model in training mode, not on a dropout module in it)
    leaves the LoRA layers to PEFT's own mixed-batch forward: logged once however many layers and calls reach it;
    nothing is logged while the batched path runs."""
    from forkkv_hf.log import warn_once

    warn_once.cache_clear()
    pm = with_adapters(tiny_llama(layers=2, seed=7), {"plain": dict(r=4), "drop": dict(r=4, lora_dropout=0.5)}, seed=7)
    ids = torch.randint(3, 128, (3, 5), generator=torch.Generator().manual_seed(2))
    names = ["drop", "plain", "drop"]
    logger = "forkkv_hf.peft.batched_lora"
    with batched_lora(pm), caplog.at_level("WARNING", logger=logger):
        _logits(pm, ids, names)  # eval: batched, no warning
        assert not [r for r in caplog.records if r.name == logger]
        dropouts = [m for n, m in pm.named_modules() if n.endswith("lora_dropout.drop")]
        assert dropouts
        for m in dropouts:
            m.train()
        for _ in range(2):
            _logits(pm, ids, names)
    messages = [r.getMessage() for r in caplog.records if r.name == logger]
    assert len(messages) == 1 and "dropout" in messages[0] and "PEFT's own" in messages[0], messages


def test_disable_forkkv_frees_the_stacked_factors():
    """A ForkKV generate leaves each LoRA layer a decode plan that holds its stacked factors; disable_forkkv drops it
    with the stack (before, the plan kept a copy of every adapter's factors alive: 6.5 GiB for 256 rank-16 agents of
    Llama-3.1-8B shapes, which the end-to-end benchmark's baseline, run after ForkKV in one process, lost)."""
    import gc
    import weakref

    from forkkv_hf import SharedContext, batch_inputs, cache_kwargs
    from forkkv_hf.peft.batched_lora import _lora_linears

    pm = forkkv_hf.enable_forkkv(_agents(seed=6))
    names = ["planner", "coder", "critic"]
    ctx = torch.randint(3, 128, (20,), generator=torch.Generator().manual_seed(1))
    inputs = batch_inputs(ctx, [torch.tensor([5, 6]), torch.tensor([7]), torch.tensor([8, 9, 10])], pad_token_id=0)
    cache = SharedContext.build(pm, ctx, names, progress=False).fork(names)
    pm.generate(**{k: v.to(DEV) for k, v in inputs.items()}, adapter_names=names, max_new_tokens=3, do_sample=False,
                pad_token_id=0, **cache_kwargs(cache))
    stacks = [weakref.ref(m.__dict__["_forkkv_stack"].A) for m in _lora_linears(pm) if "_forkkv_stack" in m.__dict__]
    assert stacks and any(m.__dict__.get("_forkkv_decode") is not None for m in _lora_linears(pm))
    del cache
    forkkv_hf.disable_forkkv(pm)
    gc.collect()
    assert [s for s in stacks if s() is not None] == []
    assert all(m.__dict__.get("_forkkv_decode") is None for m in _lora_linears(pm))


def test_adapters_of_different_dtypes_run_as_peft_runs_them():
    """A bf16 adapter beside an fp32 one in an fp32 model: PEFT computes each in its own dtype; the batched path
    stacked them in the first one's (the fp32 adapter's rows 0.05 off in logits, silently), and now leaves such a
    layer to PEFT's forward."""
    pm = with_adapters(tiny_llama(layers=2, seed=3), {"b": dict(r=8), "a": dict(r=4)})
    for n, p in pm.named_parameters():
        if ".b." in n:
            p.data = p.data.to(torch.bfloat16)
    ids = torch.randint(3, 128, (4, 9), generator=torch.Generator().manual_seed(0))
    names = ["a", "b", "__base__", "b"]
    with torch.no_grad():
        want = pm(input_ids=ids, adapter_names=names).logits
        with batched_lora(pm):
            torch.testing.assert_close(pm(input_ids=ids, adapter_names=names).logits, want, rtol=1e-6, atol=1e-6)


@pytest.mark.version_independent
@pytest.mark.gpu
@parametrize("side", ["shrink", "expand"])
def test_row_offsets_past_two_to_the_31_gpu(side):
    """A mixed-adapter forward whose tokens x features pass 2^31 elements (~150K tokens of Llama-8B's MLP): the
    kernel's row offsets were int32 and wrapped (an illegal memory access on an H100; out-of-bounds writes on the
    expand side). Only the last token row has the adapter, so a wrapped offset reads or writes another row."""
    from forkkv_kernels.lora import lora_delta_triton

    wide, n, r = 16384, 16, 8
    d_in, d_out = (wide, n) if side == "shrink" else (n, wide)
    N = 131200  # (N - 1) x 16384 > 2^31
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(N, 1, d_in, dtype=torch.float16, device="cuda")
    x[-1] = torch.randn(1, d_in, generator=g).to(x)
    A = (torch.randn(1, r, d_in, generator=g) / d_in**0.5).to(x)
    B = (torch.randn(1, d_out, r, generator=g) / r**0.5).to(x)
    out = torch.zeros(N, 1, d_out, dtype=torch.float16, device="cuda")
    lora_delta_triton(x, (-1,) * (N - 1) + (0,), A, B, torch.ones(1, device="cuda"), out)
    ref = (x[-1].float() @ A[0].float().t()) @ B[0].float().t()
    torch.testing.assert_close(out[-1].float(), ref, rtol=2e-2, atol=2e-2)
    assert not out[:-1].any()


def test_stacks_made_in_inference_mode_leave_the_adapters_trainable():
    """A mixed forward under ``torch.inference_mode()`` built the stacks as inference tensors and made the LoRA
    parameters views of them for good: set_adapter and training failed inside PyTorch afterwards."""
    pm = forkkv_hf.enable_forkkv(with_adapters(tiny_llama(layers=2), {"a": dict(r=4, target_modules=ALL),
                                                                     "b": dict(r=2, target_modules=ALL)}))
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        pm(input_ids=ids, adapter_names=["a", "b"])
    weight = pm.get_base_model().model.layers[0].self_attn.k_proj.lora_A["a"].weight
    assert not weight.is_inference()
    pm.set_adapter("a")
    pm.train()
    pm(input_ids=ids, labels=ids).loss.backward()
    assert weight.grad is not None
    pm.eval()


def test_a_deleted_adapter_leaves_the_stacks():
    """delete_adapter: the stacks kept the deleted adapters' slots for as long as they served the rest (8 adapters'
    memory for one)."""
    from forkkv_hf.peft.batched_lora import _lora_linears

    pm = forkkv_hf.enable_forkkv(with_adapters(tiny_llama(layers=2), {f"a{i}": dict(r=8, target_modules=ALL)
                                                                     for i in range(4)}))
    ids = torch.randint(3, 128, (4, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        pm(input_ids=ids, adapter_names=["a0", "a1", "a2", "a3"])
        pm.set_adapter("a0")
        for i in range(1, 4):
            pm.delete_adapter(f"a{i}")
        pm(input_ids=ids[:2], adapter_names=["a0", "__base__"])
    slots = {len(m._forkkv_stack.slot) for m in _lora_linears(pm) if "_forkkv_stack" in m.__dict__}
    assert slots == {1}


def test_the_lora_kernel_refuses_shapes_it_would_misread():
    """lora_delta_triton trusted its shapes: more slots than rows wrote past ``out`` (the process aborted), a slot past
    the stacks read outside ``A`` (NaN), mismatched widths gave garbage. Refused on the host, by name."""
    from forkkv_kernels.lora import lora_delta_triton

    x, A, B = torch.randn(2, 1, 8), torch.randn(3, 4, 8), torch.randn(3, 6, 4)
    scale, out = torch.ones(3), torch.zeros(2, 1, 6)
    ref = out.clone()
    for i, s in enumerate((0, 2)):
        ref[i] += (x[i] @ A[s].T @ B[s].T) * scale[s]
    torch.testing.assert_close(lora_delta_triton(x, (0, 2), A, B, scale, out), ref, rtol=1e-4, atol=1e-4)
    for args, why in (((x, (0, 1, 2), A, B, scale, out), "3 slots for 2 rows"),
                      ((x, (0, 3), A, B, scale, out), "a slot >= the 3 adapters"),
                      ((x, (0, 1), A[..., :4], B, scale, out), "A's 4 input features for x's 8"),
                      ((x, (0, 1), A, B[..., :2], scale, out), "B \\(3, 6, 2\\) for A"),
                      ((x, (0, 1), A, B, scale[:2], out), "2 scales for 3 adapters"),
                      ((x, (0, 1), A, B, scale, out[..., :5]), "out \\(2, 1, 5\\)")):
        with pytest.raises(ValueError, match=why):
            lora_delta_triton(*args)
