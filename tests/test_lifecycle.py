"""A model, context and cache through their lifecycle: copies, pickles, failed calls, the wrong model handed in.
Each test here failed before its fix (found by an audit, 2026-12-07): the results were silently wrong."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from peft import LoraConfig

import forkkv_hf
from forkkv_hf import ForkKVCache, SharedContext, StaleContextError, batch_inputs, cache_kwargs
from cases import parametrize
from models import tiny_llama, with_adapters
from test_generate import ALL, _assert_same, _context, _gen, _prompts

NAMES = ["planner", "coder"]


def _agents(seed=1):
    pm = with_adapters(tiny_llama(layers=2, seed=seed), {"planner": dict(r=4, target_modules=ALL),
                                                         "coder": dict(r=2, target_modules=ALL)}, seed=seed)
    return forkkv_hf.enable_forkkv(pm)


def _built(prompt_lengths):
    """Two agents, a 10-token context built for them, and rows of prompts of these lengths."""
    pm = _agents()
    ctx = _context(10)
    return pm, ctx, SharedContext.build(pm, ctx, NAMES, progress=False), batch_inputs(
        ctx, _prompts(prompt_lengths), pad_token_id=0)


def test_a_copied_or_pickled_model_runs_itself():
    """The wrappers ``enable_forkkv`` installs belong to their model: a deep copy's (and a pickle's) forward and
    generate run the copy (before: the original's, whatever the copy's weights; a pickle failed)."""
    pm = _agents()
    ctx = _context(12)
    inputs = batch_inputs(ctx, _prompts([3, 2]), pad_token_id=0)
    clone = copy.deepcopy(pm)
    with torch.no_grad():
        clone.get_base_model().lm_head.weight.mul_(-1.0)
        ids = inputs["input_ids"]
        own = type(clone).forward(clone, input_ids=ids, adapter_names=NAMES).logits
        torch.testing.assert_close(clone(input_ids=ids, adapter_names=NAMES).logits, own)
        assert (own - pm(input_ids=ids, adapter_names=NAMES).logits).abs().max() > 0.1
    out = _gen(clone, inputs, NAMES, ForkKVCache.from_context(clone, ctx, adapter_names=NAMES))
    forkkv_hf.disable_forkkv(clone)
    forkkv_hf.enable_forkkv(clone)
    _assert_same(out, _gen(clone, inputs, NAMES, ForkKVCache.from_context(clone, ctx, adapter_names=NAMES)))
    buf = io.BytesIO()
    torch.save(pm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    _assert_same(_gen(loaded, inputs, NAMES, ForkKVCache.from_context(loaded, ctx, adapter_names=NAMES)),
                 _gen(pm, inputs, NAMES, ForkKVCache.from_context(pm, ctx, adapter_names=NAMES)))


def test_a_failed_call_leaves_the_cache_as_it_was():
    """A generate refused inside its first forward (rows swapped against the fork, found at layer 0's attention after
    that layer appended) leaves the cache as before the call, so the next call is served right (before: layer 0 kept
    the wrong agents' K/V and the next call extended them, silently); a direct forward that fails the same way is
    undone at the cache's next use (it was refused as half-written, and where the refusing layer was the last one,
    with every layer holding the refused tokens, served 0.4 off, silently)."""
    pm, ctx, shared, inputs = _built([3, 3])
    cache = shared.fork(NAMES)
    with pytest.raises(ValueError, match="rows were forked for"):
        _gen(pm, inputs, NAMES[::-1], cache)
    assert [layer.private_length() for layer in cache.layers] == [0, 0]
    _assert_same(_gen(pm, inputs, NAMES, cache), _gen(pm, inputs, NAMES, shared.fork(NAMES)))

    cache = shared.fork(NAMES)
    new = inputs["input_ids"][:, ctx.numel():]
    with pytest.raises(ValueError, match="rows were forked for"), torch.no_grad():
        pm(input_ids=new, adapter_names=NAMES[::-1], **cache_kwargs(cache))
    assert [layer.private_length() for layer in cache.layers] == [3, 0]
    _assert_same(_gen(pm, inputs, NAMES, cache), _gen(pm, inputs, NAMES, shared.fork(NAMES)))
    cache = shared.fork(NAMES)
    with pytest.raises(ValueError, match="rows were forked for"), torch.no_grad():
        pm(input_ids=new, adapter_names=NAMES[::-1], **cache_kwargs(cache))
    with torch.no_grad():
        got = pm(input_ids=new, adapter_names=NAMES, **cache_kwargs(cache)).logits
        want = pm(input_ids=new, adapter_names=NAMES, **cache_kwargs(shared.fork(NAMES))).logits
    torch.testing.assert_close(got, want)
    assert [layer.private_length() for layer in cache.layers] == [3, 3]
    cache.layers[1].keys = cache.layers[1].keys[..., :2, :]  # a half-written cache no mark explains is refused
    with pytest.raises(ValueError, match="half-written"):
        _gen(pm, inputs, NAMES, cache)


def test_a_direct_forward_refused_at_the_last_layer_is_undone():
    """K/V LoRA on the last layer only (ForkKV exact): a direct forward with the rows' adapters swapped is refused at
    that layer after every layer appended, so no half-written check could see it, and the retry was served over
    the refused tokens (0.4 off)."""
    kv_last = dict(target_modules=["k_proj", "v_proj"], layers_to_transform=[1])
    pm = forkkv_hf.enable_forkkv(with_adapters(tiny_llama(layers=2, seed=4), {"planner": dict(r=4, **kv_last),
                                                                            "coder": dict(r=2, **kv_last)}, seed=4))
    ctx = _context(10)
    shared = SharedContext.build(pm, ctx, NAMES, progress=False)
    new = batch_inputs(ctx, _prompts([3, 3]), pad_token_id=0)["input_ids"][:, ctx.numel():]
    cache = shared.fork(NAMES)
    with pytest.raises(ValueError, match="rows were forked for"), torch.no_grad():
        pm(input_ids=new, adapter_names=NAMES[::-1], **cache_kwargs(cache))
    assert [layer.private_length() for layer in cache.layers] == [3, 3]
    with torch.no_grad():
        got = pm(input_ids=new, adapter_names=NAMES, **cache_kwargs(cache)).logits
        want = pm(input_ids=new, adapter_names=NAMES, **cache_kwargs(shared.fork(NAMES))).logits
    torch.testing.assert_close(got, want)
    assert cache.get_seq_length() == ctx.numel() + 3


def test_a_failed_call_that_expanded_the_rows_leaves_the_cache_as_forked():
    """``num_return_sequences=2`` with the names in the wrong order (``names * 2``) is refused at a layer after
    generate expanded the cache's rows; the roll back left the expanded rows and the earlier layers' K/V of the wrong
    agents (rows 1 and 2 swapped), and a next call with the right names extended them (scores 0.7 off, silently).
    Now the cache goes back to its forked rows. A failed call that reorders rows holding tokens is refused next."""
    pm, ctx, shared, inputs = _built([3, 2])
    cache = shared.fork(NAMES)
    with pytest.raises(ValueError, match="rows were forked for"):
        _gen(pm, inputs, NAMES * 2, cache, do_sample=True, num_return_sequences=2)
    assert cache.adapter_names == NAMES and all(layer.private_length() == 0 for layer in cache.layers)
    right = [n for n in NAMES for _ in range(2)]
    torch.manual_seed(0)
    got = _gen(pm, inputs, right, cache, do_sample=True, num_return_sequences=2)
    torch.manual_seed(0)
    _assert_same(got, _gen(pm, inputs, right, shared.fork(NAMES), do_sample=True, num_return_sequences=2))
    cache.layers[0].rows = cache.layers[0].rows[::-1]  # as a failed beam step's reorder would leave them
    cache.roll_back(((tuple(right),) * len(cache.layers), 3))
    with pytest.raises(ValueError, match="changed this ForkKVCache's rows"):
        cache.check_whole()
    cache.reset()
    cache.check_whole()


def test_a_copied_used_cache_is_checked_against_the_model_it_meets():
    """A cache that holds private tokens, copied or pickled, is bound to a model by its first forward's weight check
    (before: a direct forward of another model with the same shapes ran on it, silently)."""
    pm, other = _agents(seed=1), _agents(seed=2)
    ctx = _context(10)
    cache = ForkKVCache.from_context(pm, ctx, adapter_names=NAMES)
    new = torch.randint(3, 128, (2, 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pm(input_ids=new, adapter_names=NAMES, **cache_kwargs(cache))
    for copied in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
        with pytest.raises(StaleContextError), torch.no_grad():
            other(input_ids=new, adapter_names=NAMES, **cache_kwargs(copied))
    copied = copy.deepcopy(cache)  # the model it was built with: bound, and it continues as the original does
    with torch.no_grad():
        a = pm(input_ids=new, adapter_names=NAMES, **cache_kwargs(copied)).logits
        b = pm(input_ids=new, adapter_names=NAMES, **cache_kwargs(cache)).logits
    torch.testing.assert_close(a, b)


def test_a_copied_context_without_forkkv_is_refused_clearly():
    """A copied (or loaded) context read by a model without ForkKV's checks says to enable it (before: an
    AttributeError inside SDPA)."""
    pm = _agents()
    ctx = _context(10)
    shared = copy.deepcopy(SharedContext.build(pm, ctx, NAMES, progress=False))
    forkkv_hf.disable_forkkv(pm)
    with pytest.raises(ValueError, match="enable_forkkv"):
        _gen(pm, batch_inputs(ctx, _prompts([3, 2]), pad_token_id=0), NAMES, shared.fork(NAMES))


def test_the_model_inside_a_peft_model_is_refused_for_the_base_pass():
    """``SharedContext.build(peft_model.get_base_model(), ...)`` with an adapter on ran the "base" pass with that
    adapter (scores 0.87 off for ``__base__`` rows, silently); now refused, pointing to the PeftModel."""
    pm = _agents()
    with pytest.raises(ValueError, match="pass the PeftModel itself"):
        SharedContext.build(pm.get_base_model(), _context(10), [], progress=False)


@parametrize("edit", ["norm_eps", "attention_scaling", "rope_scaling"])
def test_a_changed_setting_is_stale(edit):
    """A module setting edited after the build (a norm's epsilon, an attention's scaling, the rotary module's
    attention_scaling) changes the K/V the context holds as a weight edit does: refused (before: served stale, scores
    0.25-1.1 off, silently); the base fingerprint a ForkKVStore keys its segments by changes with it."""
    from forkkv_hf.context.identity import base_fingerprint
    from forkkv_hf.context.probes import Probes

    pm = _agents()
    ctx = _context(10)
    shared = SharedContext.build(pm, ctx, NAMES, progress=False)
    caches = [shared.fork(NAMES), shared.fit_residuals(pm, NAMES, rank=4, progress=False).fork(NAMES),
              forkkv_hf.ForkKVStore(pm, progress=False).fork(ctx, NAMES)]  # (the last two were not checked)
    before = base_fingerprint(pm, Probes(fresh=True))[0]
    base = pm.get_base_model()
    if edit == "norm_eps":
        base.model.layers[0].input_layernorm.variance_epsilon = 1.0
    elif edit == "attention_scaling":
        base.model.layers[1].self_attn.scaling = 0.5
    else:
        base.model.rotary_emb.attention_scaling = 0.7
    for cache in caches:
        with pytest.raises(StaleContextError, match="settings changed"):
            _gen(pm, batch_inputs(ctx, _prompts([3, 2]), pad_token_id=0), NAMES, cache)
    assert base_fingerprint(pm, Probes(fresh=True))[0] != before


def test_a_loop_that_starts_with_embeddings_is_served():
    """A manual decode loop: the first forward given ``inputs_embeds`` (which records no token ids), then ids. The
    half-written check compares the layers only (comparing the recorded ids too refused this loop at its second id
    step)."""
    from models import plain_peft

    kv = dict(target_modules=["k_proj", "v_proj"], layers_to_transform=[1])  # exact for ForkKV
    pm = forkkv_hf.enable_forkkv(with_adapters(tiny_llama(layers=2, seed=7), {"a": dict(r=4, **kv),
                                                                               "b": dict(r=2, **kv)}, seed=7))
    ctx, names = _context(10), ["a", "b"]
    embed = pm.get_base_model().get_input_embeddings()
    new = torch.tensor([[40, 41, 42], [50, 51, 52]])
    cache = ForkKVCache.from_context(pm, ctx, names)
    fed, logits = torch.cat([ctx.expand(2, -1), new], 1), []
    with torch.no_grad():
        out = pm(inputs_embeds=embed(new), adapter_names=names, **cache_kwargs(cache))
        for _ in range(3):
            logits.append(out.logits[:, -1])
            step = out.logits[:, -1].argmax(-1, keepdim=True)
            fed = torch.cat([fed, step], 1)
            out = pm(input_ids=step, adapter_names=names, **cache_kwargs(cache))
        logits.append(out.logits[:, -1])
        ref = plain_peft(pm, lambda: pm(input_ids=fed, adapter_names=names).logits)
    torch.testing.assert_close(torch.stack(logits, 1), ref[:, ctx.numel() + new.shape[1] - 1:], rtol=1e-4, atol=1e-4)


def test_a_model_saved_with_the_previous_token_recorder_is_upgraded():
    """A model pickled with ForkKV on by the previous release holds one pre-hook handle as its recorder: enable kept
    it, the forward hook that clears a direct forward's mark was missing, and every direct forward was undone at the
    next (a decode loop lost its tokens); disable_forkkv failed on the handle."""
    from forkkv_hf.peft.wrappers import _record_tokens_hook

    pm = _agents()
    base = pm.get_base_model()
    forkkv_hf.disable_forkkv(pm)
    base._forkkv_recorder = base.register_forward_pre_hook(_record_tokens_hook, with_kwargs=True)
    forkkv_hf.enable_forkkv(pm)
    assert isinstance(base._forkkv_recorder, tuple) and len(base._forkkv_recorder) == 2
    ctx = _context(10)
    cache = ForkKVCache.from_context(pm, ctx, adapter_names=NAMES)
    new = batch_inputs(ctx, _prompts([3, 3]), pad_token_id=0)["input_ids"][:, 10:]
    with torch.no_grad():
        pm(input_ids=new, adapter_names=NAMES, **cache_kwargs(cache))
        pm(input_ids=new[:, :1], adapter_names=NAMES, **cache_kwargs(cache))
    assert cache.get_seq_length() == 14
    forkkv_hf.disable_forkkv(pm)
    assert len(base._forward_pre_hooks) == 0 and len(base._forward_hooks) == 0


KV_LAST = {"target_modules": ["k_proj", "v_proj"], "layers_to_transform": [1]}  # ForkKV is exact for these


def _q_and_kv_agents(with_b=True):
    """``a``: LoRA on q_proj only (no K/V LoRA layer); ``b``: K/V LoRA on the last layer (ForkKV exact)."""
    specs = {"a": {"target_modules": ["q_proj"]}, **({"b": {"r": 2, **KV_LAST}} if with_b else {})}
    return forkkv_hf.enable_forkkv(with_adapters(tiny_llama(layers=2, seed=4), specs, seed=4))


@parametrize("case", ["adapter_added_after_the_build", "pickled_context", "adapters_disabled"])
def test_rows_are_checked_on_a_model_that_never_built(case):
    """The rows a call runs are compared with the cache's on every model: before (found by an audit), only a build
    installed the probes the attention reads, so on a model instance given a pickled context, or for an adapter
    added after the build (its K/V LoRA layers new), ``generate(adapter_names=...)`` other than the fork's rows, and a
    generate inside ``with pm.disable_adapter()``, were served (0.5-0.7 off, silently). Now a generate is refused
    before it runs and a direct forward by the attention; the fork's own rows are still served."""
    ctx = _context(12)
    inputs = batch_inputs(ctx, _prompts([3]), pad_token_id=0)
    new = inputs["input_ids"][:, ctx.numel():]
    pm = _q_and_kv_agents(with_b=case != "adapter_added_after_the_build")
    shared = SharedContext.build(pm, ctx, ["b" if case == "adapters_disabled" else "a"], progress=False)
    if case == "adapter_added_after_the_build":
        pm.add_adapter("b", LoraConfig(r=2, lora_alpha=8, init_lora_weights=False, **KV_LAST))
        pm.eval()
    else:
        buf = io.BytesIO()
        torch.save(shared, buf)
        buf.seek(0)
        pm, shared = _q_and_kv_agents(), torch.load(buf, weights_only=False)
    if case == "adapters_disabled":
        with pm.disable_adapter():  # (the direct forward first: a refused generate installs the probes too)
            with pytest.raises(ValueError, match="are the adapters disabled"), torch.no_grad():
                pm(input_ids=new, adapter_names=["b"], **cache_kwargs(shared.fork(["b"])))
            with pytest.raises(ValueError, match=r"runs adapters \['__base__'\].*are the adapters disabled"):
                _gen(pm, inputs, ["b"], shared.fork(["b"]))
        return
    with pytest.raises(ValueError, match=r"runs adapters \['b'\] per row.*forked for \['a'\]"), torch.no_grad():
        pm(input_ids=new, adapter_names=["b"], **cache_kwargs(shared.fork(["a"])))
    with pytest.raises(ValueError, match=r"this generate runs adapters \['b'\] per row, but the ForkKVCache rows "
                                         r"were forked for \['a'\]"):
        _gen(pm, inputs, ["b"], shared.fork(["a"]))
    _assert_same(_gen(pm, inputs, ["a"], shared.fork(["a"])),
                 _gen(pm, inputs, ["a"], SharedContext.build(pm, ctx, ["a"], progress=False).fork(["a"])))


def test_disable_forkkv_removes_the_probes_and_a_later_call_checks_again():
    """``disable_forkkv`` left the row probes on the K/V LoRA layers (a hook on every plain PEFT forward after it;
    stop 66's Left): removed now; after ``enable_forkkv`` a generate installs them again and rows other than the
    fork's are still refused (the attention reads them too)."""
    ctx = _context(12)
    inputs = batch_inputs(ctx, _prompts([3]), pad_token_id=0)
    pm = _q_and_kv_agents()
    shared = SharedContext.build(pm, ctx, ["a"], progress=False)
    assert any(hasattr(m, "_forkkv_probe") for m in pm.modules())
    forkkv_hf.disable_forkkv(pm)
    assert not any(hasattr(m, "_forkkv_probe") or hasattr(m, "_forkkv_adapter_names") for m in pm.modules())
    forkkv_hf.enable_forkkv(pm)
    with pytest.raises(ValueError, match=r"runs adapters \['b'\] per row.*forked for \['a'\]"):
        _gen(pm, inputs, ["b"], shared.fork(["a"]))
    assert any(hasattr(m, "_forkkv_probe") for m in pm.modules())
    _assert_same(_gen(pm, inputs, ["a"], shared.fork(["a"])),
                 _gen(pm, inputs, ["a"], SharedContext.build(pm, ctx, ["a"], progress=False).fork(["a"])))


def test_rows_of_models_without_k_v_lora_read_any_tuner_layer():
    """Where no adapter has LoRA on K/V, the rows a generate runs were read from the active adapter alone (a second
    audit's findings on the first rows check): ``__base__`` rows inside ``with pm.disable_adapter():`` were refused,
    and an adapter of transformers' own PEFT integration, disabled while its context was built, then enabled, ran
    on a ``__base__`` fork, silently (0.7 off). Any tuner layer tells now: the first served as the base model runs,
    the second refused."""
    ctx = _context(12)
    inputs = batch_inputs(ctx, _prompts([3, 2]), pad_token_id=0)
    pm = forkkv_hf.enable_forkkv(with_adapters(tiny_llama(layers=2, seed=3), {"qo": {"r": 4, "target_modules": [
        "q_proj", "o_proj"]}}, seed=3))
    cache = ForkKVCache.from_context(pm, ctx, adapter_names=["__base__"] * 2)
    with pm.disable_adapter():
        got = pm.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0, **cache_kwargs(cache))
    base = forkkv_hf.enable_forkkv(tiny_llama(layers=2, seed=3))
    want = base.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0,
                         **cache_kwargs(ForkKVCache.from_context(base, ctx, adapter_names=["__base__"] * 2)))
    assert torch.equal(got, want)
    model = tiny_llama(layers=2, seed=3)
    model.add_adapter(LoraConfig(r=4, target_modules=["q_proj", "o_proj"], init_lora_weights=False))
    forkkv_hf.enable_forkkv(model)
    model.disable_adapters()
    cache = ForkKVCache.from_context(model, ctx, adapter_names=["__base__"] * 2)
    model.enable_adapters()
    with pytest.raises(ValueError, match=r"runs adapters \['default', 'default'\] per row.*forked for \['__base__'"):
        model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0, **cache_kwargs(cache))


def test_forkkv_enabled_before_get_peft_model():
    """``enable_forkkv`` on the transformers model, then ``get_peft_model``: its generate wrapper took PEFT's
    ``adapter_names`` hooks of the running ``PeftModel.generate`` for stale ones and removed them (found by an
    audit): every row ran the active adapter (a ``__base__`` row 0.8 off, silently), and a ForkKV generate with the
    fork's rows was refused. Now mixed rows equal plain PEFT, with a ForkKV cache too (exact: K/V LoRA on the last
    layer); enabling on the PeftModel afterwards binds the inner generate's wrapper to it (its checks run once)."""
    from models import plain_peft

    pm = with_adapters(forkkv_hf.enable_forkkv(tiny_llama(layers=2, seed=4)), {"a": {"r": 4, **KV_LAST}}, seed=4)
    ref = with_adapters(tiny_llama(layers=2, seed=4), {"a": {"r": 4, **KV_LAST}}, seed=4)
    rows, ctx, prompts = ["a", "__base__"], _context(12), _prompts([3, 3])
    plain = {"input_ids": torch.stack([torch.cat([ctx, p]) for p in prompts])}
    plain["attention_mask"] = torch.ones_like(plain["input_ids"])
    _assert_same(_gen(pm, plain, rows), _gen(ref, plain, rows))
    cache = SharedContext.build(pm, ctx, ["a"], progress=False).fork(rows)
    got = _gen(pm, batch_inputs(ctx, prompts, pad_token_id=0), rows, cache)
    _assert_same(got, _gen(ref, plain, rows))
    forkkv_hf.enable_forkkv(pm)
    assert pm.get_base_model().generate.model is pm
    _assert_same(_gen(pm, plain, rows), plain_peft(pm, lambda: _gen(pm, plain, rows)))


def test_a_forward_refused_for_its_batch_size_keeps_the_recorded_tokens():
    """A direct forward of 3 rows on a cache of 2 is refused at its first layer, after the cache recorded its tokens:
    the roll back trimmed the record but kept the refused rows' (found by an audit), so the next continuation of the
    cache's own 2 rows was refused as not continuing them. The mark keeps the record now: it continues as a cache
    that never saw the refused forward."""
    pm, ctx, shared, inputs = _built([3, 3])
    cache, twin = shared.fork(NAMES), shared.fork(NAMES)
    out = _gen(pm, inputs, NAMES, cache, max_new_tokens=3)
    _gen(pm, inputs, NAMES, twin, max_new_tokens=3)
    S = cache.get_seq_length()
    with pytest.raises(ValueError, match="the batch has 3 rows but this ForkKVCache holds 2"), torch.no_grad():
        pm(input_ids=torch.full((3, 1), 7), attention_mask=torch.ones(3, S + 1, dtype=torch.long),
           position_ids=torch.full((3, 1), S), adapter_names=NAMES + ["coder"], **cache_kwargs(cache))
    more = torch.cat([out.sequences, torch.tensor([[5, 6], [7, 8]])], 1)
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, 5, dtype=torch.long)], 1)
    more = {"input_ids": more, "attention_mask": mask}
    _assert_same(_gen(pm, more, NAMES, cache), _gen(pm, more, NAMES, twin))
