"""One log line per change of the path an optimizer evaluates its points by (batched or sequential)."""

from __future__ import annotations

import logging
import weakref
from typing import Any

__all__ = ["report_path"]

logger = logging.getLogger("zopeft")
_last: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def report_path(optimizer: Any, path: str, detail: str, *, slower: bool = False) -> None:
    """Log that ``optimizer`` evaluates by ``path``: once when it changes, DEBUG while it stays.

    ``slower``: a fallback that costs speed (the batched path was asked for but cannot run);
    reported as a WARNING so that it is seen, INFO otherwise.
    """
    message = f"{type(optimizer).__name__}: {path} evaluation ({detail})"
    try:
        changed = _last.get(optimizer) != message
        _last[optimizer] = message
    except TypeError:  # not weak-referenceable
        changed = True
    level = (logging.WARNING if slower else logging.INFO) if changed else logging.DEBUG
    logger.log(level, message)
