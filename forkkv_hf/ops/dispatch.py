"""ResidualAttention: attention over ``[shared base + per-agent residual | private]`` without per-row copies.

Same result as :func:`forkkv_hf.ops.naive.reference_attention`, computed the way the Triton kernels do it:
- the base K/V ``[1, H_kv, T, D]`` is broadcast to every row, never copied per row;
- the K residual is rebuilt chunk by chunk, once per *agent* (not per row): ``RoPE_t(B_k u_k[t])``;
- the V residual is never expanded: ``P·V_row = P·V_base + (P·u_v) B_vᵀ``, applied once after the softmax;
- the shared context and the private part are merged with an online (flash-style) softmax.

On CUDA, :func:`residual_attention` dispatches decode-like calls (few queries per row) to the Triton kernels of
``forkkv_kernels`` when they are installed, and prompt-like calls (``>= EXTEND_SDPA_MIN_QUERIES`` queries per row:
the agents' prompts after the shared context) to :func:`residual_attention_sdpa`, which rebuilds a few rows' K/V
at a time and runs PyTorch's fused SDPA on them: prompts are compute-bound, so the few bytes saved by not
materialising a row's K/V for one call are worth less than the tensor-core efficiency of a mature attention kernel.
Elsewhere (and with ``backend="torch"``) it runs the chunked PyTorch path below. The backend choice comes from
:func:`forkkv_hf.config.get_config`, read once per call here and passed down to the kernels as arguments.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import torch

from ..config import get_config
from ..log import get_logger, warn_once
from ..memo import memoized
from .masks import causal_private_mask, implicit_mask, int8_mask, kv_mask
from .rope import apply_rope

logger = get_logger(__name__)

#: elements of fp32 working memory one chunk of the PyTorch path may use (per tensor)
CHUNK_ELEMENTS = 1 << 24
#: on CUDA, calls with at least this many queries per row take the materialise-and-SDPA path
EXTEND_SDPA_MIN_QUERIES = 16
#: bytes of rebuilt K/V (and fp32 residual scratch) the SDPA path may hold at once
SDPA_WORKSPACE_BYTES = 1 << 30


def _chunk_len(B: int, Hkv: int, G: int, Q: int, D: int, T: int) -> int:
    per_token = B * Hkv * max(D, G * Q)
    return max(16, min(T, CHUNK_ELEMENTS // max(per_token, 1)))


def _online_update(state, s: torch.Tensor):
    """Fold scores ``s [B, Hkv, G, Q, C]`` into ``(m, l)``; returns the probabilities and the rescale factor."""
    m, l = state
    m_new = torch.maximum(m, s.amax(dim=-1))
    m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
    p = torch.exp(s - m_safe[..., None])
    alpha = torch.exp(m - m_safe)
    state[0], state[1] = m_new, l * alpha + p.sum(dim=-1)
    return p, alpha


def _apply_mask(s: torch.Tensor, mask, additive: bool) -> torch.Tensor:
    """``s [B, Hkv, G, Q, C]``, ``mask [B, Q, C]`` (or ``[Q, C]`` for the implicit causal case)."""
    if mask is None:
        return s
    if mask.dim() == 2:
        return s.masked_fill(~mask, float("-inf"))
    if additive:
        return s + mask[:, None, None].float()
    return s.masked_fill(~mask[:, None, None], float("-inf"))


def _softcap(s: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma 2's attention-logit soft-capping, applied to the scaled scores before masking."""
    return s if softcap is None else torch.tanh(s / softcap) * softcap


@dataclass(frozen=True)
class BatchAgents:
    """The agents of a batch, as device tensors (``None`` where no row has a residual of that kind):
    ``k_used [n]`` the distinct K-residual slots (-1 counted as slot 0, masked per row), ``k_local [B]`` each row's
    index into them, ``k_row_valid [B, 1, 1, 1]`` fp32 (0 for rows without a K residual); ``v_slot [B]`` each row's
    V-residual slot (clamped), ``v_row_valid [B]`` fp32."""

    k_used: torch.Tensor | None = None
    k_local: torch.Tensor | None = None
    k_row_valid: torch.Tensor | None = None
    v_slot: torch.Tensor | None = None
    v_row_valid: torch.Tensor | None = None


@memoized(maxsize=256)
def batch_agents(k_slots: tuple | None, v_slots: tuple | None, device: str) -> BatchAgents:
    """:class:`BatchAgents` from the rows' host slots (``None``: the layer has no residual of that kind). Memoised:
    the same rows give the same tensors, built without reading device memory. fp32 whatever the default dtype."""
    out, f32 = {}, torch.float32
    if k_slots is not None and any(s >= 0 for s in k_slots):
        used = sorted(set(k_slots))
        out["k_used"] = torch.tensor(used, dtype=torch.long, device=device).clamp(min=0)
        out["k_local"] = torch.tensor([used.index(s) for s in k_slots], dtype=torch.long, device=device)
        valid = torch.tensor([float(s >= 0) for s in k_slots], dtype=f32, device=device)
        out["k_row_valid"] = valid[:, None, None, None]
    if v_slots is not None and any(s >= 0 for s in v_slots):
        out["v_slot"] = torch.tensor(v_slots, dtype=torch.long, device=device).clamp(min=0)
        out["v_row_valid"] = torch.tensor([float(s >= 0) for s in v_slots], dtype=f32, device=device)
    return BatchAgents(**out)


def view_agents(view, device) -> BatchAgents:
    """The view's agents: precomputed by a static cache layer (``view.agents``, set before the step), else from its
    host slots."""
    agents = getattr(view, "agents", None)
    if agents is not None:
        return agents
    slots = [None if rows is None else tuple(slots if slots is not None else rows.tolist())
             for rows, slots in ((view.k_rows, view.k_slots), (view.v_rows, view.v_slots))]
    return batch_agents(slots[0], slots[1], str(device))


def residual_attention_torch(query: torch.Tensor, view, attention_mask, scaling: float,
                             softcap: float | None = None) -> torch.Tensor:
    """``query [B, H, Q, D]`` (after RoPE) over a :class:`~forkkv_hf.cache.ForkKVView`; returns ``[B, Q, H, D]`` in
    the query's dtype. Accumulates in fp32, whatever the default dtype (before, the accumulators took it: under
    ``torch.set_default_dtype(torch.float64)`` a dtype error inside; found by an audit). ``softcap``: attention-logit
    soft-capping (Gemma 2), or ``None``."""
    B, H, Q, D = query.shape
    sh = view.shared
    _, Hkv, T, _ = sh.key.shape
    G = H // Hkv
    P = view.private_len
    dev = query.device
    q = query.float().view(B, Hkv, G, Q, D)
    if softcap is None:
        q = q * scaling
    score_scale = 1.0 if softcap is None else scaling
    mask, additive = kv_mask(attention_mask, B, Q, T, P, dev)

    f32 = torch.float32
    m = torch.full((B, Hkv, G, Q), float("-inf"), dtype=f32, device=dev)
    l = torch.zeros(B, Hkv, G, Q, dtype=f32, device=dev)
    state = [m, l]
    acc = torch.zeros(B, Hkv, G, Q, D, dtype=f32, device=dev)

    # agents present in the batch, each rebuilt once per chunk; rows index into them
    agents = view_agents(view, dev)
    k_res = sh.k_res if agents.k_used is not None else None
    if k_res is not None:
        k_used, k_local, k_row_valid = agents.k_used, agents.k_local, agents.k_row_valid
    v_res = sh.v_res if agents.v_slot is not None else None
    if v_res is not None:
        v_slot, v_row_valid = agents.v_slot, agents.v_row_valid
        acc_uv = torch.zeros(B, Hkv, G, Q, v_res.rank, dtype=f32, device=dev)

    C = _chunk_len(B, Hkv, G, Q, D, T)
    for t0 in range(0, T, C):
        t1 = min(T, t0 + C)
        s = torch.einsum("bhgqd,hcd->bhgqc", q, sh.key[0, :, t0:t1].float())
        if k_res is not None:
            u = k_res.u[k_used, t0:t1].float()  # [n, C, r]
            kr = torch.bmm(u, k_res.B[k_used].float().transpose(1, 2))  # [n, C, Hkv*D]
            kr = kr.view(-1, t1 - t0, Hkv, D).transpose(1, 2)  # [n, Hkv, C, D]
            kr = apply_rope(kr, sh.cos[t0:t1].float(), sh.sin[t0:t1].float())
            s = s + torch.einsum("bhgqd,bhcd->bhgqc", q, kr[k_local] * k_row_valid)
        s = _softcap(s * score_scale, softcap) if softcap is not None else s
        if mask is not None:
            s = _apply_mask(s, mask[..., t0:t1], additive)
        p, alpha = _online_update(state, s)
        acc = acc * alpha[..., None] + torch.einsum("bhgqc,hcd->bhgqd", p, sh.value[0, :, t0:t1].float())
        if v_res is not None:
            uv = v_res.u[v_slot, t0:t1].float() * v_row_valid[:, None, None]  # [B, C, r]
            acc_uv = acc_uv * alpha[..., None] + torch.einsum("bhgqc,bcr->bhgqr", p, uv)

    if P > 0:
        s = torch.einsum("bhgqd,bhpd->bhgqp", q, view.key.float())
        s = _softcap(s * score_scale, softcap) if softcap is not None else s
        pm = causal_private_mask(Q, P, dev) if mask is None else mask[..., T : T + P]
        s = _apply_mask(s, pm, additive)
        p, alpha = _online_update(state, s)
        acc = acc * alpha[..., None] + torch.einsum("bhgqp,bhpd->bhgqd", p, view.value.float())
        if v_res is not None:
            acc_uv = acc_uv * alpha[..., None]

    l = state[1][..., None]
    l = torch.where(l > 0, l, 1.0)  # a query that sees no key (a caller's mask over a pad row): 0, as SDPA and the
    out = acc / l                   # kernels give (before: 0/0, NaN carried into the next layers' K/V)
    if v_res is not None:
        Bv = v_res.B[v_slot].float().view(B, Hkv, D, v_res.rank)
        out = out + torch.einsum("bhgqr,bhdr->bhgqd", acc_uv / l, Bv)
    return out.permute(0, 3, 1, 2, 4).reshape(B, Q, H, D).to(query.dtype)


def residual_attention_sdpa(query: torch.Tensor, view, attention_mask, scaling: float,
                            workspace_bytes: int | None = None) -> torch.Tensor:
    """``query [B, H, Q, D]`` over a :class:`~forkkv_hf.cache.ForkKVView` through
    ``torch.nn.functional.scaled_dot_product_attention``: a group of rows at a time (as many as fit
    ``workspace_bytes``), each row's K/V is rebuilt (``K_base + RoPE(B_k u_k)`` and ``V_base + B_v u_v``, the residual
    in fp32, then rounded once to the cache dtype) and concatenated with its private K/V; GQA without repeating K/V
    (a KV head's ``G`` query heads become ``G·Q`` queries). Returns ``[B, Q, H, D]`` in the query's dtype."""
    B, H, Q, D = query.shape
    sh = view.shared
    _, Hkv, T, _ = sh.key.shape
    G = H // Hkv
    P = view.private_len
    dev, dtype = query.device, query.dtype
    mask, additive = kv_mask(attention_mask, B, Q, T, P, dev)
    if mask is None:
        mask = implicit_mask(Q, T, P, dev).expand(B, Q, T + P)
    elif additive:
        mask = mask.to(dtype)
    k_rows = view.k_rows if sh.k_res is not None and view.k_rows is not None else None
    v_rows = view.v_rows if sh.v_res is not None and view.v_rows is not None else None
    elem = query.element_size()
    per_row = 2 * (T + P) * Hkv * D * elem + T * Hkv * D * 4 + G * Q * (T + P) * mask.element_size()
    group = max(1, (workspace_bytes or SDPA_WORKSPACE_BYTES) // per_row)
    q = query.reshape(B, Hkv, G * Q, D)  # head h = kv * G + g: a KV head's queries are contiguous
    out = torch.empty(B, Q, H, D, device=dev, dtype=dtype)
    for b0 in range(0, B, group):
        b1 = min(B, b0 + group)
        n = b1 - b0
        K = sh.key.expand(n, Hkv, T, D)
        V = sh.value.expand(n, Hkv, T, D)
        if k_rows is not None and bool((k_rows[b0:b1] >= 0).any()):
            K = K + _rows_residual(sh.k_res, k_rows[b0:b1], Hkv, D, rope=(sh.cos, sh.sin)).to(dtype)
        if v_rows is not None and bool((v_rows[b0:b1] >= 0).any()):
            V = V + _rows_residual(sh.v_res, v_rows[b0:b1], Hkv, D).to(dtype)
        if P:
            K = torch.cat([K, view.key[b0:b1]], dim=2)
            V = torch.cat([V, view.value[b0:b1]], dim=2)
        m = mask[b0:b1, None, None].expand(n, 1, G, Q, T + P).reshape(n, 1, G * Q, T + P)
        o = torch.nn.functional.scaled_dot_product_attention(q[b0:b1], K, V, attn_mask=m, scale=scaling)
        out[b0:b1] = o.view(n, Hkv, G, Q, D).permute(0, 3, 1, 2, 4).reshape(n, Q, H, D)
    return out


def _rows_residual(res, rows: torch.Tensor, Hkv: int, D: int, rope=None) -> torch.Tensor:
    """``[n, H_kv, T, D]`` fp32 residual ``B[s] u[s]`` of each row's slot ``s`` (zero where ``s`` is -1), rotated
    with ``rope = (cos, sin)`` when given."""
    slots = rows.clamp(min=0)
    u = res.u[slots].float()  # [n, T, r]
    r = torch.bmm(u, res.B[slots].float().transpose(1, 2))  # [n, T, H_kv * D]
    r = r * (rows >= 0).float()[:, None, None]
    r = r.view(rows.numel(), -1, Hkv, D).transpose(1, 2)
    if rope is not None:
        r = apply_rope(r, rope[0].float(), rope[1].float())
    return r


def triton_ready(x: torch.Tensor) -> bool:
    """Whether the ``forkkv_kernels`` Triton kernels can run on ``x``: a CUDA tensor (or the interpreter) and the
    package importable."""
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import forkkv_kernels  # noqa: F401
    except ImportError:
        return False
    return True


@memoized(maxsize=256)
def slot_tensors(slots: tuple, device: str):
    """``slots`` (host tuple, -1: none) as an int32 tensor, the rows sorted by slot, the number of distinct slots
    and the most rows one slot has; cached, so a decode step builds nothing."""
    t = torch.tensor(slots, dtype=torch.int32, device=device)
    order = torch.tensor(sorted(range(len(slots)), key=lambda i: slots[i]), dtype=torch.int32, device=device)
    used = [s for s in slots if s >= 0]
    return t, order, len(set(used)), max((used.count(s) for s in set(used)), default=1)


def rope_repeats_half(shared) -> bool:
    """Whether the layer's cos/sin tables repeat their first half (the kernels then load one half). Memoised."""
    flag = getattr(shared, "_rope_half", None)
    if flag is None:
        h = shared.cos.shape[-1] // 2
        flag = bool(torch.equal(shared.cos[:, :h], shared.cos[:, h:])
                    and torch.equal(shared.sin[:, :h], shared.sin[:, h:]))
        shared._rope_half = flag
    return flag


def _memo_on(res, name: str, make):
    """``make()`` memoised on the residual ``res`` under ``name``, for as long as its ``u`` and ``B`` are the same
    tensors (residuals are never written after they are made, but may be moved: a new tensor, a new value)."""
    memo = res.__dict__.get(name)
    if memo is None or memo[0] is not res.u or memo[1] is not res.B:
        memo = (res.u, res.B, make())
        res.__dict__[name] = memo
    return memo[2]


def k_residual_fits_f16(res) -> bool:
    """Whether the K residual ``res`` (a :class:`~forkkv_hf.context.segments.Residual`) may take the K pass's fp16
    form (``res_f16``: its values and rebuilt values within fp16's range, checked by
    :func:`forkkv_kernels.kres_pass.f16_range_ok`). Memoised on the residual: one host read per residual."""
    from forkkv_kernels.kres_pass import f16_range_ok

    return _memo_on(res, "_fits_f16", lambda: f16_range_ok(res.u, res.B))


def k_residual_b16(res):
    """The K residual's ``B`` in fp16 for the K pass's fp16 form (``k_B16``: the kernels then convert none per call),
    memoised on the residual (one copy of ``B``: ``H_kv·D·r`` values per adapter and layer, ~3% of its ``u`` at a
    32K context); ``None`` where the residual is beyond fp16's range (the form is not used)."""
    if not k_residual_fits_f16(res):
        return None
    return _memo_on(res, "_b16", lambda: res.B if res.B.dtype == torch.float16 else res.B.to(torch.float16))


_ROPE16: dict = {}  # id(cos table) -> (a weak reference to it, its sin table, their fp16 copies)


def rope16_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The RoPE tables in fp16 for the K pass's fp16 form (``rope16``: the kernels then convert none per tile), made
    once per table (the layers of a model share theirs: one copy, ``2·T·D`` values, 16 MiB at 32K for D = 128) and
    dropped with it; the tables themselves where they are fp16 already."""
    from forkkv_kernels.kres_pass import rope_f16

    if cos.dtype == torch.float16 and sin.dtype == torch.float16 and cos.is_contiguous() and sin.is_contiguous():
        return cos, sin
    key = id(cos)
    memo = _ROPE16.get(key)
    if memo is None or memo[0]() is not cos or memo[1] is not sin:
        # (keyed by identity: tensors compare by value; the entry goes when the table does)
        memo = (weakref.ref(cos, lambda ref, key=key: _ROPE16.pop(key, None) if _ROPE16.get(key, (None,))[0] is ref
                            else None), sin, rope_f16(cos, sin))
        _ROPE16[key] = memo
    return memo[2]


def f16_k_pass_args(res, dtype: torch.dtype) -> tuple[bool | None, torch.Tensor | None]:
    """The K pass's ``res_f16`` and ``k_B16`` for the K residual ``res`` in a ``dtype`` call: ``(False, None)`` beyond
    fp16's range (:func:`k_residual_fits_f16`); for bf16/fp16 calls the configuration's ``f16_k_pass`` (``None``: the
    kernels' rule) and the residual's kept fp16 ``B``; ``(None, None)`` for fp32 calls (their rule keeps the fp32
    rebuild, so no copy is made)."""
    if not k_residual_fits_f16(res):
        return False, None
    if dtype not in (torch.bfloat16, torch.float16):
        return None, None
    return get_config().f16_k_pass, k_residual_b16(res)


def residual_attention_triton(query: torch.Tensor, view, attention_mask, scaling: float, **tuning) -> torch.Tensor:
    """``query [B, H, Q, D]`` over a :class:`~forkkv_hf.cache.ForkKVView` through the ``forkkv_kernels`` cascade
    kernels; returns ``[B, Q, H, D]``. ``tuning``: the launcher's knobs (``lowp_rope`` and ``res_f16`` default to the
    configuration's ``lowp_rope`` and ``f16_k_pass``; ``res_f16`` is off for a K residual beyond fp16's range, else
    its fp16 ``B`` is kept with it and passed: :func:`f16_k_pass_args`). Rows' residual slots come from the view's
    host tuples when present (cached tensors: the rows' order by agent and the counts that size the K pass), else from
    its ``k_rows``/``v_rows`` tensors (derived on the device). A mask is read by the shared part's kernels too unless
    the view says it shows the whole context (``context_visible``)."""
    from forkkv_kernels import cascade_attention

    sh = view.shared
    present = [(kind, r, rows, slots) for kind, r, rows, slots in
               (("k", sh.k_res, view.k_rows, view.k_slots), ("v", sh.v_res, view.v_rows, view.v_slots))
               if r is not None and rows is not None and not (slots is not None and all(s < 0 for s in slots))]
    tuning.setdefault("lowp_rope", get_config().lowp_rope)
    if any(kind == "k" for kind, *_ in present):
        if not k_residual_fits_f16(sh.k_res):
            tuning["res_f16"] = False  # values beyond fp16's range: the K pass keeps its fp32 rebuild, whatever asked
        else:
            f16, b16 = f16_k_pass_args(sh.k_res, query.dtype)
            tuning.setdefault("res_f16", f16)
            tuning.setdefault("k_B16", b16)
            if b16 is not None:  # the fp16 form may run: its RoPE tables in fp16 too
                tuning.setdefault("rope16", rope16_tables(sh.cos, sh.sin))
    kw = dict(mask=int8_mask(attention_mask, query.shape[0], query.shape[2], view.shared_len, view.private_len),
              rope_half=any(kind == "k" for kind, *_ in present) and rope_repeats_half(sh),
              context_visible=view.context_visible)
    for kind, r, rows, slots in present:
        kw[f"{kind}_u"], kw[f"{kind}_B"] = r.u, r.B
        slot, order, n_agents, max_rows = (slot_tensors(tuple(slots), str(query.device)) if slots is not None
                                           else (rows, None, None, None))
        kw[f"{kind}_slot"] = slot
        if kind == "k":
            kw.update(k_order=order, k_agents=n_agents, k_max_rows=max_rows)
    return cascade_attention(query, sh.key[0], sh.value[0], sh.cos, sh.sin, view.key, view.value, scaling, **kw,
                             **tuning)


#: the largest head_dim the ``"auto"`` backend gives the Triton kernels: their launch rule was measured and their GPU
#: tests run at 128 (Llama, Mistral, Qwen); at 256 (Gemma) the rule's K pass needs more shared memory than an H100
#: has (266,240 bytes at K rank 16 for 128-token tiles in 3 stages, offline for sm_90, against the 232,448-byte
#: limit) and failed to compile under its register cap in the kernels' GPU fuzz
#: (eval/results/raw/fuzz_kernels_v47_h100.json); such calls run the SDPA path (exact)
TRITON_MAX_HEAD_DIM = 128


def auto_backend(cuda: bool, queries: int, head_dim: int, triton_ready) -> str:
    """The ``"auto"`` backend's path for a call on CUDA (``cuda``) or not, of ``queries`` per row and ``head_dim``;
    ``triton_ready()``: whether the kernels can run. Warns once where it falls back."""
    if not cuda:
        warn_once(logger, "ForkKV attention runs the PyTorch path (the Triton kernels need a CUDA device)")
        return "torch"
    if queries >= EXTEND_SDPA_MIN_QUERIES:
        return "sdpa"
    if head_dim > TRITON_MAX_HEAD_DIM:
        warn_once(logger, f"ForkKV attention runs the SDPA path for head_dim {head_dim} (the Triton kernels are tuned "
                          f"and GPU-tested up to {TRITON_MAX_HEAD_DIM})")
        return "sdpa"
    if triton_ready():
        return "triton"
    warn_once(logger, "ForkKV attention runs the PyTorch path: forkkv_kernels (Triton) is not importable; install "
                      "Triton to use the kernels")
    return "torch"


def residual_attention(query: torch.Tensor, view, attention_mask, scaling: float, backend: str = "auto",
                       softcap: float | None = None) -> torch.Tensor:
    """Dispatch: ``"triton"`` (the ``forkkv_kernels`` Triton kernels), ``"sdpa"`` (:func:`residual_attention_sdpa`),
    ``"torch"`` (:func:`residual_attention_torch`) or ``"auto"``: on CUDA, SDPA for prompt-like calls (at least
    ``EXTEND_SDPA_MIN_QUERIES`` queries per row) and Triton for the rest when installed; PyTorch elsewhere.
    ``"auto"`` takes the configuration's backend (:func:`forkkv_hf.get_config`, env ``FORKKV_BACKEND``).
    Soft-capped attention (``softcap``) always takes the PyTorch path. Where ``"auto"`` falls back to the PyTorch
    path (CPU, no Triton, soft-capping), it logs a warning once."""
    if backend == "auto":
        backend = get_config().backend
    if backend == "auto":
        backend = auto_backend(query.is_cuda, query.shape[2], query.shape[-1], lambda: triton_ready(query))
    if backend == "torch" or softcap is not None:
        if softcap is not None and backend != "torch":
            warn_once(logger, f"ForkKV attention runs the PyTorch path for soft-capped attention (the {backend} path "
                              "has no soft-capping)")
        return residual_attention_torch(query, view, attention_mask, scaling, softcap=softcap)
    if backend == "sdpa":
        return residual_attention_sdpa(query, view, attention_mask, scaling)
    if backend == "triton":
        if not triton_ready(query):
            raise ValueError(f"the 'triton' backend needs CUDA tensors and an importable Triton (or TRITON_INTERPRET=1 "
                             f"for the interpreter); the query is on {query.device}: use the 'auto' or 'torch' backend")
        return residual_attention_triton(query, view, attention_mask, scaling)
    raise ValueError(f"unknown ForkKV attention backend {backend!r}; use 'auto', 'torch', 'sdpa' or 'triton'")
