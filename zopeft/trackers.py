"""``report_to``: a run's metrics in TensorBoard and/or Weights & Biases, against forward passes.

Every record the runner writes to ``trainer_log.jsonl`` is passed on as ``train/loss``,
``train/loss_ema``, ``train/learning_rate``, ``train/global_step``, ``train/zo_<statistic>``
(``sigma``, ``projected_grad``, ``skipped_steps``, ...) and ``eval/<metric>``, with the
forward-pass equivalents so far as the x-axis (forward passes + 2 per backward pass, so that ZO
and AdamW runs compare per cost: TensorBoard's step; wandb's ``forward_equivalents`` step metric).
TensorBoard writes ``output_dir/runs/``, wandb ``output_dir/wandb/`` (``WANDB_MODE=offline``
needs no network; ``WANDB_PROJECT`` names the project, default ``zopeft``).
:func:`tracker_problem` says, before a run writes anything, what would stop a tracker from starting.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Protocol

__all__ = ["TRACKER_DIRS", "Trackers", "scalars", "tracker_problem"]

AXES = ("forward_passes", "forward_equivalents")  # x-axis counts, not metrics
TRACKER_DIRS = {"tensorboard": "runs", "wandb": "wandb"}  # what each writes in output_dir


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a log record under the names the trackers show."""
    names = {"loss": "train/loss", "loss_ema": "train/loss_ema", "lr": "train/learning_rate", "step": "train/global_step"}
    out = {}
    for key, value in record.items():
        if key in AXES or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        section, _, name = key.partition("_")
        out[f"{section}/{name}" if section in ("eval", "select") else names.get(key, f"train/zo_{key}")] = value
    return out


class _Tracker(Protocol):
    def log(self, metrics: dict[str, float], x: int) -> None: ...

    def close(self) -> None: ...


class _TensorBoard:
    def __init__(self, output_dir: Path, config: dict[str, Any], resumed_at: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run drops what the killed run logged after its checkpoint
        self.writer = SummaryWriter(log_dir=str(output_dir / TRACKER_DIRS["tensorboard"]), purge_step=resumed_at + 1 if resumed_at else None)

    def log(self, metrics: dict[str, float], x: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=x)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, output_dir: Path, config: dict[str, Any], resumed_at: int) -> None:
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "zopeft"), name=output_dir.name,
                              dir=str(output_dir), config=config)
        self.run.define_metric("forward_equivalents")
        self.run.define_metric("*", step_metric="forward_equivalents")

    def log(self, metrics: dict[str, float], x: int) -> None:
        self.run.log({**metrics, "forward_equivalents": x})

    def close(self) -> None:
        self.run.finish()


_BACKENDS: dict[str, type[_Tracker]] = {"tensorboard": _TensorBoard, "wandb": _WandB}


def _wandb_problem() -> str | None:
    """Why wandb would fail to start: in online mode (``WANDB_MODE``), no credentials (the environment,
    ``wandb login``'s .netrc, its settings) or malformed ones, and no terminal to ask on."""
    import wandb

    try:
        from wandb.sdk.lib import wbauth
    except ImportError:  # an older wandb (no wbauth): its own start-up says what is missing
        return None
    settings = wandb.Settings()
    settings.update_from_env_vars(dict(os.environ))
    if settings.mode in ("offline", "dryrun", "disabled") or (sys.stdin is not None and sys.stdin.isatty()):
        return None
    try:
        found = wbauth.authenticate_session(host=settings.base_url, source="zopeft", prompt=False, update_session=False)
    except Exception as err:  # e.g. a WANDB_API_KEY of the wrong form
        return f"wandb cannot log in: {str(err).splitlines()[0] if str(err) else err!r}"
    if found is None:
        return ("wandb has no login here (no WANDB_API_KEY, no `wandb login` credentials, no terminal to ask on); run "
                "`wandb login`, set WANDB_API_KEY, or set WANDB_MODE=offline (it logs to output_dir/wandb without a "
                "network)")
    return None


def tracker_problem(names: list[str]) -> str | None:
    """What would stop one of the ``report_to`` trackers from starting (checked before a run writes anything)."""
    return _wandb_problem() if "wandb" in names else None


class Trackers:
    """The recipe's ``report_to`` backends; :meth:`log` takes the runner's log records.

    ``resumed_at``: the forward-pass equivalents at the checkpoint a run resumes from (0 for a new run).
    """

    def __init__(self, names: list[str], output_dir: Path, config: dict[str, Any], resumed_at: int = 0) -> None:
        self.backends: list[_Tracker] = []
        try:
            for name in names:
                self.backends.append(_BACKENDS[name](output_dir, config, resumed_at))
        except BaseException as err:  # e.g. wandb failing to start: the backends already started are closed
            self.close()
            if isinstance(err, Exception):
                raise ValueError(f"report_to: {name} could not start: {str(err).splitlines()[0] if str(err) else err!r}") from err
            raise

    def log(self, record: dict[str, Any]) -> None:
        metrics = scalars(record)
        for backend in self.backends:
            backend.log(metrics, record.get("forward_equivalents", record["forward_passes"]))

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
