"""The shared context: one base-model pass over a context, kept once and forked by many agents.

- :mod:`~forkkv_hf.context.segments`: the data every fork reads (``SharedLayer``, ``Residual``, ``ContextLayout``)
  and its bytes;
- :mod:`~forkkv_hf.context.base_pass`: the base-model pass and the hooks that capture the residuals;
- :mod:`~forkkv_hf.context.identity` and :mod:`~forkkv_hf.context.probes`: what a context was computed from, and
  whether the model still has it;
- :mod:`~forkkv_hf.context.shared_context`: ``SharedContext``, the public API.
"""

from .identity import StaleContextError, set_weight_checks
from .segments import ContextLayout, Residual, SharedLayer
from .shared_context import SharedContext, register_fork

__all__ = [
    "ContextLayout",
    "Residual",
    "SharedContext",
    "SharedLayer",
    "StaleContextError",
    "register_fork",
    "set_weight_checks",
]
