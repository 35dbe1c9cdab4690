"""``zopeft lr-find``: short runs over a log-spaced grid of learning rates, from the same start.

ZO training is sensitive to the learning rate, and a short run can mislead: in the convergence
race MeZO's best short-run learning rate (1e-3) reached the target first and then diverged in every
seed, while the next one down (3e-4) did not.  So the finder runs every learning rate of the grid
for a small budget (``fraction`` of the recipe's forward passes) from the same initial adapter, on
the same batches, and measures the loss (or the recipe's objective) on a fixed probe set of
training examples before and after.  A run *diverged* if its probe value is non-finite or rose by
more than ``DIVERGED`` (relative), or its smoothed step loss rose by more than ``SPIKE`` above its
start, or an update was refused as non-finite; it *stalled* if more than half its steps were
skipped (the loss no longer responds to the perturbations: σ or the difference is 0).  The
recommendation is one grid step below the largest learning rate that improved the probe value
with neither - a margin against the late divergence a short run cannot see.  First, on the first
batch, it checks that zo.eps is above the forward pass's rounding (:mod:`zopeft.optim.eps_check`):
at a noisy ε every learning rate trains on a noisier estimate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from .components import (
    adapter_spec, batch_indices, make_optimizer, model_spec, objective, torch_threads, training_batch, training_data,
    zo_closure,
)
from .models import load_model
from .recipe import Recipe

__all__ = ["DIVERGED", "SPIKE", "LRFindResult", "lr_find"]

DIVERGED = 0.2  # probe value up by more than 20%: diverged
SPIKE = 0.5  # smoothed step loss 50% above its start: diverged
_SMOOTHING = 0.8


@dataclass
class LRFindResult:
    """The grid's runs and the recommended learning rate (``None`` if no learning rate improved)."""

    rows: list[dict[str, Any]]
    recommended: float | None
    steps: int
    forward_passes_per_run: int
    probe_examples: int
    eps_check: dict[str, Any]  # zopeft.optim.eps_check.EpsCheck.to_dict() at the recipe's zo.eps, on the first batch
    rule: str = field(default=(
        "one grid step below the largest learning rate whose probe value improved without diverging (a non-finite "
        f"step, probe up > {DIVERGED:.0%} or smoothed step loss > {SPIKE:.0%} above its start) or stalling (over "
        "half its steps skipped)"
    ))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def grid(center: float, points: int, span: float) -> list[float]:
    """``points`` log-spaced learning rates from ``center / span`` to ``center * span``."""
    if points < 2 or span <= 1:
        return [center]
    return [center * span ** (2 * i / (points - 1) - 1) for i in range(points)]


def lr_find(
    recipe: Recipe, *, fraction: float = 0.1, points: int = 7, span: float = 30.0,
    echo: Callable[[str], None] = print, progress: bool = True,
) -> LRFindResult:
    """Run the recipe briefly at each learning rate of :func:`grid` around its own; see the module docstring."""
    if not recipe.is_zeroth_order:
        raise ValueError(f"zo.optimizer: lr-find runs ZO optimizers; {recipe.zo.optimizer} is the first-order baseline")
    with torch_threads(recipe):
        return _find(recipe, fraction, points, span, echo, progress)


def _find(
    recipe: Recipe, fraction: float, points: int, span: float, echo: Callable[[str], None], progress: bool
) -> LRFindResult:
    task, data = training_data(recipe)
    train_records = data.train.records
    target = objective(recipe, task)
    torch.manual_seed(recipe.seed)
    model, tokenizer = load_model(model_spec(recipe), adapter_spec(recipe))
    model.eval()
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def reset() -> None:
        """The trainable tensors back to their loaded values."""
        for name, p in model.named_parameters():
            if name in start:
                p.copy_(start[name])

    def closure(records: list[dict]) -> Any:
        return zo_closure(model, training_batch(task, records, tokenizer, model, target is not None), target)

    n = len(train_records)
    steps = max(1, round(fraction * recipe.max_steps))
    # four batches from beyond the short runs: training examples the runs (mostly) do not see
    probe = [train_records[i] for s in range(steps, steps + 4) for i in batch_indices(recipe, s, 0, n)]

    @torch.no_grad()
    def probe_value() -> float:
        size = recipe.per_device_train_batch_size
        values = [float(closure(probe[i : i + size])()) for i in range(0, len(probe), size)]
        return sum(values) / len(values)

    checker = make_optimizer(recipe, model)
    evals = len(checker.evaluations())
    check = checker.check_eps(closure([train_records[i] for i in batch_indices(recipe, 0, 0, n)]))
    echo(("" if check.ok else "warning: ") + check.line())
    rates = grid(recipe.learning_rate, points, span)
    echo(f"lr-find: {len(rates)} learning rates x {steps} steps ({steps * evals} forward passes each, "
         f"{fraction:.0%} of the recipe's {recipe.max_steps} steps); probe: {len(probe)} training examples")
    bar = tqdm(total=len(rates) * steps, disable=not progress, unit="step", dynamic_ncols=True)
    rows = []
    for lr in rates:
        reset()
        opt = make_optimizer(recipe.model_copy(update={"learning_rate": lr}), model)
        before = probe_value()
        smoothed, peak = None, -math.inf
        for step in range(steps):
            records = [train_records[i] for i in batch_indices(recipe, step, 0, n)]
            loss = opt.step(closure(records))
            smoothed = loss if smoothed is None else _SMOOTHING * smoothed + (1 - _SMOOTHING) * loss
            peak = max(peak, smoothed) if math.isfinite(smoothed) else math.inf
            bar.update(1)
        after = probe_value()
        initial = opt.loss_at_theta(opt.step_log[0]["losses"]) if opt.step_log else before  # where `smoothed` began
        refused = sum(r.get("skipped", "").startswith("non-finite") for r in opt.step_log)
        diverged = (refused > 0 or not math.isfinite(after) or after > before + DIVERGED * abs(before)
                    or peak > initial + SPIKE * abs(initial))
        stalled = not diverged and opt.skipped_steps > steps / 2  # the loss stopped responding to perturbations
        rows.append({"lr": lr, "probe_before": before, "probe_after": after, "change": after - before,
                     "status": "diverged" if diverged else "stalled" if stalled else "ok",
                     "skipped_steps": opt.skipped_steps})
    bar.close()
    reset()  # leave the model as it was loaded
    improving = [i for i, r in enumerate(rows) if r["status"] == "ok" and r["change"] < 0]
    recommended = rows[max(improving[-1] - 1, 0)]["lr"] if improving else None
    return LRFindResult(rows, recommended, steps, steps * evals, len(probe), check.to_dict())
