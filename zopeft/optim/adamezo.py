"""AdaMeZO: Adam-style moments for MeZO, rebuilt from the last K seeds instead of stored."""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch

from .base import StepRecord
from .mezo import MeZO
from .points import Buffer
from .settings import ADAMEZO as SETTINGS
from .settings import BASE


class AdaMeZO(MeZO):
    """MeZO estimates with truncated Adam-style moments rebuilt from the last K (step, g) pairs.

    With gₜ the projected gradient and zₜ the noise of step t (regenerated from
    its seed, one flat buffer at a time, in fp32)::

        m = Σ_{k<K} β₁ᵏ·g_{t−k}·z_{t−k}
        v = Σ_{k<K} β₂ᵏ·g²_{t−k}·z²_{t−k}
        θ ← θ − lr·(moment_scale·m / (√v + δ) + wd·θ)

    The first K steps are a warm-up of plain MeZO updates (θ ← θ − lr·(g·z + wd·θ))
    while the window fills.  No moment is stored: the state is K pairs of numbers.

    With Rademacher noise z² = 1, so v collapses to one scalar Σ β₂ᵏ·g² shared by
    every coordinate: the update is normalised momentum.  ``noise="gaussian"``
    gives the per-coordinate second moment.

    The published reference implementation multiplies m by 100 and uses
    δ = 1e-5; those are the defaults of ``moment_scale`` and ``delta`` here.

    Args:
        params: a module, tensors or param groups (see :class:`ZOOptimizer`).
        lr, eps: as for :class:`MeZO`.
        window: K, the number of past steps in the moments (default 10).
        beta1, beta2: moment decay factors (defaults 0.7 and 0.9).
        delta: δ in the denominator (default 1e-5).
        moment_scale: factor on m (default 100, as the reference code).
        **kwargs: ``weight_decay``, ``noise``, ``seed``, ``master_weights``.
    """

    settings = SETTINGS

    def __init__(
        self,
        params: Any,
        lr: float = 1e-6,
        eps: float = BASE["eps"].default,
        window: int = SETTINGS["window"].default,
        beta1: float = SETTINGS["beta1"].default,
        beta2: float = SETTINGS["beta2"].default,
        delta: float = SETTINGS["delta"].default,
        moment_scale: float = SETTINGS["moment_scale"].default,
        **kwargs: Any,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        super().__init__(params, lr=lr, eps=eps, **kwargs)
        self.window, self.beta1, self.beta2 = window, beta1, beta2
        self.delta, self.moment_scale = delta, moment_scale
        self.history: deque[tuple[int, float]] = deque(maxlen=window)  # (step, g), newest last
        self.applied_steps = 0

    def on_applied(self, record: StepRecord, coefs: list[tuple[int, float]]) -> None:
        self.history.append((record["step"], coefs[0][1]))
        self.applied_steps += 1

    def in_warmup(self) -> bool:
        """True while the window is still filling (the first K applied steps)."""
        return self.applied_steps < self.window

    def direction(self, step: int, buffer: Buffer, coefs: list[tuple[int, float]]) -> torch.Tensor:
        if self.in_warmup():
            return super().direction(step, buffer, coefs)
        window = [*self.history, (step, coefs[0][1])][-self.window :]  # this step's (step, g) is applied next
        m = torch.zeros(buffer.numel, dtype=torch.float32, device=buffer.device)
        gaussian = self.noise == "gaussian"
        v: torch.Tensor | float = torch.zeros_like(m) if gaussian else 0.0
        for k, (past_step, g) in enumerate(reversed(window)):
            z = self.points.noise_at(past_step, 0, buffer)
            m.add_(z, alpha=self.beta1**k * g)
            if gaussian:
                v.addcmul_(z, z, value=self.beta2**k * g * g)  # type: ignore[union-attr]
            else:
                v += self.beta2**k * g * g  # z² = 1
        denom = v.sqrt_().add_(self.delta) if gaussian else math.sqrt(v) + self.delta  # type: ignore[union-attr]
        return m.mul_(self.moment_scale).div_(denom)

    def extra_state(self) -> dict[str, Any]:
        return {"history": [list(pair) for pair in self.history], "applied_steps": self.applied_steps}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.history = deque(((int(s), float(g)) for s, g in state["history"]), maxlen=self.window)
        self.applied_steps = int(state["applied_steps"])
