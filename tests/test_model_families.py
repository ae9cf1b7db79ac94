"""Model families: each supported one equals the exact per-agent run where ForkKV is exact (LoRA on the last layer's
K/V, and layer 0's K/V for any adapter) and an independent build of ForkKV's semantics everywhere else; the others
are refused with an error that names the reason."""

import pytest
import torch
import transformers
from transformers import DynamicCache

import forkkv_hf
from forkkv_hf import ForkKVCache, SharedContext, batch_inputs, cache_kwargs
from forkkv_hf.ops.naive import materialize_kv
from cases import parametrize
from models import semantic_reference_cache, with_adapters

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny(name, **kw):
    import transformers

    cfg_cls = getattr(transformers, f"{name}Config")
    model_cls = getattr(transformers, f"{name.replace('Text', '')}ForCausalLM")
    torch.manual_seed(0)
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    base.update(kw)
    cfg = cfg_cls(**base)
    model = model_cls(cfg).eval()
    return model


FAMILIES = {
    # name: (config class prefix, config overrides, LoRA targets with K, LoRA targets without K, attn implementation)
    "mistral": ("Mistral", dict(sliding_window=None), LLAMA_TARGETS, None, "sdpa"),
    "qwen2-bias": ("Qwen2", dict(), LLAMA_TARGETS, None, "sdpa"),
    "phi3-fused": ("Phi3", dict(), ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], None, "sdpa"),
    "gemma2-softcap": ("Gemma2", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=64), LLAMA_TARGETS, None,
                       "eager"),
    "qwen3-knorm": ("Qwen3", dict(head_dim=16), None, ["q_proj", "v_proj", "o_proj", "up_proj"], "sdpa"),
    "gemma3-knorm": ("Gemma3Text", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=64), None,
                     ["q_proj", "v_proj", "o_proj", "down_proj"], "eager"),
}


def _family(key, seed=0):
    prefix, kw, with_k, without_k, attn = FAMILIES[key]
    model = _tiny(prefix, attn_implementation=attn, **kw)
    targets = with_k or without_k
    pm = with_adapters(model, {"planner": dict(r=4, target_modules=targets),
                               "coder": dict(r=8, lora_alpha=4, target_modules=targets[:2])}, seed=seed)
    return pm


def _gen(pm, inputs, names, cache=None, **kw):
    extra = cache_kwargs(cache) if cache is not None else {}
    kw.setdefault("max_new_tokens", 5)
    return pm.generate(**inputs, adapter_names=names, do_sample=False, pad_token_id=0, output_scores=True,
                       return_dict_in_generate=True, **extra, **kw)


def _forkkv_gen(pm, inputs):
    """``_gen`` through a ForkKV cache of ``CTX`` for ``NAMES``, with ForkKV enabled for this call only."""
    forkkv_hf.enable_forkkv(pm)
    try:
        return _gen(pm, inputs, NAMES, ForkKVCache.from_context(pm, CTX, adapter_names=NAMES))
    finally:
        forkkv_hf.disable_forkkv(pm)


def _same(a, b, tol=1e-4):
    assert torch.equal(a.sequences, b.sequences), (a.sequences, b.sequences)
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


CTX = torch.randint(3, 128, (19,), generator=torch.Generator().manual_seed(11))
PROMPTS = [torch.tensor([5, 6, 7]), torch.tensor([8]), torch.tensor([9, 10, 11, 12])]
NAMES = ["planner", "coder", "__base__"]


@parametrize("family", list(FAMILIES), fast=lambda family: family == "mistral")
def test_family_matches_defined_semantics(family):
    pm = _family(family)
    inputs = batch_inputs(CTX, PROMPTS, pad_token_id=0)
    ref_cache = semantic_reference_cache(pm, CTX, NAMES)
    ref = _gen(pm, inputs, NAMES, ref_cache)
    out = _forkkv_gen(pm, inputs)
    _same(out, ref)


@parametrize("family", list(FAMILIES), fast=lambda family: family == "mistral")
def test_family_layer0_kv_exact(family):
    """Layer 0's context K/V of every agent equal the agent's own (PEFT, its adapter on the whole context)."""
    pm = _family(family, seed=1)
    cache = ForkKVCache.from_context(pm, CTX, adapter_names=NAMES)
    layer = cache.layers[0]
    dummy = torch.zeros(len(NAMES), layer.shared.key.shape[1], 0, layer.shared.key.shape[-1])
    view, _ = layer.update(dummy, dummy)
    K, V = materialize_kv(view)
    for b, name in enumerate(NAMES):
        own = DynamicCache()
        with torch.no_grad():
            pm(input_ids=CTX[None], adapter_names=[name], use_cache=True, **cache_kwargs(own))
        torch.testing.assert_close(K[b], own.layers[0].keys[0].float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(V[b], own.layers[0].values[0].float(), rtol=1e-5, atol=1e-5)


@parametrize("family", list(FAMILIES), fast=lambda family: family == "mistral")
def test_family_exact_for_last_layer_lora(family):
    """LoRA only on the last layer's K/V projection (V only for K-norm models): ForkKV equals the per-agent run."""
    prefix, kw, with_k, without_k, attn = FAMILIES[family]
    model = _tiny(prefix, attn_implementation=attn, **kw)
    targets = ["qkv_proj"] if "phi3" in family else (["k_proj", "v_proj"] if with_k else ["v_proj"])
    pm = with_adapters(model, {"planner": dict(r=4, target_modules=targets, layers_to_transform=[2]),
                               "coder": dict(r=2, target_modules=targets, layers_to_transform=[2])}, seed=2)
    inputs = batch_inputs(CTX, PROMPTS, pad_token_id=0)
    exact = _gen(pm, inputs, NAMES)
    out = _forkkv_gen(pm, inputs)
    _same(out, exact)


@parametrize("family", ["qwen3-knorm", "gemma3-knorm"])
def test_k_norm_refuses_k_lora(family):
    prefix, kw, _, _, attn = FAMILIES[family]
    pm = with_adapters(_tiny(prefix, attn_implementation=attn, **kw), {"kq": dict(target_modules=["k_proj"])})
    with pytest.raises(ValueError, match="k_norm"):
        SharedContext.build(pm, CTX, ["kq"])


@parametrize("family", ["qwen3-knorm", "phi3-fused", "gemma2-softcap"])
def test_fitted_residuals_at_full_width_are_exact(family):
    """SharedContext.fit_residuals stores the agent's own K/V drift after the layer's own K processing: at full width
    it is each agent's own run on k_norm models (with LoRA on k_proj, which ForkKV's residual refuses there), fused
    qkv_proj and soft-capping (eager attention)."""
    prefix, kw, with_k, without_k, attn = FAMILIES[family]
    targets = (with_k or without_k) + (["k_proj"] if family == "qwen3-knorm" else [])
    pm = with_adapters(_tiny(prefix, attn_implementation=attn, **kw),
                       {"planner": dict(r=4, target_modules=targets), "coder": dict(r=8, lora_alpha=4,
                                                                                  target_modules=targets[:2])}, seed=1)
    inputs = batch_inputs(CTX, PROMPTS, pad_token_id=0)
    exact = _gen(pm, inputs, NAMES)
    forkkv_hf.enable_forkkv(pm)
    try:
        shared = SharedContext.build(pm, CTX, [] if family == "qwen3-knorm" else ["planner", "coder"], progress=False)
        fitted = shared.fit_residuals(pm, ["planner", "coder"], rank=10_000, progress=False)
        _same(_gen(pm, inputs, NAMES, fitted.fork(NAMES)), exact)
    finally:
        forkkv_hf.disable_forkkv(pm)


def test_fused_qkv_stores_one_residual_for_k_and_v():
    pm = _family("phi3-fused")
    shared = SharedContext.build(pm, CTX, ["planner"])
    for layer in shared.layers:
        assert layer.k_res.u is layer.v_res.u  # one A for K and V: one u
    # per agent: r numbers per token per layer, not 2r
    assert shared.residual_bytes("planner") == 4 * 3 * CTX.numel() * 4


def test_sliding_window_within_window_is_exact_and_beyond_is_refused():
    model = _tiny("Mistral", attn_implementation="sdpa", sliding_window=28)
    pm = with_adapters(model, {"planner": dict(r=4, target_modules=["k_proj", "v_proj"], layers_to_transform=[2])})
    names = ["planner", "__base__"]
    inputs = batch_inputs(CTX, PROMPTS[:2], pad_token_id=0)  # 19 + 3 + 5 new = 27 <= 28
    exact = _gen(pm, inputs, names)
    forkkv_hf.enable_forkkv(pm)
    out = _gen(pm, inputs, names, ForkKVCache.from_context(pm, CTX, adapter_names=names))
    _same(out, exact)
    with pytest.raises(ValueError, match="outgrew the sliding window of 28"):
        _gen(pm, inputs, names, ForkKVCache.from_context(pm, CTX, adapter_names=names), min_new_tokens=9,
             max_new_tokens=9)
    with pytest.raises(ValueError, match="sliding-window attention \\(window 28\\)"):
        SharedContext.build(pm, torch.randint(3, 128, (30,)), names)
    # exactly the window: the sliding layer's cache keeps 27 of them (before: "cached 27 tokens, expected 28", inside)
    with pytest.raises(ValueError, match="a context of at most 27 tokens"):
        SharedContext.build(pm, torch.randint(3, 128, (28,)), names)
    SharedContext.build(pm, torch.randint(3, 128, (27,)), names)


@pytest.mark.version_independent
@parametrize("prefix", ["Gemma", "Gemma2", "Gemma3Text"])
def test_bidirectional_attention_is_refused(prefix):
    """``use_bidirectional_attention=True`` (Gemma's embedding variants): a context token's K/V depend on the prompt
    after it, so no shared pass can stand for a row's own; before, served silently (scores 0.1-0.5 off the plain run,
    a ``__base__`` row's too), and an eager model's plain generate changed once ForkKV was enabled."""
    kw = dict(head_dim=16) if prefix == "Gemma" else dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=64)
    model = _tiny(prefix, attn_implementation="eager", use_bidirectional_attention=True, **kw)
    pm = with_adapters(model, {"planner": dict(r=4, target_modules=["v_proj"])})
    with pytest.raises(ValueError, match="attends bidirectionally.*ForkKV needs causal attention"):
        forkkv_hf.enable_forkkv(pm)
    with pytest.raises(ValueError, match="attends bidirectionally"):
        SharedContext.build(pm, CTX, ["planner"], progress=False)


def test_gemma2_plain_padded_batch_with_forkkv_enabled_equals_eager():
    """With ForkKV enabled, a plain left-padded batch (no ForkKV cache) on a soft-capping model runs the "forkkv"
    attention's soft-capped fallback: its -inf fill made the fully masked pad rows NaN, which reached the row's real
    tokens (other tokens than the eager model's, silently). Masked with the dtype's minimum now, as eager does."""
    prefix, kw, _, _, attn = FAMILIES["gemma2-softcap"]
    pm = with_adapters(_tiny(prefix, attn_implementation=attn, **kw),
                       {"planner": dict(r=4, target_modules=["k_proj", "v_proj"], layers_to_transform=[2])}, seed=3)
    ids = torch.tensor([[0, 0, 0, 5, 6, 7], [8, 9, 10, 11, 12, 13]])
    inputs = dict(input_ids=ids, attention_mask=(ids != 0).long())
    want = _gen(pm, inputs, ["planner", "__base__"])
    forkkv_hf.enable_forkkv(pm)
    try:
        got = _gen(pm, inputs, ["planner", "__base__"])
    finally:
        forkkv_hf.disable_forkkv(pm)
    _same(got, want)


def test_a_length_dependent_rope_per_layer_type_is_refused_by_name():
    """Gemma 3 keeps one frequency table per layer type (``full_attention_inv_freq``): a dynamic type on one of them
    was refused with "several rotary modules ([])", naming none."""
    rope = {"full_attention": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e4},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    model = _tiny("Gemma3Text", head_dim=16, query_pre_attn_scalar=16, sliding_window=64, max_position_embeddings=32,
                  attn_implementation="eager", rope_parameters=rope,
                  layer_types=["sliding_attention", "full_attention", "full_attention"])
    pm = forkkv_hf.enable_forkkv(with_adapters(model, {"planner": dict(r=4, target_modules=["v_proj"])}))
    inputs = batch_inputs(CTX[:10], [torch.tensor([5, 6, 7])], pad_token_id=0)
    with pytest.raises(ValueError, match=r"sequence-length dependent type \(\['dynamic', 'default'\]; one table per "
                                         r"layer type\)"):
        _gen(pm, inputs, ["planner"], ForkKVCache.from_context(pm, CTX[:10], adapter_names=["planner"]))


def test_gemma2_softcap_goes_through_the_torch_path():
    from forkkv_hf import reference_attention, residual_attention
    from views import random_view

    view = random_view(B=2, T=20, P=3)
    q = torch.randn(2, 4, 2, 16)
    ref = reference_attention(q, view, None, 0.25, softcap=2.0)
    out = residual_attention(q, view, None, 0.25, softcap=2.0, backend="triton")  # soft-cap: PyTorch path
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (ref - reference_attention(q, view, None, 0.25)).abs().max() > 1e-3


@pytest.mark.slow
def test_compiled_decode_with_per_layer_type_masks():
    """Qwen2's config has ``layer_types``: generate with a compileable (static) cache passes the prefill a dict of 4-D
    masks, one per attention type; the forward checks read the padding from it (a padded row's position 0 is
    padding, not a token inside the shared context). Compiled tokens equal eager."""
    from transformers import CompileConfig

    pm = _family("qwen2-bias")
    forkkv_hf.enable_forkkv(pm)
    inputs = batch_inputs(CTX, PROMPTS, pad_token_id=0)
    eager = _gen(pm, inputs, NAMES, ForkKVCache.from_context(pm, CTX, adapter_names=NAMES))
    cc = CompileConfig(fullgraph=True, backend="eager", mode=None)
    cc._compile_all_devices = True
    torch._dynamo.reset()
    compiled = _gen(pm, inputs, NAMES, ForkKVCache.from_context(pm, CTX, adapter_names=NAMES), compile_config=cc)
    _same(compiled, eager)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the decode step did compile


#: more families (config class prefix: what LoRA on the last layer's k_proj/v_proj gives): exact, or refused with a
#: reason, in which case LoRA on v_proj alone must be exact. Found by a sweep of the transformers 5.25 families.
MORE_FAMILIES = {
    "Granite": None, "Starcoder2": None, "SeedOss": None, "Arcee": None,  # exact with K and V
    "Qwen2Moe": None,  # its config's sliding_window 0 (no use_sliding_window) was taken for a window of 0 tokens
    "Cohere": "not rotate-half RoPE", "Cohere2": "not rotate-half RoPE", "Ernie4_5": "not rotate-half RoPE",
    "StableLm": "partial rotary", "Phi": "partial rotary", "Glm4": "partial rotary",
    "Exaone4": "applies k_norm", "Apertus": "applies k_norm", "Olmo3": "applies k_norm",
}


@pytest.mark.slow
@parametrize("prefix", list(MORE_FAMILIES))
def test_more_families_are_exact_or_refused(prefix):
    import transformers

    if not hasattr(transformers, f"{prefix}Config"):
        pytest.skip(f"transformers {transformers.__version__} has no {prefix}")
    refusal = MORE_FAMILIES[prefix]
    inputs = batch_inputs(CTX, PROMPTS, pad_token_id=0)
    for targets in (["k_proj", "v_proj"], ["v_proj"]):
        pm = with_adapters(_tiny(prefix, attn_implementation="eager"),
                           {"planner": dict(r=4, target_modules=targets, layers_to_transform=[2]),
                            "coder": dict(r=2, target_modules=targets, layers_to_transform=[2])}, seed=2)
        exact = _gen(pm, inputs, NAMES)
        if refusal is not None and "k_proj" in targets:
            with pytest.raises(ValueError, match=refusal):
                _forkkv_gen(pm, inputs)
            continue
        _same(_forkkv_gen(pm, inputs), exact)
        if refusal is None:
            break


@pytest.mark.slow
@parametrize("chunk_size", [None, 1])
def test_modernbert_decoder_two_rope_tables_in_any_chunks(chunk_size):
    """ModernBERT's decoder: a global RoPE table on full-attention layers, a local one on sliding layers, and a
    ``get_decoder()`` that returns its LM head (the base pass failed inside a ``Linear``). Built in one-token chunks,
    the sliding layer joined the global table's group at position 0, where every table is the identity, and its K
    residual was rotated with the global table (scores 0.69 off, silently): the groups are checked at every chunk."""
    import transformers

    if not hasattr(transformers, "ModernBertDecoderConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no ModernBertDecoder")
    model = _tiny("ModernBertDecoder", attn_implementation="eager", num_hidden_layers=2, num_key_value_heads=4,
                  global_rope_theta=160000.0, local_rope_theta=10.0)
    kv_last = dict(target_modules=["k_proj", "v_proj"], layers_to_transform=[1])
    pm = with_adapters(model, {"planner": dict(r=4, **kv_last), "coder": dict(r=2, **kv_last)}, seed=2)
    inputs = batch_inputs(CTX, PROMPTS, pad_token_id=0)
    exact = _gen(pm, inputs, NAMES)
    forkkv_hf.enable_forkkv(pm)
    try:
        shared = SharedContext.build(pm, CTX, NAMES[:2], progress=False, chunk_size=chunk_size)
        assert not torch.equal(shared.layers[0].cos, shared.layers[1].cos)
        _same(_gen(pm, inputs, NAMES, shared.fork(NAMES)), exact)
    finally:
        forkkv_hf.disable_forkkv(pm)


@pytest.mark.slow
def test_k_rope_layout_is_checked_over_one_token_chunks():
    """Interleaved RoPE (Cohere) with K LoRA is refused whatever the build's chunks (one-token chunks checked only
    position 0, where every rotation is the identity, and served it: scores 0.035 off)."""
    pm = with_adapters(_tiny("Cohere", attn_implementation="eager"),
                       {"planner": dict(r=4, target_modules=["k_proj", "v_proj"], layers_to_transform=[2])}, seed=2)
    forkkv_hf.enable_forkkv(pm)
    try:
        with pytest.raises(ValueError, match="not rotate-half RoPE"):
            SharedContext.build(pm, CTX, ["planner"], progress=False, chunk_size=1)
    finally:
        forkkv_hf.disable_forkkv(pm)


def test_mrope_text_generate_is_exact():
    """Qwen2-VL (M-RoPE): generate builds position_ids of M-RoPE's ``[sections, B, L]`` for text too, which the
    forward checks refused as malformed (every ForkKV generate of the model stopped at its prefill; an audit's
    finding). Text rows with LoRA on the last layer's K/V equal plain PEFT's."""
    from peft import LoraConfig, get_peft_model

    if not hasattr(transformers, "Qwen2VLConfig"):
        pytest.skip("no Qwen2-VL in this transformers")
    torch.manual_seed(0)
    text = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    cfg = transformers.Qwen2VLConfig(text_config=text, vision_config=dict(depth=1, embed_dim=32, hidden_size=64,
                                                                          num_heads=2),
                                     image_token_id=120, video_token_id=121, vision_start_token_id=122,
                                     vision_end_token_id=123)
    model = transformers.Qwen2VLForConditionalGeneration(cfg).eval()
    model.config._attn_implementation = "sdpa"
    target = r".*language_model.*layers\.2\.self_attn\.(k_proj|v_proj)"
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=target, init_lora_weights=False),
                        adapter_name="planner").eval()
    pm.add_adapter("coder", LoraConfig(r=2, target_modules=target, init_lora_weights=False))
    inputs = batch_inputs(CTX, PROMPTS, pad_token_id=0)
    _same(_forkkv_gen(pm, inputs), _gen(pm, inputs, NAMES))


def test_partial_rotary_on_a_fused_qkv_says_what_can_be_shared():
    """Phi-3's layout with partial rotary (Phi-4-mini's 0.75): ``qkv_proj`` LoRA is refused, and the message said
    "LoRA on V is still shared", which a fused projection cannot carry (an audit's finding): it names qkv_proj."""
    pm = with_adapters(_tiny("Phi3", partial_rotary_factor=0.75), {"planner": dict(r=4, target_modules=["qkv_proj"])})
    with pytest.raises(ValueError, match="partial rotary.*fused qkv_proj: retarget the adapters away from qkv_proj"):
        SharedContext.build(pm, CTX, ["planner"], progress=False)


def test_a_static_layout_counts_the_tokens_written_against_the_window():
    """The window check of a forward over the static layout (``make_static``: what a compiled decode runs on)
    counted its buffers' capacity as private tokens: 19 shared + 64 "private" outgrew a window of 28 that the call's
    19 + 3 tokens fit (an audit's finding). It counts the tokens written now: equal to the per-agent forward."""
    from forkkv_hf.static_cache import make_static

    pm = with_adapters(_tiny("Mistral", attn_implementation="sdpa", sliding_window=28),
                       {"planner": {"r": 4, "target_modules": ["k_proj", "v_proj"], "layers_to_transform": [2]}})
    names = ["planner", "__base__"]
    inputs = batch_inputs(CTX, PROMPTS[:2], pad_token_id=0)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    T = CTX.numel()
    with torch.no_grad():
        exact = pm(input_ids=ids, attention_mask=mask, position_ids=pos, adapter_names=names).logits[:, -1]
        forkkv_hf.enable_forkkv(pm)
        try:
            static = make_static(ForkKVCache.from_context(pm, CTX, adapter_names=names), 64, use_triton=False)
            got = pm(input_ids=ids[:, T:], attention_mask=mask, position_ids=pos[:, T:], adapter_names=names,
                     **cache_kwargs(static)).logits[:, -1]
        finally:
            forkkv_hf.disable_forkkv(pm)
    torch.testing.assert_close(got, exact, rtol=1e-4, atol=1e-4)


def test_gemma2_softcap_fallback_applies_attention_dropout():
    """With ForkKV enabled, a soft-capping model's forward outside ForkKV caches runs the "forkkv" attention's
    soft-capped fallback, which ignored attention dropout: a training forward got none (an audit's finding). It
    applies it as the eager attention does: the same random stream gives the eager model's logits."""
    prefix, kw, _, _, attn = FAMILIES["gemma2-softcap"]
    pm = with_adapters(_tiny(prefix, attn_implementation=attn, attention_dropout=0.5, **kw),
                       {"planner": {"r": 4, "target_modules": ["q_proj", "v_proj"]}})
    ids = CTX[None, :12]
    pm.train()
    try:
        torch.manual_seed(1)
        want = pm(input_ids=ids).logits
        forkkv_hf.enable_forkkv(pm)
        torch.manual_seed(1)
        got = pm(input_ids=ids).logits
        torch.manual_seed(2)
        other = pm(input_ids=ids).logits  # (other draws: other logits, so the comparison shows the dropout)
    finally:
        forkkv_hf.disable_forkkv(pm)
        pm.eval()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (other - want).abs().max() > 1e-3
