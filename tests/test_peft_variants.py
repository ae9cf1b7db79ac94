"""PEFT configurations and uses an audit (2026-12-07) found served wrong or refused unclearly; each test failed
before its fix."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

import forkkv_hf
from forkkv_hf import ForkKVCache, SharedContext, StaleContextError, batch_inputs, cache_kwargs
from cases import parametrize
from models import plain_peft, semantic_reference_cache, tiny_llama, with_adapters
from test_generate import ALL, _context, _gen, _prompts


def _scores_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.scores, b.scores))


def test_a_merged_adapter_is_refused_at_build():
    """An adapter merged into the base weights: the base pass's ``disable_adapter()`` unmerged it and left it so
    (the context and every later call lacked it: scores 0.95 off, silently); now refused, the model untouched."""
    pm = with_adapters(tiny_llama(), {"x": dict(target_modules=["q_proj", "o_proj"]), "a": {}})
    pm.merge_adapter(["x"])
    forkkv_hf.enable_forkkv(pm)
    with pytest.raises(ValueError, match=r"adapters \['x'\] are merged into the base weights"):
        ForkKVCache.from_context(pm, _context(12), adapter_names=["a"])
    assert all(m.merged for m in pm.modules() if hasattr(m, "merged_adapters") and m.merged_adapters == ["x"])
    assert sum(1 for m in pm.modules() if getattr(m, "merged_adapters", None)) == 4  # still merged


def test_adapters_of_other_dtypes_do_not_round_each_other():
    """An fp32 adapter beside a bf16 one: its ``u`` was computed in the first adapter's dtype, so the result depended
    on the order of the build's list (1.4e-2 off for ["b", "a"]); each is now computed in its own dtype, as PEFT
    does."""
    pm = with_adapters(tiny_llama(), {"a": {}, "b": {}})
    for m in pm.modules():
        if hasattr(m, "lora_A") and "b" in m.lora_A:
            m.lora_A["b"].to(torch.bfloat16)
            m.lora_B["b"].to(torch.bfloat16)
    ctx, rows = _context(17), ["a", "b"]
    inputs = batch_inputs(ctx, _prompts([4, 3]), pad_token_id=0)
    ref = plain_peft(pm, lambda: _gen(pm, inputs, rows, semantic_reference_cache(pm, ctx, rows), max_new_tokens=4))
    forkkv_hf.enable_forkkv(pm)
    outs = [_gen(pm, inputs, rows, SharedContext.build(pm, ctx, order, progress=False).fork(rows), max_new_tokens=4)
            for order in (["a", "b"], ["b", "a"])]
    for out in outs:  # row a (fp32) exact; row b (bf16) within its rounding (PEFT rounds B's product to bf16 too)
        assert max((x[0] - y[0]).abs().max().item() for x, y in zip(out.scores, ref.scores)) < 1e-4
        assert max((x[1] - y[1]).abs().max().item() for x, y in zip(out.scores, ref.scores)) < 5e-2
    assert _scores_diff(outs[0], outs[1]) == 0


def test_a_fit_follows_the_agents_trainable_tokens():
    """A residual fitted to an agent's own pass depends on its trainable token rows (``trainable_token_indices``):
    changed in place after the fit, it was served stale (3.2e-3 off a fresh fit, silently); now StaleContextError."""
    pm = with_adapters(tiny_llama(), {"a": {"target_modules": ["k_proj"],
                                            "trainable_token_indices": {"embed_tokens": list(range(3, 128))}}})
    forkkv_hf.enable_forkkv(pm)
    ctx, rows = _context(17), ["a"]
    fitted = SharedContext.build(pm, ctx, rows, progress=False).fit_residuals(pm, rows, rank=32, progress=False)
    inputs = batch_inputs(ctx, _prompts([4]), pad_token_id=0)
    _gen(pm, inputs, rows, fitted.fork(rows), max_new_tokens=2)
    delta = pm.get_base_model().model.embed_tokens.token_adapter.trainable_tokens_delta["a"]
    with torch.no_grad():
        delta.add_(2.0 * torch.randn_like(delta))
    with pytest.raises(StaleContextError, match="token_adapter"):
        _gen(pm, inputs, rows, fitted.fork(rows), max_new_tokens=2)


def test_an_adapter_named_like_the_base_rows_is_refused():
    """PEFT accepts an adapter named "__base__", ForkKV's (and PEFT's adapter_names') name for rows without one: its
    rows ran the adapter on the prompt but no residual on the context (0.5 off its own run, silently)."""
    pm = with_adapters(tiny_llama(), {"__base__": dict(target_modules=["k_proj", "v_proj"])})
    forkkv_hf.enable_forkkv(pm)
    with pytest.raises(ValueError, match='an adapter named "__base__"'):
        ForkKVCache.from_context(pm, _context(12), adapter_names=["__base__"])


def test_generate_in_training_mode_is_refused():
    """As the build, the store and the fits refuse it (dropout on the prompt tokens, the context's residuals
    without)."""
    pm = with_adapters(tiny_llama(), {"a": dict(lora_dropout=0.5)})
    forkkv_hf.enable_forkkv(pm)
    ctx = _context(12)
    cache = ForkKVCache.from_context(pm, ctx, adapter_names=["a"])
    pm.train()  # without adapter_names (one active adapter), which PEFT itself does not refuse in training mode
    with pytest.raises(ValueError, match="training mode"):
        pm.generate(**batch_inputs(ctx, _prompts([3]), pad_token_id=0), max_new_tokens=2, pad_token_id=0,
                    **cache_kwargs(cache))


def test_replicated_layers_are_refused_at_enable():
    """PEFT's ``layer_replication`` deep-copies the decoder layers, each attention with a config of its own that
    ``set_attn_implementation`` does not reach: generate failed inside SDPA. Refused, the attention left as it was."""
    model = tiny_llama(layers=2)
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=ALL, layer_replication=[[0, 2], [1, 2]]))
    with pytest.raises(ValueError, match="layer_replication"):
        forkkv_hf.enable_forkkv(pm)
    assert pm.get_base_model().config._attn_implementation == "sdpa"


def test_saved_copies_of_whole_attentions_are_named():
    """``modules_to_save=["self_attn"]``: the error spoke of two attention modules claiming one layer and of the
    supported families (on a Llama); it now names modules_to_save."""
    pm = with_adapters(tiny_llama(), {"a": {"target_modules": ["gate_proj"], "modules_to_save": ["self_attn"]}})
    with pytest.raises(ValueError, match="modules_to_save keeps copies of modules that contain attention layers"):
        forkkv_hf.enable_forkkv(pm)


def test_disabled_adapters_are_base_rows():
    """``disable_adapter_layers()`` between the build and a generate: PEFT still passes adapter_names but the layers
    run the base model; the row check read the names first, so the agents' residuals were served over base-model
    prompts (0.8 off plain PEFT, silently). Disabled layers count as '__base__' rows now: a fork for agents is
    refused, saying why, one of '__base__' rows served; a fit of disabled adapters (their own passes the base
    model's, a "perfect" fit 0.7 off) is refused."""
    kv_last = dict(target_modules=["k_proj", "v_proj"], layers_to_transform=[2])
    pm = forkkv_hf.enable_forkkv(with_adapters(tiny_llama(layers=3, seed=7), {"a": dict(r=4, **kv_last),
                                                                            "b": dict(r=2, **kv_last)}, seed=7))
    ctx, rows = _context(14), ["a", "b"]
    inputs = batch_inputs(ctx, _prompts([3, 2]), pad_token_id=0)
    shared = SharedContext.build(pm, ctx, rows, progress=False)
    pm.base_model.disable_adapter_layers()
    try:
        with pytest.raises(ValueError, match="are the adapters disabled"):
            _gen(pm, inputs, rows, shared.fork(rows))
        base = ["__base__"] * 2
        got = _gen(pm, inputs, base, shared.fork(base))
        want = plain_peft(pm, lambda: _gen(pm, inputs, rows))
        assert torch.equal(got.sequences, want.sequences) and _scores_diff(got, want) < 1e-4
        with pytest.raises(ValueError, match="the adapters are disabled"):
            shared.fit_residuals(pm, rows, rank=32, progress=False)
    finally:
        pm.base_model.enable_adapter_layers()


def test_a_peft_mixed_model_is_refused_by_name():
    """``get_peft_model(..., mixed=True)``: enable_forkkv took it for a plain model and the build then said to pass
    the PeftModel itself."""
    pmix = get_peft_model(tiny_llama(layers=2), LoraConfig(r=4, target_modules=["k_proj", "v_proj"]),
                          adapter_name="a", mixed=True).eval()
    with pytest.raises(ValueError, match="a PeftMixedModel .* is not supported"):
        forkkv_hf.enable_forkkv(pmix)
    with pytest.raises(ValueError, match="a PeftMixedModel .* is not supported"):
        SharedContext.build(pmix, _context(8), ["a"], progress=False)


@parametrize("kind", ["prompt_tuning", "prefix_tuning", "loha", "ia3"])
def test_non_lora_adapters_are_refused(kind):
    """A PeftModel of another PEFT type: only the adapter names passed to a call were type-checked (found by an
    audit), so forked as ``__base__`` rows without adapter_names it was served: prompt tuning's virtual tokens
    dropped (0.7 off its own run), LoHa and IA3 over the prompts but not the shared context. Refused at enable and
    build now (and by the generate checks, which find the attention the same way)."""
    from peft import IA3Config, LoHaConfig, PrefixTuningConfig, PromptTuningConfig

    config = {"prompt_tuning": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
              "prefix_tuning": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
              "loha": lambda: LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "o_proj"]),
              "ia3": lambda: IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"])}[kind]()
    pm = get_peft_model(tiny_llama(), config, adapter_name="h").eval()
    refused = r"non-LoRA adapters \('h': .*\); ForkKV supports LoRA adapters only"
    with pytest.raises(ValueError, match=refused):
        forkkv_hf.enable_forkkv(pm)
    with pytest.raises(ValueError, match=refused):
        SharedContext.build(pm, _context(8), ["__base__"], progress=False)


def test_an_unrelated_adapter_with_trainable_tokens_leaves_the_context_fresh():
    """An adapter with ``trainable_token_indices`` added after a build wraps the embedding: its weight's name gained
    ``.token_adapter`` (found by an audit), so every generate on the context was refused as stale (and a store
    recomputed its contexts). The name is PEFT's wrapping undone now: served, and equal to the agent's own run."""
    kv_last = {"target_modules": ["k_proj", "v_proj"], "layers_to_transform": [2]}
    pm = forkkv_hf.enable_forkkv(with_adapters(tiny_llama(layers=3, seed=7), {"a": {"r": 4, **kv_last}}, seed=7))
    ctx, prompt = _context(12), _prompts([3])[0]
    shared = SharedContext.build(pm, ctx, ["a"], progress=False)
    pm.add_adapter("tt", LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [5, 6]}))
    pm.eval()
    got = _gen(pm, batch_inputs(ctx, [prompt], pad_token_id=0), ["a"], shared.fork(["a"]))
    row = torch.cat([ctx, prompt])[None]
    want = plain_peft(pm, lambda: _gen(pm, {"input_ids": row, "attention_mask": torch.ones_like(row)}, ["a"]))
    assert torch.equal(got.sequences, want.sequences) and _scores_diff(got, want) < 1e-4


def test_adapters_of_transformers_own_peft_integration_are_refused_at_build():
    """Adapters loaded by ``model.add_adapter`` on a transformers model (its own PEFT integration, no PeftModel)
    were accepted at build (found by an audit), then every generate refused as stale ("deleted and added again").
    The build refuses them now, saying to load them with peft."""
    model = tiny_llama()
    model.add_adapter(LoraConfig(r=4, target_modules=["k_proj", "v_proj"], init_lora_weights=False), adapter_name="h")
    model.disable_adapters()
    with pytest.raises(ValueError, match=r"\['h'\] requested but LlamaForCausalLM is not a PeftModel.*transformers' "
                                         r"own PEFT integration.*get_peft_model"):
        SharedContext.build(model, _context(8), ["h"], progress=False)
