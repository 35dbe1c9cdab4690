"""The records a recipe trains and evaluates on, and what they are in words.

* Training records: ``dataset`` (the train split of a bundled dataset, a directory saved by
  ``DatasetDict.save_to_disk`` or a data folder ``datasets`` reads, or a file), less the records
  ``val_size`` and ``zo.guard.select_size`` hold out.
* Evaluation records: ``eval_dataset`` (of one with splits: its dev, validation or test split, or
  its only one); else the records ``val_size`` holds out of ``dataset`` (LLaMA-Factory's key: a
  fraction or a count, drawn with ``seed``, never trained on); else ``dataset``'s dev or validation
  split.  A ``dataset`` with none of these and no ``val_size`` holds out :data:`DEFAULT_VAL_SIZE`
  (10%) and says so (:meth:`DataSplits.notes`); ``val_size: 0`` holds out nothing, and such a
  dataset is then not evaluated.
* The guard's records (``zo.guard.select_size``, with ``zo.guard.watch: eval``): held out of
  ``dataset`` after val_size's records, from the same seeded order, never trained on; the guard
  judges them instead of the evaluation records, whose scores are then not selected on.
* ``max_train_samples`` / ``max_eval_samples`` keep a random subset drawn with a fixed seed: the
  same records for every run, seed and resume (a larger cap keeps a smaller one's records).
* lr-find's records (:attr:`DataSplits.tune`): a fixed random slice of the evaluation records on
  which lr-find ranks learning rates; with ``learning_rate: auto`` the run's evaluations leave them
  out, so that no reported score is one the learning rate was chosen on.

Torch-free: ``zopeft validate`` describes the splits too.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol

from .data import TABLE_FORMATS, load_records, named_splits
from .hints import did_you_mean
from .recipe import Recipe, RecipeError

__all__ = ["DEFAULT_VAL_SIZE", "LR_FIND_RECORDS", "SPLITS", "DataSplits", "Split"]

DEFAULT_VAL_SIZE = 0.1  # held out of a local dataset that has no eval_dataset and no val_size
SUBSET_SEED = 0  # max_train_samples / max_eval_samples: the same subset whatever the run's seed
LR_FIND_RECORDS = 32  # lr-find ranks on this many evaluation records (at most a quarter of them, at least 4)
LR_FIND_SEED = 1  # ... drawn in this fixed order, whatever the run's seed
SPLITS = ("dev", "train", "select")  # the evaluation records, the training records, the guard's records
DATASET_EVAL_SPLITS = ("dev", "validation", "valid", "val", "eval")  # no eval_dataset, no val_size: the first dataset has
EVAL_DATASET_SPLITS = (*DATASET_EVAL_SPLITS, "test")  # of eval_dataset: the first it has, else its only split



class RecordCheck(Protocol):
    """What a record must hold (a :class:`zopeft.tasks.Task` is one): ``check`` raises KeyError / ValueError."""

    kind: str

    def check(self, record: dict) -> None: ...


@dataclass(frozen=True)
class Split:
    """Records and what they are: ``my_test.jsonl (200 records)``."""

    records: list[dict]
    description: str

    def fingerprint(self) -> str:
        """A short hash of the records, content and order: what a checkpoint was trained on."""
        return hashlib.sha256(json.dumps(self.records, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _subset(records: list[dict], cap: int | None, key: str) -> tuple[list[dict], str]:
    """A fixed random subset of at most ``cap`` records (in file order) and its count in words."""
    if cap is None or cap >= len(records):
        return records, f"{len(records)} records"
    order = list(range(len(records)))
    random.Random(SUBSET_SEED).shuffle(order)
    return [records[i] for i in sorted(order[:cap])], f"{cap} of {len(records)} records: {key}, a fixed random subset"


class DataSplits:
    """The train and eval splits of a recipe, read when first used.

    Each file's records are checked once as they are read: all of them, or the first ``checked``;
    a record that does not fit is one :class:`RecipeError` line naming the key, file and record.
    """

    def __init__(self, recipe: Recipe, task: RecordCheck | None = None, checked: int | None = None) -> None:
        self.recipe, self.task, self.checked = recipe, task, checked

    @cached_property
    def _splits(self) -> dict[str, tuple[str, ...]]:
        """The named splits of dataset's and eval_dataset's sources (a bundled dataset, a DatasetDict, a data folder)."""
        return {key: named_splits(getattr(self.recipe, key)) for key in ("dataset", "eval_dataset")}

    def _eval_split(self, key: str) -> str | None:
        """The split of ``key``'s source evaluated on, or None (see :data:`DATASET_EVAL_SPLITS`)."""
        splits, wanted = self._splits[key], EVAL_DATASET_SPLITS if key == "eval_dataset" else DATASET_EVAL_SPLITS
        found = next((s for s in wanted if s in splits), None)
        if found is None and key == "eval_dataset" and splits:
            if len(splits) > 1:
                raise RecipeError([f"eval_dataset: {getattr(self.recipe, key)!r} has splits {', '.join(splits)}, none of "
                                   f"them {', '.join(wanted)}: save the split to evaluate on as its own dataset"])
            return splits[0]
        return found

    @cached_property
    def _train_split(self) -> str | None:
        return "train" if self._splits["dataset"] else None

    @property
    def _dataset_name(self) -> str:
        return self._name("dataset", self._train_split)

    def _name(self, key: str, split: str | None) -> str:
        name = Path(getattr(self.recipe, key)).name  # a bundled dataset's name is its own
        return f"{name} {split} split" if split else name

    def _load(self, key: str, split: str | None) -> list[dict]:
        """The records of ``split`` of ``key``'s source (None: a file), each checked against the task."""
        source = getattr(self.recipe, key)
        table = split is None and str(source).lower().endswith(TABLE_FORMATS)  # column_names names its columns
        records = load_records(source, split, self.recipe.column_names if table else None)
        where = f"{source!r} ({split} split)" if split else repr(source)
        if not records:
            raise RecipeError([f"{key}: {where} has no records"])
        for i, record in enumerate(records[: self.checked] if self.task is not None else []):
            try:
                self.task.check(record)
            except (KeyError, ValueError) as err:
                raise RecipeError([f"{key}: record {i} of {where} does not fit task {self.task.kind}: {err.args[0]}"]) from None
        return records

    @cached_property
    def _dataset(self) -> list[dict]:
        return self._load("dataset", self._train_split)

    @property
    def val_size(self) -> int | float:
        """The recipe's ``val_size``, else the default: 10% of a dataset without an eval split or eval_dataset, else 0."""
        if self.recipe.val_size is not None:
            return self.recipe.val_size
        return DEFAULT_VAL_SIZE if self.recipe.eval_dataset is None and self._eval_split("dataset") is None else 0

    def _count(self, size: int | float) -> int:
        return size if isinstance(size, int) else math.ceil(size * len(self._dataset))

    @cached_property
    def _held_out_order(self) -> list[int]:
        """Positions in ``dataset`` in the order of ``seed``: val_size takes the first, select_size the next."""
        n, select_size = len(self._dataset), self.recipe.zo.guard.select_size
        count = self._count(self.val_size) + (self._count(select_size) if select_size else 0)
        if count >= n:
            default = "" if self.recipe.val_size is not None or not self.val_size else f" (val_size's default, {DEFAULT_VAL_SIZE})"
            keys = " and zo.guard.select_size" if select_size else ""
            raise RecipeError([f"val_size{keys}: holding out {count} of the {n} records of "
                               f"{self._dataset_name}{default} leaves none to train on; lower "
                               f"val_size{keys} or give eval_dataset"])
        order = list(range(n))
        random.Random(self.recipe.seed).shuffle(order)
        return order

    @cached_property
    def held_out(self) -> list[int]:
        """Positions in ``dataset`` of the records held out for evaluation (drawn with ``seed``)."""
        return sorted(self._held_out_order[: self._count(self.val_size)]) if self.val_size else []

    @cached_property
    def held_for_selection(self) -> list[int]:
        """Positions in ``dataset`` of the records the guard judges (``zo.guard.select_size``, after val_size's)."""
        size = self.recipe.zo.guard.select_size
        if not size:
            return []
        first = len(self.held_out)
        return sorted(self._held_out_order[first: first + self._count(size)])

    @cached_property
    def train(self) -> Split:
        """The records trained on."""
        held, selection = set(self.held_out), set(self.held_for_selection)
        records = [r for i, r in enumerate(self._dataset) if i not in held and i not in selection]
        records, count = _subset(records, self.recipe.max_train_samples, "max_train_samples")
        more = [f"{len(held)} more held out for evaluation"] if held else []
        more += [f"{len(selection)} for the guard to judge"] if selection else []
        return Split(records, f"{self._dataset_name} ({'; '.join([count, *more])})")

    @cached_property
    def select(self) -> Split | None:
        """The records the guard judges instead of the eval set (``zo.guard.select_size``), or None."""
        if not self.held_for_selection:
            return None
        records = [self._dataset[i] for i in self.held_for_selection]
        return Split(records, f"{self._dataset_name}, held out by zo.guard.select_size "
                              f"{self.recipe.zo.guard.select_size} with seed {self.recipe.seed} ({len(records)} records)")

    @cached_property
    def _evaluation(self) -> tuple[list[dict], str] | None:
        """All the evaluation records (lr-find's among them) and what they are, or None."""
        if self.recipe.eval_dataset is not None:
            split = self._eval_split("eval_dataset")
            records, name = self._load("eval_dataset", split), self._name("eval_dataset", split)
        elif self.held_out:
            records = [self._dataset[i] for i in self.held_out]
            name = f"{self._dataset_name}, held out by val_size {self.val_size} with seed {self.recipe.seed}"
        elif (split := self._eval_split("dataset")) is not None:
            records, name = self._load("dataset", split), self._name("dataset", split)
        else:
            return None
        records, count = _subset(records, self.recipe.max_eval_samples, "max_eval_samples")
        return records, f"{name} ({count}"

    @cached_property
    def _tuned_on(self) -> list[int]:
        """Positions among the evaluation records of lr-find's (fixed: the same for every run, seed and resume)."""
        records = self._evaluation[0] if self._evaluation else []
        count = min(LR_FIND_RECORDS, len(records) // 4)
        if count < 4:
            return []
        order = list(range(len(records)))
        random.Random(LR_FIND_SEED).shuffle(order)
        return sorted(order[:count])

    @cached_property
    def tune(self) -> Split | None:
        """The evaluation records lr-find ranks learning rates on, or None (no evaluation records, or under 16)."""
        if not self._tuned_on:
            return None
        records, name = self._evaluation
        return Split([records[i] for i in self._tuned_on], f"{name}: {len(self._tuned_on)} of them, a fixed random "
                                                           "slice for lr-find)")

    @cached_property
    def eval(self) -> Split | None:
        """The records evaluated on, or None (a local dataset with ``val_size: 0`` and no eval_dataset); with
        ``learning_rate: auto``, without lr-find's."""
        if self._evaluation is None:
            return None
        records, name = self._evaluation
        if self.recipe.learning_rate != "auto" or not self._tuned_on:
            return Split(records, f"{name})")
        tuned = set(self._tuned_on)
        return Split([r for i, r in enumerate(records) if i not in tuned],
                     f"{name}, less the {len(tuned)} lr-find ranks learning rates on)")

    def split(self, name: str) -> Split:
        """``dev`` (the evaluation records), ``train`` (the training records), ``select`` (the guard's), or
        another named split of ``dataset`` (a saved DatasetDict's ``test``, say)."""
        if name not in SPLITS:
            named = [s for s in self._splits["dataset"] if s not in SPLITS and s != self._train_split]
            if name in named:
                records, count = _subset(self._load("dataset", name), self.recipe.max_eval_samples, "max_eval_samples")
                return Split(records, f"{self._name('dataset', name)} ({count})")
            more = f"; {self._name('dataset', None)} also has {', '.join(named)}" if named else ""
            raise RecipeError([f"split: {name!r} is not one of {', '.join(SPLITS)} (dev: the evaluation records, "
                               f"train: the training records, select: the records the guard judges){more}"
                               f"{did_you_mean(name, [*SPLITS, *named])}"])
        if name == "train":
            return self.train
        if name == "select":
            if self.select is None:
                raise RecipeError(["split select: the recipe holds out no records for the guard; set "
                                   "zo.guard.select_size (with zo.guard.watch: eval)"])
            return self.select
        if self.eval is None:
            raise RecipeError([f"split dev: {self._dataset_name} has no evaluation records (val_size: 0 "
                               "and no eval_dataset); set val_size or eval_dataset, or evaluate the train split"])
        return self.eval

    def load(self) -> DataSplits:
        """Read (and check) the records of every split now; returns ``self``."""
        _ = self.train, self.eval, self.select, self.tune
        return self

    def notes(self) -> list[str]:
        """One line each for what the recipe leaves implicit: a default held-out slice, no evaluation, scores on trained-on records."""
        recipe, notes = self.recipe, []
        if recipe.val_size is None and self.held_out:
            notes.append(f"val_size: {self._dataset_name} has no dev or validation split and no eval_dataset is given: "
                         f"{len(self.held_out)} of its {len(self._dataset)} records ({DEFAULT_VAL_SIZE:.0%}, drawn with "
                         f"seed {recipe.seed}) are held out for evaluation, never trained on; set val_size (0: none) "
                         "or eval_dataset to choose")
        if self.eval is None:
            notes.append(f"val_size: 0 and no eval_dataset: {self._dataset_name} is trained on in full "
                         "and nothing is evaluated")
        if (recipe.eval_dataset is not None and Path(recipe.eval_dataset).resolve() == Path(recipe.dataset).resolve()
                and self._eval_split("eval_dataset") == self._train_split):
            notes.append(f"eval_dataset: {self._dataset_name} is also the training file: its scores are "
                         "on records the model is trained on")
        return notes
