"""Run a recipe: train with a ZO (or AdamW) optimizer, evaluate, checkpoint, resume.

This is what ``zopeft train`` and ``zopeft eval`` call.  A run reads setup → train → save:
:mod:`zopeft.components` builds the parts from the recipe, :mod:`zopeft.rundir` owns the
output directory (lock, checkpoints, logs, final adapter), and this module keeps the loop::

    from zopeft.recipe import load_recipe
    from zopeft.runner import train
    result = train(load_recipe("recipes/smollm2_lora_fzoo_sst2.yaml", ["max_steps=20"]))

The data order is a pure function of (seed, step), the noise of (seed, step, perturbation,
tensor), and every checkpoint holds the adapter, the optimizer, scheduler and RNG state: a run
killed at any step and resumed ends with the bit-identical adapter of an uninterrupted run.
Every ZO step's record goes to ``zo_steps.jsonl``, from which :mod:`zopeft.replay` rebuilds it.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from .components import (
    adapter_spec, batch_indices, eval_data, forward_equivalents, make_optimizer, model_spec, objective, torch_threads,
    training_batch, training_data, zo_closure,
)
from .batched import candidate_loss
from .distributed import barrier, distributed_session, from_rank0
from .guard import Guard, rollback_line
from .metrics import EMA, collapse_warning, predicted_counts
from .models import load_adapter_model, load_model, trainable_summary
from .objectives import CandidateBatch, Objective, flat_objective_warning, objective_failures
from .optim.base import ZOOptimizer
from .recipe import Recipe
from .rundir import LOG_NAME, RunDir
from .splits import Split
from .stopping import StopSignals
from .trackers import Trackers

__all__ = ["RunResult", "evaluate", "train"]


@dataclass
class RunResult:
    """What a finished training run reports (times in seconds, of this process: a resumed run's since the resume)."""

    output_dir: Path
    steps: int
    forward_passes: int
    forward_equivalents: int  # forward passes + 2 per backward pass (the AdamW baseline's)
    train_seconds: float  # the steps, with logging and checkpoints, without the evaluations
    eval_seconds: float
    wall_seconds: float  # all of it: checks, loading, training, evaluation, saving
    evaluated_on: str | None = None  # the eval records in words; None: nothing evaluated
    eval_before: dict[str, Any] = field(default_factory=dict)
    eval_after: dict[str, Any] = field(default_factory=dict)
    resumed_from: Path | None = None
    steps_run: int = 0  # the steps this process ran (a resumed run's since the resume)
    skipped: dict[str, int] = field(default_factory=dict)  # those that made no update, by reason (e.g. non-finite loss)


def _logged(metrics: dict[str, Any]) -> dict[str, Any]:
    """An evaluation as the training log keeps it: the numbers and the predicted-label distribution."""
    logged = {k: v for k, v in metrics.items() if k not in ("per_class", "confusion", "generations")}
    return {**logged, "predicted": predicted_counts(metrics)} if "per_class" in metrics else logged


def evaluate(
    recipe: Recipe, *, adapter: str | Path | None = None, split: str = "dev", model: Any = None, tokenizer: Any = None,
) -> dict[str, Any]:
    """Evaluate on a split: the given model, the adapter in ``adapter``, or the recipe's untrained model.

    ``split``: ``dev`` (the evaluation records: :mod:`zopeft.splits`), ``train`` (the records
    trained on), ``select`` (those ``zo.guard.select_size`` holds out for the guard) or another
    named split of ``dataset`` (``test`` of a DatasetDict or data folder).  Returns
    ``evaluated_on`` (those records in words), ``split`` and the task's metrics.  The records are
    checked against the task format before any model is loaded.
    """
    task, data = eval_data(recipe, split)
    with torch_threads(recipe):
        if model is None:
            if adapter is not None:
                model, tokenizer = load_adapter_model(model_spec(recipe), adapter)
            else:
                torch.manual_seed(recipe.seed)
                model, tokenizer = load_model(model_spec(recipe), adapter_spec(recipe))
        metrics = task.evaluate(model, tokenizer, data.records, batch_size=recipe.per_device_eval_batch_size)
    return {"evaluated_on": data.description, "split": split, **metrics}


def train(recipe: Recipe, *, echo: Callable[[str], None] = print, progress: bool | None = None) -> RunResult:
    """Train as the recipe says; write the adapter, logs, plot and checkpoints to ``output_dir``.

    Under torchrun every rank trains an identical replica (see :mod:`zopeft.distributed`);
    rank 0 alone holds the output directory's lock, evaluates, prints, and writes logs,
    checkpoints and the adapter.  Every check that needs no model (resume point, a previous
    run in the way, the records against the task format) runs before the model loads, and
    a run that fails before training leaves ``output_dir`` as it found it.  SIGTERM and SIGINT
    stop it after a checkpoint (:mod:`zopeft.stopping`: :class:`~zopeft.stopping.Stopped`).
    """
    with distributed_session() as (rank, world_size), torch_threads(recipe):
        run = RunDir(recipe.output_dir)
        main = rank == 0
        echo = echo if main else (lambda _: None)
        with StopSignals(echo) as stops, run.locked(echo) if main else contextlib.nullcontext():
            return _train(recipe, run, rank, world_size, echo, progress, stops)


def _checks_eps(recipe: Recipe) -> bool:
    """Whether a new run checks zo.eps first (``zo.check_eps``; auto: half precision, on the loss or the margin)."""
    setting = recipe.zo.check_eps
    if setting != "auto":
        return setting == "always"
    return recipe.compute_dtype != "float32" and recipe.zo.objective in ("loss", "candidate_ce", "margin")


def _train_step(
    opt: torch.optim.Optimizer, model: torch.nn.Module, batches: list[Any], target: Objective | None
) -> dict[str, Any]:
    """One optimizer step over the micro-batches; returns the statistics to log."""
    if isinstance(opt, ZOOptimizer):
        closures = [zo_closure(model, b, target) for b in batches]
        for closure in closures[:-1]:
            opt.estimate(closure)
        opt.step(closures[-1])
        return dict(opt.last_stats)
    model.train()
    total = 0.0
    for batch in batches:  # a CandidateBatch under zo.objective: candidate_ce
        loss = (candidate_loss(model, batch) if isinstance(batch, CandidateBatch) else model(**batch).loss) / len(batches)
        loss.backward()
        total += loss.item()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    return {"loss": total}


def _train(
    recipe: Recipe, run: RunDir, rank: int, world_size: int, echo: Callable[[str], None], progress: bool | None,
    stops: StopSignals,
) -> RunResult:
    main, began = rank == 0, time.perf_counter()
    # ----- setup: checks, then the parts ------------------------------------------------------
    checkpoint = run.prepare(recipe, world_size, echo)
    task, data = training_data(recipe)
    train_records, evaluated, train_data = data.train.records, data.eval, data.train.fingerprint()
    if checkpoint is not None:
        run.check_data(checkpoint, train_data)
    target = objective(recipe, task)
    barrier()  # every rank has read output_dir before rank 0 writes to it
    for note in data.notes():
        echo(f"note: {note}")
    torch.manual_seed(recipe.seed)
    model, tokenizer = load_model(model_spec(recipe), adapter_spec(recipe))
    model.eval()
    echo(f"model: {recipe.model_name_or_path} | {recipe.finetuning_type} | {trainable_summary(model)} | "
         f"torch threads: {torch.get_num_threads()}")
    echo(f"train on {data.train.description}")
    echo(f"eval on {evaluated.description}" if evaluated else "eval: none")
    if data.select is not None and recipe.guards_evaluations:
        echo(f"guard judges {data.select.description}")
    n = len(train_records)
    opt = make_optimizer(recipe, model, world_size)
    guard = Guard(opt, **recipe.zo.guard.kwargs()) if recipe.is_zeroth_order and recipe.zo.guard.enabled else None
    comm = getattr(opt, "comm", None)
    shard, shards = comm.data_shard if comm is not None else (0, 1)
    if comm is not None:
        echo(f"torchrun: {world_size} ranks, {comm.mode} parallel; "
             f"{comm.payload_bytes(len(opt.evaluations()))} bytes of losses per rank per micro-batch")
    sched = get_scheduler(
        recipe.lr_scheduler_type, opt, num_warmup_steps=recipe.num_warmup_steps, num_training_steps=recipe.max_steps
    )
    start = forward_passes = 0
    ema = EMA()  # of the training loss
    if checkpoint is not None:
        state = run.load_checkpoint(checkpoint, model, opt, sched, guard)
        start, forward_passes, ema.value = state["global_step"], state["forward_passes"], state.get("loss_ema")
        echo(f"*** RESUMING from {checkpoint} at step {start} (forward passes so far: {forward_passes}) ***")
    log = step_log = trackers = None
    if main:
        log, step_log = run.open_logs(recipe, start, checkpoint, echo)
        trackers = Trackers(recipe.report_to, run.path, recipe.model_dump(), forward_equivalents(recipe, forward_passes))

    eval_seconds = 0.0

    def write(step: int, record: dict[str, Any]) -> None:
        record = {"step": step, "forward_passes": forward_passes,
                  "forward_equivalents": forward_equivalents(recipe, forward_passes), **record}
        log.write(record)
        trackers.log(record)

    def measure(split: Split | None, name: str, step: int) -> dict[str, Any]:
        """Rank 0 evaluates ``split`` while the other ranks wait; every rank gets the metrics (the guard judges them)."""
        nonlocal eval_seconds
        metrics: dict[str, Any] = {}
        if main and split is not None:
            clock = time.perf_counter()
            metrics = task.evaluate(model, tokenizer, split.records, batch_size=recipe.per_device_eval_batch_size)
            eval_seconds += time.perf_counter() - clock
            logged = _logged(metrics)
            write(step, {f"{name}_{k}": v for k, v in logged.items()})
            echo(f"{name} @ step {step}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                       for k, v in logged.items()))
            warning = collapse_warning(metrics)
            if warning:
                echo(f"warning: {warning}")
        return from_rank0(metrics)

    def run_eval(step: int, judge: bool) -> tuple[dict[str, Any], bool]:
        """Evaluate; with ``judge``, the guard judges the evaluation, or the records of ``zo.guard.select_size``
        (evaluated too).  Returns the eval metrics and whether the run goes on."""
        metrics = measure(evaluated, "eval", step)
        if not judge or guard is None:
            return metrics, True
        watched = measure(data.select, "select", step) if data.select is not None else metrics
        return metrics, judged(lambda g: g.observe_metrics(watched), step)

    def judged(observe: Callable[[Guard], None], step: int) -> bool:
        """Let the guard judge; log its rollbacks; False once it stops the run (the best weights in place)."""
        if guard is None:
            return True
        events, stop = guard.judge(observe)
        for event in events:
            echo(rollback_line(event))
            if main:
                write(step, {"guard": "rollback", **{k: v for k, v in event.items() if k != "step"}})
        if stop is not None:
            echo(f"guard: {stop}")
            if main:
                write(step, {"guard": "stop", "reason": str(stop)})
        return stop is None

    def batches_of(step: int) -> list[Any]:
        return [
            training_batch(task, [train_records[i] for i in batch_indices(recipe, step, j, n, shard, shards)],
                           tokenizer, model, target is not None)
            for j in range(recipe.gradient_accumulation_steps)
        ]

    # ----- train ---------------------------------------------------------------------------------
    try:
        eval_before = run_eval(0, judge=True)[0] if start == 0 else {}  # watch: eval: the start is a state to roll back to
        if main and start == 0 and isinstance(opt, ZOOptimizer) and _checks_eps(recipe):
            check = opt.check_eps(zo_closure(model, batches_of(0)[0], target))
            echo(("" if check.ok else "warning: ") + check.line())
            write(0, {"eps_check": check.to_dict()})
        show_bar = main and (sys.stderr.isatty() if progress is None else progress)
        with tqdm(total=recipe.max_steps, initial=start, disable=not show_bar, unit="step", dynamic_ncols=True) as bar:
            loop_began, eval_before_loop = time.perf_counter(), eval_seconds
            last = start  # the last step done (the guard may stop the run early)
            for step in range(start, recipe.max_steps):
                batches = batches_of(step)
                lr = opt.param_groups[0]["lr"] * opt.param_groups[0].get("lr_scale", 1.0)
                logged = len(getattr(opt, "step_log", ()))
                stats = _train_step(opt, model, batches, target)
                forward_passes = stats.get("forward_passes", forward_passes + len(batches))
                ema.update(stats["loss"])
                sched.step()
                done = last = step + 1
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.4f}", fwd=forward_passes)
                going = judged(lambda g: g.observe_step(), done)
                if main and (done % recipe.logging_steps == 0 or done == recipe.max_steps):
                    shown = {k: v for k, v in stats.items() if k not in ("step", "lr", "forward_passes")}
                    write(done, {"lr": lr, **shown, "loss_ema": ema.value})
                    if not show_bar:
                        smoothed = f" (ema {ema.value:.4f})" if ema.value is not None else ""
                        echo(f"step {done}/{recipe.max_steps} loss={stats['loss']:.4f}{smoothed} "
                             f"fwd={forward_passes} lr={lr:.3g}")
                if going and recipe.eval_steps and done % recipe.eval_steps == 0 and done != recipe.max_steps:
                    going = run_eval(done, judge=True)[1]
                if step_log is not None:  # before the checkpoint: the step log never lags behind it
                    for record in opt.step_log[logged:]:  # the step's record, and the guard's rollbacks
                        step_log.write(record)
                stopping = stops.requested()  # a signal: save a checkpoint of this step and stop
                if main and (recipe.save_steps and done % recipe.save_steps == 0 or stopping):
                    position = done * recipe.gradient_accumulation_steps * recipe.per_device_train_batch_size * shards
                    run.save_checkpoint(done, recipe, model, opt, sched, {
                        "forward_passes": forward_passes, "epoch": position // n, "example_position": position % n,
                        "world_size": world_size, "loss_ema": ema.value, "train_data": train_data,
                    }, guard)
                stops.step_done(done)
                if not going:
                    break
        train_seconds = time.perf_counter() - loop_began - (eval_seconds - eval_before_loop)
        skipped = Counter(r["skipped"] for r in getattr(opt, "step_log", ()) if "skipped" in r)
        if isinstance(opt, ZOOptimizer):
            opt.check_replicas()
            flat_steps = opt.skipped_steps - sum(n for why, n in skipped.items() if why.startswith("non-finite"))
            flat = objective_failures(target) or flat_objective_warning(flat_steps, last, recipe.zo.objective,
                                                                        recipe.zo.eps)
            if main and flat:
                echo(f"warning: {flat}")
        eval_after = run_eval(last, judge=False)[0]
    finally:
        if trackers is not None:
            trackers.close()
    # ----- save ----------------------------------------------------------------------------------
    if main:
        run.save_final(model, tokenizer, echo)
        plot = run.plot()
        echo(f"adapter: {run.path} | log: {run.path / LOG_NAME}" + (f" | plot: {plot}" if plot else ""))
    barrier()
    return RunResult(
        output_dir=run.path, steps=last, forward_passes=forward_passes,
        forward_equivalents=forward_equivalents(recipe, forward_passes), train_seconds=train_seconds,
        eval_seconds=eval_seconds, wall_seconds=time.perf_counter() - began,
        evaluated_on=evaluated.description if evaluated else None, eval_before=eval_before, eval_after=eval_after,
        resumed_from=checkpoint, steps_run=last - start, skipped=dict(skipped),
    )
