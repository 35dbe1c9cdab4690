"""One registry for every zeroth-order optimizer: ``get_optimizer("fzoo", model, lr=...)``.

The built-in optimizers are imported only when one is built, so listing the names (recipe
validation, ``zopeft validate``) does not import torch.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, overload

from .hints import did_you_mean
from .optim.settings import BASE, BUILTIN, Setting

if TYPE_CHECKING:
    from .optim.base import ZOOptimizer

__all__ = ["available_optimizers", "get_optimizer", "hyperparameters", "optimizer_class", "register_optimizer"]

# name -> "module:class" of the built-in optimizers, imported on first use
_BUILTIN = {
    "mezo": "zopeft.optim.mezo:MeZO",
    "fzoo": "zopeft.optim.fzoo:FZOO",
    "adamezo": "zopeft.optim.adamezo:AdaMeZO",
    "hizoo": "zopeft.optim.hizoo:HiZOO",
}
_REGISTRY: dict[str, type[ZOOptimizer]] = {}
Z = TypeVar("Z", bound="ZOOptimizer")


@overload
def register_optimizer(name: str) -> Callable[[type[Z]], type[Z]]: ...


@overload
def register_optimizer(name: str, cls: type[Z]) -> type[Z]: ...


def register_optimizer(name: str, cls: type[Z] | None = None) -> type[Z] | Callable[[type[Z]], type[Z]]:
    """Register ``cls`` under ``name`` (case-insensitive); usable as a decorator."""
    from .optim.base import ZOOptimizer

    def add(klass: type[Z]) -> type[Z]:
        if not (isinstance(klass, type) and issubclass(klass, ZOOptimizer)):
            raise TypeError(f"{klass!r} is not a ZOOptimizer subclass")
        _REGISTRY[name.lower()] = klass
        return klass

    return add if cls is None else add(cls)


def available_optimizers() -> list[str]:
    """The registered names, sorted."""
    return sorted({*_BUILTIN, *_REGISTRY})


def get_optimizer(name: str, params: Any, **kwargs: Any) -> ZOOptimizer:
    """Build the optimizer registered as ``name`` over ``params`` (a module, tensors or groups)."""
    return optimizer_class(name, kwargs)(params, **kwargs)


def optimizer_class(name: str, kwargs: Mapping[str, Any] | None = None) -> type[ZOOptimizer]:
    """The class registered as ``name``; ValueError for an unknown name, TypeError for a keyword in
    ``kwargs`` it does not take (each with a did-you-mean)."""
    key = name.lower()
    if key not in _REGISTRY and key in _BUILTIN:
        module, _, attr = _BUILTIN[key].partition(":")
        _REGISTRY[key] = getattr(importlib.import_module(module), attr)
    cls = _REGISTRY.get(key)
    if cls is None:
        raise ValueError(f"unknown ZO optimizer {name!r}{did_you_mean(key, available_optimizers())}; "
                         f"available: {', '.join(available_optimizers())}")
    named = _keywords(cls)
    takes = [*named, *(k for k in hyperparameters(key) if k not in named)]
    for given in kwargs or {}:
        if given not in takes:
            raise TypeError(f"{name}: unknown keyword argument {given!r}{did_you_mean(given, takes)}; it takes {', '.join(takes)}")
    return cls


def _keywords(cls: type) -> list[str]:
    """The keyword arguments a ZO optimizer class takes: its named constructor parameters, and its bases'
    as far as each passes ``**kwargs`` on."""
    from .optim.base import ZOOptimizer

    names: list[str] = []
    for klass in cls.__mro__[: cls.__mro__.index(ZOOptimizer) + 1]:  # not torch.optim.Optimizer's ``defaults``
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())[2:]  # after self, params
        names += [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in names]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names


def hyperparameters(name: str) -> dict[str, Setting]:
    """The settings of the optimizer registered as ``name``: its declarations over its bases' (no torch import
    for a built-in one)."""
    key = name.lower()
    cls = _REGISTRY.get(key)
    if cls is None:
        if key not in _BUILTIN:
            raise ValueError(f"unknown ZO optimizer {name!r}; available: {', '.join(available_optimizers())}")
        return {**BASE, **BUILTIN[key]}
    merged: dict[str, Setting] = {}
    for klass in reversed(cls.__mro__):
        merged.update(klass.__dict__.get("settings", {}))
    return merged
