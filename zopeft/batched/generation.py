"""An objective of greedy generations as a closure: the N+1 points' generations in one ``generate`` call.

The prompts are replicated R times (row ``r·B + b`` is replica r of prompt b) and every adapter
module computes replica r's rows with point r's values (:mod:`.adapters`), through the prefill and
every cached decoding step; greedy decoding makes each replica's tokens those its point generates
alone.  Where that cannot run (see :mod:`zopeft.batched`), the optimizer generates point by point
with the one WARNING of the other fallbacks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..generation import GenerationBatch, check_generates, greedy_generate
from ..objectives import GENERATION_OBJECTIVES, GenerationObjective, resolve_generation_objective
from .adapters.base import applied
from .closure import BatchedLoss, PointSource
from .plan import Plan, generation_plan

__all__ = ["GenerationClosure", "generation_closure"]


def generation_closure(
    model: nn.Module, batch: GenerationBatch,
    objective: str | Callable[[list[str], list[dict]], float] = "f1", *, perturbation_batch_size: int | None = None,
) -> GenerationClosure:
    """A closure whose "loss" is an objective of the model's greedy generations for ``batch``'s prompts.

    Args:
        model: a causal LM (PEFT-wrapped: LoRA, IA3, prompt tuning; prefix tuning is refused, see
            :class:`GenerationClosure`).
        batch: from :func:`zopeft.generation_batch` or a generation task's ``generation_batch``.
        objective: ``"f1"`` or ``"exact_match"`` (1 − the mean SQuAD score), ``"python:module:function"``
            or a callable ``(generations, records) -> float`` to minimise.
        perturbation_batch_size: replicas per ``generate`` call (default: the optimizer's, else
            automatic from free memory, the KV cache included).
    """
    if not isinstance(batch, GenerationBatch):
        raise TypeError(f"generation_closure: batch must be a GenerationBatch (zopeft.generation_batch(tokenizer, "
                        f"prompts, answers), or a generation task's generation_batch), got a {type(batch).__name__}")
    resolved = resolve_generation_objective(objective)
    if resolved in GENERATION_OBJECTIVES.values() and not all(batch.answers):
        raise ValueError(f"generation_closure: objective {objective} scores against gold answers, and the batch has a "
                         "prompt without any: pass answers to zopeft.generation_batch")
    return GenerationClosure(model, batch, resolved, perturbation_batch_size=perturbation_batch_size)


class GenerationClosure(BatchedLoss):
    """An objective of greedy generations (see :func:`generation_closure`).

    Calling it generates at the model's current weights; :meth:`losses` generates at many points
    in few ``generate`` calls.  PEFT 0.21's prefix tuning is refused (:func:`zopeft.generation.check_generates`).
    """

    def __init__(
        self, model: nn.Module, batch: GenerationBatch, objective: GenerationObjective, *,
        perturbation_batch_size: int | None = None,
    ) -> None:
        check_generates(model)
        super().__init__(model, batch.inputs, perturbation_batch_size=perturbation_batch_size)
        self.generation, self.objective = batch, objective

    def __call__(self) -> torch.Tensor:
        """The objective of the generations at the model's current weights (a 0-dim tensor; NaN if it failed)."""
        return torch.tensor(self._value(greedy_generate(self.model, self.generation)))

    def _value(self, tokens: Sequence[Sequence[int]]) -> float:
        return float(self.objective(self.generation.texts(tokens), self.generation))

    def _plan(self, optimizer: PointSource) -> Plan:
        return generation_plan(self.model, optimizer.points.tensors, self.batch, self.generation.max_new_tokens)

    def _run(self, plan: Plan, optimizer: PointSource, evaluations: Sequence[Any]) -> list[float]:
        replicas, rows = len(evaluations), len(self.generation)
        stack = optimizer.points.stack(optimizer.step_index, evaluations)
        with applied(plan.patches(stack, replicas)):
            tokens = greedy_generate(self.model, self.generation, replicas)
        values: list[float] = []
        for r in range(replicas):  # up to the first non-finite value, as the sequential loop
            values.append(self._value(tokens[r * rows : (r + 1) * rows]))
            if not math.isfinite(values[-1]):
                break
        return values
