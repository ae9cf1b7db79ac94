"""Pieces the cascade ResidualAttention kernels (cascade.py, kres_pass.py, merge.py) share: the MMA, RoPE and
online-softmax helpers, reusable workspaces and launch helpers."""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref

import torch
import triton
import triton.language as tl

#: log2(e): the kernels use exp2 on scores pre-multiplied by it
LOG2E = 1.4426950408889634

try:  # programmatic dependent launch (Hopper on): a kernel's grid starts while its predecessor drains
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_PDL = True
except (ImportError, AttributeError):  # pragma: no cover - a Triton without the intrinsics
    HAS_PDL = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


@triton.jit
def mma(a, b, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, acc=None):
    """``tl.dot`` with fp32 accumulation (into ``acc`` when given). ``UPCAST`` (the CPU interpreter) feeds it fp32
    copies: the interpreter's bf16 dot is wrong (triton 3.9), and fp32 products of bf16/fp16 values are exact, as on
    tensor cores."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def mma_f16(a, b, UPCAST: tl.constexpr):
    """``a @ b`` of fp16 operands accumulated in fp16 (tensor cores with an fp16 accumulator: packed pairs, half the
    registers of fp32, no conversion before fp16 arithmetic); ``UPCAST`` (the interpreter) emulates it as fp32 sums
    rounded to fp16."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee").to(tl.float16)
    else:
        return tl.dot(a, b, out_dtype=tl.float16)


@triton.jit
def rope_residual(x_lo, x_hi, c_lo, s_lo, c_hi, s_hi, dtype: tl.constexpr, LOWP: tl.constexpr, UPCAST: tl.constexpr):
    """Rotate-half RoPE of a rebuilt K residual given as halves ``x_lo``/``x_hi`` (fp32) with the tokens' cos/sin
    halves. Returns the rotated halves in fp32, or with ``LOWP`` computed and returned in ``dtype`` (packed bf16/fp16
    FMAs, half the registers); with ``UPCAST`` (the interpreter, whose bf16 arithmetic is wrong) those roundings are
    emulated in fp32."""
    if LOWP and UPCAST:
        xl = x_lo.to(dtype).to(tl.float32)
        xh = x_hi.to(dtype).to(tl.float32)
        cl = c_lo.to(dtype).to(tl.float32)
        sl = s_lo.to(dtype).to(tl.float32)
        ch = c_hi.to(dtype).to(tl.float32)
        sh = s_hi.to(dtype).to(tl.float32)
        r_lo = ((xl * cl).to(dtype).to(tl.float32) - (xh * sl).to(dtype).to(tl.float32)).to(dtype)
        r_hi = ((xh * ch).to(dtype).to(tl.float32) + (xl * sh).to(dtype).to(tl.float32)).to(dtype)
    elif LOWP:
        xl = x_lo.to(dtype)
        xh = x_hi.to(dtype)
        r_lo = xl * c_lo.to(dtype) - xh * s_lo.to(dtype)
        r_hi = xh * c_hi.to(dtype) + xl * s_hi.to(dtype)
    else:
        r_lo = x_lo * c_lo.to(tl.float32) - x_hi * s_lo.to(tl.float32)
        r_hi = x_hi * c_hi.to(tl.float32) + x_lo * s_hi.to(tl.float32)
    return r_lo, r_hi


@triton.jit
def rope_tile(COS, SIN, s_ct, s_st, t, d, mask, HALF: tl.constexpr, ROPE_HALF: tl.constexpr):
    """The cos/sin of tokens ``t`` at dims ``d`` of the lo half and ``d + HALF`` of the hi half (``[len(t), len(d)]``
    each; ``ROPE_HALF``: the halves are equal, read once). Returns ``(c_lo, s_lo, c_hi, s_hi)``."""
    c_ptr = COS + t[:, None] * s_ct + d[None, :]
    s_ptr = SIN + t[:, None] * s_st + d[None, :]
    c_lo = tl.load(c_ptr, mask=mask, other=0.0)
    s_lo = tl.load(s_ptr, mask=mask, other=0.0)
    if ROPE_HALF:
        c_hi = c_lo
        s_hi = s_lo
    else:
        c_hi = tl.load(c_ptr + HALF, mask=mask, other=0.0)
        s_hi = tl.load(s_ptr + HALF, mask=mask, other=0.0)
    return c_lo, s_lo, c_hi, s_hi


@triton.jit
def softmax_step(s, m_i, l_i, AXIS: tl.constexpr):
    """One online-softmax step over the masked (``-inf``) scores ``s`` (log2 units) along ``AXIS``: returns the
    probabilities ``p``, the rescale factor ``alpha`` of the running sums, and the new running max and sum."""
    m_new = tl.maximum(m_i, tl.max(s, AXIS))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - tl.expand_dims(m_safe, AXIS))
    return p, alpha, m_new, l_i * alpha + tl.sum(p, AXIS)


def pow2(n: int, lo: int = 16) -> int:
    """The next power of two at or above ``n``, at least ``lo`` (Triton block sizes)."""
    return max(lo, 1 << max(0, int(n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    # plain integer math: triton.cdiv / next_power_of_2 go through Triton's JIT machinery, ~10 µs a call on the host
    return -(-a // b)


@functools.lru_cache(maxsize=8)
def num_sms(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).multi_processor_count
    return 4


@functools.lru_cache(maxsize=8)
def sm_major(device: str) -> int:
    """The NVIDIA compute capability's major version of ``device`` (9 on Hopper); 0 off CUDA and on ROCm, whose
    "capability" numbers name AMD architectures (9 on MI300), not the PTX features (saturating conversions,
    programmatic dependent launch) the kernels gate on it."""
    if device.startswith("cuda") and torch.version.hip is None:
        return torch.cuda.get_device_capability(torch.device(device))[0]
    return 0


class _Buffers(dict):
    """One thread's scratch buffers (a dict that a weak set can hold: compared and hashed by identity)."""

    __hash__ = object.__hash__
    __eq__ = object.__eq__


_LOCAL = threading.local()
_ALL_BUFFERS: weakref.WeakSet = weakref.WeakSet()


def _thread_buffers() -> _Buffers:
    bufs = getattr(_LOCAL, "buffers", None)
    if bufs is None:
        bufs = _LOCAL.buffers = _Buffers()
        _ALL_BUFFERS.add(bufs)
    return bufs


def workspace(name: str, numel: int, device, dtype=torch.float32) -> torch.Tensor:
    """A reusable scratch buffer of the calling thread (the kernels one thread launches on its stream run one after
    another, so layers can share it; two threads, e.g. two models generating at once on one GPU, interleaved their
    launches over one process-wide buffer: a call's merge read the other's partials, 0.9 off)."""
    bufs, key = _thread_buffers(), (name, str(device), dtype)
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, 1), dtype=dtype, device=device)
        bufs[key] = buf
    return buf[:numel]


def release_workspaces() -> int:
    """Drop the reusable scratch buffers of every thread (:func:`workspace`; the largest at a call of B decode rows,
    H_kv KV heads and T context tokens: the K residual's scores, 2 bytes x H_kv x 4·B x T, 512 MiB at 256 rows of
    Llama-3.1-8B shapes over 32K) so that the CUDA caching allocator can give their memory back; the next call
    allocates them anew. Returns the bytes released (tensors still in use elsewhere keep theirs)."""
    freed = 0
    for bufs in list(_ALL_BUFFERS):
        freed += sum(buf.numel() * buf.element_size() for buf in bufs.values())
        bufs.clear()
    return freed


def fresh_scratch(name: str, numel: int, device, dtype=torch.float32) -> torch.Tensor:
    """A scratch buffer of its own per call (what :func:`workspace` hands out, unshared): inside a CUDA-graph capture
    it comes from the graph's memory pool and is released when the launch returns."""
    return torch.empty(max(numel, 1), dtype=dtype, device=device)


def on_device(dev: torch.device):
    """Launch on the tensors' GPU: with a device map, layers live on several GPUs while the current device stays
    the first one (Triton launches on the current device)."""
    if dev.type == "cuda" and dev.index is not None and dev.index != torch.cuda.current_device():
        return torch.cuda.device(dev)
    return contextlib.nullcontext()


def split_length(T: int, block_t: int, n_items: int, target: int, splits: int | None = None,
                 whole_waves: bool = False) -> int:
    """Tokens per split of a ``T``-token context (a multiple of ``block_t``) for a grid of ``n_items`` programs per
    split: ``splits`` splits when given, else enough that the grid reaches ``target`` programs (``whole_waves``: at
    most ``target``, so a kernel with ``target`` resident programs runs in one wave instead of a wave and a tail)."""
    if splits is not None and splits < 1:
        raise ValueError(f"{splits} splits of the context; give at least 1 (or None to size them by programs per SM)")
    n = splits if splits is not None else (target // n_items if whole_waves else cdiv(target, n_items))
    n = max(1, min(cdiv(T, block_t), n))
    return cdiv(cdiv(T, n), block_t) * block_t


def launch_options(num_warps: int, num_stages: int, maxnreg: int | None = None) -> dict:
    """Launch keywords of a kernel; ``maxnreg`` (a per-thread register cap, more programs per SM) only when set."""
    return dict(num_warps=num_warps, num_stages=num_stages, **({} if maxnreg is None else {"maxnreg": maxnreg}))


#: launches whose pipeline needed more shared memory than the GPU has: (kernel, tensor dtypes, constexprs, stages
#: asked) -> the stages that fit (see :func:`launch`)
_FITTED_STAGES: dict = {}


def _out_of_shared_memory(err: Exception) -> bool:
    return type(err).__name__ == "OutOfResources" and "shared memory" in str(err)


def pdl_ok(device: str) -> bool:
    """Whether programmatic dependent launch can run on ``device``: a CUDA GPU of compute capability 9+ (Hopper on) and
    a Triton with the grid-dependency intrinsics."""
    return HAS_PDL and sm_major(device) >= 9


def launch(kernel, grid, *args, num_warps: int, num_stages: int, maxnreg: int | None = None, pdl: bool = False,
           **constexprs):
    """``kernel[grid](*args, **constexprs)`` with these launch options; ``pdl``: as a programmatic dependent launch
    (its grid may start before the previous kernel in the stream ends; the kernel waits, ``gdc_wait``, before it
    reads what that kernel wrote; only where :func:`pdl_ok`). The launch rules were measured on one GPU and
    shape family (eval/KERNEL_NOTES.md); where a kernel's software pipeline of ``num_stages`` tiles needs more shared
    memory than this GPU has (a wider head, a higher rank, fp32 tiles, a smaller GPU), it runs with fewer stages, which
    changes its speed, not its result; remembered per kernel, dtypes and compile-time constants. One stage that still
    does not fit raises Triton's error."""
    def key():
        return (id(kernel), tuple(a.dtype for a in args if isinstance(a, torch.Tensor)),
                tuple(sorted(constexprs.items())), num_warps, num_stages, maxnreg)

    options = launch_options(num_warps, num_stages, maxnreg)
    if pdl:
        options["launch_pdl"] = True

    stages = _FITTED_STAGES.get(key(), num_stages) if _FITTED_STAGES else num_stages
    while True:
        try:
            compiled = kernel[grid](*args, **constexprs, **{**options, "num_stages": stages})
        except Exception as e:  # triton.runtime.errors.OutOfResources (not importable under every Triton version)
            if stages <= 1 or not _out_of_shared_memory(e):
                raise
            stages -= 1
            continue
        if stages != num_stages:
            _FITTED_STAGES[key()] = stages
        return compiled


def check_mask(mask, B: int, NQ: int, S: int) -> None:
    """Refuse a ``mask`` the kernels would misread: not ``[B, NQ, >= S]`` (read through three strides: a broadcast
    ``[B, 1, S]`` read past its end, a 4-D one failed inside Triton) or floating point (read as ``!= 0`` = attend, an
    additive 0 / -inf mask came out inverted)."""
    if mask is None:
        return
    if mask.dim() != 3 or mask.shape[0] != B or mask.shape[1] != NQ or mask.shape[2] < S:
        raise ValueError(f"mask {tuple(mask.shape)}: give [B, NQ, T + P] = [{B}, {NQ}, {S}] (1 = attend)")
    if mask.is_floating_point():
        raise TypeError(f"mask is {mask.dtype}: give a bool or integer mask (1 = attend); for an additive one pass "
                        "(mask == 0)")


def check_inputs(q, k_base, v_base, k_priv, v_priv):
    """Refuse what the kernels cannot take; return the tensors with a contiguous last dimension."""
    B, H, NQ, D = q.shape
    Hkv = k_base.shape[0]
    if H % Hkv:
        raise ValueError(f"{H} query heads are not a multiple of {Hkv} KV heads")
    if D % 2:
        raise ValueError(f"head_dim {D} is odd; rotate-half RoPE needs an even head_dim")
    if k_base.shape[-2] < 1:
        raise ValueError("the shared context is empty (0 tokens); the kernels attend over at least one shared token")
    if any(t.dtype != q.dtype for t in (k_base, v_base, k_priv, v_priv)):
        raise TypeError(f"query is {q.dtype} but the cache holds {k_base.dtype}/{v_base.dtype} (shared K/V) and "
                        f"{k_priv.dtype}/{v_priv.dtype} (private); build the shared context in the dtype the model "
                        "runs in")
    last = lambda t: t if t.stride(-1) == 1 else t.contiguous()  # noqa: E731
    return last(q), last(k_base), last(v_base), last(k_priv), last(v_priv)
