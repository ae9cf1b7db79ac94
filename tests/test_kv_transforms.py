"""K/V that the attention transforms after the projection, or that an adapter takes from a copy of its own: a LoRA
residual added to the shared base K/V is wrong there, so ForkKV refuses those adapters (at the build and in
training) and says what to do; the fitted residual it points to serves them."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

import forkkv_hf
from forkkv_hf import SharedContext, batch_inputs
from forkkv_hf.training import TrainingContext, forkkv_loss
from cases import parametrize
from models import tiny_llama, with_adapters
from test_model_families import CTX, NAMES, PROMPTS, _gen, _same, _tiny


def _olmo(clip_qkv, targets, **spec):
    return with_adapters(_tiny("Olmo", clip_qkv=clip_qkv), {"planner": dict(r=4, target_modules=targets, **spec),
                                                            "coder": dict(r=8, target_modules=targets, **spec)}, seed=3)


def _forkkv_equals_exact(pm):
    """ForkKV's generate over ``CTX`` for planner and coder (ForkKV on for it only) equals the plain run."""
    inputs = batch_inputs(CTX, PROMPTS, pad_token_id=0)
    exact = _gen(pm, inputs, NAMES)
    forkkv_hf.enable_forkkv(pm)
    try:
        _same(_gen(pm, inputs, NAMES, SharedContext.build(pm, CTX, ["planner", "coder"], progress=False).fork(NAMES)),
              exact)
    finally:
        forkkv_hf.disable_forkkv(pm)


@parametrize("targets", [["k_proj"], ["v_proj"], ["q_proj", "k_proj", "v_proj"]])
def test_clip_qkv_refuses_k_and_v_lora_and_fitted_residuals_serve_them(targets):
    """OLMo's ``clip_qkv`` clamps K and V after the projections: clamp(base + LoRA) is not clamp(base) + LoRA
    (silently 0.6-0.8 off in score before, with the clamp active only for base + LoRA). Refused at the build; the
    fitted residual of the agents' own pass it points to equals their exact run at full width."""
    pm = _olmo(0.05, targets)
    with pytest.raises(ValueError, match=r"clamps q/k/v to \+-0.05 .*clip_qkv.*fit_residuals"):
        SharedContext.build(pm, CTX, ["planner", "coder"], progress=False)
    inputs = batch_inputs(CTX, PROMPTS, pad_token_id=0)
    exact = _gen(pm, inputs, NAMES)
    forkkv_hf.enable_forkkv(pm)
    try:
        fitted = SharedContext.build(pm, CTX, [], progress=False).fit_residuals(pm, ["planner", "coder"], rank=10_000,
                                                                               progress=False)
        _same(_gen(pm, inputs, NAMES, fitted.fork(NAMES)), exact)
    finally:
        forkkv_hf.disable_forkkv(pm)


def test_clip_qkv_shares_q_lora_exactly_and_training_refuses_v_lora():
    """q_proj LoRA on a clip_qkv model is ForkKV's usual approximation (exact where it changes no later layer's K/V:
    the last layer's, as here); at a clip of 0.05 the clamped queries hid the LoRA and the test passed for that."""
    pm = _olmo(8.0, ["q_proj"], layers_to_transform=[2])
    _forkkv_equals_exact(pm)
    pm = _olmo(0.05, ["v_proj"])
    pm.set_adapter("planner")
    batch = {"input_ids": torch.tensor([[5, 6, 7]]), "labels": torch.tensor([[5, 6, 7]])}
    with pytest.raises(ValueError, match="clip_qkv.*cannot add a V residual.*FittedResidual.*cannot serve"):
        forkkv_loss(pm, TrainingContext(pm, CTX), batch, "planner", residual="v")


def test_v_norm_refuses_v_lora():
    """Gemma 4 normalises V per head after ``v_proj``: v_norm(base + LoRA) is not v_norm(base) + LoRA (silently 0.6
    off in score before). Refused (LoRA on q_proj stays ForkKV's usual approximation)."""
    import transformers

    if not hasattr(transformers, "Gemma4TextConfig"):
        pytest.skip("Gemma 4 is newer than this transformers")
    kw = dict(head_dim=16, sliding_window=64, num_kv_shared_layers=0, vocab_size_per_layer_input=128,
              hidden_size_per_layer_input=16, attn_implementation="eager")
    pm = with_adapters(_tiny("Gemma4Text", **kw), {"planner": dict(r=4, target_modules=["v_proj"],
                                                                   layers_to_transform=[2])}, seed=2)
    with pytest.raises(ValueError, match="applies v_norm to V.*LoRA on v_proj.*fit_residuals"):
        SharedContext.build(pm, CTX, ["planner"], progress=False)


def test_gemma4_k_eq_v_layers_serve_q_and_o_lora():
    """Gemma 4's ``attention_k_eq_v`` full-attention layers have no ``v_proj`` (V is ``k_proj``'s output): every build
    failed inside a hook on ``None``, and so did training's context (an audit's finding). Agents with q/o LoRA there
    equal their exact run (the last layer's); ``k_proj`` LoRA stays refused (k_norm), training builds its context."""
    import transformers

    if not hasattr(transformers, "Gemma4TextConfig"):
        pytest.skip("Gemma 4 is newer than this transformers")
    kw = dict(head_dim=16, sliding_window=64, num_kv_shared_layers=0, vocab_size_per_layer_input=128,
              hidden_size_per_layer_input=16, attn_implementation="eager", attention_k_eq_v=True, global_head_dim=16,
              num_global_key_value_heads=1)
    spec = dict(target_modules=["q_proj", "o_proj"], layers_to_transform=[2])
    pm = with_adapters(_tiny("Gemma4Text", **kw), {"planner": dict(r=4, **spec), "coder": dict(r=8, **spec)}, seed=2)
    attn = pm.get_base_model().model.layers[2].self_attn
    assert attn.v_proj is None, "the tiny config no longer makes a k_eq_v layer"
    _forkkv_equals_exact(pm)
    pm.set_adapter("planner")
    batch = {"input_ids": torch.tensor([[5, 6, 7]]), "labels": torch.tensor([[5, 6, 7]])}
    assert torch.isfinite(forkkv_loss(pm, TrainingContext(pm, CTX), batch, "planner", residual="kv"))
    pk = with_adapters(_tiny("Gemma4Text", **kw), {"planner": dict(r=4, target_modules=["k_proj"])}, seed=2)
    with pytest.raises(ValueError, match="k_norm"):
        SharedContext.build(pk, CTX, ["planner"], progress=False)


@parametrize("proj", ["k_proj", "v_proj"])
def test_a_trained_copy_of_a_kv_projection_is_refused(proj):
    """``modules_to_save`` on a K or V projection: the agent's context K/V are its copy's, which no residual of the
    base pass restores (silently 0.3-0.6 off in score before: the copy was ignored). Refused at the build and in
    training, for the adapter that has the copy only."""
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=[f"layers.1.self_attn.{proj}"])
    pm = get_peft_model(tiny_llama(layers=2), cfg, adapter_name="copy").eval()
    pm.add_adapter("plain", LoraConfig(r=4, target_modules=["k_proj", "v_proj"], layers_to_transform=[0]))
    with pytest.raises(ValueError, match=rf"\['copy'\] replace layer 1 {proj} by a trained copy \(modules_to_save\)"):
        SharedContext.build(pm, CTX, ["plain", "copy"], progress=False)
    SharedContext.build(pm, CTX, ["plain"], progress=False)  # the other adapter is served as before
    pm.set_adapter("copy")
    batch = {"input_ids": torch.tensor([[5, 6, 7]]), "labels": torch.tensor([[5, 6, 7]])}
    with pytest.raises(ValueError, match="require grad .*modules_to_save"):  # a copy being trained: refused before
        forkkv_loss(pm, TrainingContext(pm, CTX), batch, "copy")
    for n, p in pm.named_parameters():
        p.requires_grad_("lora_" in n)  # a frozen copy: its adapter's other weights trained as if it were absent
    with pytest.raises(ValueError, match="trained copy"):
        forkkv_loss(pm, TrainingContext(pm, CTX), batch, "copy")
