"""Training for fitted residuals (``residual=FittedResidual(r)``): its forward is what ``SharedContext.fit_residuals``
serves, at full width it is ordinary fine-tuning (logits and gradients), its gradients are those of the projection
onto a fixed subspace (an independent reference through ``torch.linalg.svd``), rows of several contexts equal each
context alone, and bad ranks are refused."""

import pytest
import torch
from cases import parametrize
from models import tiny_llama, with_adapters
from test_training import _batch, _grads

import forkkv_hf
from forkkv_hf import SharedContext, cache_kwargs
from forkkv_hf.ops.rope import apply_rope
from forkkv_hf.training import FittedResidual, TrainingContext, forkkv_logits, forkkv_loss

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
T = 17
WIDTH = 2 * 16  # tiny_llama: 2 KV heads of 16 dims


def _model(layers=3):
    return with_adapters(tiny_llama(layers=layers), {"agent": dict(target_modules=ALL)})


def _context(seed=2, n=T):
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(seed))


def _served(pm, ctx, batch, rank, k_rank):
    """Logits of fitted inference: SharedContext.build + fit_residuals + fork + a forward with adapter_names."""
    forkkv_hf.enable_forkkv(pm)
    try:
        pm.eval()
        shared = SharedContext.build(pm, ctx, ["agent"], progress=False)
        fitted = shared.fit_residuals(pm, ["agent"], rank=rank, k_rank=k_rank, progress=False)
        B = batch["input_ids"].shape[0]
        full = torch.cat([torch.ones(B, ctx.numel(), dtype=torch.long), batch["attention_mask"]], 1)
        pos = (full.cumsum(-1) - 1).clamp_min(0)[:, ctx.numel():]
        with torch.no_grad():
            out = pm(input_ids=batch["input_ids"], attention_mask=full, position_ids=pos,
                     adapter_names=["agent"] * B, use_cache=True, **cache_kwargs(fitted.fork(["agent"] * B)))
    finally:
        forkkv_hf.disable_forkkv(pm)
    return out.logits


@parametrize("rank,k_rank", [(3, None), (5, 2)])
def test_fitted_training_forward_is_fitted_inference(rank, k_rank):
    pm = _model()
    ctx, batch = _context(), _batch()
    with torch.no_grad():
        trained = forkkv_logits(pm, TrainingContext(pm, ctx), batch, "agent", residual=FittedResidual(rank, k_rank))
        kv = forkkv_logits(pm, TrainingContext(pm, ctx), batch, "agent", residual="kv")
    served = _served(pm, ctx, batch, rank, k_rank)
    keep = batch["attention_mask"].bool()
    err = (trained - served).abs()[keep].max().item()
    assert err < 1e-4 * served.abs().max().item(), err
    assert (kv - served).abs()[keep].max() > 100 * err + 1e-4  # the check can tell the modes apart


def test_full_width_is_ordinary_fine_tuning():
    """Rank H_kv·D over a context of more tokens than that: the projection is the identity (with fewer tokens the
    fit's subspace is the drift's row space, which keeps the forward but projects the gradient)."""
    pm = _model()
    pm.train()
    tc, batch = TrainingContext(pm, _context(n=WIDTH + 8)), _batch()
    exact = forkkv_loss(pm, tc, batch, "agent", residual="exact")
    full = forkkv_loss(pm, tc, batch, "agent", residual=FittedResidual(WIDTH))
    assert abs(full.item() - exact.item()) < 1e-5
    g_full, g_exact = _grads(pm, full), _grads(pm, exact)
    assert (g_full - g_exact).abs().max() < 1e-4 * g_exact.abs().max()
    low = forkkv_loss(pm, tc, batch, "agent", residual=FittedResidual(2))
    assert abs(low.item() - exact.item()) > 1e-4  # rank 2 is not the exact run on this adapter


def test_gradients_are_the_fixed_subspace_projection(monkeypatch):
    """The loss and its gradients equal a reference that fits each layer's drift through torch.linalg.svd (not the
    library's Gram-matrix eigh) and keeps the subspace fixed (detached)."""
    from forkkv_hf.training import loss as L

    pm = _model(layers=2).double()
    pm.train()
    tc, batch = TrainingContext(pm, _context()), _batch()
    rank, k_rank = 3, 2  # below the rank-4 LoRA's drift rank (a fit that keeps it whole has the exact gradient: below)
    got = forkkv_loss(pm, tc, batch, "agent", residual=FittedResidual(rank, k_rank))
    g_got = _grads(pm, got)

    def fit(d, r):  # d [1, H, T, D] -> its rank-r projection, the subspace from the SVD, detached
        H, D = d.shape[1], d.shape[3]
        m = d[0].transpose(0, 1).reshape(T, H * D)
        V = torch.linalg.svd(m.detach(), full_matrices=False).Vh[:r].T
        return (m @ V @ V.T).reshape(T, H, D).transpose(0, 1)[None]

    library_kv = L.context_kv

    def reference_kv(model, context, adapter, residual):
        out = []
        for layer, (ke, ve) in zip(context.layers, library_kv(model, context, adapter, "exact")):
            norm = layer.cos**2 + layer.sin**2  # 1 for plain tables; YaRN's carry its attention_scaling squared
            dk = fit(apply_rope(ke - layer.key, layer.cos, -layer.sin) / norm, k_rank)
            out.append((layer.key + apply_rope(dk, layer.cos, layer.sin), layer.value + fit(ve - layer.value, rank)))
        return out

    monkeypatch.setattr(L, "context_kv", reference_kv)
    want = forkkv_loss(pm, tc, batch, "agent", residual=FittedResidual(rank, k_rank))
    assert abs(got.item() - want.item()) < 1e-10
    g_want = _grads(pm, want)
    assert (g_got - g_want).abs().max() < 1e-8 * g_want.abs().max()
    assert g_got.abs().max() > 0


@parametrize("rank", [8, 16])
def test_a_fit_wider_than_the_drift_has_the_exact_gradient(rank):
    """One layer of rank-4 LoRA on q/k/v: the K/V drift has rank 4 for any weights, so every fit from rank 4 up is the
    drift and the loss is the exact one as a function of the weights. Its gradient was not: the fit's subspace held
    directions of numerically zero singular values, arbitrary, and the gradient through them was 0.7-0.9 off the exact
    one (changing with a 1e-13 change of a base weight; an audit's finding). Now it equals the exact gradient."""
    pm = with_adapters(tiny_llama(layers=1), {"agent": dict(r=4, target_modules=["q_proj", "k_proj", "v_proj"])})
    pm = pm.double()
    pm.train()
    tc, batch = TrainingContext(pm, _context(n=40)), _batch()  # 40 context tokens: more than the 32 K/V features
    exact = _grads(pm, forkkv_loss(pm, tc, batch, "agent", residual="exact"))
    fitted = _grads(pm, forkkv_loss(pm, tc, batch, "agent", residual=FittedResidual(rank)))
    assert (fitted - exact).abs().max() < 1e-8 * exact.abs().max()


def test_rows_of_several_contexts_equal_each_context_alone():
    """Each context's subspace is fitted on its own tokens, not its padding."""
    pm = _model()
    pm.set_adapter("agent")
    contexts = [_context(seed=2), _context(seed=4, n=T - 6)]
    batch, index = _batch(B=4), torch.tensor([1, 0, 1, 0])
    spec = FittedResidual(3)
    with torch.no_grad():
        got = forkkv_logits(pm, TrainingContext(pm, contexts), {**batch, "context_index": index}, "agent", spec)
        keep = batch["attention_mask"].bool()
        for c, ids in enumerate(contexts):
            rows = (index == c).nonzero().flatten()
            alone = forkkv_logits(pm, TrainingContext(pm, ids), {k: v[rows] for k, v in batch.items()}, "agent", spec)
            assert (got[rows] - alone).abs()[keep[rows]].max() < 1e-5 * alone.abs().max()


def test_bad_ranks_and_names_are_refused():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="positive int"):
            FittedResidual(bad)
    with pytest.raises(ValueError, match="k_rank must be a positive int"):
        FittedResidual(4, k_rank=0)
    pm = _model(layers=2)
    tc = TrainingContext(pm, _context())
    with pytest.raises(ValueError, match="FittedResidual\\(rank\\)"):
        forkkv_loss(pm, tc, _batch(), "agent", residual="fitted")
    # a partial-rotary layer (rotary tables narrower than the head): refused, as fit_residuals refuses it
    from types import SimpleNamespace

    from forkkv_hf.training.fitted import fitted_kv

    kv = torch.zeros(1, 2, 5, 8)
    layer = SimpleNamespace(key=kv, value=kv, cos=torch.ones(5, 4), sin=torch.zeros(5, 4))
    with pytest.raises(ValueError, match="partial rotary"):
        fitted_kv(SimpleNamespace(layers=[layer], lengths=[5]), [(kv, kv)], FittedResidual(2))
