"""Run a recipe: train with a ZO (or AdamW) optimizer, evaluate, checkpoint, resume.

This is what ``zopeft train`` and ``zopeft eval`` call.  A run reads setup → train → save:
:mod:`zopeft.components` builds the parts from the recipe, :mod:`zopeft.resolved` makes explicit
what the recipe leaves to its data, :mod:`zopeft.auto_lr` picks ``learning_rate: auto``,
:mod:`zopeft.rundir` owns the output directory (lock, checkpoints, logs, final adapter),
:mod:`zopeft.best_model` keeps the best evaluation's adapter, and this module keeps the loop::

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

from .auto_lr import LearningRate, find_learning_rate, known_learning_rate
from .best_model import BestModel, best_line
from .components import (
    adapter_spec, checks_eps, eval_data, forward_equivalents, make_optimizer, model_spec, objective, step_batches,
    torch_threads, train_step, training_data, zo_closure,
)
from .distributed import barrier, distributed_session, from_rank0
from .eval_cache import evaluation_key, load_evaluation, store_evaluation
from .guard import Guard, rollback_line
from .metrics import EMA, collapse_warning, predicted_counts, without_generations
from .models import load_adapter_model, load_model, trainable_summary
from .objectives import Objective, flat_objective_warning, objective_failures
from .optim.base import ZOOptimizer
from .recipe import Recipe
from .registry import optimizer_class
from .resolved import resolve_run, run_lines
from .rundir import LOG_NAME, JsonlLog, RunDir, checkpoint_recipe
from .splits import DataSplits, Split
from .stopping import StopSignals
from .trackers import Trackers

__all__ = ["RunResult", "evaluate", "train"]


@dataclass
class RunResult:
    """What a finished training run reports (times in seconds, of this process: a resumed run's since the resume)."""

    output_dir: Path
    steps: int
    forward_passes: int  # of the training steps
    forward_equivalents: int  # forward passes + 2 per backward pass (the AdamW baseline's)
    train_seconds: float  # the steps, with logging and checkpoints, without the evaluations
    eval_seconds: float
    wall_seconds: float  # all of it: checks, loading, lr-find, training, evaluation, saving
    lr_find_seconds: float = 0.0  # learning_rate: auto: lr-find before the first step
    evaluated_on: str | None = None  # the eval records in words; None: nothing evaluated
    eval_before: dict[str, Any] = field(default_factory=dict)
    eval_after: dict[str, Any] = field(default_factory=dict)  # of the adapter left in output_dir
    resumed_from: Path | None = None
    learning_rate: float | None = None  # what the run trained at (learning_rate: auto: lr-find's pick)
    lr_find_forward_passes: int = 0  # learning_rate: auto: what lr-find spent before the first step
    best_model: dict[str, Any] | None = None  # load_best_model_at_end: the kept step, its value, the last step's
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


def _train(
    recipe: Recipe, run: RunDir, rank: int, world_size: int, echo: Callable[[str], None], progress: bool | None,
    stops: StopSignals,
) -> RunResult:
    began = time.perf_counter()
    session = _Run.setup(recipe, run, rank, world_size, echo, progress, stops)
    try:
        session.train()
        return session.save(began)
    finally:
        session.close()  # the trackers, after the save's last records


def _data_shards(recipe: Recipe, world_size: int) -> int:
    """Ranks that each read their own slice of a step's data (ZO data parallel under torchrun), else 1."""
    if world_size == 1 or not recipe.is_zeroth_order:
        return 1
    mode = recipe.zo.optimizer_kwargs().get("parallel", "auto")
    if mode == "auto":
        mode = optimizer_class(recipe.zo.optimizer).default_parallel
    return world_size if mode == "data" else 1


@dataclass
class _Run:
    """One training run's parts and state: :meth:`setup` builds them, :meth:`train` runs the loop, :meth:`save`
    leaves the adapter."""

    recipe: Recipe  # resolved, with the learning rate it trains at
    run: RunDir
    main: bool  # rank 0: evaluates, prints, writes
    world_size: int
    echo: Callable[[str], None]
    show_bar: bool
    task: Any
    data: DataSplits
    target: Objective | None
    model: torch.nn.Module
    tokenizer: Any
    opt: torch.optim.Optimizer
    guard: Guard | None
    sched: Any
    start: int  # the step it starts (resumes) at
    forward_passes: int
    ema: EMA  # of the training loss
    log: JsonlLog | None
    step_log: JsonlLog | None
    trackers: Trackers | None
    best: BestModel | None
    checkpoint: Path | None
    train_data: str  # the training records' fingerprint
    chosen: LearningRate
    shards: tuple[int, int]  # this rank's data shard, of how many
    stops: StopSignals  # SIGTERM / SIGINT: a checkpoint after the step, then stop
    eval_seconds: float = 0.0
    train_seconds: float = 0.0
    eval_before: dict[str, Any] = field(default_factory=dict)
    eval_after: dict[str, Any] = field(default_factory=dict)
    judged_last: dict[str, Any] = field(default_factory=dict)  # the last evaluation the best model is picked by
    last: int = 0  # the last step done (the guard may stop the run early)

    def __post_init__(self) -> None:
        self.last = self.start

    # ----- setup: checks, then the parts ------------------------------------------------------
    @classmethod
    def setup(cls, recipe: Recipe, run: RunDir, rank: int, world_size: int, echo: Callable[[str], None],
              progress: bool | None, stops: StopSignals) -> _Run:
        main = rank == 0
        task, data = training_data(recipe)
        epochs = recipe.num_train_epochs
        checkpoint = run.resume_point(recipe, echo)
        resumed = checkpoint_recipe(checkpoint) if checkpoint is not None else None
        recipe = resolve_run(recipe, data, _data_shards(recipe, world_size), resumed)
        run.prepare(recipe, checkpoint, world_size, echo)
        train_data = data.train.fingerprint()
        if checkpoint is not None:
            run.check_data(checkpoint, train_data)
        chosen = known_learning_rate(recipe, checkpoint, world_size, echo)  # None: lr-find searches, below
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
        if epochs is not None:
            echo(f"num_train_epochs {epochs:g}: max_steps {recipe.max_steps}")
        echo(f"eval on {data.eval.description}" if data.eval else "eval: none")
        if data.select is not None:
            echo(f"{'guard' if recipe.guards_evaluations else 'best model'} judges {data.select.description}")
        for line in run_lines(recipe, data):
            echo(line)
        show_bar = main and (sys.stderr.isatty() if progress is None else progress)
        if chosen is None:
            chosen = find_learning_rate(recipe, model, tokenizer, task, data, target, echo, show_bar)
        recipe = chosen.recipe
        opt = make_optimizer(recipe, model, world_size)
        guard = Guard(opt, **recipe.zo.guard.kwargs()) if recipe.is_zeroth_order and recipe.zo.guard.enabled else None
        comm = getattr(opt, "comm", None)
        if comm is not None:
            echo(f"torchrun: {world_size} ranks, {comm.mode} parallel; "
                 f"{comm.payload_bytes(len(opt.evaluations()))} bytes of losses per rank per micro-batch")
        sched = get_scheduler(recipe.lr_scheduler_type, opt, num_warmup_steps=recipe.num_warmup_steps,
                              num_training_steps=recipe.max_steps)
        start = forward_passes = 0
        state: dict[str, Any] = {}  # the checkpoint's trainer_state.json
        ema = EMA()  # of the training loss
        if checkpoint is not None:
            state = run.load_checkpoint(checkpoint, model, opt, sched, guard)
            start, forward_passes, ema.value = state["global_step"], state["forward_passes"], state.get("loss_ema")
            echo(f"*** RESUMING from {checkpoint} at step {start} (forward passes so far: {forward_passes}) ***")
        log = step_log = trackers = best = None
        if main:
            log, step_log = run.open_logs(recipe, start, checkpoint, echo)
            judged = data.select or data.eval
            if recipe.load_best_model_at_end and judged is not None:
                best = BestModel(run, recipe, "select" if data.select else "eval", judged.fingerprint(), echo)
                if checkpoint is not None:
                    best.resume(checkpoint, state)
            trackers = Trackers(recipe.report_to, run.path, recipe.model_dump(),  # last: close() is then certain
                                forward_equivalents(recipe, forward_passes))
        session = cls(
            recipe=recipe, run=run, main=main, world_size=world_size, echo=echo, show_bar=show_bar, task=task,
            data=data, target=target, model=model, tokenizer=tokenizer, opt=opt, guard=guard, sched=sched,
            start=start, forward_passes=forward_passes, ema=ema, log=log, step_log=step_log, trackers=trackers,
            best=best, checkpoint=checkpoint, train_data=train_data, chosen=chosen,
            shards=comm.data_shard if comm is not None else (0, 1), stops=stops,
        )
        if chosen.found is not None and main:
            session.write(0, {"lr_find": chosen.found.to_dict()})
        return session

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.close()

    # ----- train -------------------------------------------------------------------------------
    def train(self) -> None:
        """Evaluate the start, then step until max_steps (or the guard stops the run), then evaluate the end."""
        recipe, opt = self.recipe, self.opt
        if self.start == 0 and recipe.eval_on_start:  # watch: eval: the start is a state to roll back to
            self.eval_before = self._evaluate(0, judge=True)[0]
        self._check_eps()
        with tqdm(total=recipe.max_steps, initial=self.start, disable=not self.show_bar, unit="step",
                  dynamic_ncols=True) as bar:
            loop_began, eval_before_loop = time.perf_counter(), self.eval_seconds
            for step in range(self.start, recipe.max_steps):
                lr = opt.param_groups[0]["lr"] * opt.param_groups[0].get("lr_scale", 1.0)
                logged = len(getattr(opt, "step_log", ()))
                stats = train_step(opt, self.model, self._batches(step), self.target)
                self.forward_passes = stats.get("forward_passes", self.forward_passes + recipe.gradient_accumulation_steps)
                self.ema.update(stats["loss"])
                self.sched.step()
                done = self.last = step + 1
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.4f}", fwd=self.forward_passes)
                going = self._judged(lambda g: g.observe_step(), done)
                self._log_step(done, lr, stats)
                if going and recipe.eval_steps and done % recipe.eval_steps == 0 and done != recipe.max_steps:
                    going = self._evaluate(done, judge=True)[1]
                if self.step_log is not None:  # before the checkpoint: the step log never lags behind it
                    for record in opt.step_log[logged:]:  # the step's record, and the guard's rollbacks
                        self.step_log.write(record)
                self._save_checkpoint(done, forced=self.stops.requested())
                self.stops.step_done(done)
                if not going:
                    break
        self.train_seconds = time.perf_counter() - loop_began - (self.eval_seconds - eval_before_loop)
        if isinstance(opt, ZOOptimizer):
            opt.check_replicas()
            non_finite = sum(n for why, n in self.skipped().items() if why.startswith("non-finite"))
            flat = objective_failures(self.target) or flat_objective_warning(
                opt.skipped_steps - non_finite, self.last, recipe.zo.objective, recipe.zo.eps)
            if self.main and flat:
                self.echo(f"warning: {flat}")
        self.eval_after = self._evaluate(self.last, judge=False)[0]

    def _batches(self, step: int) -> list[Any]:
        return step_batches(self.recipe, self.task, self.data.train.records, step, self.tokenizer, self.model,
                            self.target is not None, *self.shards)

    def _check_eps(self) -> None:
        """Before the first step of a new run, check zo.eps against the rounding (unless lr-find just did)."""
        found = self.chosen.found
        if found is not None and found.eps_check is not None and self.main:
            self.write(0, {"eps_check": found.eps_check})
        elif self.main and self.start == 0 and isinstance(self.opt, ZOOptimizer) and checks_eps(self.recipe):
            check = self.opt.check_eps(zo_closure(self.model, self._batches(0)[0], self.target))
            self.echo(("" if check.ok else "warning: ") + check.line())
            self.write(0, {"eps_check": check.to_dict()})

    def write(self, step: int, record: dict[str, Any]) -> None:
        """A record of ``trainer_log.jsonl`` (and the trackers), with the forward passes so far (rank 0)."""
        record = {"step": step, "forward_passes": self.forward_passes,
                  "forward_equivalents": forward_equivalents(self.recipe, self.forward_passes), **record}
        self.log.write(record)
        self.trackers.log(record)

    def _log_step(self, done: int, lr: float, stats: dict[str, Any]) -> None:
        recipe = self.recipe
        if not self.main or (done % recipe.logging_steps and done != recipe.max_steps):
            return
        shown = {k: v for k, v in stats.items() if k not in ("step", "lr", "forward_passes")}
        self.write(done, {"lr": lr, **shown, "loss_ema": self.ema.value})
        if not self.show_bar:
            smoothed = f" (ema {self.ema.value:.4f})" if self.ema.value is not None else ""
            self.echo(f"step {done}/{recipe.max_steps} loss={stats['loss']:.4f}{smoothed} fwd={self.forward_passes} "
                      f"lr={lr:.3g}")

    def skipped(self) -> Counter[str]:
        """The steps that made no update, by reason (the ZO step log's ``skipped`` records)."""
        return Counter(r["skipped"] for r in getattr(self.opt, "step_log", ()) if "skipped" in r)

    def _save_checkpoint(self, done: int, forced: bool = False) -> None:
        """``checkpoint-<done>`` every ``save_steps``, or ``forced`` (a signal stops the run after this step)."""
        recipe = self.recipe
        if not (self.main and (recipe.save_steps and done % recipe.save_steps == 0 or forced)):
            return
        n, shards = len(self.data.train.records), self.shards[1]
        position = done * recipe.gradient_accumulation_steps * recipe.per_device_train_batch_size * shards
        self.run.save_checkpoint(done, recipe, self.model, self.opt, self.sched, {
            "forward_passes": self.forward_passes, "epoch": position // n, "example_position": position % n,
            "world_size": self.world_size, "loss_ema": self.ema.value, "train_data": self.train_data,
            "best_model": self.best.record() if self.best is not None else None,
        }, self.guard)

    # ----- evaluations -------------------------------------------------------------------------
    def _evaluate(self, step: int, judge: bool) -> tuple[dict[str, Any], bool]:
        """Evaluate the eval records (and the guard's, ``zo.guard.select_size``); the best model keeps the adapter
        if it is the best so far; with ``judge`` the guard judges.  Returns the eval metrics and whether the run
        goes on."""
        metrics = self._measure(self.data.eval, "eval", step)
        judged = self._measure(self.data.select, "select", step) if self.data.select is not None else metrics
        self.judged_last = judged
        if self.best is not None:  # before the guard judges: the adapter evaluated, the rollbacks before it
            self.best.observe(step, judged, without_generations(metrics), self.model,
                              self.guard.rollbacks if self.guard else 0)
        if not judge or self.guard is None or not self.recipe.guards_evaluations:
            return metrics, True
        metric, greater = self.recipe.metric_for_best_model, bool(self.recipe.greater_is_better)
        return metrics, self._judged(lambda g: g.observe_metrics(judged, metric=metric, higher_is_better=greater), step)

    def _measure(self, split: Split | None, name: str, step: int) -> dict[str, Any]:
        """Rank 0 evaluates ``split`` while the other ranks wait; every rank gets the metrics (the guard judges them).

        The start of a new run is taken from the evaluation cache where nothing it depends on changed
        (:mod:`zopeft.eval_cache`)."""
        metrics: dict[str, Any] = {}
        if self.main and split is not None:
            clock = time.perf_counter()
            key = evaluation_key(self.recipe, self.model, split) if step == 0 and self.start == 0 else None
            cached = load_evaluation(key) if key is not None else None
            metrics = cached or self.task.evaluate(self.model, self.tokenizer, split.records,
                                                   batch_size=self.recipe.per_device_eval_batch_size)
            if key is not None and cached is None:
                store_evaluation(key, metrics)
            self.eval_seconds += time.perf_counter() - clock
            logged = _logged(metrics)
            self.write(step, {f"{name}_{k}": v for k, v in logged.items()})
            reused = (" (reused from the evaluation cache: the same base model, adapter init and records were "
                      "evaluated before)") if cached else ""
            self.echo(f"{name} @ step {step}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                            for k, v in logged.items()) + reused)
            warning = collapse_warning(metrics)
            if warning:
                self.echo(f"warning: {warning}")
        return from_rank0(metrics)

    def _judged(self, observe: Callable[[Guard], None], step: int) -> bool:
        """Let the guard judge; log its rollbacks; False once it stops the run (the best weights in place)."""
        if self.guard is None:
            return True
        events, stop = self.guard.judge(observe)
        for event in events:
            self.echo(rollback_line(event))
            if self.main:
                self.write(step, {"guard": "rollback", **{k: v for k, v in event.items() if k != "step"}})
        if stop is not None:
            self.echo(f"guard: {stop}")
            if self.main:
                self.write(step, {"guard": "stop", "reason": str(stop)})
        return stop is None

    # ----- save ----------------------------------------------------------------------------------
    def save(self, began: float) -> RunResult:
        """Leave the best (or last) adapter, the plot and the log's last records in output_dir; report the run."""
        kept = None
        if self.main:
            if self.best is not None:
                kept = self.best.keep(self.model, self.last, self.judged_last)
            if kept is not None:
                self.write(self.last, {"best_model": {k: v for k, v in kept.items() if k != "eval"}})
                self.echo(best_line(kept))
            self.run.save_final(self.model, self.tokenizer, self.echo)
            plot = self.run.plot()
            self.echo(f"adapter: {self.run.path} | log: {self.run.path / LOG_NAME}" + (f" | plot: {plot}" if plot else ""))
        barrier()
        return RunResult(
            output_dir=self.run.path, steps=self.last, forward_passes=self.forward_passes,
            forward_equivalents=forward_equivalents(self.recipe, self.forward_passes),
            train_seconds=self.train_seconds, eval_seconds=self.eval_seconds, wall_seconds=time.perf_counter() - began,
            evaluated_on=self.data.eval.description if self.data.eval else None, eval_before=self.eval_before,
            eval_after=kept["eval"] if kept else self.eval_after, resumed_from=self.checkpoint,
            learning_rate=self.recipe.effective_learning_rate, lr_find_forward_passes=self.chosen.forward_passes,
            lr_find_seconds=self.chosen.seconds, best_model=kept, steps_run=self.last - self.start,
            skipped=dict(self.skipped()),
        )
