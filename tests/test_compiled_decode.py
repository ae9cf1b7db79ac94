"""The decode step of ``generate`` with a ForkKVCache, compiled through transformers' own compile path.

On CPU, ``CompileConfig(fullgraph=True, mode=None)`` with ``_compile_all_devices = True`` and an eager backend that
counts how often the compiled graphs run: fullgraph raises on any graph break, and the count proves every decode
step ran the compiled graph. The tokens must equal the eager run's (dynamic cache). ``gpu`` tests run the default
config (inductor, CUDA graphs) against eager under the bf16 pass rule.
"""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import CompileConfig

import forkkv_hf
from forkkv_hf import ForkKVCache, ForkKVStore, SharedContext, batch_inputs, cache_kwargs
from forkkv_hf.static_cache import StaticForkKVCache, make_static
from cases import GENERATE_MODES, parametrize
from models import tiny_llama, with_adapters
from test_generate import (ALL, _assert_same, _context, _gen, _prompts, full_agents,  # noqa: F401 (fixture)
                           make_full_agents)

pytestmark = pytest.mark.slow  # every test compiles (make test-fast leaves torch.compile out)

GRAPH_RUNS: list[list] = []  # per compiled graph: [runs, whether it is a model forward (embeds tokens)]


@torch._dynamo.register_backend
def forkkv_counted_eager(gm, example_inputs):
    """The eager backend, counting runs of each compiled graph."""
    entry = [0, any(n.target is torch.nn.functional.embedding for n in gm.graph.nodes)]
    GRAPH_RUNS.append(entry)

    def run(*args):
        entry[0] += 1
        return gm.forward(*args)

    return run


def _compile_config(backend="forkkv_counted_eager"):
    cc = CompileConfig(fullgraph=True, backend=backend, mode=None)
    cc._compile_all_devices = True
    return cc


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch (and stays below dynamo's recompile limit, which would fall back to eager)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    GRAPH_RUNS.clear()
    yield


@pytest.fixture(scope="module")
def agents(full_agents):
    """test_generate's agents: LoRA on q/k/v/o of every layer, different ranks and alphas, rsLoRA, a LoRA bias."""
    return full_agents


@pytest.fixture(scope="module")
def two_layer_agents():
    """The same agents on two layers, for the tests that run the interpreted Triton kernels (their cost is per layer
    and call)."""
    return make_full_agents(layers=2)


NAMES = ["planner", "critic", "coder", "__base__", "biased"]


def _decode_graph_runs() -> int:
    """Runs of compiled model forwards (the token recorder hook compiles to a small graph of its own)."""
    return sum(runs for runs, is_forward in GRAPH_RUNS if is_forward)


def _eager_and_compiled(pm, ctx, inputs, names, gen_names=None, seed=7, **mode):
    gen_names = gen_names or names
    torch.manual_seed(seed)
    eager = _gen(pm, inputs, gen_names, ForkKVCache.from_context(pm, ctx, adapter_names=names), **mode)
    cache = ForkKVCache.from_context(pm, ctx, adapter_names=names)
    torch.manual_seed(seed)
    compiled = _gen(pm, inputs, gen_names, cache, compile_config=_compile_config(), **mode)
    assert isinstance(cache, StaticForkKVCache)
    return eager, compiled, cache


@parametrize("mode", [mode for mode in GENERATE_MODES if "num_beams" not in mode])
def test_compiled_decode_equals_eager(agents, mode):
    """Mixed adapters with a ``__base__`` row, padded prompts of different lengths; every decode step runs the one
    compiled graph."""
    ctx = _context(23)
    inputs = batch_inputs(ctx, _prompts([5, 2, 4, 1, 3], seed=2), pad_token_id=0)
    k = mode.get("num_return_sequences", 1)
    gen_names = [n for n in NAMES for _ in range(k)]
    eager, compiled, cache = _eager_and_compiled(agents, ctx, inputs, NAMES, gen_names, max_new_tokens=6, **mode)
    _assert_same(compiled, eager)
    assert isinstance(cache, StaticForkKVCache)
    assert _decode_graph_runs() == 5  # max_new_tokens - 1 decode steps, all compiled
    assert cache.adapter_names == gen_names


def test_beam_search(agents):
    """transformers runs beam search's decode steps eager: with a compile config the cache stays dynamic and the
    tokens equal eager; the static layout itself (forced, run eager) reorders beams in place and equals it too."""
    ctx = _context(23)
    inputs = batch_inputs(ctx, _prompts([5, 2, 4, 1, 3], seed=2), pad_token_id=0)
    mode = dict(do_sample=False, num_beams=3, max_new_tokens=6)
    eager = _gen(agents, inputs, NAMES, ForkKVCache.from_context(agents, ctx, adapter_names=NAMES), **mode)
    cache = ForkKVCache.from_context(agents, ctx, adapter_names=NAMES)
    _assert_same(_gen(agents, inputs, NAMES, cache, compile_config=_compile_config(), **mode), eager)
    assert type(cache) is ForkKVCache and not GRAPH_RUNS
    forced = make_static(ForkKVCache.from_context(agents, ctx, adapter_names=NAMES), 64, use_triton=False)
    raw_generate = agents.generate.__wrapped__  # PEFT's generate, without the wrappers that pick the layout
    base = agents.get_base_model()
    wrapped = base.__dict__.pop("generate")  # the transformers model's (it checks a generate not run by the PeftModel's)
    try:
        out = raw_generate(**inputs, adapter_names=NAMES, output_scores=True, return_dict_in_generate=True,
                           pad_token_id=0, **cache_kwargs(forced), **mode)
    finally:
        base.generate = wrapped
    _assert_same(out, eager)
    assert isinstance(forced, StaticForkKVCache) and forced.adapter_names == [n for n in NAMES for _ in range(3)]
    assert forced.get_seq_length() == 23 + 5 + 6 - 1


def test_continuation_with_the_same_cache(agents):
    """A second generate continues the first one's rows (context + prompt + output + a new prompt): the static
    cache grows its buffers and keeps what it holds; tokens equal the eager continuation."""
    ctx = _context(19)
    names = ["coder", "planner", "__base__"]
    inputs = batch_inputs(ctx, _prompts([2, 6, 3], seed=5), pad_token_id=0)
    outs = {}
    for compiled in (False, True):
        cache = ForkKVCache.from_context(agents, ctx, adapter_names=names)
        extra = dict(compile_config=_compile_config()) if compiled else {}
        first = _gen(agents, inputs, names, cache, max_new_tokens=4, **extra)
        more = torch.cat([first.sequences, torch.tensor([[5, 6]] * 3)], dim=1)
        grown = torch.ones(3, more.shape[1] - inputs["attention_mask"].shape[1], dtype=torch.long)
        follow = dict(input_ids=more, attention_mask=torch.cat([inputs["attention_mask"], grown], dim=1))
        outs[compiled] = _gen(agents, follow, names, cache, max_new_tokens=70, **extra)
        assert isinstance(cache, StaticForkKVCache) == compiled
    _assert_same(outs[True], outs[False])
    assert cache.capacity >= 6 + 4 + 2 + 70 and cache.capacity % 64 == 0
    assert _decode_graph_runs() == 3 + 69
    # the Cache API on the static layout: crop, private ids, reset (buffers kept for the next call)
    P = cache.layers[0].private_length()
    assert int(cache.get_seq_length()) == 19 + P and cache.private_ids.shape == (3, P)
    cache.crop(-5)
    assert int(cache.get_seq_length()) == 19 + P - 5 and cache.private_ids.shape == (3, P - 5)
    assert torch.equal(cache.private_ids, outs[True].sequences[:, 19 : 19 + P - 5])
    cache.reset()
    assert cache.get_seq_length() == 19 and cache.private_ids is None and isinstance(cache, StaticForkKVCache)


def test_store_fork(agents):
    store = ForkKVStore(agents)
    ctx = _context(31, seed=9)
    store.extend(ctx, ["planner", "critic"])
    names = ["critic", "planner", "critic"]
    inputs = batch_inputs(ctx, _prompts([3, 4, 2], seed=11), pad_token_id=0)
    eager = _gen(agents, inputs, names, store.fork(ctx, names))
    compiled = _gen(agents, inputs, names, store.fork(ctx, names), compile_config=_compile_config())
    _assert_same(compiled, eager)
    assert _decode_graph_runs() == 7


def test_second_generate_does_not_recompile(agents):
    """Other prompts of the same shapes, a new fork of the same shared context: no new graph, no recompile; the
    second fork reuses the first one's static buffers (the same addresses: CUDA graphs replay, not re-record)."""
    ctx = _context(29, seed=4)
    names = ["planner", "coder", "__base__"]
    shared = SharedContext.build(agents, ctx, ["planner", "coder"], progress=False)
    caches = []
    for seed in (1, 2):
        inputs = batch_inputs(ctx, _prompts([4, 4, 4], seed=seed), pad_token_id=0)
        caches.append(shared.fork(names))
        out = _gen(agents, inputs, names, caches[-1], compile_config=_compile_config())
        eager = _gen(agents, inputs, names, shared.fork(names))
        _assert_same(out, eager)
        if seed == 1:
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            assert graphs == 2  # the forward and the token recorder
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert "recompilations" not in torch._dynamo.utils.counters or not torch._dynamo.utils.counters["recompilations"]
    assert _decode_graph_runs() == 2 * 7
    first, second = caches
    for a, b in zip(first.layers, second.layers):
        assert a.keys.data_ptr() != b.keys.data_ptr()  # the first cache kept a copy of its content
    pooled = [l.keys.data_ptr() for l in second.layers]
    third = shared.fork(names)
    _gen(agents, batch_inputs(ctx, _prompts([4, 4, 4], seed=3), pad_token_id=0), names, third,
         compile_config=_compile_config())
    assert [l.keys.data_ptr() for l in third.layers] == pooled
    # another assignment of the same agents to the rows: the row plans are inputs, not constants of the graph
    perm = ["coder", "__base__", "planner"]
    inputs = batch_inputs(ctx, _prompts([4, 4, 4], seed=4), pad_token_id=0)
    _assert_same(_gen(agents, inputs, perm, shared.fork(perm), compile_config=_compile_config()),
                 _gen(agents, inputs, perm, shared.fork(perm)))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_a_shorter_generate_keeps_a_longer_ones_buffers(agents):
    """Lengths whose private capacities differ (4 + 62 new tokens need 128, 4 + 6 need 64), alternating over new forks:
    a shorter call after a longer one takes the longer one's pooled buffers (``pooled_capacity``, at most twice the
    room it needs) and its graph, so no call after the first of each length compiles or moves a buffer (on the GPU:
    no CUDA graph recorded anew, as v37's capacity decode at 8 / 104 tokens did at each switch); tokens as eager."""
    from forkkv_hf.static_cache import free_static_buffers, pooled_capacity

    free_static_buffers(agents)  # the module's model: other tests' pools
    ctx = _context(29, seed=4)
    names = ["planner", "coder", "__base__"]
    shared = SharedContext.build(agents, ctx, ["planner", "coder"], progress=False)
    assert pooled_capacity(shared.fork(names)) == 0  # nothing pooled yet
    ptrs, graphs = [], None
    for i, n in enumerate((62, 6, 62, 6)):
        inputs = batch_inputs(ctx, _prompts([4, 4, 4], seed=i), pad_token_id=0)
        cache = shared.fork(names)
        _assert_same(_gen(agents, inputs, names, cache, max_new_tokens=n, compile_config=_compile_config()),
                     _gen(agents, inputs, names, shared.fork(names), max_new_tokens=n))
        assert cache.capacity == 128 and pooled_capacity(shared.fork(names)) == 128, (n, cache.capacity)
        ptrs.append([layer.keys.data_ptr() for layer in cache.layers])
        graphs = graphs or torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs == 2
    assert ptrs[1] == ptrs[2] == ptrs[3]  # the first cache kept a copy when the second took the pooled buffers
    assert pooled_capacity(shared.fork(names[:2])) == 0  # other rows: other buffers
    # more than twice the room needed (4 + 130 tokens: 192 against 64) is not kept: the private part reads it all
    for n, capacity in ((130, 192), (6, 64)):
        cache = shared.fork(names)
        _gen(agents, batch_inputs(ctx, _prompts([4, 4, 4], seed=5), pad_token_id=0), names, cache, max_new_tokens=n,
             compile_config=_compile_config())
        assert cache.capacity == capacity, (n, cache.capacity)


def test_memory_report_and_disable_after_a_compiled_call(agents):
    """A compiled call's cache reports the bytes of the tokens it holds, as the eager call's does, and its static
    buffers apart (before: the buffers' whole capacity as its private K/V, 'saving' 2.4x low); ``disable_forkkv``
    drops the model's pooled buffers (before: kept, with a deleted cache's K/V alive, ~4 GiB at 256 rows of 8B
    shapes)."""
    import gc
    import weakref

    ctx = _context(23)
    names = ["planner", "coder", "__base__"]
    inputs = batch_inputs(ctx, _prompts([3, 3, 3], seed=1), pad_token_id=0)
    eager = ForkKVCache.from_context(agents, ctx, adapter_names=names)
    _gen(agents, inputs, names, eager, max_new_tokens=5)
    cache = ForkKVCache.from_context(agents, ctx, adapter_names=names)
    _gen(agents, inputs, names, cache, max_new_tokens=5, compile_config=_compile_config())
    assert isinstance(cache, StaticForkKVCache)
    r, e = cache.memory_report(), eager.memory_report()
    assert (r.private_tokens, r.private_bytes, r.forkkv_bytes, r.saving) == \
        (e.private_tokens, e.private_bytes, e.forkkv_bytes, e.saving)
    layer = cache.layers[0]
    assert r.static_buffer_bytes == len(cache.layers) * 2 * layer.keys.numel() * layer.keys.element_size()
    assert r.static_buffer_bytes > r.private_bytes and e.static_buffer_bytes == 0
    assert "compiled decode's K/V buffers" in str(r)
    held = weakref.ref(layer.keys)
    del cache, layer
    try:
        forkkv_hf.disable_forkkv(agents)
        gc.collect()
        assert held() is None
        assert not any("_forkkv_static_buffers" in m.__dict__ for m in agents.modules())
    finally:
        forkkv_hf.enable_forkkv(agents)


def test_a_failed_compiled_call_leaves_the_cache_as_it_was(agents):
    """A logits processor raising at the third step of a compiled call: the static cache's counters go back to where
    the call found them, as an eager call's tensors do, and a retry on the same cache equals a fresh one (before: the
    retry was refused, its message blaming an earlier generate)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Boom(LogitsProcessor):
        calls = 0

        def __call__(self, ids, scores):
            Boom.calls += 1
            if Boom.calls == 3:
                raise RuntimeError("boom")
            return scores

    ctx, names = _context(23), ["planner", "coder", "__base__"]
    inputs = batch_inputs(ctx, _prompts([3, 4, 2], seed=4), pad_token_id=0)
    cache = ForkKVCache.from_context(agents, ctx, adapter_names=names)
    with pytest.raises(RuntimeError, match="boom"):
        _gen(agents, inputs, names, cache, compile_config=_compile_config(), logits_processor=LogitsProcessorList([Boom()]))
    assert isinstance(cache, StaticForkKVCache) and cache.layers[0].private_length() == 0
    _assert_same(_gen(agents, inputs, names, cache, compile_config=_compile_config()),
                 _gen(agents, inputs, names, ForkKVCache.from_context(agents, ctx, adapter_names=names)))


def test_use_cache_off_in_a_generation_config_runs_eager(agents):
    """``use_cache=False`` in a passed or the model's generation_config (the keyword is refused): generate then feeds
    whole rows at each step, which eager forwards cut to the new tokens but the compiled step appended to its
    buffers (tokens 0.45-0.67 off, silently, or an index error inside the graph); such calls now run eager, with the
    tokens of the default settings."""
    from transformers import GenerationConfig

    ctx, names = _context(23), ["planner", "coder"]
    inputs = batch_inputs(ctx, _prompts([3, 4], seed=4), pad_token_id=0)
    want = _gen(agents, inputs, names, ForkKVCache.from_context(agents, ctx, adapter_names=names), max_new_tokens=5)
    cache = ForkKVCache.from_context(agents, ctx, adapter_names=names)
    out = _gen(agents, inputs, names, cache, compile_config=_compile_config(), max_new_tokens=5,
               generation_config=GenerationConfig(use_cache=False))
    assert not isinstance(cache, StaticForkKVCache) and _decode_graph_runs() == 0
    _assert_same(out, want)
    own = agents.get_base_model().generation_config
    own.use_cache = False
    try:
        cache = ForkKVCache.from_context(agents, ctx, adapter_names=names)
        _assert_same(_gen(agents, inputs, names, cache, compile_config=_compile_config(), max_new_tokens=5), want)
        assert not isinstance(cache, StaticForkKVCache)
    finally:
        own.use_cache = True


@parametrize("kernels", ["torch", "triton"], version_independent=lambda kernels: kernels == "triton")
def test_custom_ops_in_the_compiled_step(two_layer_agents, kernels, monkeypatch):
    """``triton``: the Triton kernels (interpreted on CPU) reached from the compiled graph through ``torch.ops.forkkv``:
    the cascade attention with each layer's rows planned before the step, the batched LoRA. ``torch``: the same
    calls on the PyTorch paths (the run on transformers 5.17: the Triton case differs from it below the
    transformers/PEFT interfaces only). The op's calls pass the padded rows' mask with ``context_visible``: only the
    private part reads it."""
    import forkkv_kernels.cascade as cascade_module

    if kernels == "triton" and torch.cuda.is_available():
        pytest.skip("interpreted kernels on CPU tensors; the gpu tests run them on CUDA")
    monkeypatch.setenv("FORKKV_BACKEND", kernels)
    monkeypatch.setenv("FORKKV_LORA_BACKEND", kernels)
    op_calls, launcher = [], cascade_module.cascade_attention

    def spy(*args, **kw):  # the custom op imports the launcher from its module at each call
        op_calls.append((kw.get("mask") is not None and bool((kw["mask"] == 0).any()), kw.get("context_visible")))
        return launcher(*args, **kw)

    monkeypatch.setattr(cascade_module, "cascade_attention", spy)
    ctx = _context(40, seed=3)
    inputs = batch_inputs(ctx, _prompts([3, 1, 2, 2, 4], seed=8), pad_token_id=0)
    eager, compiled, cache = _eager_and_compiled(two_layer_agents, ctx, inputs, NAMES, max_new_tokens=4)
    _assert_same(compiled, eager)
    assert all((layer.work is not None and layer.work.has_k) == (kernels == "triton") for layer in cache.layers)
    assert _decode_graph_runs() == 3
    assert op_calls == ([(True, True)] * 3 * len(cache.layers) if kernels == "triton" else [])


@parametrize("backend,kernels", [("aot_eager", "torch"), ("inductor", "triton")],
             version_independent=lambda case: case[0] == "inductor")  # aot_eager, torch: the same calls on 5.17
def test_functionalized_and_inductor_graphs(two_layer_agents, backend, kernels, monkeypatch):
    """AOTAutograd's functionalisation (in-place cache writes on static inputs) and inductor's lowering (on CPU: C++;
    the Triton kernels, interpreted, as extern custom ops) keep the tokens."""
    if kernels == "triton" and torch.cuda.is_available():
        pytest.skip("interpreted kernels on CPU tensors; the gpu tests run them on CUDA")
    monkeypatch.setenv("FORKKV_BACKEND", kernels)
    monkeypatch.setenv("FORKKV_LORA_BACKEND", kernels)
    pm = two_layer_agents
    ctx = _context(17)
    names = ["planner", "__base__", "biased"]
    inputs = batch_inputs(ctx, _prompts([3, 5, 2]), pad_token_id=0)
    eager = _gen(pm, inputs, names, ForkKVCache.from_context(pm, ctx, adapter_names=names), max_new_tokens=4)
    cache = ForkKVCache.from_context(pm, ctx, adapter_names=names)
    out = _gen(pm, inputs, names, cache, compile_config=_compile_config(backend), max_new_tokens=4)
    _assert_same(out, eager)
    assert isinstance(cache, StaticForkKVCache) and (cache.layers[0].work is not None) == (kernels == "triton")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


def test_eager_decode_steps_skip_the_value_checks(agents, monkeypatch):
    """An eager generate runs the forward checks that read tensor values (a device sync) at its first forward only:
    its decode steps feed back tokens, masks and positions generate made itself. Direct forwards keep them."""
    from forkkv_hf import cache as cache_module

    seen = []
    real = cache_module.check_forward_inputs

    def spy(cache, module, args, kwargs, decode_step=False):
        seen.append(decode_step)
        return real(cache, module, args, kwargs, decode_step)

    monkeypatch.setattr(cache_module, "check_forward_inputs", spy)
    ctx = _context(15)
    names = ["planner", "__base__"]
    inputs = batch_inputs(ctx, _prompts([2, 3]), pad_token_id=0)
    cache = ForkKVCache.from_context(agents, ctx, adapter_names=names)
    out = _gen(agents, inputs, names, cache, max_new_tokens=5)
    assert seen == [False] + [True] * 4
    seen.clear()
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, 5, dtype=torch.long)], dim=1)
    with torch.no_grad():
        agents(input_ids=out.sequences[:, -1:], attention_mask=mask, adapter_names=names, **cache_kwargs(cache))
    assert seen == [False]


def test_eager_where_compile_cannot_run(agents, caplog):
    """disable_compile, a CPU model without _compile_all_devices, no adapter_names, or a DoRA adapter: the cache
    stays dynamic (not compileable), decode runs eager, the reason is logged once."""
    from forkkv_hf import compile_policy

    ctx = _context(15)
    names = ["planner", "coder"]
    inputs = batch_inputs(ctx, _prompts([2, 3]), pad_token_id=0)
    cc_cpu = CompileConfig(fullgraph=True, backend="forkkv_counted_eager", mode=None)  # no _compile_all_devices
    compile_policy._LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="forkkv_hf.compile_policy"):
        for extra in (dict(disable_compile=True, compile_config=_compile_config()), dict(compile_config=cc_cpu),
                      dict(compile_config=cc_cpu)):
            cache = ForkKVCache.from_context(agents, ctx, adapter_names=names)
            _gen(agents, inputs, names, cache, **extra)
            assert type(cache) is ForkKVCache and not cache.is_compileable
    assert not GRAPH_RUNS
    reasons = [r.getMessage() for r in caplog.records if r.name == "forkkv_hf.compile_policy"]
    assert len(reasons) == 2, reasons  # each reason once
    assert "disable_compile=True" in reasons[0] and "the model is on cpu" in reasons[1]

    # a cache made static by a compiled call goes back to the dynamic layout (with its content) for an eager one
    cache = ForkKVCache.from_context(agents, ctx, adapter_names=names)
    first = _gen(agents, inputs, names, cache, max_new_tokens=3, compile_config=_compile_config())
    assert isinstance(cache, StaticForkKVCache)
    grown = torch.ones(2, first.sequences.shape[1] - inputs["input_ids"].shape[1], dtype=torch.long)
    cont = dict(input_ids=first.sequences, attention_mask=torch.cat([inputs["attention_mask"], grown], 1))
    again = _gen(agents, cont, names, cache, max_new_tokens=3, disable_compile=True)
    assert type(cache) is ForkKVCache
    ref = ForkKVCache.from_context(agents, ctx, adapter_names=names)
    _gen(agents, inputs, names, ref, max_new_tokens=3)
    _assert_same(again, _gen(agents, cont, names, ref, max_new_tokens=3))


def test_peft_paths_that_do_not_compile(caplog):
    """No adapter_names (PEFT's hooks would be missing from the graph) and DoRA (PEFT's own code): eager, logged."""
    from forkkv_hf import compile_policy

    pm = forkkv_hf.enable_forkkv(with_adapters(tiny_llama(layers=2, seed=4), {
        "planner": dict(r=4), "dora": dict(r=2, use_dora=True, target_modules=["q_proj", "o_proj"])}, seed=4))
    ctx = _context(15)
    inputs = batch_inputs(ctx, _prompts([2]), pad_token_id=0)
    compile_policy._LOGGED.clear()
    with caplog.at_level(logging.WARNING, logger="forkkv_hf.compile_policy"):
        pm.set_adapter("planner")
        cache = ForkKVCache.from_context(pm, ctx, adapter_names=["planner"])
        pm.generate(**inputs, max_new_tokens=3, pad_token_id=0, compile_config=_compile_config(),
                    **cache_kwargs(cache))
        assert type(cache) is ForkKVCache
        cache = ForkKVCache.from_context(pm, ctx, adapter_names=["planner"])
        with pytest.raises(ValueError, match="DoRA"):  # PEFT refuses DoRA in mixed batches; ForkKV does not compile
            _gen(pm, inputs, ["dora"], ForkKVCache.from_context(pm, ctx, adapter_names=["dora"]),
                 compile_config=_compile_config())
    reasons = " | ".join(r.getMessage() for r in caplog.records)
    assert "no adapter_names" in reasons and "cannot be batched" in reasons, reasons
    assert not GRAPH_RUNS


# ---------------------------------------------------------------------------------------------------------------------
# the default compile config (inductor, CUDA graphs) against eager, bf16, long contexts: flash-attention's pass rule
def _pass_rule_case(device: str, T: int, steps: int, compile_config=None, dtype=torch.bfloat16):
    """Greedy ``generate`` of ``steps`` tokens for six mixed rows (three rank-16 agents on q/k/v/o, a ``__base__``
    row, padded prompts) over a ``T``-token context, eager and compiled (``compile_config``; ``None``: transformers'
    default, on CUDA inductor with CUDA graphs), in ``dtype``. Ground truth: the same model and context in fp32,
    teacher-forced over each run's own tokens. Pass rule, per row: the tokens are equal up to a first divergence, if
    any, where the fp32 reference cannot tell the two tokens apart beyond the low-precision error; the compiled
    logits' error against fp32 is at most 3x the eager run's (+1e-3) on the common steps. Returns the divergence
    step of each row (``None``: none) and the two errors."""
    names = ["a0", "a1", "a2", "__base__", "a0", "a1"]
    model = tiny_llama(layers=2, hidden=1024, heads=8, kv_heads=2, vocab=2048, max_pos=T + 1024, seed=3)
    pm = forkkv_hf.enable_forkkv(with_adapters(model, {n: dict(r=16, lora_alpha=16, target_modules=ALL)
                                                       for n in ("a0", "a1", "a2")}, seed=3)).to(device)
    g = torch.Generator().manual_seed(5)
    ctx = torch.randint(3, 2048, (T,), generator=g)
    prompts = [torch.randint(3, 2048, (n,), generator=g) for n in (16, 9, 13, 16, 11, 14)]
    inputs = batch_inputs(ctx, prompts, pad_token_id=0, device=device)
    L = inputs["input_ids"].shape[1]
    gen = dict(adapter_names=names, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0,
               output_logits=True, return_dict_in_generate=True)
    pm.to(dtype)
    shared = SharedContext.build(pm, ctx.to(device), ["a0", "a1", "a2"], progress=False)
    eager = pm.generate(**inputs, disable_compile=True, **cache_kwargs(shared.fork(names)), **gen)
    extra = {} if compile_config is None else dict(compile_config=compile_config)
    cache = shared.fork(names)
    compiled = pm.generate(**inputs, **cache_kwargs(cache), **extra, **gen)
    assert isinstance(cache, StaticForkKVCache)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= 1
    again = pm.generate(**inputs, **cache_kwargs(shared.fork(names)), **extra, **gen)  # same shapes: no recompile
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert torch.equal(again.sequences, compiled.sequences)
    del shared, cache

    pm.float()
    shared32 = SharedContext.build(pm, ctx.to(device), ["a0", "a1", "a2"], progress=False)

    def reference(seqs):  # fp32 logits of every decode step, teacher-forced over these tokens: [B, steps, V]
        full = seqs[:, : L + steps - 1]
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(full[:, L:])], dim=1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            out = pm(input_ids=full[:, T:], attention_mask=mask, position_ids=pos[:, T:], adapter_names=names,
                     use_cache=True, **cache_kwargs(shared32.fork(names)))
        return out.logits[:, L - 1 - T :].float()

    ref_e, ref_c = reference(eager.sequences), reference(compiled.sequences)
    log_e = torch.stack(eager.logits, 1).float()
    log_c = torch.stack(compiled.logits, 1).float()
    tok_e, tok_c = eager.sequences[:, L:], compiled.sequences[:, L:]
    err_e = (log_e - ref_e).abs().amax(-1)  # [B, steps]
    err_c = (log_c - ref_c).abs().amax(-1)
    divergence, common_e, common_c = [], [], []
    for b in range(len(names)):
        diff = (tok_e[b] != tok_c[b]).nonzero()
        s = int(diff[0]) if len(diff) else None
        divergence.append(s)
        upto = steps if s is None else s + 1  # the step of a divergence still has a common history
        common_e.append(err_e[b, :upto].max())
        common_c.append(err_c[b, :upto].max())
        if s is not None:
            margin = (ref_e[b, s, tok_e[b, s]] - ref_e[b, s, tok_c[b, s]]).abs()
            assert margin <= 2 * (err_e[b, s] + err_c[b, s]), (b, s, float(margin), float(err_e[b, s]))
    e_eager, e_comp = float(torch.stack(common_e).max()), float(torch.stack(common_c).max())
    assert e_comp <= 3 * e_eager + 1e-3, (e_comp, e_eager)
    return divergence, e_eager, e_comp


def test_pass_rule_harness_on_cpu():
    """The GPU pass-rule check, on CPU at a small size (eager backend, fullgraph): it runs and passes."""
    divergence, e_eager, e_comp = _pass_rule_case("cpu", T=96, steps=6, compile_config=_compile_config())
    assert e_eager > 0 and _decode_graph_runs() == 2 * 5
    assert sum(s is None for s in divergence) >= 4, divergence


@pytest.mark.gpu
@parametrize("T", [4096, 32768])
def test_default_compile_equals_eager_bf16_gpu(T):
    """transformers' default compile (inductor, mode="reduce-overhead": CUDA graphs) over 64 decode steps: the bf16
    pass rule against eager (tokens may part only where fp32 cannot tell them apart beyond bf16 noise), no CUDA-graph
    skips, no recompile for a second generate."""
    divergence, e_eager, e_comp = _pass_rule_case("cuda", T=T, steps=64)
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0
    print(f"T={T}: first divergence per row {divergence}; max |logit error| vs fp32: eager "
          f"{e_eager:.4f}, compiled {e_comp:.4f}")


@pytest.mark.gpu
def test_two_sizes_replay_their_cuda_graphs_gpu():
    """transformers' default compile (inductor, CUDA graphs), calls of two sizes alternating over new forks (16-token
    prompts plus 62 or 6 new tokens: private capacities 128 and 64): once each size has run, another round records no
    CUDA graph, compiles no graph and allocates no static buffer, and repeats its tokens (the shorter call keeps the
    longer one's buffers, ``pooled_capacity``; v37's capacity decode at 8 / 104 recorded at every switch)."""
    from torch._dynamo.utils import counters

    names = ["a0", "a1", "__base__", "a0"]
    model = tiny_llama(layers=2, hidden=1024, heads=8, kv_heads=2, vocab=2048, max_pos=8192, seed=3)
    pm = forkkv_hf.enable_forkkv(with_adapters(model, {n: dict(r=16, lora_alpha=16, target_modules=ALL)
                                                       for n in ("a0", "a1")}, seed=3)).to("cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    ctx = torch.randint(3, 2048, (4096,), generator=g)
    inputs = batch_inputs(ctx, [torch.randint(3, 2048, (16,), generator=g) for _ in names], pad_token_id=0,
                          device="cuda")
    shared = SharedContext.build(pm, ctx.to("cuda"), ["a0", "a1"], progress=False)

    def round_of_both():
        out, ptrs = [], []
        for n in (62, 6):
            cache = shared.fork(names)
            out.append(pm.generate(**inputs, adapter_names=names, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                   pad_token_id=0, **cache_kwargs(cache)))
            assert cache.capacity == 128, (n, cache.capacity)
            ptrs.append(cache.layers[0].keys.data_ptr())
        return out, ptrs

    first, ptrs = round_of_both()
    before = counters["inductor"]["cudagraph_recorded_non_static_inputs"], counters["stats"]["unique_graphs"]
    again, ptrs_again = round_of_both()
    after = counters["inductor"]["cudagraph_recorded_non_static_inputs"], counters["stats"]["unique_graphs"]
    assert after == before and len(set(ptrs + ptrs_again)) == 1, (before, after, ptrs, ptrs_again)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@parametrize("lengths", [dict(), dict(config_max_new_tokens=30, max_length=60)])
def test_the_static_capacity_holds_what_transformers_generates(agents, lengths):
    """The compiled call's private buffers hold the tokens transformers' own length rule makes: 20 new tokens
    without max_new_tokens or max_length, and a generation config's max_new_tokens over a max_length keyword (before,
    an unset max_length counted as 20 in all and the config lost to the keyword: 44-token prompts overflowed the
    64-token buffers inside the compiled step)."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from forkkv_hf.compile_policy import private_capacity

    ctx = _context(10)
    inputs = batch_inputs(ctx, _prompts([50, 47], seed=4), pad_token_id=0)
    lengths = dict(lengths)
    new = lengths.pop("config_max_new_tokens", None)
    cfg = GenerationConfig(pad_token_id=0, max_new_tokens=new)
    kw = dict(lengths, generation_config=cfg)
    out = agents.generate(**inputs, adapter_names=["planner", "coder"], do_sample=False,
                          **cache_kwargs(ForkKVCache.from_context(agents, ctx, adapter_names=["planner", "coder"])), **kw)
    made = out.shape[1] - ctx.numel()  # private tokens per row: prompt, padding and new tokens
    capacity = private_capacity(SimpleNamespace(num_shared_tokens=ctx.numel()), agents, inputs["input_ids"].shape[1],
                                kw)
    assert made - (inputs["input_ids"].shape[1] - ctx.numel()) == (new or 20) and made <= capacity


@parametrize("setting", [dict(prompt_lookup_num_tokens=3), dict(max_new_tokens=70)])
def test_the_layout_reads_the_models_generation_config_under_a_passed_one(agents, setting):
    """transformers fills a passed generation_config's unset fields from the model's own; the layout choice reads the
    same merge (before, the passed one alone: a model's prompt_lookup_num_tokens got the static layout, whose 4-D mask
    prompt lookup misread, 0.24 off in scores, silently; a model's max_new_tokens overflowed 20 tokens' buffers)."""
    from transformers import GenerationConfig

    base = agents.get_base_model()
    ctx = _context(20)
    names = ["planner"]
    inputs = batch_inputs(ctx, [ctx[:6].clone()], pad_token_id=0)
    call = GenerationConfig(do_sample=False, pad_token_id=0, max_new_tokens=None if "max_new_tokens" in setting
                            else 12)
    saved = {k: getattr(base.generation_config, k) for k in setting}
    try:
        for k, v in setting.items():
            setattr(base.generation_config, k, v)
        eager = agents.generate(**inputs, adapter_names=names, generation_config=call, disable_compile=True,
                                **cache_kwargs(ForkKVCache.from_context(agents, ctx, adapter_names=names)))
        cache = ForkKVCache.from_context(agents, ctx, adapter_names=names)
        out = agents.generate(**inputs, adapter_names=names, generation_config=call, compile_config=_compile_config(),
                              **cache_kwargs(cache))
    finally:
        for k, v in saved.items():
            setattr(base.generation_config, k, v)
    assert torch.equal(out, eager)
    assert isinstance(cache, StaticForkKVCache) == ("max_new_tokens" in setting)


def test_a_static_plan_follows_adapters_added_to_its_context(monkeypatch):
    """``add_adapters`` with a wider rank after a compiled call replaces the shared layer's residual stacks; the static
    cache kept its decode plan (made for the old ones: the fp16 copy of the old ``B``), and its next compiled call
    stopped inside the kernel. The plan is rebuilt for the residuals as they are; the continuation equals eager."""
    from peft import LoraConfig

    if torch.cuda.is_available():
        pytest.skip("interpreted kernels on CPU tensors")
    monkeypatch.setenv("FORKKV_BACKEND", "triton")
    monkeypatch.setenv("FORKKV_LORA_BACKEND", "torch")
    kv_last = dict(target_modules=["k_proj", "v_proj"], layers_to_transform=[1])
    outs = {}
    with forkkv_hf.config_override(f16_k_pass=True):
        for compiled in (False, True):
            pm = forkkv_hf.enable_forkkv(with_adapters(tiny_llama(layers=2, seed=7, dtype=torch.bfloat16),
                                                       {"a": dict(r=2, **kv_last), "b": dict(r=2, **kv_last)}, seed=7))
            ctx, names = _context(20), ["a", "b", "a", "b"]
            shared = SharedContext.build(pm, ctx, ["a", "b"], progress=False)
            inputs = batch_inputs(ctx, _prompts([3, 2, 4, 1]), pad_token_id=0)
            cache, kw = shared.fork(names), dict(compile_config=_compile_config()) if compiled else {}
            first = _gen(pm, inputs, names, cache, max_new_tokens=3, **kw)
            pm.add_adapter("c", LoraConfig(r=16, lora_alpha=32, target_modules=["k_proj", "v_proj"],
                                           init_lora_weights=False))  # (the others' dtype: else not compiled)
            pm.eval()
            shared.add_adapters(pm, ["c"], progress=False)
            ids = torch.cat([first.sequences, torch.full((4, 1), 9)], 1)
            more = dict(input_ids=ids, attention_mask=torch.cat(
                [inputs["attention_mask"], torch.ones(4, ids.shape[1] - inputs["input_ids"].shape[1],
                                                      dtype=torch.long)], 1))
            outs[compiled] = (first, _gen(pm, more, names, cache, max_new_tokens=3, **kw))
            if compiled:
                assert isinstance(cache, StaticForkKVCache) and all(layer.plan_current() for layer in cache.layers)
    for eager, comp in zip(outs[False], outs[True]):
        _assert_same(comp, eager)


def test_what_the_compiled_step_met_unprepared(monkeypatch):
    """Found by an audit (CPU, compiled against eager): adapters of two dtypes in one layer compiled and then found
    no plan inside the step (a crash naming the wrong cause): now eager, equal; a set_config between two calls of
    one cache was ignored by the kept static plan; a direct forward past the static capacity a compiled call left
    was refused (now the cache goes back to the dynamic layout); a plain model's forward wrapper broke a fullgraph
    trace."""
    from peft import LoraConfig, get_peft_model

    from forkkv_hf.static_cache import StaticForkKVCache

    pm = get_peft_model(tiny_llama(layers=2, seed=3, dtype=torch.bfloat16),
                        LoraConfig(r=4, target_modules=ALL, init_lora_weights=False), adapter_name="a")
    pm.add_adapter("b", LoraConfig(r=2, target_modules=ALL, init_lora_weights=False), autocast_adapter_dtype=False)
    pm = forkkv_hf.enable_forkkv(pm.eval())
    ctx, names = _context(20), ["a", "b", "__base__"]
    inputs = batch_inputs(ctx, _prompts([3, 2, 4], seed=1), pad_token_id=0)
    eager = _gen(pm, inputs, names, ForkKVCache.from_context(pm, ctx, names), max_new_tokens=4)
    _assert_same(_gen(pm, inputs, names, ForkKVCache.from_context(pm, ctx, names), max_new_tokens=4,
                      compile_config=_compile_config()), eager)

    pm = forkkv_hf.enable_forkkv(with_adapters(tiny_llama(layers=2, seed=7), {"a": dict(r=4, target_modules=ALL)}))
    names = ["a", "__base__"]
    inputs = batch_inputs(ctx, _prompts([3, 2], seed=1), pad_token_id=0)
    cache = ForkKVCache.from_context(pm, ctx, names)
    out = _gen(pm, inputs, names, cache, max_new_tokens=4, compile_config=_compile_config())
    assert isinstance(cache, StaticForkKVCache)
    with forkkv_hf.config_override(lowp_rope=not forkkv_hf.get_config().lowp_rope):
        assert not any(layer.plan_current() for layer in cache.layers)
    new = torch.randint(3, 128, (2, 80), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pm(input_ids=torch.cat([out.sequences[:, -1:], new], 1), adapter_names=names, **cache_kwargs(cache))
    assert not isinstance(cache, StaticForkKVCache) and cache.get_seq_length() == out.sequences.shape[1] + 80

    plain = forkkv_hf.enable_forkkv(tiny_llama(layers=2, seed=5))  # no PEFT: its own forward is compiled, fullgraph

    def plain_gen(**kw):
        return plain.generate(**inputs, output_scores=True, return_dict_in_generate=True, pad_token_id=0,
                              max_new_tokens=4, **cache_kwargs(ForkKVCache.from_context(plain, ctx, ["__base__"] * 2)),
                              **kw)

    _assert_same(plain_gen(compile_config=_compile_config()), plain_gen())
    assert _decode_graph_runs() > 0


def test_rows_that_change_which_layers_they_use_between_compiled_calls():
    """Three compiled calls of one shape whose rows use different adapters: a layer no row of the second call used
    (gate_proj's planner rows) planned ``stack=None``, and the third call crashed inside dynamo's recompilation check
    (AttributeError on ``stack.A``; an audit's finding). Every call equals eager."""
    pm = forkkv_hf.enable_forkkv(with_adapters(tiny_llama(layers=1, seed=1), {
        "planner": dict(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        "critic": dict(r=8, lora_alpha=16, target_modules=["k_proj", "v_proj", "gate_proj"])}, seed=1))
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(3, 128, (12,), generator=g)
    inputs = batch_inputs(ctx, [torch.randint(3, 128, (3,), generator=g) for _ in range(2)], pad_token_id=0)
    shared = SharedContext.build(pm, ctx, ["planner", "critic"], progress=False)
    for rows in (["planner", "critic"], ["critic", "critic"], ["planner", "planner"]):
        kw = dict(adapter_names=rows, max_new_tokens=3, do_sample=False, pad_token_id=0)
        compiled = pm.generate(**inputs, compile_config=_compile_config("eager"), **kw,
                               **cache_kwargs(shared.fork(rows)))
        assert torch.equal(compiled, pm.generate(**inputs, **kw, **cache_kwargs(shared.fork(rows)))), rows
