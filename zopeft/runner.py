"""Run a recipe: build the model, train with a ZO (or AdamW) optimizer, evaluate, checkpoint, resume.

This is what ``zopeft train`` and ``zopeft eval`` call; everything is usable from Python::

    from zopeft.recipe import load_recipe
    from zopeft.runner import train
    result = train(load_recipe("recipes/smollm2_lora_fzoo_sst2.yaml", ["max_steps=20"]))

The data order is a pure function of (seed, step), the noise of (seed, step,
perturbation, tensor), and every checkpoint holds the adapter, the optimizer,
scheduler and RNG state: a run killed at any step and resumed ends with the
bit-identical adapter of an uninterrupted run.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from .batched import loss_closure
from .checkpoint import atomic_directory, latest_checkpoint, load_state, save_state, write_text_atomic
from .data import BUILTIN_DATASETS, load_records
from .distributed import barrier, distributed_session
from .models import AdapterSpec, ModelSpec, load_adapter_model, load_model, trainable_summary
from .optim.base import ZOOptimizer
from .recipe import Recipe, RecipeError
from .registry import get_optimizer
from .tasks import Task, build_task

__all__ = ["RunResult", "build_task_for", "evaluate", "load_split", "model_spec", "train"]

logger = logging.getLogger("zopeft")
LOG_NAME, RECIPE_NAME = "trainer_log.jsonl", "recipe.yaml"


@dataclass
class RunResult:
    """What a finished training run reports."""

    output_dir: Path
    steps: int
    forward_passes: int
    seconds: float
    eval_before: dict[str, float] = field(default_factory=dict)
    eval_after: dict[str, float] = field(default_factory=dict)
    resumed_from: Path | None = None


# ----- building blocks ---------------------------------------------------------------------------
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
    return AdapterSpec(
        finetuning_type=recipe.finetuning_type, lora_rank=recipe.lora_rank, lora_alpha=recipe.lora_alpha,
        lora_dropout=recipe.lora_dropout, lora_target=recipe.lora_target,
        num_virtual_tokens=recipe.num_virtual_tokens, modules_to_save=recipe.modules_to_save,
    )


def build_task_for(recipe: Recipe) -> Task:
    """The task format of the recipe (bundled datasets fill in template and label words)."""
    settings = _dataset_defaults(recipe)
    settings.pop("kind", None)
    if recipe.template is not None:
        settings["template"] = recipe.template
    if recipe.label_words is not None:
        settings["label_words"] = recipe.label_words
    return build_task(_task_kind(recipe), cutoff_len=recipe.cutoff_len, **settings)


def load_split(recipe: Recipe, split: str) -> list[dict]:
    """Records of the train or eval split, capped by max_train_samples / max_eval_samples."""
    if split == "train":
        records, cap = load_records(recipe.dataset, "train"), recipe.max_train_samples
    else:
        source = recipe.eval_dataset or recipe.dataset
        records = load_records(source, split if source in BUILTIN_DATASETS else None)
        cap = recipe.max_eval_samples
    return records[:cap] if cap else records


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


def _make_optimizer(recipe: Recipe, model: torch.nn.Module, world_size: int) -> torch.optim.Optimizer:
    if recipe.is_zeroth_order:
        return get_optimizer(
            recipe.zo.optimizer, model, lr=recipe.learning_rate, weight_decay=recipe.weight_decay,
            seed=recipe.seed, **recipe.zo.optimizer_kwargs(),
        )
    if world_size > 1:
        raise RecipeError([
            f"zo.optimizer: {recipe.zo.optimizer} (the first-order baseline) runs in one process; "
            "launch it without torchrun or choose fzoo, mezo or adamezo"
        ])
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=recipe.weight_decay)


def _to_device(batch: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    device = next(p.device for p in model.parameters())
    return {k: v.to(device) for k, v in batch.items()}


def _train_step(
    opt: torch.optim.Optimizer, model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]
) -> dict[str, Any]:
    """One optimizer step over the micro-batches; returns the statistics to log."""
    if isinstance(opt, ZOOptimizer):
        for batch in batches[:-1]:
            opt.estimate(loss_closure(model, batch))
        opt.step(loss_closure(model, batches[-1]))
        return dict(opt.last_stats)
    model.train()
    total = 0.0
    for batch in batches:
        loss = model(**batch).loss / len(batches)
        loss.backward()
        total += loss.item()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    return {"loss": total}


# ----- checkpoints -------------------------------------------------------------------------------
def _save_checkpoint(
    path: Path, recipe: Recipe, model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, step: int,
    forward_passes: int, world_size: int, shards: int,
) -> None:
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp)
        save_state(opt.state_dict(), tmp, "optimizer")
        save_state(sched.state_dict(), tmp, "scheduler")
        save_state({"torch": torch.get_rng_state()}, tmp, "rng")
        n = len(load_split(recipe, "train"))
        position = step * recipe.gradient_accumulation_steps * recipe.per_device_train_batch_size * shards
        (tmp / "trainer_state.json").write_text(json.dumps(
            {"global_step": step, "forward_passes": forward_passes, "epoch": position // n,
             "example_position": position % n, "world_size": world_size},
            indent=1,
        ))
        (tmp / RECIPE_NAME).write_text(recipe.to_yaml())


def _rotate_checkpoints(output_dir: Path, limit: int | None) -> None:
    if not limit:
        return
    found = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    for old in found[:-limit]:
        shutil.rmtree(old, ignore_errors=True)


def _resume_point(recipe: Recipe) -> Path | None:
    if recipe.resume_from_checkpoint is None:
        return None
    if recipe.resume_from_checkpoint == "auto":
        return latest_checkpoint(recipe.output_dir)
    return Path(recipe.resume_from_checkpoint)


def _check_resumable(recipe: Recipe, checkpoint: Path, world_size: int) -> None:
    from .recipe import load_recipe

    saved_world = json.loads((checkpoint / "trainer_state.json").read_text()).get("world_size", 1)
    if saved_world != world_size:
        raise RecipeError([
            f"resume_from_checkpoint: {checkpoint} was written by {saved_world} process(es), this run has "
            f"{world_size}; resume with torchrun --nproc_per_node {saved_world}"
        ])
    saved = load_recipe(checkpoint / RECIPE_NAME, check_files=False).essentials()
    changed = [k for k, v in recipe.essentials().items() if saved.get(k) != v]
    if changed:
        raise RecipeError([
            f"resume_from_checkpoint: {checkpoint} was trained with different {', '.join(changed)}; "
            "restore those keys or start a new output_dir"
        ])


def _load_checkpoint(checkpoint: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any) -> dict:
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    if isinstance(model, PeftModel):
        set_peft_model_state_dict(model, load_file(str(checkpoint / "adapter_model.safetensors")))
    else:
        state = {}
        for shard in sorted(checkpoint.glob("model*.safetensors")):
            state.update(load_file(str(shard)))
        model.load_state_dict(state, strict=False)
    opt.load_state_dict(load_state(checkpoint, "optimizer"))
    sched.load_state_dict(load_state(checkpoint, "scheduler"))
    torch.set_rng_state(load_state(checkpoint, "rng")["torch"])
    return json.loads((checkpoint / "trainer_state.json").read_text())


def _save_final(out: Path, model: torch.nn.Module, tokenizer: Any) -> None:
    """Write the trained adapter (PEFT layout) and tokenizer into ``out``, each file renamed into place."""
    with atomic_directory(out / ".final") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    for f in (out / ".final").iterdir():
        os.replace(f, out / f.name)
    (out / ".final").rmdir()


# ----- logging and plots ------------------------------------------------------------------------
class _JsonlLog:
    def __init__(self, path: Path, keep_until_step: int) -> None:
        self.path = path
        kept = []
        if keep_until_step and path.exists():  # drop what a killed run logged after its last checkpoint
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= keep_until_step]
        write_text_atomic(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _plot(output_dir: Path) -> Path | None:
    try:
        from .plot import plot_log
    except ImportError:  # matplotlib is an optional extra
        logger.info("matplotlib not installed: skipping the loss plot (pip install 'zopeft[plot]')")
        return None
    return plot_log(output_dir / LOG_NAME, output_dir / "training_curves.png")


# ----- the public entry points ------------------------------------------------------------------
def evaluate(
    recipe: Recipe, *, adapter: str | Path | None = None, split: str = "dev", model: Any = None, tokenizer: Any = None,
) -> dict[str, float]:
    """Evaluate on a split: the given model, the adapter in ``adapter``, or the recipe's untrained model."""
    if model is None:
        if adapter is not None:
            model, tokenizer = load_adapter_model(model_spec(recipe), adapter)
        else:
            torch.manual_seed(recipe.seed)
            model, tokenizer = load_model(model_spec(recipe), adapter_spec(recipe))
    model.eval()
    with torch.no_grad():
        return build_task_for(recipe).evaluate(
            model, tokenizer, load_split(recipe, split), batch_size=recipe.per_device_eval_batch_size
        )


def train(recipe: Recipe, *, echo: Callable[[str], None] = print, progress: bool | None = None) -> RunResult:
    """Train as the recipe says; write the adapter, logs, plot and checkpoints to ``output_dir``.

    Under torchrun every rank trains an identical replica (see :mod:`zopeft.distributed`);
    rank 0 alone evaluates, prints, and writes logs, checkpoints and the adapter.
    """
    with distributed_session() as (rank, world_size):
        return _train(recipe, rank, world_size, echo if rank == 0 else (lambda _: None), progress)


def _train(
    recipe: Recipe, rank: int, world_size: int, echo: Callable[[str], None], progress: bool | None
) -> RunResult:
    main = rank == 0
    out = Path(recipe.output_dir)
    checkpoint = _resume_point(recipe)
    if checkpoint is not None:
        _check_resumable(recipe, checkpoint, world_size)

    torch.manual_seed(recipe.seed)
    model, tokenizer = load_model(model_spec(recipe), adapter_spec(recipe))
    model.eval()
    echo(f"model: {recipe.model_name_or_path} | {recipe.finetuning_type} | {trainable_summary(model)}")
    task = build_task_for(recipe)
    train_records = load_split(recipe, "train")
    n = len(train_records)
    opt = _make_optimizer(recipe, model, world_size)
    comm = getattr(opt, "comm", None)
    shard, shards = comm.data_shard if comm is not None else (0, 1)
    if comm is not None:
        echo(f"torchrun: {world_size} ranks, {comm.mode} parallel; "
             f"{comm.payload_bytes(len(opt.evaluations()))} bytes of losses per rank per micro-batch")
    sched = get_scheduler(
        recipe.lr_scheduler_type, opt, num_warmup_steps=recipe.warmup_steps, num_training_steps=recipe.max_steps
    )
    start, forward_passes, eval_before = 0, 0, {}
    if checkpoint is not None:
        state = _load_checkpoint(checkpoint, model, opt, sched)
        start, forward_passes = state["global_step"], state["forward_passes"]
        echo(f"*** RESUMING from {checkpoint} at step {start} (forward passes so far: {forward_passes}) ***")
    elif recipe.resume_from_checkpoint == "auto":
        echo(f"resume_from_checkpoint: auto found no checkpoint in {out}; starting from step 0")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        log = _JsonlLog(out / LOG_NAME, start)
        write_text_atomic(out / RECIPE_NAME, recipe.to_yaml())

    def run_eval(step: int) -> dict[str, float]:
        """Rank 0 evaluates while the other ranks wait."""
        metrics: dict[str, float] = {}
        if main:
            metrics = evaluate(recipe, model=model, tokenizer=tokenizer)
            log.write({"step": step, "forward_passes": forward_passes, **{f"eval_{k}": v for k, v in metrics.items()}})
            echo(f"eval @ step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        barrier()
        return metrics

    if start == 0:
        eval_before = run_eval(0)
    show_bar = main and (sys.stderr.isatty() if progress is None else progress)
    bar = tqdm(total=recipe.max_steps, initial=start, disable=not show_bar, unit="step", dynamic_ncols=True)
    began = time.perf_counter()
    stats: dict[str, Any] = {}
    for step in range(start, recipe.max_steps):
        batches = [
            _to_device(task.collate([train_records[i] for i in batch_indices(recipe, step, j, n, shard, shards)],
                                    tokenizer), model)
            for j in range(recipe.gradient_accumulation_steps)
        ]
        lr = opt.param_groups[0]["lr"]
        stats = _train_step(opt, model, batches)
        forward_passes = stats.get("forward_passes", forward_passes + len(batches))
        sched.step()
        done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", fwd=forward_passes)
        if main and (done % recipe.logging_steps == 0 or done == recipe.max_steps):
            record = {"step": done, "forward_passes": forward_passes, "lr": lr,
                      **{k: v for k, v in stats.items() if k not in ("step", "lr", "forward_passes")}}
            log.write(record)
            if not show_bar:
                echo(f"step {done}/{recipe.max_steps} loss={stats['loss']:.4f} fwd={forward_passes} lr={lr:.3g}")
        if recipe.eval_steps and done % recipe.eval_steps == 0 and done != recipe.max_steps:
            run_eval(done)
        if main and recipe.save_steps and done % recipe.save_steps == 0:
            _save_checkpoint(out / f"checkpoint-{done}", recipe, model, opt, sched, done, forward_passes,
                             world_size, shards)
            _rotate_checkpoints(out, recipe.save_total_limit)
    bar.close()
    seconds = time.perf_counter() - began
    if isinstance(opt, ZOOptimizer):
        opt.check_replicas()
    eval_after = run_eval(recipe.max_steps)
    if main:
        _save_final(out, model, tokenizer)
        plot = _plot(out)
        echo(f"adapter: {out} | log: {out / LOG_NAME}" + (f" | plot: {plot}" if plot else ""))
    barrier()
    return RunResult(out, recipe.max_steps, forward_passes, seconds, eval_before, eval_after, checkpoint)
