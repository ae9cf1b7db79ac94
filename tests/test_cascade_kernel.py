"""The cascade ResidualAttention kernels (``forkkv_kernels.cascade_attention``) against the fp32 reference, through its
plain-tensor launcher: the attention case space (tests/cases.py) with the rows' order derived on the device and with
the K pass's ``pairs`` form, the launch knobs (split counts, whole waves, register caps, merge unrolling), K and V
slots that differ, refusals; the tuning sweep's checks (eval/bench/sweep_kernel.py). On CPU they run in the Triton
interpreter. (Through the adapter, with the other kernel family, the shared knob table, the low-precision pass rule
and end-to-end generate: test_kernels.py.)"""

import ast
from pathlib import Path

import pytest
import torch

from cases import (ATTN_CASES, GPU_CASES, LOW_DTYPES, LOWP_CASES, SPLIT_RANK_CASES, AttnCase, GpuCase,
                   parametrize)
from forkkv_hf import reference_attention
from views import lowp_attention_error, padding_mask, random_view

pytest.importorskip("triton")
from forkkv_kernels import cascade_attention  # noqa: E402
from forkkv_kernels.kres_pass import rope_f16  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.version_independent  # no transformers/PEFT code: not rerun on 5.17 (tests/conftest.py)


def _device_inputs(view, host_order=True) -> tuple[list, dict]:
    """The view's tensors on ``DEV`` as ``cascade_attention`` takes them: the shared and private K/V with cos/sin
    (positional) and the residuals' keywords, slots as tensors; with ``host_order`` also the sorted rows and the number
    of agents (what the adapter passes), else the launcher derives them on the device."""
    sh = view.shared
    kw = {}
    for kind, res, rows in (("k", sh.k_res, view.k_rows), ("v", sh.v_res, view.v_rows)):
        if res is not None and rows is not None:
            kw.update({f"{kind}_u": res.u.to(DEV), f"{kind}_B": res.B.to(DEV), f"{kind}_slot": rows.to(DEV)})
    if host_order and "k_slot" in kw:
        slots = view.k_rows.tolist()
        kw["k_order"] = torch.tensor(sorted(range(len(slots)), key=lambda i: slots[i]), device=DEV)
        used = [s for s in slots if s >= 0]
        kw["k_agents"] = len(set(used))
        kw["k_max_rows"] = max((used.count(s) for s in set(used)), default=1)
    args = [t.to(DEV) for t in (sh.key[0], sh.value[0], sh.cos, sh.sin, view.key, view.value)]
    return args, kw


def _launch(q, view, mask, scale, host_order=True, **tuning):
    """``cascade_attention`` on the view's tensors (:func:`_device_inputs`), the output on CPU."""
    args, kw = _device_inputs(view, host_order)
    if mask is not None:
        mask = mask[:, 0].to(torch.int8).to(DEV)
    return cascade_attention(q.to(DEV), *args, scale, mask=mask, **kw, **tuning).cpu()


def _query(view, H, Q, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(view.batch_size, H, Q, view.shared.key.shape[-1], generator=g)


@parametrize("masked", [False, True])
@parametrize("case", ATTN_CASES)
def test_cascade_launcher_derives_the_row_order(case, masked):
    """The launcher with the rows' order by agent derived on the device (``k_order`` not given; the adapter passes it
    from the host, and test_kernels.py runs the attention case space through the adapter)."""
    view, q = case.view(), case.query()
    mask = case.mask() if masked else None
    out = _launch(q, view, mask, case.D**-0.5, host_order=False)
    assert out.shape == (case.B, case.Q, case.H, case.D)
    torch.testing.assert_close(out, reference_attention(q, view, mask, case.D**-0.5), rtol=2e-5, atol=2e-5)


@parametrize("masked", [False, True])
@parametrize("form", ["halves", "pairs", "joined"], fast=lambda form: form == "halves")
@parametrize("case", ATTN_CASES)
def test_cascade_k_pass_forms_match_reference(case, form, masked):
    """The K pass's forms over the attention case space: ``halves`` (two rebuild and two score MMAs per KV head, the
    lo and hi halves), ``pairs`` (lo/hi halves interleaved: one rebuild MMA and one score MMA per KV head) and
    ``joined`` (the GPU default: one rebuild MMA over the head's whole B_k split into the halves in registers, one
    score MMA of depth D); GQA 1-8, head dims 8-128 (48: padded halves), ranks 1-64, rows sharing an
    agent or without one, extend calls, masks."""
    view, q = case.view(), case.query()
    mask = case.mask() if masked else None
    out = _launch(q, view, mask, case.D**-0.5, res_form=form)
    torch.testing.assert_close(out, reference_attention(q, view, mask, case.D**-0.5), rtol=2e-5, atol=2e-5)


@parametrize("case", ATTN_CASES)
def test_cascade_fma_scores_match_reference(case):
    """The K pass scoring on CUDA cores (``res_score="fma"``: no MMA padding, the score step's width the agent's own
    query vectors) over the attention case space, every other case masked."""
    view, q = case.view(), case.query()
    masked = ATTN_CASES.index(case) % 2 == 1
    mask = case.mask() if masked else None
    out = _launch(q, view, mask, case.D**-0.5, res_score="fma")
    torch.testing.assert_close(out, reference_attention(q, view, mask, case.D**-0.5), rtol=2e-5, atol=2e-5)


#: shapes where several KV heads can share the K pass's score tile (4 and 8 KV heads: packs of 2-8 heads), decode and
#: extend, rows sharing an agent and a row without one, several ranks
PACK_CASES = [
    AttnCase(B=3, H=8, Hkv=4, D=32, T=45, P=3),
    AttnCase(B=5, H=16, Hkv=8, D=16, T=41, P=2, N=3, ranks=(16, 4, 7)),
    AttnCase(B=4, H=8, Hkv=8, D=16, T=37, P=3, rows=(0, 0, 1, -1)),
    AttnCase(B=3, H=8, Hkv=4, D=16, T=29, P=4, Q=2),
]


@parametrize("case", ATTN_CASES + PACK_CASES)
def test_cascade_packed_heads_match_reference(case):
    """Several KV heads sharing one score tile of the K pass (``res_pack``: each head's MMA multiplies only its own
    columns, the heads' MMAs accumulate into the tile) over the attention case space and the pack shapes, every other
    case masked; the pack shrinks to what a case allows (the heads of a program, an agent's vectors per head)."""
    view, q = case.view(), case.query()
    masked = (ATTN_CASES + PACK_CASES).index(case) % 2 == 1
    mask = case.mask() if masked else None
    out = _launch(q, view, mask, case.D**-0.5, res_pack=8)
    torch.testing.assert_close(out, reference_attention(q, view, mask, case.D**-0.5), rtol=2e-5, atol=2e-5)


@parametrize("case", PACK_CASES)
def test_cascade_packed_heads_pairs_form_and_head_groups(case):
    """The pack in the pairs form, and packs inside groups of KV heads per program (``res_heads``)."""
    view, q = case.view(), case.query()
    ref = reference_attention(q, view, None, case.D**-0.5)
    for knobs in (dict(res_form="pairs", res_pack=4), dict(res_form="halves", res_pack=4),
                  dict(res_heads=2, res_pack=2), dict(res_heads=4, res_pack=4)):
        if case.Hkv % knobs.get("res_heads", 1):
            continue
        torch.testing.assert_close(_launch(q, view, None, case.D**-0.5, **knobs), ref, rtol=2e-5, atol=2e-5)


@parametrize("case", SPLIT_RANK_CASES)
def test_cascade_k_and_v_residuals_of_different_ranks(case):
    """Fitted residuals' ``k_rank``: the K pass reads a K stack of one width, the V pass a V stack of another; the
    default launch and the K pass's forms and packs, masked, equal the reference."""
    view, q = case.view(), case.query()
    assert view.shared.k_res.rank != view.shared.v_res.rank
    mask, scale = case.mask(), case.D**-0.5
    ref = reference_attention(q, view, mask, scale)
    for knobs in ({}, dict(res_form="halves"), dict(res_form="joined"), dict(res_form="pairs", res_pack=2),
                  dict(block_m=16)):  # block_m 16: the lever for wide V ranks (eval/KERNEL_NOTES.md)
        torch.testing.assert_close(_launch(q, view, mask, scale, **knobs), ref, rtol=2e-5, atol=2e-5)


def test_v_tiles_fit_the_v_residual_sub_blocks():
    """One query vector per row and KV head (MHA) at V rank 64 gave each V-residual sub-block 1,024 ``u_v`` columns:
    540,672 bytes of shared memory for one stage of the GPU rule's 128-token tiles (its limit 232,448; the v48 GPU
    fuzz's failure). The fitted tiles keep one stage within :data:`V_STAGE_BYTES` wherever 16 x 16 tiles can (else None:
    the CUDA-core V form), and leave the measured rule's tiles (G = 4, rank <= 32) as they were."""
    from forkkv_kernels.tiles import V_STAGE_BYTES, stage_bytes, v_tiles

    for bm, bt in ((64, 32), (32, 128), (16, 128), (64, 64)):
        for rvb in (1, 8, 16, 32):
            assert v_tiles(bm, bt, 4, rvb, 128, 2) == (bm, bt)
    assert v_tiles(32, 128, 1, 64, 128, 2) == (32, 32)  # the fuzz's case: 17 rows of one vector, V rank 48
    assert stage_bytes(32, 128, 1, 64, 128, 2) >= 540_672  # an upper estimate of what the compile asked
    for vpr in (1, 2, 4, 8, 16):
        for rvb in (1, 4, 16, 32, 64, 128, 256):
            for bm, bt in ((64, 32), (32, 128), (8, 128), (64, 64)):
                for d_b, elt in ((64, 2), (128, 2), (128, 4)):
                    if stage_bytes(min(bm, 16), 16, vpr, rvb, d_b, elt) > V_STAGE_BYTES:
                        assert v_tiles(bm, bt, vpr, rvb, d_b, elt) is None  # (the CUDA-core V form then)
                        continue
                    fbm, fbt = v_tiles(bm, bt, vpr, rvb, d_b, elt)
                    assert fbm <= bm and fbt <= bt and fbm & (fbm - 1) == 0 and fbt & (fbt - 1) == 0
                    assert stage_bytes(fbm, fbt, vpr, rvb, d_b, elt) <= V_STAGE_BYTES
                    assert fbm == bm or fbt == 16  # block_t first
    assert v_tiles(64, 32, 1, 512, 128, 4) is None


@parametrize("masked", [False, True])
@parametrize("case", [*SPLIT_RANK_CASES, AttnCase(B=17, H=2, Hkv=2, D=16, T=45, P=2, N=3, ranks=(48, 1, 32),
                                                  v_ranks=(48, 16, 16)),
                      AttnCase(B=5, H=8, Hkv=2, D=48, T=40, P=6, Q=3, N=3, ranks=(4, 2, 8), rows=(0, 2, -1, 1, 0))])
def test_cascade_cuda_core_v_form_matches_reference(case, masked):
    """``v_form="fma"``: each vector's ``P·u_v`` from its own row's ``u_v`` tile on CUDA cores (no block-diagonal
    sub-blocks), with and without a K residual, GQA and MHA, extend calls, rows without an agent, masked."""
    view, q = case.view(), case.query()
    mask, scale = (case.mask() if masked else None), case.D**-0.5
    ref = reference_attention(q, view, mask, scale)
    for knobs in (dict(v_form="fma"), dict(v_form="fma", block_m=16, block_t=16), dict(v_form="mma")):
        torch.testing.assert_close(_launch(q, view, mask, scale, **knobs), ref, rtol=2e-5, atol=2e-5)


def test_cascade_takes_the_cuda_core_v_form_where_no_sub_block_fits():
    """One vector per row at V rank 300 (512 padded) in fp32: no 16 x 16 tile of the sub-blocks fits shared memory
    (:func:`forkkv_kernels.tiles.v_tiles` says None); the default launch takes the CUDA-core form, equal to the
    reference."""
    from forkkv_kernels.tiles import v_tiles

    assert v_tiles(16, 32, 1, 512, 16, 4) is None
    case = AttnCase(B=3, H=2, Hkv=2, D=16, T=23, P=2, N=2, ranks=(3, 2), v_ranks=(300, 7))
    view, q = case.view(), case.query()
    ref = reference_attention(q, view, None, 0.25)
    torch.testing.assert_close(_launch(q, view, None, 0.25), ref, rtol=2e-5, atol=2e-5)


def test_fma_tiles_bound_the_u_v_tile_and_refusals():
    from forkkv_kernels.tiles import FMA_TILE_PER_THREAD, fma_tiles

    for bm, bt, rvb, nw in ((64, 32, 64, 4), (32, 128, 16, 8), (64, 64, 128, 4), (16, 16, 256, 4)):
        fbm, fbt = fma_tiles(bm, bt, rvb, nw)
        assert fbm * fbt * rvb <= FMA_TILE_PER_THREAD * 32 * nw or (fbm, fbt) == (16, 16)
        assert fbt < bt or fbm == bm  # block_t first
    assert fma_tiles(64, 128, 64, 4, given=(64, None)) == (64, 16)
    view = random_view(B=2, Hkv=2, D=16, T=20, P=2)
    q = torch.randn(2, 4, 1, 16, generator=torch.Generator().manual_seed(3))
    for knobs in (dict(v_form="dot"), dict(v_form="fma", shared_form="gluon")):
        with pytest.raises(ValueError, match="v_form="):
            _launch(q, view, None, 0.25, **knobs)


def test_kv_rule_keeps_wide_mha_sub_blocks_in_the_triton_kernel():
    """K+V decode of one query vector per row and KV head (MHA) at V rank 32: the Gluon shared kernel measured 6x
    slower than the Triton one (v49: 8,766 against 1,454 µs at 64 agents); the rule gives it the Triton kernel with the
    Gluon K pass it was measured with, and keeps the Gluon kernel where it measured faster (MHA rank 16, G = 4)."""
    from forkkv_kernels.rules import launch_defaults

    mha32 = launch_defaults(64, 1, 1, True, True, torch.bfloat16, 32)
    assert (mha32["shared_form"], mha32["shared_k_load"], mha32["res_form"]) == ("triton", "softmax", "gluon")
    for vpr, rank in ((1, 16), (4, 16), (4, 32), (2, 16)):
        rule = launch_defaults(64, 1, vpr, True, True, torch.bfloat16, rank)
        assert (rule["shared_form"], rule["shared_k_load"]) == ("gluon", "ring"), (vpr, rank)


@parametrize("case", [AttnCase(B=17, H=2, Hkv=2, D=16, T=45, P=2, N=3, ranks=(48, 1, 32), v_ranks=(48, 16, 16)),
                      AttnCase(B=9, H=2, Hkv=2, D=24, T=40, P=3, N=2, ranks=(8, 4), v_ranks=(128, 64))])
def test_cascade_fitted_v_tiles_match_reference(case):
    """Calls whose V-residual sub-blocks the launcher narrows (:func:`forkkv_kernels.cascade.v_tiles`: one vector per
    row, V ranks 48-128) equal the reference, masked and not."""
    from forkkv_kernels.tiles import v_tiles

    bm, rvb = min(64, 1 << (case.B - 1).bit_length()), 1 << (max(case.v_ranks) - 1).bit_length()
    assert v_tiles(bm, 32, 1, rvb, 1 << (case.D - 1).bit_length(), 4) != (bm, 32)  # (interpreter: 32-token tiles)
    view, q, scale = case.view(), case.query(), case.D**-0.5
    for mask in (None, case.mask()):  # (v_form="mma": the default takes the CUDA-core form at these widths, v50)
        torch.testing.assert_close(_launch(q, view, mask, scale, v_form="mma"),
                                   reference_attention(q, view, mask, scale), rtol=2e-5, atol=2e-5)


def test_cascade_takes_the_cuda_core_v_form_from_wide_sub_blocks():
    """The rule's V form (:data:`forkkv_kernels.rules.FMA_V_FROM_COLUMNS`, v50: 3.4-121x faster at MHA rank 64-128 on an
    H100): the default launch of one vector per row at V rank 48 (1,024 sub-block columns) is the CUDA-core form's,
    bit for bit; at rank 16 (256 columns), and where a call gives its tiles, the sub-blocks'."""
    from forkkv_kernels.rules import FMA_V_FROM_COLUMNS
    from forkkv_kernels.tiles import sub_blocks

    for v_ranks, wide in (((48, 16, 16), True), ((16, 8, 4), False)):
        case = AttnCase(B=17, H=2, Hkv=2, D=16, T=45, P=2, N=3, ranks=(4, 1, 2), v_ranks=v_ranks)
        assert (sub_blocks(32, 1, 1 << (max(v_ranks) - 1).bit_length())["SBC"] >= FMA_V_FROM_COLUMNS) == wide
        view, q = case.view(), case.query()
        default, fma, mma = (_launch(q, view, None, 0.25, **knobs) for knobs in ({}, {"v_form": "fma"},
                                                                                 {"v_form": "mma"}))
        assert torch.equal(default, fma if wide else mma) and not torch.equal(fma, mma), v_ranks
        if wide:
            assert torch.equal(_launch(q, view, None, 0.25, block_t=16), _launch(q, view, None, 0.25, block_t=16,
                                                                                  v_form="mma"))


def test_cascade_reads_factors_of_any_layout():
    """``v_B`` with the same values in another memory layout (rank not of stride 1): the merge assumed stride 1 and
    read other values, silently (0.5 off; found by an audit); the launcher makes it contiguous as it does ``k_B``."""
    view = random_view(B=3, Hkv=2, D=16, T=37, P=3, ranks=(4, 2))
    q = torch.randn(3, 4, 1, 16, generator=torch.Generator().manual_seed(3))
    ref = reference_attention(q, view, None, 0.25)
    B = view.shared.v_res.B
    view.shared.v_res.B = B.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(view.shared.v_res.B, B) and view.shared.v_res.B.stride(2) != 1
    torch.testing.assert_close(_launch(q, view, None, 0.25), ref, rtol=2e-5, atol=2e-5)


def test_cascade_tile_knobs_refuse_what_is_not_a_power_of_two():
    """``block_m``, ``block_t``, ``n_sub``, ``res_block_t`` of 24 or 3 failed deep inside Triton ("arange's range must
    be a power of 2")."""
    view = random_view(B=2, Hkv=2, D=16, T=20, P=2)
    q = torch.randn(2, 4, 1, 16, generator=torch.Generator().manual_seed(3))
    for knob in (dict(block_m=24), dict(block_t=24), dict(n_sub=3), dict(res_block_t=48), dict(merge_block_t=24),
                 dict(merge_block_t=-16)):
        with pytest.raises(ValueError, match=f"{next(iter(knob))}=.*; give a power of two"):
            _launch(q, view, None, 0.25, **knob)
    for knob in (dict(block_t=8), dict(merge_block_t=4)):  # powers of two, but tensor cores multiply 16 deep at least
        with pytest.raises(ValueError, match=f"{next(iter(knob))}=.*; give 16 or more"):
            _launch(q, view, None, 0.25, **knob)


def test_cascade_refuses_masks_and_knobs_it_would_misread():
    """A floating (additive) mask was read as != 0 = attend (inverted, 1.35 off); a broadcast [B, 1, S] mask was read
    past its end and a 4-D one failed inside Triton; n_sub above block_m failed inside Triton."""
    view = random_view(B=2, Hkv=2, D=16, T=20, P=2)
    q = torch.randn(2, 4, 2, 16, generator=torch.Generator().manual_seed(3)).to(DEV)
    args, kw = _device_inputs(view, True)
    ok = torch.ones(2, 2, 22, dtype=torch.int8, device=DEV)
    cascade_attention(q, *args, 0.25, mask=ok, **kw)
    with pytest.raises(TypeError, match="give a bool or integer mask"):
        cascade_attention(q, *args, 0.25, mask=torch.zeros(2, 2, 22, device=DEV), **kw)
    for bad in (ok[:, :1], ok[..., :20], ok[None]):
        with pytest.raises(ValueError, match=r"give \[B, NQ, T \+ P\] = \[2, 2, 22\]"):
            cascade_attention(q, *args, 0.25, mask=bad, **kw)
    with pytest.raises(ValueError, match="n_sub=32 is more than the 16 query vectors"):
        cascade_attention(q, *args, 0.25, block_m=16, n_sub=32, **kw)


def test_cascade_refuses_what_ran_silently_wrong():
    """A negative ``res_heads`` divided the KV heads and launched no K pass, and a negative ``merge_block_t`` skipped
    the private part (output 1.2-1.7 and 0.3 off, silently); an empty shared context divided by zero."""
    view = random_view(B=2, Hkv=2, D=16, T=20, P=2)
    q = torch.randn(2, 4, 1, 16, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="res_heads=-1: give a positive divisor of the 2 KV heads"):
        _launch(q, view, None, 0.25, res_heads=-1, res_form="halves")
    empty = random_view(B=2, Hkv=2, D=16, T=20, P=2)
    sh = empty.shared
    sh.key, sh.value = sh.key[:, :, :0], sh.value[:, :, :0]
    with pytest.raises(ValueError, match="the shared context is empty"):
        _launch(q, empty, None, 0.25)


def test_cascade_pack_refuses_what_is_not_a_power_of_two():
    case = PACK_CASES[0]
    view, q = case.view(), case.query()
    for bad in (0, 3):
        with pytest.raises(ValueError, match=f"res_pack={bad}; give a power of two"):
            _launch(q, view, None, 0.25, res_pack=bad)


#: launch knobs of the cascade launcher beyond tests/cases.py's TUNINGS, each on a case that makes it matter (several
#: splits of the context, several KV heads, rows sharing an agent, extend)
_LONG = AttnCase(B=3, H=4, Hkv=2, D=32, T=77, P=3)
LAUNCH_KNOBS = [
    (_LONG, dict(n_splits=3, res_splits=5, res_block_t=16, block_t=16)),
    (_LONG, dict(whole_waves=True, res_whole_waves=True, programs_per_sm=3, res_programs_per_sm=3, block_t=16)),
    (_LONG, dict(res_form="pairs", res_heads=1, res_splits=2, res_block_t=16, merge_unroll=3, n_splits=7, block_t=16)),
    (_LONG, dict(res_form="joined", res_heads=1, res_splits=3, res_block_t=16, block_t=16)),
    (AttnCase(B=5, H=8, Hkv=2, D=16, T=41, P=9, Q=2, rows=(1, 0, 1, 1, -1)),
     dict(res_form="pairs", mq=16, merge_unroll=4, merge_block_t=16, merge_warps=2, merge_stages=1)),
    (AttnCase(B=4, H=6, Hkv=3, D=48, T=50, P=4), dict(res_form="pairs", res_warps=8, res_maxnreg=128, maxnreg=168,
                                                     res_stages=3, n_splits=50)),
    # the merge taking several splits' partials per step: 7 splits in chunks of 4 (a partial chunk), 50 in chunks of
    # 16 unrolled by 2, and a chunk wider than the splits there are
    (_LONG, dict(merge_chunk=4, n_splits=7, block_t=16, res_block_t=16)),
    (AttnCase(B=4, H=6, Hkv=3, D=48, T=50, P=4), dict(merge_chunk=16, merge_unroll=2, n_splits=50)),
    (AttnCase(B=5, H=8, Hkv=2, D=16, T=41, P=9, Q=2, rows=(1, 0, 1, 1, -1)), dict(merge_chunk=8, n_splits=2)),
    (AttnCase(B=3, H=4, Hkv=2, D=16, T=300, P=4, k_res=False, v_res=False), dict(merge_chunk=4, n_splits=9)),
    # the splits merged before the private part (its rescale then applies to the V residual's P·u_v too): per split,
    # by chunks, with several private tiles, extend rows and a row without an agent
    (_LONG, dict(merge_first=True, n_splits=5, block_t=16, res_block_t=16, merge_unroll=2)),
    (AttnCase(B=5, H=8, Hkv=2, D=16, T=41, P=9, Q=2, rows=(1, 0, 1, 1, -1)),
     dict(merge_first=True, merge_chunk=4, n_splits=3, merge_block_t=16)),
    (AttnCase(B=3, H=4, Hkv=2, D=16, T=300, P=4, k_res=False, v_res=False), dict(merge_first=True, merge_chunk=16)),
    # programmatic dependent launches (ignored off Hopper and under the interpreter): the shared kernel after the K
    # pass and the merge after it, the merge's private part before or after its wait; without residuals only the merge
    (_LONG, dict(pdl=True, n_splits=5, block_t=16, res_block_t=16)),
    (AttnCase(B=5, H=8, Hkv=2, D=16, T=41, P=9, Q=2, rows=(1, 0, 1, 1, -1)), dict(pdl=True, merge_first=False)),
    (AttnCase(B=3, H=4, Hkv=2, D=16, T=300, P=4, k_res=False), dict(pdl=True, n_splits=9)),
    (AttnCase(B=3, H=4, Hkv=2, D=16, T=300, P=4, k_res=False, v_res=False), dict(pdl=True, merge_first=False)),
    (_LONG, dict(pdl="late", n_splits=5, block_t=16, res_block_t=16)),
    (AttnCase(B=3, H=4, Hkv=2, D=16, T=300, P=4, k_res=False), dict(pdl="merge", n_splits=9)),
    # without a K residual: a context of whole tiles only (every split whole), one whole tile before a partial one;
    # the V residual alone and base only
    (AttnCase(B=3, H=4, Hkv=2, D=16, T=96, P=4, k_res=False), dict(n_splits=3, block_t=16)),
    (AttnCase(B=3, H=4, Hkv=2, D=16, T=100, P=4, k_res=False, v_res=False), dict(n_splits=2, block_t=32)),
]


@parametrize("masked", [False, True], fast=lambda masked: masked)
@parametrize("case,knobs", LAUNCH_KNOBS)
def test_cascade_launch_knobs_match_reference(case, knobs, masked):
    """Split counts (explicit, more than the context has tiles, rounded to whole waves), register caps, warps and the
    merge's unrolled split loop (a remainder included) change the schedule, not the result."""
    view, q = case.view(), case.query()
    mask = case.mask() if masked else None
    out = _launch(q, view, mask, case.D**-0.5, **knobs)
    torch.testing.assert_close(out, reference_attention(q, view, mask, case.D**-0.5), rtol=2e-5, atol=2e-5)


def _gpu_rule(case, dtype: torch.dtype) -> dict:
    """The launch knobs the launcher uses on the GPU for ``case`` with queries of ``dtype``: on CPU the bf16 rule
    whatever the dtype (the interpreter runs it with 32-token tiles; it has no shared-memory limit), on the GPU the rule
    of ``dtype`` itself (the bf16 rule's 128-token tiles in fp32 do not fit an H200's shared memory at D=128 with a
    rank-64 V residual, even with one pipeline stage; the launcher never runs them so). Without the shared kernel's
    form and its K-score load: the launcher's own pick, which falls back where a call cannot take it (given, they
    would be asked for)."""
    from forkkv_kernels.cascade import launch_defaults

    vpr = 1 << (case.Q * (case.H // case.Hkv) - 1).bit_length()
    rule = launch_defaults(case.B, case.Q, vpr, case.k_res, case.v_res, torch.bfloat16 if DEV == "cpu" else dtype)
    return {k: v for k, v in rule.items() if k not in ("shared_form", "shared_k_load")}


#: the GPU's launch rules (``launch_defaults``, eval/results/sweep_kernel_v8_nvidia_h200.json) forced, with their tiles:
#: 128 tokens for the shared part (few vectors) or 64 / 32 (many), 128 for the K pass, splits rounded down to whole
#: waves, the merge unrolled by 2. (The interpreter ignores warps and register caps; tiles and splits are what it runs.)
V8_WIDE = dict(block_t=128, num_warps=8, programs_per_sm=1, whole_waves=True, res_block_t=128, res_warps=8,
               res_maxnreg=128, res_programs_per_sm=4, res_whole_waves=True, merge_unroll=2)
V8_RULES = {"wide": V8_WIDE, "narrow": dict(V8_WIDE, block_t=64, num_warps=4, programs_per_sm=2),
            "many_k": dict(V8_WIDE, block_t=32, num_warps=4, programs_per_sm=2)}
#: contexts that are not a multiple of 128 tokens and span several tiles and splits: GQA 1-8, ranks 1-16, rows sharing
#: an agent or without one, extend calls, one residual kind or none, more than 32 query vectors (the narrow rule)
V8_CASES = [
    AttnCase(B=3, H=4, Hkv=2, D=32, T=300, P=3, fast=True),
    AttnCase(B=4, H=8, Hkv=1, D=16, T=389, P=5, Q=2, rows=(0, 0, 1, -1)),
    AttnCase(B=5, H=3, Hkv=3, D=16, T=257, P=4, N=3, ranks=(1, 8, 3)),
    AttnCase(B=2, H=6, Hkv=2, D=48, T=200, P=6, Q=4),
    AttnCase(B=9, H=16, Hkv=2, D=16, T=450, P=2, N=3, ranks=(16, 4, 2), rows=(0, 1, 2, 0, 1, 2, -1, 0, 0)),
    AttnCase(B=3, H=4, Hkv=2, D=16, T=300, P=4, k_res=False),
    AttnCase(B=3, H=4, Hkv=2, D=16, T=300, P=4, k_res=False, v_res=False),
]


@parametrize("masked", [False, True], fast=lambda masked: masked)
@parametrize("case", ATTN_CASES)
def test_cascade_gpu_launch_rule_matches_reference(case, masked):
    """The attention case space with the knobs the GPU would use for each shape (128-token tiles, whole waves)."""
    view, q = case.view(), case.query()
    mask = case.mask() if masked else None
    out = _launch(q, view, mask, case.D**-0.5, **_gpu_rule(case, q.dtype))
    torch.testing.assert_close(out, reference_attention(q, view, mask, case.D**-0.5), rtol=2e-5, atol=2e-5)


#: every case under every rule, masked or not alternating: each case and each rule meet both mask settings
V8_COMBOS = [(case, rule, (i + j) % 2 == 1) for i, case in enumerate(V8_CASES) for j, rule in enumerate(V8_RULES)]


@parametrize("case,rule,masked", V8_COMBOS, fast=lambda combo: combo[0].fast)
def test_cascade_v8_rules_on_long_odd_contexts(case, rule, masked):
    """Each of the GPU's launch rules on contexts of several 128-token tiles, the last one partial, and several
    splits (a whole-wave split count that rounds down, an odd one for the unrolled merge)."""
    view, q = case.view(), case.query()
    mask = case.mask() if masked else None
    out = _launch(q, view, mask, case.D**-0.5, **V8_RULES[rule])
    torch.testing.assert_close(out, reference_attention(q, view, mask, case.D**-0.5), rtol=2e-5, atol=2e-5)


#: (rule, dtype, lowp_rope) covering every pair of values of any two of them (6 of the 12 combinations)
LOWP_RULE_PAIRS = [("gpu", torch.bfloat16, True), ("gpu", torch.float16, False), ("wide", torch.bfloat16, False),
                   ("wide", torch.float16, True), ("narrow", torch.bfloat16, True), ("narrow", torch.float16, False)]


@parametrize("case,rule,dtype,lowp_rope",
             [(case, *combo) for case in LOWP_CASES + [AttnCase(B=4, H=8, Hkv=2, D=64, T=300, P=5, rows=(0, 1, 1, -1))]
              for combo in LOWP_RULE_PAIRS],
             fast=lambda combo: combo[0].T == 300 and combo[1] == "gpu" and combo[2] == torch.bfloat16)
def test_cascade_v8_rules_low_precision_pass_rule(case, rule, dtype, lowp_rope):
    """bf16/fp16 with the GPU's launch rules: error against the fp32 reference at most 3x that of PyTorch doing the
    same attention in the low dtype."""
    view, q = case.view(dtype), case.query(dtype)
    scale = case.D**-0.5
    knobs = _gpu_rule(case, dtype) if rule == "gpu" else V8_RULES[rule]
    for m in (None, padding_mask(case.B, case.Q, case.T, case.P, [1] * case.B)):
        ref = reference_attention(q.float(), view, m, scale)
        base_err = lowp_attention_error(q.float(), view, m, scale, ref)
        out = _launch(q, view, m, scale, lowp_rope=lowp_rope, **knobs)
        assert out.dtype == dtype
        err = (out.float() - ref).abs().max().item()
        assert err <= 3 * base_err + 1e-5, (err, base_err)


@parametrize("case,dtype", [(case, dtype) for case in LOWP_CASES for dtype in LOW_DTYPES])
def test_cascade_fma_scores_low_precision_pass_rule(case, dtype):
    """bf16/fp16 with the K pass scoring on CUDA cores (fp32 products of the rounded rotated residual and queries):
    error against the fp32 reference at most 3x that of PyTorch doing the same attention in the low dtype."""
    view, q = case.view(dtype), case.query(dtype)
    scale = case.D**-0.5
    ref = reference_attention(q.float(), view, None, scale)
    base_err = lowp_attention_error(q.float(), view, None, scale, ref)
    rule = {**_gpu_rule(case, dtype), "res_form": "halves", "res_score": "fma"}  # CUDA-core scores: the halves form
    out = _launch(q, view, None, scale, lowp_rope=True, **rule)
    assert out.dtype == dtype
    err = (out.float() - ref).abs().max().item()
    assert err <= 3 * base_err + 1e-5, (err, base_err)


def test_gpu_launch_rule_is_the_sweeps_best():
    """``launch_defaults`` gives the fastest passing rule of the v8 sweep at each measured point (T=32K, 8/32/128
    agents, K+V / V / base), except where the sweep measured the rule's choice as fast: the merge's unroll factor
    (2, 4 and 8 within 1.5% of each other); the K pass's knobs follow the v11c sweep since
    (:func:`test_gpu_k_pass_rule_is_the_v11c_sweeps_best`)."""
    import json

    from forkkv_kernels.cascade import launch_defaults

    path = Path(__file__).parents[1] / "eval/results/sweep_kernel_v8_nvidia_h200.json"
    summary = json.loads(path.read_text())["extra"]["summary"]
    assert len(summary) == 9
    for s in summary:
        N, variant = s["agents"], s["variant"]
        rule = launch_defaults(N, 1, 4, variant == "kv", variant in ("kv", "v"), torch.bfloat16)
        for knob, value in s["best_rule"].items():
            if knob == "merge_unroll" or knob.startswith("res_"):  # the K pass: the v11c sweep's rule since (below)
                continue
            assert rule[knob] == value, (variant, N, knob, rule[knob], value)
    assert launch_defaults(32, 1, 4, True, True, torch.float32)["whole_waves"] is False  # fp32: not swept


def test_gpu_pdl_rule_follows_the_v19_sweeps():
    """The launch rule's ``pdl`` (v19): "merge" wherever the mode sweeps (``v19ma``/``v19mb``, one H100, 32K, 1-128
    agents) measured it no slower than plain launches by more than the run-to-run spread (1.5%) in both orders, plain
    launches where it measured slower (the V residual alone from 32 agents, +7-9%); and the rule's own check against
    plain launches (``v19ra``/``v19rb``) never slower by more than the spread."""
    import json

    from forkkv_kernels.cascade import launch_defaults

    res = Path(__file__).parents[1] / "eval/results"
    def times(names):
        out = {}
        for name in names:
            for r in json.loads((res / f"sweep_kernel_{name}_nvidia_h100.json").read_text())["rows"]:
                if "graph_s" in r:
                    out.setdefault((r["variant"], r["agents"], r["config"]), []).append(r["graph_s"])
        return out

    modes, check = times(["v19ma", "v19mb"]), times(["v19ra", "v19rb"])
    for variant in ("kv", "v", "base"):
        for N in (1, 8, 32, 128):
            rule = launch_defaults(N, 1, 4, variant == "kv", variant in ("kv", "v"), torch.bfloat16)
            plain = modes[variant, N, "{}"]
            merge = modes[variant, N, json.dumps({"pdl": "merge"})]
            slower = all(m > 1.015 * p for m, p in zip(merge, plain))
            assert rule["pdl"] == (False if slower else "merge"), (variant, N, merge, plain)
            on, off = check[variant, N, "{}"], check[variant, N, json.dumps({"pdl": False})]
            assert sum(on) <= 1.015 * sum(off), (variant, N, on, off)


def test_gpu_k_pass_rule_is_the_v11c_sweeps_best():
    """The Triton K pass's launch rule (the joined form, one KV head per score tile, 128-token tiles on 8 warps, 3
    stages) is within 1% of the v11c sweep's fastest K pass configuration at every point (T=32K, 1/8/32/128 agents,
    K+V; whole-wave split counts included), at least 3% faster than v11b's rule (the halves form in packs of 4 on
    64-token tiles: the sweep's ``{}`` row) at 32 and 128 agents and not slower at 1 and 8."""
    import json

    from forkkv_kernels.rules import GLUON_K_FROM, TRITON_K_RULE, launch_defaults

    path = Path(__file__).parents[1] / "eval/results/sweep_kernel_v11c_nvidia_h200.json"
    rows = [r for r in json.loads(path.read_text())["rows"] if r["stage"] == "kres" and r["ok"]]
    # the sweep's configurations are knobs over v11b's rule (its "{}" row); the rule's are these
    adopted = {"res_block_t": 128, "res_form": "joined", "res_pack": 1, "res_stages": 3, "res_warps": 8}
    for N in (1, 8, 32, 128):  # the Triton K pass's rule (the Gluon one from 16 agents: test_kres_gluon.py)
        rule = TRITON_K_RULE if N * 4 >= GLUON_K_FROM else launch_defaults(N, 1, 4, True, True, torch.bfloat16)
        assert {k: rule[k] for k in adopted} == adopted
        at = {r["config"]: r["graph_s"] for r in rows if r["agents"] == N}
        own = at[json.dumps(adopted, sort_keys=True)]
        assert own <= 1.01 * min(at.values()), (N, own, min(at.values()))
        assert own <= (0.97 if N >= 32 else 1.0) * at["{}"], (N, own, at["{}"])
    assert launch_defaults(32, 1, 4, True, True, torch.float32)["res_form"] == "halves"  # fp32: not swept


def test_gpu_k_pass_f16_form_is_the_v15_sweeps_choice():
    """The K pass's fp16 form (``res_f16``) is in the bf16/fp16 rule for decode calls of 128+ vectors per KV head
    (32+ agents of G = 4): in both v15 sweeps (one H100, T=32K, K+V) it is faster than the rule without it at 32 and
    128 agents, and it is off at 1 and 8 agents, where it measured slower; off for extend calls (unmeasured) and fp32."""
    import json

    from forkkv_kernels.cascade import launch_defaults

    for name, points in (("v15", (1, 8, 32, 128)), ("v15b", (32, 128))):
        path = Path(__file__).parents[1] / f"eval/results/sweep_kernel_{name}_nvidia_h100.json"
        rows = [r for r in json.loads(path.read_text())["rows"] if r["stage"] == "kres" and r["ok"]]
        for N in points:
            on = launch_defaults(N, 1, 4, True, True, torch.bfloat16)["res_f16"]
            at = {r["config"]: r["graph_s"] for r in rows if r["agents"] == N}
            f16, plain = at['{"res_f16": true}'], at["{}"]
            assert on == (N >= 32) and (f16 < plain) == on, (name, N, on, f16, plain)
    assert launch_defaults(32, 1, 4, True, True, torch.float16)["res_f16"] is True
    assert launch_defaults(32, 4, 16, True, True, torch.bfloat16)["res_f16"] is False  # extend: unmeasured
    assert launch_defaults(32, 1, 4, False, True, torch.bfloat16)["res_f16"] is False  # no K residual
    assert launch_defaults(32, 1, 4, True, True, torch.float32)["res_f16"] is False


def test_gpu_k_pass_saturating_conversion_is_the_v11e_sweeps_choice():
    """The K pass's fp16 scores go through the saturating conversion (``res_satfinite``) in the bf16/fp16 rule: in the
    v11e sweep (T=32K, 1/8/32/128 agents, K+V) the rule with it (``{"res_satfinite": true}`` over v11c's rule, the
    sweep's ``{}`` row) is faster than without at every point and within 1.5% of the fastest row."""
    import json

    from forkkv_kernels.cascade import launch_defaults

    path = Path(__file__).parents[1] / "eval/results/sweep_kernel_v11e_nvidia_h200.json"
    rows = [r for r in json.loads(path.read_text())["rows"] if r["stage"] == "kres" and r["ok"]]
    for N in (1, 8, 32, 128):
        assert launch_defaults(N, 1, 4, True, True, torch.bfloat16)["res_satfinite"] is True
        at = {r["config"]: r["graph_s"] for r in rows if r["agents"] == N}
        own = at['{"res_satfinite": true}']
        assert own < at["{}"] and own <= 1.015 * min(at.values()), (N, own, at)
    assert launch_defaults(32, 1, 4, True, True, torch.float32)["res_satfinite"] is False  # fp32 scores: no clamp


def test_gpu_merge_rule_is_the_v12b_sweeps_choice():
    """The merge's launch rule (the splits' partials merged before the private part, one split per step unrolled by
    2) is within 1.5% of the fastest of the four configurations the v12b sweep measured in one run (T=32K, 1/8/32/128
    agents, K+V / V / base: v10b's two rules, each with the partials merged first or last)."""
    import json

    from forkkv_kernels.cascade import launch_defaults

    path = Path(__file__).parents[1] / "eval/results/sweep_kernel_v12b_nvidia_h200.json"
    times = {}
    for r in json.loads(path.read_text())["rows"]:
        knobs = json.loads(r["config"])
        key = (knobs["merge_chunk"], knobs["merge_unroll"], knobs.get("merge_first", False))
        times.setdefault((r["agents"], r["variant"]), {})[key] = r["graph_s"]
    assert len(times) == 12 and all(len(t) == 4 for t in times.values())
    for (N, variant), t in times.items():
        rule = launch_defaults(N, 1, 4, variant == "kv", variant in ("kv", "v"), torch.bfloat16)
        chosen = t[(rule["merge_chunk"], rule["merge_unroll"], rule["merge_first"])]
        assert chosen <= 1.015 * min(t.values()), (N, variant, t)
    assert launch_defaults(8, 1, 4, True, True, torch.bfloat16)["merge_first"] is True


def test_gpu_v_residual_stages_are_the_v13b_sweeps_choice():
    """The V residual alone runs its shared part with 3 pipeline stages up to 32 query vectors per KV head (8 agents)
    at rank <= 16 and with 2 from 33 on: at every point of the v13b sweep (T=32K, 1/8/32/128 agents, rank 16) the
    rule's stage count is the faster of the two on the rule's tiles and splits, and 3 stages measured at least 5%
    faster at 1 and 8 agents; a higher rank keeps 2 (its wider u_v tile is unmeasured at 3)."""
    import json

    from forkkv_kernels.cascade import launch_defaults

    path = Path(__file__).parents[1] / "eval/results/sweep_kernel_v13b_nvidia_h200.json"
    times = {}
    for r in json.loads(path.read_text())["rows"]:
        if r["variant"] == "v" and r["config"] in ("{}", '{"num_stages": 3}') and r["ok"]:
            times.setdefault(r["agents"], {})[json.loads(r["config"]).get("num_stages", 2)] = r["graph_s"]
    assert sorted(times) == [1, 8, 32, 128] and all(sorted(t) == [2, 3] for t in times.values())
    for N, t in times.items():
        stages = launch_defaults(N, 1, 4, False, True, torch.bfloat16)["num_stages"]
        assert t[stages] == min(t.values()), (N, stages, t)
        if N <= 8:
            assert stages == 3 and t[3] <= 0.95 * t[2], (N, t)
    assert launch_defaults(8, 1, 4, False, True, torch.bfloat16, v_rank=64)["num_stages"] == 2
    assert launch_defaults(8, 1, 4, True, True, torch.bfloat16)["num_stages"] == 3  # K+V: unchanged


@parametrize("lowp_rope", [False, True], fast=lambda lowp_rope: lowp_rope)
@parametrize("dtype", LOW_DTYPES, fast=lambda dtype: dtype == torch.bfloat16)
@parametrize("case", LOWP_CASES, fast=lambda case: case.Q > 1)
def test_cascade_k_pass_forms_low_precision_pass_rule(case, dtype, lowp_rope):
    """bf16/fp16 with the ``pairs`` and ``joined`` forms: error against the fp32 reference at most 3x that of PyTorch
    doing the same attention in the low dtype, with the K residual's rotation in fp32 or in the low dtype (emulated
    roundings)."""
    view, q = case.view(dtype), case.query(dtype)
    scale = case.D**-0.5
    for m in (None, padding_mask(case.B, case.Q, case.T, case.P, [1] * case.B)):
        ref = reference_attention(q.float(), view, m, scale)
        base_err = lowp_attention_error(q.float(), view, m, scale, ref)
        for form in ("pairs", "joined"):
            out = _launch(q, view, m, scale, res_form=form, lowp_rope=lowp_rope)
            assert out.dtype == dtype
            err = (out.float() - ref).abs().max().item()
            assert err <= 3 * base_err + 1e-5, (form, err, base_err)


@parametrize("case", LOWP_CASES)
@parametrize("dtype", LOW_DTYPES)
def test_cascade_f16_k_pass_low_precision_pass_rule(case, dtype):
    """``res_f16`` (joined form: the rebuild accumulated in fp16, the rotation and the score MMA's operands in fp16,
    the scores in fp32; emulated on the interpreter as fp32 sums rounded to fp16): within 3x PyTorch's low-precision
    error of the fp32 reference, bf16 and fp16 caches, with and without padding."""
    view, q = case.view(dtype), case.query(dtype)
    scale = case.D**-0.5
    for m in (None, padding_mask(case.B, case.Q, case.T, case.P, [1] * case.B)):
        ref = reference_attention(q.float(), view, m, scale)
        base_err = lowp_attention_error(q.float(), view, m, scale, ref)
        out = _launch(q, view, m, scale, res_form="joined", res_f16=True, lowp_rope=True)
        assert out.dtype == dtype
        err = (out.float() - ref).abs().max().item()
        assert err <= 3 * base_err + 1e-5, (err, base_err)


@parametrize("case", ATTN_CASES, fast=lambda case: ATTN_CASES.index(case) % 3 == 0)
def test_cascade_f16_k_pass_case_space(case):
    """``res_f16`` over the attention case space (GQA 1-8, head dims 8-128, ranks 1-64, shared agents, rows without
    one, extend calls, every other case masked), fp32 inputs: the fp16 roundings of the K residual and the queries
    bound the error (the residual's scores only; the base's are fp32); with ``rope16`` the same output bit for bit."""
    view, q = case.view(), case.query()
    masked = ATTN_CASES.index(case) % 2 == 1
    mask = case.mask() if masked else None
    out = _launch(q, view, mask, case.D**-0.5, res_form="joined", res_f16=True)
    torch.testing.assert_close(out, reference_attention(q, view, mask, case.D**-0.5), rtol=3e-3, atol=3e-3)
    if case.k_res:  # the RoPE tables given in fp16 (rope16): the same conversion, made once: bit for bit
        rope16 = rope_f16(view.shared.cos.to(DEV), view.shared.sin.to(DEV))
        assert torch.equal(_launch(q, view, mask, case.D**-0.5, res_form="joined", res_f16=True, rope16=rope16), out)


@parametrize("dtype", [torch.float32, *LOW_DTYPES])
def test_cascade_rule_f16_form_for_many_agents(dtype):
    """33 decode rows of G = 4 (132 vectors per KV head) take the rule's fp16 K pass on the interpreter (as the GPU's
    bf16/fp16 rule does): within the low-precision pass rule for bf16/fp16, and fp32 calls keep the fp32 rebuild
    (exact to 2e-5, which the fp16 form's roundings would miss)."""
    view = random_view(B=33, Hkv=2, D=16, T=40, P=3, n_agents=5, ranks=(4, 2, 3, 4, 1), dtype=dtype)
    q = _query(view, 8, 1).to(dtype)
    ref = reference_attention(q.float(), view, None, 0.25)
    out = _launch(q, view, None, 0.25)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
    else:
        err = (out.float() - ref).abs().max().item()
        assert err <= 3 * lowp_attention_error(q.float(), view, None, 0.25, ref) + 1e-5, err


def test_cascade_f16_k_pass_refused_outside_the_joined_form():
    view = random_view(B=2, Hkv=2, D=16, T=31, P=3, rows=[0, 1])
    with pytest.raises(ValueError, match="res_f16 runs in the joined form only"):
        _launch(_query(view, 4, 1), view, None, 0.25, res_form="halves", res_f16=True)


def test_cascade_k_and_v_slots_differ_per_row():
    """A row may have a K residual and no V residual (and the reverse): each kind follows its own slots."""
    view = random_view(B=4, Hkv=2, D=16, T=31, P=3, rows=[0, 1, -1, 1])
    view.v_rows = torch.tensor([-1, 0, 1, 1])
    q = _query(view, 4, 1)
    torch.testing.assert_close(_launch(q, view, None, 0.25), reference_attention(q, view, None, 0.25),
                               rtol=2e-5, atol=2e-5)


@parametrize("case", ATTN_CASES, fast=lambda case: ATTN_CASES.index(case) % 3 == 0)
def test_cascade_context_visible_reads_the_mask_in_the_private_part_only(case):
    """``context_visible=True`` (the compiled decode step's call): a padding mask, whose context columns are ones,
    gives what it gives without the flag; and the shared part no longer reads the mask's context columns while the
    private part still reads its own (a mask that also hides context tokens then gives the padding mask's result, and
    without the flag it does not: the flag is not a no-op)."""
    view, q = case.view(), case.query()
    pad, scale = case.mask(), case.D**-0.5
    hiding = pad.clone()
    hiding[..., : case.T // 2] = False  # what no caller of the flag passes: context tokens hidden
    got = _launch(q, view, pad, scale, context_visible=True)
    torch.testing.assert_close(got, _launch(q, view, pad, scale), rtol=0, atol=0)
    torch.testing.assert_close(got, reference_attention(q, view, pad, scale), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(_launch(q, view, hiding, scale, context_visible=True), got, rtol=0, atol=0)
    assert (_launch(q, view, hiding, scale) - got).abs().max() > 1e-3


def test_cascade_notices_each_residual():
    """Not a test that cannot fail: removing either residual changes the output."""
    view = random_view(B=2, Hkv=2, D=16, T=30, P=2, rows=[0, 1])
    q = _query(view, 4, 1)
    full = _launch(q, view, None, 0.25)
    for kind in ("k_rows", "v_rows"):
        rows = getattr(view, kind)
        setattr(view, kind, torch.tensor([-1, -1]))
        assert (full - _launch(q, view, None, 0.25)).abs().max() > 1e-2, kind
        setattr(view, kind, rows)


def test_cascade_refuses_what_it_cannot_take():
    view = random_view(B=2, Hkv=2, D=16, T=20, P=2)
    with pytest.raises(ValueError, match="not a multiple of 2 KV heads"):
        _launch(_query(view, 3, 1), view, None, 0.25)
    with pytest.raises(ValueError, match="res_heads=3: give a positive divisor of the 2 KV heads"):
        _launch(_query(view, 4, 1), view, None, 0.25, res_heads=3)
    with pytest.raises(TypeError, match="query is torch.float16"):
        _launch(_query(view, 4, 1).half(), view, None, 0.25)
    with pytest.raises(ValueError, match="res_form='quads'; use one of"):
        _launch(_query(view, 4, 1), view, None, 0.25, res_form="quads")
    with pytest.raises(ValueError, match="0 splits of the context; give at least 1"):
        _launch(_query(view, 4, 1), view, None, 0.25, n_splits=0)
    with pytest.raises(ValueError, match="merge_unroll=0; give 1"):
        _launch(_query(view, 4, 1), view, None, 0.25, merge_unroll=0)
    with pytest.raises(ValueError, match="merge_chunk=3; give a power of two"):
        _launch(_query(view, 4, 1), view, None, 0.25, merge_chunk=3)
    with pytest.raises(ValueError, match="res_score='tf32'; use one of"):
        _launch(_query(view, 4, 1), view, None, 0.25, res_score="tf32")
    with pytest.raises(ValueError, match="halves form only"):
        _launch(_query(view, 4, 1), view, None, 0.25, res_score="fma", res_form="pairs")
    with pytest.raises(ValueError, match="mq=8: a power of two of at least 2 .* and 16"):
        _launch(_query(view, 4, 1), view, None, 0.25, mq=8)
    with pytest.raises(ValueError, match="mq=1: a power of two of at least 2"):
        _launch(_query(view, 4, 1), view, None, 0.25, mq=1, res_score="fma")


def test_kernels_import_nothing_from_forkkv_hf():
    """Layering: the kernels package sits below forkkv_hf (its launchers take plain tensors)."""
    for path in (Path(__file__).parents[1] / "forkkv_kernels").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "forkkv_hf" for n in names), (path.name, names)


#: knob sets the GPU tests run besides the defaults: the candidates of eval/bench/sweep_kernel.py that change code
#: paths (the pairs form, 8 warps under a register cap, whole waves, the unrolled merge, the merge by chunks of splits)
GPU_KNOBS = [
    {},
    {"res_form": "pairs"},
    {"res_form": "pairs", "res_block_t": 128, "res_warps": 8, "res_maxnreg": 128},
    {"res_warps": 8, "res_maxnreg": 128, "whole_waves": True, "res_whole_waves": True, "res_programs_per_sm": 3},
    {"merge_unroll": 4, "block_t": 128, "num_warps": 8, "programs_per_sm": 2, "whole_waves": True},
    {"res_score": "fma"},
    {"res_score": "fma", "res_block_t": 64, "res_warps": 4, "res_maxnreg": 255},
    {"merge_chunk": 8, "merge_unroll": 1},
    {"res_form": "halves", "res_pack": 4, "res_block_t": 64, "res_warps": 4},
    {"res_pack": 8, "mq": 32, "res_form": "pairs"},
    {"res_form": "joined", "res_pack": 4, "res_block_t": 64, "res_warps": 4, "res_stages": 2},
    {"res_satfinite": True},
    {"res_satfinite": True, "res_form": "halves", "res_pack": 4, "res_block_t": 64, "res_warps": 4},
    {"res_f16": True},
    {"res_f16": True, "res_block_t": 64, "res_warps": 4},
    {"pdl": True},
    {"pdl": True, "merge_first": False},
    {"pdl": "late"},
    {"pdl": "merge"},
]


@pytest.mark.gpu
@parametrize("dtype", LOW_DTYPES)
@parametrize("case", GPU_CASES)
def test_cascade_real_sizes_gpu(case, dtype):
    """Llama-3.1-8B-shaped heads (32 query, 8 KV, D=128), rank 16, on the GPU, with the default knobs and each of
    :data:`GPU_KNOBS` (one reference per case). The CUDA-core score step takes at most 16 query vectors per row and KV
    head (it refuses more, tested on CPU): the extend cases of 7 and 17 queries (32 / 128 vectors) skip it, and a
    score width ``mq`` below a row's vectors (refused likewise) is skipped where a row has more."""
    view, q = case.view(dtype), case.query(dtype)
    ref = reference_attention(q.float(), view, None, 128**-0.5)
    base_err = lowp_attention_error(q.float(), view, None, 128**-0.5, ref)
    vpr = 1 << (case.Q * 4 - 1).bit_length()
    for knobs in GPU_KNOBS:
        if (knobs.get("res_score") == "fma" and vpr > 16) or knobs.get("mq", vpr) < vpr:
            continue
        err = (_launch(q, view, None, 128**-0.5, **knobs).float() - ref).abs().max().item()
        assert err <= 3 * base_err + 1e-5, (knobs, err, base_err)


@pytest.mark.gpu
@parametrize("dtype", [*LOW_DTYPES, torch.float32])
@parametrize("shape", [(17, 80, (48, 1, 32), (48, 16, 16)), (40, 128, (16, 64), (64, 64)),
                       (20, 128, (16,), (128,)), (70, 96, (80, 8), (32, 48))])
def test_gpu_mha_wide_v_ranks(shape, dtype):
    """One query vector per row and KV head (MHA: 8 query heads on 8 KV heads) with V ranks 32-128 on the GPU's
    default launch: the V-residual sub-blocks narrowed to fit (the v48 fuzz's 17 rows at rank 48 asked 540,672 bytes
    of shared memory), within the pass rule of the same attention computed by PyTorch in the call's dtype."""
    B, D, k_ranks, v_ranks = shape
    view = random_view(B=B, Hkv=8, D=D, T=1029, P=5, n_agents=len(k_ranks), ranks=k_ranks, v_ranks=v_ranks,
                       dtype=dtype, rows=[i % (len(k_ranks) + 1) - 1 for i in range(B)])
    q = torch.randn(B, 8, 1, D, generator=torch.Generator().manual_seed(3)).to(dtype)
    ref = reference_attention(q.float(), view, None, D**-0.5)
    base = lowp_attention_error(q.float(), view, None, D**-0.5, ref) if dtype != torch.float32 else 0.0
    for knobs in ({"v_form": "mma"}, {}):  # the fitted sub-blocks, the rule's (the CUDA-core V form from rank 33)
        err = (_launch(q, view, None, D**-0.5, **knobs).float() - ref).abs().max().item()
        assert err <= 3 * base + 2e-3, (knobs, err, base)


@pytest.mark.gpu
@parametrize("case", [*GPU_CASES[:2], GpuCase(2053, 20)])
def test_gpu_context_visible_equals_the_masked_shared_part(case):
    """``context_visible`` on the GPU under the launch rule (8 agents: the Triton K pass with the Gluon shared kernel;
    20 agents: both in Gluon): with a padding mask, the same output bit for bit as the shared part reading the mask,
    within the pass rule of the reference."""
    view, q = case.view(torch.bfloat16), case.query(torch.bfloat16)
    B, P = q.shape[0], view.private_len
    mask = padding_mask(B, 1, case.T, P, [b % (P - 1) for b in range(B)])
    ref = reference_attention(q.float(), view, mask, 128**-0.5)
    got = _launch(q, view, mask, 128**-0.5, context_visible=True)
    assert torch.equal(got, _launch(q, view, mask, 128**-0.5))
    err = (got.float() - ref).abs().max().item()
    assert err <= 3 * lowp_attention_error(q.float(), view, mask, 128**-0.5, ref) + 1e-5, err


@pytest.mark.gpu
@parametrize("case", GPU_CASES)
def test_gpu_satfinite_scores_equal_the_clamped_ones(case):
    """The K pass's saturating conversion (``res_satfinite``: PTX ``cvt.rn.satfinite.f16x2.f32``, two scores per
    instruction; only on sm_90+) writes the same fp16 scores as the clamp and conversion it replaces wherever
    |score| < 60000: the attention is bit for bit the same, in both forms (a swapped pair of the packed conversion
    would move every other score to its neighbour's token)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the saturating conversion runs on sm_90+ only (elsewhere the knob keeps the clamp)")
    view, q = case.view(torch.bfloat16), case.query(torch.bfloat16)
    for form in ("joined", "halves"):
        clamped = _launch(q, view, None, 128**-0.5, res_form=form, res_satfinite=False)
        saturated = _launch(q, view, None, 128**-0.5, res_form=form, res_satfinite=True)
        assert torch.equal(clamped, saturated), (form, (clamped.float() - saturated.float()).abs().max().item())


@pytest.mark.gpu
@parametrize("case", GPU_CASES[:2])
def test_gpu_pdl_calls_in_a_cuda_graph_equal_plain_launches(case):
    """Programmatic dependent launches captured in a CUDA graph, calls back to back on shared workspaces (a call's
    merge followed by the next call's K pass or shared kernel; each kernel's early start overlaps the one before it):
    every replay gives the outputs of plain launches, bit for bit, for K+V, V only and no residual."""
    from forkkv_kernels.attention_common import fresh_scratch, pdl_ok

    if not pdl_ok("cuda"):
        pytest.skip("programmatic dependent launch needs sm_90+ and Triton's grid-dependency intrinsics")
    view, q = case.view(torch.bfloat16), case.query(torch.bfloat16).to(DEV)
    args, res = _device_inputs(view)  # inputs on the GPU before the capture (a copy inside it would be illegal)
    variants = [res, {k: v for k, v in res.items() if k.startswith("v_")}, {}]

    def calls(pdl, **kw):
        return [cascade_attention(q, *args, 128**-0.5, pdl=pdl, **v, **kw) for v in variants]

    plain = calls(False)
    for mode in ("early", "late", "merge"):
        calls(mode, scratch=fresh_scratch)  # compiled outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = calls(mode, scratch=fresh_scratch)
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            for want, got in zip(plain, captured):
                assert torch.equal(want, got), mode


def test_hopper_features_stay_off_on_rocm(monkeypatch):
    """The PTX-only features (the K pass's saturating conversion, programmatic dependent launch) gate on the NVIDIA
    compute capability: a ROCm device reporting "capability" 9 (MI300) does not get them; a Hopper GPU does."""
    from forkkv_kernels import attention_common as ac

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 4))
    for hip, want in (("6.2.0", 0), (None, 9)):
        monkeypatch.setattr(torch.version, "hip", hip)
        ac.sm_major.cache_clear()
        assert ac.sm_major("cuda:7") == want
        assert ac.pdl_ok("cuda:7") == (want == 9 and ac.HAS_PDL)
    ac.sm_major.cache_clear()


def test_cascade_refuses_an_unknown_pdl_mode():
    case = _LONG
    view, q = case.view(), case.query()
    with pytest.raises(ValueError, match="pdl='eager'.*early"):
        _launch(q, view, None, case.D**-0.5, pdl="eager")


# --- the tuning sweep (eval/bench/sweep_kernel.py): what of it runs without a GPU ------------------------------------
def test_sweep_reference_is_the_exact_attention():
    """The sweep checks configurations against eval.bench.kernel.reference: the fp32 reference's output (rows with
    and without each residual kind, slots that differ per kind)."""
    from eval.bench.kernel import reference

    view = random_view(B=5, Hkv=2, D=16, T=37, P=4, n_agents=3, rows=[0, 2, -1, 1, 0], ranks=(4, 3, 2),
                       dtype=torch.bfloat16)
    view.v_rows = torch.tensor([1, -1, 0, 2, 2])
    q = _query(view, 4, 1).to(torch.bfloat16)
    ref, sdpa_err = reference(q, view, 0.25, chunk=2)
    torch.testing.assert_close(ref, reference_attention(q.float(), view, None, 0.25), rtol=1e-5, atol=1e-5)
    assert 0 < sdpa_err < 0.05


def test_sweep_geometry_matches_the_launcher():
    """The sweep sizes whole waves from a compiled kernel's resources and predicts the launcher's own split count
    (it skips a wave count equal to it): the same numbers as the launcher's split rule."""
    from eval.bench.sweep_kernel import launch_geometry, resident_programs, wave_splits
    from forkkv_kernels.attention_common import split_length

    # the H200's compiled kernels (eval/results/raw/profile_kernel_v7b_cascade_h200.json): K pass, shared part, merge
    assert [resident_programs(150, 4, 20480), resident_programs(241, 4, 106496), resident_programs(104, 4, 21504)] \
        == [3, 2, 4]
    assert resident_programs(128, 8, 12288) == 2 and resident_programs(64, 4, 200000) == 1
    # the rules (forkkv_kernels/cascade.py launch_defaults): K pass 128-token tiles (v11c), 4 programs per SM, whole
    # waves (the Gluon one's from 16 agents, v39: 64-token tiles, 3 per SM); the shared part (v8) 128-token tiles and
    # one program per SM up to 32 query vectors, else 64 (32 with K residuals) and 2 (the V residual alone from 32
    # vectors: the Gluon kernel's 32-token tiles, v26; a configuration's own knobs win)
    expected = {("kres", 8): (8, 128, 4), ("kres", 32): (32, 64, 3), ("kres", 128): (128 * 2, 128, 4),
                ("shared", 32): (2 * 8, 32, 2), ("shared", 128): (8 * 8, 64, 2), ("shared", 8): (8, 32, 2),
                ("shared", 1): (8, 128, 3)}
    for stage, variant, cfg, N in [("kres", "kv", {}, 8), ("kres", "kv", {}, 32), ("kres", "kv", {"res_heads": 4}, 128),
                                   ("shared", "kv", {}, 32), ("shared", "base", {}, 128), ("shared", "v", {}, 8),
                                   ("shared", "base", {"block_m": 128, "programs_per_sm": 3}, 1)]:
        geo = launch_geometry(stage, variant, cfg, N, 32768, 132)
        items, block_t, per_sm = expected[stage, N]
        assert (geo["items"], geo["block_t"]) == (items, block_t), (stage, N, geo)
        assert geo["splits"] == -(-32768 // split_length(32768, block_t, items, per_sm * 132, whole_waves=True))
        one = wave_splits(1, 3, 132, geo["items"], 32768, geo["block_t"])
        assert one * geo["items"] <= 3 * 132 or one == 1  # one wave at most
        assert one == -(-32768 // split_length(32768, geo["block_t"], geo["items"], 3 * 132, whole_waves=True))
    # the pair kernel (two KV heads per program, one program per SM): half the programs of the Gluon V kernel
    geo = launch_geometry("shared", "v", {"shared_form": "gluon_pair"}, 32, 32768, 132)
    assert (geo["items"], geo["block_t"]) == (2 * 4, 32), geo
    assert geo["splits"] == -(-32768 // split_length(32768, 32, 8, 132, whole_waves=True))


@pytest.mark.slow
@pytest.mark.skipif(DEV == "cuda", reason="the sweep's logic under the interpreter with a fake timer and CPU tensors; "
                    "on the GPU the sweep itself runs (eval/bench/sweep_kernel.py)")
def test_sweep_checks_every_configuration_and_a_wrong_one_cannot_win(tmp_path, monkeypatch):
    """A run of the sweep's stages on CPU (interpreter, tiny shapes, a fake timer): every configuration is checked
    against the exact output, one whose output is wrong is not timed and cannot be best (here the ``pairs`` form,
    deliberately broken), the combined stage runs the stages' best, and no configuration starts past the time limit."""
    import eval.bench.sweep_kernel as sk
    from eval.bench.runner import BenchmarkRun
    from eval.bench.sweep_kernel import Sweep, job_order

    # the interpreter compiles nothing: 3 resident programs per SM, so whole-wave split counts get tried
    monkeypatch.setattr(sk, "resources", lambda compiled: {"resident": 3})
    cases = {}
    for T, N in [(200, 1), (40, 2)]:
        view = random_view(B=N, Hkv=2, D=16, T=T, P=3, n_agents=N, rows=list(range(N)), ranks=(4,) * N,
                           dtype=torch.bfloat16, seed=T)
        cases[(T, N)] = (_query(view, 4, 1).to(torch.bfloat16), view)
    run = BenchmarkRun("sweep_kernel", params={}, case_keys=["stage", "variant", "context", "agents", "config"],
                       out=tmp_path / "sweep.json", time_limit=600)
    sweep = Sweep(run, lambda fn: (fn(), 1e-3)[1], cases, [1, 2], 4)
    attn = sweep.attn

    def broken_pairs(q, view, mask, scale, **knobs):
        out = attn(q, view, mask, scale, **knobs)
        return out + 0.05 if knobs.get("res_form") == "pairs" else out

    sweep.attn = broken_pairs
    candidates = {"kres": [{}, {"res_form": "pairs"}, {"res_block_t": 16}], "shared": [{}, {"n_splits": 3}],
                  "merge": [{"merge_unroll": 2}]}
    sweep.run_jobs(job_order(list(cases), ["kres", "shared", "merge", "combined"]), candidates)
    rows = run.rows
    assert rows and all("max_abs_err" in r and r["ok"] == ("graph_s" in r) for r in rows), rows
    wrong = [r for r in rows if "pairs" in r["config"]]
    assert len(wrong) >= 2 and not any(r["ok"] for r in wrong)
    assert {r["stage"] for r in rows if "waves" in r} == {"kres", "shared"}
    assert all(r["ok"] for r in rows if "pairs" not in r["config"])
    assert not any(b["config"].get("res_form") for b in run.extra["best"].values())
    assert {(r["stage"], r["variant"]) for r in rows if r["stage"] == "combined"} == {
        ("combined", v) for v in ("kv", "v", "base")}
    assert {(s["variant"], s["context"]) for s in run.extra["summary"]} == {
        (v, T) for v in ("kv", "v", "base") for T, _ in cases}

    late = BenchmarkRun("sweep_kernel", params={}, case_keys=["stage", "variant", "context", "agents", "config"],
                        out=tmp_path / "late.json", time_limit=0)
    Sweep(late, lambda fn: 1e-3, cases, [1], 4).run_jobs(job_order(list(cases), ["kres", "shared"]), candidates)
    assert late.rows == [] and len(late.extra["not_run"]) == 4


def test_sweep_narrowed_to_one_variant(tmp_path, monkeypatch):
    """``variants`` (``sweep_kernel --variants kv``, the v17 run's shape) times only those rows of a stage, and every
    configuration of them passes the sweep's check against the exact output."""
    import eval.bench.sweep_kernel as sk
    from eval.bench.runner import BenchmarkRun
    from eval.bench.sweep_kernel import Sweep, job_order

    monkeypatch.setattr(sk, "resources", lambda compiled: {"resident": 2})
    view = random_view(B=3, Hkv=2, D=16, T=70, P=3, n_agents=3, rows=[0, 1, 2], ranks=(4, 2, 3),
                       dtype=torch.bfloat16, seed=3)
    cases = {(70, 3): (_query(view, 4, 1).to(torch.bfloat16), view)}
    run = BenchmarkRun("sweep_kernel", params={}, case_keys=["stage", "variant", "context", "agents", "config"],
                       out=tmp_path / "sweep.json", time_limit=600)
    sweep = Sweep(run, lambda fn: (fn(), 1e-3)[1], cases, [1], 4, variants=["kv"])
    candidates = {"shared": [{}, {"block_m": 16, "block_t": 16}, {"block_t": 64, "num_stages": 2}]}
    sweep.run_jobs(job_order(list(cases), ["shared"]), candidates)
    assert run.rows and {r["variant"] for r in run.rows} == {"kv"}
    assert len({r["config"] for r in run.rows}) >= 3 and all(r["ok"] for r in run.rows), run.rows


def test_release_workspaces_gives_the_scratch_back():
    """The launcher's reusable scratch (the K residual's scores, the splits' partials) stays allocated between calls;
    ``release_workspaces`` drops it and says how many bytes, and the next call allocates it anew and gives the same
    output."""
    from forkkv_kernels import release_workspaces
    from forkkv_kernels import attention_common

    view = random_view(B=2, Hkv=2, D=16, T=30, P=2, rows=[0, 1])
    q = _query(view, 4, 1)
    release_workspaces()
    first = _launch(q, view, None, 0.25)
    held = dict(attention_common._thread_buffers())
    assert any(name == "kres_scores" for name, *_ in held), sorted(held)
    assert release_workspaces() == sum(b.numel() * b.element_size() for b in held.values()) > 0
    assert not attention_common._thread_buffers() and release_workspaces() == 0
    assert torch.equal(_launch(q, view, None, 0.25), first) and attention_common._thread_buffers()


def test_each_thread_has_its_own_scratch():
    """Two models generating at once from two threads on one GPU (each holds only its own lock) interleaved their
    kernels over one process-wide scratch: a call's merge read the other call's partials (0.9 off). Per thread now;
    release_workspaces drops every thread's."""
    import threading

    from forkkv_kernels import attention_common, release_workspaces

    release_workspaces()
    mine = attention_common.workspace("probe", 8, "cpu")
    theirs = []
    worker = threading.Thread(target=lambda: theirs.append(attention_common.workspace("probe", 8, "cpu")))
    worker.start()
    worker.join()
    assert mine.data_ptr() != theirs[0].data_ptr()
    assert release_workspaces() == 32  # this thread's 8 floats; a finished thread's buffers went with it
