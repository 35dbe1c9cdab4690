"""Merge a trained adapter into its base model and export it (``zopeft merge``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .models import load_tokenizer, merge_and_export
from .recipe import RecipeError, load_recipe
from .runner import RECIPE_NAME, build_task_for, load_split, model_spec

__all__ = ["DTYPES", "merge_adapter"]

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "bfloat16": "bfloat16", "float16": "float16",
          "float32": "float32"}


def merge_adapter(
    adapter_dir: str | Path, out_dir: str | Path, *, dtype: str = "bf16", max_shard_size: str = "5GB",
    recipe_path: str | Path | None = None, verify_examples: int = 4,
) -> dict[str, Any]:
    """Merge the adapter in ``adapter_dir`` into its unquantized base and write ``out_dir``.

    The base and task come from the recipe saved beside the adapter (or ``recipe_path``);
    the export is verified on a batch of the recipe's eval data.  Returns the export report
    (``max_abs_logit_diff``, ``out_dir``, ``files``).
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of bf16, fp16, fp32")
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise FileNotFoundError(f"--adapter {adapter_dir}: no adapter_config.json there (pass a training output_dir or checkpoint-N)")
    recipe_file = Path(recipe_path) if recipe_path else adapter_dir / RECIPE_NAME
    if not recipe_file.exists():
        raise RecipeError([f"--recipe: no {RECIPE_NAME} beside the adapter; pass the training recipe with --recipe"])
    recipe = load_recipe(recipe_file, check_files=False)
    spec = model_spec(recipe)
    records = load_split(recipe, "dev")[:verify_examples]
    batch = build_task_for(recipe).collate(records, load_tokenizer(spec))
    batch.pop("labels", None)
    return merge_and_export(spec, adapter_dir, out_dir, dtype=DTYPES[dtype], max_shard_size=max_shard_size, verify_batch=batch)
