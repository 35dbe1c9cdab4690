"""One registry for every zeroth-order optimizer: ``get_optimizer("fzoo", model, lr=...)``."""

from __future__ import annotations

import difflib
from typing import Any

from .optim.adamezo import AdaMeZO
from .optim.base import ZOOptimizer
from .optim.fzoo import FZOO
from .optim.hizoo import HiZOO
from .optim.mezo import MeZO

__all__ = ["available_optimizers", "get_optimizer", "register_optimizer"]

_REGISTRY: dict[str, type[ZOOptimizer]] = {}


def register_optimizer(name: str, cls: type[ZOOptimizer] | None = None) -> Any:
    """Register ``cls`` under ``name`` (case-insensitive); usable as a decorator."""

    def add(klass: type[ZOOptimizer]) -> type[ZOOptimizer]:
        if not (isinstance(klass, type) and issubclass(klass, ZOOptimizer)):
            raise TypeError(f"{klass!r} is not a ZOOptimizer subclass")
        _REGISTRY[name.lower()] = klass
        return klass

    return add if cls is None else add(cls)


def available_optimizers() -> list[str]:
    """The registered names, sorted."""
    return sorted(_REGISTRY)


def get_optimizer(name: str, params: Any, **kwargs: Any) -> ZOOptimizer:
    """Build the optimizer registered as ``name`` over ``params`` (a module, tensors or groups)."""
    cls = _REGISTRY.get(name.lower())
    if cls is None:
        hint = difflib.get_close_matches(name.lower(), _REGISTRY, n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueError(f"unknown ZO optimizer {name!r}{suggestion}; available: {', '.join(available_optimizers())}")
    return cls(params, **kwargs)


for _name, _cls in (("mezo", MeZO), ("fzoo", FZOO), ("adamezo", AdaMeZO), ("hizoo", HiZOO)):
    register_optimizer(_name, _cls)
