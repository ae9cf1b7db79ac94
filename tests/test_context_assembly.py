"""``SharedContext.from_tensors``/``layout``: a context assembled from tensors computed before (what ForkKVStore does
with its nodes) serves exactly as the built one; wrong inputs are refused with what to give."""

import pytest
import torch

import forkkv_hf
from forkkv_hf import SharedContext, batch_inputs, cache_kwargs
from models import tiny_llama, with_adapters

ROWS = ["planner", "coder", "__base__"]


@pytest.fixture(scope="module")
def agents():
    pm = with_adapters(
        tiny_llama(layers=2, seed=7),
        {"planner": dict(r=4, target_modules=["k_proj", "v_proj", "q_proj"]),
         "coder": dict(r=2, target_modules=["v_proj"])},
    )
    return forkkv_hf.enable_forkkv(pm)


def _parts(shared: SharedContext):
    kv = [(l.key, l.value, l.cos, l.sin) for l in shared.layers]
    residuals = [(l.k_res, l.v_res) for l in shared.layers]
    return kv, residuals


def _generate(model, ctx, cache):
    prompts = [torch.tensor([5, 6, 7]), torch.tensor([8, 9]), torch.tensor([10])]
    return model.generate(**batch_inputs(ctx, prompts, pad_token_id=0), adapter_names=ROWS, max_new_tokens=5,
                          do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True,
                          **cache_kwargs(cache))


def test_assembled_context_generates_as_the_built_one(agents):
    ctx = torch.randint(3, 128, (24,), generator=torch.Generator().manual_seed(1))
    built = SharedContext.build(agents, ctx, ["planner", "coder"], progress=False)
    layout = built.layout()
    assert layout.num_layers == built.num_layers and layout.model_id == built.model_id
    kv, residuals = _parts(built)
    assembled = SharedContext.from_tensors(layout, kv, residuals, built.token_ids, built.adapters, built.identity)
    assert [l.sliding_window for l in assembled.layers] == [l.sliding_window for l in built.layers]
    assert all(a.source is b.source for a, b in zip(assembled.layers, built.layers))
    want = _generate(agents, ctx, built.fork(ROWS))
    got = _generate(agents, ctx, assembled.fork(ROWS))
    assert torch.equal(got.sequences, want.sequences)
    for g, w in zip(got.logits, want.logits):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_from_tensors_refuses_a_layer_count_other_than_the_layout(agents):
    ctx = torch.randint(3, 128, (10,), generator=torch.Generator().manual_seed(2))
    built = SharedContext.build(agents, ctx, ["coder"], progress=False)
    kv, residuals = _parts(built)
    with pytest.raises(ValueError, match=r"one \(key, value, cos, sin\) and one \(k_res, v_res\) per layer"):
        SharedContext.from_tensors(built.layout(), kv[:1], residuals[:1], built.token_ids, built.adapters, None)
    # tensors over other lengths than token_ids: before, a bare size mismatch deep inside (or a mask-length error)
    short_cos = [(k, v, c[:-1], s) for k, v, c, s in kv]
    with pytest.raises(ValueError, match=r"layer 0: the tensors cover .*'cos': 9.* token_ids 10"):
        SharedContext.from_tensors(built.layout(), short_cos, residuals, built.token_ids, built.adapters, None)
    with pytest.raises(ValueError, match=r"token_ids 9; give every tensor over the same tokens"):
        SharedContext.from_tensors(built.layout(), kv, residuals, built.token_ids[:-1], built.adapters, None)


def test_fork_builds_the_registered_cache_class(agents):
    """SharedContext sits below the cache module, which registers the class fork builds."""
    ctx = torch.randint(3, 128, (8,), generator=torch.Generator().manual_seed(3))
    cache = SharedContext.build(agents, ctx, ["coder"], progress=False).fork(["coder", "__base__"])
    assert type(cache) is forkkv_hf.ForkKVCache and cache.adapter_names == ["coder", "__base__"]
