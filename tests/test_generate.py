"""ForkKV inside PEFT multi-adapter ``generate``: exactness, the defined semantics, every generation mode."""

import pytest
import torch

import forkkv_hf
from forkkv_hf import ForkKVCache, SharedContext, batch_inputs, cache_kwargs
from cases import GENERATE_MODES, parametrize
from models import semantic_reference_cache, tiny_llama, with_adapters

ALL = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _prompts(lengths, seed=0, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g) for n in lengths]


def _context(T, seed=123, vocab=128):
    return torch.randint(3, vocab, (T,), generator=torch.Generator().manual_seed(seed))


def _gen(model, inputs, names, cache=None, **kw):
    kw.setdefault("max_new_tokens", 8)
    kw.setdefault("do_sample", False)
    extra = cache_kwargs(cache) if cache is not None else {}
    return model.generate(
        **inputs, adapter_names=names, output_scores=True, return_dict_in_generate=True, pad_token_id=0, **extra, **kw
    )


def _assert_same(a, b, atol=1e-4):
    assert torch.equal(a.sequences, b.sequences), (a.sequences, b.sequences)
    for sa, sb in zip(a.scores, b.scores):
        torch.testing.assert_close(sa, sb, rtol=1e-4, atol=atol)


@pytest.fixture(scope="module")
def last_layer_agents():
    """Agents whose LoRA touches only the last layer's k_proj/v_proj: ForkKV must be exact for them."""
    m = tiny_llama(layers=3)
    kv_last = dict(target_modules=["k_proj", "v_proj"], layers_to_transform=[2])
    pm = with_adapters(m, {"planner": dict(r=4, **kv_last), "coder": dict(r=2, lora_alpha=4, **kv_last)})
    return forkkv_hf.enable_forkkv(pm)


def make_full_agents(layers=3):
    """Agents with LoRA on q/k/v/o of every layer, different ranks, alphas and rsLoRA, a LoRA bias; ForkKV on."""
    m = tiny_llama(layers=layers, seed=1)
    pm = with_adapters(
        m,
        {
            "planner": dict(r=4, target_modules=ALL),
            "coder": dict(r=2, lora_alpha=3, target_modules=ALL, use_rslora=True),
            "critic": dict(r=8, lora_alpha=16, target_modules=["k_proj", "v_proj", "gate_proj"]),
            "biased": dict(r=3, target_modules=["k_proj", "v_proj", "o_proj"], lora_bias=True),
        },
        seed=1,
    )
    return forkkv_hf.enable_forkkv(pm)


@pytest.fixture(scope="module")
def full_agents():
    """:func:`make_full_agents` on three layers."""
    return make_full_agents()


def test_exact_for_last_layer_kv_lora(last_layer_agents):
    pm = last_layer_agents
    ctx = _context(20)
    names = ["planner", "coder", "__base__"]
    inputs = batch_inputs(ctx, _prompts([5, 3, 4]), pad_token_id=0)
    forkkv_hf.disable_forkkv(pm)
    exact = _gen(pm, inputs, names)  # each agent prefills the context with its own adapter, DynamicCache, SDPA
    forkkv_hf.enable_forkkv(pm)
    cache = ForkKVCache.from_context(pm, ctx, adapter_names=names)
    out = _gen(pm, inputs, names, cache)
    _assert_same(out, exact)


#: generate options whose logits processors or stopping criteria read the rows' ids (the shared context included);
#: ``eos_token_id=0`` makes the pad id the EOS, as most chat tokenizers do. (The encoder_* processors read the left
#: padded batch's pads as tokens: they are compared with each agent's own run, in
#: test_encoder_processors_of_a_padded_row_are_its_own_run.)
ID_PROCESSORS = [dict(repetition_penalty=1.5), dict(repetition_penalty=1.3, eos_token_id=0),
                 dict(no_repeat_ngram_size=2), dict(bad_words_ids=[[5], [9, 10]]), dict(sequence_bias={(8,): 4.0}),
                 dict(sequence_bias={(60, 8): 9.0}), dict(min_new_tokens=6, eos_token_id=2),
                 dict(do_sample=True, top_k=20, min_p=0.1), dict(num_beams=2, repetition_penalty=1.4, eos_token_id=0)]


def _left_padded(inputs: dict) -> dict:
    """``batch_inputs``' rows (``[context | pad | prompt]``) with each row's pads moved to its front: the left-padded
    batch transformers' processors are written for (each row then reads as the agent's own, unpadded run)."""
    order = torch.sort(inputs["attention_mask"].to(torch.int8), dim=1, stable=True).indices
    return {k: inputs[k].gather(1, order) for k in ("input_ids", "attention_mask")}


class _StopAfter:
    """A stopping criterion reading the ids: a row stops once its last three ids are ``ids`` (spanning the prompt's
    end and the first generated token, as a stop string can)."""

    def __init__(self, ids):
        self.ids = torch.tensor(ids)

    def __call__(self, input_ids, scores, **kwargs):
        return (input_ids[:, -3:] == self.ids).all(1)


@parametrize("options", ID_PROCESSORS, fast=lambda options: options.get("eos_token_id") == 0)
def test_logits_processors_reading_the_ids_see_each_row_unpadded(last_layer_agents, options):
    """Processors that read the ids saw ``batch_inputs``' pads between the context and a shorter row's prompt as
    tokens of the row: with the pad id as EOS, ``repetition_penalty`` penalised a padded row's EOS and it stopped at
    another step; n-gram bans, multi-token biases and stop criteria spanning the prompt missed (an audit's finding).
    They now read each row with its pads in front, as transformers' own left-padded batch (which equals each agent's
    own run): ForkKV's tokens and scores equal plain PEFT's on the left-padded rows. Before transformers 5.24 that
    batch's repetition penalty reads its pads (ForkKV's does not): those cases compare with each agent's own run
    (the next test)."""
    from transformers import RepetitionPenaltyLogitsProcessor

    from forkkv_hf.padded_ids import _per_row_ignore

    if "repetition_penalty" in options and not _per_row_ignore(RepetitionPenaltyLogitsProcessor(1.5)):
        pytest.skip("transformers before 5.24: its left-padded batch penalises the pads; see the next test")
    pm = last_layer_agents
    ctx = _context(20)
    names = ["planner", "coder", "__base__"]
    inputs = batch_inputs(ctx, _prompts([5, 1, 4]), pad_token_id=0)
    L = inputs["input_ids"].shape[1]
    forkkv_hf.disable_forkkv(pm)
    torch.manual_seed(0)
    exact = _gen(pm, _left_padded(inputs), names, **options)
    forkkv_hf.enable_forkkv(pm)
    torch.manual_seed(0)
    out = _gen(pm, inputs, names, ForkKVCache.from_context(pm, ctx, adapter_names=names), **options)
    assert torch.equal(out.sequences[:, L:], exact.sequences[:, L:]), (out.sequences[:, L:], exact.sequences[:, L:])
    for sa, sb in zip(out.scores, exact.scores):
        torch.testing.assert_close(sa, sb, rtol=1e-4, atol=1e-4)


@parametrize("options", [dict(repetition_penalty=1.3, eos_token_id=0), dict(repetition_penalty=1.6),
                         dict(num_beams=2, repetition_penalty=1.4, eos_token_id=0)])
def test_repetition_penalty_of_a_padded_row_is_its_own_run(last_layer_agents, options):
    """The built repetition penalty of a padded row equals the agent's own, unpadded run's, on every transformers
    version: before 5.24 (no per-row prefix) it read the pads as tokens and penalised the pad id, the EOS here, as
    transformers' own left-padded batch does (a finding of the audit, left then; now the pads read as the row's first
    token, penalised anyway)."""
    pm = last_layer_agents
    ctx, names, prompts, inputs, L = _three_padded_rows()
    out = _gen(pm, inputs, names, ForkKVCache.from_context(pm, ctx, adapter_names=names), **options)
    _assert_own_runs(pm, out, L, ctx, prompts, names, lambda rows, name: _gen(pm, rows, [name], **options),
                     beams="num_beams" in options)


def _three_padded_rows():
    """``(ctx, names, prompts, inputs, L)``: a 20-token context, rows of two agents and ``__base__`` with prompts of 5,
    1 and 4 tokens (the shorter ones padded between context and prompt), ``L`` the batch's width."""
    ctx, names, prompts = _context(20), ["planner", "coder", "__base__"], _prompts([5, 1, 4])
    inputs = batch_inputs(ctx, prompts, pad_token_id=0)
    return ctx, names, prompts, inputs, inputs["input_ids"].shape[1]


def _assert_own_runs(pm, out, L, ctx, prompts, names, run, beams=False):
    """Each row of ``out`` (generated after ``L`` columns) equals its agent's own, unpadded run ``run(rows, name)``
    with ForkKV off: its tokens, and its scores where no beams reorder them."""
    forkkv_hf.disable_forkkv(pm)
    try:
        for row, (name, prompt) in enumerate(zip(names, prompts)):
            ids = torch.cat([ctx, prompt])[None]
            own = run({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, name)
            n = own.sequences.shape[1] - ids.shape[1]
            assert torch.equal(out.sequences[row, L:L + n], own.sequences[0, ids.shape[1]:]), (row, out.sequences)
            for step, score in enumerate(own.scores if not beams else ()):  # (beams: per beam)
                torch.testing.assert_close(out.scores[step][row], score[0], rtol=1e-4, atol=1e-4)
    finally:
        forkkv_hf.enable_forkkv(pm)


class _FirstToken:
    """A caller's logits processor forcing every row's first generated token to ``token``."""

    def __init__(self, token):
        self.token, self.steps = token, 0

    def __call__(self, input_ids, scores):
        self.steps += 1
        if self.steps > 1:
            return scores
        return torch.full_like(scores, -1e9).index_fill(1, torch.tensor([self.token]), 0.0)


@parametrize("options", [{"encoder_no_repeat_ngram_size": 2}, {"encoder_repetition_penalty": 3.0, "eos_token_id": 0},
                         {"num_beams": 2, "encoder_repetition_penalty": 2.0, "eos_token_id": 0},
                         {"num_beams": 2, "encoder_no_repeat_ngram_size": 2}])
def test_encoder_processors_of_a_padded_row_are_its_own_run(last_layer_agents, options):
    """``encoder_no_repeat_ngram_size`` and ``encoder_repetition_penalty`` read generate's input ids, where a shorter
    row holds pads between its context and its prompt: the bigram (the context's last token, the prompt's first)
    was never banned, and the pad id (the EOS here) was boosted (an audit's finding). The rows' first token is forced
    to the context's last and the one-token prompt's token is favoured, so that row's next step meets that bigram:
    each row now equals the agent's own, unpadded run."""
    from transformers import EncoderRepetitionPenaltyLogitsProcessor, LogitsProcessorList

    every_beam = EncoderRepetitionPenaltyLogitsProcessor(2.0, torch.tensor([[1]]))(None, -torch.ones(2, 3))[1, 1] != -1
    if "num_beams" in options and "encoder_repetition_penalty" in options and not every_beam:
        pytest.skip("this transformers' (5.17's) encoder_repetition_penalty acts on the first hypotheses only (an "
                    "agent's own beam run penalises its first beam), which no batch of several rows can equal")
    pm = last_layer_agents
    ctx, names, prompts, inputs, L = _three_padded_rows()

    def run(rows, names, cache=None):
        if "encoder_no_repeat_ngram_size" not in options:
            return _gen(pm, rows, names, cache, max_new_tokens=4, **options)
        forced = LogitsProcessorList([_FirstToken(int(ctx[-1]))])
        return _gen(pm, rows, names, cache, max_new_tokens=4, logits_processor=forced,
                    sequence_bias={(int(prompts[1][0]),): 30.0}, **options)

    out = run(inputs, names, ForkKVCache.from_context(pm, ctx, adapter_names=names))
    _assert_own_runs(pm, out, L, ctx, prompts, names, lambda rows, name: run(rows, [name]),
                     beams="num_beams" in options)


def test_a_direct_forward_numbers_a_padded_row_by_its_mask(last_layer_agents):
    """A direct forward of ``batch_inputs``' rows with their whole rows' mask but no ``position_ids`` numbered a padded
    row's prompt after its pads (0.05 off its own run, silently; an audit's finding): the positions now come from the
    mask, as generate's, for the new tokens, for whole rows cut to them and for the new tokens' embeddings (those
    were still numbered after the pads: a second audit's finding). Each row's logits equal its own run's."""
    pm = last_layer_agents
    ctx = _context(16, seed=7)
    names = ["planner", "coder"]
    prompts = _prompts([3, 5], seed=3)
    inputs = batch_inputs(ctx, prompts, pad_token_id=0)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    shared = SharedContext.build(pm, ctx, names, progress=False)
    with torch.no_grad():
        new = pm(input_ids=ids[:, 16:], attention_mask=mask, adapter_names=names, **cache_kwargs(shared.fork(names)))
        last = pm(**inputs, adapter_names=names, logits_to_keep=1, **cache_kwargs(shared.fork(names)))
        embeds = pm(inputs_embeds=pm.get_base_model().get_input_embeddings()(ids[:, 16:]), attention_mask=mask,
                    adapter_names=names, **cache_kwargs(shared.fork(names)))
        forkkv_hf.disable_forkkv(pm)
        try:
            for row, (name, prompt) in enumerate(zip(names, prompts)):
                pm.set_adapter(name)
                own = pm(input_ids=torch.cat([ctx, prompt])[None]).logits[0, 16:]
                torch.testing.assert_close(new.logits[row, -len(prompt):], own, rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(last.logits[row, -1], own[-1], rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(embeds.logits[row, -len(prompt):], own, rtol=1e-4, atol=1e-4)
        finally:
            forkkv_hf.enable_forkkv(pm)


def test_the_callers_processors_and_a_mask_generate_builds(last_layer_agents):
    """A repetition penalty the caller passes (with its own ``prompt_ignore_length``) reads the rows as a left-padded
    batch and is left as it was (it was given the rows' pad counts, kept them, and failed a later call); a call
    without ``attention_mask`` (generate builds it from the pad id) reads them so too (its pads were read as tokens);
    the model keeps no state of it and pickles (audit findings on the first form)."""
    import io

    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    pm = last_layer_agents
    ctx = _context(20)
    names = ["planner", "coder", "__base__"]
    inputs = batch_inputs(ctx, _prompts([5, 1, 4]), pad_token_id=0)
    L = inputs["input_ids"].shape[1]

    def user():
        return LogitsProcessorList([RepetitionPenaltyLogitsProcessor(2.0, prompt_ignore_length=L)])

    forkkv_hf.disable_forkkv(pm)
    exact = _gen(pm, _left_padded(inputs), names, logits_processor=user())
    forkkv_hf.enable_forkkv(pm)
    mine = user()
    out = _gen(pm, inputs, names, ForkKVCache.from_context(pm, ctx, adapter_names=names), logits_processor=mine)
    assert torch.equal(out.sequences[:, L:], exact.sequences[:, L:]) and mine[0].prompt_ignore_length == L
    opts = dict(sequence_bias={(60, 8): 9.0}, repetition_penalty=1.3)
    masked = _gen(pm, inputs, names, ForkKVCache.from_context(pm, ctx, adapter_names=names), **opts)
    unmasked = _gen(pm, {"input_ids": inputs["input_ids"]}, names,
                    ForkKVCache.from_context(pm, ctx, adapter_names=names), **opts)
    assert torch.equal(unmasked.sequences, masked.sequences)
    base = pm.get_base_model()
    assert not {"_get_logits_processor", "_get_stopping_criteria"} & set(vars(base))
    torch.save(pm, io.BytesIO())


def test_stopping_criteria_reading_the_ids_see_each_row_unpadded(last_layer_agents):
    """A stopping criterion over the last ids fires for a padded row as in the agent's own run (before: the pads
    between its context and prompt broke the match) and the row's continuation after it is the same."""
    from transformers import StoppingCriteriaList

    pm = last_layer_agents
    ctx, prompts = _context(20), _prompts([5, 1, 4])
    names = ["planner", "coder", "__base__"]
    inputs = batch_inputs(ctx, prompts, pad_token_id=0)
    L = inputs["input_ids"].shape[1]
    forkkv_hf.disable_forkkv(pm)
    first = _gen(pm, _left_padded(inputs), names, max_new_tokens=1).sequences[1, -1].item()
    stop = [ctx[-1].item(), prompts[1][0].item(), first]  # row 1's context end, its one-token prompt, its first token
    exact = _gen(pm, _left_padded(inputs), names, stopping_criteria=StoppingCriteriaList([_StopAfter(stop)]))
    forkkv_hf.enable_forkkv(pm)
    out = _gen(pm, inputs, names, ForkKVCache.from_context(pm, ctx, adapter_names=names),
               stopping_criteria=StoppingCriteriaList([_StopAfter(stop)]))
    assert torch.equal(out.sequences[:, L:], exact.sequences[:, L:])
    assert (out.sequences[1, L + 1:] == 0).all()  # row 1 stopped after its first token


def test_layer0_kv_are_exact(full_agents):
    """Layer 0's context K/V of every agent (base + rotated residual) equal the agent's own K/V exactly."""
    from transformers import DynamicCache

    from forkkv_hf.ops.naive import materialize_kv

    pm = full_agents
    ctx = _context(17)
    names = ["planner", "coder", "critic", "__base__"]
    cache = ForkKVCache.from_context(pm, ctx, adapter_names=names)
    layer = cache.layers[0]
    dummy = torch.zeros(4, layer.shared.key.shape[1], 0, layer.shared.key.shape[-1])
    view, _ = layer.update(dummy, dummy)
    K, V = materialize_kv(view)
    for b, name in enumerate(names):
        own = DynamicCache()
        with torch.no_grad():
            if name == "__base__":
                with pm.disable_adapter():
                    pm.get_base_model().model(input_ids=ctx[None], **cache_kwargs(own), use_cache=True)
            else:
                pm.set_adapter(name)
                pm.get_base_model().model(input_ids=ctx[None], **cache_kwargs(own), use_cache=True)
        torch.testing.assert_close(K[b], own.layers[0].keys[0].float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(V[b], own.layers[0].values[0].float(), rtol=1e-5, atol=1e-5)


@parametrize("mode", GENERATE_MODES, fast=lambda mode: mode == GENERATE_MODES[0])
def test_matches_defined_semantics(full_agents, mode):
    """With LoRA everywhere, ForkKV equals an independent build of its semantics: context K/V from PEFT's own LoRA
    projections applied to ONE base pass's hidden states (one full copy per row, DynamicCache, SDPA)."""
    pm = full_agents
    ctx = _context(23)
    names = ["planner", "critic", "coder", "planner", "__base__", "biased"]
    inputs = batch_inputs(ctx, _prompts([5, 2, 4, 1, 3, 2], seed=2), pad_token_id=0)
    nb = mode.get("num_beams", 1)
    # PEFT repeats adapter_names for beams itself, but not for num_return_sequences (its users repeat them)
    k = mode.get("num_return_sequences", 1) if nb == 1 else 1
    gen_names = [n for n in names for _ in range(k)]
    ref_cache = semantic_reference_cache(pm, ctx, names)
    if k * nb > 1:
        ref_cache.batch_repeat_interleave(k * nb)
    torch.manual_seed(7)
    forkkv_hf.disable_forkkv(pm)
    ref = _gen(pm, inputs, gen_names, ref_cache, **mode)
    forkkv_hf.enable_forkkv(pm)
    cache = ForkKVCache.from_context(pm, ctx, adapter_names=names)
    torch.manual_seed(7)
    out = _gen(pm, inputs, gen_names, cache, **mode)
    _assert_same(out, ref)
    if k * nb > 1:
        assert cache.adapter_names == [n for n in names for _ in range(k * nb)]


def test_residual_modes(full_agents):
    """The residual is not a no-op: naive sharing (base K/V for every agent) and V-only give other logits; "none"
    equals a cache whose shared context has no residuals at all."""
    pm = full_agents
    ctx = _context(23)
    names = ["planner", "critic"]
    inputs = batch_inputs(ctx, _prompts([4, 4]), pad_token_id=0)
    shared = SharedContext.build(pm, ctx, names)
    runs = {mode: _gen(pm, inputs, names, shared.fork(names, residual=mode), max_new_tokens=3)
            for mode in ("kv", "v", "none")}
    assert (runs["kv"].scores[0] - runs["none"].scores[0]).abs().max() > 1e-3
    assert (runs["kv"].scores[0] - runs["v"].scores[0]).abs().max() > 1e-3
    assert (runs["v"].scores[0] - runs["none"].scores[0]).abs().max() > 1e-3
    report = shared.fork(names, residual="v").memory_report()
    assert report.residual_bytes == shared.fork(names).memory_report().residual_bytes // 2
    # ... and the B factors it uses: V's only (before, a V-only fork counted K's too)
    v_factors = sum(l.v_res.B.numel() * l.v_res.B.element_size() for l in shared.layers if l.v_res is not None)
    assert report.factor_bytes == v_factors and shared.fork(names, residual="none").memory_report().factor_bytes == 0
    assert shared.fork(names).memory_report().factor_bytes == shared.factor_bytes() > v_factors
    # "none" is exactly what a shared context without residuals gives
    bare = SharedContext.build(pm, ctx, [])
    for layer in bare.layers:
        assert layer.k_res is None and layer.v_res is None
    with pytest.raises(ValueError, match="no residuals in this shared context"):
        bare.fork(names)


def test_many_forks_share_one_base(full_agents):
    pm = full_agents
    ctx = _context(30)
    shared = SharedContext.build(pm, ctx, ["planner", "coder"])
    c1 = shared.fork(["planner"])
    c2 = shared.fork(["coder", "coder", "planner"])
    for l1, l2 in zip(c1.layers, c2.layers):
        assert l1.shared.key.data_ptr() == l2.shared.key.data_ptr()
        assert l1.shared.k_res.u.data_ptr() == l2.shared.k_res.u.data_ptr()
    before = [l.shared.key.clone() for l in c1.layers]
    inputs = batch_inputs(ctx, _prompts([3, 5, 2]), pad_token_id=0)
    _gen(pm, inputs, ["coder", "coder", "planner"], c2)
    for b, l in zip(before, c1.layers):
        assert torch.equal(b, l.shared.key)  # generate never writes the shared base
    a = _gen(pm, batch_inputs(ctx, _prompts([3]), pad_token_id=0), ["planner"], c1)
    c1b = shared.fork(["planner"])
    b = _gen(pm, batch_inputs(ctx, _prompts([3]), pad_token_id=0), ["planner"], c1b)
    _assert_same(a, b, atol=0)


def test_reset_allows_reuse(full_agents):
    pm = full_agents
    ctx = _context(19)
    names = ["coder", "planner"]
    cache = ForkKVCache.from_context(pm, ctx, adapter_names=names)
    inputs = batch_inputs(ctx, _prompts([2, 6], seed=5), pad_token_id=0)
    first = _gen(pm, inputs, names, cache)
    assert cache.get_seq_length() == 19 + 6 + 8 - 1
    cache.reset()
    assert cache.get_seq_length() == 19
    second = _gen(pm, inputs, names, cache)
    _assert_same(first, second, atol=0)


def test_plain_model_base_rows():
    """A plain transformers model (no PEFT) can fork "__base__" rows: generate equals the uncached run."""
    m = forkkv_hf.enable_forkkv(tiny_llama(layers=2, seed=3))
    ctx = _context(15)
    inputs = batch_inputs(ctx, _prompts([3, 1]), pad_token_id=0)
    cache = ForkKVCache.from_context(m, ctx, adapter_names=["__base__", "__base__"])
    a = m.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0, **cache_kwargs(cache))
    forkkv_hf.disable_forkkv(m)
    b = m.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_chunked_base_pass_equals_single_pass(full_agents):
    pm = full_agents
    ctx = _context(41)
    one = SharedContext.build(pm, ctx, ["planner", "critic"], chunk_size=None)
    chunked = SharedContext.build(pm, ctx, ["planner", "critic"], chunk_size=16, progress=False)
    for a, b in zip(one.layers, chunked.layers):
        torch.testing.assert_close(a.key, b.key, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.k_res.u, b.k_res.u, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.v_res.u, b.v_res.u, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.cos, b.cos)
