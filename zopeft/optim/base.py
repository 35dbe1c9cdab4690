"""The shared machinery of every zeroth-order optimizer in zopeft.

A ZO step has two halves, mirroring ``loss.backward()`` / ``optimizer.step()``:

* :meth:`ZOOptimizer.estimate` runs the closure at the perturbed points the
  method needs (e.g. θ+εz and θ−εz) and accumulates the losses.  Calling it on
  several micro-batches before :meth:`step` is gradient accumulation (the
  same perturbations, losses averaged).
* :meth:`ZOOptimizer.step` turns the averaged losses into an update and
  applies it.  ``step(closure)`` does both halves at once.

The trainable tensors and their points are owned by :attr:`ZOOptimizer.points`
(:class:`~zopeft.optim.points.Points`: flat fp32 master buffers, one noise draw
per buffer), so the weights are restored bit-exactly after every evaluation and a
step costs a constant number of tensor operations however many tensors there are.
A step whose loss is not finite, or whose update would make a weight non-finite,
is skipped with the weights untouched.  Every step is recorded as a compact
:class:`StepRecord` (step index, learning rates, losses; the first one also the seed and a
fingerprint of the weights it started from), from which :meth:`ZOOptimizer.replay` rebuilds
the run without a forward pass, refusing weights or a seed other than the run's.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypedDict

import torch
from torch import nn

from ..bnb_cpu import require_exact_4bit_cpu_path
from ..distributed import ZOComm
from ..noise import NOISE_FORMAT
from . import eps_check
from .evaluation_log import report_path
from .points import Buffer, Point, Points
from .settings import BASE, parse_memory
from .step_records import checked_records

__all__ = ["Evaluation", "StepRecord", "ZOOptimizer"]

logger = logging.getLogger("zopeft")

Closure = Callable[[], Any]
Evaluation = Point
"""One loss evaluation: ``(perturbation index, scale)`` for θ + scale·ε·z_k, or ``None`` for θ."""


class StepRecord(TypedDict, total=False):
    """What one step leaves in :attr:`ZOOptimizer.step_log` (a few numbers).

    The first step of an optimizer (and the first after :meth:`~ZOOptimizer.load_state_dict`, or
    after trainable tensors were written outside it) also records ``seed`` and ``start``, the
    fingerprint of the weights the step began from, which :meth:`~ZOOptimizer.replay` checks.
    """

    step: int
    lr: list[float]
    losses: list[float]
    skipped: str
    seed: int
    start: int


class ZOOptimizer(torch.optim.Optimizer):
    """Base class: seeded perturbations, exact restore, update, statistics and state.

    Args:
        params: a module (its tensors with ``requires_grad``), an iterable of
            tensors, or torch.optim-style param groups (per-group ``lr`` and
            ``weight_decay``).
        lr: learning rate.
        eps: perturbation scale ε.
        weight_decay: decoupled weight decay, θ ← θ − lr·wd·θ.
        noise: ``"rademacher"`` (±1, default) or ``"gaussian"``.
        seed: run seed; with the step and perturbation index it determines
            every noise vector.
        master_weights: keep fp32 master copies so that restores are
            bit-exact and fp16/bf16 adapters do not drift (default).  ``False``
            perturbs fp32 tensors in place (MeZO's memory, not bit-exact) and is
            refused for low-precision tensors.
        batched: evaluate a step's points in batched forward passes when the
            closure offers it (see :mod:`zopeft.batched`); otherwise, and where
            unsupported, the points are evaluated one forward pass each.
        perturbation_batch_size: points (replicas of the batch) per batched
            forward pass; ``None``: automatic (see :mod:`zopeft.batched.memory`).
        max_memory: peak device memory (bytes, or a string such as ``"12GB"``)
            the automatic ``perturbation_batch_size`` keeps a step under.
        parallel: how ranks share a step under ``torch.distributed`` (see
            :mod:`zopeft.distributed`): ``"perturbation"`` (the step's points are
            divided among ranks that all see the same batch), ``"data"`` (each rank
            evaluates every point on its own batch), ``"auto"`` (default: the
            method's :attr:`default_parallel` when the job has several ranks, else
            single-process), ``None`` (single-process) or a ready :class:`ZOComm`.
        sync_check_steps: with several ranks, compare a checksum of the trainable
            tensors across ranks every this many steps (0: never); a mismatch raises
            :class:`~zopeft.distributed.ReplicaDivergence`.

    :attr:`forward_passes` counts loss evaluations (model evaluations at one
    point) of the whole job, whether they ran as separate forward passes or as
    replicas in one batched pass; evaluation stops at the first non-finite loss.
    """

    default_parallel = "data"
    settings = BASE

    def __init__(
        self,
        params: nn.Module | Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        *,
        lr: float,
        eps: float,
        weight_decay: float = 0.0,
        noise: str = BASE["noise"].default,
        seed: int = 0,
        master_weights: bool = BASE["master_weights"].default,
        batched: bool = BASE["batched"].default,
        perturbation_batch_size: int | None = BASE["perturbation_batch_size"].default,
        max_memory: int | str | None = BASE["max_memory"].default,
        parallel: str | ZOComm | None = BASE["parallel"].default,
        sync_check_steps: int = BASE["sync_check_steps"].default,
    ) -> None:
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"lr must be a finite number >= 0, got {lr}")
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a finite number > 0, got {eps}")
        if not (math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay}")
        if perturbation_batch_size is not None and perturbation_batch_size < 1:
            raise ValueError(f"perturbation_batch_size must be >= 1, got {perturbation_batch_size}")
        if sync_check_steps < 0:
            raise ValueError(f"sync_check_steps must be >= 0, got {sync_check_steps}")
        if isinstance(params, nn.Module):  # torch.compile(model): the tensors and modes are the original's
            params = getattr(params, "_orig_mod", params)
        self._module = params if isinstance(params, nn.Module) else None
        if self._module is not None:
            require_exact_4bit_cpu_path(self._module)
        super().__init__(_trainable_groups(params), dict(lr=lr, weight_decay=weight_decay))
        self.points = Points(
            [g["params"] for g in self.param_groups], eps=eps, seed=seed, noise=noise, master_weights=master_weights
        )
        self.comm = parallel if isinstance(parallel, ZOComm) else ZOComm.for_optimizer(parallel, self.default_parallel)
        self.sync_check_steps = int(sync_check_steps)
        self.batched = bool(batched)
        self.perturbation_batch_size = perturbation_batch_size
        parse_memory(max_memory)  # a bad size is refused here, not at the first batched step
        self.max_memory = max_memory
        self._step = 0
        self.forward_passes = 0
        self.skipped_steps = 0
        self._pending: list[float] | None = None
        self._pending_count = 0
        self.last_stats: dict[str, Any] = {}
        self.step_log: list[StepRecord] = []
        self._start: int | None = None  # the fingerprint the next step records as its start (None: none to record)
        self._new_start = True  # whether the next step begins a stretch of the log (a fresh or reloaded optimizer)
        self._owned: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()

    # ----- what a method defines -------------------------------------------------------------
    def evaluations(self) -> list[Evaluation]:
        """The perturbed points at which one step evaluates the loss."""
        raise NotImplementedError

    def coefficients(self, losses: list[float]) -> list[tuple[int, float]] | str:
        """Map the step's losses to ``[(perturbation index, coefficient), ...]``, or a skip reason."""
        raise NotImplementedError

    def loss_at_theta(self, losses: list[float]) -> float:
        """The loss reported for the current (unperturbed) weights."""
        raise NotImplementedError

    def step_stats(self, losses: list[float]) -> dict[str, Any]:
        """Method-specific statistics for :attr:`last_stats`."""
        return {}

    def direction(self, step: int, buffer: Buffer, coefs: list[tuple[int, float]]) -> torch.Tensor:
        """The flat fp32 update direction d of one buffer (θ ← θ − lr·(d + wd·θ)); default Σ c_k·z_k."""
        return self.points.combination(step, buffer, coefs)

    def on_applied(self, record: StepRecord, coefs: list[tuple[int, float]]) -> None:
        """Hook run after an update was applied (AdaMeZO records its window here)."""

    def extra_state(self) -> dict[str, Any]:
        """The method's own state for :meth:`state_dict` (tensors are saved as safetensors); none here."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned."""

    # ----- the point owner's settings, as torch.optim-style attributes -----------------------
    @property
    def eps(self) -> float:
        """The perturbation scale ε."""
        return self.points.eps

    @property
    def seed(self) -> int:
        """The run seed every step's noise is derived from."""
        return self.points.seed

    @property
    def noise(self) -> str:
        """The noise distribution: ``rademacher`` or ``gaussian``."""
        return self.points.noise

    @property
    def step_index(self) -> int:
        """The index of the next step (its noise keys depend on it)."""
        return self._step

    def perturb(self, perturbation: int, scale: float) -> None:
        """Set θ ← θ₀ + scale·ε·z_k for the current step (θ₀: the unperturbed weights)."""
        self._adopt()
        self.points.write(self._step, (perturbation, scale))

    def restore(self) -> None:
        """Return the tensors to θ₀ (bit-exact with master weights)."""
        self._adopt()
        self.points.restore()

    @contextlib.contextmanager
    def evaluation_mode(self, model: nn.Module | None = None) -> Iterator[None]:
        """Evaluate with the module in eval mode (no dropout), restoring its mode after.

        The module is the one the optimizer was built from, else ``model`` (a closure's model)
        when the trainable tensors belong to it.
        """
        owned = isinstance(model, nn.Module) and self._owns(model)
        module = self._module if self._module is not None else (model if owned else None)
        if module is None or not module.training:
            yield
            return
        module.eval()
        try:
            yield
        finally:
            module.train()

    # ----- the two halves of a step ----------------------------------------------------------
    @torch.no_grad()
    def estimate(self, closure: Closure) -> float:
        """Evaluate the closure at this step's perturbed points and accumulate the losses.

        The closure runs under ``no_grad`` and with the model in eval mode (the module the
        optimizer was built from, or the model of a :func:`zopeft.loss_closure`), so dropout
        does not blur the differences.  With several ranks the points (perturbation parallel)
        or the losses (data parallel) are shared with one all-reduce of a few floats.
        Returns the loss at the current weights.
        """
        self._check_closure(closure)
        if self._pending is None:  # a step begins from the model's weights, even if changed outside
            self._adopt()
            if self._new_start:  # before any point is written (in place, restoring is not bit-exact)
                self._start, self._new_start = self.points.fingerprint(), False
        evaluations = self.evaluations()
        comm = self.comm
        with self.evaluation_mode(getattr(closure, "model", None)):
            if comm is None:
                losses, evaluated = self._evaluate(closure, evaluations)
            else:
                mine, evaluated = self._evaluate(closure, [evaluations[i] for i in comm.assigned(len(evaluations))])
                losses, evaluated = comm.combine(mine, len(evaluations), evaluated)
        self.forward_passes += evaluated
        if self._pending is None:
            self._pending, self._pending_count = losses, 1
        else:
            self._pending = [a + b for a, b in zip(self._pending, losses)]
            self._pending_count += 1
        return self.loss_at_theta(losses)

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> float | None:  # type: ignore[override]
        """Apply one update.  With a closure, estimate first; without, use the accumulated estimate."""
        if closure is not None:
            self.estimate(closure)
        if self._pending is None:
            raise RuntimeError("no loss estimate to apply: pass a closure to step() or call estimate(closure) first")
        losses = [x / self._pending_count for x in self._pending]
        micro_batches, self._pending, self._pending_count = self._pending_count, None, 0
        lrs = [g["lr"] * g.get("lr_scale", 1.0) for g in self.param_groups]  # the guard's backoff on top of a scheduler
        record: StepRecord = {"step": self._step, "lr": lrs, "losses": losses}
        if self._start is not None:
            record.update(seed=self.seed, start=self._start)
            self._start = None
        self._advance(record)
        if self.comm is not None:
            self.last_stats["comm_bytes"] = micro_batches * self.comm.payload_bytes(len(losses))
            if self.sync_check_steps and self._step % self.sync_check_steps == 0:
                self.check_replicas()
        return self.last_stats["loss"]

    @torch.no_grad()
    def check_eps(
        self, closure: Closure, directions: int = eps_check.DIRECTIONS, scales: Iterable[float] = eps_check.SCALES
    ) -> eps_check.EpsCheck:
        """Whether the loss differences at ε come from the loss's slope or the forward pass's rounding.

        Evaluates the closure at θ ± s·ε·z_k (s = 1, 2, 3) for ``directions`` directions of this
        step's noise, and, while ε fails, at each larger ``scales`` multiple of it (see
        :mod:`zopeft.optim.eps_check`).  The weights are restored exactly; nothing is counted in
        :attr:`forward_passes` or logged, and the next step is unchanged.
        """
        self._check_closure(closure)
        self._adopt()
        noise: dict[float, float] = {}
        differences: list[float] = []
        spent = 0
        with self.evaluation_mode(getattr(closure, "model", None)):
            for scale in scales:
                losses, evaluated = self._evaluate(closure, eps_check.evaluations(directions, scale))
                spent += evaluated
                differences = differences or [row[0] for row in eps_check.central_differences(losses)]
                noise[scale * self.eps] = eps_check.noise_ratio(losses)
                if noise[scale * self.eps] <= eps_check.MAX_NOISE:
                    break
        return eps_check.EpsCheck(self.eps, noise, differences, directions, spent)

    def check_replicas(self) -> None:
        """Raise :class:`~zopeft.distributed.ReplicaDivergence` unless all ranks hold bit-identical tensors."""
        if self.comm is not None:
            self.comm.check_sync(self.points.fingerprint(), self._step)

    @torch.no_grad()
    def replay(self, records: Iterable[StepRecord]) -> None:
        """Re-apply logged steps (from :attr:`step_log`) without any forward pass.

        Replay continues this optimizer: the first record must be its next step (a fresh
        optimizer over the run's starting weights replays a log from step 0).  A rollback
        record (``{"step", "rollback_to", "lr_scale"}``, written by :class:`zopeft.Guard`)
        returns the weights to the state after step ``rollback_to`` and sets the groups'
        learning-rate scales, as the run did.  A log that records its seed and starting weights
        (``seed``, ``start``) is refused, before any step is applied, by an optimizer with another
        seed or over other weights (e.g. ones that already hold the trained adapter).
        """
        records = checked_records(records)
        seeds = sorted({r["seed"] for r in records if "seed" in r} - {self.seed})
        if seeds:
            raise ValueError(f"replay: the log was recorded with seed {seeds[0]}, this optimizer has seed {self.seed}: "
                             f"build it with seed={seeds[0]}")
        for i, record in enumerate(records):
            rates = record["lr"] if "lr" in record else record["lr_scale"]
            if len(rates) != len(self.param_groups):
                raise ValueError(f"replay: record {i} has learning rates for {len(rates)} param group(s), this "
                                 f"optimizer has {len(self.param_groups)}")
        self._adopt()
        began = self._step
        targets = {r["rollback_to"] for r in records if "rollback_to" in r}
        kept = {self._step - 1: self.snapshot()} if self._step - 1 in targets else {}
        for record in records:
            if "rollback_to" in record:
                self.rollback(kept[record["rollback_to"]], record["lr_scale"], record)
                continue
            if record["step"] != self._step:
                raise ValueError(
                    f"replay: the log's step {record['step']} is not this optimizer's next step {self._step}; "
                    "replay onto the run's starting weights with a fresh optimizer (same seed)"
                )
            if "start" in record:
                self._check_start(record, began)
            self._advance({k: v for k, v in record.items() if k != "skipped"})  # type: ignore[arg-type]
            self.last_stats["replayed"] = True
            if record["step"] in targets:
                kept[record["step"]] = self.snapshot()
        if records:  # the log goes on from the replayed weights
            self._new_start = False

    def snapshot(self) -> dict[str, Any]:
        """The trainable values and the method state (e.g. AdaMeZO's window), for :meth:`rollback`."""
        self._adopt()
        return {"values": self.points.snapshot(), "extra": copy.deepcopy(self.extra_state())}

    @torch.no_grad()
    def rollback(self, snapshot: dict[str, Any], lr_scale: list[float], record: dict[str, Any]) -> None:
        """Return to ``snapshot``, scale each group's learning rate by ``lr_scale`` (on top of any
        scheduler) and log ``record`` in :attr:`step_log` so that :meth:`replay` repeats it."""
        self.points.load(snapshot["values"])
        self.load_extra_state(copy.deepcopy(snapshot["extra"]))
        for group, scale in zip(self.param_groups, lr_scale):
            group["lr_scale"] = scale
        self.step_log.append(record)  # type: ignore[arg-type]

    # ----- internals -------------------------------------------------------------------------
    def _check_closure(self, closure: Closure) -> None:
        """Refuse a batched closure (zopeft.loss_closure, metric_closure) over a model that holds none of the
        trainable tensors: no step could change its loss."""
        model = getattr(closure, "model", None)
        if callable(getattr(closure, "losses", None)) and isinstance(model, nn.Module) and not self._owns(model):
            raise ValueError(
                "the closure's model holds none of this optimizer's trainable tensors, so its steps could not change "
                "the loss: build the optimizer from the model the closure evaluates (after wrapping it with PEFT)"
            )

    def _check_start(self, record: StepRecord, began: int) -> None:
        """Refuse to replay ``record`` unless the weights are the ones its step began from in the run."""
        if record["start"] == self.points.fingerprint():
            return
        if record["step"] == began:
            raise ValueError(
                f"replay: these are not the weights step {record['step']} of the log began from (their fingerprint "
                f"{self.points.fingerprint()}, the log's {record['start']}), e.g. weights that already hold the "
                "trained adapter, another model or adapter initialisation: replay onto the run's starting weights"
            )
        raise ValueError(
            f"replay: at step {record['step']} the run went on from weights that the steps before it do not rebuild "
            f"(written outside its optimizer, e.g. loaded from elsewhere): the log alone cannot rebuild the run; this "
            f"optimizer now holds the replayed steps {began}-{record['step'] - 1}"
        )

    def _adopt(self) -> None:
        """Continue from the trainable tensors written outside the optimizer since it last wrote them."""
        self._check_tensors()
        changed = self.points.adopt_outside_writes()
        self._new_start = self._new_start or bool(changed)  # the log alone does not lead to these weights
        if changed and self._step:
            logger.warning("zopeft: %d trainable tensor(s) were written outside the optimizer before step %d; it "
                           "continues from them (as torch.optim would), but its step log alone no longer rebuilds "
                           "the run (replay, a Guard in replay mode)", changed, self._step)

    def _advance(self, record: StepRecord) -> None:
        """Apply (or skip) the update of ``record``, log it and move to the next step."""
        self._apply(record)
        if "skipped" in record:
            self.skipped_steps += 1
        self.step_log.append(record)
        self._step += 1
        lrs, losses = record["lr"], record["losses"]
        self.last_stats = {
            "step": record["step"],
            "loss": self.loss_at_theta(losses),
            "lr": lrs[0] if len(lrs) == 1 else list(lrs),
            "forward_passes": self.forward_passes,
            "skipped_steps": self.skipped_steps,
            **({"skipped": record["skipped"]} if "skipped" in record else {}),
            **self.step_stats(losses),
        }

    def _check_tensors(self) -> None:
        """Refuse to go on over tensors the model no longer trains, or that changed dtype or device since."""
        for b in self.points.buffers:
            for t in b.tensors:
                if not t.requires_grad:
                    raise RuntimeError(
                        f"zopeft: {self._tensor_name(t)} no longer requires grad (model.set_adapter(...) or "
                        "requires_grad_(False) since the optimizer was built?): its steps would move tensors the model "
                        "no longer trains and change nothing; build a new optimizer over the model's trainable tensors"
                    )
                if t.dtype != b.dtype or t.device != b.device:
                    raise RuntimeError(
                        f"zopeft: {self._tensor_name(t)} is now {t.dtype} on {t.device}, the optimizer was built over "
                        f"it as {b.dtype} on {b.device} (model.to(...) after building it?): build the optimizer after "
                        "casting or moving the model"
                    )

    def _tensor_name(self, tensor: torch.Tensor) -> str:
        """The trainable tensor's parameter name (an optimizer built from a module), else its place in the groups."""
        named = self._module.named_parameters() if self._module is not None else ()
        name = next((n for n, p in named if p is tensor), None)
        if name is not None:
            return f"trainable tensor {name!r}"
        group, index = next((g, i) for g, group in enumerate(self.param_groups)
                            for i, p in enumerate(group["params"]) if p is tensor)
        return f"trainable tensor {index} of param group {group}"

    def _apply(self, record: StepRecord) -> None:
        """The update of ``record`` (its step's noise, losses and learning rates); a skip reason goes into it."""
        losses = record["losses"]
        coefs = self.coefficients(losses) if all(map(math.isfinite, losses)) else "non-finite loss"
        if isinstance(coefs, str):
            record["skipped"] = coefs
            return
        directions = [self.direction(record["step"], b, coefs) for b in self.points.buffers]
        weight_decays = [g["weight_decay"] for g in self.param_groups]
        if self.points.apply(directions, record["lr"], weight_decays):
            self.on_applied(record, coefs)
        else:
            record["skipped"] = "non-finite update"

    @torch.no_grad()
    def reapply(self, records: Iterable[StepRecord]) -> None:
        """Apply logged steps' updates to the current weights, without moving the step counter or logging them."""
        for record in records:
            self._apply({k: v for k, v in record.items() if k != "skipped"})  # type: ignore[arg-type]

    def _evaluate(self, closure: Closure, evaluations: list[Evaluation]) -> tuple[list[float], int]:
        """The losses at ``evaluations`` (NaN after the first non-finite one) and how many were evaluated."""
        batched = getattr(closure, "losses", None) if self.batched else None
        if callable(batched):  # e.g. zopeft.loss_closure: all points in few forward passes
            done = batched(self, evaluations)
            if done is not None:  # None: unsupported here, evaluate sequentially
                n = next((j + 1 for j, x in enumerate(done) if not math.isfinite(x)), len(evaluations))
                return list(done[:n]) + [math.nan] * (len(evaluations) - n), n
        elif self.batched:
            report_path(
                self, "sequential", "the closure offers no batched evaluation; see zopeft.loss_closure", slower=True
            )
        losses: list[float] = []
        try:
            for ev in evaluations:
                self.points.write(self._step, ev)
                losses.append(_as_float(closure()))
                if not math.isfinite(losses[-1]):
                    break
        finally:
            self.points.restore()
        evaluated = len(losses)
        return losses + [math.nan] * (len(evaluations) - evaluated), evaluated

    def _owns(self, model: nn.Module) -> bool:
        """Whether trainable tensors are parameters of ``model`` (checked once per model, with its 4-bit layers)."""
        owned = self._owned.get(model)
        if owned is None:
            mine = {id(t) for t in self.points.tensors}
            owned = self._owned[model] = any(id(p) in mine for p in model.parameters())
            if owned:
                require_exact_4bit_cpu_path(model)
        return owned

    # ----- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """Step count, run seed, counters, hyperparameters, method state (e.g. AdaMeZO's window)
        and a checksum of the trainable tensors the state belongs to.

        fp32 master buffers are included only where a trainable tensor is fp16/bf16
        (there the master holds bits the model's own weights cannot).
        """
        self._adopt()
        state: dict[str, Any] = {
            "optimizer": type(self).__name__,
            "noise_format": NOISE_FORMAT,
            "layout": self.points.layout(),
            "fingerprint": self.points.fingerprint(model=True),
            "step": self._step,
            "seed": self.seed,
            "eps": self.eps,
            "noise": self.noise,
            "forward_passes": self.forward_passes,
            "skipped_steps": self.skipped_steps,
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
            "extra": self.extra_state(),
        }
        if self.points.needs_saved_masters():
            state["masters"] = self.points.masters()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:  # type: ignore[override]
        """Continue a run: the model's trainable tensors must already hold the saved weights."""
        missing = [key for key in _STATE_KEYS if key not in state] if isinstance(state, Mapping) else list(_STATE_KEYS)
        if missing:
            raise ValueError(f"not a zopeft optimizer state (it lacks {', '.join(missing)}): pass what a ZO "
                             "optimizer's state_dict() returned (zopeft.checkpoint.load_state reads a saved one)")
        saved = state.get("optimizer", type(self).__name__)  # older states do not name it
        if saved != type(self).__name__:
            raise ValueError(f"optimizer state was saved by {saved}, this optimizer is {type(self).__name__}: "
                             f"continue the run with {saved}")
        found = state.get("noise_format", 1)
        if found != NOISE_FORMAT:
            raise ValueError(
                f"optimizer state has noise format {found} (zopeft 0.1 drew one noise stream per tensor); this "
                f"zopeft draws format {NOISE_FORMAT} (one stream per flat buffer), so the run cannot continue "
                "bit-identically: start a new run, or finish this one with the zopeft version that began it"
            )
        if state["layout"] != self.points.layout():
            raise ValueError(
                f"optimizer state was saved for trainable tensors laid out as {state['layout']}, this optimizer has "
                f"{self.points.layout()} ([group, device, dtype, elements] per buffer): was it saved for a "
                "different model, adapter or param groups?"
            )
        if self.points.fingerprint(model=True) != state["fingerprint"]:
            raise ValueError(
                "the model's trainable tensors are not the ones this optimizer state was saved with: load the "
                "adapter weights saved beside the state first (PeftModel.from_pretrained(..., is_trainable=True) "
                "or set_peft_model_state_dict), then call load_state_dict"
            )
        self._step = int(state["step"])
        self.points.seed = int(state["seed"])
        self.points.eps = float(state["eps"])
        self.points.noise = state["noise"]
        self.forward_passes = int(state["forward_passes"])
        self.skipped_steps = int(state["skipped_steps"])
        for group, saved in zip(self.param_groups, state["param_groups"]):
            group.update(saved)
        self.load_extra_state(state["extra"])
        if "masters" in state:
            self.points.load_masters(state["masters"])
        else:
            self.points.sync_from_model()
        self._new_start = True  # a resumed run's log goes on from these weights

    def sync_masters(self) -> None:
        """Re-read every master copy from the model.

        Tensors written in place outside the optimizer (``load_state_dict``, ``copy_``) are re-read
        at the next step by themselves; writes through ``param.data``, by torch.distributed
        collectives or by custom kernels are not counted by torch, hence this call.
        """
        self.points.sync_from_model()


_STATE_KEYS = ("step", "seed", "eps", "noise", "forward_passes", "skipped_steps", "param_groups", "extra")


def _as_float(loss: Any) -> float:
    """A closure's loss as a float: a number or a tensor (a per-example tensor is averaged)."""
    if isinstance(loss, torch.Tensor):
        return float(loss.detach().float().mean())
    if loss is None:
        raise TypeError("the closure returned None instead of the loss: return it (e.g. return model(**batch).loss; "
                        "a model given no labels computes no loss)")
    if isinstance(loss, (str, bytes, bool)):
        raise TypeError(f"the closure returned a {type(loss).__name__}; return the loss as a number or a tensor")
    return float(loss)


def _trainable_groups(params: Any) -> list[dict[str, Any]]:
    """Normalise the ``params`` argument to groups of trainable floating-point tensors."""
    if isinstance(params, nn.Module):
        params = params.parameters()
    items = list(params)
    groups = items if items and isinstance(items[0], dict) else [{"params": items}]
    out = []
    for group in groups:
        tensors = [p for p in group["params"] if p.requires_grad]
        for p in tensors:
            if not p.is_floating_point():
                raise ValueError(
                    f"a trainable tensor has dtype {p.dtype}: zopeft only perturbs floating-point tensors "
                    "(quantized base weights must be frozen; wrap the model with a PEFT adapter)"
                )
        if tensors:
            out.append({**group, "params": tensors})
    if not out:
        raise ValueError(
            "no trainable tensors: pass a module or tensors with requires_grad=True "
            "(e.g. a model wrapped with peft.get_peft_model)"
        )
    return out
