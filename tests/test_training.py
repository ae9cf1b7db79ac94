"""ForkKV-aware training (forkkv_hf.training) on tiny random models: its forward is what ForkKV inference computes,
its gradients are right (finite differences; an autograd reference where ForkKV is exact), a trained and saved
adapter serves under ForkKV exactly as it was trained, ForkKVTrainer trains one adapter, and what it cannot train
is refused with a message that says what to do."""

import pytest
import torch
from cases import parametrize
from models import tiny_llama, with_adapters
from peft import LoraConfig, PeftModel, get_peft_model

import forkkv_hf
from forkkv_hf import SharedContext, cache_kwargs
from forkkv_hf.training import ForkKVCollator, ForkKVTrainer, TrainingContext, forkkv_logits, forkkv_loss

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
T = 17


def _model(dtype=torch.float32, layers=3, **specs):
    return with_adapters(tiny_llama(layers=layers, dtype=dtype), specs or {"agent": dict(target_modules=ALL)})


def _batch(B=2, L=6, vocab=128, seed=1, pad_last=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, L), generator=g)
    mask = torch.ones_like(ids)
    if pad_last:
        mask[-1, -pad_last:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # the prompt part is not learned
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _context(seed=2, vocab=128):
    return torch.randint(3, vocab, (T,), generator=torch.Generator().manual_seed(seed))


def _inference_logits(pm, ctx, batch, name, residual):
    """Logits of the library's ForkKV inference: SharedContext.build + fork + a forward with adapter_names."""
    forkkv_hf.enable_forkkv(pm)
    try:
        shared = SharedContext.build(pm, ctx, [name], progress=False)
        B = batch["input_ids"].shape[0]
        cache = shared.fork([name] * B, residual=residual)
        full = torch.cat([torch.ones(B, ctx.numel(), dtype=torch.long), batch["attention_mask"]], 1)
        pos = (full.cumsum(-1) - 1).clamp_min(0)[:, ctx.numel():]
        with torch.no_grad():
            out = pm(input_ids=batch["input_ids"], attention_mask=full, position_ids=pos, adapter_names=[name] * B,
                     use_cache=True, **cache_kwargs(cache))
    finally:
        forkkv_hf.disable_forkkv(pm)
    return out.logits


@parametrize("residual", ["kv", "v", "none"])
def test_training_forward_is_forkkv_inference(residual):
    pm = _model()
    ctx, batch = _context(), _batch()
    with torch.no_grad():
        trained = forkkv_logits(pm, TrainingContext(pm, ctx), batch, "agent", residual=residual)
    served = _inference_logits(pm, ctx, batch, "agent", residual)
    keep = batch["attention_mask"].bool()
    err = (trained - served).abs()[keep].max().item()
    assert err < 1e-4 * served.abs().max().item(), err
    if residual != "kv":  # the residual modes differ from each other on this adapter: the check can tell them apart
        kv = _inference_logits(pm, ctx, batch, "agent", "kv")
        assert (kv - served).abs()[keep].max() > 100 * err + 1e-4


def test_exact_residual_is_fine_tuning_with_the_context_in_the_input():
    pm = _model()
    pm.set_adapter("agent")
    ctx, batch = _context(), _batch()
    with torch.no_grad():
        got = forkkv_logits(pm, TrainingContext(pm, ctx), batch, "agent", residual="exact")
        full_ids = torch.cat([ctx[None].expand(2, -1), batch["input_ids"]], 1)
        full_mask = torch.cat([torch.ones(2, T, dtype=torch.long), batch["attention_mask"]], 1)
        want = pm(input_ids=full_ids, attention_mask=full_mask).logits[:, T:]
    keep = batch["attention_mask"].bool()
    assert (got - want).abs()[keep].max() < 1e-5


def _lora(pm, layer, proj, which, name="agent"):
    mod = pm.get_base_model().model.layers[layer]
    mod = getattr(mod.self_attn if proj.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else mod.mlp, proj)
    return getattr(mod, f"lora_{which}")[name].weight


def test_gradients_equal_finite_differences():
    pm = _model(layers=2).double()  # PEFT makes LoRA weights fp32 whatever the base dtype
    pm.train()
    ctx, batch = _context(), _batch()
    tc = TrainingContext(pm, ctx)
    # K and V residual factors of layer 1 (their gradient flows through the context residual and the suffix), and
    # a q LoRA of layer 0 (suffix only)
    params = [_lora(pm, 1, "k_proj", "A"), _lora(pm, 1, "k_proj", "B"), _lora(pm, 1, "v_proj", "A"),
              _lora(pm, 1, "v_proj", "B"), _lora(pm, 0, "q_proj", "A")]
    loss = forkkv_loss(pm, tc, batch, "agent")
    grads = torch.autograd.grad(loss, params)
    g = torch.Generator().manual_seed(3)
    eps = 1e-3  # parts of the forward round like fp32 (rotary tables): smaller steps drown in that noise
    for p, grad in zip(params, grads):
        for _ in range(3):
            i = torch.randint(0, p.numel(), (1,), generator=g).item()
            with torch.no_grad():
                orig = p.view(-1)[i].item()
                p.view(-1)[i] = orig + eps
                up = forkkv_loss(pm, tc, batch, "agent").item()
                p.view(-1)[i] = orig - eps
                down = forkkv_loss(pm, tc, batch, "agent").item()
                p.view(-1)[i] = orig
            fd = (up - down) / (2 * eps)
            assert abs(fd - grad.view(-1)[i].item()) <= 1e-5 + 2e-3 * abs(fd), (p.shape, i, fd, grad.view(-1)[i])
    assert all(gr.abs().max() > 0 for gr in grads)


def _grads(pm, loss):
    params = [p for n, p in pm.named_parameters() if "lora_" in n]
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


def test_gradients_equal_plain_peft_where_forkkv_is_exact():
    """An adapter with LoRA on the last layer's k/v only: ForkKV's context K/V are the exact ones (no earlier layer
    drifts), so the gradients must be those of ordinary PEFT fine-tuning on "context + suffix"; an adapter on every
    layer must differ."""
    ctx, batch = _context(), _batch()

    def both(specs):
        pm = with_adapters(tiny_llama(layers=3), specs)
        pm.train()
        forkkv = _grads(pm, forkkv_loss(pm, TrainingContext(pm, ctx), batch, "agent"))
        full = {"input_ids": torch.cat([ctx[None].expand(2, -1), batch["input_ids"]], 1),
                "attention_mask": torch.cat([torch.ones(2, T, dtype=torch.long), batch["attention_mask"]], 1),
                "labels": torch.cat([torch.full((2, T), -100), batch["labels"]], 1)}
        return forkkv, _grads(pm, pm(**full).loss)

    forkkv, peft = both({"agent": dict(target_modules=["k_proj", "v_proj"], layers_to_transform=[2])})
    assert (forkkv - peft).abs().max() < 1e-5 * peft.abs().max()
    forkkv, peft = both({"agent": dict(target_modules=ALL)})
    assert (forkkv - peft).abs().max() > 1e-2 * peft.abs().max()


def _toy(n=8, L=5, seed=0):
    """Rows of a random prompt token followed by one fixed answer sequence, after a shared context."""
    ctx = _context(seed=seed)
    prompts = torch.randint(3, 128, (n, 1), generator=torch.Generator().manual_seed(seed))
    ids = torch.cat([prompts, torch.arange(10, 10 + L).expand(n, -1)], 1)
    labels = ids.clone()
    labels[:, 0] = -100
    return ctx, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_trained_adapter_serves_under_forkkv_as_trained(tmp_path):
    torch.manual_seed(0)
    # initializer_range: the default lm_head of a 64-wide model cannot put more than ~3% on any token (loss >= 3.6)
    pm = get_peft_model(tiny_llama(layers=2, initializer_range=0.2), LoraConfig(r=4, lora_alpha=8, target_modules=ALL),
                        adapter_name="agent")
    ctx, batch = _toy()
    tc = TrainingContext(pm, ctx)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    losses = []
    for _ in range(20):
        loss = forkkv_loss(pm, tc, batch, "agent")
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses
    pm.eval()
    with torch.no_grad():
        trained = forkkv_logits(pm, TrainingContext(pm, ctx), batch, "agent")
    pm.save_pretrained(tmp_path)
    served_pm = PeftModel.from_pretrained(tiny_llama(layers=2, initializer_range=0.2), tmp_path / "agent",
                                          adapter_name="agent").eval()
    served = _inference_logits(served_pm, ctx, batch, "agent", "kv")
    assert (trained - served).abs().max() < 1e-4 * served.abs().max()


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def test_trainer_trains_the_named_adapter_under_forkkv(tmp_path):
    from transformers import TrainingArguments

    pm = _model(agent=dict(target_modules=ALL), other=dict(target_modules=ALL))
    pm.set_adapter("agent")
    contexts = [_context(seed=s) for s in (5, 6)]
    batch = _batch(B=4, pad_last=0)
    rows = [{"input_ids": batch["input_ids"][i].tolist(), "labels": batch["labels"][i].tolist(), "context_index": i % 2}
            for i in range(4)]
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_" in n}
    # the trainer's loss on a batch is forkkv_loss over each context's rows, weighted by their labelled tokens
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True, logging_steps=1, disable_tqdm=True)
    trainer = ForkKVTrainer(model=pm, args=args, train_dataset=_Rows(rows), contexts=contexts, adapter_name="agent",
                            data_collator=ForkKVCollator(0))
    collated = ForkKVCollator(0)(rows)
    pm.train()
    with torch.no_grad():
        got = trainer.compute_loss(pm, dict(collated)).item()
        parts = [(forkkv_loss(pm, TrainingContext(pm, contexts[c]), {k: collated[k][c::2] for k in
                  ("input_ids", "attention_mask", "labels")}, "agent").item(),
                  (collated["labels"][c::2, 1:] != -100).sum().item()) for c in (0, 1)]
    assert abs(got - sum(l * n for l, n in parts) / sum(n for _, n in parts)) < 1e-5
    trainer.train()
    changed = {n.split(".lora_")[1].split(".")[1] for n, p in pm.named_parameters() if "lora_" in n
               and not torch.equal(p, before[n])}
    assert changed == {"agent"}
    pm.save_pretrained(tmp_path / "saved", selected_adapters=["agent"])
    assert (tmp_path / "saved" / "agent" / "adapter_model.safetensors").exists()


def test_refusals():
    pm = _model()
    ctx, batch = _context(), _batch()
    tc = TrainingContext(pm, ctx)
    with pytest.raises(TypeError, match="get_peft_model"):
        TrainingContext(tiny_llama(), ctx)
    with pytest.raises(ValueError, match="residual must be one of"):
        forkkv_loss(pm, tc, batch, "agent", residual="k")
    with pytest.raises(ValueError, match="unknown adapter"):
        forkkv_loss(pm, tc, batch, "nobody")
    with pytest.raises(ValueError, match="another model instance"):
        forkkv_loss(_model(), tc, batch, "agent")
    with pytest.raises(ValueError, match="no 'labels'"):
        forkkv_loss(pm, tc, {"input_ids": batch["input_ids"]}, "agent")
    with pytest.raises(ValueError, match="nothing to learn"):
        forkkv_loss(pm, tc, {**batch, "labels": torch.full_like(batch["labels"], -100)}, "agent")
    with pytest.raises(ValueError, match=r"\[B, L\] tensor"):
        forkkv_loss(pm, tc, {**batch, "input_ids": batch["input_ids"][0]}, "agent")
    with pytest.raises(TypeError, match="TrainingContext"):
        forkkv_loss(pm, ctx, batch, "agent")
    pm.get_base_model().model.norm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="model.norm.weight.*Freeze them"):
        TrainingContext(pm, ctx)
    with pytest.raises(KeyError, match="context_index"):
        ForkKVCollator(0)([{"input_ids": [1], "labels": [1]}])


def test_refuses_dora_and_k_norm_models():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    pm = _model(agent=dict(target_modules=["k_proj", "v_proj"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        forkkv_loss(pm, TrainingContext(pm, _context()), _batch(), "agent")
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    qwen = with_adapters(Qwen3ForCausalLM(cfg).eval(), {"agent": dict(target_modules=["k_proj", "v_proj"])})
    tc = TrainingContext(qwen, _context())
    with pytest.raises(ValueError, match="k_norm.*FittedResidual.*cannot serve"):  # (it advised residual='v',
        # which trains an agent inference refuses in every fork: an audit's finding)
        forkkv_loss(qwen, tc, _batch(), "agent")
    assert torch.isfinite(forkkv_loss(qwen, tc, _batch(), "agent", residual="v"))


@parametrize("residual", ["kv", "v", "none", "exact"])
def test_rows_of_several_contexts_in_one_batch_equal_each_context_alone(residual):
    """One TrainingContext over contexts of different lengths, rows mixed in one batch: each row's logits and the
    gradients are those of its own context alone (padding never reaches a row; positions follow each context)."""
    pm = _model()
    pm.set_adapter("agent")
    pm.train()
    contexts = [_context(seed=2), torch.randint(3, 128, (T - 6,), generator=torch.Generator().manual_seed(4))]
    batch = _batch(B=4)
    index = torch.tensor([1, 0, 1, 0])
    mixed = TrainingContext(pm, contexts)
    assert mixed.num_contexts == 2 and mixed.lengths == [T, T - 6] and mixed.num_tokens == T
    got = forkkv_logits(pm, mixed, {**batch, "context_index": index}, "agent", residual=residual)
    keep = batch["attention_mask"].bool()
    for c, ids in enumerate(contexts):
        rows = (index == c).nonzero().flatten()
        alone = forkkv_logits(pm, TrainingContext(pm, ids), {k: v[rows] for k, v in batch.items()}, "agent",
                              residual=residual)
        err = (got[rows] - alone).abs()[keep[rows]].max().item()
        assert err < 1e-5 * alone.abs().max().item(), (c, err)
    # the loss over the mixed batch is the token-weighted mean of the per-context losses, and so are its gradients
    loss = forkkv_loss(pm, mixed, {**batch, "context_index": index}, "agent", residual=residual)
    parts = []
    for c, ids in enumerate(contexts):
        sub = {k: v[index == c] for k, v in batch.items()}
        parts.append((forkkv_loss(pm, TrainingContext(pm, ids), sub, "agent", residual=residual),
                      (sub["labels"][:, 1:] != -100).sum()))
    want = sum(l * n for l, n in parts) / sum(n for _, n in parts)
    assert abs(loss.item() - want.item()) < 1e-5
    g_mixed, g_alone = _grads(pm, loss), _grads(pm, want)
    assert (g_mixed - g_alone).abs().max() < 1e-4 * g_alone.abs().max()  # fp32 sums in another order


def test_several_contexts_refusals():
    pm = _model()
    contexts = [_context(seed=2), _context(seed=3)[:9]]
    tc, batch = TrainingContext(pm, contexts), _batch()
    with pytest.raises(ValueError, match="give batch\\['context_index'\\]"):
        forkkv_loss(pm, tc, batch, "agent")
    with pytest.raises(IndexError, match="outside the 2 contexts"):
        forkkv_loss(pm, tc, {**batch, "context_index": torch.tensor([0, 2])}, "agent")
    with pytest.raises(ValueError, match="context_index'\\] must be \\[B\\]"):
        forkkv_loss(pm, tc, {**batch, "context_index": torch.tensor([0, 1, 1])}, "agent")
    with pytest.raises(ValueError, match="holds 2 contexts"):
        tc.token_ids
    with pytest.raises(ValueError, match="empty list"):
        TrainingContext(pm, [])
    dyn = with_adapters(tiny_llama(layers=2, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                              "rope_theta": 10000.0}),
                        {"agent": dict(target_modules=ALL)})
    with pytest.raises(ValueError, match="one TrainingContext per context"):
        TrainingContext(dyn, contexts)
    assert TrainingContext(dyn, contexts[0]).num_contexts == 1


def test_losses_of_several_adapters_before_one_backward():
    """Two agents' losses summed before one backward (or a student's loss followed by a teacher's forward, as in
    distillation, or by the next TrainingContext's base pass): each adapter gets the gradients of its own loss.
    PEFT's set_adapter and disable_adapter, which activating the second adapter and the base pass call, mark other
    adapters frozen; without undoing that the first adapter's gradients are lost."""
    pm = _model(a=dict(target_modules=ALL), b=dict(target_modules=ALL))
    pm.train()
    for p in (p for n, p in pm.named_parameters() if "lora_" in n):
        p.requires_grad_(True)
    ctx, batch = TrainingContext(pm, _context()), _batch()

    def grads(name):
        return torch.cat([p.grad.flatten() for n, p in pm.named_parameters() if f".{name}." in n])

    for name in ("a", "b"):
        forkkv_loss(pm, ctx, batch, name).backward()
    alone = {name: grads(name).clone() for name in ("a", "b")}
    pm.zero_grad(set_to_none=True)
    loss_a = forkkv_loss(pm, ctx, batch, "a")
    with torch.no_grad():  # a teacher's forward between the student's loss and its backward
        forkkv_logits(pm, ctx, batch, "b", residual="exact")
    loss_b = forkkv_loss(pm, ctx, batch, "b")
    TrainingContext(pm, _context(seed=4))  # the next step's base pass (adapters disabled) before this one's backward
    (loss_a + loss_b).backward()
    for name in ("a", "b"):
        assert grads(name).abs().max() > 0
        torch.testing.assert_close(grads(name), alone[name])


def test_nbytes_counts_each_storage_once():
    """The layers share the rotary tables (one storage for cos, one for sin): ``nbytes`` counts them once (before:
    once per layer, 11-20% over on tiny models) and equals the distinct storages the context holds."""
    pm = _model(layers=4)
    ctx = TrainingContext(pm, _context())
    held = {}
    for layer in ctx.layers:
        for t in (layer.key, layer.value, layer.x_k, layer.x_v, layer.cos, layer.sin):
            held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    assert len({layer.cos.untyped_storage().data_ptr() for layer in ctx.layers}) == 1
    assert ctx.nbytes() == sum(held.values())
