"""Evaluate several perturbed adapter points on one batch in one batched forward pass.

FZOO evaluates the loss at N+1 points (θ and θ + ε·uᵢ) on the *same* batch.  With an
adapter, the points differ only in the small adapter tensors, so the N+1 forwards can
share the expensive frozen base: the batch is replicated R times along the batch
dimension (replica-major: rows ``[r·b, (r+1)·b)`` are replica ``r``) and every adapter
module computes its output with the replica's own tensors.  One forward then runs one
large base matmul (one dequantization of a 4/8-bit weight) instead of R small ones.

Usage — build the closure with :func:`loss_closure` instead of a lambda::

    closure = zopeft.loss_closure(model, batch)
    opt.step(closure)            # FZOO: batched where supported, else sequential

Calling the closure is the sequential closure (``model(**batch).loss``, projected onto the
vocabulary only where labels are); its :meth:`BatchedLoss.losses` method is what an
optimizer with ``batched=True`` uses.

The rooms, as PEFT splits its tuners:

* :mod:`.closure` — the closure and the dispatch: chunks of replicas, out-of-memory halving,
  fallback to the sequential loop (logged once, as a warning, with the reason);
* :mod:`.generation` — the same for an objective of greedy generations: the replicas' prompts
  in one ``generate`` call, each replica's KV cache its own;
* :mod:`.plan` — which modules get per-replica tensors (checks on the model and the batch);
* :mod:`.loss` — each replica's loss, as the model's own (causal LM: cross-entropy at the
  labelled positions, the LM head run in chunks; sequence classification);
* :mod:`.memory` — how many replicas one forward pass may carry;
* :mod:`.adapters` — one module per adapter kind: LoRA (on plain, 4-bit and 8-bit bases,
  with ``lora_bias``), IA³, prefix tuning, prompt tuning and ``modules_to_save`` copies
  (``nn.Linear`` / ``nn.Embedding``, e.g. a classification head).

Exactness: the replicas' values for all tensors are one ``[R, P]`` matrix per flat buffer
of the optimizer (:meth:`zopeft.optim.points.Points.stack`), row r the very values the
sequential path writes into the model; the model's weights are never written.  The losses
agree with the sequential ones to fp32 rounding (different kernel shapes).

Anything else (full-parameter ZO, DoRA and other LoRA variants, LoRA on
embeddings/convolutions, encoder-decoder models, a model in training mode, batches with
loss-changing keys such as ``num_items_in_batch``) falls back to the sequential loop.
"""

from .closure import (
    BatchedLoss, MetricClosure, PointSource, batched_support, candidate_loss, loss_closure, metric_closure,
)
from .generation import GenerationClosure, generation_closure
from .loss import prompt_learning_type, takes_logit_mask

__all__ = [
    "BatchedLoss", "GenerationClosure", "MetricClosure", "PointSource", "batched_support", "candidate_loss",
    "generation_closure", "loss_closure", "metric_closure", "prompt_learning_type", "takes_logit_mask",
]
