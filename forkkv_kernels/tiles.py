"""Tile sizes of the Triton shared kernel (:mod:`.cascade`) that depend on the call's V residual: its sub-blocks,
their fit to shared memory, and the CUDA-core V form's tiles. Plain Python, no Triton."""

from __future__ import annotations


def sub_blocks(block_m: int, vpr: int, rvb: int, n_sub: int | None = None) -> dict:
    """The shared kernel's V-residual sub-blocks for ``block_m`` query vectors per program (``vpr`` per row, V ranks
    padded to ``rvb``): ``N_SUB`` sub-blocks (default ``block_m / 16``) of ``SB`` vectors, each holding ``RPSB`` rows
    whose ``u_v`` it multiplies, ``SBC = RPSB·rvb`` columns."""
    n_sub = n_sub or max(1, block_m // 16)
    if n_sub > block_m:  # (SB = 0 failed inside Triton)
        raise ValueError(f"n_sub={n_sub} is more than the {block_m} query vectors per program (block_m); give at most "
                         f"{block_m}")
    sb = block_m // n_sub
    rpsb = max(1, sb // vpr)
    return dict(N_SUB=n_sub, SB=sb, RPSB=rpsb, SBC=rpsb * rvb)


#: the bytes one pipeline stage of the Triton shared kernel may ask for its tiles (:func:`stage_bytes`) where a call
#: gives neither ``block_m`` nor ``block_t``: under the 232,448 bytes of shared memory an H100/H200 gives a program.
#: Each V-residual sub-block multiplies its 16 vectors by all its rows' ``u_v`` side by side (``SBC = 16 / vpr ·
#: rank`` columns), so one query vector per row (MHA, G = 1) at V rank 48-64 held 1,024 columns: 540,672 bytes for one
#: stage of the rule's 128-token tiles (offline for sm_90; the v48 GPU fuzz's failure), and at 64 rows the rule's
#: 64-token V-only tiles asked 278,528 bytes at rank 32 (v49, eval/RESULTS.md)
V_STAGE_BYTES = 216 * 1024


def stage_bytes(block_m: int, block_t: int, vpr: int, rvb: int, d_b: int, elt: int) -> int:
    """An upper estimate of one pipeline stage's shared memory in the Triton shared kernel: the ``u_v`` tile of its
    V-residual sub-blocks, the K and V base tiles (``d_b`` the padded head dim) and the K residual's score tile, in
    ``elt``-byte values (offline for sm_90, Triton 3.6: 540,672 bytes measured against 589,824 estimated at G = 1,
    rank 64, 32 x 128 tiles; 135,680 against 139,264 at rank 256, 16 x 16)."""
    sb = sub_blocks(block_m, vpr, rvb)
    return (sb["N_SUB"] * block_t * sb["SBC"] + 2 * block_t * d_b + block_m * block_t) * elt


def v_tiles(block_m: int, block_t: int, vpr: int, rvb: int, d_b: int, elt: int) -> tuple[int, int] | None:
    """``(block_m, block_t)`` of the Triton shared kernel with a V residual of ranks padded to ``rvb`` (``vpr`` query
    vectors per row, head dim padded to ``d_b``, ``elt`` bytes per value): ``block_t``, then ``block_m``, halved down to
    16 until one stage fits :data:`V_STAGE_BYTES` (the rule's tiles, measured, fit as they are: the pipeline's stages
    are what :func:`~.attention_common.launch` reduces); None where 16 x 16 tiles do not fit (the launcher then
    takes the CUDA-core V form, whose tiles do)."""
    while block_t > 16 and stage_bytes(block_m, block_t, vpr, rvb, d_b, elt) > V_STAGE_BYTES:
        block_t //= 2
    while block_m > 16 and stage_bytes(block_m, block_t, vpr, rvb, d_b, elt) > V_STAGE_BYTES:
        block_m //= 2
    return None if stage_bytes(block_m, block_t, vpr, rvb, d_b, elt) > V_STAGE_BYTES else (block_m, block_t)


#: the CUDA-core V form's ``u_v`` tile (``block_m x block_t x rank``) per thread, in values
FMA_TILE_PER_THREAD = 64


def fma_tiles(block_m: int, block_t: int, rvb: int, num_warps: int, given=(None, None)) -> tuple[int, int]:
    """``(block_m, block_t)`` of the Triton shared kernel's CUDA-core V form (``v_form="fma"``): those not ``given``
    halved, ``block_t`` first, down to 16 until one tile of every vector's ``u_v`` holds at most
    :data:`FMA_TILE_PER_THREAD` values per thread."""
    room = FMA_TILE_PER_THREAD * 32 * num_warps
    while given[1] is None and block_t > 16 and block_m * block_t * rvb > room:
        block_t //= 2
    while given[0] is None and block_m > 16 and block_m * block_t * rvb > room:
        block_m //= 2
    return block_m, block_t
