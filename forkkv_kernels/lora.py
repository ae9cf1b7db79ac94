"""Triton gathered LoRA matmuls for mixed-adapter batches (Punica SGMV/BGMV style).

``gathered_matmul(x, W, plan)`` computes ``out[m] = x[m] @ W[adapter(m)]ᵀ`` for token-rows ``m`` grouped into tiles of
rows that share an adapter: one kernel for every adapter of the batch, no loop over adapters. The LoRA delta of a
mixed batch is a shrink ``u = x Aᵀ`` (``W = A``: ``[n, r, d_in]``, split over ``d_in`` so that a decode batch of
one token per row still fills the GPU) followed by an expand ``y += scale · u Bᵀ`` (``W = B``: ``[n, d_out, r]``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


def _cdiv(a: int, b: int) -> int:
    # plain integer math: triton.cdiv / next_power_of_2 go through Triton's JIT machinery, ~10 µs a call on the host
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@triton.jit
def _gathered_mm_kernel(
    X, s_xs, s_xm, s_xk, X_PARTS,
    W, s_wa, s_wn, s_wk,
    OUT, s_os, s_om, s_on,
    SCALE,
    TILE_ADAPTER, TILE_START, TILE_COUNT, PERM,
    N, K, k_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ADD: tl.constexpr, HAS_SCALE: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr = "tf32",
):
    """One tile of up to BLOCK_M token-rows of one adapter x BLOCK_N output columns x one split of K:
    ``OUT[split, rows, n] (+)= (X[rows] @ W[adapter]ᵀ)[:, n]`` (times ``SCALE[adapter]`` if ``HAS_SCALE``), where
    ``X`` is the sum of ``X_PARTS`` partial inputs ``s_xs`` apart (the shrink's split-K parts, summed in fp32 here
    rather than by a separate reduction; 1 for a plain input)."""
    tile = tl.program_id(0)
    nb = tl.program_id(1)
    ks = tl.program_id(2)
    # int64 offsets: rows x row stride reaches 2^31 from ~150K tokens of 14K features (int32 wrapped: out-of-bounds
    # reads and writes), the adapter index x its stride from a few thousand adapters
    a = tl.load(TILE_ADAPTER + tile).to(tl.int64)
    start = tl.load(TILE_START + tile)
    cnt = tl.load(TILE_COUNT + tile)
    rm = tl.arange(0, BLOCK_M)
    mvalid = rm < cnt
    rows = tl.load(PERM + start + rm, mask=mvalid, other=0).to(tl.int64)
    rn = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    nvalid = rn < N
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_begin = ks * k_per_split
    k_end = tl.minimum(K, k_begin + k_per_split)
    for k0 in range(k_begin, k_end, BLOCK_K):
        kk = k0 + rk
        kvalid = kk < k_end
        xmask = mvalid[:, None] & kvalid[None, :]
        x = tl.load(X + rows[:, None] * s_xm + kk[None, :] * s_xk, mask=xmask, other=0.0)
        for part in range(1, X_PARTS):
            x += tl.load(X + part * s_xs + rows[:, None] * s_xm + kk[None, :] * s_xk, mask=xmask, other=0.0)
        w = tl.load(W + a * s_wa + rn[None, :] * s_wn + kk[:, None] * s_wk, mask=kvalid[:, None] & nvalid[None, :],
                    other=0.0)
        if UPCAST:  # the CPU interpreter's bf16 dot is wrong; fp32 products of bf16 values are exact
            acc += tl.dot(x.to(w.dtype).to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x.to(w.dtype), w, input_precision=DOT_PREC)
    if HAS_SCALE:
        acc = acc * tl.load(SCALE + a)
    omask = mvalid[:, None] & nvalid[None, :]
    optr = OUT + ks * s_os + rows[:, None] * s_om + rn[None, :] * s_on
    if ADD:
        acc += tl.load(optr, mask=omask, other=0.0).to(tl.float32)
    tl.store(optr, acc.to(OUT.dtype.element_ty), mask=omask)


@functools.lru_cache(maxsize=256)
def _tiles(slots: tuple, tokens_per_row: int, block_m: int):
    """Token-rows grouped by adapter slot (rows with slot -1 get no tile). Returns host lists
    ``(tile_adapter, tile_start, tile_count, perm)``."""
    groups: dict = {}
    for r, s in enumerate(slots):
        if s >= 0:
            groups.setdefault(s, []).append(r)
    perm, ta, tst, tc = [], [], [], []
    for s, rows in groups.items():
        toks = [r * tokens_per_row + i for r in rows for i in range(tokens_per_row)]
        for i in range(0, len(toks), block_m):
            chunk = toks[i : i + block_m]
            ta.append(s)
            tst.append(len(perm))
            tc.append(len(chunk))
            perm.extend(chunk)
    return ta, tst, tc, perm


@functools.lru_cache(maxsize=256)
def _tile_tensors(slots: tuple, tokens_per_row: int, block_m: int, device: str):
    ta, tst, tc, perm = _tiles(slots, tokens_per_row, block_m)
    if not ta:
        return None
    return tuple(torch.tensor(v, dtype=torch.int32, device=device) for v in (ta, tst, tc, perm))


def _block_m(M_per_tile_hint: int) -> int:
    return 16 if M_per_tile_hint <= 16 else (32 if M_per_tile_hint <= 32 else 64)


@functools.lru_cache(maxsize=256)
def _plan(slots: tuple, tokens_per_row: int, device: str):
    """``(BLOCK_M, tile tensors)`` for a batch's slots, or ``None`` if no row has an adapter here (memoised)."""
    distinct = len({s for s in slots if s >= 0})
    if distinct == 0:
        return None
    bm = _block_m(max(1, len(slots) // distinct) * tokens_per_row)
    return bm, _tile_tensors(slots, tokens_per_row, bm, device)


@functools.lru_cache(maxsize=64)
def padded_plan(slots: tuple, tokens_per_row: int, device: str):
    """:func:`_plan` with shapes that depend only on the batch: the tiles padded with empty ones to a power of two,
    ``perm`` to every token-row, so that batches of one size but another mix of adapters reuse a compiled graph.
    ``(BLOCK_M, tile tensors)``, or ``None`` if no row has an adapter here."""
    plan = _plan(slots, tokens_per_row, device)
    if plan is None:
        return None
    bm, (ta, tst, tc, perm) = plan
    n = _next_pow2(ta.numel())
    pad = lambda t, size: torch.cat([t, t.new_zeros(size - t.numel())])  # noqa: E731
    return bm, (pad(ta, n), pad(tst, n), pad(tc, n), pad(perm, len(slots) * tokens_per_row))


def lora_delta_triton(x: torch.Tensor, slots: tuple, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
                      out: torch.Tensor, reduce_group=None) -> torch.Tensor:
    """``out[b, l] += scale[s] · (x[b, l] @ A[s]ᵀ) @ B[s]ᵀ`` with ``s = slots[b]`` (rows with ``s < 0`` untouched).

    ``x``: ``[B, L, d_in]``; ``A``: ``[n, r, d_in]``; ``B``: ``[n, d_out, r]``; ``scale``: ``[n]`` fp32; ``out``:
    ``[B, L, d_out]`` contiguous, updated in place and returned. ``slots``: a host tuple (plans are cached by it).
    Launches on ``x``'s GPU (with a device map, layers live on several GPUs). ``reduce_group``: a process group
    across which the shrink ``u`` is summed before the expand (a rowwise tensor-parallel layer: ``x`` and ``A`` are
    this rank's slices of the input features).
    """
    from .attention_common import on_device

    _check_lora_args(x, tuple(slots), A, B, scale, out)
    with on_device(x.device):
        return _lora_delta_triton(x, slots, A, B, scale, out, reduce_group)


def _check_lora_args(x, slots: tuple, A, B, scale, out) -> None:
    """Host-side shape checks (no tensor values read): a slot per row, slots inside the stacks, the stacks' widths
    matching ``x`` and each other, ``out`` of the result's shape (the kernel trusts them: more slots than rows wrote
    past ``out``, a slot past the stacks read outside ``A``)."""
    Bsz, L, d_in = x.shape
    n, r, _ = A.shape
    problems = [
        (len(slots) != Bsz, f"{len(slots)} slots for {Bsz} rows"),
        (any(s >= n for s in slots), f"a slot >= the {n} adapters stacked"),
        (A.shape[2] != d_in, f"A's {A.shape[2]} input features for x's {d_in}"),
        (B.shape[0] != n or B.shape[2] != r, f"B {tuple(B.shape)} for A {tuple(A.shape)} ([n, d_out, r])"),
        (scale.numel() < n, f"{scale.numel()} scales for {n} adapters"),
        (tuple(out.shape) != (Bsz, L, B.shape[1]), f"out {tuple(out.shape)}, not {(Bsz, L, B.shape[1])}"),
    ]
    bad = [why for wrong, why in problems if wrong]
    if bad:
        raise ValueError(f"lora_delta_triton: {'; '.join(bad)}")


def _lora_delta_triton(x: torch.Tensor, slots: tuple, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
                       out: torch.Tensor, reduce_group=None) -> torch.Tensor:
    plan = _plan(tuple(slots), x.shape[1], str(x.device)) if x.numel() else None
    if plan is None:  # no row with an adapter, or no token
        return out
    return lora_delta_planned(x, A, B, scale, out, plan[0], *plan[1], reduce_group=reduce_group)


def lora_delta_planned(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor, out: torch.Tensor,
                       block_m: int, tile_adapter: torch.Tensor, tile_start: torch.Tensor, tile_count: torch.Tensor,
                       perm: torch.Tensor, reduce_group=None) -> torch.Tensor:
    """:func:`lora_delta_triton` over tiles planned beforehand (``int32`` device tensors, as :func:`_plan` gives
    them; tiles with ``tile_count`` 0 do nothing): no host-side work that reads tensor values, so it can be captured
    in a CUDA graph. Call it on ``x``'s device."""
    Bsz, L, d_in = x.shape
    n, r, _ = A.shape
    d_out = B.shape[1]
    dev = x.device
    x2 = x.reshape(Bsz * L, d_in)
    o2 = out.view(Bsz * L, d_out)
    bm, ta, tst, tc, perm = block_m, tile_adapter, tile_start, tile_count, perm
    n_tiles = ta.numel()
    interp = not x.is_cuda
    RB = max(16, _next_pow2(r))
    # shrink u = x Aᵀ, split over d_in so that a few tiles (decode: one token per row) still fill the GPU
    BLOCK_K = 64 if interp else 128
    n_split = 2 if interp else max(1, min(_cdiv(d_in, BLOCK_K), _cdiv(4 * _num_sms(str(dev)), n_tiles)))
    k_per_split = _cdiv(_cdiv(d_in, n_split), BLOCK_K) * BLOCK_K
    n_split = _cdiv(d_in, k_per_split)
    # every (split, tiled row, column < r) is written; the rest (rows of no adapter, padding columns) is never read
    u_parts = torch.empty(n_split, Bsz * L, RB, device=dev, dtype=torch.float32)
    _gathered_mm_kernel[(n_tiles, 1, n_split)](
        x2, 0, x2.stride(0), x2.stride(1), 1,
        A, A.stride(0), A.stride(1), A.stride(2),
        u_parts, u_parts.stride(0), u_parts.stride(1), u_parts.stride(2),
        scale, ta, tst, tc, perm,
        r, d_in, k_per_split,
        BLOCK_M=bm, BLOCK_N=RB, BLOCK_K=BLOCK_K, ADD=False, HAS_SCALE=False, UPCAST=interp,
        DOT_PREC="ieee" if A.dtype == torch.float32 else "tf32",
    )
    u, parts = u_parts, n_split
    if reduce_group is not None:
        import torch.distributed as dist

        u, parts = u_parts.sum(0, keepdim=True), 1
        dist.all_reduce(u, group=reduce_group)
    # expand out += scale · u Bᵀ; the kernel sums u's split-K parts (fp32) and rounds u to B's dtype, as a
    # u_parts.sum(0).to(B.dtype) before it would, without those two launches
    BLOCK_N = 64 if interp else 128
    _gathered_mm_kernel[(n_tiles, _cdiv(d_out, BLOCK_N), 1)](
        u, u.stride(0), u.stride(1), u.stride(2), parts,
        B, B.stride(0), B.stride(1), B.stride(2),
        o2, 0, o2.stride(0), o2.stride(1),
        scale, ta, tst, tc, perm,
        d_out, r, RB,
        BLOCK_M=bm, BLOCK_N=BLOCK_N, BLOCK_K=RB, ADD=True, HAS_SCALE=True, UPCAST=interp,
        DOT_PREC="ieee" if B.dtype == torch.float32 else "tf32",
    )
    return out


@functools.lru_cache(maxsize=8)
def _num_sms(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).multi_processor_count
    return 4
