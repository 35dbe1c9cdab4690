"""The parts of a run, built from a recipe: model and adapter specs, task format, records, data order, optimizer.

The first stage of a run (setup → train → save), shared by :mod:`zopeft.runner`,
:mod:`zopeft.merge` and :mod:`zopeft.replay`.  Nothing here loads a model or touches
the output directory; :func:`training_data` and :func:`eval_data` check the records
against the task format, so a data or template mistake is reported before a model loads.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .data import BUILTIN_DATASETS, load_records
from .models import AdapterSpec, ModelSpec
from .objectives import Objective, resolve_objective
from .recipe import Recipe, RecipeError
from .registry import get_optimizer
from .tasks import Task, build_task

__all__ = [
    "adapter_spec", "batch_indices", "build_task_for", "eval_data", "load_split", "make_optimizer", "model_spec",
    "objective", "training_data",
]


def _dataset_defaults(recipe: Recipe) -> dict[str, Any]:
    return dict(BUILTIN_DATASETS.get(recipe.dataset, {}).get("task", {}))


def _task_kind(recipe: Recipe) -> str:
    kind = recipe.task or _dataset_defaults(recipe).get("kind")
    if kind is None:
        raise RecipeError([f"task: required for dataset {recipe.dataset!r} (classification, multiple_choice, sft or sequence_classification)"])
    return kind


def model_spec(recipe: Recipe) -> ModelSpec:
    """The :class:`ModelSpec` a recipe describes."""
    task_type = recipe.task_type or ("sequence_classification" if _task_kind(recipe) == "sequence_classification" else "causal_lm")
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
    settings = _dataset_defaults(recipe)
    settings.pop("kind", None)
    kind = _task_kind(recipe)
    for key in ("template", "label_words", "text_fields"):
        if getattr(recipe, key) is not None:
            settings[key] = getattr(recipe, key)
    if kind == "multiple_choice":
        settings["choices_field"] = recipe.choices_field
    return build_task(kind, cutoff_len=recipe.cutoff_len, label_field=recipe.label_field, **settings)


def load_split(recipe: Recipe, split: str) -> list[dict]:
    """Records of the train or eval split, capped by max_train_samples / max_eval_samples."""
    if split == "train":
        records, cap = load_records(recipe.dataset, "train"), recipe.max_train_samples
    else:
        source = recipe.eval_dataset or recipe.dataset
        records = load_records(source, split if source in BUILTIN_DATASETS else None)
        cap = recipe.max_eval_samples
    return records[:cap] if cap else records


def _checked(recipe: Recipe, task: Task, split: str) -> list[dict]:
    """The split's records, each checked against the task format; a mismatch is one RecipeError line."""
    key = "dataset" if split == "train" or recipe.eval_dataset is None else "eval_dataset"
    source = getattr(recipe, key)
    records = load_split(recipe, split)
    if not records:
        raise RecipeError([f"{key}: {source!r} has no records in its {split} split"])
    for i, record in enumerate(records):
        try:
            task.check(record)
        except (KeyError, ValueError) as err:
            where = f"{source!r} ({split} split)" if source in BUILTIN_DATASETS else repr(source)
            raise RecipeError([f"{key}: record {i} of {where} does not fit task {task.kind}: {err.args[0]}"]) from None
    return records


def training_data(recipe: Recipe) -> tuple[Task, list[dict], list[dict]]:
    """The task format and the checked train and eval (dev) records."""
    task = build_task_for(recipe)
    return task, _checked(recipe, task, "train"), _checked(recipe, task, "dev")


def eval_data(recipe: Recipe, split: str = "dev") -> tuple[Task, list[dict]]:
    """The task format and the checked records of ``split``."""
    task = build_task_for(recipe)
    return task, _checked(recipe, task, split)


def objective(recipe: Recipe, task: Task) -> Objective | None:
    """The recipe's ``zo.objective`` as a function (``None``: the loss); refused for a task without candidates."""
    if recipe.zo.objective == "loss":
        return None
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
            recipe.zo.optimizer, model, lr=recipe.learning_rate, weight_decay=recipe.weight_decay,
            seed=recipe.seed, **recipe.zo.optimizer_kwargs(),
        )
    if world_size > 1:
        raise RecipeError([
            f"zo.optimizer: {recipe.zo.optimizer} (the first-order baseline) runs in one process; "
            "launch it without torchrun or choose a ZO optimizer (fzoo, mezo, adamezo, hizoo)"
        ])
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
