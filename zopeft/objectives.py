"""Training objectives besides the loss: the candidates' cross-entropy, and what only zeroth-order training can
optimise: accuracy, a clipped margin, F1 of generations, or any Python function.

A ZO step needs one number per perturbed point, so the objective need not be differentiable.
Each objective maps the candidates' scores of a batch - log-probabilities ``(examples,
candidates)`` of the label words, answer choices or classes - and the gold indices to a number
to *minimise*:

* ``candidate_ce``: the cross-entropy of the gold candidate under a softmax over the candidates'
  scores, mean over examples: the loss the MeZO, FZOO and AdaMeZO reference code train every
  classification task on (``train_as_classification``).  Unlike the language-model loss over the
  whole vocabulary, it rewards only choosing the right candidate, not making the candidates likely
  words; it is differentiable, so the first-order baseline trains on it too (:func:`candidate_loss`
  in :mod:`zopeft.batched`);
* ``accuracy``: the error rate, 1 − mean(argmax = gold);
* ``margin``: mean over examples of clip(best other score − gold score, −1, 1): a smooth
  surrogate of the error that saturates once an example is right (or wrong) by 1 nat;
* ``python:module:function``: ``function(scores, gold) -> float``, e.g. a reward.

Generation tasks (:class:`zopeft.tasks.GenerationTask`) have objectives of their own, of the
greedy generations of each point (:func:`zopeft.generation_closure`):

* ``f1`` / ``exact_match``: 1 − the mean SQuAD F1 / exact match against the gold answers;
* ``python:module:function``: ``function(generations: list[str], records: list[dict]) -> float``.

A user's function, of either kind, that raises or returns no number makes that point's value NaN:
the step is skipped and counted, as for a NaN loss, a WARNING says why the first time, and
:func:`objective_failures` sums it up after a run.

A discrete objective is often flat: when all of a step's points give the same value FZOO's σ (or
MeZO's difference) is 0 and the step is skipped (counted in ``skipped_steps``).  Two things make
it so: a small batch (with 4 examples the error rate takes five values) and, more often, a
perturbation too small to flip any prediction.  On the demo (SmolLM2-135M, LoRA, batches of 16)
``accuracy`` skipped 36 of 40 FZOO steps at eps 1e-3 and 5 of 40 at eps 1e-2, which trained it
from 55% to 82%.  Use eps ≥ 1e-2 and batches of 16 or more for ``accuracy``, or ``margin``, which
moves with every score (:func:`flat_objective_warning` says so after a run).

:class:`CandidateBatch` holds what the scores are computed from (see :func:`zopeft.candidate_batch`
and :meth:`zopeft.tasks.Task.candidate_batch`); :func:`zopeft.metric_closure` makes an objective
a closure for ``opt.step``, batched over the perturbed points like :func:`zopeft.loss_closure`
(the scores come from :class:`zopeft.batched.loss.CandidateScores`).  This module does not
import torch, so that recipes can be validated without it.
"""

from __future__ import annotations

import importlib
import logging
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .hints import did_you_mean
from .squad_metrics import best_over_answers, exact_match, f1

if TYPE_CHECKING:
    import torch

    from .generation import GenerationBatch

__all__ = [
    "DIFFERENTIABLE", "DISCRETE", "GENERATION_OBJECTIVES", "OBJECTIVES", "CandidateBatch", "GenerationObjective",
    "Objective", "accuracy_error", "candidate_cross_entropy", "clipped_margin", "exact_match_error", "f1_error",
    "flat_objective_warning", "objective_failures", "resolve_generation_objective", "resolve_objective",
    "small_eps_note",
]

logger = logging.getLogger("zopeft")

Objective = Callable[["torch.Tensor", "torch.Tensor"], float]
"""``objective(scores (examples, candidates), gold (examples,)) -> float`` to minimise."""


def candidate_cross_entropy(scores: torch.Tensor, gold: torch.Tensor) -> float:
    """Mean over examples of −log softmax(scores)[gold]: the cross-entropy over the candidates."""
    return float(-scores.log_softmax(-1).gather(1, gold.unsqueeze(1)).mean())


def accuracy_error(scores: torch.Tensor, gold: torch.Tensor) -> float:
    """1 − accuracy of the argmax candidate."""
    return 1.0 - float((scores.argmax(-1) == gold).float().mean())


def clipped_margin(scores: torch.Tensor, gold: torch.Tensor) -> float:
    """Mean of clip(best other score − gold score, −1, 1): negative when right, positive when wrong."""
    gold_score = scores.gather(1, gold.unsqueeze(1)).squeeze(1)
    others = scores.scatter(1, gold.unsqueeze(1), float("-inf")).max(-1).values
    return float((others - gold_score).clamp(-1.0, 1.0).mean())


OBJECTIVES: dict[str, Objective] = {
    "candidate_ce": candidate_cross_entropy, "accuracy": accuracy_error, "margin": clipped_margin,
}
DIFFERENTIABLE = ("loss", "candidate_ce")
"""The ``zo.objective`` values a first-order optimizer (the AdamW baseline) can train on."""


GenerationObjective = Callable[[list[str], "GenerationBatch"], float]
"""``objective(generations, batch) -> float`` to minimise; ``batch.answers`` are the gold answers."""


def f1_error(generations: list[str], batch: GenerationBatch) -> float:
    """1 − the mean SQuAD F1 of the generations (the best over each prompt's gold answers)."""
    return 1.0 - sum(best_over_answers(f1, g, a) for g, a in zip(generations, batch.answers)) / len(generations)


def exact_match_error(generations: list[str], batch: GenerationBatch) -> float:
    """1 − the mean SQuAD exact match of the generations."""
    return 1.0 - sum(best_over_answers(exact_match, g, a) for g, a in zip(generations, batch.answers)) / len(generations)


GENERATION_OBJECTIVES: dict[str, GenerationObjective] = {"f1": f1_error, "exact_match": exact_match_error}


def _user_function(spec: str) -> Callable[..., Any]:
    """The function a ``python:MODULE:FUNCTION`` objective names."""
    module, _, name = spec[len("python:"):].rpartition(":")
    if not module or not name:
        raise ValueError(f"objective {spec!r}: write python:MODULE:FUNCTION, e.g. python:my_rewards:f1")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"objective {spec!r}: cannot import {name} from {module} ({err})") from None
    if not callable(fn):
        raise ValueError(f"objective {spec!r}: {module}.{name} is not callable")
    return fn


def _by_name(spec: str, names: dict[str, Any], others: dict[str, Any], scored: str, others_score: str) -> Any:
    """The objective ``spec`` names in ``names``; one line for a name of the ``others`` kind or a typo."""
    if spec in others:
        raise ValueError(f"objective {spec!r} scores {others_score}; {scored} take {', '.join(names)} or "
                         "python:MODULE:FUNCTION")
    if spec not in names:
        raise ValueError(
            f"unknown objective {spec!r}{did_you_mean(spec, [*names, 'loss'])}"
            f"; choose loss, {', '.join(names)} or python:MODULE:FUNCTION"
        )
    return names[spec]


def resolve_objective(spec: str | Objective) -> Objective:
    """An objective from a name (:data:`OBJECTIVES`), ``python:module:function``, or a callable.

    A function of the user's is checked at every call: one that raises or returns no number skips the step.
    """
    if isinstance(spec, _UserObjective) or spec in OBJECTIVES.values():
        return spec  # type: ignore[return-value]
    if callable(spec):
        return _UserObjective(getattr(spec, "__name__", repr(spec)), spec)
    if spec.startswith("python:"):
        return _UserObjective(spec, _user_function(spec))
    return _by_name(spec, OBJECTIVES, GENERATION_OBJECTIVES, "candidates (label words, answer choices, classes)",
                    "generated answers (task generation)")


def resolve_generation_objective(spec: str | Callable[[list[str], list[dict]], float]) -> GenerationObjective:
    """A generation objective from a name (:data:`GENERATION_OBJECTIVES`), ``python:module:function`` or a
    callable ``(generations, records) -> float`` (a resolved objective is returned as it is)."""
    if isinstance(spec, _UserGenerationObjective) or spec in GENERATION_OBJECTIVES.values():
        return spec  # type: ignore[return-value]
    if callable(spec):
        return _UserGenerationObjective(getattr(spec, "__name__", repr(spec)), spec)
    if spec.startswith("python:"):
        return _UserGenerationObjective(spec, _user_function(spec))
    return _by_name(spec, GENERATION_OBJECTIVES, OBJECTIVES, "generated answers",
                    "candidates (label words, answer choices, classes)")


@dataclass
class _UserFunction:
    """A user's objective: a call that raises or returns anything but one number gives NaN, so the step is
    skipped and counted as for a NaN loss; the failures are counted, the first is logged as a WARNING with the
    contract, and :func:`objective_failures` sums them up after a run."""

    spec: str
    fn: Callable[..., Any]
    contract: str  # how it is called, for the messages
    failures: int = 0
    first_failure: str | None = None

    def value(self, *args: Any) -> float:
        try:
            value = self.fn(*args)
        except Exception as err:  # the user's code: any failure skips the step, never the run
            return self._failed(f"{type(err).__name__}: {err}")
        number = _as_number(value)
        if number is None:
            shown = repr(value) if len(repr(value)) <= 40 else f"{repr(value)[:37]}..."
            return self._failed(f"it returned a {type(value).__name__} ({shown}), not a number")
        return number

    def _failed(self, why: str) -> float:
        self.failures += 1
        if self.first_failure is None:
            self.first_failure = why
            logger.warning("zopeft: objective %s failed (%s); the step is skipped. %s", self.spec, why, self.contract)
        return math.nan


class _UserObjective(_UserFunction):
    """A user's ``(scores, gold) -> float`` (``python:MODULE:FUNCTION`` or a callable)."""

    def __init__(self, spec: str, fn: Objective) -> None:
        super().__init__(spec, fn, "It is called as f(scores, gold): log-probabilities (examples, candidates) and gold "
                                   "indices (examples,); it returns one number to minimise")

    def __call__(self, scores: torch.Tensor, gold: torch.Tensor) -> float:
        return self.value(scores, gold)


class _UserGenerationObjective(_UserFunction):
    """A user's ``(generations, records) -> float``."""

    def __init__(self, spec: str, fn: Callable[[list[str], list[dict]], Any]) -> None:
        super().__init__(spec, fn, "It is called as f(generations, records): the generated answers (list of str) and "
                                   "their records (list of dict); it returns one number to minimise")

    def __call__(self, generations: list[str], batch: GenerationBatch) -> float:
        return self.value(generations, batch.records)


def _as_number(value: Any) -> float | None:
    """``value`` as a float if it is one number (int, float, NumPy scalar, one-element tensor or array), else None."""
    if getattr(value, "ndim", None) is not None and hasattr(value, "item"):  # a tensor or an array
        size = value.numel() if callable(getattr(value, "numel", None)) else value.size
        if size != 1:
            return None
        value = value.item()
    return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else None


def objective_failures(objective: object) -> str | None:
    """What a run says when its user objective failed: how often, the first failure, and the contract."""
    if not isinstance(objective, _UserFunction) or not objective.failures:
        return None
    failures = objective.failures
    return (f"zo.objective {objective.spec} failed {failures} time{'s' * (failures != 1)} (first: "
            f"{objective.first_failure}); a step with a failed point is skipped (counted in skipped_steps). "
            f"{objective.contract}")


@dataclass
class CandidateBatch:
    """Model inputs whose label tokens are candidate continuations, and how rows map to examples.

    ``inputs`` is a model batch (``input_ids``, ``attention_mask``, ``labels``: -100 except on the
    scored tokens).  With ``candidate_tokens`` (single-token candidates) each row is one example
    and its one labelled position is scored on every candidate token; otherwise each row scores
    one candidate of one example (``row_example``, ``row_candidate``) by its tokens' summed
    log-probability (divided by their count where ``length_normalised``).  A sequence classifier
    scores its classes: ``num_candidates`` = number of labels, no candidate tokens.
    """

    inputs: dict[str, torch.Tensor]
    gold: torch.Tensor
    num_candidates: int
    candidate_tokens: torch.Tensor | None = None
    row_example: torch.Tensor | None = None
    row_candidate: torch.Tensor | None = None
    length_normalised: bool = False

    def to(self, device: torch.device | str) -> CandidateBatch:
        """This batch with every tensor on ``device``."""
        move = {k: v.to(device) for k, v in self.inputs.items()}
        opt = {k: getattr(self, k) for k in ("candidate_tokens", "row_example", "row_candidate")}
        return CandidateBatch(move, self.gold.to(device), self.num_candidates,
                              **{k: v.to(device) if v is not None else None for k, v in opt.items()},
                              length_normalised=self.length_normalised)


DISCRETE = ("accuracy", "f1", "exact_match")
"""Objectives whose value changes only where a perturbation changes a prediction or a generated token."""


def small_eps_note(objective: str, eps: float) -> str | None:
    """Before a run: a discrete objective at a perturbation too small to change predictions (most steps skipped)."""
    if objective not in DISCRETE or eps >= 1e-2:
        return None
    return (f"zo.eps: {eps:g} rarely changes a prediction or a generated token, so most steps on zo.objective "
            f"{objective} would be skipped (the README's demo on accuracy skipped 36 of 40 steps at 1e-3, 5 at 1e-2); "
            "set zo.eps: 1e-2 or more")


def flat_objective_warning(skipped: int, steps: int, objective: str, eps: float) -> str | None:
    """What to change when over a quarter of a run's steps were skipped on a discrete objective (not on the loss or
    the candidates' cross-entropy, which move with every score)."""
    if objective in ("loss", "candidate_ce") or steps < 4 or 4 * skipped <= steps:
        return None
    smooth = "loss" if objective in GENERATION_OBJECTIVES else "margin"  # what moves with every weight
    return (f"{skipped} of {steps} steps were skipped: every point of a step gave the same {objective}, so the step "
            f"had no direction; perturbations of zo.eps={eps:g} rarely change a prediction: raise zo.eps (1e-2 or more) "
            f"or per_device_train_batch_size, or use zo.objective: {smooth}")
