"""Multimodal models (Llava over a text model): the limits ForkKV checks live on the text model's config (RoPE type,
max_position_embeddings, sliding window, layer count), not on the composite top-level config, which holds none of
them. Each is read there and refused (or served exactly) as for the text model alone."""

import pytest
import torch
import transformers

import forkkv_hf
from forkkv_hf import ForkKVCache, SharedContext, batch_inputs
from test_model_families import _gen, _same

IMAGE_TOKEN = 127
#: token ids below the image token (a Llava reads that one as an image's place)
CTX = torch.randint(3, 120, (30,), generator=torch.Generator().manual_seed(11))
PROMPTS = [torch.tensor([5, 6, 7]), torch.tensor([8])]


def _tiny_llava(prefix, **text_kw):
    """A tiny Llava whose text model is ``{prefix}ForCausalLM``'s (its config holds the RoPE, positions and window),
    with LoRA on the last text layer's K/V for ``planner`` (where ForkKV is exact)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    text = getattr(transformers, f"{prefix}Config")(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, **text_kw)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=16)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    target = r".*language_model.*layers\.1\.self_attn\.(k_proj|v_proj)"
    return get_peft_model(model, LoraConfig(r=4, target_modules=target, init_lora_weights=False),
                          adapter_name="planner").eval()


def test_rope_positions_and_layers_are_read_from_the_text_config():
    """A Llava over a dynamic-NTK Llama: the RoPE check and the max_position_embeddings refusal read the top-level
    config, so a prefill past the original length was served with the context rotated at the old frequencies
    (silently wrong) and a context beyond the positions was built (an audit's finding); a past of too few layers was
    not refused either. All read the text config now: refused as for the LlamaForCausalLM; within the limits, equal
    to the per-agent run."""
    rope = {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}
    pm = _tiny_llava("Llama", max_position_embeddings=32, rope_parameters=rope)
    names = ["planner", "__base__"]
    inputs = batch_inputs(CTX[:10], PROMPTS, pad_token_id=0)
    exact = _gen(pm, inputs, names)
    forkkv_hf.enable_forkkv(pm)
    try:
        _same(_gen(pm, inputs, names, ForkKVCache.from_context(pm, CTX[:10], adapter_names=names)), exact)
        long_rows = batch_inputs(CTX, [CTX[:10]])  # 40 positions > 32
        with pytest.raises(ValueError, match="'dynamic' RoPE, whose frequencies depend on the sequence length"):
            _gen(pm, long_rows, ["__base__"], ForkKVCache.from_context(pm, CTX, adapter_names=["__base__"]))
        with pytest.raises(ValueError, match="at most max_position_embeddings=32"):
            SharedContext.build(pm, torch.cat([CTX, CTX[:10]]), ["planner"], progress=False)
        past = [(layer.key, layer.value) for layer in SharedContext.build(pm, CTX[:5], [], progress=False).layers]
        with pytest.raises(ValueError, match="past has 1 layers but the model has 2"):
            SharedContext.build_continuation(pm, CTX[5:10], [], past=past[:1], progress=False)
    finally:
        forkkv_hf.disable_forkkv(pm)


def test_a_sliding_window_on_the_text_config_is_seen():
    """A Llava over a Mistral with its sliding window on the text config only: the build missed it (a 20-token
    context with window 16 failed deep inside: "the base pass cached 15 tokens, expected 20") and recorded none, so a
    compile config set up the static layout, whose capacity the prefill's window check counted as tokens (a call
    that fits the window was refused; an audit's finding). The window is read from the attention's config now: the
    build is refused with the reason, the call runs eager and equals the per-agent run."""
    pm = _tiny_llava("Mistral", max_position_embeddings=256, sliding_window=16)
    inputs = batch_inputs(CTX[:10], [torch.tensor([4, 5])])  # 10 + 2 + 3 new tokens <= 16
    exact = _gen(pm, inputs, ["planner"], max_new_tokens=3)
    forkkv_hf.enable_forkkv(pm)
    try:
        with pytest.raises(ValueError, match=r"sliding-window attention \(window 16\).*at most 15 tokens"):
            SharedContext.build(pm, CTX[:20], ["planner"], progress=False)
        shared = SharedContext.build(pm, CTX[:10], ["planner"], progress=False)
        assert [layer.sliding_window for layer in shared.layers] == [16, 16]
        cc = transformers.CompileConfig(fullgraph=True, backend="eager", mode=None)
        cc._compile_all_devices = True
        _same(_gen(pm, inputs, ["planner"], shared.fork(["planner"]), max_new_tokens=3, compile_config=cc), exact)
    finally:
        forkkv_hf.disable_forkkv(pm)


def test_a_direct_forward_reads_the_vocabulary_of_the_text_config():
    """A direct forward's token range check read ``vocab_size`` from the top-level config, which a Llava's lacks, so
    out-of-vocabulary ids reached the embedding (an index error on CPU, a device assert on CUDA; noted by an audit):
    refused with the id and its place, as for the text model alone."""
    pm = forkkv_hf.enable_forkkv(_tiny_llava("Llama"))
    try:
        cache = ForkKVCache.from_context(pm, CTX[:10], adapter_names=["planner"])
        ids = torch.tensor([[5, 6, 300]])
        with pytest.raises(ValueError, match="input_ids holds token id 300 at row 0, column 2"):
            pm(input_ids=ids, position_ids=torch.arange(10, 13)[None], adapter_names=["planner"],
               **forkkv_hf.cache_kwargs(cache))
    finally:
        forkkv_hf.disable_forkkv(pm)
