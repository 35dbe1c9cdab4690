"""MeZO: two-point SPSA (Malladi et al., 2023)."""

from __future__ import annotations

from typing import Any

from .base import Evaluation, ZOOptimizer
from .settings import BASE, MEZO


class MeZO(ZOOptimizer):
    """Two-point SPSA: g = (L(θ+εz) − L(θ−εz)) / 2ε, then θ ← θ − lr·(g·z + wd·θ).

    Two forward passes per step.  A step with g = 0 makes no update and is counted in ``skipped_steps``.  The loss reported for θ is (L₊ + L₋)/2, which
    equals L(θ) up to O(ε²) and costs no extra forward pass.

    Args:
        params: a module, tensors or param groups (see :class:`ZOOptimizer`).
        lr: learning rate (MeZO uses 1e-4 to 1e-7 depending on the adapter).
        eps: perturbation scale ε (default 1e-3, MeZO's full-parameter setting; 1e-2 for LoRA).
        **kwargs: ``weight_decay``, ``noise``, ``seed``, ``master_weights``.
    """

    settings = MEZO

    def __init__(self, params: Any, lr: float = 1e-6, eps: float = BASE["eps"].default, **kwargs: Any) -> None:
        super().__init__(params, lr=lr, eps=eps, **kwargs)

    def evaluations(self) -> list[Evaluation]:
        return [(0, 1.0), (0, -1.0)]

    def projected_grad(self, losses: list[float]) -> float:
        """g = (L₊ − L₋) / 2ε."""
        return (losses[0] - losses[1]) / (2 * self.eps)

    def coefficients(self, losses: list[float]) -> list[tuple[int, float]] | str:
        g = self.projected_grad(losses)
        if g == 0:  # L₊ = L₋ (e.g. a flat discrete objective): no information, counted as skipped like FZOO's σ = 0
            return "projected_grad=0"
        return [(0, g)]

    def loss_at_theta(self, losses: list[float]) -> float:
        return (losses[0] + losses[1]) / 2

    def step_stats(self, losses: list[float]) -> dict[str, Any]:
        return {"projected_grad": self.projected_grad(losses)}
