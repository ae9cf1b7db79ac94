"""``inputs_embeds``, ``inputs=`` and ``output_attentions`` with a ForkKV cache (an audit found each unchecked): the
shared context's K/V come from its token ids, so embeddings of the caller's own are taken after it only; a direct
forward given embeddings gets the checks one given ids gets; a cache filled through embeddings continues; attention
weights, which ForkKV's attention does not compute, are refused rather than returned empty. Agents with LoRA on the
last layer's K/V only: ForkKV is exact for them, so plain PEFT is the reference."""

import pytest
import torch
from transformers import DynamicCache

import forkkv_hf
from forkkv_hf import ForkKVCache, batch_inputs, cache_kwargs
from models import plain_peft, tiny_llama, with_adapters

KV_LAST = dict(target_modules=["k_proj", "v_proj"], layers_to_transform=[2])
T = 18
CTX = torch.randint(3, 128, (T,), generator=torch.Generator().manual_seed(5))
NAMES = ["planner", "coder"]
GEN = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_scores=True)


@pytest.fixture(scope="module")
def pm():
    agents = {"planner": dict(r=4, **KV_LAST), "coder": dict(r=2, **KV_LAST)}
    model = with_adapters(tiny_llama(layers=3, seed=7), agents, seed=7)
    return forkkv_hf.enable_forkkv(model)


def _inputs():
    return batch_inputs(CTX, [torch.tensor([40, 41, 42, 43]), torch.tensor([50, 51])], pad_token_id=0)


def _emb(pm, ids):
    with torch.no_grad():
        return pm.get_base_model().get_input_embeddings()(ids)


def _same(a, b):
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def test_generate_takes_own_embeddings_after_the_context_and_refuses_them_inside(pm):
    inp = _inputs()
    e = _emb(pm, inp["input_ids"]).clone()
    e[:, T:] = e[:, T:] * 3 + 0.5  # a soft prompt of the caller's own, after the context
    kw = dict(inp, inputs_embeds=e, adapter_names=NAMES, **GEN)
    _same(pm.generate(**kw, **cache_kwargs(ForkKVCache.from_context(pm, CTX, NAMES))),
          plain_peft(pm, lambda: pm.generate(**kw)))
    e[:, 2:6] = 0.25  # inside the context: plain PEFT reads them, the cache holds the ids' K/V (served silently before)
    with pytest.raises(ValueError, match="inputs_embeds differ .* first 18 tokens"):
        pm.generate(**dict(kw, inputs_embeds=e), **cache_kwargs(ForkKVCache.from_context(pm, CTX, NAMES)))


def test_a_cache_filled_through_embeddings_continues(pm):
    """The prefill of a generate given inputs_embeds records its tokens from the call's input_ids (before, only the
    decode steps' were recorded and the next turn was refused as not continuing the cache)."""
    inp = _inputs()

    def turns(cache):
        one = pm.generate(**inp, inputs_embeds=_emb(pm, inp["input_ids"]), adapter_names=NAMES, **GEN,
                          **cache_kwargs(cache))
        ids = torch.cat([one.sequences, torch.full((2, 2), 9)], 1)
        mask = torch.cat([inp["attention_mask"], torch.ones(2, ids.shape[1] - inp["attention_mask"].shape[1],
                                                             dtype=torch.long)], 1)
        return pm.generate(input_ids=ids, attention_mask=mask, adapter_names=NAMES, **GEN, **cache_kwargs(cache))

    _same(turns(ForkKVCache.from_context(pm, CTX, NAMES)), plain_peft(pm, lambda: turns(DynamicCache())))


def test_a_forward_given_embeddings_gets_the_checks_of_one_given_ids(pm):
    inp = _inputs()
    ids, mask = inp["input_ids"], inp["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    new = dict(inputs_embeds=_emb(pm, ids[:, T:]), position_ids=pos[:, T:], adapter_names=NAMES)
    with torch.no_grad():
        want = plain_peft(pm, lambda: pm(input_ids=ids, attention_mask=mask, position_ids=pos, adapter_names=NAMES).logits)
        got = pm(**new, attention_mask=mask, **cache_kwargs(ForkKVCache.from_context(pm, CTX, NAMES))).logits
        torch.testing.assert_close(got, want[:, T:], rtol=1e-4, atol=1e-4)
        hidden = mask.clone()
        hidden[1, 3] = 0  # hides a context token from row 1 (accepted and served wrong before)
        with pytest.raises(ValueError, match="hides token 3 of the 18-token shared context in row 1"):
            pm(**new, attention_mask=hidden, **cache_kwargs(ForkKVCache.from_context(pm, CTX, NAMES)))
        with pytest.raises(ValueError, match=r"must be \[2, 40\]"):  # whole rows as embeddings, with their mask
            pm(inputs_embeds=_emb(pm, ids), attention_mask=mask, adapter_names=NAMES,
               **cache_kwargs(ForkKVCache.from_context(pm, CTX, NAMES)))
        with pytest.raises(ValueError, match="start with the embeddings of the 18-token shared context"):
            pm(inputs_embeds=_emb(pm, ids), adapter_names=NAMES,
               **cache_kwargs(ForkKVCache.from_context(pm, CTX, NAMES)))
        with pytest.raises(ValueError, match="positions below 18"):
            pm(**dict(new, position_ids=pos[:, T:] - 5), attention_mask=mask,
               **cache_kwargs(ForkKVCache.from_context(pm, CTX, NAMES)))


def test_generate_takes_inputs_and_refuses_attention_weights(pm):
    inp = _inputs()
    kw = dict(attention_mask=inp["attention_mask"], adapter_names=NAMES, **GEN)
    _same(pm.generate(inputs=inp["input_ids"], **kw, **cache_kwargs(ForkKVCache.from_context(pm, CTX, NAMES))),
          plain_peft(pm, lambda: pm.generate(input_ids=inp["input_ids"], **kw)))
    with pytest.raises(ValueError, match="computes no attention weights"):
        pm.generate(input_ids=inp["input_ids"], output_attentions=True, **kw,
                    **cache_kwargs(ForkKVCache.from_context(pm, CTX, NAMES)))
    with pytest.raises(ValueError, match="computes no attention weights"), torch.no_grad():
        pm(input_ids=inp["input_ids"][:, T:], attention_mask=inp["attention_mask"], output_attentions=True,
           adapter_names=NAMES, **cache_kwargs(ForkKVCache.from_context(pm, CTX, NAMES)))
