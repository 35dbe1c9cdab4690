"""Is ε above the forward pass's rounding?  A finite-difference check before a run.

A ZO step reads the loss difference of nearby points (MeZO: L(θ+εz) − L(θ−εz)).  The forward
pass rounds every activation to its dtype, and in half precision (bf16 keeps 8 significant bits)
that rounding can make the difference for a small ε: measured on SmolLM2-135M + LoRA r=8 (B = 0,
8 examples), the bf16 differences at ε = 1e-3 correlate -0.03 with the fp32 ones along the same
directions, at ε = 1e-2 0.96 (``python -m benchmarks.bench_eps``), and the demo trained in bf16
lowered its eval loss half as far at 1e-3 as at 1e-2 in each of three seeds (README).  Nothing in
such a run's loss curve says why it is slow.

The check needs no second copy of the model.  Along K directions z_k it measures the central
differences D_s = L(θ+sεz_k) − L(θ−sεz_k) for s = 1, 2, 3.  In exact arithmetic D_s = a·s + b·s³ up
to fifth order (the slope and the curvature's odd part), so the combination n = (5·D₁ − 4·D₂ +
D₃)/√42, which is 0 for every a and b, holds only the rounding: its size is the rounding noise of
one difference.  The check reports r = rms(n) / rms(D₁), the rounding's size next to a difference
at ε: about 1e-3 in fp32.  Noise r adds r² to the variance of the gradient estimate (relative to
what the perturbation itself gives), so a run needs about (1 + r²)× the steps of exact arithmetic
for the same progress; above :data:`MAX_NOISE` (1.5×) the check tries larger ε (:data:`SCALES`)
and suggests the first that passes (at a large ε, r also grows with the loss's fifth-order
curvature, so "none passed" names the best one tried).  r is itself an estimate from K directions (±25% at
K = 8).  It costs 6·K loss evaluations per ε tried and leaves the weights bit-exactly as it found
them (:meth:`zopeft.ZOOptimizer.check_eps`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["DIRECTIONS", "MAX_NOISE", "SCALES", "EpsCheck", "central_differences", "evaluations", "noise_ratio"]

DIRECTIONS = 8
MAX_NOISE = 0.7  # (1 + r²) = 1.5: half as many steps again as exact arithmetic
SCALES = (1.0, 3.0, 10.0)  # ε, then 3ε and 10ε while they fail
_MULTIPLES = (1.0, 2.0, 3.0)  # s of D_s
_NULL = (5.0, -4.0, 1.0)  # orthogonal to (s) and (s³) for s = 1, 2, 3; norm √42


def evaluations(directions: int, scale: float) -> list[tuple[int, float]]:
    """The points of one ε: ``(k, ±s·scale)`` for s = 1, 2, 3 and k < ``directions``."""
    return [(k, sign * s * scale) for k in range(directions) for s in _MULTIPLES for sign in (1.0, -1.0)]


def central_differences(losses: Sequence[float]) -> list[list[float]]:
    """``[D_1, D_2, D_3]`` per direction, from losses in :func:`evaluations` order."""
    return [[losses[i + j] - losses[i + j + 1] for j in range(0, 6, 2)] for i in range(0, len(losses), 6)]


def noise_ratio(losses: Sequence[float]) -> float:
    """rms((5·D₁ − 4·D₂ + D₃)/√42) / rms(D₁) over the directions (inf: flat or not finite)."""
    d = central_differences(losses)
    noise = math.sqrt(sum(sum(c * x for c, x in zip(_NULL, row)) ** 2 for row in d) / 42)
    size = math.sqrt(sum(row[0] ** 2 for row in d))
    value = noise / size if size else math.inf
    return value if math.isfinite(value) else math.inf


@dataclass
class EpsCheck:
    """The outcome: the noise at each ε tried, and the ε to use (``None``: none of them passed)."""

    eps: float
    noise: dict[float, float]  # ε tried -> rounding noise / difference, in order
    differences: list[float]  # D₁ = L(θ+εz_k) − L(θ−εz_k) at the first ε, per direction
    directions: int
    forward_passes: int

    @property
    def ok(self) -> bool:
        """Whether the first ε tried (``eps``) passed."""
        return next(iter(self.noise.values())) <= MAX_NOISE

    @property
    def suggested(self) -> float | None:
        """The smallest ε tried that passed (``eps`` itself when it did)."""
        return next((e for e, d in self.noise.items() if d <= MAX_NOISE), None)

    def line(self, name: str = "zo.eps") -> str:
        """One line for a log: ``ok``, or what is wrong and what to do."""
        (first, r), *larger = self.noise.items()
        tried = "".join(f"; at {e:g}: {_fmt(v)}" for e, v in larger)
        head = (f"eps check: {name}={first:g} {'ok' if self.ok else 'noisy'}: rounding noise / loss difference "
                f"{_fmt(r)}{tried} ({self.directions} directions, {self.forward_passes} forward passes)")
        if self.ok:
            return head
        if all(math.isinf(v) for v in self.noise.values()):
            return (f"{head}: the loss did not change at any ε tried; check what the closure measures "
                    "(a discrete objective needs a larger ε or batch)")
        if self.suggested is not None:
            fix = f"set {name}: {self.suggested:g}"
        else:
            best, lowest = min(self.noise.items(), key=lambda item: item[1])
            fix = (f"no ε tried passes (best {best:g}: {lowest:.2g}): raise per_device_train_batch_size (the "
                   "rounding averages out over examples) or use compute_dtype float32")
        return f"{head}: a run needs about {_cost(r)} the steps of exact arithmetic; {fix}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record (the ``eps_check`` entry of a training log or of lr-find's output)."""
        return {**asdict(self), "noise": {f"{e:g}": d for e, d in self.noise.items()},
                "ok": self.ok, "suggested": self.suggested}


def _fmt(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.2g}"


def _cost(r: float) -> str:
    return "∞×" if math.isinf(r) else f"{1 + r * r:.1f}×"
