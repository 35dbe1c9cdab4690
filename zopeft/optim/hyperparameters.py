"""What an optimizer's settings are, declared once beside its constructor.

A :class:`~zopeft.optim.base.ZOOptimizer` subclass lists its tunable constructor arguments in
``settings`` (help text, range, choices); their types and defaults are read from the constructor
signatures.  The recipe schema (the ``zo:`` block), ``zopeft validate`` and the did-you-mean hints
are built from :func:`hyperparameters`, so a method registered with
:func:`zopeft.register_optimizer` takes recipe settings without any edit of the recipe code::

    class MyZO(zopeft.MeZO):
        settings = {"temperature": zopeft.Setting("softmax temperature", gt=0)}

        def __init__(self, params, temperature: float = 1.0, **kwargs): ...
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Hyperparameter", "Setting", "hyperparameters"]


@dataclass(frozen=True)
class Setting:
    """Help and constraints of one constructor argument (its type and default come from the signature)."""

    help: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], Any] | None = None  # raises ValueError for a bad value (e.g. a memory size)

    def bounds(self) -> dict[str, float]:
        return {k: v for k in ("ge", "gt", "le", "lt") if (v := getattr(self, k)) is not None}


@dataclass(frozen=True)
class Hyperparameter:
    """One tunable setting of an optimizer: name, type, default and :class:`Setting`."""

    name: str
    annotation: Any
    default: Any
    setting: Setting

    def describe(self) -> str:
        """``"n_perturbations: int = 8 (>= 2) - perturbations per step (N)"``."""
        kind = getattr(self.annotation, "__name__", None) or str(self.annotation).replace("typing.", "")
        limits = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
        rule = ", ".join(f"{limits[k]} {v:g}" for k, v in self.setting.bounds().items())
        if self.setting.choices:
            rule = " | ".join(self.setting.choices)
        return f"{self.name}: {kind} = {self.default!r}" + (f" ({rule})" if rule else "") + f" - {self.setting.help}"


def hyperparameters(cls: type) -> dict[str, Hyperparameter]:
    """The declared settings of an optimizer class and its bases (a subclass's declaration wins)."""
    settings: dict[str, Setting] = {}
    for klass in reversed(cls.__mro__):
        settings.update(klass.__dict__.get("settings", {}))
    defaults: dict[str, Any] = {}
    annotations: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):  # the most derived constructor's default wins
        init = klass.__dict__.get("__init__")
        if init is None or not settings:
            continue
        hints = typing.get_type_hints(init, globalns=vars(inspect.getmodule(klass)))
        for name, param in inspect.signature(init).parameters.items():
            if name in settings and param.default is not inspect.Parameter.empty:
                defaults[name] = param.default
                annotations[name] = hints.get(name, type(param.default))
    missing = sorted(set(settings) - set(defaults))
    if missing:
        raise TypeError(f"{cls.__name__} declares settings without a constructor default: {', '.join(missing)}")
    return {name: Hyperparameter(name, annotations[name], defaults[name], s) for name, s in settings.items()}
