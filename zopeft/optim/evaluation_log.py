"""One log line per change of the path an optimizer evaluates its points by (batched or sequential)."""

from __future__ import annotations

import logging
import weakref
from typing import Any

__all__ = ["evaluation_path", "report_path"]

logger = logging.getLogger("zopeft")
_last: weakref.WeakKeyDictionary[Any, tuple[str, str]] = weakref.WeakKeyDictionary()  # (path, message)


def report_path(optimizer: Any, path: str, detail: str, *, slower: bool = False) -> None:
    """Log that ``optimizer`` evaluates by ``path``: once when it changes, DEBUG while it stays.

    ``slower``: a fallback that costs speed (the batched path was asked for but cannot run);
    reported as a WARNING so that it is seen, INFO otherwise.
    """
    message = f"{type(optimizer).__name__}: {path} evaluation ({detail})"
    try:
        changed = _last.get(optimizer, ("", ""))[1] != message
        _last[optimizer] = (path, message)
    except TypeError:  # not weak-referenceable
        changed = True
    level = (logging.WARNING if slower else logging.INFO) if changed else logging.DEBUG
    logger.log(level, message)


def evaluation_path(optimizer: Any) -> str | None:
    """How ``optimizer`` last evaluated its points with batching asked for: ``"batched"`` or ``"sequential"``
    (a fallback, logged as a WARNING); None before that, or without batching."""
    return _last[optimizer][0] if optimizer in _last else None
