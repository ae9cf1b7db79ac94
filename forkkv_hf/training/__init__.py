"""ForkKV-aware LoRA training: fine-tune agents on what they will see at inference under ForkKV.

At inference, an agent forked from a :class:`~forkkv_hf.SharedContext` reads the base model's context K/V plus its
own rank-r residual (its LoRA delta applied to the base model's k/v-projection inputs), not the K/V of its own pass
over the context. An adapter fine-tuned the usual way (context in the input, every layer drifting with its own
LoRA) meets a slightly different context at inference. Training under ForkKV's semantics removes that mismatch:

    from forkkv_hf.training import TrainingContext, forkkv_loss

    ctx = TrainingContext(peft_model, context_ids)             # one base pass (no grad), shared by every agent
    for name in ["planner", "coder"]:
        loss = forkkv_loss(peft_model, ctx, batch[name], name)  # batch: input_ids/labels [B, L] after the context
        loss.backward()
        optimizers[name].step(); optimizers[name].zero_grad()

Gradients reach ``A`` and ``B`` of the agent's ``k_proj``/``v_proj`` LoRA through the residual and every LoRA module
through the suffix (prompt and answer). A step may cover several contexts at once, at about the cost of one on a GPU
(the step's time is mostly per operator, not per token): ``TrainingContext(peft_model, [ids_a, ids_b, ...])`` and
``batch["context_index"]`` ``[B]``, the context of each row. :class:`ForkKVTrainer` (a ``transformers.Trainer``) does the same from a
dataset whose examples carry a ``context_index``; adapters are saved with ``save_pretrained`` as usual and served by
``SharedContext.build(...).fork(...)`` + ``generate``. ``residual="v"`` trains for V-only forks, ``"exact"`` is ordinary
fine-tuning with the context in the input (one context pass per call, shared by the batch rows). To adapt an existing
standard adapter to ForkKV, :func:`copy_adapter` it into a student and train that with :func:`forkkv_distill_loss`
(or ``ForkKVTrainer(..., teacher_adapter=...)``): the student under ForkKV learns the teacher's exact-inference outputs.
``residual=FittedResidual(r)`` trains for residuals fitted to the agent's own pass (``SharedContext.fit_residuals``).
"""

from .context import ContextLayer, TrainingContext
from .distill import copy_adapter, forkkv_distill_loss
from .fitted import FittedResidual
from .loss import RESIDUALS, context_kv, forkkv_logits, forkkv_loss
from .trainer import ForkKVCollator, ForkKVTrainer

__all__ = [
    "RESIDUALS",
    "ContextLayer",
    "FittedResidual",
    "ForkKVCollator",
    "ForkKVTrainer",
    "TrainingContext",
    "context_kv",
    "copy_adapter",
    "forkkv_distill_loss",
    "forkkv_logits",
    "forkkv_loss",
]
