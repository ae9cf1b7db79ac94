"""ForkKVStore (DualRadixTree): forks over cached contexts equal from-scratch builds, only missing tokens are run,
identities are fingerprints, pins hold, bytes are accounted exactly, and nothing shared is ever written."""

from __future__ import annotations

import gc

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import LoraConfig

import forkkv_hf
from forkkv_hf import ForkKVCache, ForkKVStore, SharedContext, batch_inputs, cache_kwargs
from forkkv_hf.cache import ForkKVLayer
from forkkv_hf.ops.dispatch import residual_attention_torch
from cases import parametrize
from models import tiny_llama, with_adapters

ALL = ["q_proj", "k_proj", "v_proj", "o_proj"]
#: adapters with LoRA on k_proj/v_proj (they get residual trees); "writer" has none
KV_AGENTS = ("planner", "coder", "critic")
AGENT_SPECS = {
    "planner": dict(r=4, target_modules=ALL),
    "coder": dict(r=2, lora_alpha=4, target_modules=["k_proj", "v_proj"], lora_bias=True),
    "critic": dict(r=3, lora_alpha=6, target_modules=["k_proj", "v_proj", "gate_proj"], use_rslora=True),
    "writer": dict(r=2, target_modules=["q_proj", "o_proj"]),
}


def _agents(seed=5):
    return forkkv_hf.enable_forkkv(with_adapters(tiny_llama(layers=2, seed=seed), AGENT_SPECS, seed=seed))


class TokenCounter:
    """Counts the tokens the model's decoder runs over (a hook on the embedding), independently of the store."""

    def __init__(self, model):
        self.tokens = 0
        model.get_base_model().model.embed_tokens.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.tokens += args[0].numel()

    def run(self, fn, *args, **kwargs):
        before = self.tokens
        result = fn(*args, **kwargs)
        return result, self.tokens - before


@pytest.fixture(scope="module")
def agents():
    pm = _agents()
    return pm, TokenCounter(pm)


def _ids(n, seed, low=3, high=128):
    return torch.randint(low, high, (n,), generator=torch.Generator().manual_seed(seed))


def _attention_outputs(cache: ForkKVCache, rows, seed=0) -> list[torch.Tensor]:
    """Per layer, ResidualAttention of fixed random queries (and private K/V) over the cache's shared context."""
    g = torch.Generator().manual_seed(seed)
    outs = []
    for layer in cache.layers:
        Hkv, D = layer.shared.key.shape[1], layer.shared.key.shape[-1]
        B = len(rows)
        q = torch.randn(B, 2 * Hkv, 3, D, generator=g)
        k, v = torch.randn(B, Hkv, 3, D, generator=g), torch.randn(B, Hkv, 3, D, generator=g)
        view, _ = ForkKVLayer(layer.shared, tuple(rows), cache.residual).update(k, v)
        outs.append(residual_attention_torch(q, view, None, D**-0.5))
    return outs


def _from_scratch(pm, ids, rows, residual="kv") -> list[torch.Tensor]:
    names = list(dict.fromkeys(r for r in rows if r != "__base__"))
    cache = SharedContext.build(pm, ids, names, progress=False).fork(list(rows), residual=residual)
    return _attention_outputs(cache, rows)


def _assert_outputs_close(got, want):
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)


# White-box below (trees, nodes, leases): the invariants of the byte ledger and of pinning are checked against the
# tensors the trees hold; no public view lists the nodes (report() gives only their totals).
def _trees(store):
    return [*store._base_trees.values(), *store._residual_trees.values()]


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        st_ = t.untyped_storage()
        if st_.nbytes() and (t.device, st_.data_ptr()) not in seen:
            seen.add((t.device, st_.data_ptr()))
            total += st_.nbytes()
    return total


def _held_bytes(store, live_caches) -> int:
    """Bytes of every tensor the store's trees hold or a live (unreleased) cache reads, each storage once."""
    tensors = []
    for tree in _trees(store):
        tensors += [t for t in tree.root.tensors if t is not None]
        for node in tree.nodes():
            tensors += [t for t in node.tensors if t is not None]
    for cache in live_caches:
        for layer in cache.shared.layers:
            tensors += [layer.key, layer.value, layer.cos, layer.sin]
            tensors += [t for res in (layer.k_res, layer.v_res) if res is not None for t in (res.u, res.B)]
    return _storage_bytes(tensors)


def _attached(store, node) -> bool:
    while node.parent is not None:
        node = node.parent
    return any(node is tree.root for tree in _trees(store))


def _check_invariants(store, live):
    """Bytes match the tensors held; pinned nodes are in the trees; over budget only when nothing can go."""
    assert store.nbytes == _held_bytes(store, [entry["cache"] for entry in live])
    assert store.report().total_bytes == store.nbytes
    for lease in store._leases.values():
        for node in lease.nodes:
            assert node.ref_count > 0 and _attached(store, node)
    if store.max_bytes is not None and store.nbytes > store.max_bytes:
        for tree in _trees(store):
            for node in tree.nodes():
                assert node.ref_count or node.children, "an unpinned leaf survived over budget"


class NaiveStore:
    """What a perfect store caches: every sequence forked/extended (per adapter for residuals), until evicted."""

    def __init__(self):
        self.base: list[tuple] = []
        self.residual = {name: [] for name in KV_AGENTS}

    @staticmethod
    def lcp(seqs, seq) -> int:
        best = 0
        for s in seqs:
            n = 0
            while n < min(len(s), len(seq)) and s[n] == seq[n]:
                n += 1
            best = max(best, n)
        return best

    def tokens_to_run(self, seq, names) -> int:
        """Base-model tokens of a fork/extend: from the earliest position the base or a residual tree misses."""
        T = len(seq)
        starts = [self.lcp(self.residual[n], seq) for n in names if n in self.residual]
        starts = [m for m in starts if m < T]
        m = self.lcp(self.base, seq)
        return 0 if m == T and not starts else T - min([m, *starts])

    def following(self, seq) -> list[str]:
        m = self.lcp(self.base, seq)
        return [n for n in KV_AGENTS if m and self.residual[n] and self.lcp(self.residual[n], seq) >= m]

    def add(self, seq, names):
        self.base.append(seq)
        for n in names:
            if n in self.residual:
                self.residual[n].append(seq)

    def keep_only(self, live):
        self.base = [e["seq"] for e in live]
        self.residual = {n: [e["seq"] for e in live if n in e["rows"]] for n in KV_AGENTS}


NAMES = [*AGENT_SPECS, "__base__"]
_seq_pick = st.tuples(st.integers(0, 99), st.integers(0, 100), st.lists(st.integers(3, 6), max_size=6))
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("fork"), _seq_pick, st.lists(st.sampled_from(NAMES), min_size=1, max_size=3),
                  st.sampled_from(["kv", "kv", "v", "none"])),
        st.tuples(st.just("extend"), _seq_pick, st.one_of(st.none(), st.lists(st.sampled_from(NAMES[:4]), max_size=2))),
        st.tuples(st.just("release"), st.integers(0, 99)),
        st.tuples(st.just("evict")),
    ),
    min_size=1,
    max_size=10,
)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, budget=st.one_of(st.none(), st.integers(0, 40_000)))
def test_store_against_naive_model(agents, ops, budget):
    """Random fork/extend/release/evict programs over random, often overlapping token sequences: every fork's
    attention equals a from-scratch build of the same tokens; without a budget the base model runs over exactly
    the tokens a perfect cache misses (with one, at least those); bytes match the tensors held; pins hold; what a
    live cache reads is never changed."""
    pm, counter = agents
    store = ForkKVStore(pm, max_bytes=budget, progress=False)
    naive = NaiveStore()
    seqs = [tuple(_ids(10, seed=1, high=7).tolist())]
    live = []

    def pick(choice):
        i, cut, tail = choice
        src = seqs[i % len(seqs)]
        seq = src[: len(src) * cut // 100] + tuple(tail)
        return seq or src

    for op in ops:
        if op[0] in ("fork", "extend"):
            seq = pick(op[1])
            ids = torch.tensor(seq)
            if op[0] == "fork":
                rows, residual = op[2], op[3]
                names = [] if residual == "none" else [r for r in rows if r != "__base__"]
                expected = naive.tokens_to_run(seq, names)
                cache, ran = counter.run(store.fork, ids, rows, residual=residual)
                outputs = _attention_outputs(cache, rows)
                _assert_outputs_close(outputs, _from_scratch(pm, ids, rows, residual))
                live.append(dict(cache=cache, seq=seq, rows=set(names), outputs=outputs, all_rows=rows))
            else:
                names = naive.following(seq) if op[2] is None else list(op[2])
                expected = naive.tokens_to_run(seq, names)
                ran_store, ran = counter.run(store.extend, ids, op[2])
                assert ran_store == ran
            if budget is None:
                assert ran == expected, (op, ran, expected)
            else:
                assert ran >= expected
            naive.add(seq, names)
            seqs.append(seq)
        elif op[0] == "release" and live:
            entry = live.pop(op[1] % len(live))
            assert store.release(entry["cache"])
            assert not store.release(entry["cache"])  # idempotent
        elif op[0] == "evict":
            store.evict(0)
            naive.keep_only(live)
        _check_invariants(store, live)
    for entry in live:  # copy-on-write: splits, merges and evictions never changed what a live cache reads
        for a, b in zip(_attention_outputs(entry["cache"], entry["all_rows"]), entry["outputs"]):
            assert torch.equal(a, b)
        store.release(entry["cache"])
    store.evict(0)
    assert store.report().live_caches == 0 and store.nbytes == 0


def test_second_fork_runs_only_the_new_tokens(agents):
    pm, counter = agents
    store = ForkKVStore(pm, progress=False)
    ctx = _ids(40, seed=11)
    names = ["planner", "coder", "__base__"]
    first, ran = counter.run(store.fork, ctx, names)
    assert ran == 40
    longer = torch.cat([ctx, _ids(7, seed=12)])
    second, ran = counter.run(store.fork, longer, names)
    assert ran == 7 and store.stats.base_model_tokens == 47
    _assert_outputs_close(_attention_outputs(second, names), _from_scratch(pm, longer, names))
    # a committed turn: extend runs the new tokens (residuals of the agents on this transcript included) ...
    turn = torch.cat([longer, _ids(5, seed=13)])
    assert counter.run(store.extend, turn)[1] == 5
    # ... and the next fork runs nothing
    third, ran = counter.run(store.fork, turn, ["coder", "planner"])
    assert ran == 0
    rows = ["coder", "planner"]
    _assert_outputs_close(_attention_outputs(third, rows), _from_scratch(pm, turn, rows))
    stats = store.report().stats
    assert stats.base_tokens_requested == 40 + 47 + 52 + 52 and stats.base_tokens_hit == 0 + 40 + 47 + 52
    assert stats.base_model_tokens == 52 and stats.prefill_tokens_saved == 191 - 52


def test_extend_defaults_to_the_agents_of_the_transcript(agents):
    """``extend(ids)`` computes the residuals of the adapters that cover the transcript's cached part, not of
    adapters that only worked on other contexts."""
    pm, counter = agents
    store = ForkKVStore(pm, progress=False)
    doc, other = _ids(16, seed=23), _ids(16, seed=24)
    store.fork(doc, ["planner", "coder"])
    store.fork(other, ["critic"])
    longer = torch.cat([doc, _ids(6, seed=25)])
    assert counter.run(store.extend, longer)[1] == 6
    assert counter.run(store.fork, longer, ["planner", "coder"])[1] == 0
    assert counter.run(store.fork, longer, ["critic"])[1] == 22  # its residuals were not computed by extend
    assert counter.run(store.extend, _ids(5, seed=26))[1] == 5  # nothing cached: base only
    assert counter.run(store.fork, _ids(5, seed=26), ["critic"])[1] == 5


def test_new_adapter_on_cached_context_computes_only_its_residuals(agents):
    pm, counter = agents
    store = ForkKVStore(pm, progress=False)
    ctx = _ids(30, seed=21)
    planner = store.fork(ctx, ["planner"])
    base_before = store.report().base_bytes
    critic, ran = counter.run(store.fork, ctx, ["critic"])
    assert ran == 30  # a base pass over the span for the residuals ...
    assert store.report().base_bytes == base_before  # ... with no K/V kept
    assert critic.layers[0].shared.key.data_ptr() == planner.layers[0].shared.key.data_ptr()  # one base copy
    _assert_outputs_close(_attention_outputs(critic, ["critic"]), _from_scratch(pm, ctx, ["critic"]))
    # an adapter without LoRA on k_proj/v_proj needs no residual: nothing runs
    assert counter.run(store.fork, ctx, ["writer", "__base__"])[1] == 0


def test_changed_adapter_under_same_name_gets_fresh_residuals():
    pm = _agents(seed=6)
    counter = TokenCounter(pm)
    store = ForkKVStore(pm, progress=False)
    ctx = _ids(25, seed=31)
    old_fp = store.adapter_identity("planner")
    old = _attention_outputs(store.fork(ctx, ["planner"]), ["planner"])
    with torch.no_grad():  # in-place update of the weights (as an optimizer step or load_state_dict does)
        pm.get_base_model().model.layers[0].self_attn.k_proj.lora_A["planner"].weight.mul_(1.5)
    assert store.adapter_identity("planner") != old_fp
    cache, ran = counter.run(store.fork, ctx, ["planner"])
    assert ran == 25  # residuals recomputed; the base K/V are still served from the store
    new = _attention_outputs(cache, ["planner"])
    _assert_outputs_close(new, _from_scratch(pm, ctx, ["planner"]))
    assert (new[0] - old[0]).abs().max() > 1e-3

    # reloaded under the same name with other weights (new modules)
    pm.set_adapter("coder")  # PEFT warns when the active adapter is deleted
    pm.delete_adapter("planner")
    cfg = LoraConfig(init_lora_weights=False, lora_alpha=8, **AGENT_SPECS["planner"])
    pm.add_adapter("planner", cfg)
    pm.eval()
    cache, ran = counter.run(store.fork, ctx, ["planner"])
    assert ran == 25
    _assert_outputs_close(_attention_outputs(cache, ["planner"]), _from_scratch(pm, ctx, ["planner"]))
    # the residual trees of weights the model no longer has are dropped (unpinned parts); white-box: the report counts
    # nodes, not whose they are
    live = {tree.identity[1] for tree in store._residual_trees.values()}
    assert old_fp not in live and store.adapter_identity("planner") in live


def test_same_weights_under_another_name_share_residuals():
    pm = _agents(seed=7)
    counter = TokenCounter(pm)
    store = ForkKVStore(pm, progress=False)
    ctx = _ids(20, seed=41)
    store.fork(ctx, ["coder"])
    pm.add_adapter("coder_twin", LoraConfig(init_lora_weights=False, **AGENT_SPECS["coder"]))
    with torch.no_grad():
        for module in pm.modules():
            if hasattr(module, "lora_A") and "coder" in module.lora_A:
                module.lora_A["coder_twin"].load_state_dict(module.lora_A["coder"].state_dict())
                module.lora_B["coder_twin"].load_state_dict(module.lora_B["coder"].state_dict())
    pm.eval()
    assert store.adapter_identity("coder_twin") == store.adapter_identity("coder")
    cache, ran = counter.run(store.fork, ctx, ["coder_twin", "coder"])
    assert ran == 0
    _assert_outputs_close(_attention_outputs(cache, ["coder_twin", "coder"]),
                          _from_scratch(pm, ctx, ["coder_twin", "coder"]))


@parametrize("target", ["adapter", "base"])
def test_writes_through_data_are_recomputed(target):
    """``.data`` writes move no version counter. The default content checks see them (to the base weights and to
    the adapters) and the store recomputes; with ``set_weight_checks(model, "versions")`` only a store with
    ``rehash_adapters=True`` does (documented)."""
    pm = _agents(seed=8)
    ctx = _ids(12, seed=51)
    store = ForkKVStore(pm, progress=False)
    before = _attention_outputs(store.fork(ctx, ["critic"]), ["critic"])
    layer = pm.get_base_model().model.layers[1].self_attn.v_proj
    weight = layer.lora_B["critic"].weight if target == "adapter" else layer.base_layer.weight
    weight.data.mul_(2.0)
    after = _attention_outputs(store.fork(ctx, ["critic"]), ["critic"])
    _assert_outputs_close(after, _from_scratch(pm, ctx, ["critic"]))
    assert (after[1] - before[1]).abs().max() > 1e-3  # the write does change the context's K/V

    forkkv_hf.set_weight_checks(pm, "versions")
    trusting, rehashing = ForkKVStore(pm, progress=False), ForkKVStore(pm, progress=False, rehash_adapters=True)
    fps = [(s.base_identity(), s.adapter_identity("critic")) for s in (trusting, rehashing)]
    weight.data.mul_(0.5)
    assert (trusting.base_identity(), trusting.adapter_identity("critic")) == fps[0]  # versions: stale
    assert (rehashing.base_identity(), rehashing.adapter_identity("critic")) != fps[1]
    _assert_outputs_close(_attention_outputs(rehashing.fork(ctx, ["critic"]), ["critic"]),
                          _from_scratch(pm, ctx, ["critic"]))


def test_changed_base_weights_invalidate_the_base_tree():
    pm = _agents(seed=9)
    counter = TokenCounter(pm)
    store = ForkKVStore(pm, progress=False)
    ctx = _ids(18, seed=61)
    store.fork(ctx, ["planner"])
    fp = store.base_identity()
    with torch.no_grad():
        pm.get_base_model().model.layers[0].self_attn.k_proj.base_layer.weight.add_(0.05)
    assert store.base_identity() != fp
    cache, ran = counter.run(store.fork, ctx, ["planner"])
    assert ran == 18
    _assert_outputs_close(_attention_outputs(cache, ["planner"]), _from_scratch(pm, ctx, ["planner"]))
    assert store.report().base_nodes == 1  # the stale tree is gone (nothing pinned it)


def test_adding_an_adapter_keeps_the_base_identity():
    pm = _agents(seed=10)
    store = ForkKVStore(pm, progress=False)
    fp = store.base_identity()
    pm.add_adapter("mlp_only", LoraConfig(r=2, target_modules=["up_proj"]))  # wraps modules not wrapped before
    assert store.base_identity() == fp


def test_multi_turn_generate_equals_from_context(agents):
    """A planner/coder/critic workflow through the store generates exactly what a fresh
    ``ForkKVCache.from_context`` over each turn's transcript generates, and never writes a node."""
    pm, counter = agents
    store = ForkKVStore(pm, progress=False)
    transcript = _ids(24, seed=71)
    store.extend(transcript, ["planner", "coder", "critic"])
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    for turn, agent in enumerate(["planner", "coder", "critic", "planner"]):
        prompt = _ids(3 + turn, seed=80 + turn)
        rows = [agent, agent]
        inputs = batch_inputs(transcript, [prompt, prompt[:2]], pad_token_id=0)
        cache, ran = counter.run(store.fork, transcript, rows)
        assert ran == 0  # the previous turn was committed with every agent's residuals
        nodes = [n for tree in _trees(store) for n in tree.nodes()]
        snapshot = [[t.clone() for t in n.tensors if t is not None] for n in nodes]
        out = pm.generate(**inputs, adapter_names=rows, **gen, **cache_kwargs(cache))
        for n, before in zip(nodes, snapshot):
            for a, b in zip([t for t in n.tensors if t is not None], before):
                assert torch.equal(a, b)
        ref = pm.generate(**inputs, adapter_names=rows, **gen,
                          **cache_kwargs(ForkKVCache.from_context(pm, transcript, rows, progress=False)))
        assert torch.equal(out.sequences, ref.sequences)
        for a, b in zip(out.scores, ref.scores):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        store.release(cache)
        reply = out.sequences[0, inputs["input_ids"].shape[1]:]
        transcript = torch.cat([transcript, prompt, reply])
        assert counter.run(store.extend, transcript)[1] == prompt.numel() + reply.numel()
    cache = store.fork(transcript, ["planner"])
    rep = store.report()
    assert rep.base_nodes == 1 and rep.stats.merges > 0  # one growing transcript: merged, read in place
    assert rep.view_bytes == 0
    node = next(store._base_trees[(store.base_identity(),)].nodes())  # white-box: which storage the cache reads
    assert cache.layers[0].shared.key.data_ptr() == node.tensors[0].data_ptr()


def test_eviction_is_lru_and_spares_pinned_nodes(agents):
    pm, counter = agents
    store = ForkKVStore(pm, progress=False)
    a, b, c = _ids(20, seed=91), _ids(20, seed=92), _ids(20, seed=93)
    pinned = store.fork(a, ["planner"])
    store.extend(b, ["planner"])
    store.extend(c, ["planner"])
    one_context = store.report().base_bytes // 3
    store.max_bytes = store.nbytes - one_context // 2  # room for all but one context
    store.extend(c)  # touches c; the budget is enforced after each call
    assert counter.run(store.extend, c, ["planner"])[1] == 0
    assert counter.run(store.extend, b, ["planner"])[1] == 20  # b was least recently used: evicted
    assert counter.run(store.fork, a, ["planner"])[1] == 0  # pinned: never evicted
    _check_invariants(store, [dict(cache=pinned)])


def test_released_by_garbage_collection(agents):
    pm, _ = agents
    store = ForkKVStore(pm, progress=False)
    cache = store.fork(_ids(10, seed=95), ["planner", "coder"])
    rep = store.report()
    assert rep.live_caches == 1 and rep.pinned_bytes > 0
    # what evict(0) cannot free while the cache lives (its nodes and its agents' factors) is what is pinned (before:
    # the factors were left out)
    assert store.evict(0) == 0 and store.report().pinned_bytes == store.nbytes - store.report().view_bytes
    del cache
    gc.collect()
    rep = store.report()
    assert rep.live_caches == 0 and rep.pinned_bytes == 0 and rep.view_bytes == 0
    assert store.evict(0) > 0 and store.nbytes == 0


def test_plain_model_base_rows():
    m = forkkv_hf.enable_forkkv(tiny_llama(layers=2, seed=3))
    store = ForkKVStore(m, progress=False)
    ctx = _ids(15, seed=96)
    store.fork(ctx[:9], ["__base__"])
    cache = store.fork(ctx, ["__base__", "__base__"])
    inputs = batch_inputs(ctx, [torch.tensor([5, 6]), torch.tensor([7])], pad_token_id=0)
    a = m.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0, **cache_kwargs(cache))
    forkkv_hf.disable_forkkv(m)
    b = m.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_build_continuation_equals_build(agents):
    pm, _ = agents
    ctx = _ids(33, seed=97)
    names = ["planner", "coder", "critic"]
    whole = SharedContext.build(pm, ctx, names, progress=False)
    head = SharedContext.build(pm, ctx[:14], names, progress=False)
    tail = SharedContext.build_continuation(pm, ctx[14:], names, past=[(l.key, l.value) for l in head.layers],
                                            chunk_size=8, progress=False)
    assert tail.start == 14 and tail.num_tokens == 19
    for w, h, t in zip(whole.layers, head.layers, tail.layers):
        torch.testing.assert_close(torch.cat([h.key, t.key], 2), w.key, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.cat([h.cos, t.cos]), w.cos)
        for kind in ("k_res", "v_res"):
            hu, tu, wu = (getattr(x, kind).u for x in (h, t, w))
            torch.testing.assert_close(torch.cat([hu, tu], 1), wu, rtol=1e-5, atol=1e-5)
    residual_only = SharedContext.build_continuation(pm, ctx[14:], ["critic"], keep_kv=False, progress=False,
                                                     past=[(l.key, l.value) for l in head.layers])
    assert residual_only.layers[0].key.shape[-2] == 0
    critic_u = tail.layers[1].v_res.u[tail.layers[1].v_res.slot["critic"], :, :3]
    torch.testing.assert_close(residual_only.layers[1].v_res.u[0], critic_u, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="segment starting at position 14"):
        tail.fork(["planner"])
    with pytest.raises(ValueError, match="segment starting at position 14"):  # the constructor served it
        forkkv_hf.ForkKVCache(tail, ["planner"])
    with pytest.raises(ValueError, match="different numbers of tokens"):
        uneven = [(head.layers[0].key, head.layers[0].value[:, :, :3])] * 2
        SharedContext.build_continuation(pm, ctx[14:], names, past=uneven)


def test_errors(agents):
    pm, _ = agents
    store = ForkKVStore(pm, progress=False)
    ctx = _ids(8, seed=98)
    with pytest.raises(TypeError, match="one name per row"):
        store.fork(ctx, "planner")
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"):
        store.fork(ctx, ["nope"])
    with pytest.raises(ValueError, match="residual must be one of"):
        store.fork(ctx, ["planner"], residual="k")
    with pytest.raises(ValueError, match="max_bytes must be"):
        ForkKVStore(pm, max_bytes=-1)
    other = ForkKVStore(pm, progress=False)
    with pytest.raises(ValueError, match="not forked from this ForkKVStore"):
        store.release(other.fork(ctx, ["planner"]))
    pm.train()
    try:
        with pytest.raises(ValueError, match="training mode"):
            store.fork(ctx, ["planner"])
    finally:
        pm.eval()


def test_what_the_store_cannot_take_is_refused_clearly():
    """A deep copy of a store kept the original model's layers and storages (its forks refused, evict a KeyError),
    a pickle failed on a weakref: both refused by name. A continuation's past of other heads failed inside
    torch.cat, a generator past was used up by its first reading, a bf16 past was taken by an fp32 model; a token
    outside the vocabulary was reported at its index in the uncached tail."""
    import copy
    import pickle

    pm = _agents()
    store = ForkKVStore(pm, progress=False)
    for clone in (copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError, match="a ForkKVStore cannot be pickled or copied"):
            clone(store)
    ids = _ids(12, seed=1)
    head = SharedContext.build(pm, ids[:8], [], progress=False)
    past = [(l.key, l.value) for l in head.layers]
    with pytest.raises(ValueError, match="past layer 0 has 4 K/V heads"):
        SharedContext.build_continuation(pm, ids[8:], [], past=[(k.repeat(1, 2, 1, 1), v) for k, v in past])
    with pytest.raises(TypeError, match="past layer 0 holds torch.bfloat16"):
        SharedContext.build_continuation(pm, ids[8:], [], past=[(k.bfloat16(), v.bfloat16()) for k, v in past])
    tail = SharedContext.build_continuation(pm, ids[8:], [], past=(p for p in past), progress=False)
    whole = SharedContext.build(pm, ids, [], progress=False)
    torch.testing.assert_close(tail.layers[0].key, whole.layers[0].key[:, :, 8:], rtol=1e-5, atol=1e-5)
    store.fork(ids, ["__base__"])
    bad = torch.cat([ids, torch.tensor([500])])
    with pytest.raises(ValueError, match="token id 500 at index 12"):
        store.fork(bad, ["__base__"])
