"""Never diverge silently: a loss-spike guard with rollback and learning-rate backoff, for any ZO optimizer.

ZO training has no gradient norm to watch and is sensitive to the learning rate: at the learning
rate its own tuning run picked, MeZO reached 79% on SST-2 and then diverged in every seed (loss
2.1 -> 13-23, accuracy back to chance).  Every ZO step already measures the loss at the current
weights, and an adapter is a few MB, so rolling back is cheap::

    guard = zopeft.Guard(opt)                   # wraps any ZO optimizer
    for batch in loader:
        guard.step(zopeft.loss_closure(model, batch))   # opt.step, then the check
        sched.step()

The guard keeps an exponential moving average of the step losses (``smoothing``) and a copy of
the trainable tensors (and the method's state, e.g. AdaMeZO's window) at the lowest average so
far.  When the average stays above that best by ``margin`` (relative, at least ``tolerance``)
for ``patience`` consecutive steps - or an update is refused as non-finite - it restores the best
copy, multiplies every group's learning rate by ``backoff`` (as ``lr_scale`` on top of any
scheduler, which keeps setting ``lr``), writes a rollback record into the optimizer's
``step_log`` (so :meth:`ZOOptimizer.replay` repeats it) and continues.  After ``max_rollbacks``
rollbacks without a new best it raises :class:`GuardStop`, with the best weights in place.

With ``watch="eval"`` the guard judges evaluations instead (:meth:`observe_eval`, e.g. accuracy,
higher is better), rolling back to the best evaluated weights.  Where the trainable tensors
exceed ``max_copy_bytes`` (full-parameter ZO of a large model) no copy is kept in memory: the
guard keeps the weights it started from on disk and rebuilds the best state by replaying the
seed log from there.  :meth:`state_dict` holds everything, so a resumed run guards identically.
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from .optim.base import ZOOptimizer
from .optim.settings import GUARD_DEFAULTS

__all__ = ["Guard", "GuardStop", "rollback_line"]

_NON_FINITE = ("non-finite loss", "non-finite update")


def rollback_line(event: Mapping[str, Any]) -> str:
    """One line describing a rollback event (an entry of :attr:`Guard.events`)."""
    return (f"guard: rolled back to the weights after {event['rollback_to'] + 1} steps ({event['reason']}); "
            f"learning rate {event['old_lr'][0]:.3g} -> {event['new_lr'][0]:.3g}")


class GuardStop(RuntimeError):
    """Raised after ``max_rollbacks`` rollbacks without progress; the best weights are in place."""


class Guard:
    """Loss-spike guard around a :class:`~zopeft.optim.base.ZOOptimizer` (see the module docstring).

    Args:
        optimizer: the ZO optimizer to guard.
        smoothing: β of the moving average of the watched values (0: no smoothing).
        margin: a spike is the average above ``best + margin·|best|`` ...
        tolerance: ... or above ``best + tolerance``, whichever is larger (for values near 0).
        patience: ... for this many consecutive observations.
            ``smoothing``, ``margin``, ``patience``: None takes the default of what is watched
            (:data:`~zopeft.optim.settings.GUARD_DEFAULTS`; loss: 0.9, 0.5, 5; eval: 0, 0.05, 1).
        backoff: factor on every group's learning rate at each rollback.
        max_rollbacks: rollbacks in a row without a new best before :class:`GuardStop`.
        watch: ``"loss"`` (every step's loss) or ``"eval"`` (:meth:`observe_eval` values).
        max_copy_bytes: largest in-memory copy of the trainable tensors; beyond it the best
            state is rebuilt by replaying the seed log from the starting weights (kept on disk).
    """

    def __init__(
        self, optimizer: ZOOptimizer, *, smoothing: float | None = None, margin: float | None = None,
        tolerance: float = 0.0, patience: int | None = None, backoff: float = 0.5, max_rollbacks: int = 3,
        watch: str = "loss", max_copy_bytes: int = 1 << 30,
    ) -> None:
        if not isinstance(optimizer, ZOOptimizer):
            raise TypeError(f"Guard wraps a zopeft ZO optimizer (MeZO, FZOO, AdaMeZO, HiZOO or a registered one), got "
                            f"{type(optimizer).__name__}: it rolls back by the seeds of their steps")
        if watch not in GUARD_DEFAULTS:
            raise ValueError(f"watch must be 'loss' or 'eval', got {watch!r}")
        defaults = GUARD_DEFAULTS[watch]
        smoothing = defaults["smoothing"] if smoothing is None else smoothing
        margin = defaults["margin"] if margin is None else margin
        patience = defaults["patience"] if patience is None else patience
        if not 0 <= smoothing < 1:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        if not (margin >= 0 and tolerance >= 0 and patience >= 1 and 0 < backoff < 1 and max_rollbacks >= 1):
            raise ValueError("margin and tolerance must be >= 0, patience and max_rollbacks >= 1, backoff in (0, 1)")
        self.optimizer = optimizer
        self.smoothing, self.margin, self.tolerance, self.patience = smoothing, margin, tolerance, patience
        self.backoff, self.max_rollbacks, self.watch = backoff, max_rollbacks, watch
        self.in_memory = 4 * optimizer.points.numel <= max_copy_bytes
        self.average: float | None = None
        self.best = math.inf
        self.best_step = -1  # the step after which the weights were best (-1: the start)
        self.above = 0  # consecutive observations above the threshold
        self.stalled = 0  # rollbacks since the last new best
        self.rollbacks = 0
        self.events: list[dict[str, Any]] = []  # what to log: one dict per rollback
        self._best: dict[str, Any] | None = None  # the state after best_step (in memory)
        self._origin: dict[str, Any] | None = None  # replay mode: a state to replay from (on disk) and its step
        self._origin_dir: tempfile.TemporaryDirectory | None = None
        self._carried: list[dict[str, Any]] = []  # replay mode: step records since the origin, from before a resume
        self._remember_best()

    # ----- observing -------------------------------------------------------------------------
    def step(self, closure: Any = None) -> float | None:
        """``optimizer.step(closure)``, then :meth:`observe_step`; returns the step's loss."""
        loss = self.optimizer.step(closure)
        self.observe_step()
        return loss

    def observe_step(self) -> None:
        """Judge the optimizer's last step (its loss, or a refused non-finite update)."""
        stats = self.optimizer.last_stats
        if stats.get("skipped") in _NON_FINITE:
            self._rollback(f"{stats['skipped']} at step {stats['step'] + 1}")
        elif self.watch == "loss":
            self._observe(float(stats["loss"]), stats["step"])

    def observe_eval(self, value: float, *, higher_is_better: bool = True) -> None:
        """With ``watch="eval"``: judge an evaluation of the current weights (e.g. accuracy)."""
        if self.watch == "eval":
            self._observe(-value if higher_is_better else value, self.optimizer.step_index - 1)

    def observe_metrics(self, metrics: Mapping[str, float], *, prefix: str = "", metric: str | None = None,
                        higher_is_better: bool = True) -> None:
        """With ``watch="eval"``: judge an evaluation by ``metric`` (in the direction given), else by its accuracy
        where it has one, else by its loss."""
        if metric is not None:
            if f"{prefix}{metric}" in metrics:
                self.observe_eval(metrics[f"{prefix}{metric}"], higher_is_better=higher_is_better)
        elif f"{prefix}accuracy" in metrics:
            self.observe_eval(metrics[f"{prefix}accuracy"])
        elif f"{prefix}loss" in metrics:
            self.observe_eval(metrics[f"{prefix}loss"], higher_is_better=False)

    def _observe(self, value: float, step: int) -> None:
        if not math.isfinite(value):
            self._rollback(f"non-finite value {value} at step {step + 1}")
            return
        self.average = value if self.average is None else self.smoothing * self.average + (1 - self.smoothing) * value
        if self.average < self.best:
            self.best, self.best_step, self.above, self.stalled = self.average, step, 0, 0
            if self.in_memory:
                self._best = self.optimizer.snapshot()
            return
        threshold = self.best + max(self.margin * abs(self.best), self.tolerance)
        self.above = self.above + 1 if self.average > threshold else 0
        if self.above >= self.patience:
            self._rollback(f"smoothed value {self.average:.4g} above {threshold:.4g} (best {self.best:.4g}, after "
                           f"{self.best_step + 1} steps) for {self.above} observations")

    def judge(self, observe: Callable[[Guard], None]) -> tuple[list[dict[str, Any]], GuardStop | None]:
        """Run ``observe(self)``; return the rollbacks it made and the :class:`GuardStop` it raised, if any."""
        seen = len(self.events)
        try:
            observe(self)
        except GuardStop as stop:
            return self.events[seen:], stop
        return self.events[seen:], None

    # ----- acting ------------------------------------------------------------------------------
    def _rollback(self, reason: str) -> None:
        opt = self.optimizer
        if self.stalled >= self.max_rollbacks:
            raise GuardStop(
                f"the guard rolled back {self.stalled} times without a new best ({reason}); stopping with the best "
                f"weights (after {self.best_step + 1} steps, smoothed value {self.best:.4g}) in place: lower the "
                "learning rate"
            )
        old = [g["lr"] * g.get("lr_scale", 1.0) for g in opt.param_groups]
        scales = [g.get("lr_scale", 1.0) * self.backoff for g in opt.param_groups]
        record = {"step": opt.step_index - 1, "rollback_to": self.best_step, "lr_scale": scales}
        opt.rollback(self._best_state(), scales, record)
        self.stalled += 1
        self.rollbacks += 1
        self.above = 0
        self.average = self.best
        if not self.in_memory:  # replay from here next time: the log since has no rollback in it
            self._origin = None
            self._remember_best()
        self.events.append({**record, "reason": reason, "old_lr": old,
                            "new_lr": [g["lr"] * g["lr_scale"] for g in opt.param_groups]})

    def _remember_best(self) -> None:
        """Keep the current state as the best one: in memory, or (replay mode) the state to replay from."""
        if self.in_memory:
            self._best = self.optimizer.snapshot()
        elif self._origin is None:
            snapshot = self.optimizer.snapshot()
            self._keep_origin(snapshot["values"], self.optimizer.step_index - 1, snapshot["extra"])

    def _keep_origin(self, values: list[Any], step: int, extra: Any) -> None:
        """Replay mode: keep ``values`` on disk as the state to replay from (removed with the guard, or at exit)."""
        self._origin_dir = tempfile.TemporaryDirectory(prefix="zopeft-guard-")  # the previous one is removed
        path = Path(self._origin_dir.name) / "origin.safetensors"
        save_file({str(i): v.cpu() for i, v in enumerate(values)}, str(path))
        self._origin = {"file": path, "step": step, "extra": extra}
        self._carried = []

    def _since_origin(self) -> list[dict[str, Any]]:
        """Replay mode: the steps logged since the origin (those carried over a resume, then this run's)."""
        start = self._origin["step"]
        return [r for r in (*self._carried, *self.optimizer.step_log) if "rollback_to" not in r and r["step"] > start]

    def _best_state(self) -> dict[str, Any]:
        """The state after ``best_step``: the in-memory copy, or the origin with the log's updates since reapplied."""
        if self.in_memory:
            return self._best
        opt, origin = self.optimizer, self._origin
        loaded = load_file(str(origin["file"]))
        values = [loaded[str(i)].to(b.device) for i, b in enumerate(opt.points.buffers)]
        opt.points.load(values)
        opt.load_extra_state(copy.deepcopy(origin["extra"]))
        opt.reapply(r for r in self._since_origin() if r["step"] <= self.best_step)
        return opt.snapshot()

    # ----- state -------------------------------------------------------------------------------
    _COUNTERS = ("average", "best", "best_step", "above", "stalled", "rollbacks")

    def state_dict(self) -> dict[str, Any]:
        """The guard's counters and its best state (tensors), for a checkpoint."""
        state: dict[str, Any] = {k: getattr(self, k) for k in self._COUNTERS}
        if self.in_memory:
            state["best_state"] = self._best
        else:
            loaded = load_file(str(self._origin["file"]))
            state["origin"] = {"values": [loaded[str(i)] for i in range(len(loaded))], "step": self._origin["step"],
                               "extra": self._origin["extra"], "log": self._since_origin()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue guarding as the saved guard would have (load the optimizer's state first)."""
        for key in self._COUNTERS:
            setattr(self, key, state[key])
        if self.in_memory:
            self._best = state["best_state"]
        else:
            origin = state["origin"]
            self._keep_origin(origin["values"], origin["step"], origin["extra"])
            self._carried = origin.get("log", [])  # the optimizer's step_log starts empty on resume
