"""The shared machinery of every zeroth-order optimizer in zopeft.

A ZO step has two halves, mirroring ``loss.backward()`` / ``optimizer.step()``:

* :meth:`ZOOptimizer.estimate` runs the closure at the perturbed points the
  method needs (e.g. θ+εz and θ−εz) and accumulates the losses.  Calling it on
  several micro-batches before :meth:`step` is gradient accumulation (the
  same perturbations, losses averaged).
* :meth:`ZOOptimizer.step` turns the averaged losses into an update and
  applies it.  ``step(closure)`` does both halves at once.

The weights are restored bit-exactly after every evaluation: each trainable
tensor has an fp32 master copy (adapters are small), perturbed values are
written from it and the update is applied to it.  A step whose loss is not
finite is skipped with the weights untouched.  Every applied step is recorded
as a compact :class:`StepRecord` (step index, learning rates, losses), from
which :meth:`ZOOptimizer.replay` can rebuild the run without a forward pass.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypedDict

import torch
from torch import nn

from ..batched import log_evaluation_path
from ..bnb_cpu import require_exact_4bit_cpu_path
from ..distributed import ZOComm
from ..noise import NOISE_KINDS, draw_noise, noise_key

__all__ = ["Evaluation", "StepRecord", "ZOOptimizer"]

Closure = Callable[[], Any]
Evaluation = tuple[int, float] | None
"""One loss evaluation: ``(perturbation index, scale)`` for θ + scale·ε·z_k, or ``None`` for θ."""


class StepRecord(TypedDict, total=False):
    """What one step leaves in :attr:`ZOOptimizer.step_log` (a few numbers)."""

    step: int
    lr: list[float]
    losses: list[float]
    skipped: str


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
            every noise tensor.
        master_weights: keep fp32 master copies so that restores are
            bit-exact and fp16/bf16 adapters do not drift (default).  ``False``
            perturbs fp32 tensors in place (MeZO's memory, not bit-exact) and is
            refused for low-precision tensors.
        batched: evaluate a step's points in batched forward passes when the
            closure offers it (see :mod:`zopeft.batched`); otherwise, and where
            unsupported, the points are evaluated one forward pass each.
        perturbation_batch_size: points (replicas of the batch) per batched
            forward pass; ``None``: automatic.
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

    def __init__(
        self,
        params: nn.Module | Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        *,
        lr: float,
        eps: float,
        weight_decay: float = 0.0,
        noise: str = "rademacher",
        seed: int = 0,
        master_weights: bool = True,
        batched: bool = False,
        perturbation_batch_size: int | None = None,
        parallel: str | ZOComm | None = "auto",
        sync_check_steps: int = 100,
        **defaults: Any,
    ) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if noise not in NOISE_KINDS:
            raise ValueError(f"unknown noise {noise!r}; choose one of {', '.join(NOISE_KINDS)}")
        self._module = params if isinstance(params, nn.Module) else None
        if self._module is not None:
            require_exact_4bit_cpu_path(self._module)
        super().__init__(_trainable_groups(params), dict(lr=lr, weight_decay=weight_decay, **defaults))
        if perturbation_batch_size is not None and perturbation_batch_size < 1:
            raise ValueError(f"perturbation_batch_size must be >= 1, got {perturbation_batch_size}")
        if sync_check_steps < 0:
            raise ValueError(f"sync_check_steps must be >= 0, got {sync_check_steps}")
        self.comm = parallel if isinstance(parallel, ZOComm) else ZOComm.for_optimizer(parallel, self.default_parallel)
        self.sync_check_steps = int(sync_check_steps)
        self.batched = bool(batched)
        self.perturbation_batch_size = perturbation_batch_size
        self.eps = float(eps)
        self.noise = noise
        self.seed = int(seed)
        self._tensors = [p for group in self.param_groups for p in group["params"]]
        for p in self._tensors:
            if not master_weights and p.dtype != torch.float32:
                raise ValueError(
                    f"a trainable tensor is {p.dtype}: in-place perturbation of low-precision weights drifts; "
                    "use master_weights=True (fp32 master copies) or cast the trainable tensors to float32"
                )
        self._masters = [p.detach().float().clone() for p in self._tensors] if master_weights else None
        self._applied: list[tuple[int, int, float]] = []  # in-place mode: perturbations currently on θ
        self._step = 0
        self.forward_passes = 0
        self.skipped_steps = 0
        self._pending: list[float] | None = None
        self._pending_count = 0
        self._last_loss: float | None = None
        self.last_stats: dict[str, Any] = {}
        self.step_log: list[StepRecord] = []

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

    def direction(self, step: int, index: int, param: torch.Tensor, coefs: list[tuple[int, float]]) -> torch.Tensor:
        """The fp32 update direction d for one tensor (θ ← θ − lr·(d + wd·θ)); default Σ c_k·z_k."""
        d = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
        for k, c in coefs:
            d.add_(self.draw(step, k, index, param), alpha=c)
        return d

    def on_applied(self, record: StepRecord, coefs: list[tuple[int, float]]) -> None:
        """Hook run before an accepted update is applied (AdaMeZO records its window here)."""

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned."""

    # ----- noise and perturbation ------------------------------------------------------------
    @property
    def step_index(self) -> int:
        """The index of the next step (its noise keys depend on it)."""
        return self._step

    def draw(self, step: int, perturbation: int, index: int, param: torch.Tensor) -> torch.Tensor:
        """The fp32 noise z for tensor ``index`` at ``(step, perturbation)``, on the tensor's device."""
        key = noise_key(self.seed, step, perturbation, index)
        return draw_noise(param.shape, key, param.device, self.noise)

    def perturb(self, perturbation: int, scale: float) -> None:
        """Set θ ← θ₀ + scale·ε·z_k for the current step (θ₀: the unperturbed weights)."""
        if self._masters is None:  # with master copies every tensor is overwritten below
            self.restore()
        step = self._step
        for i, p in enumerate(self._tensors):
            z = self.draw(step, perturbation, i, p)
            if self._masters is None:
                p.data.add_(z, alpha=scale * self.eps)
            else:
                p.data.copy_(z.mul_(scale * self.eps).add_(self._masters[i]))
        if self._masters is None:
            self._applied.append((step, perturbation, scale))

    def restore(self) -> None:
        """Return the tensors to θ₀ (bit-exact with master weights)."""
        if self._masters is not None:
            for p, m in zip(self._tensors, self._masters):
                p.data.copy_(m)
            return
        for step, k, scale in reversed(self._applied):
            for i, p in enumerate(self._tensors):
                p.data.sub_(self.draw(step, k, i, p), alpha=scale * self.eps)
        self._applied.clear()

    # ----- the two halves of a step ----------------------------------------------------------
    @torch.no_grad()
    def estimate(self, closure: Closure) -> float:
        """Evaluate the closure at this step's perturbed points and accumulate the losses.

        The closure runs under ``no_grad`` (and with the module in eval mode when the
        optimizer was built from a module, so dropout does not blur the differences).
        With several ranks the points (perturbation parallel) or the losses (data
        parallel) are shared with one all-reduce of a few floats.
        Returns the loss at the current weights.
        """
        evaluations = self.evaluations()
        comm = self.comm
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
        self._last_loss = self.loss_at_theta(losses)
        return self._last_loss

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> float | None:  # type: ignore[override]
        """Apply one update.  With a closure, estimate first; without, use the accumulated estimate."""
        if closure is not None:
            self.estimate(closure)
        if self._pending is None:
            raise RuntimeError("no loss estimate to apply: pass a closure to step() or call estimate(closure) first")
        losses = [x / self._pending_count for x in self._pending]
        micro_batches, self._pending, self._pending_count = self._pending_count, None, 0
        record: StepRecord = {"step": self._step, "lr": [g["lr"] for g in self.param_groups], "losses": losses}
        self._apply(record)
        self.step_log.append(record)
        self._step += 1
        self.last_stats = {
            "step": record["step"],
            "loss": self.loss_at_theta(losses),
            "lr": record["lr"][0],
            "forward_passes": self.forward_passes,
            "skipped_steps": self.skipped_steps,
            **({"skipped": record["skipped"]} if "skipped" in record else {}),
            **self.step_stats(losses),
        }
        if self.comm is not None:
            self.last_stats["comm_bytes"] = micro_batches * self.comm.payload_bytes(len(losses))
            if self.sync_check_steps and self._step % self.sync_check_steps == 0:
                self.check_replicas()
        return self.last_stats["loss"]

    def check_replicas(self) -> None:
        """Raise :class:`~zopeft.distributed.ReplicaDivergence` unless all ranks hold bit-identical tensors."""
        if self.comm is not None:
            self.comm.check_sync(self._masters or self._tensors, self._step)

    @torch.no_grad()
    def replay(self, records: Iterable[StepRecord]) -> None:
        """Re-apply logged steps (from :attr:`step_log`) without any forward pass."""
        for record in records:
            self._step = record["step"]
            self._apply(dict(record))  # type: ignore[arg-type]
            self._step += 1

    # ----- internals -------------------------------------------------------------------------
    def _evaluate(self, closure: Closure, evaluations: list[Evaluation]) -> tuple[list[float], int]:
        """The losses at ``evaluations`` (NaN after the first non-finite one) and how many were evaluated."""
        batched = getattr(closure, "losses", None) if self.batched else None
        if callable(batched):  # e.g. zopeft.batched.loss_closure: all points in few forward passes
            with self._eval_mode():
                done = batched(self, evaluations)
            if done is not None:  # None: unsupported here, evaluate sequentially
                n = next((j + 1 for j, x in enumerate(done) if not math.isfinite(x)), len(evaluations))
                return list(done[:n]) + [math.nan] * (len(evaluations) - n), n
        elif self.batched:
            log_evaluation_path(
                self, "sequential", "the closure offers no batched evaluation; see zopeft.batched.loss_closure"
            )
        losses: list[float] = []
        with self._eval_mode():
            try:
                for ev in evaluations:
                    if ev is None:
                        self.restore()
                    else:
                        self.perturb(*ev)
                    losses.append(_as_float(closure()))
                    if not math.isfinite(losses[-1]):
                        break
            finally:
                self.restore()
        evaluated = len(losses)
        return losses + [math.nan] * (len(evaluations) - evaluated), evaluated

    def _apply(self, record: StepRecord) -> None:
        losses = record["losses"]
        coefs = self.coefficients(losses) if all(map(math.isfinite, losses)) else "non-finite loss"
        record.pop("skipped", None)
        if isinstance(coefs, str):
            record["skipped"] = coefs
            self.skipped_steps += 1
            return
        self.on_applied(record, coefs)
        step, index = record["step"], 0
        for group, lr in zip(self.param_groups, record["lr"]):
            wd = group["weight_decay"]
            for p in group["params"]:
                d = self.direction(step, index, p, coefs)
                theta = p.data if self._masters is None else self._masters[index]
                if wd:
                    d.add_(theta, alpha=wd)
                theta.sub_(d.to(theta.dtype), alpha=lr)
                if self._masters is not None:
                    p.data.copy_(theta)
                index += 1

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        module = self._module
        if module is None or not module.training:
            yield
            return
        module.eval()
        try:
            yield
        finally:
            module.train()

    # ----- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """Step count, run seed, counters, hyperparameters and method state (e.g. AdaMeZO's window).

        fp32 master copies are included only where a trainable tensor is fp16/bf16
        (there the master holds bits the model's own weights cannot).
        """
        state: dict[str, Any] = {
            "step": self._step,
            "seed": self.seed,
            "eps": self.eps,
            "noise": self.noise,
            "forward_passes": self.forward_passes,
            "skipped_steps": self.skipped_steps,
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
            "extra": self.extra_state(),
        }
        if self._masters is not None and any(p.dtype != torch.float32 for p in self._tensors):
            state["masters"] = [m.clone() for m in self._masters]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:  # type: ignore[override]
        """Continue a run: the model's trainable tensors must already hold the saved weights."""
        if len(state["param_groups"]) != len(self.param_groups):
            raise ValueError(
                f"optimizer state has {len(state['param_groups'])} param groups, this optimizer "
                f"{len(self.param_groups)}: was it saved for a different model or adapter?"
            )
        self._step = int(state["step"])
        self.seed = int(state["seed"])
        self.eps = float(state["eps"])
        self.noise = state["noise"]
        self.forward_passes = int(state["forward_passes"])
        self.skipped_steps = int(state["skipped_steps"])
        for group, saved in zip(self.param_groups, state["param_groups"]):
            group.update(saved)
        self.load_extra_state(state["extra"])
        self.sync_masters(state.get("masters"))

    @torch.no_grad()
    def sync_masters(self, masters: list[torch.Tensor] | None = None) -> None:
        """Re-read the master copies from the model (after its weights were loaded) or from ``masters``."""
        if self._masters is None:
            return
        for i, p in enumerate(self._tensors):
            self._masters[i].copy_(p.detach().float() if masters is None else masters[i])
            if masters is not None:
                p.data.copy_(self._masters[i])


def _as_float(loss: Any) -> float:
    if isinstance(loss, torch.Tensor):
        return float(loss.detach().float().mean())
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
