"""TrainingArguments / LLaMA-Factory spellings in a recipe: what zopeft reads as its own keys, and what it
answers for the keys it does not take."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["DTYPE_FLAGS", "FOREIGN_KEYS", "read_spellings", "steps_or_fraction"]

# TrainingArguments / LLaMA-Factory keys that zopeft does not take, and what to write instead
FOREIGN_KEYS = {
    "max_grad_norm": "a ZO step has no gradient to clip; zo.guard rejects and rolls back divergent steps",
    "optim": "choose the optimizer with zo.optimizer (e.g. fzoo)",
    "gradient_checkpointing": "a ZO step keeps no activations for a backward pass: there is nothing to checkpoint",
    "stage": "zopeft trains the task the recipe names (task: classification, multiple_choice, sft, ...)",
    "do_train": "`zopeft train` trains and `zopeft eval` evaluates",
    "max_samples": "max_train_samples (and max_eval_samples) keep a fixed random subset of the records",
    "plot_loss": "train writes training_curves.png whenever matplotlib is installed (pip install 'zopeft[plot]')",
    "overwrite_cache": "zopeft tokenizes each batch as it trains: there is no tokenized cache",
    "preprocessing_num_workers": "zopeft tokenizes each batch as it trains: there is no preprocessing step",
}
DTYPE_FLAGS = {"bf16": "bfloat16", "fp16": "float16"}  # TrainingArguments' switches, read as compute_dtype


def steps_or_fraction(value: Any, key: str) -> int | float:
    """A count of steps, or a fraction below 1 (as a float), of a number or its text (PyYAML reads 5e-2 as text)."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not 0 <= number < math.inf or \
            (number >= 1 and not float(number).is_integer()):
        raise ValueError(f"{key}: a count of steps, or a fraction of max_steps below 1, got {value!r}")
    return float(number) if 0 < number < 1 else int(number)


def read_spellings(data: dict[str, Any]) -> dict[str, Any]:
    """``warmup_ratio`` as a fractional ``warmup_steps``; ``bf16`` / ``fp16`` as ``compute_dtype``; ``eval_strategy``
    as ``eval_steps``."""
    if not {"warmup_ratio", "eval_strategy", *DTYPE_FLAGS} & data.keys():
        return data
    data = dict(data)
    if "eval_strategy" in data:
        _read_eval_strategy(data)
    if "warmup_ratio" in data:
        ratio = data.pop("warmup_ratio")
        if data.get("warmup_steps"):
            raise ValueError("warmup_ratio: give warmup_steps or warmup_ratio, not both (a warmup_steps below 1 "
                             "is a fraction of max_steps, as in transformers 5)")
        try:
            fraction = steps_or_fraction(ratio, "warmup_ratio")
        except ValueError:
            fraction = None
        if fraction is None or fraction >= 1:
            raise ValueError(f"warmup_ratio: a fraction of max_steps in [0, 1), got {ratio!r}")
        data["warmup_steps"] = fraction
    for flag in DTYPE_FLAGS:
        if not isinstance(data.get(flag, False), bool):
            raise ValueError(f"{flag}: true or false, got {data[flag]!r}")
    chosen = [flag for flag in DTYPE_FLAGS if data.pop(flag, False)]
    if len(chosen) > 1:
        raise ValueError("fp16: true, and bf16: true too; choose one (or set compute_dtype: bfloat16 or float16)")
    if chosen:
        dtype = DTYPE_FLAGS[chosen[0]]
        if data.get("compute_dtype", dtype) != dtype:
            raise ValueError(f"{chosen[0]}: true means compute_dtype: {dtype}, but compute_dtype is "
                             f"{data['compute_dtype']}; drop one of them")
        data["compute_dtype"] = dtype
    return data


def _read_eval_strategy(data: dict[str, Any]) -> None:
    """``eval_strategy: no`` is ``eval_steps: null`` (YAML reads a bare no as false); ``steps`` keeps eval_steps."""
    strategy = data.pop("eval_strategy")
    strategy = "no" if strategy is False else strategy
    if strategy == "no":
        if data.get("eval_steps") not in (None, "auto"):
            raise ValueError(f"eval_strategy: no, and eval_steps is {data['eval_steps']!r}; drop one of them")
        data["eval_steps"] = None
    elif strategy != "steps":
        raise ValueError(f"eval_strategy: steps or no, got {strategy!r}; zopeft evaluates every eval_steps steps "
                         "(epoch: set eval_steps to the training records / the examples a step, which zopeft validate prints)")
