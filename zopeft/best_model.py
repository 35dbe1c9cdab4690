"""Keep the best model: the adapter of the best evaluation in ``output_dir/checkpoint-best/``, left in output_dir.

The HF Trainer's ``load_best_model_at_end``, ``metric_for_best_model`` and ``greater_is_better``
for a run: every evaluation that beats the best so far (strictly) writes the adapter it evaluated
to ``checkpoint-best/`` (atomically, as checkpoints are; not one of the ``checkpoint-N`` that
``save_total_limit`` rotates), with ``recipe.yaml`` (``zopeft eval`` / ``merge`` take the
directory) and ``best.json``: the step, the metric and its value, the eval scores of that step and
a fingerprint of the records judged.  At the end the run puts those weights back before it saves
output_dir's adapter, so ``zopeft merge`` and ``zopeft eval --adapter RUN`` use them, and logs a
``best_model`` record: which step they came from and what the last step scored.  Each checkpoint
records the best so far (step and value); a resumed run continues from the ``best.json`` of its
checkpoint's run (copied over when that run is another directory's) when it is that best (or the
checkpoint's own adapter, as the run's last evaluation judged it), judged on the same records by
the same metric, and otherwise tracks the best afresh.
"""

from __future__ import annotations

import filecmp
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .checkpoint import check_safetensors
from .jsonl import dumps
from .recipe import Recipe
from .rundir import BEST_NAME, LOG_NAME, RECIPE_NAME, RunDir, load_weights, read_jsonl

__all__ = ["BEST_FILE", "BestModel", "best_line", "kept_adapter", "kept_steps", "selection_note"]

BEST_FILE = "best.json"


class BestModel:
    """The best evaluation of a run so far and its adapter in ``checkpoint-best/``.

    Args:
        run: the run's output directory.
        recipe: the run's recipe (resolved: ``metric_for_best_model`` and ``greater_is_better`` set).
        judged: ``eval`` or ``select`` (``zo.guard.select_size``'s records): whose metric is compared.
        records: the fingerprint of those records (:meth:`zopeft.splits.Split.fingerprint`).
    """

    def __init__(self, run: RunDir, recipe: Recipe, judged: str, records: str, echo: Callable[[str], None]) -> None:
        self.run, self.path, self.recipe, self.records, self.echo = run, run.path / BEST_NAME, recipe, records, echo
        self.name = str(recipe.metric_for_best_model)
        self.metric = f"{judged}_{self.name}"  # as the training log names it
        self.greater = bool(recipe.greater_is_better)
        self.best: dict[str, Any] | None = None  # best.json

    def record(self) -> dict[str, Any] | None:
        """The best so far as a checkpoint records it (its step and value; None: none yet)."""
        return None if self.best is None else {"step": self.best["step"], "value": self.best["value"]}

    def resume(self, checkpoint: Path, state: dict[str, Any]) -> None:
        """Continue from the best that the run of ``checkpoint`` knew (``state``: its trainer_state.json, with the
        :meth:`record` of its step) if its output_dir's checkpoint-best/ still holds that one, or the checkpoint's
        own adapter as the run's last evaluation judged it (copied here when that is another directory), judged on
        these records by this metric; else track the best afresh and say why."""
        source = checkpoint.parent / BEST_NAME
        if not (source / BEST_FILE).is_file():
            return
        try:
            saved = json.loads((source / BEST_FILE).read_text())
            problem = self._unlike(source, saved, checkpoint, state)
        except (ValueError, KeyError, TypeError) as err:  # damaged or edited by hand: as if absent
            problem = f"{BEST_FILE} is unreadable: {type(err).__name__}: {err}"
        if problem:
            self.echo(f"best model: not continuing from {BEST_NAME}/ ({problem}); the best is tracked afresh")
            return
        if source.resolve() != self.path.resolve():
            with self.run.directory(BEST_NAME) as tmp:
                shutil.copytree(source, tmp, dirs_exist_ok=True)
        self.best = saved
        self.echo(f"best model: so far the adapter of step {saved['step']} ({self.metric} {saved['value']:.4g}, "
                  f"in {source})")

    def _unlike(self, source: Path, saved: dict[str, Any], checkpoint: Path, state: dict[str, Any]) -> str | None:
        """Why ``saved`` (``source``'s best.json) is not the best the resumed ``checkpoint`` knew, or None."""
        weights = sorted(source.glob("*.safetensors"))
        damaged = next((p for p in map(check_safetensors, weights) if p), None) if weights else f"{source} has no weights"
        if damaged:
            return damaged
        if (saved["metric"], saved["greater_is_better"], saved["records"]) != (self.metric, self.greater, self.records):
            return "it was judged by another metric or on other records"
        known = state.get("best_model")
        if known is not None and (saved["step"], saved["value"]) == (known["step"], known["value"]):
            return None
        if saved["step"] == state["global_step"] and _same_weights(weights, checkpoint):
            return None  # the run's last evaluation, after its last checkpoint, of that checkpoint's adapter
        recorded = ("no best" if known is None
                    else f"the best as step {known['step']} ({self.metric} {known['value']:.4g})")
        return (f"it holds the adapter of step {saved['step']}, and {checkpoint.name} records {recorded}: the run went "
                "on from there another way")

    def better(self, value: float) -> bool:
        """Whether ``value`` beats the best so far (strictly; a non-finite value never does)."""
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        return value > self.best["value"] if self.greater else value < self.best["value"]

    def observe(self, step: int, judged: dict[str, Any], reported: dict[str, Any], model: torch.nn.Module,
                rollbacks: int = 0) -> None:
        """Keep the model's adapter if its evaluation ``judged`` beats the best; ``reported``: the eval scores;
        ``rollbacks``: the guard's so far (replay repeats those and the steps before ``step``)."""
        value = judged.get(self.name)
        if value is None or not self.better(float(value)):
            return
        self.best = {"step": step, "metric": self.metric, "value": float(value), "greater_is_better": self.greater,
                     "records": self.records, "rollbacks": rollbacks, "eval": reported}
        with self.run.directory(BEST_NAME) as tmp:
            model.save_pretrained(tmp)
            (tmp / RECIPE_NAME).write_text(self.recipe.to_yaml())
            (tmp / BEST_FILE).write_text(dumps(self.best, indent=1))

    def keep(self, model: torch.nn.Module, last_step: int, last: dict[str, Any]) -> dict[str, Any] | None:
        """At the end: put the best adapter back into ``model`` (unless it is the last step's); return what was kept
        (``step``, ``metric``, ``value``, ``last_step``, ``last_value``, ``eval``) or None (nothing evaluated)."""
        if self.best is None:
            return None
        if self.best["step"] != last_step:
            load_weights(self.path, model)
        return {"step": self.best["step"], "metric": self.metric, "value": self.best["value"], "last_step": last_step,
                "last_value": last.get(self.name), "rollbacks": self.best.get("rollbacks", 0), "eval": self.best["eval"]}


def _same_weights(weights: list[Path], directory: Path) -> bool:
    """Whether ``directory`` holds each of the ``weights`` files, byte for byte."""
    return all((directory / w.name).is_file() and filecmp.cmp(w, directory / w.name, shallow=False) for w in weights)


def kept_steps(run: RunDir, records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int | None]:
    """The step records (``zo_steps.jsonl``) that made the adapter a finished run left in its output_dir, and its
    step when that is not the last (its ``best_model`` record): the steps before it and the guard's rollbacks made
    before its evaluation.  Otherwise all the records, and None."""
    kept = [r["best_model"] for r in read_jsonl(run.path / LOG_NAME) if "best_model" in r]
    if not kept or kept[-1]["step"] == kept[-1]["last_step"]:
        return records, None
    step, rollbacks = kept[-1]["step"], kept[-1].get("rollbacks", 0)
    rolled, made = 0, []
    for record in records:
        rolled += "rollback_to" in record
        if rolled <= rollbacks if "rollback_to" in record else record["step"] < step:
            made.append(record)
    return made, step


def kept_adapter(kept: dict[str, Any]) -> str:
    """``the adapter of step 40, eval_accuracy 0.8300; the last step, 80, scored 0.5100``: the adapter kept
    (:meth:`BestModel.keep`) when it is not the last step's, and what the last step scored."""
    step, metric, value = kept["step"], kept["metric"], kept["value"]
    adapter = (f"the untrained adapter of step 0, {metric} {value:.4f}, which no later evaluation beat" if step == 0
               else f"the adapter of step {step}, {metric} {value:.4f}")
    scored = "" if kept["last_value"] is None else f" {kept['last_value']:.4f}"
    return f"{adapter}; the last step, {kept['last_step']}, scored{scored}"


def best_line(kept: dict[str, Any]) -> str:
    """``best model: ...``: which step's adapter output_dir holds, and what the last step scored."""
    metric, step = kept["metric"], kept["step"]
    if step == kept["last_step"]:
        return f"best model: the last step's adapter ({metric} {kept['value']:.4f} at step {step}) is the best"
    return f"best model: output_dir holds {kept_adapter(kept)} (load_best_model_at_end)"


def selection_note(kept: dict[str, Any] | None) -> str | None:
    """Said after the final evaluation when the adapter kept is a later step than the start and not the last, chosen
    by the very records that evaluation reports (no ``zo.guard.select_size``): the best of several scores of the
    same records overstates what other records would give."""
    if kept is None or kept["step"] in (0, kept["last_step"]) or not kept["metric"].startswith("eval_"):
        return None
    return ("that score is of the adapter the same records chose (the best of the run's evaluations of them), so it "
            "overstates what other records would give; zo.guard.select_size (e.g. 0.1) chooses on records held out of "
            "dataset instead, and the evaluation then reports records nothing chose")
