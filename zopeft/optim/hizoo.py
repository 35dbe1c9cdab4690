"""HiZOO: a diagonal-Hessian-informed MeZO (Zhao et al., ICLR 2025)."""

from __future__ import annotations

from typing import Any

import torch

from .base import Evaluation, StepRecord, ZOOptimizer
from .points import Buffer
from .settings import BASE
from .settings import HIZOO as SETTINGS


class HiZOO(ZOOptimizer):
    """Two-point SPSA along Σ^(-1/2)·z, with Σ a diagonal Hessian estimate kept from the losses.

    Each step evaluates L₀ = L(θ) and L± = L(θ ± ε·Σ^(-1/2)·z) (three forward passes) with
    Gaussian z.  The second difference gives an unbiased estimate of each diagonal entry of
    the Hessian (the paper's estimator: for a quadratic, E[(L₊ + L₋ − 2L₀)/(2ε²) · Σ_i·(z_i² − 1)]
    is the curvature H_ii), smoothed into Σ by an exponential moving average::

        Σ ← max((1 − α)·Σ + α·(L₊ + L₋ − 2L₀)/(2ε²) · Σ ⊙ (z² − 1), min_curvature)
        θ ← θ − lr·((L₊ − L₋)/(2ε) · Σ^(-1/2) ⊙ z + wd·θ)        (with the new Σ)

    Σ starts at 1 (MeZO with Gaussian noise).  The paper takes the absolute value of each
    estimate to keep Σ positive, which biases every entry by the noise of all the others; zopeft
    keeps the unbiased estimate and floors Σ at ``min_curvature``.  With many trainable
    coordinates one estimate per step is dominated by that noise (its spread grows with the
    trace of the Hessian), so the smoothing α must be small: the reference code's published
    runs use a constant α of 1e-8 (``hessian_smooth_type constant1e-8``), the default here.

    Rademacher noise cannot estimate a diagonal this way (z² = 1): HiZOO requires
    ``noise="gaussian"``.  Σ is part of :meth:`state_dict` (tensors, saved as safetensors).

    Args:
        params: a module, tensors or param groups (see :class:`ZOOptimizer`).
        lr, eps: as for :class:`MeZO`.
        hessian_smooth: α, the weight of each new estimate in Σ's moving average.
        min_curvature: the floor of Σ (keeps Σ^(-1/2) finite).
        **kwargs: ``weight_decay``, ``seed``, ``master_weights``, ``parallel``, ...
    """

    settings = SETTINGS

    def __init__(
        self,
        params: Any,
        lr: float = 1e-6,
        eps: float = BASE["eps"].default,
        hessian_smooth: float = SETTINGS["hessian_smooth"].default,
        min_curvature: float = SETTINGS["min_curvature"].default,
        noise: str = SETTINGS["noise"].default,
        **kwargs: Any,
    ) -> None:
        if noise != "gaussian":
            raise ValueError(
                f"HiZOO estimates the Hessian diagonal from z² - 1, which is 0 for {noise} noise; use noise='gaussian'"
            )
        if not 0 <= hessian_smooth <= 1:
            raise ValueError(f"hessian_smooth must be in [0, 1], got {hessian_smooth}")
        if not min_curvature > 0:
            raise ValueError(f"min_curvature must be > 0, got {min_curvature}")
        super().__init__(params, lr=lr, eps=eps, noise=noise, **kwargs)
        self.hessian_smooth, self.min_curvature = float(hessian_smooth), float(min_curvature)
        self.curvature = [torch.ones(b.numel, device=b.device) for b in self.points.buffers]
        self._next_curvature: dict[int, torch.Tensor] = {}
        self._second_difference = 0.0
        self._use_curvature()

    def evaluations(self) -> list[Evaluation]:
        return [None, (0, 1.0), (0, -1.0)]

    def projected_grad(self, losses: list[float]) -> float:
        """g = (L₊ − L₋) / 2ε."""
        return (losses[1] - losses[2]) / (2 * self.eps)

    def coefficients(self, losses: list[float]) -> list[tuple[int, float]] | str:
        g = self.projected_grad(losses)
        if g == 0:
            return "projected_grad=0"
        self._second_difference = (losses[1] + losses[2] - 2 * losses[0]) / (2 * self.eps**2)
        return [(0, g)]

    def loss_at_theta(self, losses: list[float]) -> float:
        return losses[0]

    def step_stats(self, losses: list[float]) -> dict[str, Any]:
        total = sum(float(c.sum()) for c in self.curvature)
        return {"projected_grad": self.projected_grad(losses), "curvature_mean": total / self.points.numel}

    def direction(self, step: int, buffer: Buffer, coefs: list[tuple[int, float]]) -> torch.Tensor:
        z = self.points.noise_at(step, 0, buffer)
        old = self.curvature[buffer.index]
        estimate = (z * z).sub_(1).mul_(old).mul_(self._second_difference)
        new = torch.lerp(old, estimate, self.hessian_smooth).clamp_(min=self.min_curvature)
        self._next_curvature[buffer.index] = new
        return new.rsqrt().mul_(z).mul_(coefs[0][1])

    def on_applied(self, record: StepRecord, coefs: list[tuple[int, float]]) -> None:
        for index, values in self._next_curvature.items():
            self.curvature[index] = values
        self._next_curvature.clear()
        self._use_curvature()

    def _use_curvature(self) -> None:
        self.points.perturbation_scale = [c.rsqrt() for c in self.curvature]

    def extra_state(self) -> dict[str, Any]:
        return {"curvature": [c.clone() for c in self.curvature]}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        for mine, saved in zip(self.curvature, state["curvature"]):
            mine.copy_(saved)
        self._use_curvature()
