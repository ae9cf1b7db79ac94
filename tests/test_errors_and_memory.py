"""Memory accounting, and a clear error for every input ForkKV cannot serve correctly."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

import forkkv_hf
from forkkv_hf import ForkKVCache, SharedContext, batch_inputs, cache_kwargs
from models import tiny_llama, with_adapters

ALL = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def agents():
    pm = with_adapters(
        tiny_llama(layers=3, seed=4),
        {"planner": dict(r=4, target_modules=ALL), "coder": dict(r=4, target_modules=["k_proj", "v_proj"]),
         "writer": dict(r=8, target_modules=["q_proj", "o_proj"])},
    )
    return forkkv_hf.enable_forkkv(pm)


def _ctx(T, seed=0):
    return torch.randint(3, 128, (T,), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------- memory
def test_residual_bytes_per_agent(agents):
    T, L, r, itemsize = 33, 3, 4, 4
    cache = ForkKVCache.from_context(agents, _ctx(T), adapter_names=["planner", "coder", "writer", "__base__"])
    rep = cache.memory_report()
    assert rep.residual_bytes_per_agent["planner"] == 2 * r * L * T * itemsize
    assert rep.residual_bytes_per_agent["coder"] == 2 * r * L * T * itemsize
    assert rep.residual_bytes_per_agent["writer"] == 0  # no LoRA on k/v: nothing stored
    assert rep.agents == 2
    Hkv, D = 2, 16
    assert rep.shared_base_bytes == 2 * L * Hkv * T * D * itemsize
    assert rep.private_bytes == 0
    assert rep.dynamic_cache_bytes == 4 * T * 2 * L * Hkv * D * itemsize
    assert "one DynamicCache per row" in str(rep)


def test_base_held_once_whatever_the_rows(agents):
    shared = SharedContext.build(agents, _ctx(40), ["planner", "coder"])
    small = shared.fork(["planner"]).memory_report()
    big = shared.fork(["planner"] * 6 + ["coder"] * 6 + ["__base__"] * 4).memory_report()
    assert small.shared_base_bytes == big.shared_base_bytes == shared.base_bytes()
    assert big.residual_bytes == small.residual_bytes + shared.residual_bytes("coder")  # per agent, not per row
    # the B factors on the same basis as the u: the rows' agents' slots (before, every agent's of the context)
    assert small.factor_bytes == shared.factor_bytes(adapters=["planner"]) < big.factor_bytes == shared.factor_bytes()
    assert shared.fork(["__base__"]).memory_report().factor_bytes == 0
    assert big.dynamic_cache_bytes == 16 * small.dynamic_cache_bytes


def test_private_bytes_grow_with_generation(agents):
    ctx = _ctx(20)
    names = ["planner", "coder"]
    cache = ForkKVCache.from_context(agents, ctx, adapter_names=names)
    prompts = [torch.tensor([5, 6, 7]), torch.tensor([8, 9])]
    agents.generate(**batch_inputs(ctx, prompts, pad_token_id=0), adapter_names=names, max_new_tokens=4,
                    do_sample=False, pad_token_id=0, **cache_kwargs(cache))
    rep = cache.memory_report()
    P = 3 + 4 - 1
    for layer in cache.layers:  # prefetch read a `device` the layer never set (AttributeError)
        layer.offload()
        layer.prefetch()
    assert rep.private_tokens == P
    assert rep.private_bytes == 2 * 3 * 2 * P * 2 * 16 * 4  # rows * layers * (K,V) * P * Hkv * D * 4 bytes


# ---------------------------------------------------------------------------------------------------- errors
def test_unknown_adapter(agents):
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\].*load_adapter"):
        ForkKVCache.from_context(agents, _ctx(8), adapter_names=["planner", "nope"])


def test_adapter_names_must_be_a_list(agents):
    with pytest.raises(TypeError, match="one name per row"):
        ForkKVCache.from_context(agents, _ctx(8), adapter_names="planner")


def test_dora_refused():
    m = tiny_llama(layers=2)
    pm = get_peft_model(m, LoraConfig(r=4, target_modules=["k_proj", "v_proj"], use_dora=True), adapter_name="dora")
    pm.eval()
    with pytest.raises(ValueError, match="DoRA"):
        SharedContext.build(pm, _ctx(8), ["dora"])


def test_non_lora_adapter_refused():
    from peft import IA3Config

    pm = get_peft_model(tiny_llama(layers=2), IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=[]),
                        adapter_name="scaler").eval()
    with pytest.raises(ValueError, match="LoRA adapters only"):
        SharedContext.build(pm, _ctx(8), ["scaler"])


def _tiny(config_cls, model_cls, **kw):
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw)
    return model_cls(cfg).eval()


def test_k_norm_model_refuses_k_lora_but_shares_v_lora():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    base = _tiny(Qwen3Config, Qwen3ForCausalLM, head_dim=16)
    pm = with_adapters(base, {"kq": dict(target_modules=["k_proj", "q_proj"])})
    with pytest.raises(ValueError, match="k_norm"):
        SharedContext.build(pm, _ctx(8), ["kq"])
    # LoRA on the last layer's v_proj only: shared exactly, equal to the per-agent run
    base = _tiny(Qwen3Config, Qwen3ForCausalLM, head_dim=16)
    pm = with_adapters(base, {"v": dict(target_modules=["v_proj"], layers_to_transform=[1])}).eval()
    ctx = _ctx(12)
    inputs = batch_inputs(ctx, [torch.tensor([4, 5, 6]), torch.tensor([7])], pad_token_id=0)
    names = ["v", "__base__"]
    exact = pm.generate(**inputs, adapter_names=names, max_new_tokens=5, do_sample=False, pad_token_id=0)
    forkkv_hf.enable_forkkv(pm)
    cache = ForkKVCache.from_context(pm, ctx, adapter_names=names)
    out = pm.generate(**inputs, adapter_names=names, max_new_tokens=5, do_sample=False, pad_token_id=0,
                      **cache_kwargs(cache))
    assert torch.equal(out, exact)


def test_generate_with_other_adapter_names(agents):
    ctx = _ctx(10)
    cache = ForkKVCache.from_context(agents, ctx, adapter_names=["planner", "coder"])
    inputs = batch_inputs(ctx, [torch.tensor([3, 4]), torch.tensor([5, 6])])
    kw = dict(max_new_tokens=2, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    fresh = ForkKVCache.from_context(agents, ctx, adapter_names=["planner", "coder"])
    want_forked = agents.generate(**inputs, adapter_names=["planner", "coder"], **kw, **cache_kwargs(fresh))
    want_active = agents.generate(**inputs, **kw)  # plain PEFT, the active adapter on every row
    with pytest.raises(ValueError, match=r"forked for \['planner', 'coder'\].*adapter_names=cache.adapter_names"):
        agents.generate(**inputs, adapter_names=["coder", "planner"], max_new_tokens=2, pad_token_id=0,
                        **cache_kwargs(cache))
    cache.reset()
    with pytest.raises(ValueError, match="forked for"):  # no adapter_names: PEFT runs the active adapter on every row
        agents.generate(**inputs, max_new_tokens=2, pad_token_id=0, **cache_kwargs(cache))
    # an exception inside generate (here user code in a logits processor) after PEFT registered its adapter_names hooks
    def interrupt(input_ids, scores):
        raise RuntimeError("stopped by the user")

    cache.reset()
    with pytest.raises(RuntimeError, match="stopped by the user"):
        agents.generate(**inputs, adapter_names=["coder", "planner"], logits_processor=[interrupt], **kw,
                        **cache_kwargs(ForkKVCache.from_context(agents, ctx, adapter_names=["coder", "planner"])))
    # the model is left as it was: no stale PEFT adapter_names hooks (peft does not remove them when generate raises),
    # which would run coder and planner on the rows of a call without adapter_names; the refused cache serves like a
    # fresh one
    for got, want in ((agents.generate(**inputs, adapter_names=["planner", "coder"], **kw, **cache_kwargs(cache)),
                       want_forked),
                      (agents.generate(**inputs, **kw), want_active)):
        assert torch.equal(got.sequences, want.sequences)
        for a, b in zip(got.scores, want.scores):
            torch.testing.assert_close(a, b)


def test_batch_size_mismatch(agents):
    ctx = _ctx(10)
    cache = ForkKVCache.from_context(agents, ctx, adapter_names=["planner", "coder"])
    inputs = batch_inputs(ctx, [torch.tensor([3]), torch.tensor([5]), torch.tensor([6])])
    with pytest.raises(ValueError, match="forked for 2 rows"):
        agents.generate(**inputs, adapter_names=["planner", "coder", "planner"], max_new_tokens=2, pad_token_id=0,
                        **cache_kwargs(cache))


def test_attention_not_enabled():
    pm = with_adapters(tiny_llama(layers=2, seed=9), {"a1": dict(r=2)})
    ctx = _ctx(9)
    cache = ForkKVCache.from_context(pm, ctx, adapter_names=["a1"])
    with pytest.raises(ValueError, match="enable_forkkv"):
        pm.generate(**batch_inputs(ctx, [torch.tensor([3, 4])]), adapter_names=["a1"], max_new_tokens=2,
                    pad_token_id=0, **cache_kwargs(cache))


def test_bad_contexts_and_prompts(agents):
    with pytest.raises(ValueError, match="empty"):
        SharedContext.build(agents, torch.tensor([], dtype=torch.long), ["planner"])
    with pytest.raises(ValueError, match="max_position_embeddings=512"):
        SharedContext.build(agents, torch.ones(513, dtype=torch.long), ["planner"])
    with pytest.raises(ValueError, match="batch size 2"):
        SharedContext.build(agents, torch.ones(2, 5, dtype=torch.long), ["planner"])
    with pytest.raises(TypeError, match="integer dtype"):
        SharedContext.build(agents, torch.ones(5), ["planner"])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        batch_inputs(_ctx(5), [torch.tensor([3]), torch.tensor([], dtype=torch.long)], pad_token_id=0)
    with pytest.raises(ValueError, match="pad_token_id"):
        batch_inputs(_ctx(5), [torch.tensor([3]), torch.tensor([3, 4])])


def test_training_mode_refused(agents):
    agents.train()
    try:
        with pytest.raises(ValueError, match="eval"):
            SharedContext.build(agents, _ctx(5), ["planner"])
    finally:
        agents.eval()


def test_dtype_mismatch():
    pm = forkkv_hf.enable_forkkv(with_adapters(tiny_llama(layers=2, seed=5), {"a1": dict(r=2)}))
    ctx = _ctx(9)
    cache = ForkKVCache.from_context(pm, ctx, adapter_names=["a1"])
    pm.to(torch.bfloat16)
    with pytest.raises(TypeError, match="float32"):
        pm.generate(**batch_inputs(ctx, [torch.tensor([3, 4])]), adapter_names=["a1"], max_new_tokens=2,
                    pad_token_id=0, **cache_kwargs(cache))


@pytest.mark.version_independent
def test_batch_inputs_layout():
    ctx = torch.tensor([11, 12, 13])
    out = batch_inputs(ctx, [[21, 22], [31]], pad_token_id=0)
    assert out["input_ids"].tolist() == [[11, 12, 13, 21, 22], [11, 12, 13, 0, 31]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 1]]


def test_batch_inputs_refuses_a_padded_batch_of_prompts():
    """A tokenizer's padded ``[B, L]`` batch (or its BatchEncoding) as prompts: each row was taken whole, its pads
    unmasked inside the prompt (scores 0.06 off, silently). An unpadded ``[B, L]`` tensor is a list of rows."""
    ctx = torch.tensor([11, 12, 13])
    padded = torch.tensor([[21, 22, 23], [0, 0, 31]])
    for form in (padded, padded.tolist(), list(padded)):  # a tensor, a tokenizer's lists, a list of tensors
        with pytest.raises(ValueError, match="different numbers of pad_token_id=0 \\(padded\\); give unpadded"):
            batch_inputs(ctx, form, pad_token_id=0)
    with pytest.raises(TypeError, match="a mapping"):
        batch_inputs(ctx, {"input_ids": padded, "attention_mask": padded != 0}, pad_token_id=0)
    same = batch_inputs(ctx, torch.tensor([[21, 22], [31, 32]]), pad_token_id=0)
    assert same["input_ids"].tolist() == [[11, 12, 13, 21, 22], [11, 12, 13, 31, 32]]
    eos_first = batch_inputs(ctx, torch.tensor([[2, 22], [2, 32]]), pad_token_id=2)  # pad = eos opening every row
    assert eos_first["attention_mask"].tolist() == [[1] * 5] * 2


def test_default_dtype_float64_generates_as_the_per_agent_run():
    """``torch.set_default_dtype(torch.float64)`` with an fp32 model: the PyTorch attention path's accumulators took
    the default dtype, a dtype error deep inside (an audit's finding); they are fp32 now, and the tokens and scores
    equal each agent's own run (plain PEFT, context + prompt as one sequence; LoRA on the last layer's K/V)."""
    from models import plain_peft

    kv_last = {"target_modules": ["k_proj", "v_proj"], "layers_to_transform": [2]}
    agents = forkkv_hf.enable_forkkv(with_adapters(tiny_llama(layers=3, seed=7), {
        "planner": {"r": 4, **kv_last}, "coder": {"r": 2, **kv_last}}, seed=7))
    ctx, prompts, names = _ctx(15, seed=3), [torch.tensor([4, 5, 6]), torch.tensor([10])], ["planner", "coder"]
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "output_scores": True,
          "return_dict_in_generate": True}
    cache = ForkKVCache.from_context(agents, ctx, adapter_names=names)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        out = agents.generate(**batch_inputs(ctx, prompts, pad_token_id=0), adapter_names=names, **kw,
                              **cache_kwargs(cache))
        rows = [torch.cat([ctx, p])[None] for p in prompts]
        want = plain_peft(agents, lambda: [agents.generate(input_ids=r, attention_mask=torch.ones_like(r),
                                                           adapter_names=[n], **kw) for r, n in zip(rows, names)])
    finally:
        torch.set_default_dtype(default)
    L = ctx.numel() + max(p.numel() for p in prompts)
    for i, (w, r) in enumerate(zip(want, rows)):
        assert torch.equal(out.sequences[i, L:], w.sequences[0, r.shape[1]:])
        for a, b in zip(out.scores, w.scores):
            torch.testing.assert_close(a[i], b[0], rtol=1e-4, atol=1e-4)


def test_a_tokenizer_output_of_one_sequence_is_taken_as_its_input_ids(agents):
    """``apply_chat_template`` returns a ``BatchEncoding`` on transformers 5.x: ``batch_inputs`` and
    ``SharedContext.build`` refused it as a prompt or context with a bare TypeError (an audit's finding). A mapping
    of one sequence (``input_ids`` ``[L]`` or ``[1, L]``) is taken as its ids; a padded one is refused with advice."""
    from transformers import BatchEncoding

    ctx, prompt = [11, 12, 13], [21, 22]
    want = batch_inputs(ctx, [prompt, [31]], pad_token_id=0)
    got = batch_inputs(BatchEncoding({"input_ids": ctx, "attention_mask": [1, 1, 1]}),
                       [BatchEncoding({"input_ids": torch.tensor([prompt])}), {"input_ids": [31]}], pad_token_id=0)
    assert all(torch.equal(got[k], want[k]) for k in want)
    built = SharedContext.build(agents, BatchEncoding({"input_ids": torch.tensor([ctx])}), ["coder"], progress=False)
    assert built.token_ids.tolist() == ctx
    with pytest.raises(ValueError, match="padding in its attention_mask.*return_dict=False"):
        batch_inputs(ctx, [{"input_ids": [0, 21], "attention_mask": [0, 1]}], pad_token_id=0)
    with pytest.raises(TypeError, match="a mapping without input_ids"):
        SharedContext.build(agents, {"ids": ctx}, ["coder"])


def test_equal_length_prompts_ending_with_the_pad_id_are_explained():
    """Unpadded prompts of one length, one ending with the pad id (pad = eos after an end-of-turn token), look like a
    right-padded batch and are refused; the message said only "padded" (an audit's finding). It names the ambiguity
    and the call that takes them: without pad_token_id (rows of one length need no padding)."""
    ctx, prompts = torch.tensor([11, 12, 13]), [[5, 6, 7, 2], [8, 9, 10, 11]]
    with pytest.raises(ValueError, match="only happen to start or end with token 2.*without pad_token_id"):
        batch_inputs(ctx, prompts, pad_token_id=2)
    out = batch_inputs(ctx, prompts)
    assert out["input_ids"].tolist() == [[11, 12, 13, *p] for p in prompts]
    assert out["attention_mask"].tolist() == [[1] * 7] * 2
