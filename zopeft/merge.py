"""Merge a trained adapter into its base model and export it (``zopeft merge``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .checkpoint import check_safetensors
from .components import build_task_for, model_spec
from .models import load_tokenizer, merge_and_export
from .recipe import RecipeError, load_recipe
from .rundir import RECIPE_NAME, check_output_target
from .splits import DataSplits

__all__ = ["DTYPES", "describe_checks", "merge_adapter"]

WRITTEN_BY = "zopeft merge"
MIN_SHARD_BYTES = 10**6
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "bfloat16": "bfloat16", "float16": "float16",
          "float32": "float32"}


def merge_adapter(
    adapter_dir: str | Path, out_dir: str | Path, *, dtype: str = "bf16", max_shard_size: str = "5GB",
    recipe_path: str | Path | None = None, overwrite: bool = False, verify_examples: int = 4,
) -> dict[str, Any]:
    """Merge the adapter in ``adapter_dir`` into its unquantized base and write ``out_dir``.

    The base and task come from the recipe saved beside the adapter (or ``recipe_path``);
    the export is verified on a batch of the recipe's eval data (see
    :func:`zopeft.models.merge_and_export` for the report).  ``out_dir`` must be new or empty, or
    (with ``overwrite``) a previous merge output: nothing else is ever replaced.
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    _check_shard_size(max_shard_size)
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise FileNotFoundError(f"--adapter {adapter_dir}: no adapter_config.json there (pass a training output_dir or checkpoint-N)")
    problem = check_safetensors(adapter_dir / "adapter_model.safetensors")
    if problem:
        raise ValueError(f"--adapter: {problem}; pass a complete adapter (e.g. an earlier checkpoint-N)")
    recipe_file = Path(recipe_path) if recipe_path else adapter_dir / RECIPE_NAME
    if recipe_path and not recipe_file.exists():
        raise RecipeError([f"--recipe: {recipe_file} does not exist; pass the recipe the adapter was trained with"])
    if not recipe_file.exists():
        raise RecipeError([f"--recipe: no {RECIPE_NAME} beside the adapter; pass the training recipe with --recipe"])
    recipe = load_recipe(recipe_file, check_files=False)
    check_output_target(out_dir, overwrite=overwrite, written_by=WRITTEN_BY, keep=[adapter_dir])
    spec = model_spec(recipe)
    task = build_task_for(recipe)
    data = DataSplits(recipe, task)
    records = (data.eval or data.train).records  # no evaluation records (val_size: 0): the training records
    batch = task.collate(records[:verify_examples], load_tokenizer(spec))
    batch.pop("labels", None)
    report = merge_and_export(spec, adapter_dir, out_dir, dtype=DTYPES[dtype], max_shard_size=max_shard_size,
                              verify_batch=batch, written_by=WRITTEN_BY)
    return {**report, "quantization_bit": recipe.quantization_bit}


def _check_shard_size(size: str) -> None:
    """Refuse a ``--max-shard-size`` that transformers cannot read, or one that would split a model into
    thousands of files, before the merge (not after it)."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        value = convert_file_size_to_int(size)
    except ValueError:
        value = None
    if value is None or value < MIN_SHARD_BYTES:
        raise ValueError(f"--max-shard-size {size!r}: give a size of at least 1MB with its unit, e.g. 5GB or 500MB")


def describe_checks(report: dict[str, Any]) -> list[str]:
    """The verification in :func:`merge_adapter`'s report, one line per comparison, with what it means."""
    def line(check: dict[str, float], against: str, meaning: str) -> str:
        return (f"  vs {against}: max |logit diff| {check['max_abs_logit_diff']:.3g} (largest |logit| "
                f"{check['max_abs_logit']:.3g}), top-token agreement {100 * check['top1_agreement']:.1f}% -- {meaning}")

    dtype = report["dtype"]
    rounding = ("float32 rounding of the merge itself" if dtype == "float32"
                else f"rounding of the merged weights to {dtype} (an fp32 export leaves ~1e-5)")
    lines = [f"check on {report['positions']} token positions of the eval data, merged model as written:",
             line(report["export"], "the adapter on the unquantized base", rounding)]
    if report["quantized"] is not None:
        lines.append(line(report["quantized"], f"the adapter on the {report['quantization_bit']}-bit base it was trained on",
                          "adds the quantization gap: the merged model holds the unquantized base weights"))
    return lines
