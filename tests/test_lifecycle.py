"""A model, context and cache through their lifecycle: copies, pickles, failed calls, the wrong model handed in.
Each test here failed before its fix (found by an audit, 2026-12-07): the results were silently wrong."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

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
