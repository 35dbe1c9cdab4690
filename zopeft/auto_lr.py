"""``learning_rate: auto``: the run's learning rate, picked by lr-find before its first step.

A new run searches (:func:`zopeft.lr_find.search`) on its loaded model with at most
:data:`~zopeft.resolved.LR_FIND_BUDGET` of its forward passes, ranking by the evaluation metric on
the evaluation records it then does not report (:attr:`zopeft.splits.DataSplits.tune`); a resumed
run takes the learning rate its checkpoint's ``recipe.yaml`` recorded.  The run saves its recipe
with that number, logs lr-find's result (an ``lr_find`` record at step 0) and counts its forward
passes in the run's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .lr_find import BudgetError, LRFindResult, search
from .objectives import Objective
from .recipe import Recipe, RecipeError, load_recipe
from .rundir import RECIPE_NAME
from .splits import DataSplits

__all__ = ["LearningRate", "choose_learning_rate"]


@dataclass
class LearningRate:
    """The recipe with the learning rate to train at, and lr-find's result when this run searched for it."""

    recipe: Recipe
    found: LRFindResult | None = None
    seconds: float = 0.0  # what finding it took

    @property
    def forward_passes(self) -> int:
        """What finding it cost (0: given, or taken from the checkpoint)."""
        return self.found.spent["total"] if self.found else 0


def choose_learning_rate(
    recipe: Recipe, checkpoint: Path | None, world_size: int, model: torch.nn.Module, tokenizer: Any, task: Any,
    data: DataSplits, target: Objective | None, echo: Callable[[str], None], progress: bool,
) -> LearningRate:
    """The recipe's learning rate, or for ``auto`` the checkpoint's, or lr-find's pick (the model left as it was)."""
    if recipe.learning_rate != "auto":
        return LearningRate(recipe)
    if checkpoint is not None:
        lr = load_recipe(checkpoint / RECIPE_NAME, check_files=False).learning_rate
        echo(f"learning_rate: auto: {lr:g}, picked by lr-find when this run started ({checkpoint / RECIPE_NAME})")
        return LearningRate(recipe.model_copy(update={"learning_rate": lr}))
    if world_size > 1:
        raise RecipeError(["learning_rate: auto runs lr-find in one process; run `zopeft lr-find RECIPE --write-recipe "
                           "tuned.yaml` and launch tuned.yaml under torchrun"])
    began = time.perf_counter()
    try:
        found = search(recipe, model, tokenizer, task, data, target, echo=echo, progress=progress)
    except BudgetError as error:
        raise RecipeError([f"learning_rate: auto: lr-find's {error}; raise max_steps, or give learning_rate a number"]
                          ) from None
    if found.recommended is None:
        tried = ", ".join("{:.3g}: {}".format(row["lr"], row["status"]) for row in found.rows)
        raise RecipeError([f"learning_rate: auto: every learning rate lr-find tried diverged or stalled ({tried}); "
                           "set learning_rate"])
    lr = float(f"{found.recommended:.3g}")
    note = "" if found.improved else "; no learning rate beat the start"
    echo(f"learning_rate: auto: {lr:g} ({found.summary()}{note})")
    return LearningRate(recipe.model_copy(update={"learning_rate": lr}), found, time.perf_counter() - began)
