"""``eval.bench.probe_uv`` on CPU (Triton interpreter, small shapes): the one-agent view reads agent 0's V residual
for every row (and is exact for that view); the ``no_uv_load`` ablation compiles from the patched kernel source and
removes exactly the V residual (its output is the base-only call's); the Gluon kernel's ablations patch a copy of its
module; a kernel whose text no longer holds the patched lines is refused, not silently run unpatched."""

import pytest
import torch

from cases import parametrize
from eval.bench import probe_uv
from eval.bench.kernel import D, make_case, reference, variant_view


@pytest.fixture(scope="module")
def case():
    return make_case(64, 3, dtype=torch.float32, device="cpu")


def _call(q, view, monkeypatch=None, kernel=None):
    from forkkv_hf.ops.dispatch import residual_attention_triton
    from forkkv_kernels import cascade

    if kernel is not None:
        monkeypatch.setattr(cascade, "_cascade_shared_kernel", kernel)
    return residual_attention_triton(q, view, None, D**-0.5)


def test_one_agent_view_is_exact_for_agent_zeros_residual(case):
    q, view = case
    one = probe_uv.one_agent_v(variant_view(view, "v"))
    assert one.v_rows.tolist() == [0, 0, 0] and one.v_slots == (0, 0, 0) and one.k_rows is None
    ref, _ = reference(q, one, D**-0.5)
    assert (_call(q, one).float() - ref).abs().max() < 1e-4
    distinct, _ = reference(q, variant_view(view, "v"), D**-0.5)
    assert (distinct - ref)[1:].abs().max() > 1e-3  # rows 1 and 2 read another residual than their own


def test_no_uv_load_ablation_removes_the_v_residual(case, monkeypatch):
    q, view = case
    ablated = probe_uv.ablated_kernel("no_uv_load")
    got = _call(q, variant_view(view, "v"), monkeypatch, ablated).float()
    base, _ = reference(q, variant_view(view, "base"), D**-0.5)
    with_v, _ = reference(q, variant_view(view, "v"), D**-0.5)
    assert (got - base).abs().max() < 1e-4 and (with_v - base).abs().max() > 1e-3


def test_a_changed_kernel_is_refused(monkeypatch):
    monkeypatch.setitem(probe_uv.ABLATIONS, "no_uv_load", ("not in the kernel", "x"))
    with pytest.raises(SystemExit, match="update probe_uv.ABLATIONS"):
        probe_uv.ablated_kernel("no_uv_load")
    monkeypatch.setitem(probe_uv.GLUON_ABLATIONS, "gluon_no_pu", [("not in the kernel", "x")])
    with pytest.raises(SystemExit, match="update probe_uv.GLUON_ABLATIONS"):
        probe_uv.ablated_gluon("gluon_no_pu")


@parametrize("name", sorted(probe_uv.GLUON_ABLATIONS))
def test_gluon_ablations_patch_every_occurrence_and_import(name):
    """Each Gluon ablation finds its lines in the kernel's module (both ``P·u_v`` calls: the loop's and the last
    tile's) and the patched copy imports as a module of its own, whose launcher is not the library's (Gluon has no
    interpreter: the patched kernel runs only on the GPU, timing only)."""
    import inspect

    from forkkv_kernels import shared_gluon

    src = inspect.getsource(shared_gluon)
    for old, _ in probe_uv.GLUON_ABLATIONS[name]:
        assert src.count(old) == 1, old
    launch = probe_uv.ablated_gluon(name)
    assert launch is not shared_gluon.launch_shared_gluon and launch.__name__ == "launch_shared_gluon"
