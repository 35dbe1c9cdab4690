"""``learning_rate: auto``: the run's learning rate, picked by lr-find before its first step.

A new run searches (:func:`zopeft.lr_find.search`) on its loaded model with at most
:data:`~zopeft.resolved.LR_FIND_BUDGET` of its forward passes, ranking by the evaluation metric on
the evaluation records it then does not report (:attr:`zopeft.splits.DataSplits.tune`).  The run
saves its recipe with ``learning_rate: auto`` and the pick as ``lr_find_pick`` (so that evaluating or
resuming by it leaves out the same records), logs lr-find's result (an ``lr_find`` record at step 0)
and counts its forward passes in the run's.  A recipe that records a pick, and a resumed run (its
checkpoint's), train at that pick without searching: :func:`known_learning_rate` settles it, or
refuses a search under torchrun, before the model loads.
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
from .recipe import Recipe, RecipeError
from .rundir import RECIPE_NAME, checkpoint_recipe
from .splits import DataSplits

__all__ = ["LearningRate", "find_learning_rate", "known_learning_rate"]


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


def known_learning_rate(recipe: Recipe, checkpoint: Path | None, world_size: int,
                        echo: Callable[[str], None]) -> LearningRate | None:
    """Before the model loads: the recipe's learning rate, the pick it records (``lr_find_pick``) or, resumed with
    ``auto``, its checkpoint's; None where lr-find must search, which is refused under torchrun."""
    if recipe.learning_rate != "auto":
        return LearningRate(recipe)
    if recipe.lr_find_pick is not None:
        echo(f"learning_rate: auto: {recipe.lr_find_pick:g}, picked by lr-find before (the recipe's lr_find_pick)")
        return LearningRate(recipe)
    if checkpoint is not None:
        pick = checkpoint_recipe(checkpoint).lr_find_pick
        if pick is None:
            raise RecipeError([f"lr_find_pick: {checkpoint / RECIPE_NAME} says learning_rate: auto without the pick "
                               "its run trained at; restore it, or start a new output_dir"])
        echo(f"learning_rate: auto: {pick:g}, picked by lr-find when this run started ({checkpoint / RECIPE_NAME})")
        return LearningRate(recipe.model_copy(update={"lr_find_pick": pick}))
    if world_size > 1:
        raise RecipeError(["learning_rate: auto runs lr-find in one process; run `zopeft lr-find RECIPE --write-recipe "
                           "tuned.yaml` and launch tuned.yaml under torchrun"])
    return None


def find_learning_rate(
    recipe: Recipe, model: torch.nn.Module, tokenizer: Any, task: Any, data: DataSplits, target: Objective | None,
    echo: Callable[[str], None], progress: bool,
) -> LearningRate:
    """lr-find's pick for ``learning_rate: auto`` (the model left as it was)."""
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
    if not found.improved:
        echo(f"warning: learning_rate: auto: no learning rate lr-find tried beat the start ({found.ranked_by}), so it "
             f"took the smallest of those level with the best; at {lr:g} the run will stay close to its start, and the "
             "best model kept may be the start itself; to train anyway, set learning_rate")
    return LearningRate(recipe.model_copy(update={"lr_find_pick": lr}), found, time.perf_counter() - began)
