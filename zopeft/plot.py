"""Training curves against forward-pass equivalents (needs the ``plot`` extra: matplotlib).

Left: the training loss of each logged step (one mini-batch, noisy), its moving average
(``loss_ema``) and the eval loss.  Right: the task's eval metrics (:data:`zopeft.metrics.TASK_METRICS`
but the loss): accuracy and macro-F1 (classification), F1 and exact match (generation), perplexity
(sft).  The x-axis counts forward passes plus two per backward pass, so ZO and AdamW runs compare
per cost.
"""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: the caller's backend and figure list are left alone

from .metrics import HEADLINE, TASK_METRICS

__all__ = ["curves", "plot_log"]

X_LABEL = "forward-pass equivalents (a backward = 2 forwards)"


def _x(record: dict) -> int:
    return record.get("forward_equivalents", record["forward_passes"])  # logs written before the count existed


def _scores(records: list[dict]) -> list[str]:
    """The right panel's metrics: those of the task kind (its :data:`TASK_METRICS` less the loss) the log holds as
    ``eval_`` or ``select_`` (on the records ``zo.guard.select_size`` holds out); sft's if it holds none."""
    kinds = {kind: [m for m in metrics if m != "loss"] for kind, metrics in TASK_METRICS.items()}
    logged = {key.split("_", 1)[1] for r in records for key in r if key.startswith(("eval_", "select_"))}
    return next((shown for shown in kinds.values() if logged.intersection(shown)), kinds["sft"])


def curves(records: list[dict]) -> Figure:
    """The figure of a training log's records: losses (left) and eval metrics (right)."""
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if any(k.startswith("eval_") for k in r)]
    fig = Figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    left.plot([_x(r) for r in train], [r["loss"] for r in train], color="tab:blue", alpha=0.35, lw=1, label="train (batch)")
    smooth = [r for r in train if r.get("loss_ema") is not None]
    left.plot([_x(r) for r in smooth], [r["loss_ema"] for r in smooth], color="tab:blue", lw=2, label="train (EMA)")
    points = [r for r in evals if "eval_loss" in r]
    left.plot([_x(r) for r in points], [r["eval_loss"] for r in points], "o-", color="tab:red", label="eval")
    left.set(xlabel=X_LABEL, ylabel="loss", title="loss")
    for metric, color in zip(_scores(records), ("tab:green", "tab:purple")):
        name = HEADLINE[metric]
        for key, style, label in ((f"eval_{metric}", "o-", name), (f"select_{metric}", "s--", f"{name} (guard's records)")):
            points = [r for r in records if key in r]
            if points or key.startswith("eval_"):
                right.plot([_x(r) for r in points], [r[key] for r in points], style, color=color, label=label)
    right.set(xlabel=X_LABEL, title="eval")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def plot_log(log_path: str | Path, png_path: str | Path) -> Path:
    """Write :func:`curves` of a ``trainer_log.jsonl`` to ``png_path``."""
    fig = curves([json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()])
    fig.savefig(png_path, dpi=110)
    return Path(png_path)
