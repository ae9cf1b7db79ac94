"""The tests' case spaces, one list each, and the one id scheme every parametrized test uses.

Ids are generated from the parameters, never written by hand: shape sizes as ``{Dim}{n}`` (``B3-H4-Hkv2-D16-T37``:
batch rows, query heads, KV heads, head dim, shared tokens, then ``P`` private tokens, ``Q`` queries per row, ``N``
agents), every other parameter as ``name=value`` (``dtype=bf16``, ``kernel=cascade``, ``rows=0,0,1,-1``), joined by
``-``. Use :func:`parametrize` (a ``pytest.mark.parametrize`` that makes those ids) for every parametrized test;
``tests/test_suite_layout.py`` checks that no test file parametrizes otherwise.

A case flagged ``fast`` runs in ``make test-fast``; the others are marked ``slow`` (``-m "not slow"`` leaves them
out). The attention cases run every ResidualAttention implementation (the fp32 reference, the PyTorch paths, both
Triton kernel families), so each case is a shape all of them take.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest
import torch

#: short names of dtypes in ids
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
LOW_DTYPES = (torch.bfloat16, torch.float16)


def _value(v) -> str:
    if isinstance(v, torch.dtype):
        return DTYPE_NAMES.get(v, str(v).removeprefix("torch."))
    if isinstance(v, (list, tuple)):
        return ",".join(_value(x) for x in v)
    if isinstance(v, dict):
        return ",".join(f"{k}={_value(x)}" for k, x in v.items())
    if isinstance(v, str) and v in ("True", "False", "None") or isinstance(v, str) and _is_number(v):
        return repr(v)  # a string that reads like another type keeps its quotes: chunk_size='4096' vs 4096
    return str(v)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_dim(name: str) -> bool:
    """Shape sizes (``B``, ``Hkv``, ``T``, ...) print as ``B3``; every other parameter as ``name=value``."""
    return name[:1].isupper() and name.isalnum()


def case_id(params: dict) -> str:
    """The id of one case from its parameters (see the module docstring); an object with an ``id`` (a case of this
    module) contributes that id, a dict of keyword arguments (a generation mode, a RoPE config) its items."""
    parts = []
    for name, v in params.items():
        if hasattr(v, "id"):
            parts.append(v.id)
        elif isinstance(v, dict):
            parts.extend(f"{k}={_value(x)}" for k, x in v.items())
        elif _is_dim(name) and isinstance(v, int) and not isinstance(v, bool):
            parts.append(f"{name}{v}")
        else:
            parts.append(f"{name}={_value(v)}")
    return "-".join(parts) or "default"


def parametrize(argnames: str, values, fast=None, version_independent=None):
    """``pytest.mark.parametrize(argnames, values)`` with ids from :func:`case_id`. ``fast``: which values run in the
    fast tier (a predicate on the value; default: a value's own ``fast`` flag where it has one, else all); the rest are
    marked ``slow``. ``version_independent``: which values are marked so (a predicate; the rule: tests/conftest.py)."""
    names = [n.strip() for n in argnames.split(",")]
    params = []
    for v in values:
        row = tuple(v) if len(names) > 1 else (v,)
        is_fast = fast(v) if fast is not None else getattr(v, "fast", True)
        marks = [] if is_fast else [pytest.mark.slow]
        if version_independent is not None and version_independent(v):
            marks.append(pytest.mark.version_independent)
        params.append(pytest.param(*row, id=case_id(dict(zip(names, row))), marks=marks))
    return pytest.mark.parametrize(argnames, params)


#: ``generate`` modes a ForkKV cache serves like a DynamicCache (beams and ``num_return_sequences`` reorder and repeat
#: its rows)
GENERATE_MODES = [
    dict(do_sample=False),
    dict(do_sample=True, top_k=0, temperature=1.0),
    dict(do_sample=False, num_beams=3),
    dict(do_sample=True, num_return_sequences=2),
    dict(do_sample=True, num_beams=2, num_return_sequences=2),
]


# ------------------------------------------------------------------------------------------ ResidualAttention calls
@dataclass(frozen=True)
class AttnCase:
    """One ResidualAttention call on a random view (tests/views.py ``random_view``): ``B`` rows, ``H`` query heads,
    ``Hkv`` KV heads of dim ``D``, ``T`` shared and ``P`` private tokens, ``Q`` queries per row; ``rows``: each row's
    agent slot (-1: no residual; default: the agents in turn and a base row), ``N`` agents of ranks ``ranks`` (V's
    ``v_ranks`` where they differ), which residuals exist (``k_res``/``v_res``), a LoRA bias column (``bias``)."""

    B: int
    H: int
    Hkv: int
    D: int
    T: int
    P: int
    Q: int = 1
    rows: tuple | None = None
    N: int = 2
    ranks: tuple = (4, 2)
    v_ranks: tuple | None = None
    k_res: bool = True
    v_res: bool = True
    bias: bool = False
    fast: bool = field(default=False, compare=False)
    lowp: bool = field(default=False, compare=False)

    @property
    def id(self) -> str:
        dims = {k: getattr(self, k) for k in ("B", "H", "Hkv", "D", "T", "P", "Q")}
        if self.N != 2:
            dims["N"] = self.N
        extra = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                 if f.name not in dims and f.name not in ("N", "fast", "lowp") and getattr(self, f.name) != f.default}
        return case_id({**dims, **extra})

    def view(self, dtype=torch.float32, seed=0):
        from views import random_view

        return random_view(B=self.B, Hkv=self.Hkv, D=self.D, T=self.T, P=self.P, n_agents=self.N,
                           rows=None if self.rows is None else list(self.rows), ranks=self.ranks,
                           v_ranks=self.v_ranks, k_res=self.k_res,
                           v_res=self.v_res, bias=self.bias, dtype=dtype, seed=seed)

    def query(self, dtype=torch.float32, seed=3) -> torch.Tensor:
        """``[B, H, Q, D]``"""
        g = torch.Generator().manual_seed(seed)
        return torch.randn(self.B, self.H, self.Q, self.D, generator=g).to(dtype)

    def mask(self):
        """A padding mask ``[B, 1, Q, T+P]`` (tests/views.py ``padding_mask``): row b pads its first
        ``(b + 1) % (P - Q + 1)`` private tokens."""
        from views import padding_mask

        pads = [(b + 1) % max(1, self.P - self.Q + 1) for b in range(self.B)]
        return padding_mask(self.B, self.Q, self.T, self.P, pads)


#: K and V residual stacks of different widths (fitted residuals' ``k_rank``): K wider than V and V wider than K,
#: decode and extend, rows sharing an agent and a base row
SPLIT_RANK_CASES = [
    AttnCase(B=4, H=8, Hkv=2, D=16, T=45, P=3, ranks=(6, 3), v_ranks=(2, 5)),
    AttnCase(B=4, H=4, Hkv=4, D=32, T=37, P=2, Q=2, ranks=(2, 4), v_ranks=(16, 3), rows=(0, 1, 0, -1)),
]

A = AttnCase
#: the attention case space: GQA group sizes 1-8, head dims 8-128 (48: not a power of two), ranks 1-64, rows that share
#: an agent or have none, extend calls (Q > 1), one residual kind, a bias column
ATTN_CASES = [
    A(B=3, H=4, Hkv=2, D=16, T=37, P=5, fast=True),
    A(B=4, H=2, Hkv=2, D=32, T=23, P=7, rows=(0, 0, 1, -1), fast=True),
    A(B=4, H=3, Hkv=1, D=8, T=23, P=7, Q=3, rows=(0, 0, 1, -1)),
    A(B=3, H=3, Hkv=1, D=32, T=70, P=4, ranks=(1, 8)),
    A(B=5, H=8, Hkv=2, D=64, T=129, P=2, N=3, ranks=(16, 16, 4)),
    A(B=3, H=8, Hkv=1, D=32, T=45, P=3, rows=(1, -1, 0)),
    A(B=5, H=6, Hkv=1, D=16, T=41, P=2, N=3, ranks=(2, 5, 7)),
    A(B=5, H=3, Hkv=3, D=16, T=11, P=9, Q=4, N=3, ranks=(1, 8, 3)),
    A(B=3, H=4, Hkv=2, D=48, T=53, P=4),
    A(B=2, H=2, Hkv=1, D=128, T=33, P=3, ranks=(64, 8)),
    A(B=2, H=8, Hkv=2, D=32, T=64, P=1, rows=(1, 1)),
    A(B=10, H=4, Hkv=2, D=16, T=33, P=2, rows=(0,) * 9 + (1,)),
    A(B=3, H=4, Hkv=2, D=32, T=41, P=6, Q=3, fast=True),
    A(B=2, H=6, Hkv=2, D=16, T=19, P=5, Q=5, rows=(0, 0)),
    A(B=3, H=4, Hkv=2, D=16, T=29, P=4, Q=2, bias=True),
    A(B=3, H=4, Hkv=2, D=16, T=29, P=4, v_res=False, fast=True),
    A(B=3, H=4, Hkv=2, D=16, T=29, P=4, Q=2, k_res=False),
    A(B=3, H=4, Hkv=2, D=16, T=29, P=4, k_res=False, v_res=False),
    A(B=2, H=4, Hkv=2, D=16, T=29, P=4, rows=(-1, -1)),
    A(B=4, H=8, Hkv=2, D=64, T=70, P=5, rows=(0, 1, 1, -1), lowp=True),
    A(B=2, H=6, Hkv=2, D=32, T=39, P=6, Q=4, lowp=True),
]
#: the low-precision pass rule's cases (bf16/fp16 against fp32, at most 3x PyTorch's own low-precision error): a decode
#: and an extend call
LOWP_CASES = [c for c in ATTN_CASES if c.lowp]
#: the cascade launcher's knobs, each on a case of the attention space (its other shapes run the defaults)
TUNINGS = [
    (A(B=3, H=4, Hkv=2, D=32, T=77, P=3), dict(block_t=16)),
    (A(B=6, H=4, Hkv=2, D=16, T=37, P=3), dict(block_m=16, n_sub=1)),
    (A(B=9, H=4, Hkv=1, D=16, T=50, P=3), dict(block_m=32, n_sub=2, block_t=16)),
    (A(B=5, H=8, Hkv=2, D=16, T=23, P=2), dict(block_m=128, n_sub=4)),
    (A(B=7, H=4, Hkv=1, D=16, T=31, P=2, Q=2, rows=(1, 0, 1, 1, 0, 1, 1)), dict(mq=16)),
    (A(B=3, H=4, Hkv=2, D=16, T=77, P=3),
     dict(res_heads=1, res_block_t=16, res_programs_per_sm=64, programs_per_sm=64)),
    (A(B=3, H=4, Hkv=2, D=16, T=77, P=3), dict(programs_per_sm=1, res_programs_per_sm=1)),
]


@dataclass(frozen=True)
class GpuCase:
    """Llama-3.1-8B-shaped heads (32 query, 8 KV, D=128), rank 16, on a GPU: a context of ``T`` tokens, ``N`` agents
    with ``per_agent`` rows each, plus an agent-0 row and a base row, ``Q`` queries per row, ``9 + Q`` private
    tokens."""

    T: int
    N: int
    Q: int = 1
    per_agent: int = 1

    @property
    def id(self) -> str:
        return case_id(dataclasses.asdict(self))

    def view(self, dtype):
        from views import random_view

        rows = [i // self.per_agent for i in range(self.N * self.per_agent)] + [0, -1]
        return random_view(B=len(rows), Hkv=8, D=128, T=self.T, P=9 + self.Q, n_agents=self.N,
                           ranks=(16,) * self.N, dtype=dtype, rows=rows)

    def query(self, dtype) -> torch.Tensor:
        """``[B, 32, Q, 128]``"""
        g = torch.Generator().manual_seed(3)
        return torch.randn(self.N * self.per_agent + 2, 32, self.Q, 128, generator=g).to(dtype)


GPU_CASES = [GpuCase(4096, 8), GpuCase(2053, 5, per_agent=3), GpuCase(1500, 4, Q=7), GpuCase(1500, 4, Q=17)]
