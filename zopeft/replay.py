"""Rebuild a ZO run from its seed log, without a forward pass (``zopeft replay``).

A zeroth-order step is a pure function of the run seed, the step, its learning rates and its
losses: the noise is regenerated from the seed.  ``zo_steps.jsonl`` keeps those few numbers for
every step, so a run is its recipe plus that log: the adapter is initialised as training
initialised it (same seed) and a fresh optimizer re-applies every logged step
(:meth:`zopeft.ZOOptimizer.replay`), up to the step whose adapter the run left in its output_dir
(an earlier one under ``load_best_model_at_end``: :mod:`zopeft.best_model`).  Run it on the kind of device the run trained on
(the noise is drawn on the tensors' device).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .best_model import kept_steps
from .checkpoint import atomic_directory
from .components import adapter_spec, make_optimizer, model_spec
from .models import load_model
from .recipe import RecipeError
from .rundir import RECIPE_NAME, STEP_LOG_NAME, RunDir, check_output_target

__all__ = ["replay_run"]


def replay_run(run_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Rebuild the adapter of the run in ``run_dir`` from its recipe and step log; write it to ``out_dir``.

    Returns ``{"steps", "out_dir", "compared", "identical", "kept_step"}``: ``steps`` replayed (up to
    ``kept_step`` when the run left the adapter of that earlier step, else all), ``compared`` the run's own
    adapter when the log covers the whole run (its tensors are compared bit for bit), else None.
    """
    run, out_dir = RunDir(run_dir), Path(out_dir)
    recipe = run.recipe()
    if not recipe.is_zeroth_order:
        raise RecipeError([f"zo.optimizer: {run.path} was trained with {recipe.zo.optimizer} (first-order), which "
                           "leaves no seed log; only ZO runs can be replayed"])
    records = run.step_records()
    steps = [r["step"] for r in records if "rollback_to" not in r]  # a guard's rollbacks are records too
    if not steps or steps != list(range(len(steps))):
        raise RecipeError([f"{run.path / STEP_LOG_NAME}: missing or not one record per step from step 0 "
                           "(written by zopeft train for ZO runs); this run cannot be replayed"])
    check_output_target(out_dir, overwrite=overwrite, keep=[run.path])
    records, kept = kept_steps(run, records)
    steps = steps if kept is None else steps[:kept]
    torch.manual_seed(recipe.seed)  # the adapter's initialisation, as in training
    model, tokenizer = load_model(model_spec(recipe), adapter_spec(recipe))
    make_optimizer(recipe, model).replay(records)
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / RECIPE_NAME).write_text(recipe.to_yaml())
    saved = sorted(run.path.glob("adapter_model.safetensors")) or sorted(run.path.glob("model*.safetensors"))
    compared = saved[0].parent if saved else None  # the run's final weights (written when it finished)
    identical = None
    if compared is not None:
        theirs, ours = _weights(saved), _weights([out_dir / f.name for f in saved])
        identical = theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    return {"steps": len(steps), "out_dir": str(out_dir), "compared": compared, "identical": identical,
            "kept_step": kept}


def _weights(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors
