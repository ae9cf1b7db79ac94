"""Regional compilation of the decode step (``compile_regions="on"``, :mod:`forkkv_hf.compile_regions`): the decoder
layer is one nested compile region, traced and compiled once and reused by every layer; tokens equal eager, the
model is left as it was, a second call does not recompile."""

from __future__ import annotations

import pytest
import torch
from transformers import CompileConfig

import forkkv_hf
from forkkv_hf import ForkKVCache, SharedContext, batch_inputs
from forkkv_hf.compile_regions import available, compile_regions, decoder_layers
from test_compiled_decode import _compile_config, fresh_dynamo  # noqa: F401 (fixture)
from test_generate import _assert_same, _context, _gen, _prompts, make_full_agents

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not available(), reason="torch without torch.compiler.nested_compile_region")]

GRAPHS: list = []  # the graphs dynamo hands the backend


@torch._dynamo.register_backend
def forkkv_recording_eager(gm, example_inputs):
    """The eager backend, keeping each graph."""
    GRAPHS.append(gm)
    return gm.forward


def _recording_config():
    cc = CompileConfig(fullgraph=True, backend="forkkv_recording_eager", mode=None)
    cc._compile_all_devices = True
    return cc


@pytest.fixture(scope="module")
def three_layer_agents():
    """test_generate's agents (LoRA on q/k/v/o, mixed ranks, rsLoRA, a LoRA bias) on three layers."""
    return make_full_agents(layers=3)


def _regions(gm) -> list:
    """The subgraph each of ``gm``'s nested-region calls runs."""
    return [n.args[0].target for n in gm.graph.nodes if n.target is torch.ops.higher_order.invoke_subgraph]


def test_regions_equal_eager_trace_the_layer_once_and_do_not_recompile(three_layer_agents):
    """Mixed adapters with a ``__base__`` row over one shared context: the step's graph calls one subgraph three
    times (one per layer); a second call with other prompts of the same shapes reuses the graph; the layers' own
    ``forward`` is back afterwards."""
    pm = three_layer_agents
    ctx = _context(29, seed=4)
    names = ["planner", "coder", "__base__"]
    shared = SharedContext.build(pm, ctx, ["planner", "coder"], progress=False)
    GRAPHS.clear()
    with forkkv_hf.config_override(compile_regions="on"):
        for seed in (1, 2):
            inputs = batch_inputs(ctx, _prompts([4, 4, 4], seed=seed), pad_token_id=0)
            out = _gen(pm, inputs, names, shared.fork(names), compile_config=_recording_config())
            _assert_same(out, _gen(pm, inputs, names, shared.fork(names)))
            if seed == 1:
                graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    step = [gm for gm in GRAPHS if _regions(gm)]
    assert len(step) == 1 and len(_regions(step[0])) == 3 and len(set(_regions(step[0]))) == 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert not torch._dynamo.utils.counters["recompilations"]
    layers = decoder_layers(pm)
    assert len(layers) == 3 and all("forward" not in layer.__dict__ for layer in layers)  # the model as it was


def test_regions_leave_a_wrapped_forward_alone(three_layer_agents):
    """A layer whose ``forward`` someone already set on the instance keeps it; the others are marked, then
    restored."""
    layers = decoder_layers(three_layer_agents)
    own = layers[0].forward
    layers[0].forward = own
    try:
        with compile_regions(three_layer_agents) as marked:
            assert marked == 2 and layers[0].__dict__["forward"] is own
            assert all(layer.__dict__["forward"].__self__ is layer for layer in layers[1:])
        assert all("forward" not in layer.__dict__ for layer in layers[1:])
    finally:
        layers[0].__dict__.pop("forward", None)


@pytest.mark.version_independent  # the first test's model and generate calls; only the backend and kernels differ
def test_regions_through_inductor_with_the_triton_custom_ops(monkeypatch):
    """The GPU's path on CPU: inductor lowers the region once, the Triton kernels (interpreted) run as the custom ops
    inside it (the LoRA delta through ``forkkv::lora_add``: the in-place op fails the region's functionalisation);
    tokens equal eager."""
    if torch.cuda.is_available():
        pytest.skip("interpreted kernels on CPU tensors; the gpu tests run them on CUDA")
    monkeypatch.setenv("FORKKV_BACKEND", "triton")
    monkeypatch.setenv("FORKKV_LORA_BACKEND", "triton")
    pm = make_full_agents(layers=2)
    ctx = _context(17)
    names = ["planner", "__base__", "biased"]
    inputs = batch_inputs(ctx, _prompts([3, 5, 2]), pad_token_id=0)
    eager = _gen(pm, inputs, names, ForkKVCache.from_context(pm, ctx, adapter_names=names), max_new_tokens=4)
    with forkkv_hf.config_override(compile_regions="on"):
        out = _gen(pm, inputs, names, ForkKVCache.from_context(pm, ctx, adapter_names=names), max_new_tokens=4,
                   compile_config=_compile_config("inductor"))
    _assert_same(out, eager)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
