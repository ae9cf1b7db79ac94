"""Misuse is refused before it can be silently wrong, and never corrupts a shared base other caches read;
Activated LoRA agents share the context exactly; the cache API matches a materialised DynamicCache under random
sequences of operations."""

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

import forkkv_hf
from forkkv_hf import ForkKVCache, SharedContext, batch_inputs, cache_kwargs
from forkkv_hf.ops.naive import materialize_kv
from cases import parametrize
from models import plain_peft, tiny_llama, with_adapters

ALL = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def agents():
    pm = with_adapters(tiny_llama(layers=2, seed=21), {"planner": dict(r=4, target_modules=ALL),
                                                       "coder": dict(r=2, target_modules=ALL)}, seed=21)
    return forkkv_hf.enable_forkkv(pm)


def _ctx(T=15, seed=3):
    return torch.randint(3, 128, (T,), generator=torch.Generator().manual_seed(seed))


def _gen(pm, inputs, names, cache, **kw):
    kw.setdefault("max_new_tokens", 4)
    return pm.generate(**inputs, adapter_names=names, do_sample=False, pad_token_id=0, **cache_kwargs(cache), **kw)


# ------------------------------------------------------------------------------------------ generate-time checks
def test_inputs_must_start_with_the_shared_context(agents):
    ctx = _ctx()
    cache = ForkKVCache.from_context(agents, ctx, adapter_names=["planner"])
    other = ctx.clone()
    other[3] += 1
    with pytest.raises(ValueError, match="do not start with the 15-token shared context"):
        _gen(agents, batch_inputs(other, [torch.tensor([4, 5])]), ["planner"], cache)
    with pytest.raises(ValueError, match="pass the whole rows"):  # tail-only input_ids: HF would silently misplace them
        _gen(agents, {"input_ids": torch.tensor([[4, 5]])}, ["planner"], cache)


def test_reuse_needs_reset_but_continuation_works(agents):
    ctx = _ctx()
    names = ["planner", "coder"]
    cache = ForkKVCache.from_context(agents, ctx, adapter_names=names)
    inputs = batch_inputs(ctx, [torch.tensor([4, 5]), torch.tensor([6])], pad_token_id=0)
    first = _gen(agents, inputs, names, cache)
    with pytest.raises(ValueError, match="call cache.reset"):  # other prompts on a used cache
        _gen(agents, batch_inputs(ctx, [torch.tensor([7, 8]), torch.tensor([9])], pad_token_id=0), names, cache)
    # a continuation of the same rows (previous output + new tokens) equals generating it from a fresh fork
    cont = torch.cat([first, torch.tensor([[11], [12]])], dim=1)
    inputs2 = {"input_ids": cont, "attention_mask": torch.cat([inputs["attention_mask"],
                                                               torch.ones(2, cont.shape[1] - 17, dtype=torch.long)], 1)}
    a = _gen(agents, inputs2, names, cache)
    b = _gen(agents, inputs2, names, ForkKVCache.from_context(agents, ctx, adapter_names=names))
    assert torch.equal(a, b)
    cache.reset()
    again = _gen(agents, inputs, names, cache)
    assert torch.equal(again, first)


def test_use_cache_false_and_static_cache_refused(agents):
    ctx = _ctx()
    inputs = batch_inputs(ctx, [torch.tensor([4, 5])])
    cache = ForkKVCache.from_context(agents, ctx, adapter_names=["planner"])
    with pytest.raises(ValueError, match="use_cache=True"):
        _gen(agents, inputs, ["planner"], cache, use_cache=False)
    with pytest.raises(ValueError, match="cache_implementation='static'"):
        _gen(agents, inputs, ["planner"], cache, cache_implementation="static")


@parametrize("draft", [{"prompt_lookup_num_tokens": 3}, {"assistant_early_exit": 1}])
def test_assisted_decoding_with_hidden_states_refused(agents, draft):
    """Assisted, prompt-lookup and early-exit decoding with ``output_hidden_states=True`` failed deep inside
    transformers (its first step's hidden states split along the whole rows the cache cuts; an audit's finding):
    refused before anything runs, saying what to drop."""
    ctx = _ctx()
    cache = ForkKVCache.from_context(agents, ctx, adapter_names=["planner"])
    with pytest.raises(ValueError, match="output_hidden_states=True with assisted, prompt-lookup or early-exit .*drop "
                                         "output_hidden_states, or drop assistant_model"):
        _gen(agents, batch_inputs(ctx, [ctx[:5]]), ["planner"], cache, output_hidden_states=True,
             return_dict_in_generate=True, **draft)
    assert cache.get_seq_length() == 15
    # without return_dict_in_generate transformers collects none (it warns): runs as plain PEFT does (it was refused,
    # a second audit's finding)
    _gen(agents, batch_inputs(ctx, [ctx[:5]]), ["planner"], cache, output_hidden_states=True, **draft)


def test_new_tokens_that_begin_with_the_context_are_not_taken_for_whole_rows(agents):
    """A direct forward of new tokens that repeat the shared context, without mask or positions (as with a
    DynamicCache), was taken for whole rows and cut to its tail, silently (0.06-0.12 off; an audit's finding): ids
    that could be either are refused, saying how to tell; told by position_ids or a mask of cached + new tokens,
    they equal the base model's run, and whole rows told by their mask are still cut."""
    ctx = _ctx(4, seed=9)
    new = torch.cat([ctx, torch.tensor([9, 11])])[None]
    names = ["__base__"]
    shared = SharedContext.build(agents, ctx, [], progress=False)

    def base_run(ids):
        with agents.disable_adapter():
            return agents(input_ids=ids).logits

    with torch.no_grad():
        want = plain_peft(agents, lambda: base_run(torch.cat([ctx[None], new], 1)))[:, 4:]
        cache = shared.fork(names)
        refused = (r"input_ids hold whole rows \(6 tokens\) or new tokens .* new tokens: pass their position_ids "
                   r"\(4 and up\) or an attention_mask of 10 columns")
        with pytest.raises(ValueError, match=refused):
            agents(input_ids=new, adapter_names=names, logits_to_keep=1, **cache_kwargs(cache))
        assert cache.get_seq_length() == 4
        told_new = ({"position_ids": torch.arange(4, 10)[None]},
                    {"attention_mask": torch.ones(1, 10, dtype=torch.long)})
        for told in told_new:
            got = agents(input_ids=new, adapter_names=names, **told, **cache_kwargs(shared.fork(names))).logits
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        whole = agents(input_ids=new, attention_mask=torch.ones(1, 6, dtype=torch.long), adapter_names=names,
                       logits_to_keep=1, **cache_kwargs(shared.fork(names))).logits
        want = plain_peft(agents, lambda: base_run(new))[:, -1]
        torch.testing.assert_close(whole[:, -1], want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_torch_compile_keeps_the_result():
    """A compiled decoder graph-breaks around ForkKV attention (its cache hands over a view object) and gives the
    same tokens: compiling is not refused, and is not silently wrong."""
    pm = forkkv_hf.enable_forkkv(with_adapters(tiny_llama(layers=2, seed=23), {"planner": dict(r=4)}, seed=23))
    ctx = _ctx()
    inputs = batch_inputs(ctx, [torch.tensor([4, 5])])
    eager = _gen(pm, inputs, ["planner"], ForkKVCache.from_context(pm, ctx, adapter_names=["planner"]))
    decoder = pm.get_base_model().model
    decoder.forward = torch.compile(decoder.forward, backend="eager")
    seen = getattr(torch._dynamo.utils, "warn_once_cache", set())  # Dynamo warns once per message and process
    seen -= {m for m in seen if "lru_cache" in m}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled = _gen(pm, inputs, ["planner"], ForkKVCache.from_context(pm, ctx, adapter_names=["planner"]))
    finally:
        del decoder.forward
    assert torch.equal(eager, compiled)
    # our memo tables are traced through without Dynamo's lru_cache warning (forkkv_hf/memo.py)
    assert [str(w.message)[:120] for w in caught if "lru_cache" in str(w.message)] == []


@pytest.mark.slow
def test_a_compiled_model_still_refuses_rows_run_by_other_adapters():
    """A model its user compiled (so the cache's checks run traced, with no eager prefill of ``generate`` before
    them) still refuses a forward whose rows run other adapters than the cache's: here the transformers model called
    directly, its active adapter on every row (this ran silently before)."""
    pm = forkkv_hf.enable_forkkv(with_adapters(tiny_llama(layers=2, seed=23), {"planner": dict(r=4)}, seed=23))
    ctx = _ctx()
    inputs = batch_inputs(ctx, [torch.tensor([4, 5]), torch.tensor([6])], pad_token_id=0)
    T, ids, m2 = ctx.numel(), inputs["input_ids"], inputs["attention_mask"]
    cache = ForkKVCache.from_context(pm, ctx, adapter_names=["planner", "__base__"])
    compiled = torch.compile(pm.get_base_model(), backend="eager")
    with torch.no_grad(), pytest.raises(ValueError, match="forked for"):
        compiled(input_ids=ids[:, T:], attention_mask=m2, position_ids=(m2.cumsum(-1) - 1).clamp(min=0)[:, T:],
                 **cache_kwargs(cache))


def test_cache_of_another_model_refused(agents):
    ctx = _ctx()
    cache = ForkKVCache.from_context(agents, ctx, adapter_names=["planner"])
    twin = forkkv_hf.enable_forkkv(with_adapters(tiny_llama(layers=2, seed=21), {"planner": dict(r=4)}, seed=21))
    with pytest.raises(ValueError, match="built for another model instance"):
        _gen(twin, batch_inputs(ctx, [torch.tensor([4, 5])]), ["planner"], cache)


def test_misuse_never_corrupts_the_shared_base(agents):
    ctx = _ctx()
    shared = SharedContext.build(agents, ctx, ["planner", "coder"])
    snapshot = [(l.key.clone(), l.value.clone(), l.k_res.u.clone(), l.v_res.u.clone()) for l in shared.layers]
    inputs = batch_inputs(ctx, [torch.tensor([4, 5]), torch.tensor([6])], pad_token_id=0)
    reference = _gen(agents, inputs, ["planner", "coder"], shared.fork(["planner", "coder"]))
    bad = shared.fork(["planner", "coder"])
    for attempt in (
        lambda: _gen(agents, inputs, ["coder", "planner"], bad),  # wrong rows
        lambda: _gen(agents, batch_inputs(ctx, [torch.tensor([4])] * 3), ["planner"] * 3, bad),  # wrong batch
        lambda: _gen(agents, inputs, ["planner", "coder"], bad, use_cache=False),
    ):
        with pytest.raises((ValueError, TypeError)):
            attempt()
        bad.reset()
    for (k, v, uk, uv), l in zip(snapshot, shared.layers):
        assert torch.equal(k, l.key) and torch.equal(v, l.value)
        assert torch.equal(uk, l.k_res.u) and torch.equal(uv, l.v_res.u)
    assert torch.equal(_gen(agents, inputs, ["planner", "coder"], shared.fork(["planner", "coder"])), reference)


# ------------------------------------------------------------------------------------------ Activated LoRA
INVOCATION = [7, 8, 9]


def _alora_agent():
    """A PeftModel with one Activated LoRA agent, "checker" (on every layer's q/k/v/o, invoked by ``INVOCATION``)."""
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(layers=3, seed=31)
    torch.manual_seed(31)
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=ALL, alora_invocation_tokens=INVOCATION,
                                          task_type="CAUSAL_LM", init_lora_weights=False), adapter_name="checker")
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(8)
    return pm.eval()


def test_activated_lora_is_exact():
    """An aLoRA agent is inactive over the shared context: the base K/V are its own exactly, no residual needed,
    and ForkKV equals the per-agent run exactly, even with aLoRA on every layer's q/k/v/o."""
    invocation = INVOCATION
    pm = _alora_agent()
    ctx = _ctx(17)
    ctx[ctx == 7] = 6  # no invocation inside the context
    names = ["checker", "__base__", "checker"]
    prompts = [torch.tensor(invocation + [11, 12]), torch.tensor([5, 6]), torch.tensor([13] + invocation)]
    inputs = batch_inputs(ctx, prompts, pad_token_id=0)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    exact = pm.generate(**inputs, adapter_names=names, **kw)
    forkkv_hf.enable_forkkv(pm)
    shared = SharedContext.build(pm, ctx, ["checker"])
    assert all(l.k_res is None and l.v_res is None for l in shared.layers)  # nothing stored for it
    out = pm.generate(**inputs, adapter_names=names, **kw, **cache_kwargs(shared.fork(names)))
    assert torch.equal(out.sequences, exact.sequences)
    for a, b in zip(out.scores, exact.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # the adapter does act (not a test that cannot fail)
    base_rows = ["__base__"] * 3
    base_out = pm.generate(**inputs, adapter_names=base_rows, **kw, **cache_kwargs(shared.fork(base_rows)))
    assert not torch.equal(base_out.sequences[0], out.sequences[0])
    # an invocation inside the shared context would switch the adapter on over part of it: refused
    ctx2 = torch.cat([ctx[:5], torch.tensor(invocation), ctx[5:]])
    shared2 = SharedContext.build(pm, ctx2, ["checker"])
    with pytest.raises(ValueError, match="inside the 20-token shared context"):
        pm.generate(**batch_inputs(ctx2, [torch.tensor([11, 12])]), adapter_names=["checker"], **kw,
                    **cache_kwargs(shared2.fork(["checker"])))


def test_activated_lora_invoked_inside_the_context_is_refused_without_names_and_in_direct_forwards():
    """An aLoRA agent invoked inside the shared context was refused only by a generate given ``adapter_names``: run
    as the active adapter (no names) or through a direct forward it was served, 0.6-0.9 off its own run (audit
    findings). Both are refused now; a direct forward is checked over context + the tokens the cache recorded + the
    new tokens, so an invocation in an earlier forward's prompt still counts, and a served forward is exact."""
    pm = _alora_agent()
    ctx = _ctx(17)
    ctx = torch.cat([ctx[:5], torch.tensor(INVOCATION), ctx[5:]])  # invocation inside the context
    ctx[(ctx == 7) & (torch.arange(20) != 5)] = 6  # (only there)
    prompt, invoked = torch.tensor([11, 12, 13]), torch.tensor([11] + INVOCATION + [12])
    whole = torch.cat([ctx, invoked])[None]
    with torch.no_grad():
        exact = pm(input_ids=whole, adapter_names=["checker"]).logits[:, 20:]
    forkkv_hf.enable_forkkv(pm)
    shared = SharedContext.build(pm, ctx, ["checker"], progress=False)
    refused = "row 0 \\('checker', Activated LoRA\\): its invocation sequence starts at token 5, inside the 20-token"
    with pytest.raises(ValueError, match=refused):  # the active adapter, no adapter_names
        pm.generate(**batch_inputs(ctx, [prompt]), max_new_tokens=2, pad_token_id=0,
                    **cache_kwargs(shared.fork(["checker"])))
    rows = batch_inputs(ctx, [prompt])
    direct = [{"input_ids": prompt[None], "attention_mask": torch.ones(1, 23, dtype=torch.long)},
              {**rows, "logits_to_keep": 1}]
    with torch.no_grad():
        for kwargs in direct:
            for names in ({"adapter_names": ["checker"]}, {}):
                cache = shared.fork(["checker"])
                with pytest.raises(ValueError, match=refused):
                    pm(**kwargs, **names, **cache_kwargs(cache))
                assert cache.get_seq_length() == 20
        cache = shared.fork(["checker"])  # invoked in the prompt: served, exact
        got = pm(input_ids=invoked[None], attention_mask=torch.ones(1, 25, dtype=torch.long),
                 adapter_names=["checker"], **cache_kwargs(cache)).logits
        torch.testing.assert_close(got, exact, rtol=1e-4, atol=1e-4)
        pm(input_ids=torch.tensor([[14]]), attention_mask=torch.ones(1, 26, dtype=torch.long),
           adapter_names=["checker"], **cache_kwargs(cache))  # the invocation the cache recorded counts: served
        assert cache.get_seq_length() == 26


# ------------------------------------------------------------------------------------------ cache API property test
@pytest.fixture(scope="module")
def one_layer_context():
    """A 9-token shared context of a one-layer model (2 KV heads of 16) with two agents: what the property test
    forks, once for all its examples."""
    pm = forkkv_hf.enable_forkkv(with_adapters(tiny_llama(layers=1, seed=25), {"planner": dict(r=4),
                                                                               "coder": dict(r=2)}, seed=25))
    return SharedContext.build(pm, _ctx(9, seed=25), ["planner", "coder"], progress=False)


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("update"), st.integers(1, 3)),
        st.tuples(st.just("reorder"), st.permutations([0, 1, 2])),
        st.tuples(st.just("repeat"), st.integers(1, 2)),
        st.tuples(st.just("select"), st.integers(0, 7)),
        st.tuples(st.just("crop"), st.integers(1, 2)),
        st.tuples(st.just("reset"), st.just(0)),
    ),
    min_size=1,
    max_size=10,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, seed=st.integers(0, 10_000))
def test_cache_api_matches_materialised_dynamic_cache(one_layer_context, ops, seed):
    """Random update/reorder/repeat/select/crop/reset sequences on a fork (through the Cache API ``generate`` uses):
    the ForkKV rows, materialised, always equal a DynamicCache that was given the same rows' full K/V and the same
    operations. Each sequence starts and ends with an update, so that every operation's effect is compared."""
    shared = one_layer_context
    fork = shared.fork(["planner", "coder", "__base__"])
    T = shared.layers[0].key.shape[-2]
    g = torch.Generator().manual_seed(seed)
    ref = None
    rows = 3
    for op, arg in [("update", 2), *ops, ("update", 1)]:
        if op == "update":
            k = torch.randn(rows, 2, arg, 16, generator=g)
            v = torch.randn(rows, 2, arg, 16, generator=g)
            view, _ = fork.update(k, v, 0)
            if ref is None:  # the reference starts from the materialised shared part of each row
                K0, V0 = materialize_kv(view)
                ref = DynamicCache()
                ref.update(K0[:, :, :T], V0[:, :, :T], 0)
            ref.update(k.float(), v.float(), 0)
            K, V = materialize_kv(view)
            torch.testing.assert_close(K, ref.layers[0].keys)
            torch.testing.assert_close(V, ref.layers[0].values)
        elif ref is None:
            continue  # nothing private yet: the other operations have nothing to act on
        elif op == "reorder":
            idx = torch.tensor([arg[i % 3] % rows for i in range(rows)])
            fork.reorder_cache(idx)
            ref.reorder_cache(idx)
        elif op == "repeat":
            fork.batch_repeat_interleave(arg)
            ref.batch_repeat_interleave(arg)
            rows *= arg
        elif op == "select":
            keep = [i for i in range(rows) if (arg >> (i % 3)) & 1] or [0]
            idx = torch.tensor(keep)
            fork.batch_select_indices(idx)
            ref.batch_select_indices(idx)
            rows = len(keep)
        elif op == "crop":
            n = min(arg, fork.get_seq_length() - T)
            if n:
                fork.crop(-n)
                ref.crop(-n)
        elif op == "reset":
            fork.reset()
            ref, rows = None, 3
        assert fork.get_seq_length() == (T if ref is None else ref.get_seq_length())


# ------------------------------------------------------------------------------------------ adapters after the fact
def test_adapters_added_after_the_context_was_built():
    from peft import LoraConfig

    pm = with_adapters(tiny_llama(layers=2, seed=41), {"planner": dict(r=4, target_modules=ALL)}, seed=41)
    forkkv_hf.enable_forkkv(pm)
    ctx = _ctx(13)
    shared = SharedContext.build(pm, ctx, ["planner"])
    early = shared.fork(["planner"])
    pm.add_adapter("late", LoraConfig(r=6, lora_alpha=12, target_modules=["k_proj", "v_proj"],
                                      init_lora_weights=False))
    pm.eval()
    with pytest.raises(ValueError, match=r"shared.add_adapters\(model, \['late'\]\)"):
        shared.fork(["late"])
    shared.add_adapters(pm, ["late"])
    names = ["late", "planner"]
    inputs = batch_inputs(ctx, [torch.tensor([4, 5]), torch.tensor([6, 7])], pad_token_id=0)
    a = _gen(pm, inputs, names, shared.fork(names))
    b = _gen(pm, inputs, names, SharedContext.build(pm, ctx, names).fork(names))
    assert torch.equal(a, b)
    # a cache forked before the addition still reads its own residuals
    one = batch_inputs(ctx, [torch.tensor([4, 5])])
    assert torch.equal(_gen(pm, one, ["planner"], early), _gen(pm, one, ["planner"], shared.fork(["planner"])))


def test_changed_adapter_is_refused():
    pm = forkkv_hf.enable_forkkv(with_adapters(tiny_llama(layers=2, seed=42), {"planner": dict(r=4)}, seed=42))
    ctx = _ctx(11)
    shared = SharedContext.build(pm, ctx, ["planner"])
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "v_proj.lora_B.planner" in n:
                p.add_(0.5)
    with pytest.raises(ValueError, match="adapter 'planner' changed since this shared context"):
        _gen(pm, batch_inputs(ctx, [torch.tensor([4, 5])]), ["planner"], shared.fork(["planner"]))
