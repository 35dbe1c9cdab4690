"""What an evaluation reports beyond accuracy, and the smoothed training loss.

* :func:`class_metrics`: per-class precision / recall / F1 / support, macro-F1 and the confusion
  matrix of predicted against gold classes;
* :func:`collapse_warning`: one line when the predictions pile onto a few labels far beyond their
  share of the gold labels (a collapse that a plain accuracy hides);
* :func:`majority_note`: one line when answering the most common gold label to every record would
  score at least the accuracy (a gain that may be no more than a leaning towards that label);
* :data:`TASK_METRICS` and :func:`greater_is_better`: what each task's evaluation reports, the
  metric that picks the best model by default, and its direction;
* :func:`report_lines`: the table ``zopeft eval`` prints;
* :class:`EMA`: the exponential moving average of the training loss logged beside the raw one.

Torch-free, so that the CLI can format results without importing torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "COLLAPSE_MARGIN", "COLLAPSE_SHARE", "EMA", "TASK_METRICS", "class_metrics", "collapse_warning", "compare_line",
    "greater_is_better", "majority_note", "predicted_counts", "report_lines", "without_generations",
]

# the labels predicted more often than they are gold, when they take this share of the predictions ...
COLLAPSE_SHARE = 0.8
COLLAPSE_MARGIN = 0.1  # ... and this much more than their share of the gold labels, are warned about
# What each task kind's evaluation reports that a run can select on (metric_for_best_model); the first is the
# default.  A task kind with other metrics adds its row here.
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "macro_f1", "loss"),
    "multiple_choice": ("accuracy", "macro_f1", "loss"),
    "sequence_classification": ("accuracy", "macro_f1", "loss"),
    "generation": ("f1", "exact_match", "loss"),
    "sft": ("loss", "perplexity"),
}
HEADLINE = {"accuracy": "accuracy", "macro_f1": "macro-F1", "f1": "F1", "exact_match": "exact match", "loss": "loss",
            "perplexity": "perplexity"}


def _ratio(a: int, b: int) -> float:
    return a / b if b else 0.0


def class_metrics(gold: Sequence[int], pred: Sequence[int], labels: Sequence[str],
                  words: Sequence[str] | None = None) -> dict[str, Any]:
    """``accuracy``, ``macro_f1``, ``accuracy_stderr``, ``per_class`` and ``confusion`` of predicted against gold
    class indices.

    ``accuracy_stderr``: the standard error of the accuracy as an estimate from these examples,
    √(p(1−p)/(n−1)) (lm-evaluation-harness's ``acc_stderr``): a difference of a few of them is noise.

    ``per_class[label]``: ``precision``, ``recall``, ``f1``, ``support`` (gold count) and
    ``predicted`` (prediction count), plus ``word`` when ``words`` are given.  ``confusion[i][j]``
    counts examples of class ``i`` predicted as ``j`` (rows gold, columns predicted, in ``labels``
    order).  A never-predicted class has precision 0; macro-F1 averages F1 over the classes that
    occur among the gold labels or the predictions (scikit-learn's macro average).
    """
    confusion = [[0] * len(labels) for _ in labels]
    for g, p in zip(gold, pred):
        confusion[g][p] += 1
    per_class, f1s = {}, []
    for i, label in enumerate(labels):
        hits, support, predicted = confusion[i][i], sum(confusion[i]), sum(row[i] for row in confusion)
        precision, recall = _ratio(hits, predicted), _ratio(hits, support)
        f1 = _ratio(2 * hits, support + predicted)  # = 2PR / (P + R)
        per_class[label] = {**({"word": words[i]} if words else {}), "precision": precision, "recall": recall,
                            "f1": f1, "support": support, "predicted": predicted}
        if support or predicted:
            f1s.append(f1)
    correct, n = sum(confusion[i][i] for i in range(len(labels))), len(gold)
    accuracy = _ratio(correct, n)
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
            "accuracy_stderr": math.sqrt(accuracy * (1 - accuracy) / (n - 1)) if n > 1 else 0.0,
            "per_class": per_class, "confusion": confusion}


def without_generations(metrics: dict[str, Any]) -> dict[str, Any]:
    """An evaluation without a generation task's per-record generations: what is kept of it (a cache entry, the best
    model's record), the per-class table included."""
    return {k: v for k, v in metrics.items() if k != "generations"}


def predicted_counts(metrics: dict[str, Any]) -> dict[str, int]:
    """How many predictions each label got (the predicted-label distribution)."""
    return {label: row["predicted"] for label, row in metrics.get("per_class", {}).items()}


def _named(label: str, row: dict[str, Any]) -> str:
    return f"{label} ({row['word']!r})" if "word" in row else label


def collapse_warning(metrics: dict[str, Any]) -> str | None:
    """A line when the labels predicted more often than they are gold take ≥ 80% of the predictions and ≥ 10 points
    more than their share of the gold labels (predictions piled onto one label, or onto a few of many)."""
    n, per_class = metrics.get("n", 0), metrics.get("per_class", {})
    over = {label: row for label, row in per_class.items() if row["predicted"] > row["support"]}
    predicted = sum(row["predicted"] for row in over.values())
    share, gold_share = _ratio(predicted, n), _ratio(sum(row["support"] for row in over.values()), n)
    if len(per_class) < 2 or share < COLLAPSE_SHARE or share - gold_share < COLLAPSE_MARGIN:
        return None
    names = [_named(label, row) for label, row in over.items()]
    which = (f"label {names[0]} takes" if len(names) == 1
             else f"labels {', '.join(names[:-1])} and {names[-1]} take")
    onto = "one label" if len(names) == 1 else f"{len(names)} of {len(per_class)} labels"
    return (f"{which} {predicted} of {n} predictions ({100 * share:.1f}%; {100 * gold_share:.1f}% of the gold "
            f"labels): the predictions have collapsed onto {onto}")


def majority_note(metrics: dict[str, Any]) -> str | None:
    """A line when always answering the most common gold label would score at least ``accuracy`` on these records:
    below that, an accuracy (or a gain in it) says little about the task (e.g. BoolQ's 62% "Yes")."""
    per_class = metrics.get("per_class")
    n = sum(row["support"] for row in per_class.values()) if per_class else 0
    if not n:
        return None
    label, row = max(per_class.items(), key=lambda item: item[1]["support"])
    share = row["support"] / n
    if metrics["accuracy"] > share:
        return None
    return (f"always answering {_named(label, row)}, the most common gold label, would score {share:.4f} on these {n} "
            f"records, at least this accuracy ({metrics['accuracy']:.4f})")


def report_lines(metrics: dict[str, Any]) -> list[str]:
    """Headline metrics, then (for a classification) the per-class table and the confusion matrix."""
    head = [f"{name} {metrics[key]:.4f}{_stderr(metrics, key)}" for key, name in HEADLINE.items() if key in metrics]
    lines = ["  ".join([*head, f"n {metrics['n']}"])]
    per_class = metrics.get("per_class")
    if not per_class:
        return lines
    names = [_named(label, row) for label, row in per_class.items()]
    width = max(len("label"), *map(len, names))
    lines.append(f"{'label':<{width}}  precision  recall      f1  support  predicted")
    for name, row in zip(names, per_class.values()):
        lines.append(f"{name:<{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  {row['f1']:6.3f}"
                     f"  {row['support']:7d}  {row['predicted']:9d}")
    labels = list(per_class)
    cell = max(5, *map(len, labels), *(len(str(v)) for row in metrics["confusion"] for v in row))
    lines.append("confusion (rows: gold, columns: predicted):")
    lines.append(" " * width + "".join(f"  {label:>{cell}}" for label in labels))
    for label, row in zip(labels, metrics["confusion"]):
        lines.append(f"{label:<{width}}" + "".join(f"  {v:>{cell}}" for v in row))
    return lines


def compare_line(before: dict[str, Any], after: dict[str, Any]) -> str:
    """``accuracy 0.5000 -> 0.6250, macro-F1 ...``: the headline metrics before and after training (after alone
    for a resumed run)."""
    return ", ".join((f"{name} {before[key]:.4f} -> {after[key]:.4f}" if key in before else f"{name} {after[key]:.4f}")
                     + _stderr(after, key) for key, name in HEADLINE.items() if key in after)


def _stderr(metrics: dict[str, Any], key: str) -> str:
    """`` ±0.0288`` after a metric that has a standard error (accuracy), else nothing."""
    return f" ±{metrics[key + '_stderr']:.4f}" if key + "_stderr" in metrics else ""


def greater_is_better(metric: str) -> bool:
    """Whether a higher value of ``metric`` is better: not for a loss or a perplexity (TrainingArguments' rule,
    which reads every name ending in ``loss`` as a loss)."""
    return not (metric.endswith("loss") or metric.endswith("perplexity"))


@dataclass
class EMA:
    """Exponential moving average of the training loss: started by the first finite value, skipping non-finite ones.

    ``beta`` = 0.9 weighs roughly the last 10 steps.  ``value`` is saved in checkpoints, so a
    resumed run logs the same averages as an uninterrupted one.
    """

    beta: float = 0.9
    value: float | None = None

    def update(self, loss: float) -> float | None:
        if math.isfinite(loss):
            self.value = loss if self.value is None else self.beta * self.value + (1 - self.beta) * loss
        return self.value
