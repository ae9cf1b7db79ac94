"""Misuse on the input side (issue 16, part B): each case is refused with an error that says what is wrong and what
to do, or works and equals plain PEFT where ForkKV is exact (LoRA on the last layer's K/V, ``__base__`` rows) and
ForkKV's own plain greedy run elsewhere. Masks over the shared context, cache keywords, token ids, whole rows in a
direct forward, sequence-length dependent RoPE, assisted and prompt-lookup decoding, ``crop``, model families."""

import pytest
import torch
from transformers import DynamicCache

import forkkv_hf
from forkkv_hf import CACHE_KWARG, ForkKVCache, SharedContext, batch_inputs, cache_kwargs
from forkkv_hf.compat import crop_takes_length
from cases import parametrize
from models import plain_peft, tiny_llama, with_adapters

ALL = ["q_proj", "k_proj", "v_proj", "o_proj"]
KV_LAST = dict(target_modules=["k_proj", "v_proj"], layers_to_transform=[2])  # ForkKV is exact for these


@pytest.fixture(scope="module")
def agents():
    """LoRA on q/k/v/o of every layer: ForkKV is its own semantics here (refusals, self-consistency)."""
    pm = with_adapters(tiny_llama(layers=2, seed=21), {"planner": dict(r=4, target_modules=ALL),
                                                       "coder": dict(r=2, target_modules=ALL)}, seed=21)
    return forkkv_hf.enable_forkkv(pm)


@pytest.fixture(scope="module")
def exact_agents():
    """LoRA on the last layer's K/V only: ForkKV equals plain PEFT."""
    pm = with_adapters(tiny_llama(layers=3, seed=7), {"planner": dict(r=4, **KV_LAST), "coder": dict(r=2, **KV_LAST)},
                       seed=7)
    return forkkv_hf.enable_forkkv(pm)


def _ctx(T=15, seed=3, high=128):
    return torch.randint(3, high, (T,), generator=torch.Generator().manual_seed(seed))


def _gen(pm, inputs, names, cache=None, **kw):
    kw.setdefault("max_new_tokens", 4)
    kw.setdefault("pad_token_id", 0)
    extra = cache_kwargs(cache) if cache is not None else {}
    return pm.generate(**inputs, adapter_names=names, do_sample=False, **extra, **kw)


def _fork(pm, ctx, names):
    return ForkKVCache.from_context(pm, ctx, adapter_names=names)


# ---------------------------------------------------------------------------------------------------- masks
def test_mask_that_hides_context_tokens_is_refused(agents):
    ctx = _ctx()
    names = ["planner", "coder"]
    inputs = batch_inputs(ctx, [torch.tensor([4, 5]), torch.tensor([6])], pad_token_id=0)
    mask = inputs["attention_mask"].clone()
    mask[1, 3] = 0
    cache = _fork(agents, ctx, names)
    with pytest.raises(ValueError, match=r"hides token 3 of the 15-token shared context in row 1.*batch_inputs"):
        _gen(agents, {"input_ids": inputs["input_ids"], "attention_mask": mask}, names, cache)
    # a direct forward of the new tokens with such a mask: refused the same way, before the cache is touched
    with pytest.raises(ValueError, match="hides token 3 of the 15-token shared context"):
        agents(input_ids=inputs["input_ids"][:, 15:], attention_mask=mask, adapter_names=names, **cache_kwargs(cache))
    assert cache.get_seq_length() == 15 and cache.private_ids is None


def test_pad_id_inside_the_context_without_mask_is_refused(agents):
    ctx = _ctx()
    ctx[4] = 0  # the pad id: generate would derive attention_mask = input_ids != 0, hiding context token 4
    row = torch.cat([ctx, torch.tensor([4, 5])])[None]
    with pytest.raises(ValueError, match=r"pad_token_id=0 occurs inside the shared context \(row 0, token 4\)"):
        _gen(agents, {"input_ids": row}, ["planner"], _fork(agents, ctx, ["planner"]))
    # with batch_inputs' mask the same rows work, and equal the run whose pad id is not in the context at all
    out = _gen(agents, batch_inputs(ctx, [torch.tensor([4, 5])]), ["planner"], _fork(agents, ctx, ["planner"]))
    ref = _gen(agents, {"input_ids": row}, ["planner"], _fork(agents, ctx, ["planner"]), pad_token_id=127)
    assert torch.equal(out, ref)


def test_pad_derived_mask_over_padding_only_equalsplain_peft(exact_agents):
    """No attention_mask given, pad ids only between context and prompt (batch_inputs' layout): generate derives a
    mask that hides the padding alone, which ForkKV serves like plain PEFT."""
    pm = exact_agents
    ctx = _ctx(18, seed=5)
    names = ["planner", "coder", "__base__"]
    ids = batch_inputs(ctx, [torch.tensor([4, 5, 6]), torch.tensor([7]), torch.tensor([8, 9])], pad_token_id=0)
    inputs = {"input_ids": ids["input_ids"]}
    exact = plain_peft(pm, lambda: _gen(pm, inputs, names, max_new_tokens=6))
    assert torch.equal(_gen(pm, inputs, names, _fork(pm, ctx, names), max_new_tokens=6), exact)


@parametrize("extra", [2, -1])
def test_mask_of_the_wrong_length_is_refused(agents, extra):
    ctx = _ctx()
    inputs = batch_inputs(ctx, [torch.tensor([4, 5])])
    mask = torch.ones(1, 17 + extra, dtype=torch.long)
    with pytest.raises(ValueError, match=f"attention_mask covers {17 + extra} tokens but must cover 17"):
        _gen(agents, {"input_ids": inputs["input_ids"], "attention_mask": mask}, ["planner"],
             _fork(agents, ctx, ["planner"]))


# ---------------------------------------------------------------------------------------------------- cache keyword
def test_cache_passed_under_both_keywords_is_refused(agents):
    ctx = _ctx()
    inputs = batch_inputs(ctx, [torch.tensor([4, 5])])
    a, b = _fork(agents, ctx, ["planner"]), _fork(agents, ctx, ["planner"])
    with pytest.raises(ValueError, match="both past_key_values= and cache="):
        agents.generate(**inputs, adapter_names=["planner"], max_new_tokens=2, past_key_values=a, cache=b)
    if CACHE_KWARG == "past_key_values":  # transformers 5.17 ignores cache= (and then refuses it as unused)
        with pytest.raises(ValueError, match="takes the cache as past_key_values="):
            agents.generate(**inputs, adapter_names=["planner"], max_new_tokens=2, cache=a)


# ---------------------------------------------------------------------------------------------------- token ids
def test_token_ids_are_checked_where_they_enter(agents):
    ctx = _ctx()
    with pytest.raises(TypeError, match=r"prompt 0 must hold token ids \(integer dtype\), got torch.float32"):
        batch_inputs(ctx, [torch.tensor([4.7, 5.2])])  # never truncated to [4, 5]
    with pytest.raises(TypeError, match="integer dtype"):
        batch_inputs(ctx, [[4.0, 5.0]])
    with pytest.raises(ValueError, match="prompt 1 is not a flat list of token ids"):
        batch_inputs(ctx, [[4], [[5, 6], [7]]])
    with pytest.raises(ValueError, match="prompt 0 holds token id -4 at index 0"):
        batch_inputs(ctx, [[-4, 5]])
    with pytest.raises(ValueError, match="pad_token_id must be a token id >= 0"):
        batch_inputs(ctx, [[4], [5, 6]], pad_token_id=-1)
    with pytest.raises(TypeError, match="pad_token_id must be an int"):
        batch_inputs(ctx, [[4], [5, 6]], pad_token_id=1.0)
    with pytest.raises(ValueError, match=r"context_ids holds token id 500 at index 1.*vocabulary"):
        SharedContext.build(agents, torch.tensor([3, 500, 4]), ["planner"])
    with pytest.raises(ValueError, match="context_ids holds token id -5"):
        SharedContext.build(agents, [3, -5], ["planner"])
    with pytest.raises(ValueError, match="context_ids is not a flat list"):
        SharedContext.build(agents, [[3, 4], [5]], ["planner"])
    with pytest.raises(TypeError, match="integer dtype"):
        SharedContext.build(agents, [3.0, 4.0], ["planner"])
    # at generate time, where the model (and so the vocabulary) is known
    cache = _fork(agents, ctx, ["planner", "coder"])
    with pytest.raises(ValueError, match=r"input_ids holds token id 400 at row 0, column 15.*\(the model's vocabulary\)"):
        _gen(agents, batch_inputs(ctx, [[400, 5], [6]], pad_token_id=0), ["planner", "coder"], cache)
    with pytest.raises(ValueError, match="token id 1000 at row 1, column 15 \\(it is the pad_token_id 1000"):
        _gen(agents, batch_inputs(ctx, [[4, 5], [6]], pad_token_id=1000), ["planner", "coder"], cache,
             pad_token_id=1000)
    # and in a direct forward
    with pytest.raises(ValueError, match="input_ids holds token id 128"):
        agents(input_ids=torch.tensor([[128]]), adapter_names=["planner"], **cache_kwargs(_fork(agents, ctx, ["planner"])))
    # numpy and int32 ids are fine
    shared = SharedContext.build(agents, ctx.int().numpy(), ["planner"])
    assert torch.equal(shared.token_ids, ctx)


def test_adapter_names_must_match_the_rows(agents):
    ctx = _ctx()
    inputs = batch_inputs(ctx, [torch.tensor([4, 5]), torch.tensor([6])], pad_token_id=0)
    cache = _fork(agents, ctx, ["planner", "coder"])
    with pytest.raises(TypeError, match="not the string 'planner'"):
        _gen(agents, inputs, "planner", cache)
    with pytest.raises(ValueError, match="adapter_names has 1 names but the batch has 2 rows"):
        _gen(agents, inputs, ["planner"], cache)
    with pytest.raises(ValueError, match=r"PEFT does not repeat adapter_names.*range\(2\)"):
        agents.generate(**inputs, adapter_names=["planner", "coder"], max_new_tokens=2, do_sample=True,
                        num_return_sequences=2, pad_token_id=0, **cache_kwargs(cache))


# ---------------------------------------------------------------------------------------------------- direct forward
def test_direct_forward_of_whole_rows(exact_agents):
    """Whole rows (context + prompt) into a fresh fork would append the context a second time: refused with what to
    do, unless only the logits of new tokens are asked for (then they are cut to the new tokens, as generate does).
    The documented forward of the tail keeps working and equals plain PEFT."""
    pm = exact_agents
    ctx = _ctx(16, seed=8)
    names = ["planner", "__base__"]
    inputs = batch_inputs(ctx, [torch.tensor([4, 5, 6]), torch.tensor([7])], pad_token_id=0)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        exact = plain_peft(pm, lambda: pm(**inputs, position_ids=positions, adapter_names=names).logits)
        cache = _fork(pm, ctx, names)
        for kwargs in (inputs, {"input_ids": ids}):
            with pytest.raises(ValueError, match=r"whole rows \(19 tokens\).*pass only the tokens after them, "
                                                 r"input_ids\[:, 16:\]"):
                pm(**kwargs, adapter_names=names, **cache_kwargs(cache))
            assert cache.get_seq_length() == 16  # refused before anything was appended
        tail = pm(input_ids=ids[:, 16:], attention_mask=mask, position_ids=positions[:, 16:], adapter_names=names,
                  **cache_kwargs(cache)).logits
        torch.testing.assert_close(tail, exact[:, 16:], rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match="all of which this cache already holds \\(19\\); pass new tokens"):
            pm(**inputs, adapter_names=names, **cache_kwargs(cache))  # (it said to give a 38-column mask)
        last = pm(**inputs, position_ids=positions, adapter_names=names, logits_to_keep=2,
                  **cache_kwargs(_fork(pm, ctx, names))).logits
        torch.testing.assert_close(last, exact[:, -2:], rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match="position_ids start at 0, inside the 16-token shared context"):
            pm(input_ids=ids[:, 16:], position_ids=torch.arange(3)[None].expand(2, 3), adapter_names=names,
               **cache_kwargs(_fork(pm, ctx, names)))


def test_a_4d_mask_whose_pad_rows_see_nothing_equals_plain_peft(exact_agents):
    """A direct forward with the caller's 4-D mask over padding on both axes (causal & key pad & query pad): the pad
    rows see no key. The PyTorch path divided 0 by 0 there and the NaN reached the row's real tokens through the next
    layers' K/V; SDPA (plain PEFT) and the kernels give such rows 0."""
    from transformers import DynamicCache

    pm, T = exact_agents, 14
    ctx = _ctx(T, seed=3)
    names = ["planner", "__base__"]
    inp = batch_inputs(ctx, [torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10, 11, 12])], pad_token_id=0)
    ids, mask = inp["input_ids"], inp["attention_mask"].bool()
    S = ids.shape[1]
    pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
    m4 = torch.tril(torch.ones(S, S, dtype=torch.bool))[None, None] & mask[:, None, None, :] & mask[:, None, :, None]
    kw = dict(input_ids=ids[:, T:], attention_mask=m4[:, :, T:], position_ids=pos[:, T:], adapter_names=names)

    def plain():
        dc = DynamicCache()
        pm(input_ids=ids[:, :T], adapter_names=names, **cache_kwargs(dc))
        return pm(**kw, **cache_kwargs(dc)).logits

    with torch.no_grad():
        got = pm(**kw, **cache_kwargs(_fork(pm, ctx, names))).logits
        want = plain_peft(pm, plain)
    assert not got.isnan().any()
    torch.testing.assert_close(got[0, 2:], want[0, 2:], rtol=1e-4, atol=1e-4)  # row 0's real tokens
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4)


def test_generate_position_ids_must_number_the_context_from_zero(exact_agents):
    """generate's ``position_ids`` of whole rows: the usual cumsum ones equal plain PEFT; ones that shift or restart
    inside the context were served with the context at 0..T-1 and the prompt moved (0.06-0.12 off, silently)."""
    pm = exact_agents
    ctx = _ctx(12, seed=4)
    names = ["planner", "__base__"]
    inputs = batch_inputs(ctx, [torch.tensor([5, 6, 7]), torch.tensor([8, 9])], pad_token_id=0)
    pos = (inputs["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    got = _gen(pm, inputs, names, _fork(pm, ctx, names), position_ids=pos)
    assert torch.equal(got, plain_peft(pm, lambda: _gen(pm, inputs, names, position_ids=pos)))
    restart = torch.cat([pos[:, :6], pos[:, 6:12] - 6, pos[:, 12:]], 1)
    for bad in (pos + 3, restart, pos[:, :5]):
        with pytest.raises(ValueError, match="position_ids of the shared context must be 0..11 in every row"):
            _gen(pm, inputs, names, _fork(pm, ctx, names), position_ids=bad)


def test_a_cache_passed_positionally_is_checked_as_by_keyword():
    """``model(ids, mask, positions, cache)`` (the cache 4th): the forward hooks looked in the keywords only, so whole
    rows were appended after the shared context a second time (0.05 off, silently)."""
    m = forkkv_hf.enable_forkkv(tiny_llama(layers=2, seed=3))
    ctx = _ctx(12, seed=5)
    shared = SharedContext.build(m, ctx, [], progress=False)
    whole = torch.cat([ctx[None], torch.tensor([[40, 41, 42]])], 1)
    with torch.no_grad(), pytest.raises(ValueError, match=r"input_ids hold whole rows \(15 tokens\)"):
        m(whole, None, None, shared.fork(["__base__"]))
    with torch.no_grad():
        cache = shared.fork(["__base__"])
        got = m(whole[:, 12:], None, torch.arange(12, 15)[None], cache).logits
        want = m(input_ids=whole).logits[:, 12:]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert cache.private_ids.shape[1] == 3  # the tokens were recorded


def test_generate_settings_that_change_the_rows(exact_agents):
    """token_healing rewrote the rows inside generate after the checks (served over the unhealed context, 0.5-0.8 off):
    refused. Beams from a generation config: PEFT repeats adapter_names for a num_beams keyword only, so the names
    repeated per beam are right there (they were refused with advice that then failed inside PEFT). A continuation
    with num_return_sequences or beams after cache.batch_repeat_interleave(k) equals plain PEFT's over a
    DynamicCache repeated the same way (it was refused as not continuing the rows)."""
    from transformers import GenerationConfig

    pm = exact_agents
    ctx = _ctx(12, seed=6)
    names = ["planner", "coder"]
    inputs = batch_inputs(ctx, [torch.tensor([5, 6, 7]), torch.tensor([8, 9])], pad_token_id=0)
    with pytest.raises(ValueError, match="token_healing with a ForkKVCache"):
        _gen(pm, inputs, names, _fork(pm, ctx, names), token_healing=True)
    beams = [n for n in names for _ in range(2)]
    config = GenerationConfig(num_beams=2, max_new_tokens=3, pad_token_id=0, do_sample=False)
    got = pm.generate(**inputs, adapter_names=beams, generation_config=config, **cache_kwargs(_fork(pm, ctx, names)))
    assert torch.equal(got, plain_peft(pm, lambda: pm.generate(**inputs, adapter_names=beams,
                                                               generation_config=config)))
    with pytest.raises(ValueError, match="num_beams=2 from a generation config: PEFT does not repeat"):
        pm.generate(**inputs, adapter_names=names, generation_config=config, **cache_kwargs(_fork(pm, ctx, names)))
    cache = _fork(pm, ctx, names)
    first = _gen(pm, inputs, names, cache)
    more = {"input_ids": torch.cat([first, torch.tensor([[40], [41]])], 1),
            "attention_mask": torch.cat([inputs["attention_mask"], torch.ones(2, 5, dtype=torch.long)], 1)}

    def plain():
        from transformers import DynamicCache

        dc = DynamicCache()
        _gen(pm, inputs, names, dc)
        dc.batch_repeat_interleave(2)
        return _gen(pm, more, names, dc, num_beams=2)

    cache.batch_repeat_interleave(2)
    assert torch.equal(_gen(pm, more, names, cache, num_beams=2), plain_peft(pm, plain))


def test_chunked_prefill_equals_plain_peft_or_is_refused(exact_agents):
    """``prefill_chunk_size``: on transformers that prefill after the cached tokens (5.2x) it equals plain PEFT; on
    5.17, whose chunks start at the rows' first token (inside the shared context), it is refused saying so (before:
    refused for the caller's mask, which was right)."""
    from forkkv_hf.compat import chunked_prefill_skips_cache

    pm = exact_agents
    ctx = _ctx(12, seed=7)
    names = ["planner", "coder"]
    inputs = batch_inputs(ctx, [torch.tensor([5, 6, 7]), torch.tensor([8, 9])], pad_token_id=0)
    if not chunked_prefill_skips_cache():
        with pytest.raises(ValueError, match="its chunked prefill starts at the rows' first token"):
            _gen(pm, inputs, names, _fork(pm, ctx, names), prefill_chunk_size=2)
        return
    got = _gen(pm, inputs, names, _fork(pm, ctx, names), prefill_chunk_size=2)
    assert torch.equal(got, plain_peft(pm, lambda: _gen(pm, inputs, names, prefill_chunk_size=2)))


def test_forward_shapes_are_checked(agents):
    ctx = _ctx()
    inputs = batch_inputs(ctx, [torch.tensor([4, 5]), torch.tensor([6])], pad_token_id=0)
    tail, mask = inputs["input_ids"][:, 15:], inputs["attention_mask"]
    cache = _fork(agents, ctx, ["planner", "coder"])
    with pytest.raises(ValueError, match="attention_mask has 1 rows but input_ids have 2"):
        agents(input_ids=tail, attention_mask=mask[:1], adapter_names=["planner", "coder"], **cache_kwargs(cache))
    with pytest.raises(ValueError, match=r"position_ids must be \[2, 2\]"):
        agents(input_ids=tail, position_ids=torch.tensor([15, 16]), adapter_names=["planner", "coder"],
               **cache_kwargs(cache))
    with pytest.raises(ValueError, match="covers 16 tokens but this forward appends 2 to a cache holding 15"):
        agents(input_ids=tail, attention_mask=mask[:, 1:], adapter_names=["planner", "coder"], **cache_kwargs(cache))
    assert cache.get_seq_length() == 15


# ---------------------------------------------------------------------------------------------------- RoPE scaling
def _rope_agents(rope: dict, max_pos: int):
    m = tiny_llama(layers=3, seed=5, max_pos=max_pos, rope_parameters=dict(rope_theta=10000.0, **rope))
    with torch.no_grad():  # sharper attention, so that positions (and so RoPE) matter to the logits
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight.mul_(6)
            layer.self_attn.k_proj.weight.mul_(6)
    return forkkv_hf.enable_forkkv(with_adapters(m, {"planner": dict(r=4, **KV_LAST)}, seed=5))


def _rope_run(pm, T: int, prompt: int, new: int, chunk_size=4096):
    """ForkKV and plain PEFT over a T-token context, two rows (an exact agent and the base model)."""
    ctx = _ctx(T, seed=1)
    names = ["planner", "__base__"]
    inputs = batch_inputs(ctx, [_ctx(prompt, seed=2), _ctx(prompt, seed=3)])
    kw = dict(max_new_tokens=new, min_new_tokens=new, output_scores=True, return_dict_in_generate=True)
    exact = plain_peft(pm, lambda: _gen(pm, inputs, names, **kw))
    shared = SharedContext.build(pm, ctx, ["planner"], chunk_size=chunk_size, progress=False)
    return _gen(pm, inputs, names, shared.fork(names), **kw), exact


def _same(out, exact):
    assert torch.equal(out.sequences, exact.sequences)
    for a, b in zip(out.scores, exact.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_dynamic_ntk_rope(monkeypatch):
    """Dynamic NTK rescales every frequency once a forward reaches past max_position_embeddings (32 here)."""
    pm = _rope_agents(dict(rope_type="dynamic", factor=4.0), max_pos=32)
    _same(*_rope_run(pm, T=20, prompt=5, new=4))  # 29 positions: never rescaled
    _same(*_rope_run(pm, T=20, prompt=5, new=20))  # decoding past 32: earlier keys stay as cached, as in plain HF
    with pytest.raises(ValueError, match=r"'dynamic' RoPE.*change above 32 positions.*prefill of these rows \(44"):
        _rope_run(pm, T=20, prompt=24, new=3)  # the prefill itself passes 32: the context would be rescaled too
    # what the refusal prevents: without it the scores differ from plain PEFT, also for the __base__ row
    monkeypatch.setattr(forkkv_hf.guards, "check_rope_for_prefill", lambda *a: None)
    out, exact = _rope_run(pm, T=20, prompt=24, new=3)
    diff = (out.scores[0][1] - exact.scores[0][1]).abs()
    assert diff[diff.isfinite()].max() > 1e-3


def test_a_shared_context_serves_turns_after_a_long_generate_under_dynamic_rope():
    """A generate that decodes past a dynamic-NTK limit makes transformers replace the rotary module's inv_freq
    buffers; they were recorded as base weights, so the next turn over the same context was refused as stale (and a
    ForkKVStore recomputed every turn). Its tables are checked instead: every turn equals plain PEFT."""
    pm = _rope_agents(dict(rope_type="dynamic", factor=4.0), max_pos=32)
    ctx, names = _ctx(20, seed=1), ["planner", "__base__"]
    shared = SharedContext.build(pm, ctx, ["planner"], progress=False)
    store = forkkv_hf.ForkKVStore(pm)
    for turn in range(3):
        inputs = batch_inputs(ctx, [_ctx(5, seed=10 + turn), _ctx(5, seed=20 + turn)])
        kw = dict(max_new_tokens=12, min_new_tokens=12)  # 37 positions: past 32 every turn
        exact = plain_peft(pm, lambda: _gen(pm, inputs, names, **kw))
        assert torch.equal(_gen(pm, inputs, names, shared.fork(names), **kw), exact)
        assert torch.equal(_gen(pm, inputs, names, store.fork(ctx, names), **kw), exact)
    assert store.stats.base_passes == 1 and store.stats.base_model_tokens == 20


def test_longrope_follows_the_context_length():
    """longrope switches from short to long factors above original_max_position_embeddings (16 here), per forward:
    a context built in one pass past 16 tokens uses the long factors as plain PEFT's prefill does; a context within 16
    whose prefill passes it, or one built in chunks across it, would not match and is refused."""
    pm = _rope_agents(dict(rope_type="longrope", short_factor=[1.0] * 8, long_factor=[3.0] * 8,
                           original_max_position_embeddings=16), max_pos=64)
    _same(*_rope_run(pm, T=8, prompt=4, new=8))  # decoding past 16
    _same(*_rope_run(pm, T=20, prompt=5, new=3, chunk_size=None))
    with pytest.raises(ValueError, match=r"'longrope' RoPE.*change above 16 positions"):
        _rope_run(pm, T=10, prompt=10, new=3)
    with pytest.raises(ValueError, match=r"in one pass \(chunk_size=None\)"):
        _rope_run(pm, T=20, prompt=5, new=3, chunk_size=8)


@parametrize("rope", [dict(rope_type="linear", factor=2.0),
                      dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=16),
                      dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16)])
def test_position_only_rope_types_equalplain_peft(rope):
    pm = _rope_agents(rope, max_pos=32)
    _same(*_rope_run(pm, T=14, prompt=10, new=10))  # past 16 and 32 positions, prefill and decode


# ---------------------------------------------------------------------------------------------------- assisted decoding
def _drafter(mode: str):
    if mode == "assistant_model":
        return {"assistant_model": tiny_llama(layers=1, seed=8)}
    return {"prompt_lookup_num_tokens": 3} if mode == "prompt_lookup" else {"assistant_early_exit": 1}


DRAFTERS = ["prompt_lookup", "assistant_model", "assistant_early_exit"]


@parametrize("mode", DRAFTERS)
@parametrize("name", ["planner", "__base__"])
def test_assisted_decoding_equalsplain_peft(exact_agents, monkeypatch, mode, name):
    """Drafts are verified several tokens at a time and rejected ones cropped from the private part (crop(0) when all
    are accepted): the tokens equal plain PEFT's greedy ones."""
    pm = exact_agents
    ctx = _ctx(20, seed=1, high=40)  # few distinct ids: prompt lookup finds n-gram matches
    inputs = batch_inputs(ctx, [ctx[:6].clone()])
    exact = plain_peft(pm, lambda: _gen(pm, inputs, [name], max_new_tokens=12))
    crops, forwards = [], []
    monkeypatch.setattr(ForkKVCache, "crop", lambda self, n, crop=ForkKVCache.crop: (crops.append(n), crop(self, n))[1])
    hook = pm.get_base_model().register_forward_pre_hook(
        lambda m, a, kw: forwards.append(kw["input_ids"].shape[1]) if isinstance(kw.get(CACHE_KWARG), ForkKVCache)
        else None, with_kwargs=True)
    try:
        cache = _fork(pm, ctx, [name])
        out = _gen(pm, inputs, [name], cache, max_new_tokens=12, **_drafter(mode))
    finally:
        hook.remove()
    assert torch.equal(out, exact)
    assert crops and max(forwards[1:]) > 1  # drafts were verified in multi-token forwards and cropped
    assert cache.get_seq_length() == 20 + 6 + 12 - 1 and cache.private_ids.shape[1] == 6 + 12 - 1


@parametrize("mode", DRAFTERS)
def test_assisted_decoding_equals_forkkv_greedy(agents, mode):
    ctx = _ctx(20, seed=1, high=40)
    inputs = batch_inputs(ctx, [ctx[:6].clone()])
    shared = SharedContext.build(agents, ctx, ["planner"])
    greedy = _gen(agents, inputs, ["planner"], shared.fork(["planner"]), max_new_tokens=10)
    assert torch.equal(_gen(agents, inputs, ["planner"], shared.fork(["planner"]), max_new_tokens=10,
                            **_drafter(mode)), greedy)


def test_assisted_decoding_needs_one_row(agents):
    ctx = _ctx()
    inputs = batch_inputs(ctx, [torch.tensor([4, 5]), torch.tensor([6])], pad_token_id=0)
    with pytest.raises(ValueError, match="one row at a time.*shared.fork\\(\\[name\\]\\)"):
        _gen(agents, inputs, ["planner", "coder"], _fork(agents, ctx, ["planner", "coder"]),
             prompt_lookup_num_tokens=3)


def test_crop_follows_the_installed_transformers(agents):
    """crop(n) as DynamicCache's: n <= 0 removes -n tokens; n > 0 is an absolute length where transformers still
    takes it (5.17) and refused where it does not (5.24); the shared context is never cropped."""
    ctx = _ctx()
    cache = _fork(agents, ctx, ["planner"])
    _gen(agents, batch_inputs(ctx, [torch.tensor([4, 5])]), ["planner"], cache, max_new_tokens=5)  # 15 + 6
    dyn = DynamicCache()
    dyn.update(torch.zeros(1, 2, 21, 16), torch.zeros(1, 2, 21, 16), 0)
    for c in (cache, dyn):
        c.crop(0)
        c.crop(-2)
    assert cache.get_seq_length() == dyn.get_seq_length() == 19
    assert cache.private_ids.shape[1] == 4
    if crop_takes_length():
        cache.crop(17)
        dyn.crop(17)
        assert cache.get_seq_length() == dyn.get_seq_length() == 17
    else:
        with pytest.raises(ValueError):
            dyn.crop(17)
        with pytest.raises(ValueError, match=r"takes only n <= 0 \(remove -n tokens\)"):
            cache.crop(17)
    with pytest.raises(ValueError, match="cannot crop into the shared context"):
        cache.crop(-5)


# ---------------------------------------------------------------------------------------------------- model families
def _family(config_name: str, model_name: str, targets, **cfg):
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(vocab_size=128, **cfg)).eval()
    return get_peft_model(model, LoraConfig(r=4, target_modules=targets), adapter_name="agent").eval()


SEQ2SEQ = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
               encoder_ffn_dim=64, decoder_ffn_dim=64, pad_token_id=0, decoder_start_token_id=0)
HYBRID_BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2)
HYBRID = dict(HYBRID_BASE, head_dim=16, linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=16,
              linear_value_head_dim=16)
HYBRID_REFUSED = r"3 of its 4 decoder layers without a self-attention ForkKV can split \(layer types linear_attention\)"
FAMILIES = {
    "bart": (("BartConfig", "BartForConditionalGeneration", ["k_proj", "v_proj"]), SEQ2SEQ, "is an encoder-decoder"),
    "marian": (("MarianConfig", "MarianMTModel", ["k_proj", "v_proj"]), SEQ2SEQ, "is an encoder-decoder"),
    "gpt2": (("GPT2Config", "GPT2LMHeadModel", ["c_attn"]), dict(n_embd=32, n_layer=2, n_head=2, bos_token_id=1,
                                                                  eos_token_id=2),
             r"no self-attention layers ForkKV can split.*GPT2Attention\(c_attn, c_proj\)"),
    "opt": (("OPTConfig", "OPTForCausalLM", ["k_proj", "v_proj"]),
            dict(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2, word_embed_proj_dim=32),
            "takes no rotary position embeddings"),
    # hybrids: gated-delta-net (linear attention) layers with a full-attention layer every 4th; before the check the
    # error was "attention layer indices are not 0..0: [3]"
    "qwen3_5": (("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", ["k_proj", "v_proj"]), dict(HYBRID), HYBRID_REFUSED),
    "qwen3_next": (("Qwen3NextConfig", "Qwen3NextForCausalLM", ["k_proj", "v_proj"]),
                   dict(HYBRID, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4,
                        num_experts_per_tok=2), HYBRID_REFUSED),
    # MiniMax's lightning (linear) attention layers have a qkv_proj and a layer_idx, so every layer looked like
    # attention: the build failed inside transformers ("uses cache of its own")
    "minimax": (("MiniMaxConfig", "MiniMaxForCausalLM", ["k_proj", "v_proj"]),
                dict(HYBRID_BASE, head_dim=16, num_local_experts=4, num_experts_per_tok=2, block_size=8),
                r"some of its decoder layers without a self-attention ForkKV can split \(layer types linear_attention"),
}


def test_attention_sinks_are_refused_not_dropped():
    """GPT-OSS adds learned sinks to its softmax (``s_aux``): ForkKV's attention (and the SDPA it falls back to)
    computed without them, and generated other tokens than the model even where ForkKV is exact (V-only LoRA on the
    last layer). Refused at build, at enable, and by the attention itself for any model that passes ``s_aux``."""
    from forkkv_hf.attention import forkkv_attention_forward

    pm = _family("GptOssConfig", "GptOssForCausalLM", ["v_proj"], **HYBRID_BASE, head_dim=16, num_local_experts=2,
                 num_experts_per_tok=1, sliding_window=64, attn_implementation="eager")
    with pytest.raises(ValueError, match=r"GptOssAttention\) adds learned attention sinks.*Llama, Mistral"):
        SharedContext.build(pm, _ctx(8), ["agent"])
    with pytest.raises(ValueError, match="adds learned attention sinks"):
        forkkv_hf.enable_forkkv(pm)
    assert pm.get_base_model().config._attn_implementation == "eager"  # left as it was
    q = torch.randn(1, 4, 3, 16)
    with pytest.raises(ValueError, match=r"passes attention sinks \(s_aux\)"):
        forkkv_attention_forward(torch.nn.Linear(1, 1), q, q[:, :2], q[:, :2], None, s_aux=torch.zeros(4))


def test_rotary_embeddings_of_another_form_are_refused_clearly():
    """Llama 4 hands its attention one complex ``freqs_cis`` tensor, not ``(cos, sin)``: refused with what it got
    (before: "not enough values to unpack")."""
    pm = _family("Llama4TextConfig", "Llama4ForCausalLM", ["v_proj"], **HYBRID_BASE, head_dim=16, num_local_experts=2,
                 intermediate_size_mlp=128, interleave_moe_layer_step=1, attention_chunk_size=64)
    with pytest.raises(ValueError, match=r"position_embeddings of another form \(one torch.complex64 tensor"):
        SharedContext.build(pm, _ctx(8), ["agent"])


@parametrize("family", list(FAMILIES))
def test_unsupported_families_are_refused_clearly(family):
    (cfg_name, model_name, targets), cfg, message = FAMILIES[family]
    pm = _family(cfg_name, model_name, targets, **cfg)
    with pytest.raises(ValueError, match=message + ".*Llama, Mistral"):
        SharedContext.build(pm, _ctx(8), ["agent"])
    with pytest.raises(ValueError, match=message):
        forkkv_hf.enable_forkkv(pm)
    assert pm.get_base_model().config._attn_implementation != "forkkv"  # left as it was


def test_generate_of_the_model_inside_the_peft_model_runs_the_checks(exact_agents, monkeypatch):
    """``peft_model.get_base_model().generate`` with a ForkKV cache runs the checks of ``peft_model.generate`` (before,
    none: a used cache served new prompts over the old prompt's K/V, silently); the PeftModel's generate, which calls
    it, checks once; disable_forkkv removes both wrappers."""
    pm, ctx = exact_agents, _ctx()
    base = pm.get_base_model()
    pm.set_adapter("planner")
    one = batch_inputs(ctx, [torch.tensor([4, 5, 6, 7])], pad_token_id=0)
    two = batch_inputs(ctx, [torch.tensor([8, 9, 10, 11, 12, 13, 14])], pad_token_id=0)
    cache = ForkKVCache.from_context(pm, ctx, adapter_names=["planner"])
    out = base.generate(**one, max_new_tokens=3, do_sample=False, pad_token_id=0, **cache_kwargs(cache))
    assert torch.equal(out, plain_peft(pm, lambda: _gen(pm, one, ["planner"], max_new_tokens=3)))
    with pytest.raises(ValueError, match="do not continue them; call cache.reset"):
        base.generate(**two, max_new_tokens=3, do_sample=False, pad_token_id=0, **cache_kwargs(cache))
    calls = []
    checks = ForkKVCache.check_generate_inputs
    monkeypatch.setattr(ForkKVCache, "check_generate_inputs", lambda self, *a: calls.append(1) or checks(self, *a))
    _gen(pm, two, ["planner"], ForkKVCache.from_context(pm, ctx, adapter_names=["planner"]))
    assert calls == [1]
    forkkv_hf.disable_forkkv(pm)
    try:
        assert "generate" not in base.__dict__ and "generate" not in pm.__dict__
    finally:
        forkkv_hf.enable_forkkv(pm)


def test_image_tokens_belong_in_the_prompts():
    """Gemma 3 with vision: images in the prompts equal plain PEFT; image placeholders in the shared context are
    refused at build (its pass runs on ids alone: transformers failed inside, image features and tokens mismatched)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=64,
                max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=299,
                       boi_token_index=297, eoi_token_index=298)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    pm = with_adapters(Gemma3ForConditionalGeneration(cfg).eval(),
                       {"planner": dict(r=4, target_modules=r".*language_model.*layers\.1\.self_attn\.v_proj")})
    forkkv_hf.enable_forkkv(pm)
    ctx, names, image = _ctx(12, high=200), ["planner", "__base__"], [297] + [299] * 4 + [298]
    inputs = batch_inputs(ctx, [torch.tensor([5, 6] + image + [7]), torch.tensor(image + [9])], pad_token_id=0)
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    got = _gen(pm, inputs, names, _fork(pm, ctx, names), pixel_values=pixels)
    assert torch.equal(got, plain_peft(pm, lambda: _gen(pm, inputs, names, pixel_values=pixels)))
    with pytest.raises(ValueError, match="the context holds image placeholder tokens \\(image_token_id=299\\)"):
        SharedContext.build(pm, torch.cat([ctx[:4], torch.tensor(image), ctx[4:]]), names[:1], progress=False)


def test_the_forkkv_attention_without_enable_forkkv_is_refused():
    """The "forkkv" attention selected by hand (``register_forkkv()`` and the model's own
    ``set_attn_implementation("forkkv")``, or ``attn_implementation="forkkv"``) without ``enable_forkkv``: none of
    its hooks ran, so every input check was skipped (found by an audit: rows that do not start with the shared
    context were served, silently). Generate and direct forwards are refused now, saying to call enable_forkkv."""
    forkkv_hf.register_forkkv()
    model = tiny_llama(layers=3, seed=7)
    model.set_attn_implementation("forkkv")
    pm = with_adapters(model, {"planner": dict(r=4, **KV_LAST), "coder": dict(r=2, **KV_LAST)}, seed=7)
    names, ctx = ["planner", "coder"], _ctx()
    shared = SharedContext.build(pm, ctx, names, progress=False)
    other = batch_inputs(_ctx(seed=99), [torch.tensor([4, 5, 6]), torch.tensor([7])], pad_token_id=0)
    refused = r"selected without enable_forkkv\); call forkkv_hf.enable_forkkv\(model\)"
    with pytest.raises(ValueError, match=refused):
        _gen(pm, other, names, shared.fork(names))
    with pytest.raises(ValueError, match=refused), torch.no_grad():
        pm(input_ids=torch.tensor([[4, 5], [6, 7]]), adapter_names=names, **cache_kwargs(shared.fork(names)))
