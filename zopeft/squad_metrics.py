"""SQuAD v1.1 exact match and F1 of generated answers, as the official evaluation script computes them.

Both compare a prediction with each gold answer after the script's normalisation (lower case,
punctuation removed, the articles ``a``, ``an``, ``the`` removed, white space collapsed) and keep
the best over the gold answers.  F1 is the harmonic mean of the precision and recall of the
normalised tokens (a bag of words).  The script's quirks are kept: a prediction and an answer that
both normalise to nothing match exactly but have F1 0.  Scores here are fractions (0-1); the
script prints them x100.

Torch-free, so that objectives and the CLI can use it without importing torch.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["best_over_answers", "exact_match", "f1", "normalize_answer", "squad_scores"]

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the SQuAD v1.1 script's ``normalize_answer``)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answer: str) -> float:
    """1.0 when the normalised texts are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(answer))


def f1(prediction: str, answer: str) -> float:
    """Token F1 of the normalised texts (0.0 when they share no token, or either is empty)."""
    predicted, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    shared = sum((Counter(predicted) & Counter(gold)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted), shared / len(gold)
    return 2 * precision * recall / (precision + recall)


def best_over_answers(metric: Callable[[str, str], float], prediction: str, answers: Sequence[str]) -> float:
    """The metric against the gold answer that scores best (the script's ``metric_max_over_ground_truths``)."""
    return max(metric(prediction, answer) for answer in answers)


def _stderr(values: Sequence[float]) -> float:
    """Standard error of the mean: the sample standard deviation / √n (for 0/1 values √(p(1−p)/(n−1)))."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def squad_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, Any]:
    """``f1``, ``exact_match`` (means, 0-1), their standard errors and the per-record scores (``per_record``)."""
    per_record = [{"f1": best_over_answers(f1, p, a), "exact_match": best_over_answers(exact_match, p, a)}
                  for p, a in zip(predictions, answers, strict=True)]
    out: dict[str, Any] = {}
    for key in ("f1", "exact_match"):
        values = [r[key] for r in per_record]
        out[key] = sum(values) / len(values) if values else 0.0
        out[f"{key}_stderr"] = _stderr(values)
    return {**out, "per_record": per_record}
