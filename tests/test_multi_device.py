"""ForkKV on models dispatched by accelerate (``device_map``): every layer's shared base, residuals, RoPE tables and
private K/V live on that layer's device, and generate gives the tokens of the undispatched model.

On CPU the dispatch is forced to install accelerate's hooks (``force_hooks``) so the hook path (inputs and
``position_embeddings`` moved per layer) is exercised; the split over two GPUs runs where there are two."""

import pytest
import torch

import forkkv_hf
from forkkv_hf import SharedContext, batch_inputs, cache_kwargs
from cases import parametrize
from models import tiny_llama, with_adapters

accelerate = pytest.importorskip("accelerate")

NAMES = ["planner", "coder", "__base__", "planner"]


def _model(layers=4):
    model = tiny_llama(layers=layers, hidden=64, heads=4, kv_heads=2, seed=11)
    return model


def _agents(model):
    return with_adapters(model, {"planner": dict(r=4), "coder": dict(r=8, lora_alpha=8)})


def _device_map(layers: int, devices: list[str]) -> dict:
    """Layers split in contiguous blocks over ``devices``; embeddings on the first, norm and head on the last."""
    per = -(-layers // len(devices))
    dm = {"model.embed_tokens": devices[0], "model.rotary_emb": devices[0]}
    dm.update({f"model.layers.{i}": devices[i // per] for i in range(layers)})
    dm.update({"model.norm": devices[-1], "lm_head": devices[-1]})
    return dm


def _run(pm, device):
    g = torch.Generator().manual_seed(5)
    ctx = torch.randint(3, 128, (29,), generator=g)
    prompts = [torch.randint(3, 128, (n,), generator=g) for n in (3, 17, 5, 1)]
    inputs = batch_inputs(ctx, prompts, pad_token_id=0, device=device)
    forkkv_hf.enable_forkkv(pm)
    with torch.no_grad():
        shared = SharedContext.build(pm, ctx.to(device), sorted({n for n in NAMES if n != "__base__"}), progress=False)
        out = pm.generate(**inputs, adapter_names=NAMES, max_new_tokens=5, do_sample=False, pad_token_id=0,
                          output_scores=True, return_dict_in_generate=True, **cache_kwargs(shared.fork(NAMES)))
    return shared, out


@pytest.mark.slow
def test_moved_position_embeddings_share_one_table():
    """As under a device map, every layer receives its own copy of (cos, sin) (copies die after the layer, so their
    addresses get reused): layers are grouped by the tables' values, one table is kept, the tokens are unchanged."""
    ref_shared, ref = _run(_agents(_model()), "cpu")
    model = _model()

    def copy_pe(module, args, kwargs):
        cos, sin = kwargs["position_embeddings"]
        kwargs["position_embeddings"] = (cos.clone(), sin.clone())
        return args, kwargs

    for layer in model.model.layers:
        layer.register_forward_pre_hook(copy_pe, with_kwargs=True)
    shared, out = _run(_agents(model), "cpu")
    assert shared.rope_bytes() == ref_shared.rope_bytes()
    assert len({id(l.cos) for l in shared.layers}) == 1
    assert torch.equal(out.sequences, ref.sequences)


@pytest.mark.slow
def test_accelerate_hooks_on_cpu_give_the_same_tokens():
    ref_shared, ref = _run(_agents(_model()), "cpu")
    model = _model()
    accelerate.dispatch_model(model, device_map=_device_map(4, ["cpu", "cpu"]), force_hooks=True)
    assert any(hasattr(m, "_hf_hook") for m in model.modules()), "dispatch installed no hooks"
    shared, out = _run(_agents(model), "cpu")
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert shared.rope_bytes() == ref_shared.rope_bytes()


def test_offloaded_weights_are_refused_with_what_to_do(tmp_path):
    """A device_map that offloads a layer to disk keeps its weights on the meta device between forwards: the build
    (before, PyTorch's "Cannot copy out of meta tensor") and a context built before the dispatch (before, called
    stale: "base weights changed") say so."""
    pm = _agents(_model())
    ctx = torch.randint(3, 128, (29,), generator=torch.Generator().manual_seed(5))
    forkkv_hf.enable_forkkv(pm)
    before = SharedContext.build(pm, ctx, ["planner", "coder"], progress=False)
    dm = _device_map(4, ["cpu", "cpu"])
    dm["model.layers.3"] = "disk"
    accelerate.dispatch_model(pm.get_base_model(), device_map=dm, offload_dir=str(tmp_path), force_hooks=True)
    with pytest.raises(ValueError, match="on the meta device .*offload.*Load the model without offload"):
        SharedContext.build(pm, ctx, ["planner", "coder"], progress=False)
    with pytest.raises(ValueError, match="on the meta device"):
        before.check_weights(pm)
    store = forkkv_hf.ForkKVStore(pm, progress=False)  # (its fingerprint failed inside: "copy out of meta tensor")
    for call in (lambda: store.extend(ctx, []), lambda: store.fork(ctx, ["planner"])):
        with pytest.raises(ValueError, match="on the meta device"):
            call()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@parametrize("backend", ["auto", "torch"])
def test_two_gpus_device_map_equals_one_gpu(backend, monkeypatch):
    monkeypatch.setenv("FORKKV_BACKEND", backend)
    ref_shared, ref = _run(_agents(_model().to("cuda:0")), "cuda:0")
    model = _model()
    dm = _device_map(4, ["cuda:0", "cuda:1"])
    accelerate.dispatch_model(model, device_map=dm)
    pm = _agents(model)
    shared, out = _run(pm, "cuda:0")
    assert torch.equal(out.sequences.cpu(), ref.sequences.cpu())
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-4, atol=1e-4)
    # every layer's parts live on the layer's device; one RoPE table per device
    for i, layer in enumerate(shared.layers):
        dev = torch.device(dm[f"model.layers.{i}"])
        tensors = [layer.key, layer.value, layer.cos, layer.sin]
        tensors += [t for res in (layer.k_res, layer.v_res) if res is not None for t in (res.u, res.B)]
        assert all(t.device == dev for t in tensors), i
    assert shared.rope_bytes() == 2 * ref_shared.rope_bytes()


def test_a_tensor_parallel_plan_that_gathers_kv_outputs_is_refused(monkeypatch):
    """OLMo 2/3's plan shards q/k/v_proj but gathers their outputs (every rank sees every KV head): ForkKV sliced the
    factors for a colwise layout the attention does not see (a size error deep in batched LoRA or the attention).
    Refused at enable and build, saying to load with device_map (the 2-rank run: /tmp/auditR of 2026-12-07)."""
    import forkkv_hf.peft.tp as tp
    from forkkv_hf.peft.lora_factors import find_attention_modules
    from models import tiny_llama

    model = tiny_llama(layers=2)
    model.model._tp_plan = {"layers.*.self_attn.k_proj": "colwise_gather_output",
                            "layers.*.self_attn.o_proj": "rowwise"}
    attn = model.model.layers[0].self_attn
    assert tp.gathered_projections(model, attn) == []  # not tensor-parallel: nothing to refuse
    monkeypatch.setattr(tp, "is_dtensor", lambda t: t is attn.k_proj.weight)  # as sharded on a rank
    assert tp.gathered_projections(model, attn) == ["k_proj"]
    with pytest.raises(ValueError, match=r"plan gathers the outputs of \['k_proj'\].*device_map"):
        find_attention_modules(model)
