"""Training curves against forward passes (needs the ``plot`` extra: matplotlib)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_log"]


def plot_log(log_path: str | Path, png_path: str | Path) -> Path:
    """Plot training loss and the eval metric (accuracy, else loss) against forward passes."""
    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if any(k.startswith("eval_") for k in r)]
    metric = "eval_accuracy" if any("eval_accuracy" in r for r in evals) else "eval_loss"
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot([r["forward_passes"] for r in train], [r["loss"] for r in train], marker=".")
    left.set(xlabel="forward passes", ylabel="training loss", title="loss")
    points = [r for r in evals if metric in r]
    right.plot([r["forward_passes"] for r in points], [r[metric] for r in points], marker="o", color="tab:green")
    right.set(xlabel="forward passes", ylabel=metric, title=metric.replace("_", " "))
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return Path(png_path)
