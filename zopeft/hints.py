"""The "did you mean" part of one-line errors."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["did_you_mean"]


def did_you_mean(word: object, options: Iterable[object], *, cutoff: float = 0.6) -> str:
    """``" (did you mean 'x'?)"`` for the option closest to ``word``, or ``""`` when none is close."""
    match = difflib.get_close_matches(str(word), [str(option) for option in options], n=1, cutoff=cutoff)
    return f" (did you mean {match[0]!r}?)" if match else ""
