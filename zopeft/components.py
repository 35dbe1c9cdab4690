"""The parts of a run, built from a recipe: model and adapter specs, task format, records, data order, optimizer.

The first stage of a run (setup → train → save), shared by :mod:`zopeft.runner`,
:mod:`zopeft.merge` and :mod:`zopeft.replay`.  Nothing here loads a model or touches
the output directory; :func:`training_data` and :func:`eval_data` check the records
against the task format, so a data or template mistake is reported before a model loads.
Which records are trained and evaluated on is :mod:`zopeft.splits`' business.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch

from .batched import candidate_loss, generation_closure, loss_closure, metric_closure
from .costs import BACKWARD_COST
from .generation import GenerationBatch
from .models import AdapterSpec, ModelSpec
from .objectives import CandidateBatch, GenerationObjective, Objective, resolve_generation_objective, resolve_objective
from .optim.base import ZOOptimizer
from .recipe import Recipe, RecipeError
from .registry import get_optimizer
from .resolved import task_settings
from .splits import DataSplits, Split
from .tasks import Task, build_task

__all__ = [
    "adapter_spec", "batch_indices", "build_task_for", "checks_eps", "eval_data", "forward_equivalents",
    "make_optimizer", "model_spec", "objective", "step_batches", "torch_threads", "train_step", "training_batch",
    "training_data", "zo_closure",
]

def model_spec(recipe: Recipe) -> ModelSpec:
    """The :class:`ModelSpec` a recipe describes."""
    kind = task_settings(recipe)["kind"]
    task_type = recipe.task_type or ("sequence_classification" if kind == "sequence_classification" else "causal_lm")
    return ModelSpec(
        model_name_or_path=recipe.model_name_or_path, task_type=task_type, num_labels=recipe.num_labels,
        quantization_bit=recipe.quantization_bit, quantization_type=recipe.quantization_type,
        double_quantization=recipe.double_quantization, compute_dtype=recipe.compute_dtype,
        trust_remote_code=recipe.trust_remote_code,
    )


def adapter_spec(recipe: Recipe) -> AdapterSpec:
    """The :class:`AdapterSpec` a recipe describes."""
    return AdapterSpec(
        finetuning_type=recipe.finetuning_type, lora_rank=recipe.lora_rank, lora_alpha=recipe.lora_alpha,
        lora_dropout=recipe.lora_dropout, lora_target=recipe.lora_target,
        num_virtual_tokens=recipe.num_virtual_tokens, modules_to_save=recipe.modules_to_save,
    )


def build_task_for(recipe: Recipe) -> Task:
    """The task format of the recipe (bundled datasets fill in template, label words and text fields)."""
    return build_task(**task_settings(recipe))


def training_data(recipe: Recipe) -> tuple[Task, DataSplits]:
    """The task format and the data splits, every record read and checked against it."""
    task = build_task_for(recipe)
    return task, DataSplits(recipe, task).load()


def eval_data(recipe: Recipe, split: str = "dev") -> tuple[Task, Split]:
    """The task format and the checked records of ``split`` (:meth:`~zopeft.splits.DataSplits.split`)."""
    task = build_task_for(recipe)
    return task, DataSplits(recipe, task).split(split)


def forward_equivalents(recipe: Recipe, forward_passes: int) -> int:
    """Forward passes plus backward passes at :data:`BACKWARD_COST` forwards each (the AdamW baseline's)."""
    return forward_passes * (1 if recipe.is_zeroth_order else 1 + BACKWARD_COST)


@contextlib.contextmanager
def torch_threads(recipe: Recipe | int | None) -> Iterator[int]:
    """torch's CPU threads set to the recipe's ``threads`` (or a count; None: unchanged) for the duration; yields the
    number in use."""
    before = torch.get_num_threads()
    threads = recipe.threads if isinstance(recipe, Recipe) else recipe
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def objective(recipe: Recipe, task: Task) -> Objective | GenerationObjective | None:
    """The recipe's ``zo.objective`` as a function (``None``: the loss); refused for a task without candidates
    or generations."""
    if recipe.zo.objective == "loss":
        return None
    if hasattr(task, "generation_batch"):
        try:
            return resolve_generation_objective(recipe.zo.objective)
        except ValueError as err:
            raise RecipeError([f"zo.objective: {err}"]) from None
    if not hasattr(task, "candidate_batch"):
        raise RecipeError([
            f"zo.objective: {recipe.zo.objective} scores candidates (label words, answer choices or classes); task "
            f"{task.kind} has none and trains on the loss only: use zo.objective: loss"
        ])
    try:
        return resolve_objective(recipe.zo.objective)
    except ValueError as err:
        raise RecipeError([f"zo.objective: {err}"]) from None


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def batch_indices(recipe: Recipe, step: int, micro: int, n: int, shard: int = 0, shards: int = 1) -> list[int]:
    """Example indices of micro-batch ``micro`` of step ``step`` for data shard ``shard`` of ``shards``.

    A pure function of its arguments: data-parallel ranks read consecutive slices of one stream.
    """
    bs = recipe.per_device_train_batch_size
    start = ((step * recipe.gradient_accumulation_steps + micro) * shards + shard) * bs
    return [_permutation(recipe.seed, s // n, n)[s % n] for s in range(start, start + bs)]


def make_optimizer(recipe: Recipe, model: torch.nn.Module, world_size: int = 1) -> torch.optim.Optimizer:
    """The recipe's ZO optimizer (or the first-order AdamW baseline) over the model's trainable tensors."""
    if recipe.is_zeroth_order:
        return get_optimizer(
            recipe.zo.optimizer, model, lr=recipe.effective_learning_rate, weight_decay=recipe.weight_decay,
            seed=recipe.seed, **recipe.zo.optimizer_kwargs(),
        )
    if world_size > 1:
        raise RecipeError([
            f"zo.optimizer: {recipe.zo.optimizer} (the first-order baseline) runs in one process; "
            "launch it without torchrun or choose a ZO optimizer (fzoo, mezo, adamezo, hizoo)"
        ])
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=recipe.effective_learning_rate, weight_decay=recipe.weight_decay)


def training_batch(task: Task, records: list[dict], tokenizer: Any, model: torch.nn.Module, scored: bool) -> Any:
    """A micro-batch of ``records`` on the model's device: the task's batch, or (``scored``) its candidate batch
    (a generation task: its prompts to generate from)."""
    device = next(p.device for p in model.parameters())
    if scored:
        make = task.generation_batch if hasattr(task, "generation_batch") else task.candidate_batch
        return make(records, tokenizer).to(device)
    return {k: v.to(device) for k, v in task.collate(records, tokenizer).items()}


def zo_closure(model: torch.nn.Module, batch: Any, target: Objective | GenerationObjective | None) -> Any:
    """What a ZO step evaluates on a :func:`training_batch`: its loss, or ``target`` on its candidates or generations."""
    if target is None:
        return loss_closure(model, batch)
    if isinstance(batch, GenerationBatch):
        return generation_closure(model, batch, target)
    return metric_closure(model, batch, target)


def step_batches(
    recipe: Recipe, task: Task, records: list[dict], step: int, tokenizer: Any, model: torch.nn.Module, scored: bool,
    shard: int = 0, shards: int = 1,
) -> list[Any]:
    """The ``gradient_accumulation_steps`` micro-batches of step ``step`` (data shard ``shard`` of ``shards``)."""
    n = len(records)
    return [training_batch(task, [records[i] for i in batch_indices(recipe, step, j, n, shard, shards)], tokenizer,
                           model, scored) for j in range(recipe.gradient_accumulation_steps)]


def train_step(opt: torch.optim.Optimizer, model: torch.nn.Module, batches: list[Any],
               target: Objective | GenerationObjective | None) -> dict[str, Any]:
    """One optimizer step over the micro-batches (ZO, or the AdamW baseline); returns the statistics to log."""
    if isinstance(opt, ZOOptimizer):
        closures = [zo_closure(model, b, target) for b in batches]
        for closure in closures[:-1]:
            opt.estimate(closure)
        opt.step(closures[-1])
        return dict(opt.last_stats)
    model.train()
    total = 0.0
    for batch in batches:  # a CandidateBatch under zo.objective: candidate_ce
        loss = (candidate_loss(model, batch) if isinstance(batch, CandidateBatch) else model(**batch).loss) / len(batches)
        loss.backward()
        total += loss.item()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    return {"loss": total}


def checks_eps(recipe: Recipe) -> bool:
    """Whether a new run checks zo.eps first (``zo.check_eps``; auto: half precision, on a continuous objective)."""
    setting = recipe.zo.check_eps
    if setting != "auto":
        return setting == "always"
    return recipe.compute_dtype != "float32" and recipe.zo.objective in ("loss", "candidate_ce", "margin")
