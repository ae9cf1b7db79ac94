"""The deferred stop check of compiled ForkKV decode (forkkv_hf.stop_check): transformers' ``DeferredStopCheck``
reads the stop flag a step late and undoes the extra step with ``cache.crop(-1)``; the tokens, the scores and the
cache left behind must equal the per-step check's. On CPU the compiled step runs with an eager backend and a
host-side stand-in for ``torch.Event`` (the CPU backend has no events; CPU work is synchronous anyway)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.generation import utils as gen_utils

import forkkv_hf
from forkkv_hf import ForkKVCache, batch_inputs, stop_check
from forkkv_hf.static_cache import StaticForkKVCache
from test_compiled_decode import _compile_config, fresh_dynamo  # noqa: F401 (fixture)
from test_generate import _assert_same, _context, _gen, _prompts, full_agents  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow  # compiles


class _HostEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args):
        pass

    def synchronize(self):
        pass


@pytest.fixture
def deferred_on_cpu(monkeypatch):
    """CPU counts as a deferring device; returns the list of ``finish()`` results (steps undone per generate)."""
    monkeypatch.setattr(stop_check, "DEFER_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(torch, "Event", _HostEvent)
    undone = []
    finish = gen_utils.DeferredStopCheck.finish

    def spy(self):
        undone.append(finish(self))
        return undone[-1]

    monkeypatch.setattr(gen_utils.DeferredStopCheck, "finish", spy)
    return undone


NAMES = ["planner", "critic", "__base__", "coder"]


def _stops_early(pm, ctx, inputs):
    """EOS ids that end every row before ``max_new_tokens``: the token each row makes at step 2, 4, 3, 5."""
    free = _gen(pm, inputs, NAMES, ForkKVCache.from_context(pm, ctx, adapter_names=NAMES), max_new_tokens=12)
    L = inputs["input_ids"].shape[1]
    return sorted({int(free.sequences[b, L + s]) for b, s in enumerate((2, 4, 3, 5))})


def test_deferred_stop_equals_the_per_step_check(full_agents, deferred_on_cpu):
    pm = full_agents
    ctx = _context(23, seed=2)
    inputs = batch_inputs(ctx, _prompts([3, 5, 2, 4], seed=8), pad_token_id=0)
    eos = _stops_early(pm, ctx, inputs)
    kw = dict(max_new_tokens=12, eos_token_id=eos)
    runs, caches = {}, {}
    for mode in ("eager", "per-step", "deferred"):
        cache = caches[mode] = ForkKVCache.from_context(pm, ctx, adapter_names=NAMES)
        extra = {} if mode == "eager" else dict(compile_config=_compile_config())
        with forkkv_hf.config_override(defer_stop="off" if mode == "per-step" else "auto"):
            runs[mode] = _gen(pm, inputs, NAMES, cache, **extra, **kw)
        assert isinstance(cache, StaticForkKVCache) == (mode != "eager")
    # the deferred run stopped early, ran one forward too many and undid it; the per-step run deferred nothing
    assert deferred_on_cpu == [1], deferred_on_cpu
    assert runs["eager"].sequences.shape[1] < inputs["input_ids"].shape[1] + 12
    _assert_same(runs["deferred"], runs["eager"])
    _assert_same(runs["per-step"], runs["eager"])
    held = {m: (int(c.get_seq_length()), c.private_ids.clone()) for m, c in caches.items()}
    assert held["deferred"][0] == held["eager"][0] == held["per-step"][0]
    assert torch.equal(held["deferred"][1], held["eager"][1])
    # the cache the deferred run left continues exactly as the eager one
    follow_ids = torch.cat([runs["eager"].sequences, torch.tensor([[7, 9]] * len(NAMES))], dim=1)
    grown = torch.ones(len(NAMES), follow_ids.shape[1] - inputs["attention_mask"].shape[1], dtype=torch.long)
    follow = dict(input_ids=follow_ids, attention_mask=torch.cat([inputs["attention_mask"], grown], dim=1))
    more = {m: _gen(pm, follow, NAMES, caches[m], max_new_tokens=5,
                    **({} if m == "eager" else dict(compile_config=_compile_config())))
            for m in ("eager", "deferred")}
    _assert_same(more["deferred"], more["eager"])


def test_sampling_calls_check_each_step(full_agents, deferred_on_cpu):
    """A sampling call whose rows all stop early: its deferred check's extra forward drew a sample, so the random
    stream after it was one draw ahead of eager decode's, and the caller's next call sampled other tokens (4 of 4
    rows). Sampling calls now check each step: nothing undone, the stream and the next call as eager."""
    pm = full_agents
    ctx = _context(23, seed=2)
    inputs = batch_inputs(ctx, _prompts([3, 5, 2, 4], seed=8), pad_token_id=0)
    eos = _stops_early(pm, ctx, inputs)
    runs = {}
    for mode in ("eager", "compiled"):
        extra = {} if mode == "eager" else dict(compile_config=_compile_config())
        torch.manual_seed(11)
        first = _gen(pm, inputs, NAMES, ForkKVCache.from_context(pm, ctx, adapter_names=NAMES), max_new_tokens=12,
                     eos_token_id=eos, do_sample=True, top_k=1, **extra)
        second = _gen(pm, inputs, NAMES, ForkKVCache.from_context(pm, ctx, adapter_names=NAMES), max_new_tokens=4,
                      do_sample=True, **extra)
        runs[mode] = (first, second, torch.randint(0, 1 << 30, (1,)).item())
    assert deferred_on_cpu == []
    _assert_same(runs["compiled"][0], runs["eager"][0])
    _assert_same(runs["compiled"][1], runs["eager"][1])
    assert runs["compiled"][2] == runs["eager"][2]


def test_other_caches_keep_transformers_answer():
    """After install(), ``DeferredStopCheck.is_supported`` answers as transformers does for caches forkkv-hf did not
    mark (transformers defers on MPS only), and a cache is marked only inside :func:`stop_check.deferring`."""
    if not stop_check.install():
        pytest.skip("this transformers has no DeferredStopCheck")
    check = gen_utils.DeferredStopCheck.is_supported
    for device in ("cpu", "cuda", "mps"):
        expected = device == "mps"
        assert check(torch.device(device), DynamicCache(), True, False) is expected
    assert check(torch.device("mps"), DynamicCache(), True, True) is False  # assisted decoding never defers
    cache = DynamicCache()
    with stop_check.deferring(cache, torch.device("cuda")) as on:
        assert on and check(torch.device("cuda"), cache, True, False) is True
        assert check(torch.device("cuda"), cache, True, True) is False
    assert check(torch.device("cuda"), cache, True, False) is False
    with forkkv_hf.config_override(defer_stop="off"), stop_check.deferring(cache, torch.device("cuda")) as on:
        assert not on and check(torch.device("cuda"), cache, True, False) is False
    with stop_check.deferring(cache, torch.device("cpu")) as on:  # no torch.Event on CPU
        assert not on


@pytest.mark.version_independent
def test_defer_stop_config():
    with pytest.raises(ValueError, match="FORKKV_DEFER_STOP"):
        forkkv_hf.ForkKVConfig(defer_stop="on")
