"""The records of a step log, checked before :meth:`zopeft.ZOOptimizer.replay` applies any of them.

A log holds step records (``step``, ``lr`` per param group, ``losses``; optionally ``skipped``,
and ``seed`` / ``start`` where a stretch of the run began) and a guard's rollback records
(``step``, ``rollback_to``, ``lr_scale``).  A log read back from JSON has ``null`` where a loss
was not finite (a skipped step): it is read as NaN, which the step skips again.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["RecordError", "checked_records"]


class RecordError(ValueError):
    """A record that is not what a step log holds: ``index`` is its place in the log, ``problem`` what is wrong."""

    def __init__(self, index: int, problem: str) -> None:
        super().__init__(f"replay: record {index} {problem}; pass the records of opt.step_log or a run's zo_steps.jsonl")
        self.index, self.problem = index, problem


def checked_records(records: Iterable[Any]) -> list[dict[str, Any]]:
    """Copies of ``records`` as replay reads them (a ``null`` loss becomes NaN).

    Raises :class:`RecordError` for the first record that is neither a step nor a rollback, or
    whose values are not what a step log holds (an edited or damaged log).
    """
    return [_checked(i, record) for i, record in enumerate(records)]


def _checked(i: int, record: Any) -> dict[str, Any]:
    if not isinstance(record, Mapping):
        raise RecordError(i, f"is a {type(record).__name__}, not a step record")
    if {"step", "lr", "losses"} <= record.keys():
        kind, numbers = "step", {"lr": False, "losses": True}
    elif {"rollback_to", "lr_scale"} <= record.keys():
        kind, numbers = "rollback", {"lr_scale": False}
    else:
        raise RecordError(i, f"is neither a step (step, lr, losses) nor a rollback (rollback_to, lr_scale); it has "
                             f"{sorted(record)}")
    out = dict(record)
    for key in ("step", "rollback_to", "seed", "start"):
        if key in record and not _is_int(record[key]):
            raise RecordError(i, f"({kind}) has {key} {_shown(record[key])}, not an integer")
    for key, nullable in numbers.items():
        values = record[key]
        if not isinstance(values, list) or not values or not all(
                _is_number(v) or (nullable and v is None) for v in values):
            raise RecordError(i, f"({kind}) has {key} {_shown(values)}, not a list of numbers")
        out[key] = [math.nan if v is None else float(v) for v in values]
    return out


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:36]} ..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
