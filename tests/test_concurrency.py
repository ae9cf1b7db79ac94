"""Several threads building, forking and generating on one model: every output equals the single-threaded run and
the model is left as it was (adapters enabled, no PEFT hooks left behind, plain PEFT generate unchanged)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import forkkv_hf
from forkkv_hf import ForkKVStore, SharedContext, batch_inputs, cache_kwargs
from forkkv_hf.peft.wrappers import remove_stale_peft_hooks
from models import tiny_llama, with_adapters

THREADS = 4
ROUNDS = 3
SPECS = {"planner": dict(r=4), "coder": dict(r=2), "critic": dict(r=3, target_modules=["k_proj", "v_proj"])}
ROW_SETS = [["planner", "coder"], ["critic", "__base__", "planner"], ["coder"], ["critic", "coder"]]


def _agents(seed=0):
    return forkkv_hf.enable_forkkv(with_adapters(tiny_llama(layers=2, seed=seed), SPECS, seed=seed))


def _ctx(i):
    return torch.randint(3, 128, (10 + i,), generator=torch.Generator().manual_seed(100 + i))


def _gen(pm, ctx, cache, rows):
    inputs = batch_inputs(ctx, [torch.tensor([5 + k, 7]) for k in range(len(rows))])
    return pm.generate(**inputs, adapter_names=list(rows), do_sample=False, max_new_tokens=3, pad_token_id=0,
                       **cache_kwargs(cache))


def _plain(pm, i, rows):
    ids = torch.randint(3, 128, (len(rows), 4), generator=torch.Generator().manual_seed(200 + i))
    return pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=list(rows),
                       do_sample=False, max_new_tokens=3, pad_token_id=0)


def _job(pm, store, i):
    """Build + fork + generate, a store fork + generate + release, and a plain batched-LoRA generate."""
    rows = ROW_SETS[i % len(ROW_SETS)]
    names = [r for r in dict.fromkeys(rows) if r != "__base__"]
    ctx = _ctx(i)
    shared = SharedContext.build(pm, ctx, names, progress=False)
    keys = [layer.key.clone() for layer in shared.layers]
    from_build = _gen(pm, ctx, shared.fork(rows), rows)
    cache = store.fork(ctx, rows)
    from_store = _gen(pm, ctx, cache, rows)
    store.release(cache)
    return keys, from_build, from_store, _plain(pm, i, rows)


def _model_state(pm) -> dict:
    from peft.tuners.lora import LoraLayer

    layers = [m for m in pm.modules() if isinstance(m, LoraLayer)]
    # PEFT's per-call state, read where PEFT keeps it (it has no public getter)
    return {"adapters_disabled": pm._adapters_disabled, "layers_disabled": sum(m.disable_adapters for m in layers),
            "stale_hooks": remove_stale_peft_hooks(pm)}


def _assert_equal(got, want):
    for g, w in zip(got, want):
        if isinstance(g, list):
            _assert_equal(g, w)
        else:
            assert torch.equal(g, w)


def test_threads_build_fork_and_generate_like_one_thread():
    pm = _agents(seed=1)
    want = [_job(pm, ForkKVStore(pm, progress=False), i) for i in range(THREADS)]
    state = _model_state(pm)
    store = ForkKVStore(pm, progress=False)
    start = threading.Barrier(THREADS)

    def worker(i):
        start.wait()
        return [_job(pm, store, i) for _ in range(ROUNDS)]

    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(worker, range(THREADS)))
    for i, runs in enumerate(results):
        for run in runs:
            _assert_equal(run, want[i])
    assert _model_state(pm) == state == {"adapters_disabled": False, "layers_disabled": 0, "stale_hooks": 0}
    assert store.report().live_caches == 0 and store.report().pinned_bytes == 0
    _assert_equal(_plain(pm, 0, ROW_SETS[0]), want[0][3])


def test_threads_generating_with_one_cache_get_one_result_and_a_clear_error():
    """One cache is one batch's state: the second generate is refused (it does not continue the first's rows)."""
    pm = _agents(seed=2)
    rows = ROW_SETS[0]
    ctx = _ctx(0)
    want = _gen(pm, ctx, SharedContext.build(pm, ctx, rows, progress=False).fork(rows), rows)
    cache = SharedContext.build(pm, ctx, rows, progress=False).fork(rows)
    start = threading.Barrier(2)

    def worker(_):
        start.wait()
        try:
            return _gen(pm, ctx, cache, rows)
        except ValueError as e:
            return e

    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(worker, range(2)))
    tokens = [o for o in outs if isinstance(o, torch.Tensor)]
    errors = [o for o in outs if isinstance(o, ValueError)]
    assert len(tokens) == 1 and torch.equal(tokens[0], want)
    assert len(errors) == 1 and "call cache.reset()" in str(errors[0])


def test_failed_base_pass_leaves_the_model_unchanged():
    pm = _agents(seed=3)
    ctx = _ctx(1)
    want = _plain(pm, 1, ROW_SETS[1])
    boom = pm.get_base_model().model.layers[1].register_forward_pre_hook(lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        SharedContext.build(pm, ctx, ["planner"], progress=False)
    boom.remove()
    assert _model_state(pm) == {"adapters_disabled": False, "layers_disabled": 0, "stale_hooks": 0}
    _assert_equal(_plain(pm, 1, ROW_SETS[1]), want)
    done = []
    thread = threading.Thread(target=lambda: done.append(SharedContext.build(pm, ctx, ["planner"], progress=False)))
    thread.start()
    thread.join(timeout=120)
    assert done, "the model's lock was not released by the failed build"


def test_a_build_inside_a_running_generate_is_refused():
    """A logits processor that builds a shared context (or calls the store) inside a mixed-adapter generate of the same
    model: the nested build removed the running call's PEFT adapter_names hooks, so its later steps ran one adapter on
    every row (0.75 off, silently); refused now, and the running call is undisturbed."""
    from transformers import LogitsProcessor, LogitsProcessorList

    pm = _agents()
    rows = ["planner", "coder"]
    want = _plain(pm, 0, rows)
    errors = []

    class Nested(LogitsProcessor):
        def __call__(self, ids, scores):
            try:
                SharedContext.build(pm, _ctx(1), ["planner"], progress=False)
            except ValueError as e:
                errors.append(str(e))
            return scores

    ids = torch.randint(3, 128, (2, 4), generator=torch.Generator().manual_seed(200))
    got = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=rows, do_sample=False,
                      max_new_tokens=3, pad_token_id=0, logits_processor=LogitsProcessorList([Nested()]))
    assert torch.equal(got, want)
    assert errors and "cannot run inside a running generate or forward of the same model" in errors[0]
    SharedContext.build(pm, _ctx(1), ["planner"], progress=False)  # after the call: fine


def test_disable_waits_for_a_running_generate_and_copies_drop_its_hooks():
    """``disable_forkkv`` took no lock: called while another thread's generate ran, that generate failed inside SDPA.
    A deep copy made while a generate ran carried its PEFT adapter_names hooks; the copy's next generate drops them."""
    import copy

    pm = _agents()
    ctx, rows = _ctx(0), ["planner", "coder"]
    want = _gen(pm, ctx, SharedContext.build(pm, ctx, rows, progress=False).fork(rows), rows)
    cache = SharedContext.build(pm, ctx, rows, progress=False).fork(rows)
    inside, go_on = threading.Event(), threading.Event()
    layer = pm.get_base_model().model.layers[1]
    handle = layer.register_forward_pre_hook(lambda *a: (inside.set(), go_on.wait(10)) and None)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("out", _gen(pm, ctx, cache, rows)))
    thread.start()
    assert inside.wait(10)
    handle.remove()
    clone = copy.deepcopy(pm)  # mid-call: PEFT's hooks are on the layers
    disabler = threading.Thread(target=forkkv_hf.disable_forkkv, args=(pm,))
    disabler.start()
    disabler.join(0.5)
    assert disabler.is_alive()  # waits for the running generate
    go_on.set()
    thread.join(10)
    disabler.join(10)
    assert torch.equal(result["out"], want)
    assert not forkkv_hf.is_forkkv_enabled(pm)
    forkkv_hf.enable_forkkv(pm)
    ids = torch.randint(3, 128, (2, 4), generator=torch.Generator().manual_seed(7))
    plain = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=3,
                 pad_token_id=0)
    assert torch.equal(clone.generate(**plain), pm.generate(**plain))
