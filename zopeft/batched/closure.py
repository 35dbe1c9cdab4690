"""The closure: ``model(**batch).loss`` that can also evaluate many perturbed points in few forward passes."""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from ..objectives import CandidateBatch, Objective, candidate_cross_entropy, resolve_objective
from ..optim.evaluation_log import report_path
from .adapters.base import Unsupported, applied
from .loss import CandidateScores, Criterion, LossPlan, plan_loss
from ..optim.settings import parse_memory
from .memory import replicas_per_pass
from .plan import Plan, build_plan

__all__ = [
    "BatchedLoss", "MetricClosure", "PointSource", "batched_support", "candidate_loss", "loss_closure", "metric_closure",
]

logger = logging.getLogger("zopeft")
_max_replicas: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()  # after an OOM
_failed: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()  # batched forward raised


class PointSource(Protocol):
    """What the batched path reads from an optimizer (:class:`zopeft.ZOOptimizer` provides it)."""

    points: Any  # zopeft.optim.points.Points: tensors and stack(step, points)
    step_index: int
    perturbation_batch_size: int | None
    max_memory: int | str | None

    def evaluation_mode(self, model: nn.Module | None = None) -> Any: ...


def loss_closure(model: nn.Module, batch: Mapping[str, Any], *, perturbation_batch_size: int | None = None) -> BatchedLoss:
    """A closure for ``opt.step``/``opt.estimate`` that also offers batched evaluation.

    Args:
        model: the (PEFT-wrapped) model; ``model(**batch).loss`` is the loss.  Of a
            ``torch.compile``-d model the original module is evaluated (the batched path
            swaps module forwards, which a compiled graph would not see).
        batch: the model's keyword inputs, with ``labels``.
        perturbation_batch_size: replicas (loss evaluations) per forward pass; overrides
            the optimizer's ``perturbation_batch_size``; ``None``: the optimizer's, else
            automatic (see :mod:`zopeft.batched.memory`).
    """
    if not isinstance(batch, Mapping):
        raise TypeError(f"loss_closure: batch must be a mapping of the model's keyword inputs (a tokenizer's output "
                        f"with labels), got a {type(batch).__name__}")
    return BatchedLoss(model, batch, perturbation_batch_size=perturbation_batch_size)


def metric_closure(
    model: nn.Module, batch: CandidateBatch, objective: str | Objective = "accuracy", *,
    perturbation_batch_size: int | None = None,
) -> MetricClosure:
    """A closure whose "loss" is an objective of the candidates' scores (see :mod:`zopeft.objectives`).

    Like :func:`loss_closure`, its points are evaluated as replicas of the batch in few forward
    passes where the model and adapter allow; the objective is computed per replica.

    Args:
        model: a causal LM (label words / answer choices) or a sequence classifier (classes).
        batch: from :func:`zopeft.candidate_batch` or a task's ``candidate_batch``.
        objective: ``"accuracy"``, ``"margin"``, ``"python:module:function"`` or a callable
            ``(scores, gold) -> float`` to minimise.
    """
    if not isinstance(batch, CandidateBatch):
        raise TypeError(f"metric_closure: batch must be a CandidateBatch (zopeft.candidate_batch(tokenizer, prompts, "
                        f"choices, gold), or a task's candidate_batch), got a {type(batch).__name__}")
    return MetricClosure(model, batch, resolve_objective(objective), perturbation_batch_size=perturbation_batch_size)


def candidate_loss(model: nn.Module, batch: CandidateBatch) -> torch.Tensor:
    """The cross-entropy over the candidates at the model's current weights, differentiable: what a
    first-order optimizer trains on for ``zo.objective: candidate_ce`` (the value is that objective's).

    A sequence classifier's candidates are its classes, so its cross-entropy is the model's own loss.
    """
    try:
        plan = plan_loss(model, batch.inputs)
    except Unsupported as exc:
        raise ValueError(f"candidate_loss needs a causal LM or a sequence classifier batch: {exc}") from None
    if plan.kind == "seq_cls":
        return model(**batch.inputs).loss
    labels = batch.inputs["labels"]
    scores = CandidateScores(batch, candidate_cross_entropy, plan.targets(labels), plan.label_rows(labels))
    plan.losses(model, plan.inputs(batch.inputs, 1), labels, 1, scores)
    per_candidate = scores.scores(1)[0]
    return torch.nn.functional.cross_entropy(per_candidate, batch.gold.to(per_candidate.device))


def batched_support(model: nn.Module, optimizer: PointSource, batch: Mapping[str, Any]) -> str | None:
    """``None`` if the batched path supports this model/optimizer/batch, else the reason it does not.

    Checked as the optimizer evaluates (in eval mode where it switches the model to it).
    """
    try:
        with optimizer.evaluation_mode(model):
            build_plan(model, optimizer.points.tensors, batch)
    except Unsupported as exc:
        return str(exc)
    return None


class BatchedLoss:
    """``model(**batch).loss`` as a closure, plus :meth:`losses`: many perturbed losses in few forwards.

    Calling it is the sequential closure: the model's own loss at its current weights, with the
    vocabulary projection run only where labels are, in chunks (see :mod:`zopeft.batched.loss`).
    """

    def __init__(self, model: nn.Module, batch: Mapping[str, Any], *, perturbation_batch_size: int | None = None) -> None:
        if perturbation_batch_size is not None and perturbation_batch_size < 1:
            raise ValueError(f"perturbation_batch_size must be >= 1, got {perturbation_batch_size}")
        self.model = getattr(model, "_orig_mod", model)  # torch.compile(model): its original module
        self.batch = batch
        self.perturbation_batch_size = perturbation_batch_size
        self._replicated: dict[int, dict[str, Any]] = {}
        self._loss_plan: LossPlan | str | None = None  # str: why the model's own loss is used

    def __call__(self) -> torch.Tensor:
        """The loss at the model's current weights (a 0-dim tensor)."""
        plan = self._sequential_plan()
        if isinstance(plan, str) or plan.kind != "causal" or plan.head == "full":
            return self.model(**self.batch).loss  # nothing to save: the model computes the same
        loss = plan.losses(self.model, self._replicate(plan, 1), self.batch["labels"], 1)[0]
        return torch.tensor(loss)

    def _sequential_plan(self) -> LossPlan | str:
        """How one point's loss is computed (worked out once per closure); a string: why it cannot be."""
        if self._loss_plan is None:
            try:
                self._loss_plan = plan_loss(self.model, self.batch)
            except Unsupported as exc:
                self._loss_plan = str(exc)
        return self._loss_plan

    def criterion(self, plan: LossPlan) -> Criterion | None:
        """What each replica's value is computed from (``None``: the model's own loss)."""
        return None

    def losses(self, optimizer: PointSource, evaluations: Sequence[Any]) -> list[float] | None:
        """The loss at each evaluation point, or ``None`` where unsupported (the caller runs the sequential loop).

        ``evaluations`` are the optimizer's points (``(perturbation index, scale)``, or ``None``
        for θ₀); their values come from ``optimizer.points.stack``, bit-identical to what the
        sequential path writes into the model.  Replicas are evaluated in chunks of
        ``perturbation_batch_size`` (automatic if unset, halved after an out-of-memory error).
        After the first chunk with a non-finite loss no further chunk runs; the list then ends
        at that chunk (the optimizer pads it with NaN).
        """
        with optimizer.evaluation_mode(self.model):  # a no-op when the optimizer already did it
            return self._losses(optimizer, evaluations)

    # ----- internals -------------------------------------------------------------------------
    def _losses(self, optimizer: PointSource, evaluations: Sequence[Any]) -> list[float] | None:
        model = self.model
        if model in _failed:
            report_path(optimizer, "sequential", _failed[model], slower=True)
            return None
        try:
            plan = self._plan(optimizer)
        except Unsupported as exc:
            report_path(optimizer, "sequential", f"batched unsupported: {exc}", slower=True)
            return None
        total = len(evaluations)
        chunk = self._chunk_size(optimizer, plan, total)
        report_path(optimizer, "batched", f"{plan.kinds}; {total} points, up to {chunk} replicas of the batch per forward pass")
        out: list[float] = []
        start = 0
        try:
            while start < total:
                evs = evaluations[start : start + chunk]
                try:
                    chunk_losses = self._run(plan, optimizer, evs)
                except torch.OutOfMemoryError:
                    if chunk == 1:
                        raise
                    chunk = max(1, chunk // 2)
                    _max_replicas[model] = chunk
                    logger.warning("out of memory in a batched evaluation; retrying with %d replicas per forward pass", chunk)
                    if plan.device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                out += chunk_losses
                start += len(evs)
                if not all(map(math.isfinite, chunk_losses)):
                    break
        except Unsupported as exc:
            reason = f"batched evaluation unsupported at run time: {exc}"
            _failed[model] = reason
            report_path(optimizer, "sequential", reason, slower=True)
            return None
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - never let the fast path break a run the slow path handles
            reason = f"batched evaluation failed ({type(exc).__name__}: {exc}); using sequential from now on"
            _failed[model] = reason
            report_path(optimizer, "sequential", reason, slower=True)
            return None
        return out

    def _plan(self, optimizer: PointSource) -> Plan:
        """How the optimizer's points are evaluated as replicas; :class:`Unsupported` where they cannot be."""
        return build_plan(self.model, optimizer.points.tensors, self.batch)

    def _chunk_size(self, optimizer: PointSource, plan: Plan, total: int) -> int:
        size = self.perturbation_batch_size or optimizer.perturbation_batch_size
        if not size:
            size = replicas_per_pass(self.model, plan.base.config, plan.device, plan.rows, plan.length,
                                     parse_memory(optimizer.max_memory), plan.cache_rows)
        size = min(size, _max_replicas.get(self.model, total), total)
        chunks = -(-total // size)
        return -(-total // chunks)  # even chunks: 9 points at 8 per forward -> 5 + 4

    def _replicate(self, plan: LossPlan, replicas: int) -> dict[str, Any]:
        """The model inputs of ``replicas`` copies of the batch (at most two sizes: chunks are even)."""
        cached = self._replicated.get(replicas)
        if cached is None:
            cached = self._replicated[replicas] = plan.inputs(self.batch, replicas)
        return cached

    def _run(self, plan: Plan, optimizer: PointSource, evaluations: Sequence[Any]) -> list[float]:
        replicas = len(evaluations)
        stack = optimizer.points.stack(optimizer.step_index, evaluations)
        inputs = self._replicate(plan.loss, replicas)
        with applied(plan.patches(stack, replicas)):
            return plan.loss.losses(self.model, inputs, self.batch["labels"], replicas, self.criterion(plan.loss))


class MetricClosure(BatchedLoss):
    """An objective of the candidates' scores as a closure (see :func:`metric_closure`)."""

    def __init__(
        self, model: nn.Module, batch: CandidateBatch, objective: Objective, *, perturbation_batch_size: int | None = None
    ) -> None:
        super().__init__(model, batch.inputs, perturbation_batch_size=perturbation_batch_size)
        self.candidates, self.objective = batch, objective

    def __call__(self) -> torch.Tensor:
        """The objective at the model's current weights (a 0-dim tensor)."""
        plan = self._sequential_plan()
        if isinstance(plan, str):
            raise ValueError(f"a metric objective needs a causal LM or a sequence classifier batch: {plan}")
        value = plan.losses(self.model, self._replicate(plan, 1), self.batch["labels"], 1, self.criterion(plan))[0]
        return torch.tensor(value)

    def criterion(self, plan: LossPlan) -> Criterion:
        labels = self.batch["labels"]
        if plan.kind == "seq_cls":
            return CandidateScores(self.candidates, self.objective, labels, labels)
        return CandidateScores(self.candidates, self.objective, plan.targets(labels), plan.label_rows(labels))
