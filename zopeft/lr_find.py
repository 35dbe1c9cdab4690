"""``zopeft lr-find`` and ``learning_rate: auto``: successive halving over a log-spaced grid of learning rates.

ZO training is sensitive to the learning rate, and the loss can fall while what the run is for
(accuracy) falls too.  So the finder starts every learning rate of a grid from the same adapter on
the run's own first batches and halves the field in rungs (successive halving, Jamieson and
Talwalkar 2016): each rung trains the survivors until they have taken twice the steps of the rung
before, evaluates them and keeps the better half, until the last two are compared.  They are ranked
by the evaluation metric (``metric_for_best_model``: accuracy for classification), ties by the
eval loss, on lr-find's slice of the evaluation records (:attr:`zopeft.splits.DataSplits.tune`,
which a run with ``learning_rate: auto`` does not report); a recipe without evaluation records
ranks by the loss (or ``zo.objective``) on four batches of training records the short runs do not
train on.  A learning rate is dropped as *diverged* at a step refused as non-finite, a non-finite
value, or a smoothed step loss more than :data:`SPIKE` above its start, and as *stalled* when over
half its steps were skipped (the loss no longer responds to the perturbations).  Of the last two,
the smaller learning rate is recommended when its metric is within one standard error of the
other's (the one-standard-error rule: a short run cannot see the late divergence of a learning
rate that is merely lucky on a few records).

Everything it does is paid from a budget, ``budget`` (25%) of the run's forward passes (max_steps
x the method's loss evaluations a step x gradient_accumulation_steps): the steps, the evaluations
(in forward passes of a training batch: the sequences the model ran over
``per_device_train_batch_size``, a generated one counting
:data:`~zopeft.costs.GENERATION_FORWARD_EQUIVALENTS`, its prefill and its cached decoding
steps, as the benchmarks count it) and the ε check (:mod:`zopeft.optim.eps_check`, when the run
would run it).  The grid's points and the first rung's steps are the most that fit, preferring
:data:`MIN_STEPS` steps a learning rate to more points.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from .components import (
    adapter_spec, batch_indices, checks_eps, make_optimizer, model_spec, objective, step_batches, torch_threads,
    train_step, training_batch, training_data, zo_closure,
)
from .costs import GENERATION_FORWARD_EQUIVALENTS
from .models import load_model
from .objectives import Objective
from .recipe import Recipe
from .resolved import LR_FIND_BUDGET, resolve_run
from .splits import DataSplits

__all__ = ["AUTO_GRID", "MIN_STEPS", "SPIKE", "BudgetError", "LRFindResult", "grid", "lr_find", "rungs", "search"]

SPIKE = 0.5  # smoothed step loss 50% above its start: diverged
MIN_STEPS = 2  # the first rung's steps a learning rate, before the grid loses points
AUTO_GRID = (1e-3, 100.0)  # learning_rate: auto: the grid's centre and span (1e-5 to 1e-1)
PROBE_BATCHES = 4  # without evaluation records: training batches the short runs do not train on
_SMOOTHING = 0.8


class BudgetError(ValueError):
    """The budget cannot pay for two learning rates of one step and their evaluations (the message says why)."""


@dataclass
class LRFindResult:
    """The learning rates tried, the one recommended (``None``: every one diverged or stalled) and the cost."""

    rows: list[dict[str, Any]]  # per learning rate: lr, status, steps, and each rung's evaluation
    recommended: float | None
    ranked_by: str  # what the learning rates were ranked by, on which records
    start: dict[str, float]  # that value (and the loss) before any step
    rungs: list[int]  # learning rates trained in each rung
    first_rung_steps: int  # steps a learning rate in the first rung; each rung doubles them
    spent: dict[str, int]  # forward passes: training, evaluation, eps_check, total
    run_forward_passes: int  # the run's: max_steps x loss evaluations a step x gradient_accumulation_steps
    budget: float  # the share of them lr-find may spend
    eps_check: dict[str, Any] | None  # zopeft.optim.eps_check.EpsCheck.to_dict() at the recipe's zo.eps, if run
    improved: bool  # whether the recommended learning rate beat the start
    rule: str = field(default=(
        "successive halving: every rung trains the surviving learning rates to twice the steps of the rung before and "
        "keeps the better half by the evaluation metric (ties: the loss); diverged (a non-finite step or value, or the "
        f"smoothed step loss > {SPIKE:.0%} above its start) and stalled (over half the steps skipped) ones are dropped; "
        "of the last ones, the smallest within one standard error of the best is recommended"))

    @property
    def fraction(self) -> float:
        """What it spent, as a share of the run's forward passes."""
        return self.spent["total"] / self.run_forward_passes

    def summary(self) -> str:
        """``lr-find spent 176 forward passes (...): 24% of the run's 720``."""
        parts = [f"{self.spent['training']} training", f"{self.spent['evaluation']} evaluating"]
        parts += [f"{self.spent['eps_check']} checking zo.eps"] if self.spent["eps_check"] else []
        return (f"lr-find spent {self.spent['total']} forward passes ({', '.join(parts)}): {self.fraction:.0%} of the "
                f"run's {self.run_forward_passes} (budget {self.budget:.0%})")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fraction": self.fraction}


def grid(center: float, points: int, span: float) -> list[float]:
    """``points`` log-spaced learning rates from ``center / span`` to ``center * span``."""
    if points < 2 or span <= 1:
        return [center]
    return [center * span ** (2 * i / (points - 1) - 1) for i in range(points)]


def rungs(points: int) -> list[int]:
    """The learning rates each rung trains: all, then the better half (rounded up), ..., the last two."""
    sizes = [points]
    while sizes[-1] > 2:
        sizes.append(math.ceil(sizes[-1] / 2))
    return sizes


def _step_units(sizes: list[int]) -> int:
    """Steps of the whole schedule per step of the first rung (rung r trains to 2^r times the first rung's steps)."""
    return sizes[0] + sum(size * 2 ** (r - 1) for r, size in enumerate(sizes) if r)


def lr_find(
    recipe: Recipe, *, budget: float = LR_FIND_BUDGET, points: int = 7, span: float = 30.0,
    echo: Callable[[str], None] = print, progress: bool = True,
) -> LRFindResult:
    """Load the recipe's model and :func:`search` learning rates around its own (``learning_rate: auto``: 1e-5 to 1e-1)."""
    if not recipe.is_zeroth_order:
        raise ValueError(f"zo.optimizer: lr-find runs ZO optimizers; {recipe.zo.optimizer} is the first-order baseline")
    with torch_threads(recipe):
        task, data = training_data(recipe)
        recipe = resolve_run(recipe, data)
        target = objective(recipe, task)
        torch.manual_seed(recipe.seed)
        model, tokenizer = load_model(model_spec(recipe), adapter_spec(recipe))
        model.eval()
        try:
            return search(recipe, model, tokenizer, task, data, target, budget=budget, points=points, span=span,
                          echo=echo, progress=progress)
        except BudgetError as error:
            raise ValueError(f"lr-find: {error}; raise max_steps or the budget (--budget)") from None


@dataclass
class _Candidate:
    lr: float
    steps: int = 0
    status: str = "ok"
    skipped: int = 0
    first: float | None = None  # the first step's loss, where the smoothed loss starts
    smoothed: float | None = None
    state: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None  # trainable tensors, optimizer state
    scores: list[dict[str, Any]] = field(default_factory=list)


def _key(score: dict[str, float], greater: bool) -> tuple[float, float]:
    """Larger is better: an evaluation's value (signed by its direction), then its loss."""
    return (score["value"] if greater else -score["value"], -score["loss"])


class _Rows:
    """Counts the sequences the model runs (a forward hook on its input embeddings); the cached decoding steps of a
    generation (one token a row) count together as the rest of its :data:`GENERATION_FORWARD_EQUIVALENTS`."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.count, self._decoding = 0, False
        self._handle = model.get_input_embeddings().register_forward_pre_hook(self._seen)

    def _seen(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        rows, tokens = args[0].shape[0], args[0].shape[-1]
        if tokens > 1:  # whole sequences: a loss, or a generation's prefill
            self.count += rows
        elif not self._decoding:  # the first decoding step after a prefill
            self.count += rows * (GENERATION_FORWARD_EQUIVALENTS - 1)
        self._decoding = tokens == 1

    def close(self) -> None:
        self._handle.remove()


def search(
    recipe: Recipe, model: torch.nn.Module, tokenizer: Any, task: Any, data: DataSplits, target: Objective | None, *,
    budget: float = LR_FIND_BUDGET, points: int = 7, span: float = 30.0, echo: Callable[[str], None] = print,
    progress: bool = True,
) -> LRFindResult:
    """Successive halving on the loaded ``model`` (left as it was); see the module docstring.

    ``recipe`` is resolved (:func:`zopeft.resolved.resolve_run`: its metric and max_steps explicit);
    its ``learning_rate`` is the grid's centre (``auto``: :data:`AUTO_GRID`).  Raises :class:`BudgetError`
    when the budget cannot pay for two learning rates of one step each and their evaluations.
    """
    center, span = AUTO_GRID if recipe.learning_rate == "auto" else (recipe.learning_rate, span)
    probe, runs = _Probe(recipe, model, tokenizer, task, data, target), _Runs(recipe, model, tokenizer, task, data, target)
    spent = {"training": 0, "evaluation": 0, "eps_check": 0}
    checker = make_optimizer(recipe.model_copy(update={"learning_rate": 0.0}), model)
    per_step = len(checker.evaluations()) * recipe.gradient_accumulation_steps
    run_passes = recipe.max_steps * per_step
    eps_check = None
    if checks_eps(recipe):
        check = checker.check_eps(zo_closure(model, probe.first_batch(), target))
        echo(("" if check.ok else "warning: ") + check.line())
        eps_check, spent["eps_check"] = check.to_dict(), check.forward_passes
    baseline, spent["evaluation"] = probe.score()
    echo(f"lr-find: ranking by {probe.describe()}; at the start {probe.format(baseline)}")
    if probe.split is not None and recipe.learning_rate != "auto":
        echo(f"note: lr-find ranks on {len(probe.split.records)} of the evaluation records, which a run at a given "
             "learning rate also reports on; learning_rate: auto leaves them out of the run's evaluations")
    sizes, first_steps = _schedule(budget, run_passes, per_step, spent, points)
    candidates = [_Candidate(lr) for lr in grid(center, sizes[0], span)]
    echo(f"lr-find: {len(candidates)} learning rates from {candidates[0].lr:.3g} to {candidates[-1].lr:.3g}; "
         f"rungs of {', '.join(map(str, sizes))} learning rates trained to "
         f"{', '.join(str(first_steps * 2 ** r) for r in range(len(sizes)))} steps; budget {budget * run_passes:.0f} "
         f"forward passes ({budget:.0%} of the run's {run_passes})")
    try:
        with tqdm(total=first_steps * _step_units(sizes), disable=not progress, unit="step", dynamic_ncols=True) as bar:
            last = _halve(candidates, sizes, first_steps, runs, probe, spent, echo, bar.update)
    finally:
        probe.close()
        runs.restore()  # leave the model as it was loaded
    best = _pick(last, echo)
    improved = best is not None and _key(best.scores[-1], probe.greater) > _key(baseline, probe.greater)
    rows = [{"lr": c.lr, "status": c.status, "steps": c.steps, "skipped_steps": c.skipped, "evaluations": c.scores}
            for c in candidates]
    return LRFindResult(
        rows=rows, recommended=best.lr if best else None, ranked_by=probe.describe(), start=baseline, rungs=sizes,
        first_rung_steps=first_steps, spent={**spent, "total": sum(spent.values())}, run_forward_passes=run_passes,
        budget=budget, eps_check=eps_check, improved=improved,
    )


def _schedule(budget: float, run_passes: int, per_step: int, spent: dict[str, int], points: int) -> tuple[list[int], int]:
    """The rungs and the first rung's steps (:func:`_plan`) that what ``budget`` leaves after ``spent`` pays for, an
    evaluation costing what the first one did; :class:`BudgetError` if not even two learning rates fit."""
    allowed, eval_cost = budget * run_passes, max(spent["evaluation"], 1)
    plan = _plan(allowed - spent["eps_check"] - spent["evaluation"], per_step, eval_cost, points)
    if plan is None:
        raise BudgetError(
            f"{budget:.0%} of the run's {run_passes} forward passes ({allowed:.0f}) cannot pay for two learning rates "
            f"of one step ({per_step} forward passes each) and their evaluations ({eval_cost} each)")
    return plan


def _halve(
    candidates: list[_Candidate], sizes: list[int], first_steps: int, runs: _Runs, probe: _Probe,
    spent: dict[str, int], echo: Callable[[str], None], advanced: Callable[[int], Any],
) -> list[_Candidate]:
    """Train and rank the rungs (rung r: the first ``sizes[r]`` survivors to ``first_steps * 2**r`` steps, keeping the
    better half); returns the last rung's learning rates that neither diverged nor stalled, best first."""
    alive = candidates
    for rung, size in enumerate(sizes):
        for cand in alive[:size]:
            spent["training"] += runs.advance(cand, first_steps * 2 ** rung, advanced)
            if cand.status == "ok":
                score, cost = probe.score()
                spent["evaluation"] += cost
                cand.scores.append({"rung": rung + 1, "steps": cand.steps, **score})
                cand.status = _status(cand, score)
            echo(f"lr-find: lr {cand.lr:.3g} after {cand.steps} steps: "
                 + (probe.format(cand.scores[-1]) if cand.scores and cand.status == "ok" else cand.status))
        ranked = sorted((c for c in alive[:size] if c.status == "ok"),
                        key=lambda c: _key(c.scores[-1], probe.greater), reverse=True)
        alive = ranked[: math.ceil(size / 2)] if rung + 1 < len(sizes) else ranked
        if rung + 1 < len(sizes) and alive:
            echo(f"lr-find: rung {rung + 1}/{len(sizes)}: keeping {', '.join(f'{c.lr:.3g}' for c in alive)}")
    return alive


def _pick(ranked: list[_Candidate], echo: Callable[[str], None]) -> _Candidate | None:
    """The one-standard-error rule: of the last rung's learning rates (best first), the smallest whose value is
    within one standard error of the best's (the best itself where the metric has none)."""
    if not ranked:
        return None
    best = ranked[0].scores[-1]
    close = [c for c in ranked if best.get("stderr") and abs(c.scores[-1]["value"] - best["value"]) <= best["stderr"]]
    pick = min(close, key=lambda c: c.lr) if close else ranked[0]
    if pick is not ranked[0]:
        echo(f"lr-find: {pick.lr:.3g} is within one standard error ({best['stderr']:.3g}) of {ranked[0].lr:.3g}, the "
             "best: the smaller learning rate is recommended (a short run cannot see a late divergence)")
    return pick


def _plan(left: float, per_step: int, eval_cost: int, points: int) -> tuple[list[int], int] | None:
    """The rungs and the first rung's steps that fit ``left`` forward passes: the most points (3 or more) with at
    least :data:`MIN_STEPS` steps, else the most with one step; None if not even two learning rates fit."""
    fits = []
    for n in range(max(points, 2), 1, -1):
        sizes = rungs(n)
        steps = int((left - sum(sizes) * eval_cost) // (_step_units(sizes) * per_step))
        if steps >= 1:
            fits.append((sizes, steps))
    preferred = [fit for fit in fits if fit[1] >= MIN_STEPS and fit[0][0] >= 3]
    return (preferred or fits or [None])[0]


class _Runs:
    """The short runs on the loaded model: each candidate continues from its own trainable tensors and optimizer state,
    the first from the model's as loaded (:meth:`restore` puts those back)."""

    def __init__(self, recipe: Recipe, model: torch.nn.Module, tokenizer: Any, task: Any, data: DataSplits,
                 target: Objective | None) -> None:
        self.recipe, self.model, self.tokenizer, self.task, self.data, self.target = (
            recipe, model, tokenizer, task, data, target)
        self.trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.start = {n: p.detach().clone() for n, p in self.trainable.items()}

    def _load(self, values: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, p in self.trainable.items():
                p.copy_(values[name])

    def restore(self) -> None:
        """Put the trainable tensors back as they were loaded."""
        self._load(self.start)

    def advance(self, cand: _Candidate, until: int, advanced: Callable[[int], Any]) -> int:
        """Train ``cand`` from where it stopped to ``until`` steps on the run's batches (``advanced(1)`` after each
        step); returns the forward passes."""
        recipe = self.recipe
        self._load(cand.state[0] if cand.state else self.start)
        opt = make_optimizer(recipe.model_copy(update={"learning_rate": cand.lr}), self.model)
        if cand.state:
            opt.load_state_dict(cand.state[1])
        passes = opt.forward_passes
        for step in range(cand.steps, until):
            batches = step_batches(recipe, self.task, self.data.train.records, step, self.tokenizer, self.model,
                                   self.target is not None)
            stats = train_step(opt, self.model, batches, self.target)
            cand.steps = step + 1
            advanced(1)
            loss = float(stats["loss"])
            if str(stats.get("skipped", "")).startswith("non-finite") or not math.isfinite(loss):
                cand.status = "diverged"
                break
            cand.first = loss if cand.first is None else cand.first
            cand.smoothed = loss if cand.smoothed is None else _SMOOTHING * cand.smoothed + (1 - _SMOOTHING) * loss
            if cand.smoothed > cand.first + SPIKE * abs(cand.first):
                cand.status = "diverged"
                break
        cand.skipped = opt.skipped_steps
        cand.state = ({n: p.detach().clone() for n, p in self.trainable.items()}, opt.state_dict())
        return opt.forward_passes - passes


def _status(cand: _Candidate, score: dict[str, float]) -> str:
    if not (math.isfinite(score["value"]) and math.isfinite(score["loss"])):
        return "diverged"
    return "stalled" if cand.skipped > cand.steps / 2 else "ok"


class _Probe:
    """What ranks the learning rates: the evaluation metric on lr-find's slice of the evaluation records, else the
    loss (or objective) on training batches beyond the short runs; each score with its cost in forward passes."""

    def __init__(self, recipe: Recipe, model: torch.nn.Module, tokenizer: Any, task: Any, data: DataSplits,
                 target: Objective | None) -> None:
        self.recipe, self.model, self.tokenizer, self.task, self.target = recipe, model, tokenizer, task, target
        self.records, self.split = data.train.records, data.tune
        self.metric = recipe.metric_for_best_model if self.split is not None else "loss"
        self.greater = bool(recipe.greater_is_better) if self.split is not None else False
        self.rows = _Rows(model)
        n, size = len(self.records), recipe.per_device_train_batch_size
        beyond = recipe.max_steps  # no short run gets that far
        self.batches = [[self.records[i] for i in batch_indices(recipe, beyond + b, 0, n)]
                        for b in range(PROBE_BATCHES)] if self.split is None else []
        self.size = size

    def first_batch(self) -> Any:
        records = [self.records[i] for i in batch_indices(self.recipe, 0, 0, len(self.records))]
        return training_batch(self.task, records, self.tokenizer, self.model, self.target is not None)

    def describe(self) -> str:
        if self.split is not None:
            return f"eval {self.metric} on {self.split.description}"
        what = "loss" if self.target is None else f"zo.objective {self.recipe.zo.objective}"
        return (f"the {what} on {PROBE_BATCHES * self.size} training records the short runs do not train on (no "
                "evaluation records to rank by)")

    def format(self, score: dict[str, float]) -> str:
        if self.split is None:
            return f"{self.metric} {score['value']:.4f}"
        return f"{self.metric} {score['value']:.4f}, loss {score['loss']:.4f}"

    @torch.no_grad()
    def score(self) -> tuple[dict[str, float], int]:
        """``{"value", "loss"}`` of the model as it is, and the forward passes (of a training batch) it took."""
        before = self.rows.count
        if self.split is not None:
            metrics = self.task.evaluate(self.model, self.tokenizer, self.split.records,
                                         batch_size=self.recipe.per_device_eval_batch_size)
            score = {"value": float(metrics[self.metric]), "loss": float(metrics["loss"]),
                     "stderr": metrics.get(f"{self.metric}_stderr")}
        else:
            values = [float(zo_closure(self.model, training_batch(self.task, batch, self.tokenizer, self.model,
                                                                  self.target is not None), self.target)())
                      for batch in self.batches]
            value = sum(values) / len(values)
            score = {"value": value, "loss": value}
        return score, math.ceil((self.rows.count - before) / self.size)

    def close(self) -> None:
        self.rows.close()
