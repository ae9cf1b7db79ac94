"""Nothing is served from weights the model no longer has: base weights and adapters written in place, through
``.data`` or by ``load_state_dict``, adapters deleted and re-added, contexts saved and loaded in other processes.
Each case is refused with a message that says what changed and what to do, or (store, batched LoRA) recomputed and
equal to a fresh run."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import LoraConfig

import forkkv_hf
from forkkv_hf import ForkKVStore, SharedContext, StaleContextError, batch_inputs, cache_kwargs
from forkkv_hf.peft.batched_lora import disable_batched_lora, enable_batched_lora
from cases import parametrize
from models import tiny_llama, with_adapters

SPECS = {"planner": dict(r=4), "coder": dict(r=2, lora_bias=True, target_modules=["k_proj", "v_proj", "up_proj"])}
ROWS = ["planner", "coder", "__base__"]


def _agents(seed=0):
    return forkkv_hf.enable_forkkv(with_adapters(tiny_llama(layers=2, seed=seed), SPECS, seed=seed))


def _ctx(seed=5, T=14):
    return torch.randint(3, 128, (T,), generator=torch.Generator().manual_seed(seed))


def _inputs(ctx, rows=ROWS):
    return batch_inputs(ctx, [torch.tensor([4 + i, 9]) for i in range(len(rows))])


def _gen(pm, ctx, cache, rows=ROWS):
    return pm.generate(**_inputs(ctx, rows), adapter_names=list(rows), do_sample=False, max_new_tokens=4,
                       pad_token_id=0, **cache_kwargs(cache))


def _fresh(pm, ctx, rows=ROWS):
    names = [r for r in dict.fromkeys(rows) if r != "__base__"]
    return _gen(pm, ctx, SharedContext.build(pm, ctx, names, progress=False).fork(list(rows)), rows)


def _base(pm):
    return pm.get_base_model().model


def _write(pm, tensor_of, how: str, delta=0.05):
    """Change one weight (``tensor_of(pm)``) in place under no_grad, through ``.data``, or by load_state_dict."""
    t = tensor_of(pm)
    if how == "in_place":
        with torch.no_grad():
            t.add_(delta)
    elif how == "data":
        t.data.add_(delta)
    else:
        name = next(n for n, p in pm.state_dict(keep_vars=True).items() if p is t)
        state = pm.state_dict()
        state[name] = state[name] + delta
        pm.load_state_dict(state)


BASE_WEIGHTS = {
    "k_proj": lambda pm: _base(pm).layers[0].self_attn.k_proj.base_layer.weight,
    "mlp": lambda pm: _base(pm).layers[0].mlp.down_proj.weight,  # no K/V projection, but feeds layer 1's K/V
    "embedding": lambda pm: _base(pm).embed_tokens.weight,
}
WRITES = ["in_place", "data", "load_state_dict"]


# --------------------------------------------------------------------------------------------------- base weights
@parametrize("how", WRITES)
@parametrize("where", list(BASE_WEIGHTS))
def test_base_weights_changed_after_build_are_refused(where, how):
    pm, ctx = _agents(), _ctx()
    shared = SharedContext.build(pm, ctx, ["planner", "coder"], progress=False)
    early = shared.fork(ROWS)
    _write(pm, BASE_WEIGHTS[where], how)
    for cache in (early, shared.fork(ROWS)):
        with pytest.raises(StaleContextError, match=r"base weights changed since this shared context.*SharedContext"):
            _gen(pm, ctx, cache)
    _fresh(pm, ctx)  # a context built on the new weights is accepted
    assert _key_change(shared, SharedContext.build(pm, ctx, [], progress=False)) > 1e-4  # the write did matter


@parametrize("which", ["base", "adapter"])
def test_direct_forward_on_a_fresh_fork_is_checked(which):
    """A plain ``model(...)`` call on a fresh fork is checked like a generate; later forwards of the same fork (its
    decode steps) and a generate's own prefill forward are not checked again."""
    pm, ctx = _agents(seed=2), _ctx(seed=3)
    shared = SharedContext.build(pm, ctx, ["planner", "coder"], progress=False)
    inputs = _inputs(ctx)
    ok = pm(**inputs, adapter_names=ROWS, past_key_values=shared.fork(ROWS), logits_to_keep=2)  # unchanged weights: served
    assert ok.logits.shape[:2] == (len(ROWS), 2)
    writes = {"base": (BASE_WEIGHTS["k_proj"], r"base weights changed"),
              "adapter": (ADAPTER_WEIGHTS["lora_A"], r"adapter 'planner' changed")}
    tensor_of, message = writes[which]
    _write(pm, tensor_of, "data", delta=0.3)
    with pytest.raises(StaleContextError, match=message):
        pm(**inputs, adapter_names=ROWS, past_key_values=shared.fork(ROWS), logits_to_keep=2)


def test_failed_generate_leaves_no_pass_for_a_direct_forward():
    """The weight check a generate did for its own prefill does not excuse a later direct forward when the generate
    failed before its first forward."""
    pm, ctx = _agents(seed=2), _ctx(seed=3)
    shared = SharedContext.build(pm, ctx, ["planner", "coder"], progress=False)
    cache = shared.fork(ROWS)
    with pytest.raises(Exception):
        pm.generate(**_inputs(ctx), adapter_names=ROWS, past_key_values=cache, max_new_tokens=-1)
    _write(pm, BASE_WEIGHTS["k_proj"], "data")
    with pytest.raises(StaleContextError, match="base weights changed"):
        pm(**_inputs(ctx), adapter_names=ROWS, past_key_values=cache, logits_to_keep=2)


def _key_change(old, new) -> float:
    return max((a.key - b.key).abs().max().item() for a, b in zip(old.layers, new.layers))


@parametrize("how", WRITES)
def test_store_recomputes_after_base_weights_change(how):
    pm, ctx = _agents(seed=1), _ctx(seed=6)
    store = ForkKVStore(pm, progress=False)
    early = store.fork(ctx, ROWS)
    _write(pm, BASE_WEIGHTS["mlp"], how)
    with pytest.raises(StaleContextError, match="base weights changed"):
        _gen(pm, ctx, early)  # forked before the write: refused
    assert torch.equal(_gen(pm, ctx, store.fork(ctx, ROWS)), _fresh(pm, ctx))  # recomputed


def test_identical_weights_written_again_are_accepted():
    """Stamps move but contents do not (``load_state_dict`` of the same state): nothing to refuse."""
    pm, ctx = _agents(seed=2), _ctx(seed=7)
    shared = SharedContext.build(pm, ctx, ["planner", "coder"], progress=False)
    want = _gen(pm, ctx, shared.fork(ROWS))
    pm.load_state_dict(pm.state_dict())
    forkkv_hf.set_weight_checks(pm, "versions")  # the stamps moved: probes decide
    assert torch.equal(_gen(pm, ctx, shared.fork(ROWS)), want)


def test_versions_mode_sees_writes_through_the_tensor_but_not_through_data():
    """The documented trade-off of ``set_weight_checks(model, "versions")``: free, blind to ``.data`` writes."""
    pm, ctx = _agents(seed=3), _ctx(seed=8)
    forkkv_hf.set_weight_checks(pm, "versions")
    shared = SharedContext.build(pm, ctx, ["planner", "coder"], progress=False)
    _write(pm, BASE_WEIGHTS["k_proj"], "data")
    _gen(pm, ctx, shared.fork(ROWS))  # served although the weights changed:
    assert _key_change(shared, SharedContext.build(pm, ctx, [], progress=False)) > 1e-4
    _write(pm, BASE_WEIGHTS["k_proj"], "in_place")
    with pytest.raises(StaleContextError, match="base weights changed"):
        _gen(pm, ctx, shared.fork(ROWS))
    forkkv_hf.set_weight_checks(pm, "content")
    with pytest.raises(StaleContextError):
        _gen(pm, ctx, shared.fork(ROWS))
    with pytest.raises(ValueError, match=r"weight checks must be one of \('content', 'versions'\)"):
        forkkv_hf.set_weight_checks(pm, "fast")


# ------------------------------------------------------------------------------------------------------- adapters
ADAPTER_WEIGHTS = {
    "lora_A": lambda pm: _base(pm).layers[0].self_attn.k_proj.lora_A["planner"].weight,
    "lora_B": lambda pm: _base(pm).layers[1].self_attn.v_proj.lora_B["planner"].weight,
    "lora_bias": lambda pm: _base(pm).layers[1].self_attn.v_proj.lora_B["coder"].bias,
}


@parametrize("how", WRITES)
@parametrize("which", list(ADAPTER_WEIGHTS))
def test_adapter_written_after_build_is_refused(which, how):
    pm, ctx = _agents(seed=4), _ctx(seed=9)
    shared = SharedContext.build(pm, ctx, ["planner", "coder"], progress=False)
    _gen(pm, ctx, shared.fork(ROWS))  # batched LoRA now holds the factors in its stacks
    _write(pm, ADAPTER_WEIGHTS[which], how, delta=0.3)
    name = "coder" if which == "lora_bias" else "planner"
    with pytest.raises(StaleContextError, match=rf"adapter '{name}' changed since this shared context.*were written"):
        _gen(pm, ctx, shared.fork(ROWS))
    other = [r for r in ROWS if r != name]  # rows of the other adapter still read valid residuals
    assert torch.equal(_gen(pm, ctx, shared.fork(other), other), _fresh(pm, ctx, other))


def test_deleted_adapter_is_reported_as_deleted():
    pm, ctx = _agents(seed=5), _ctx(seed=10)
    shared = SharedContext.build(pm, ctx, ["planner", "coder"], progress=False)
    cache = shared.fork(["coder", "planner"])
    pm.set_adapter("planner")
    pm.delete_adapter("coder")
    with pytest.raises(StaleContextError, match=r"adapter\(s\) \['coder'\] were deleted from the model"):
        cache.shared.check_weights(pm, ["coder", "planner"])
    assert torch.equal(_gen(pm, ctx, shared.fork(["planner"]), ["planner"]), _fresh(pm, ctx, ["planner"]))


@parametrize("same_weights", [False, True])
def test_readded_adapter(same_weights):
    """Deleted and added again: with other weights reported as such; with the same weights the residuals are still
    exact and are served."""
    pm, ctx = _agents(seed=6), _ctx(seed=11)
    shared = SharedContext.build(pm, ctx, ["planner", "coder"], progress=False)
    _gen(pm, ctx, shared.fork(ROWS))
    saved = {k: v.clone() for k, v in pm.state_dict().items() if ".coder." in k}
    pm.set_adapter("planner")
    pm.delete_adapter("coder")
    pm.add_adapter("coder", LoraConfig(init_lora_weights=False, lora_alpha=8, **SPECS["coder"]))
    pm.eval()
    if same_weights:
        pm.load_state_dict({**pm.state_dict(), **saved})
        assert torch.equal(_gen(pm, ctx, shared.fork(ROWS)), _fresh(pm, ctx))
    else:
        with pytest.raises(StaleContextError, match="adapter 'coder' changed .* deleted and added again, or reloaded"):
            _gen(pm, ctx, shared.fork(ROWS))


# ------------------------------------------------------------------------------------------------- batched LoRA
def _peft_logits(pm, ids, names):
    """PEFT's own per-adapter loop (batched LoRA off), then batched LoRA back on."""
    disable_batched_lora(pm)
    with torch.no_grad():
        out = pm(input_ids=ids, adapter_names=names).logits
    enable_batched_lora(pm)
    return out


def _replace_param(pm, how):
    lin = _base(pm).layers[0].self_attn.q_proj.lora_B["planner"]
    if how == "assign_data":
        lin.weight.data = torch.randn_like(lin.weight)
    else:
        lin.weight = torch.nn.Parameter(torch.randn_like(lin.weight))


@parametrize("how", [*WRITES, "assign_data", "new_parameter", "readd"])
def test_batched_lora_never_uses_old_factors(how):
    """Without any ForkKV cache: after every kind of write, batched LoRA equals PEFT's loop on the new weights."""
    pm = _agents(seed=7)
    ids = torch.randint(3, 128, (3, 5), generator=torch.Generator().manual_seed(1))
    names = ["planner", "coder", "__base__"]
    with torch.no_grad():
        old = pm(input_ids=ids, adapter_names=names).logits
    if how in WRITES:
        _write(pm, lambda m: _base(m).layers[0].self_attn.q_proj.lora_B["planner"].weight, how, delta=0.5)
    elif how == "readd":
        pm.set_adapter("coder")
        pm.delete_adapter("planner")
        pm.add_adapter("planner", LoraConfig(init_lora_weights=False, lora_alpha=8, **SPECS["planner"]))
        pm.eval()
    else:
        _replace_param(pm, how)
    with torch.no_grad():
        new = pm(input_ids=ids, adapter_names=names).logits
    torch.testing.assert_close(new, _peft_logits(pm, ids, names), rtol=1e-5, atol=1e-5)
    assert (new - old).abs().max() > 1e-3


def test_batched_lora_stacks_are_the_peft_parameters():
    """One copy of the adapter weights: PEFT's lora_A/lora_B (and LoRA bias) are views of the stacks, with mixed
    ranks too; save_pretrained/load round-trips them."""
    pm = _agents(seed=8)
    ids = torch.randint(3, 128, (2, 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        pm(input_ids=ids, adapter_names=["planner", "coder"])
    v = _base(pm).layers[1].self_attn.v_proj
    stack = v._forkkv_stack  # white-box: storage sharing shows in no output
    assert stack.views and stack.A.shape[1] == 4  # ranks 4 and 2, zero-padded
    for name in ("planner", "coder"):
        for p, s in ((v.lora_A[name].weight, stack.A), (v.lora_B[name].weight, stack.B)):
            assert p.untyped_storage().data_ptr() == s.untyped_storage().data_ptr()
    assert v.lora_B["coder"].bias.untyped_storage().data_ptr() == stack.bias.untyped_storage().data_ptr()
    assert not v.lora_B["coder"].weight.is_contiguous()  # rank 2 of 4: a strided view


@parametrize("safe_serialization", [True, False])
def test_save_pretrained_with_stacked_parameters(tmp_path, safe_serialization):
    """Saving writes each adapter's own tensors (not the stacks its parameters are views of, which hold every
    adapter of a layer), loads back equal, and batched LoRA works on after it."""
    pm = _agents(seed=9)
    ids = torch.tensor([[5, 6, 7]] * 2)
    with torch.no_grad():
        want = pm(input_ids=ids, adapter_names=["planner", "coder"]).logits
    pm.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    fresh = with_adapters(tiny_llama(layers=2, seed=9), SPECS, seed=99)  # other random adapter weights
    for name in ("planner", "coder"):
        fresh.load_adapter(tmp_path / name, adapter_name=f"{name}_loaded")
    got, state = fresh.state_dict(), pm.state_dict()
    for key, value in state.items():
        if ".lora_" in key:
            loaded = key.replace(".planner.", ".planner_loaded.").replace(".coder.", ".coder_loaded.")
            assert torch.equal(got[loaded], value), key
    own = sum(v.numel() * v.element_size() for k, v in state.items() if ".coder." in k)
    file = "adapter_model.safetensors" if safe_serialization else "adapter_model.bin"
    assert os.path.getsize(tmp_path / "coder" / file) < own + 8 * 1024  # planner's factors are not in it
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids, adapter_names=["planner", "coder"]).logits, want)
    assert _base(pm).layers[1].self_attn.v_proj._forkkv_stack.views


# ------------------------------------------------------------------------------------------------------ pickling
def _saved(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


@parametrize("what", ["shared_context", "cache", "store_cache"])
def test_saved_context_is_used_with_the_same_weights_and_refused_with_others(what):
    pm, ctx = _agents(seed=10), _ctx(seed=12)
    if what == "store_cache":
        obj = ForkKVStore(pm, progress=False).fork(ctx, ROWS)
    else:
        shared = SharedContext.build(pm, ctx, ["planner", "coder"], progress=False)
        obj = shared if what == "shared_context" else shared.fork(ROWS)
    buf = _saved(obj)
    same = _agents(seed=10)  # re-created: another instance with the same weights
    loaded = torch.load(buf, weights_only=False)
    cache = loaded.fork(ROWS) if what == "shared_context" else loaded
    assert torch.equal(_gen(same, ctx, cache), _fresh(same, ctx))
    buf.seek(0)
    other = _agents(seed=11)
    loaded = torch.load(buf, weights_only=False)
    cache = loaded.fork(ROWS) if what == "shared_context" else loaded
    with pytest.raises(StaleContextError, match="saved and loaded in another process"):
        _gen(other, ctx, cache)


@pytest.mark.slow
def test_saved_context_reused_in_another_process(tmp_path):
    pm, ctx = _agents(seed=12), _ctx(seed=13)
    torch.save(SharedContext.build(pm, ctx, ["planner", "coder"], progress=False), tmp_path / "ctx.pt")
    want = _fresh(pm, ctx)
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        torch.set_num_threads(1)
        import test_staleness as t
        pm = t._agents(seed=12)
        shared = torch.load({str(tmp_path / 'ctx.pt')!r}, weights_only=False)
        print(t._gen(pm, t._ctx(seed=13), shared.fork(t.ROWS)).tolist())
        t._write(pm, t.BASE_WEIGHTS["mlp"], "data")
        try:
            t._gen(pm, t._ctx(seed=13), shared.fork(t.ROWS))
        except t.StaleContextError as e:
            print("refused:", e)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(__file__)), env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-2] == str(want.tolist())
    assert lines[-1].startswith("refused: the model's base weights changed")


# --------------------------------------------------------------------------------------------------- clear errors
@parametrize("chunk_size", [-3, 0, 2.5, "4096", True])
def test_bad_chunk_size_is_refused(chunk_size):
    pm, ctx = _agents(seed=13), _ctx()
    with pytest.raises(ValueError, match="chunk_size must be a positive number of tokens"):
        SharedContext.build(pm, ctx, ["planner"], chunk_size=chunk_size, progress=False)
    with pytest.raises(ValueError, match="chunk_size must be a positive number of tokens"):
        ForkKVStore(pm, chunk_size=chunk_size)


def test_bad_store_arguments_are_refused():
    pm, ctx = _agents(seed=14), _ctx()
    with pytest.raises(TypeError, match=r"max_bytes must be a number of bytes, an int or None.*2 \* 2\*\*30"):
        ForkKVStore(pm, max_bytes="1GB")
    with pytest.raises(TypeError, match="max_bytes must be a number of bytes"):
        ForkKVStore(pm, max_bytes=1.5e9)
    with pytest.raises(ValueError, match="max_bytes must be >= 0"):
        ForkKVStore(pm, max_bytes=-1)
    store = ForkKVStore(pm, progress=False)
    with pytest.raises(TypeError, match="to_bytes must be a number of bytes"):
        store.evict("all")
    with pytest.raises(TypeError, match="adapter_names must be a list of adapter names, not the string 'planner'"):
        store.extend(ctx, "planner")
    with pytest.raises(ValueError, match="not forked from this ForkKVStore"):
        store.release(SharedContext.build(pm, ctx, ["planner"], progress=False).fork(["planner"]))
    shared = SharedContext.build(pm, ctx, ["planner"], progress=False)
    with pytest.raises(TypeError, match="not the string 'coder'"):
        shared.add_adapters(pm, "coder")


# ----------------------------------------------------------------------------------------- random interleavings
TARGETS = {
    "base_k": lambda pm: _base(pm).layers[0].self_attn.k_proj.base_layer.weight,
    "base_mlp": lambda pm: _base(pm).layers[0].mlp.down_proj.weight,
    "base_norm": lambda pm: _base(pm).layers[1].input_layernorm.weight,
    "planner_v": lambda pm: _base(pm).layers[1].self_attn.v_proj.lora_A["planner"].weight,
    "planner_q": lambda pm: _base(pm).layers[0].self_attn.q_proj.lora_B["planner"].weight,  # not K/V: no residual
    "coder_k_bias": lambda pm: _base(pm).layers[0].self_attn.k_proj.lora_B["coder"].bias,
}
_GENERATE = st.tuples(st.just("generate"), st.integers(0, 7))
OPS = st.lists(st.one_of(
    st.tuples(st.just("write"), st.sampled_from(sorted(TARGETS)), st.sampled_from(WRITES)),
    st.tuples(st.just("readd"), st.sampled_from(sorted(SPECS)), st.booleans()),
    st.tuples(st.just("delete"), st.sampled_from(sorted(SPECS))),
    st.tuples(st.sampled_from(["build", "fork_shared", "fork_store"])),
    st.tuples(st.just("plain")),
    _GENERATE, _GENERATE, _GENERATE,  # generates (what is checked) come up as often as the rest together
), min_size=6, max_size=14)


def _relevant(state: dict, rows) -> dict:
    """What a context over ``rows`` depends on: every base tensor and the rows' adapters' K/V LoRA factors."""
    def keep(key):
        if ".lora_" not in key:
            return True
        return any(f".{n}." in key for n in rows) and ("k_proj" in key or "v_proj" in key)

    return {k: v for k, v in state.items() if keep(k)}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _readd(pm, name, same_weights):
    saved = {k: v.clone() for k, v in pm.state_dict().items() if f".{name}." in k}
    if name in pm.peft_config:
        pm.set_adapter(next(n for n in pm.peft_config if n != name) if len(pm.peft_config) > 1 else name)
        pm.delete_adapter(name)
    spec = {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], **SPECS[name]}  # with_adapters' default
    pm.add_adapter(name, LoraConfig(init_lora_weights=False, lora_alpha=8, **spec))
    pm.eval()
    if same_weights and saved:
        pm.load_state_dict({**pm.state_dict(), **saved})


@pytest.mark.slow
@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_interleaved_writes_never_give_a_silently_different_result(ops, interleaving_counts):
    """Random programs of weight writes (in place, ``.data``, ``load_state_dict``, adapters deleted or re-added
    with the same or other weights) between builds, forks (SharedContext and ForkKVStore), generates and plain
    batched-LoRA forwards: every generate equals a fresh exact run on the current weights, or is refused with a
    StaleContextError exactly when what its context depends on changed; batched LoRA always equals PEFT's loop."""
    pm, ctx = _agents(seed=15), _ctx(seed=16)
    seen = interleaving_counts
    store = ForkKVStore(pm, progress=False)
    shared, caches = None, []  # caches: (cache, rows, state of the weights its context was computed from)

    def loaded_rows():
        return [n for n in SPECS if n in pm.peft_config] + ["__base__"]

    def generate(i):
        cache, rows, then = caches[i % len(caches)]
        cache.reset()
        if _same(_relevant(then, rows), _relevant(pm.state_dict(), rows)):
            assert torch.equal(_gen(pm, ctx, cache, rows), _fresh(pm, ctx, rows))
            seen["equal"] += 1
        else:
            with pytest.raises(StaleContextError, match="SharedContext"):
                _gen(pm, ctx, cache, rows)
            seen["refused"] += 1

    for op in [("build",), ("fork_shared",), ("fork_store",), *ops]:
        kind = op[0]
        if kind == "write":
            try:
                _write(pm, TARGETS[op[1]], op[2], delta=0.2)
            except KeyError:  # the adapter is deleted
                pass
        elif kind == "readd":
            _readd(pm, op[1], op[2])
        elif kind == "delete" and op[1] in pm.peft_config and len(pm.peft_config) > 1:
            pm.set_adapter(next(n for n in pm.peft_config if n != op[1]))
            pm.delete_adapter(op[1])
        elif kind == "build":
            shared = (SharedContext.build(pm, ctx, loaded_rows()[:-1], progress=False),
                      {k: v.clone() for k, v in pm.state_dict().items()})
        elif kind == "fork_shared":
            rows = list(shared[0].adapters) + ["__base__"]
            caches.append((shared[0].fork(rows), rows, shared[1]))
            generate(-1)
        elif kind == "fork_store":
            rows = loaded_rows()
            caches.append((store.fork(ctx, rows), rows, {k: v.clone() for k, v in pm.state_dict().items()}))
            generate(-1)
        elif kind == "generate":
            generate(op[1])
        elif kind == "plain":
            rows = loaded_rows()
            ids = torch.randint(3, 128, (len(rows), 4), generator=torch.Generator().manual_seed(3))
            with torch.no_grad():
                got = pm(input_ids=ids, adapter_names=rows).logits
            torch.testing.assert_close(got, _peft_logits(pm, ids, rows), rtol=1e-5, atol=1e-5)
            seen["plain"] += 1
    assert not pm._adapters_disabled  # PEFT's own flag (no public getter): a failed call must not leave it set


@pytest.fixture(scope="module")
def interleaving_counts():
    """How many generates the random programs checked each way (both must occur for the test to mean much)."""
    counts = {"equal": 0, "refused": 0, "plain": 0}
    yield counts
    print("interleavings checked:", counts)
    assert min(counts.values()) >= 20, counts
