"""The adapter kinds the batched path replicates, one module each (PEFT's one room per tuner).

Every module of this package is imported here; a kind registers itself with :func:`~.base.register`.
Adding a kind is one new file: a subclass of :class:`~.base.AdapterKind` decorated with ``@register``.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import KINDS, register

__all__ = ["KINDS", "register"]

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")
