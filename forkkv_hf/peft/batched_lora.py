"""Batched mixed-adapter LoRA: one gathered matmul per LoRA layer instead of PEFT's loop over adapters.

PEFT's ``_mixed_batch_forward`` (what ``generate(adapter_names=[...])`` runs in every LoRA layer) slices the batch
and runs each distinct adapter's LoRA separately, in a Python loop: with N distinct agents a decode step does N small
matmul pairs per layer. Here every LoRA layer's adapters are stacked once (``A: [n, r_max, d_in]``,
``B: [n, d_out, r_max]``, ranks zero-padded, scalings in a vector) and each row gathers its adapter's factors:
- on CUDA, Triton kernels (``forkkv_kernels.lora``): a shrink ``u = x Aᵀ`` and an expand ``y += s · u Bᵀ`` over tiles
  of rows that share an adapter (Punica SGMV style), all adapters in one launch;
- elsewhere, a vectorised PyTorch path: ``A``/``B`` gathered per row and two ``bmm`` (no loop over adapters).

Results equal PEFT's to float tolerance. Use it on its own with any PEFT mixed-adapter model::

    with forkkv_hf.batched_lora(peft_model):
        out = peft_model.generate(**inputs, adapter_names=names)

or keep it on with :func:`enable_batched_lora` / :func:`disable_batched_lora` (``enable_forkkv`` turns it on).
The stacks are the storage of PEFT's ``lora_A``/``lora_B`` parameters (:class:`StackedLoRA`), so a write to the
adapters' weights, however it is made, is seen by the next forward; stacks are rebuilt when a layer's adapters are
added, reloaded or rescaled.
Layers or adapters it cannot batch (DoRA and other LoRA variants, active dropout) fall back to PEFT's own code
(on a layer tensor parallelism shards, its loop with the adapters in one order on every rank: :mod:`.tp`).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
from torch import nn

from ..context.probes import Probes
from ..config import get_config
from ..ops.dispatch import triton_ready
from ..ops.decode_ops import (add_lora_delta, bias_rows, decode_lora_forward, lora_delta_rows,
                              remember_decode_plan, row_slots)
from ..log import get_logger, warn_once
from . import wrappers
from .calls import CALL_EPOCH, new_call
from .lora_factors import BASE_ADAPTER, _modules_outside_lora, in_planned_step, transformers_model
from .tp import (is_dtensor, layer_factor, local, ordered_mixed_batch_forward, rowwise_group, stamp_tp_plans,
                 tp_style)

logger = get_logger(__name__)


@dataclass
class StackedLoRA:
    """One LoRA layer's adapters stacked for gathering. ``A [n, r, d_in]``, ``B [n, d_out, r]`` (unscaled),
    ``scale [n]`` fp32, ``bias [n, d_out]`` or ``None`` (LoRA bias, unscaled); ``slot``: adapter name -> index.

    ``views`` (the usual case): the stacks *are* the storage of the adapters' PEFT parameters: ``lora_A[n].weight``
    is a view of ``A[slot, :r]``, ``lora_B[n].weight`` of ``B[slot, :, :r]`` (not contiguous when the layer's ranks
    differ), the LoRA bias of ``bias[slot]``. A write to the parameters (in place, through ``.data``,
    ``load_state_dict``, an optimizer step) is a write to the stack, so it cannot be stale, and the adapter weights
    are held once. ``built[n]`` then holds where each parameter pointed; a parameter replaced since (an adapter
    reloaded, ``model.to(...)``, ``param.data = t``) or a scaling changed makes the stack rebuilt at the next call.
    Otherwise (tensor parallelism: factors sliced like their base layer or sharded DTensors; adapters of mixed dtype
    or device) the stacks are copies: ``built[n]`` holds stamps and content probes of what was copied, checked once
    per call. Under tensor parallelism ``reduce_group`` is set for a rowwise layer (``A`` sharded by input
    features), whose shrink ``u = x Aᵀ`` is a partial sum to add up across that process group."""

    built: dict | None
    slot: dict
    A: torch.Tensor | None
    B: torch.Tensor | None
    scale: torch.Tensor | None
    bias: torch.Tensor | None
    reduce_group: object = None
    views: bool = False
    #: the layer's adapters have different dtypes: one stack would round some of them (PEFT computes each in its own
    #: dtype), so such a layer runs PEFT's forward
    mixed_dtypes: bool = False

    def views_current(self, layer, names) -> bool:
        """Whether the parameters of ``names`` are still the stack's storage, with unchanged scalings."""
        return self.views and all(n in self.slot and n in layer.lora_A and self.built.get(n) == _view_key(layer, n)
                                  for n in names)

    def holds(self, factor) -> bool:
        """Whether this stack is the storage of ``factor`` (a :class:`forkkv_hf.context.identity.Factor`) as it is now."""
        return self.views and self.built.get(factor.name) == _key_of(factor.A, factor.B, factor.bias, factor.scaling)


def _params(layer, name: str) -> tuple:
    """``(lora_A weight, lora_B weight, lora_B bias or None)`` (direct dict reads: this runs per adapter, layer and
    call)."""
    pb = layer._modules["lora_B"]._modules[name]._parameters
    return layer._modules["lora_A"]._modules[name]._parameters["weight"], pb["weight"], pb.get("bias")


def _key_of(A, B, bias, scaling: float) -> tuple:
    return tuple(None if t is None else (t.data_ptr(), t.shape, t.stride(), t.dtype) for t in (A, B, bias)) + (
        scaling,)


def _view_key(layer, name: str) -> tuple:
    return _key_of(*_params(layer, name), float(layer.scaling[name]))


def _copy_key(layer, name: str) -> tuple:
    """Stamps of a copied adapter, and its content probes (``.data`` writes move no stamp)."""
    tensors = [local(t) for t in _params(layer, name) if t is not None]
    stamps = tuple((t.data_ptr(), t._version) for t in tensors)
    return stamps, float(layer.scaling[name]), tuple(Probes(fresh=True).values(tensors, kind="factor"))


def _current(layer, stack: StackedLoRA, used) -> bool:
    """Whether the stack serves ``used`` as the layer is now: each name it has is current, and it has no slot for
    a name the layer no longer has (an adapter deleted, or re-added without LoRA here)."""
    if any((n in stack.slot) != (n in layer.lora_A) for n in used) or len(stack.slot) != len(layer.lora_A._modules):
        return False  # (a deleted adapter's slot kept its memory while the stack served the others)
    names = [n for n in used if n in layer.lora_A]
    if stack.views:
        return stack.views_current(layer, names)
    return all(stack.built[n] == _copy_key(layer, n) for n in names)


def stacked_lora(layer, used=None) -> StackedLoRA:
    """The layer's stacked factors. Rebuilt when one of the adapters in ``used`` (default: all the layer's) is
    new, deleted, reloaded or rescaled, or (copies only) was written since the stack was built. Built outside
    inference mode: the parameters become views of the stacks, and inference tensors could never train again."""
    with torch.inference_mode(False):
        return _stacked_lora(layer, used)


def _stacked_lora(layer, used) -> StackedLoRA:
    cached = layer.__dict__.get("_forkkv_stack")
    used = list(layer.lora_A.keys()) if used is None else [n for n in used if n != BASE_ADAPTER]
    if cached is not None and _current(layer, cached, used):
        return cached
    names = list(layer.lora_A.keys())
    base_w, style = layer.get_base_layer().weight, tp_style(layer)
    # tensor parallelism: this rank's shards (lora_B rows of a colwise layer, lora_A columns of a rowwise one; whole
    # factors where the plan gathers the output or replicates the input)
    As = [layer_factor(layer.lora_A[n].weight, base_w, 1, style) for n in names]
    Bs = [layer_factor(layer.lora_B[n].weight, base_w, 0, style) for n in names]
    params = [t for n in names for t in _params(layer, n) if t is not None]
    views = (not any(is_dtensor(t) for t in [base_w, *params]) and len({(t.dtype, t.device) for t in params}) == 1
             and all(a is layer.lora_A[n].weight and b is layer.lora_B[n].weight for n, a, b in zip(names, As, Bs)))
    if len({t.dtype for t in params}) > 1:  # no stack: PEFT computes each adapter in its own dtype
        stack = StackedLoRA({n: _copy_key(layer, n) for n in names}, {n: i for i, n in enumerate(names)}, None, None,
                            None, None, mixed_dtypes=True)
        layer._forkkv_stack = stack
        return stack
    r_max = max(a.shape[0] for a in As)
    d_in, d_out = As[0].shape[1], Bs[0].shape[0]
    A = torch.zeros(len(names), r_max, d_in, dtype=As[0].dtype, device=As[0].device)
    B = torch.zeros(len(names), d_out, r_max, dtype=Bs[0].dtype, device=As[0].device)
    has_bias = any(getattr(layer.lora_B[n], "bias", None) is not None for n in names)
    bias = torch.zeros(len(names), d_out, dtype=B.dtype, device=A.device) if has_bias else None
    with torch.no_grad():
        for i, n in enumerate(names):
            r = As[i].shape[0]
            A[i, :r] = As[i]
            B[i, :, :r] = Bs[i]
            if has_bias and layer.lora_B[n].bias is not None:
                bias[i] = layer_factor(layer.lora_B[n].bias, base_w, 0, style)
            if views:  # the parameters become views of their slots (their own storage is freed)
                pa, pb, pbias = _params(layer, n)
                pa.data, pb.data = A[i, :r], B[i, :, :r]
                if pbias is not None:
                    pbias.data = bias[i]
    scale = torch.tensor([float(layer.scaling[n]) for n in names], dtype=torch.float32, device=A.device)
    key = _view_key if views else _copy_key
    stack = StackedLoRA({n: key(layer, n) for n in names}, {n: i for i, n in enumerate(names)}, A, B, scale, bias,
                        rowwise_group(layer), views)
    layer._forkkv_stack = stack
    return stack


def _release_stack(layer) -> None:
    """Drop the layer's stack and the compiled decode plan that holds it (which kept a copy of every adapter's factors
    alive after disable_forkkv: 6.5 GiB of 256 Llama-3.1-8B agents); parameters that were its views get their own
    storage back (PEFT's layout)."""
    layer.__dict__.pop("_forkkv_decode", None)
    stack = layer.__dict__.pop("_forkkv_stack", None)
    if stack is None or not stack.views:
        return
    with torch.no_grad(), torch.inference_mode(False):  # (their own storage, not an inference tensor)
        for n in stack.slot:
            if n in layer.lora_A and stack.views_current(layer, [n]):
                for p in _params(layer, n):
                    if p is not None:
                        p.data = p.data.clone()


_EMPTY = StackedLoRA(None, {}, None, None, None, None)


def _call_plan(layer, adapter_names):
    """``(stack, slots, batchable)`` for this forward, computed once per layer and user-level call: every decode
    step of one ``generate`` reuses it, so a step costs no per-adapter Python work. Each new call (a new
    ``forward``/``generate``) re-checks the adapters it uses against the stack: changed weights are picked up."""
    memo = layer.__dict__.get("_forkkv_rows_memo")
    epoch = CALL_EPOCH[0]
    if memo is not None and memo[0] is adapter_names and memo[1] == len(adapter_names) and memo[2] == epoch:
        return memo[3]
    used = set(adapter_names)
    reason = unbatchable_reason(layer, used)
    if reason is not None:
        warn_once(logger, f"batched LoRA: {reason}; these layers run PEFT's own mixed-batch forward (same result, "
                          "one LoRA pass per adapter)")
    batchable = reason is None
    stack = stacked_lora(layer, used) if batchable else None
    if stack is not None and stack.mixed_dtypes:  # before, stacked in the first adapter's dtype: the others rounded
        warn_once(logger, "batched LoRA: a layer's adapters have different dtypes (PEFT computes each in its own); "
                          "these layers run PEFT's own mixed-batch forward (same result, one LoRA pass per adapter)")
        batchable, stack = False, None
    slots = tuple(stack.slot.get(n, -1) for n in adapter_names) if batchable else None
    if batchable and all(s_ < 0 for s_ in slots):
        stack = _EMPTY
    plan = (stack, slots, batchable)
    layer._forkkv_rows_memo = (adapter_names, len(adapter_names), epoch, plan)
    # what this call's compiled decode steps read (the rows' slots as device tensors), made once per call
    remember_decode_plan(layer, stack, slots, batchable, batchable and stack.A is not None and _use_triton(stack.A))
    return plan


def lora_delta_torch(x: torch.Tensor, slots: tuple, stack: StackedLoRA) -> torch.Tensor:
    """``[B, L, d_out]`` LoRA delta per row, vectorised (:func:`forkkv_hf.ops.decode_ops.lora_delta_rows`)."""
    return lora_delta_rows(x, *row_slots(tuple(slots), str(x.device)), stack)


def _use_triton(x: torch.Tensor) -> bool:
    backend = get_config().lora_backend
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_ready(x):
            raise ValueError(f"lora_backend='triton' needs CUDA tensors and an importable Triton (or "
                             f"TRITON_INTERPRET=1 for the interpreter); the input is on {x.device}: use the 'auto' or "
                             "'torch' LoRA backend")
        return True
    return x.is_cuda


def unbatchable_reason(layer, adapters) -> str | None:
    """Why the batched path cannot run ``adapters`` on this LoRA layer (``None``: it can). The text names the kind
    of adapter, not the adapter or layer, so the fallback warns once per reason."""
    for n in adapters:
        if n == BASE_ADAPTER or n not in layer.lora_A:
            continue
        if n in getattr(layer, "lora_variant", {}) or layer.use_dora.get(n, False):
            return "DoRA and other LoRA-variant adapters are not batched"
        drop = layer.lora_dropout[n]
        if not isinstance(drop, nn.Identity) and drop.training:
            return "LoRA dropout is active (a lora_dropout module in training mode; model.eval() turns it off)"
    return None


def _can_batch(layer, adapters) -> bool:
    return unbatchable_reason(layer, adapters) is None


def _needs_grad(layer, x: torch.Tensor) -> bool:
    """A forward whose gradient reaches the LoRA weights or ``x``: the stacks hold the weights' values without their
    autograd link and the Triton path has no backward, so PEFT's own forward runs it (before: the LoRA weights got
    no gradient, silently)."""
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(p.requires_grad for m in (layer.lora_A, layer.lora_B) for p in m.parameters())


def peft_mixed_batch_forward(self, x: torch.Tensor, *args, adapter_names, **kwargs) -> torch.Tensor:
    """PEFT's own ``_mixed_batch_forward``, for the calls batched LoRA hands back; on a layer that tensor parallelism
    shards, the same loop with the adapters in one order on every rank
    (:func:`~forkkv_hf.peft.tp.ordered_mixed_batch_forward`; PEFT's iterates a set whose order differs between
    processes: before, found by an audit, the ranks summed different adapters' partial products)."""
    if tp_style(self) is not None:
        return ordered_mixed_batch_forward(self, x, *args, adapter_names=adapter_names, **kwargs)
    return type(self)._mixed_batch_forward(self, x, *args, adapter_names=adapter_names, **kwargs)


def batched_mixed_batch_forward(self, x: torch.Tensor, *args, adapter_names, **kwargs) -> torch.Tensor:
    """Drop-in for ``peft.tuners.lora.layer.Linear._mixed_batch_forward``: same result, one gathered LoRA for all
    adapters of the batch."""
    if not self.lora_A or x.dim() != 3 or _needs_grad(self, x):
        return peft_mixed_batch_forward(self, x, *args, adapter_names=adapter_names, **kwargs)
    if in_planned_step(adapter_names):  # the plan its call's prefill stored
        return decode_lora_forward(self, x, *args, **kwargs)
    if torch.compiler.is_compiling():  # a model its user compiled: PEFT's forward, traced (no plan is this call's)
        return peft_mixed_batch_forward(self, x, *args, adapter_names=adapter_names, **kwargs)
    stack, slots, batchable = _call_plan(self, adapter_names)
    if not batchable:
        return peft_mixed_batch_forward(self, x, *args, adapter_names=adapter_names, **kwargs)
    from peft.tuners.lora.layer import VARIANT_KWARG_KEYS

    for k in VARIANT_KWARG_KEYS:
        kwargs.pop(k, None)
    result = self.base_layer(x, *args, **kwargs)
    if stack.built is None:  # no row of this call uses an adapter of this layer
        return result
    if _use_triton(x):
        from forkkv_kernels.lora import lora_delta_triton

        xs = x.to(stack.A.dtype)
        result = add_lora_delta(result, stack.B.dtype, lambda out: lora_delta_triton(
            xs, slots, stack.A, stack.B, stack.scale, out, stack.reduce_group))
        if stack.bias is not None:
            result = result + _bias_rows(slots, stack, x.device).to(result.dtype)
        return result
    return result + lora_delta_torch(x, slots, stack).to(result.dtype)


def checked_forward_args(self, x, *args, **kwargs):
    """PEFT's ``_check_forward_args`` once per layer, user-level call and adapter list instead of at every decode
    step: with ``adapter_names`` it builds a set of the batch's names and looks each up (O(rows) per LoRA layer and
    step, ~3 ms a step for 256 agents on an 8B model). The row-count check, which is cheap, runs at every eager
    forward (a compiled decode step skips both: its call's eager prefill ran them)."""
    names = kwargs.get("adapter_names")
    if in_planned_step(names):  # its call's eager prefill checked the names
        return None
    if names is None or len(x) != len(names) or torch.compiler.is_compiling():  # traced by its user: no memo
        return type(self)._check_forward_args(self, x, *args, **kwargs)
    memo = self.__dict__.get("_forkkv_check_memo")
    key = (len(names), CALL_EPOCH[0], bool(self.merged))
    if memo is not None and memo[0] is names and memo[1] == key:
        return None
    type(self)._check_forward_args(self, x, *args, **kwargs)
    self._forkkv_check_memo = (names, key)
    return None


def _bias_rows(slots: tuple, stack: StackedLoRA, device) -> torch.Tensor:
    """``[B, 1, d_out]``: each row's scaled LoRA bias (zero for rows without this layer's adapter)."""
    return bias_rows(*row_slots(tuple(slots), str(device)), stack)


def _lora_linears(model: nn.Module):
    """The LoRA ``Linear`` layers of ``model`` (a walk that does not descend into tuner layers: this runs before
    every ``generate``)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    return [m for m in _modules_outside_lora(transformers_model(model)) if isinstance(m, LoraLinear)]


def patch_lora_layers(model: nn.Module) -> None:
    """Give every LoRA ``Linear`` of ``model`` the batched mixed-adapter forward (idempotent); under tensor
    parallelism, record the plan's style of the layers PEFT did not stamp (:func:`forkkv_hf.peft.tp.stamp_tp_plans`)."""
    layers = _lora_linears(model)
    stamp_tp_plans(transformers_model(model), layers)
    for m in layers:
        if "_mixed_batch_forward" not in m.__dict__:
            # partials, not bound methods: a bound method pickles as getattr(m, its function's name), which m lacks
            m._mixed_batch_forward = functools.partial(batched_mixed_batch_forward, m)
            m._check_forward_args = functools.partial(checked_forward_args, m)


def enable_batched_lora(model: nn.Module) -> nn.Module:
    """Route ``model``'s mixed-adapter LoRA through the batched path (idempotent). LoRA layers created later
    (adapters added on new modules) are picked up at the next ``generate``."""
    patch_lora_layers(model)
    model._forkkv_batched_lora = True
    wrappers.install(model)
    new_call()
    return model


def release_stacks(model: nn.Module) -> None:
    """Drop every layer's stack (parameters get their own storage back); the next forward builds them again."""
    for m in _lora_linears(model):
        _release_stack(m)
        m.__dict__.pop("_forkkv_rows_memo", None)


def disable_batched_lora(model: nn.Module) -> nn.Module:
    """Back to PEFT's own ``_mixed_batch_forward`` (and drop the stacked factors)."""
    for m in _lora_linears(model):
        m.__dict__.pop("_mixed_batch_forward", None)
        m.__dict__.pop("_check_forward_args", None)
        m.__dict__.pop("_forkkv_check_memo", None)
        _release_stack(m)
        m.__dict__.pop("_forkkv_rows_memo", None)
    model._forkkv_batched_lora = False
    wrappers.uninstall_if_unused(model)
    return model


def is_batched_lora_enabled(model: nn.Module) -> bool:
    layers = _lora_linears(model)
    return bool(layers) and all("_mixed_batch_forward" in m.__dict__ for m in layers)


@contextlib.contextmanager
def batched_lora(model: nn.Module):
    """Context manager: batched mixed-adapter LoRA inside, the previous state restored on exit."""
    was = is_batched_lora_enabled(model)
    enable_batched_lora(model)
    try:
        yield model
    finally:
        if not was:
            disable_batched_lora(model)


# the wrappers reach batched LoRA only through these hooks (this module sits above them)
if patch_lora_layers not in wrappers.BEFORE_GENERATE:
    wrappers.BEFORE_GENERATE.append(patch_lora_layers)
if release_stacks not in wrappers.BEFORE_SAVE:
    wrappers.BEFORE_SAVE.append(release_stacks)
