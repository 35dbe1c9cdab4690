"""The optimizers' settings, declared once and readable without importing torch.

Every setting a recipe's ``zo:`` block, ``zopeft validate`` and the did-you-mean hints know is a
:class:`Setting` here (default, type, help, range, choices); each optimizer's constructor takes
its defaults from these declarations.  This module imports neither torch nor the optimizers, so
validating a recipe stays fast.  An optimizer registered with :func:`zopeft.register_optimizer`
declares its own on the class::

    class MyZO(zopeft.MeZO):
        settings = {"temperature": zopeft.Setting(1.0, "softmax temperature", gt=0)}
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["ADAMEZO", "BASE", "BUILTIN", "FZOO", "GUARD_DEFAULTS", "HIZOO", "MEZO", "Setting", "parse_memory"]


@dataclass(frozen=True)
class Setting:
    """One tunable constructor argument: default, help and constraints (``kind``: the type if not the default's)."""

    default: Any
    help: str
    kind: Any = None
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], Any] | None = None  # raises ValueError for a bad value

    @property
    def type(self) -> Any:
        """The value's type: ``kind``, else the default's type."""
        return self.kind if self.kind is not None else type(self.default)

    def bounds(self) -> dict[str, float]:
        """The numeric limits given (``ge``, ``gt``, ``le``, ``lt``)."""
        return {k: v for k in ("ge", "gt", "le", "lt") if (v := getattr(self, k)) is not None}

    def describe(self, name: str) -> str:
        """``"n_perturbations: int = 8 (>= 2) - perturbations per step (N)"``."""
        kind = getattr(self.type, "__name__", None) or str(self.type)
        signs = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
        rule = " | ".join(self.choices) if self.choices else ", ".join(f"{signs[k]} {v:g}" for k, v in self.bounds().items())
        return f"{name}: {kind} = {self.default!r}" + (f" ({rule})" if rule else "") + f" - {self.help}"


_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 1 << 10, "MIB": 1 << 20,
          "GIB": 1 << 30, "TIB": 1 << 40}


def parse_memory(value: int | float | str | None) -> int | None:
    """Bytes from ``12e9``, ``"12GB"``, ``"11.5GiB"`` or ``"800MB"``; ``None`` stays ``None``."""
    if value is None or isinstance(value, (int, float)):
        if value is not None and not value > 0:
            raise ValueError(f"max_memory must be > 0, got {value}")
        return None if value is None else int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*((?:[KMGT]I?)?B|)\s*", value.upper())
    if not match or not float(match.group(1)) > 0:
        raise ValueError(f"max_memory {value!r}: give bytes or a size such as '12GB' or '11.5GiB'")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


BASE = {
    "eps": Setting(1e-3, "perturbation scale ε", gt=0, le=1),
    "noise": Setting("rademacher", "perturbation noise", choices=("rademacher", "gaussian")),
    "master_weights": Setting(True, "fp32 master copies: bit-exact restores, no drift of fp16/bf16 adapters"),
    "batched": Setting(False, "evaluate a step's points as replicas of the batch in few forward passes"),
    "perturbation_batch_size": Setting(None, "replicas per batched forward pass (None: from free memory)",
                                       kind=int | None, ge=1, le=4096),
    "max_memory": Setting(None, "peak memory the automatic replica count keeps under, e.g. 12GB",
                          kind=int | str | None, check=parse_memory),
    "parallel": Setting("auto", "under torchrun: how ranks share a step", choices=("auto", "perturbation", "data")),
    "sync_check_steps": Setting(100, "under torchrun: compare replica checksums every k steps (0: never)", ge=0,
                                le=10**9),
}
MEZO: dict[str, Setting] = {}
FZOO = {
    "n_perturbations": Setting(8, "perturbations per step (N)", ge=2, le=1024),
    "batched": Setting(True, "evaluate the N+1 points as replicas of the batch in few forward passes"),
}
ADAMEZO = {
    "window": Setting(10, "K, past steps in the rebuilt moments", ge=1, le=1000),
    "beta1": Setting(0.7, "first-moment decay", ge=0, lt=1),
    "beta2": Setting(0.9, "second-moment decay", ge=0, lt=1),
    "delta": Setting(1e-5, "δ in the denominator", gt=0, le=1),
    "moment_scale": Setting(100.0, "factor on m (100 in the reference code)", gt=0, le=1e6),
}
HIZOO = {
    "hessian_smooth": Setting(1e-8, "α: weight of each step's estimate in the moving average of Σ", ge=0, le=1),
    "min_curvature": Setting(1e-8, "floor of the diagonal Hessian estimate Σ", gt=0, le=1e6),
    "noise": Setting("gaussian", "perturbation noise (the diagonal estimate needs Gaussian z)", choices=("gaussian",)),
}
BUILTIN = {"mezo": MEZO, "fzoo": FZOO, "adamezo": {**MEZO, **ADAMEZO}, "hizoo": HIZOO}

# zopeft.Guard's defaults for what it watches.  Step losses are many and noisy: smooth them, and act
# on a 50% rise that lasts 5 steps.  Evaluations are few and already averages: one that falls 5%
# below the best is acted on (the settings of the race's guarded runs, README "Performance").
GUARD_DEFAULTS = {
    "loss": {"smoothing": 0.9, "margin": 0.5, "patience": 5},
    "eval": {"smoothing": 0.0, "margin": 0.05, "patience": 1},
}
"""The declared settings of each built-in optimizer, on top of :data:`BASE`."""
