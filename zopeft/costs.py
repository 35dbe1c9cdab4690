"""What a run's parts cost, in forward passes of one sequence, without torch (``zopeft validate`` prices a run).

The estimates are the benchmarks' (``benchmarks/bench_convergence.py``): a ZO step runs its
optimizer's loss evaluations over the step's examples; a first-order step is a forward pass and
a backward pass at :data:`BACKWARD_COST` forwards; a greedy generation costs
:data:`GENERATION_FORWARD_EQUIVALENTS`; an evaluated record of a scored task one forward pass, or one
a candidate where its candidates are scored one sequence each (:func:`zopeft.resolved.eval_forwards_per_record`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .optim.settings import FZOO

__all__ = [
    "BACKWARD_COST", "EVALUATIONS", "EVAL_SHARE", "GENERATION_FORWARD_EQUIVALENTS", "STEP_POINTS",
    "UNKNOWN_STEP_POINTS", "step_points",
]

BACKWARD_COST = 2  # a backward pass costs about two forward passes
# what a greedy generation of a sequence costs in forward passes: its prefill, and its cached decoding steps (one
# token a row each) about one more (benchmarks/bench_convergence.py's docstring: measured 1.4-2.0x a loss forward)
GENERATION_FORWARD_EQUIVALENTS = 2
# the loss evaluations of one step of each built-in ZO optimizer (their ``evaluations()``), FZOO's from its N
STEP_POINTS = {"mezo": 2, "adamezo": 2, "hizoo": 3}
UNKNOWN_STEP_POINTS = 2  # a registered optimizer's: the fewest a two-sided step makes
EVAL_SHARE = 0.25  # eval_steps: auto: the evaluations between start and end cost at most this share of the training
EVALUATIONS = 10  # eval_steps: auto: the evaluations a run makes after its start (the end's included), at most


def step_points(optimizer: str, settings: Mapping[str, Any], zeroth_order: bool = True) -> int:
    """Forward-pass equivalents one step spends on each example: its ZO loss evaluations (FZOO: N + 1), or a first
    order step's forward and backward passes."""
    if not zeroth_order:
        return 1 + BACKWARD_COST
    if optimizer == "fzoo":
        return int(settings.get("n_perturbations", FZOO["n_perturbations"].default)) + 1
    return STEP_POINTS.get(optimizer, UNKNOWN_STEP_POINTS)
