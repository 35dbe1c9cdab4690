"""FZOO: batched one-sided estimates normalised by the spread of the losses."""

from __future__ import annotations

import math
from typing import Any

from .base import Evaluation, ZOOptimizer
from .settings import BASE, FZOO as SETTINGS


class FZOO(ZOOptimizer):
    """One unperturbed loss L₀ and N one-sided losses Lᵢ = L(θ + ε·uᵢ) with Rademacher uᵢ.

    σ is the population standard deviation of L₁..L_N and the update is
    θ ← θ − lr·(Σᵢ ((Lᵢ − L₀)/(N·σ))·uᵢ + wd·θ): the step length adapts to the
    local curvature, Adam-like, with no stored state.  A step with σ = 0 (or
    non-finite) makes no update and is counted in ``skipped_steps``.
    N + 1 forward passes per step.

    Args:
        params: a module, tensors or param groups (see :class:`ZOOptimizer`).
        lr: learning rate.
        eps: perturbation scale ε.
        n_perturbations: N (>= 2; default 8).
        batched: evaluate the N + 1 points as replicas of the batch in one
            forward pass where the closure offers it (default; build the closure
            with :func:`zopeft.batched.loss_closure`) and the adapter is supported;
            otherwise sequentially.
        **kwargs: ``weight_decay``, ``noise``, ``seed``, ``master_weights``,
            ``perturbation_batch_size`` (replicas per batched forward; default automatic).
    """

    settings = SETTINGS

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        eps: float = BASE["eps"].default,
        n_perturbations: int = SETTINGS["n_perturbations"].default,
        batched: bool = SETTINGS["batched"].default,
        **kwargs: Any,
    ) -> None:
        if n_perturbations < 2:
            raise ValueError(f"n_perturbations must be >= 2 (σ of one loss is 0), got {n_perturbations}")
        super().__init__(params, lr=lr, eps=eps, batched=batched, **kwargs)
        self.n_perturbations = n_perturbations

    default_parallel = "perturbation"

    def evaluations(self) -> list[Evaluation]:
        return [None] + [(i, 1.0) for i in range(1, self.n_perturbations + 1)]

    @staticmethod
    def sigma(losses: list[float]) -> float:
        """Population standard deviation of the perturbed losses L₁..L_N."""
        perturbed = losses[1:]
        mean = sum(perturbed) / len(perturbed)
        return math.sqrt(sum((x - mean) ** 2 for x in perturbed) / len(perturbed))

    def coefficients(self, losses: list[float]) -> list[tuple[int, float]] | str:
        sigma = self.sigma(losses)
        if not (sigma > 0 and math.isfinite(sigma)):
            return f"sigma={sigma}"
        n = len(losses) - 1
        return [(i, (losses[i] - losses[0]) / (n * sigma)) for i in range(1, n + 1)]

    def loss_at_theta(self, losses: list[float]) -> float:
        return losses[0]

    def step_stats(self, losses: list[float]) -> dict[str, Any]:
        return {"sigma": self.sigma(losses)}
