"""Rebuild a ZO run from its seed log, without a forward pass (``zopeft replay``).

A zeroth-order step is a pure function of the run seed, the step, its learning rates and its
losses: the noise is regenerated from the seed.  ``zo_steps.jsonl`` keeps those few numbers for
every step, so a run is its recipe plus that log: the adapter is initialised as training
initialised it (same seed) and a fresh optimizer re-applies every logged step
(:meth:`zopeft.ZOOptimizer.replay`), up to the step whose adapter the run left in its output_dir
(an earlier one under ``load_best_model_at_end``: :mod:`zopeft.best_model`).  Run it on the kind of
device the run trained on (the noise is drawn on the tensors' device).  The log's lines carry chained
checksums (:mod:`zopeft.jsonl`) and its first step the seed and a fingerprint of the starting weights,
so a damaged, edited or truncated log, or a recipe edited since, is refused before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .best_model import kept_steps
from .checkpoint import atomic_directory
from .components import adapter_spec, make_optimizer, model_spec
from .jsonl import LogError, read_checked
from .models import load_model
from .optim.step_records import RecordError, checked_records
from .recipe import Recipe, RecipeError
from .rundir import (
    LOG_NAME, RECIPE_NAME, STATE_NAME, STEP_LOG_NAME, RunDir, check_output_target, checkpoint_problem, read_jsonl,
)

__all__ = ["replay_run"]


def replay_run(run_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Rebuild the adapter of the run in ``run_dir`` from its recipe and step log; write it to ``out_dir``.

    Everything is checked before ``out_dir`` is written: the log's lines (their checksums; a log
    written before zopeft had them gets a note instead), its values, that it reaches the run's
    last checkpoint (and, for a finished run, its last step), and that the recipe's model,
    adapter and seed give the weights and seed the log started from.  Returns ``{"steps",
    "out_dir", "compared", "identical", "notes", "kept_step"}``: ``steps`` replayed (up to
    ``kept_step`` when the run left the adapter of that earlier step, else all), ``compared`` the
    run's own adapter when the log covers the whole run (its tensors are compared bit for bit), else None.
    """
    run, out_dir = RunDir(run_dir), Path(out_dir)
    recipe = run.recipe()
    if not recipe.is_zeroth_order:
        raise RecipeError([f"zo.optimizer: {run.path} was trained with {recipe.zo.optimizer} (first-order), which "
                           "leaves no seed log; only ZO runs can be replayed"])
    records, notes = _read_log(run.path / STEP_LOG_NAME)
    steps = [r["step"] for r in records if "rollback_to" not in r]  # a guard's rollbacks are records too
    if not steps or steps != list(range(len(steps))):
        raise RecipeError([f"{run.path / STEP_LOG_NAME}: missing or not one record per step from step 0 "
                           "(written by zopeft train for ZO runs); this run cannot be replayed"])
    saved = sorted(run.path.glob("adapter_model.safetensors")) or sorted(run.path.glob("model*.safetensors"))
    _check_complete(run, len(steps), finished=bool(saved))
    check_output_target(out_dir, overwrite=overwrite, written_by="zopeft replay", keep=[run.path])
    first = records[0]  # where the log started (checked below, before a kept earlier step cuts it)
    records, kept = kept_steps(run, records)
    steps = steps if kept is None else steps[:kept]
    torch.manual_seed(recipe.seed)  # the adapter's initialisation, as in training
    model, tokenizer = load_model(model_spec(recipe), adapter_spec(recipe))
    opt = make_optimizer(recipe, model)
    _check_start(run, recipe, first, opt.points.fingerprint())
    try:
        opt.replay(records)
    except ValueError as err:
        raise RecipeError([f"{run.path / STEP_LOG_NAME}: {err}"]) from None
    with atomic_directory(out_dir, "zopeft replay") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / RECIPE_NAME).write_text(recipe.to_yaml())
    compared = saved[0].parent if saved else None  # the run's final weights (written when it finished)
    identical = None
    if compared is not None:
        theirs, ours = _weights(saved), _weights([out_dir / f.name for f in saved])
        identical = theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    return {"steps": len(steps), "out_dir": str(out_dir), "compared": compared, "identical": identical, "notes": notes,
            "kept_step": kept}


def _read_log(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The step log's records, checked line by line and value by value; notes for a log without checksums."""
    if not path.is_file():
        return [], []
    try:
        records, checked = read_checked(path)
        records = checked_records(records)
    except LogError as err:
        raise RecipeError([f"{err}: this log cannot be replayed"]) from None
    except RecordError as err:  # a value that is not what a step log holds
        raise RecipeError([f"{path}: line {err.index + 1} {err.problem}: the log was edited or damaged and cannot "
                           "be replayed"]) from None
    notes = [] if checked else [
        f"{path.name} has no line checksums (written by zopeft 0.2.0 or earlier): its lines cannot be verified "
        "before the replay; the result is compared with the run's adapter after it"]
    return records, notes


def _check_complete(run: RunDir, steps: int, *, finished: bool) -> None:
    """Refuse a log that ends before the run's last checkpoint or, for a finished run, before its last step."""
    reached = [(c.name, json.loads((c / STATE_NAME).read_text())["global_step"])
               for c in run.checkpoints() if checkpoint_problem(c) is None]
    if finished:
        logged = [r["step"] for r in read_jsonl(run.path / LOG_NAME) if isinstance(r.get("step"), int)]
        reached += [(LOG_NAME, max(logged))] if logged else []
    where, step = max(reached, key=lambda x: x[1], default=(None, 0))
    if step > steps:
        raise RecipeError([f"{run.path / STEP_LOG_NAME}: ends after step {steps}, but {where} records step {step}: "
                           "the log was cut short (truncated) and cannot rebuild the run"])


def _check_start(run: RunDir, recipe: Recipe, first: dict[str, Any], fingerprint: int) -> None:
    """Refuse a recipe whose seed, model or adapter differ from those the log started from (recipe.yaml edited?)."""
    if "seed" in first and first["seed"] != recipe.seed:
        raise RecipeError([f"seed: {run.path / RECIPE_NAME} says {recipe.seed}, but {STEP_LOG_NAME} was recorded "
                           f"with seed {first['seed']}: restore the run's seed in its recipe.yaml"])
    if "start" in first and first["start"] != fingerprint:
        raise RecipeError([
            f"model_name_or_path: the model and adapter that {run.path / RECIPE_NAME} builds "
            f"({recipe.model_name_or_path}, {recipe.finetuning_type}) are not the weights {STEP_LOG_NAME} started from "
            f"(fingerprint {fingerprint}, the log's {first['start']}): restore the run's model_name_or_path and "
            "adapter keys in its recipe.yaml"
        ])


def _weights(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors
