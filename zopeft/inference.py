"""What a model generates (``zopeft generate``): a recipe's base model, a training run's adapter, or a merged model.

The source is told by what it is:

* a recipe file (``.yaml``): its base model, untrained (the zero-shot model);
* a directory with ``adapter_config.json`` (a training ``output_dir`` or ``checkpoint-N``): the
  adapter on the base of the ``recipe.yaml`` beside it (or of ``recipe``);
* a directory with ``config.json`` (written by ``zopeft merge``): the merged model; ``recipe``
  (optional) gives the template and the generation settings.

Prompts are used as given; records are formatted with the recipe's template and, where they hold
its ``answer_field``, scored (SQuAD F1 / exact match).  Generation is greedy and stops as the
recipe's generation keys say (``max_new_tokens``, EOS, ``stop_strings``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .components import model_spec, torch_threads
from .generation import DEFAULT_STOP_STRINGS, check_max_new_tokens, greedy_generate
from .models import ModelSpec, load_adapter_model, load_base_model, load_tokenizer
from .recipe import Recipe, RecipeError, load_recipe
from .records import answer_list, fill
from .resolved import task_settings
from .rundir import RECIPE_NAME
from .squad_metrics import squad_scores
from .tasks import generation_batch

__all__ = ["generate"]

SOURCE_KINDS = "a recipe (.yaml), a training output_dir or checkpoint-N, or a merged model directory"


def _recipe_of(source: Path, recipe: str | Path | None) -> Recipe | None:
    """The recipe that describes ``source``: itself, ``recipe``, the one beside an adapter, or none (a merged model)."""
    if not source.exists():
        raise FileNotFoundError(f"SOURCE: {str(source)!r} does not exist; give {SOURCE_KINDS}")
    if recipe is not None:
        return load_recipe(recipe, check_files=False)
    if source.is_file():
        if source.suffix not in (".yaml", ".yml"):
            raise ValueError(f"SOURCE: {source} is a file but not a recipe (.yaml); give {SOURCE_KINDS}")
        return load_recipe(source)
    if (source / "adapter_config.json").is_file():
        if not (source / RECIPE_NAME).is_file():
            raise RecipeError([f"--recipe: no {RECIPE_NAME} beside the adapter in {source}; pass the training recipe "
                               "with --recipe"])
        return load_recipe(source / RECIPE_NAME, check_files=False)
    if not (source / "config.json").is_file():
        raise ValueError(f"SOURCE: {source} holds neither adapter_config.json nor config.json; give {SOURCE_KINDS}")
    return None


def _load(source: Path, recipe: Recipe | None) -> tuple[torch.nn.Module, Any]:
    adapter = source.is_dir() and (source / "adapter_config.json").is_file()
    spec = model_spec(recipe) if adapter or source.is_file() else ModelSpec(str(source))  # a merged model: itself
    if spec.task_type != "causal_lm":
        raise ValueError(f"SOURCE: {source} is a {spec.task_type} model; zopeft generate needs a causal LM")
    return load_adapter_model(spec, source) if adapter else (load_base_model(spec), load_tokenizer(spec))


def generate(
    source: str | Path, *, prompts: list[str] | None = None, records: list[dict] | None = None,
    recipe: str | Path | None = None, max_new_tokens: int | None = None, threads: int | None = None,
) -> list[dict[str, Any]]:
    """Greedy generations of ``source``'s model for ``prompts`` (as given) or ``records`` (formatted with the
    recipe's template): per input its ``prompt`` (as the model saw it) and ``generation``, and for a record
    that holds the recipe's ``answer_field`` its ``answers``, ``f1`` and ``exact_match``.

    ``recipe`` replaces the recipe of a run directory, and gives a merged model its template and generation
    settings; ``max_new_tokens`` replaces the recipe's.
    """
    if (prompts is None) == (records is None) or not (prompts or records):
        raise ValueError("give prompts (--prompt) or records (--file), one of them")
    source = Path(source)
    described = _recipe_of(source, recipe)
    settings = task_settings(described) if described else {}
    new_tokens = check_max_new_tokens(max_new_tokens if max_new_tokens is not None else
                                      described.max_new_tokens if described else 16)
    golds: list[list[str] | None] = [None] * len(prompts or [])
    if records is not None:
        if settings.get("template") is None:
            raise RecipeError([f"--file: records are formatted with the recipe's template, and {source} has none; "
                               "give a recipe with a template (--recipe for a merged model)"])
        field = described.answer_field
        prompts = [fill(settings["template"], r) for r in records]
        golds = [answer_list(r[field], f"record {i}: answer field {field!r}") if field in r else None
                 for i, r in enumerate(records)]
    stops = described.stop_strings if described else DEFAULT_STOP_STRINGS
    rows: list[dict[str, Any]] = []
    with torch_threads(threads if threads is not None else described):
        model, tokenizer = _load(source, described)
        model.eval()
        device = next(model.parameters()).device
        cutoff = described.cutoff_len if described else int(getattr(model.config, "max_position_embeddings", 2048))
        size = described.per_device_eval_batch_size if described else 16
        for start in range(0, len(prompts), size):
            batch = generation_batch(tokenizer, prompts[start : start + size], max_new_tokens=new_tokens,
                                     stop_strings=stops, cutoff_len=cutoff)
            generated = batch.texts(greedy_generate(model, batch.to(device)))
            rows += [{"prompt": p, "generation": g} for p, g in zip(batch.prompts, generated)]
    for row, answers in zip(rows, golds):
        if answers is not None:
            scores = squad_scores([row["generation"]], [answers])["per_record"][0]
            row.update(answers=answers, **scores)
    return rows
