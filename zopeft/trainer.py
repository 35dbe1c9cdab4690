"""Zeroth-order training inside the HuggingFace Trainer, with no fork of its loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import Trainer

from .batched import loss_closure
from .bnb_cpu import require_exact_4bit_cpu_path
from .optim.base import ZOOptimizer
from .registry import get_optimizer

__all__ = ["ZOTrainer"]


class ZOTrainer(Trainer):
    """A :class:`transformers.Trainer` whose training step is forward-only.

    ``training_step`` runs the ZO estimate (the perturbed forwards) on each
    micro-batch; the Trainer's own ``optimizer.step()`` then applies the update,
    so gradient accumulation, the LR scheduler, logging, evaluation and
    checkpointing work unchanged.  No backward pass is run.

    Args:
        zo_optimizer: a registered name (``"fzoo"``, ``"mezo"``, ``"adamezo"``) or a
            ready :class:`ZOOptimizer`.
        zo_kwargs: extra constructor arguments (``eps``, ``n_perturbations``, ...).
            ``lr``, ``weight_decay`` and ``seed`` default to the TrainingArguments'.
        *args, **kwargs: as for :class:`transformers.Trainer`.
    """

    def __init__(
        self, *args: Any, zo_optimizer: str | ZOOptimizer = "fzoo", zo_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        require_exact_4bit_cpu_path(self.model)
        self.zo_optimizer = zo_optimizer
        self.zo_kwargs = dict(zo_kwargs or {})

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            if isinstance(self.zo_optimizer, ZOOptimizer):
                self.optimizer = self.zo_optimizer
            else:
                kwargs = {"lr": self.args.learning_rate, "weight_decay": self.args.weight_decay, "seed": self.args.seed}
                self.optimizer = get_optimizer(self.zo_optimizer, model or self.model, **{**kwargs, **self.zo_kwargs})
                self.zo_optimizer = self.optimizer
        return self.optimizer

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = self.zo_optimizer.estimate(self._loss_closure(model, inputs))
        return torch.tensor(loss / self.current_gradient_accumulation_steps, device=self.args.device)

    def _loss_closure(self, model: torch.nn.Module, inputs: dict[str, Any]) -> Callable[[], Any]:
        """The model's own loss (with batched evaluation) unless ``compute_loss`` is customised."""
        if type(self).compute_loss is Trainer.compute_loss and self.label_smoother is None and "labels" in inputs:
            return loss_closure(model, inputs)
        return lambda: self.compute_loss(model, inputs)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the ZO statistics (forward passes, σ or projected gradient, skipped steps) to each log."""
        if "loss" in logs and isinstance(self.zo_optimizer, ZOOptimizer):
            stats = self.zo_optimizer.last_stats
            logs.update({f"zo_{k}": v for k, v in stats.items() if k in ("forward_passes", "skipped_steps", "sigma", "projected_grad")})
        super().log(logs, *args, **kwargs)
