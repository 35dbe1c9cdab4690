"""Zeroth-order training inside the HuggingFace Trainer, with no fork of its loop."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from .batched import generation_closure, loss_closure, metric_closure
from .bnb_cpu import require_exact_4bit_cpu_path
from .checkpoint import load_state, save_state
from .generation import GenerationBatch
from .guard import Guard, rollback_line
from .objectives import (
    GENERATION_OBJECTIVES, CandidateBatch, GenerationObjective, Objective, resolve_generation_objective, resolve_objective,
)
from .optim.base import ZOOptimizer
from .optim.eps_check import EpsCheck
from .registry import get_optimizer, optimizer_class
from .tasks import GenerationTask

__all__ = ["GenerationCollator", "ZOTrainer"]

GENERATION_KEY = "generation"  # where a GenerationCollator's batch carries its prompts and answers


class GenerationCollator:
    """A ``data_collator`` of generation records (a prompt template's fields and the gold answers).

    A batch is the records' teacher-forced batch (``input_ids``, ``attention_mask``, ``labels``:
    the loss of the first answer, which ``zo_objective=None`` and the Trainer's evaluation use)
    and, under ``"generation"``, their :class:`~zopeft.GenerationBatch`, from which the ``f1`` /
    ``exact_match`` / user objectives generate.  Keyword arguments are
    :class:`~zopeft.tasks.GenerationTask`'s (``template``, ``answer_field``, ``cutoff_len``,
    ``max_new_tokens``, ``stop_strings``).  The records keep their text fields only with
    ``TrainingArguments(remove_unused_columns=False)``.
    """

    def __init__(self, tokenizer: Any, **task: Any) -> None:
        self.tokenizer, self.task = tokenizer, GenerationTask(**task)

    def __call__(self, records: list[dict]) -> dict[str, Any]:
        return {**self.task.collate(records, self.tokenizer),
                GENERATION_KEY: self.task.generation_batch(records, self.tokenizer)}

logger = logging.getLogger("zopeft")


class ZOTrainer(Trainer):
    """A :class:`transformers.Trainer` whose training step is forward-only.

    ``training_step`` runs the ZO estimate (the perturbed forwards) on each
    micro-batch; the Trainer's own ``optimizer.step()`` then applies the update,
    so gradient accumulation, the LR scheduler, logging, evaluation and
    checkpointing work unchanged.  No backward pass is run.

    Checkpoints hold the ZO optimizer, scheduler and guard state as JSON + safetensors
    (``zo_optimizer.json`` ...) instead of the Trainer's pickled ``optimizer.pt`` /
    ``scheduler.pt``; there is no gradient, so no ``grad_norm`` is logged.

    Args:
        zo_optimizer: a registered name (``"fzoo"``, ``"mezo"``, ``"adamezo"``, ``"hizoo"``) or a
            ready :class:`ZOOptimizer`.
        zo_kwargs: extra constructor arguments (``eps``, ``n_perturbations``, ...).
            ``lr``, ``weight_decay`` and ``seed`` default to the TrainingArguments'.
        zo_guard: ``True`` or :class:`~zopeft.Guard` keyword arguments: roll back loss spikes and
            back off the learning rate; training stops (``should_training_stop``) after its
            ``max_rollbacks`` rollbacks without progress.  It watches the evaluations
            (``watch="eval"``) by default when the Trainer evaluates during training (an
            ``eval_dataset`` and an ``eval_strategy`` other than ``"no"``), else the step losses;
            it judges the evaluations by ``args.metric_for_best_model`` where set (e.g.
            ``select_loss``, one of several eval datasets), else by accuracy, else by loss.
            ``load_best_model_at_end`` works as in the Trainer: the best checkpoint's adapter is
            loaded at the end.
        zo_objective: train on ``"candidate_ce"``, ``"accuracy"``, ``"margin"``, ``"python:module:function"`` or a
            callable instead of the loss (see :mod:`zopeft.objectives`): a sequence classifier's
            classes, or a causal LM's single-token label words ``zo_candidate_tokens`` (each
            batch row's one label token is its gold word).  With batches of a
            :class:`GenerationCollator`: ``"f1"``, ``"exact_match"``, or a function of
            ``(generations, records)`` of the greedy generations (:func:`zopeft.generation_closure`).
        zo_check_eps: before the first step of a new run, check that the perturbations' ε is above
            the forward pass's rounding (:meth:`ZOOptimizer.check_eps`; the outcome is logged, a
            failure as a WARNING naming the ε to use, and kept as ``zo_eps_check``); ``None``
            (default): when the model has bf16/fp16 tensors or the Trainer runs under bf16/fp16.
        *args, **kwargs: as for :class:`transformers.Trainer`.
    """

    def __init__(
        self, *args: Any, zo_optimizer: str | ZOOptimizer = "fzoo", zo_kwargs: dict[str, Any] | None = None,
        zo_guard: bool | dict[str, Any] = False, zo_objective: str | Objective | None = None,
        zo_candidate_tokens: list[int] | None = None, zo_check_eps: bool | None = None, **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        require_exact_4bit_cpu_path(self.model)
        self.zo_optimizer = zo_optimizer
        self.zo_kwargs = dict(zo_kwargs or {})
        if not isinstance(zo_optimizer, ZOOptimizer):
            optimizer_class(zo_optimizer, {"lr": 0, "weight_decay": 0, "seed": 0, **self.zo_kwargs})  # fail now
        self.zo_guard_settings = ({} if zo_guard is True else dict(zo_guard)) if zo_guard else None
        evaluates = self.eval_dataset is not None and self.args.eval_strategy != "no"
        if self.zo_guard_settings is not None and "watch" not in self.zo_guard_settings and evaluates:
            self.zo_guard_settings["watch"] = "eval"
        self.zo_guard: Guard | None = None
        spec = zo_objective if zo_objective not in (None, "loss") else None
        self.zo_objective_spec = spec
        self.zo_objective: Objective | GenerationObjective | None = (
            None if spec is None else resolve_generation_objective(spec) if spec in GENERATION_OBJECTIVES
            else resolve_objective(spec))
        self._zo_generation_objective: GenerationObjective | None = None
        self.zo_candidate_tokens = zo_candidate_tokens
        self.zo_check_eps = zo_check_eps
        self.zo_eps_check: EpsCheck | None = None
        self.add_callback(_GuardCallback(self))

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """The ZO optimizer (``zo_optimizer``: a name from the registry or an instance), not AdamW."""
        if self.optimizer is None:
            if isinstance(self.zo_optimizer, ZOOptimizer):
                self.optimizer = self.zo_optimizer
            else:
                kwargs = {"lr": self.args.learning_rate, "weight_decay": self.args.weight_decay, "seed": self.args.seed}
                self.optimizer = get_optimizer(self.zo_optimizer, model or self.model, **{**kwargs, **self.zo_kwargs})
                self.zo_optimizer = self.optimizer
            if self.zo_guard_settings is not None:
                self.zo_guard = Guard(self.optimizer, **self.zo_guard_settings)
        return self.optimizer

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """The ZO estimate on one micro-batch (forward passes only; the update comes at ``optimizer.step()``);
        returns its loss, scaled for gradient accumulation as HF's is."""
        inputs = self._prepare_inputs(inputs)
        generation = inputs.pop(GENERATION_KEY, None)
        closure = self._loss_closure(model, inputs, generation)
        with self.compute_loss_context_manager():
            if self.state.global_step == 0 and self.zo_eps_check is None and self._checks_eps(model):
                self.zo_eps_check = self.zo_optimizer.check_eps(closure)
                (logger.info if self.zo_eps_check.ok else logger.warning)(self.zo_eps_check.line("eps"))
            loss = self.zo_optimizer.estimate(closure)
        return torch.tensor(loss / self.current_gradient_accumulation_steps, device=self.args.device)

    def _checks_eps(self, model: torch.nn.Module) -> bool:
        if self.zo_check_eps is not None:
            return self.zo_check_eps
        half = (torch.bfloat16, torch.float16)
        return self.args.bf16 or self.args.fp16 or any(p.dtype in half for p in model.parameters())

    def _loss_closure(
        self, model: torch.nn.Module, inputs: dict[str, Any], generation: GenerationBatch | None = None
    ) -> Callable[[], Any]:
        """The objective, or the model's own loss (with batched evaluation) unless ``compute_loss`` is customised."""
        if self.zo_objective is not None and generation is not None:
            if self._zo_generation_objective is None:  # once: a user function counts its failures over the run
                self._zo_generation_objective = resolve_generation_objective(self.zo_objective_spec)
            return generation_closure(model, generation.to(self.args.device), self._zo_generation_objective)
        if self.zo_objective in GENERATION_OBJECTIVES.values():
            raise ValueError(f"zo_objective {self.zo_objective_spec!r} scores generated answers: build the batches "
                             "with data_collator=zopeft.GenerationCollator(tokenizer, template=...)")
        if self.zo_objective is not None:
            return metric_closure(model, self._candidates(model, inputs), self.zo_objective)
        if type(self).compute_loss is Trainer.compute_loss and self.label_smoother is None and "labels" in inputs:
            return loss_closure(model, inputs)
        return lambda: self.compute_loss(model, inputs)

    def _candidates(self, model: torch.nn.Module, inputs: dict[str, Any]) -> CandidateBatch:
        """The batch's candidates: a classifier's classes, or the label words ``zo_candidate_tokens``."""
        labels = inputs["labels"]
        if self.zo_candidate_tokens is None:
            if labels.dim() != 1:
                raise ValueError("zo_objective on a causal LM needs zo_candidate_tokens (the label words' token ids)")
            return CandidateBatch(inputs, labels, int(model.config.num_labels))
        tokens = torch.tensor(self.zo_candidate_tokens, device=labels.device)
        labelled = labels != -100
        if not bool((labelled.sum(1) == 1).all()):
            raise ValueError("zo_objective with zo_candidate_tokens needs exactly one label token per row")
        gold = (labels[labelled].unsqueeze(1) == tokens).float().argmax(1)
        return CandidateBatch(inputs, gold, len(self.zo_candidate_tokens), candidate_tokens=tokens)

    def prediction_step(self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        """The Trainer's evaluation, on the teacher-forced batch (a :class:`GenerationCollator`'s prompts left out)."""
        return super().prediction_step(model, {k: v for k, v in inputs.items() if k != GENERATION_KEY}, *args, **kwargs)

    # ----- no gradient: nothing to clip or report ------------------------------------------------
    def _clip_grad_norm(self, model: torch.nn.Module) -> None:
        return None

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> None:
        return None

    # ----- checkpoints without pickle -------------------------------------------------------------
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not isinstance(self.zo_optimizer, ZOOptimizer):  # (self.optimizer is accelerate's wrapper of it)
            return super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            save_state(self.zo_optimizer.state_dict(), output_dir, "zo_optimizer")
            save_state(self.lr_scheduler.state_dict(), output_dir, "zo_scheduler")
            if self.zo_guard is not None:
                save_state(self.zo_guard.state_dict(), output_dir, "zo_guard")
        return None

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not os.path.isfile(os.path.join(checkpoint, "zo_optimizer.json")):
            return super()._load_optimizer_and_scheduler(checkpoint)
        self.zo_optimizer.load_state_dict(load_state(checkpoint, "zo_optimizer"))
        self.lr_scheduler.load_state_dict(load_state(checkpoint, "zo_scheduler"))
        if self.zo_guard is not None and os.path.isfile(os.path.join(checkpoint, "zo_guard.json")):
            self.zo_guard.load_state_dict(load_state(checkpoint, "zo_guard"))
        return None

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the ZO statistics (forward passes, σ or projected gradient, skipped steps) to each log."""
        if "loss" in logs and isinstance(self.zo_optimizer, ZOOptimizer):
            stats = self.zo_optimizer.last_stats
            logs.update({f"zo_{k}": v for k, v in stats.items() if k in ("forward_passes", "skipped_steps", "sigma", "projected_grad")})
            if self.zo_guard is not None:
                logs["zo_rollbacks"] = self.zo_guard.rollbacks
        super().log(logs, *args, **kwargs)


class _GuardCallback(TrainerCallback):
    """Runs the trainer's guard after every optimizer step (and evaluation, with ``watch="eval"``)."""

    def __init__(self, trainer: ZOTrainer) -> None:
        self.trainer = trainer
        self.unjudged_warned = False

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        return self._judge(control, lambda guard: guard.observe_step())

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None, **kwargs: Any) -> Any:
        """Judge ``args.metric_for_best_model`` where set (with several eval datasets, e.g. ``eval_select_loss``
        judges the one named ``select``; the others' evaluations are not judged), else accuracy, else loss."""
        metrics, name = metrics or {}, args.metric_for_best_model
        if name is None:
            guard = self.trainer.zo_guard
            if guard is not None and guard.watch == "eval" and not {"eval_accuracy", "eval_loss"} & metrics.keys():
                if not self.unjudged_warned:
                    logger.warning("zopeft guard: an evaluation without eval_accuracy or eval_loss (several eval "
                                   "datasets?) is not judged; set metric_for_best_model to the metric to judge, "
                                   "e.g. select_loss")
                self.unjudged_warned = True
            return self._judge(control, lambda guard: guard.observe_metrics(metrics, prefix="eval_"))
        key = name if name.startswith("eval_") else f"eval_{name}"
        if key not in metrics:
            return control
        return self._judge(control, lambda guard: guard.observe_eval(metrics[key], higher_is_better=args.greater_is_better))

    def _judge(self, control: Any, observe: Callable[[Guard], None]) -> Any:
        guard = self.trainer.zo_guard
        if guard is None:
            return control
        events, stop = guard.judge(observe)
        for event in events:
            logger.warning("zopeft %s", rollback_line(event))
        if stop is not None:
            logger.warning("zopeft guard: %s", stop)
            control.should_training_stop = True
        return control
