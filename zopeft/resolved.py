"""What a recipe resolves to, without torch: the task settings and the derived values ``zopeft validate`` shows.

:func:`task_settings` fills a bundled dataset's defaults (task kind, template, label words,
text fields) into the recipe's data keys: :func:`zopeft.components.build_task_for` builds the
task from it.  :func:`resolve_run` makes explicit what a recipe leaves to its data (max_steps from
num_train_epochs, what the guard watches, how the best model is picked): a run saves that recipe.
:func:`effective_lines` describes what a run will use: the task, the template as it fills the
first record, each label word's tokens, the number of classes, the train and eval records, the
run's length, learning rate, guard and best model, and the threads.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

from .costs import EVAL_SHARE, EVALUATIONS, GENERATION_FORWARD_EQUIVALENTS, step_points
from .data import BUILTIN_DATASETS
from .metrics import TASK_METRICS, greater_is_better
from .model_files import local_tokenizer_file
from .recipe import Recipe, RecipeError
from .records import (
    answer_texts, canon_label, choice_prompt, choice_texts, continuation, label_index, label_keys, prompt_text,
)
from .splits import DataSplits, Split

__all__ = [
    "LR_FIND_BUDGET", "auto_eval_steps", "effective_lines", "eval_forwards_per_record", "label_word_tokens",
    "resolve_run", "run_lines", "task_settings",
]

LR_FIND_BUDGET = 0.25  # learning_rate: auto: lr-find's share of the run's forward passes
CANDIDATE_TASKS = ("classification", "multiple_choice")  # zo.objective: auto trains them on candidate_ce
OBJECTIVE_WORDS = {"loss": "the language-model loss of the gold continuation",
                   "candidate_ce": "the cross-entropy over the candidates, as the seed papers train classification"}


def task_settings(recipe: Recipe) -> dict[str, Any]:
    """``build_task``'s arguments: the bundled dataset's defaults, overridden by the recipe's keys."""
    settings = dict(BUILTIN_DATASETS.get(recipe.dataset, {}).get("task", {}))
    kind = recipe.task or settings.get("kind")
    if kind is None:
        raise RecipeError([f"task: required for dataset {recipe.dataset!r} (classification, multiple_choice, sft, "
                           "sequence_classification or generation)"])
    for key in ("template", "label_words", "text_fields"):
        if getattr(recipe, key) is not None:
            settings[key] = getattr(recipe, key)
    settings.update(kind=kind, label_field=recipe.label_field, cutoff_len=recipe.cutoff_len)
    if kind == "classification":
        settings["label_word_scoring"] = recipe.label_word_scoring
    elif kind == "multiple_choice":
        settings["choices_field"] = recipe.choices_field
    elif kind == "sequence_classification":
        settings["num_labels"] = recipe.num_labels
    elif kind == "generation":
        settings.update(answer_field=recipe.answer_field, max_new_tokens=recipe.max_new_tokens,
                        stop_strings=recipe.stop_strings)
    return settings


def resolve_run(recipe: Recipe, data: DataSplits, shards: int = 1, resumed: Recipe | None = None) -> Recipe:
    """The recipe with what it leaves to its data made explicit (the recipe a run saves and resumes by).

    * ``max_steps`` from ``num_train_epochs``: ceil(epochs x training records / examples a step), where a step
      reads ``per_device_train_batch_size x gradient_accumulation_steps x shards`` examples (``shards``: the
      data-parallel ranks);
    * ``eval_steps: auto``: a count of steps, or None (:func:`auto_eval_steps`);
    * ``zo.objective: auto``: the objective of the checkpoint it resumes (``resumed``: that checkpoint's recipe),
      else ``candidate_ce`` for a task that scores candidates (classification, multiple_choice: the seed papers'
      ``train_as_classification``), else ``loss``;
    * ``zo.guard.watch: auto`` of a guarded ZO run, with that watch's defaults: the watch of the checkpoint it
      resumes, else ``eval`` when the run evaluates every ``eval_steps``, else ``loss``;
    * ``load_best_model_at_end``: true when the run has evaluation records; ``metric_for_best_model``: the
      task's first metric (:data:`~zopeft.metrics.TASK_METRICS`); ``greater_is_better``: from the metric.

    Raises :class:`RecipeError` for ``load_best_model_at_end: true`` without evaluation records, and for a watch on
    the evaluations (resumed, or set with ``eval_steps: auto``) of a run that makes none before its end.
    """
    judged = data.select or data.eval
    updates: dict[str, Any] = {}
    if recipe.num_train_epochs is not None:
        per_step = recipe.per_device_train_batch_size * recipe.gradient_accumulation_steps * shards
        updates["max_steps"] = max(1, math.ceil(recipe.num_train_epochs * len(data.train.records) / per_step))
        updates["num_train_epochs"] = None
    if recipe.load_best_model_at_end and judged is None:
        raise RecipeError(["load_best_model_at_end: true, but the run has no evaluation records to pick the best model "
                           "by (val_size: 0 and no eval_dataset); set val_size or eval_dataset, or drop it"])
    kind = task_settings(recipe)["kind"]
    if recipe.eval_steps == "auto":
        updates["eval_steps"] = _eval_steps(recipe.model_copy(update=updates), data, kind, resumed)
        recipe = recipe.model_copy(update=updates)
    metric = recipe.metric_for_best_model or TASK_METRICS.get(kind, ("loss",))[0]
    updates.update(
        load_best_model_at_end=judged is not None if recipe.load_best_model_at_end is None else recipe.load_best_model_at_end,
        metric_for_best_model=metric,
        greater_is_better=greater_is_better(metric) if recipe.greater_is_better is None else recipe.greater_is_better,
    )
    zo: dict[str, Any] = {}
    if recipe.zo.objective == "auto":
        zo["objective"] = _objective(kind, resumed)
    guard = recipe.zo.guard
    if guard.watch == "auto" and recipe.is_zeroth_order and guard.enabled:
        zo["guard"] = guard.settled(_watch(recipe, judged, resumed))
    if zo:
        updates["zo"] = recipe.zo.model_copy(update=zo)
    return recipe.model_copy(update=updates)


def auto_eval_steps(recipe: Recipe, data: DataSplits, kind: str) -> int | None:
    """``eval_steps: auto``: every ceil(max_steps / n) steps for the largest n <= :data:`~zopeft.costs.EVALUATIONS`
    whose evaluations between the start and the end cost at most :data:`~zopeft.costs.EVAL_SHARE` of the training's
    forward passes; None (the start and end only) without evaluation records, or where not one fits.

    Costs are the benchmarks' estimates (:mod:`zopeft.costs`): a step, its optimizer's loss evaluations over its
    examples; an evaluation, :func:`eval_forwards_per_record` over the eval records and the guard's.
    """
    judged = [record for split in (data.eval, data.select) if split is not None for record in split.records]
    if not judged:
        return None
    records, per_record = len(judged), eval_forwards_per_record(recipe, kind, judged)
    per_step = recipe.per_device_train_batch_size * recipe.gradient_accumulation_steps * step_points(
        recipe.zo.optimizer, recipe.zo.optimizer_kwargs(), recipe.is_zeroth_order)
    affordable = int(EVAL_SHARE * recipe.max_steps * per_step // (records * per_record))  # between start and end
    steps = math.ceil(recipe.max_steps / min(EVALUATIONS, affordable + 1))
    return steps if steps < recipe.max_steps else None


def eval_forwards_per_record(recipe: Recipe, kind: str, records: list[dict]) -> float:
    """The forward passes an evaluated record costs, as :mod:`zopeft.tasks` runs them: a generated answer
    :data:`~zopeft.costs.GENERATION_FORWARD_EQUIVALENTS`; a record of a candidate task one (its context, read at its
    last position) where every candidate is one token, else one a candidate (each scored as its own sequence:
    multi-token label words, or a multiple_choice record's choices, counted per record); else one.

    Without the model's ``tokenizer.json`` on this machine a label word counts as one token and a choice as more.
    """
    if kind == "generation":
        return GENERATION_FORWARD_EQUIVALENTS
    if kind == "classification":
        words = task_settings(recipe)["label_words"]
        words = list(words.values() if isinstance(words, dict) else words)
        counts = [1] * len(words) if recipe.label_word_scoring == "first" else _token_counts(recipe, words)
        return 1 if counts is None or max(counts) == 1 else len(words)
    if kind == "multiple_choice":
        settings = task_settings(recipe)
        prompts = [choice_prompt(record, settings.get("template"), settings.get("text_fields")) for record in records]
        choices = [choice_texts(record, recipe.choices_field) for record in records]
        counts = _token_counts(recipe, [continuation(p, c) for p, cs in zip(prompts, choices) for c in cs])
        return 1 if counts is not None and max(counts) == 1 else sum(map(len, choices)) / len(choices)
    return 1


def _token_counts(recipe: Recipe, texts: list[str]) -> list[int] | None:
    """Each text's token count by the model's local ``tokenizer.json`` (None where it has none here)."""
    tokenizer = _tokenizer(recipe.model_name_or_path)
    return None if tokenizer is None else [len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


def _tokenizer(model_name_or_path: str) -> Any:
    """The model's ``tokenizer.json`` as a ``tokenizers.Tokenizer`` (the Rust tokenizer of transformers' fast
    tokenizers, without importing torch or transformers), or None where it is not on this machine."""
    path = local_tokenizer_file(model_name_or_path)
    if path is None:
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def _eval_steps(recipe: Recipe, data: DataSplits, kind: str, resumed: Recipe | None) -> int | None:
    """``eval_steps: auto`` settled: the resumed checkpoint's, else :func:`auto_eval_steps`; a guard that judges the
    evaluations in a run that makes none before its end is refused with the reason and the fix."""
    if resumed is not None and resumed.eval_steps != "auto":
        return resumed.eval_steps
    steps = auto_eval_steps(recipe, data, kind)
    if steps is None and recipe.guard_judges_evaluations:
        if data.eval is None and data.select is None:
            why, fix = "it has no evaluation records", "set val_size or eval_dataset, or zo.guard.watch: loss"
        elif recipe.max_steps == 1:
            why, fix = "one step has no step before its end", "raise max_steps"
        else:
            why, fix = (f"one evaluation would cost over {EVAL_SHARE:.0%} of the training's forward passes",
                        "set eval_steps")
        raise RecipeError([f"eval_steps: auto makes no evaluation before the end of this run ({why}), and zo.guard "
                           f"judges the evaluations (watch: eval or select_size); {fix}"])
    return steps


def _objective(kind: str, resumed: Recipe | None) -> str:
    """What ``zo.objective: auto`` trains on: the resumed checkpoint's objective (a 0.2 run's is the loss), else
    the candidates' cross-entropy for a task with candidates, else the loss."""
    if resumed is not None and resumed.zo.objective != "auto":
        return resumed.zo.objective
    return "candidate_ce" if kind in CANDIDATE_TASKS else "loss"


def _watch(recipe: Recipe, judged: Split | None, resumed: Recipe | None) -> str:
    """What ``zo.guard.watch: auto`` watches: the resumed checkpoint's watch, else the evaluations when the run
    makes them every eval_steps, else the loss."""
    watch = resumed.zo.guard.watch if resumed is not None else "auto"
    if watch == "eval" and not recipe.eval_steps:
        raise RecipeError(["eval_steps: the checkpoint resumed has its guard watch the evaluations every eval_steps "
                           "(zo.guard.watch: eval), and this run makes none before its end (eval_steps null, or auto "
                           "finding none affordable); set eval_steps, or start a new output_dir"])
    if watch != "auto":
        return watch
    return "eval" if recipe.eval_steps and judged is not None else "loss"


def run_lines(recipe: Recipe, data: DataSplits) -> list[str]:
    """What a run of ``recipe`` (resolved by :func:`resolve_run`) does beyond its records: how it picks its learning
    rate, what it trains on, what its guard watches, which adapter it leaves."""
    metric = f"{recipe.metric_for_best_model} ({'higher' if recipe.greater_is_better else 'lower'} is better)"
    judged = f"{metric} on the guard's records" if data.select else f"eval {metric}"
    objective = recipe.zo.objective
    lines = [f"objective: {objective}" + (f" ({OBJECTIVE_WORDS[objective]})" if objective in OBJECTIVE_WORDS else "")]
    if recipe.learning_rate == "auto":
        on = (f"eval {metric} on {len(data.tune.records)} evaluation records that are not reported" if data.tune
              else "the loss on training records its short runs do not train on")
        picks = (f"{recipe.lr_find_pick:g}, picked by lr-find before (lr_find_pick)" if recipe.lr_find_pick is not None
                 else f"lr-find picks it before the first step with at most {LR_FIND_BUDGET:.0%} of the run's forward "
                      "passes")
        lines.append(f"learning rate: auto: {picks}, ranking by {on}")
    if data.eval is not None or data.select is not None:
        lines.append(f"evaluations: at the start, every {recipe.eval_steps} steps ({(recipe.max_steps - 1) // recipe.eval_steps}"
                     " before the end) and at the end" if recipe.eval_steps else "evaluations: at the start and end only")
    guard = recipe.zo.guard
    if not recipe.is_zeroth_order or not guard.enabled:
        lines.append("guard: off")
    elif guard.watch == "eval":
        lines.append(f"guard: watches the {judged} every {recipe.eval_steps} steps")
        count = 1 + (recipe.max_steps - 1) // recipe.eval_steps  # the start and every eval_steps before the end
        if count <= guard.patience:
            lines.append(f"note: zo.guard: watching the evaluations, it rolls back after {guard.patience} in a row "
                         f"above its best, and this run makes {count} before its end (eval_steps {recipe.eval_steps}, "
                         f"max_steps {recipe.max_steps}): it can act only on a non-finite step; lower "
                         "zo.guard.patience or eval_steps")
    else:
        unwatched = data.eval is not None and not recipe.eval_steps
        lines.append("guard: watches the training loss" + (" (no evaluations before the end to watch)" if unwatched
                                                            else ""))
    if recipe.load_best_model_at_end:
        lines.append(f"best model: checkpoint-best/ keeps the adapter of the best {judged}; output_dir gets it at "
                     "the end")
    else:
        lines.append("best model: not kept (load_best_model_at_end: false): output_dir gets the last step's adapter")
    if not recipe.eval_on_start:
        lines.append("eval on start: off (eval_on_start: false)")
    return lines


class _FirstRecordFields:
    """The fields a task reads from a record, checked without a tokenizer (``validate`` reads the first record)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings, self.kind = settings, settings["kind"]

    def check(self, record: dict) -> None:
        s = self.settings
        if self.kind == "multiple_choice":
            choice_texts(record, s["choices_field"])
            label_index(record, s["label_field"], None)
        elif self.kind == "generation":
            _prompt(record, s)
            answer_texts(record, s["answer_field"])
        elif self.kind != "sft":
            _prompt(record, s)
            label_index(record, s["label_field"], label_keys(s.get("label_words")))


def _prompt(record: dict, settings: dict[str, Any]) -> str | None:
    """The prompt of a classification record, or a record's named text fields; None where the task builds it otherwise."""
    kind, fields = settings["kind"], settings.get("text_fields")
    if kind in ("classification", "generation"):
        return prompt_text(record, settings.get("template"), fields, kind)
    if kind == "sequence_classification" and fields:
        return prompt_text(record, None, fields, kind)
    return None


def _label_counts(records: list[dict], settings: dict[str, Any]) -> str | None:
    """``0: 34, 1: 30``: how many records carry each label (label-word order first; 0 for an absent one)."""
    if settings["kind"] in ("sft", "generation"):
        return None
    counts = Counter(canon_label(r.get(settings["label_field"])) for r in records)
    order = label_keys(settings.get("label_words")) or []
    order += sorted((k for k in counts if k not in order), key=str)
    return ", ".join(f"{k}: {counts.get(k, 0)}" for k in order)


def label_word_tokens(model_name_or_path: str, words: list[str]) -> list[list[str]] | None:
    """Each word's tokens as text, encoded without special tokens by the model's ``tokenizer.json`` (None if not
    local)."""
    tokenizer = _tokenizer(model_name_or_path)
    if tokenizer is None:
        return None
    return [[tokenizer.decode([i]) for i in tokenizer.encode(w, add_special_tokens=False).ids] for w in words]


def _label_word_lines(recipe: Recipe, settings: dict[str, Any]) -> list[str]:
    words = settings["label_words"]
    keys, texts = label_keys(words), list(words.values() if isinstance(words, dict) else words)
    lines = [f"label words: {len(texts)} classes, label_word_scoring: {recipe.label_word_scoring}"]
    tokens = label_word_tokens(recipe.model_name_or_path, texts)
    if tokens is None:
        lines += [f"  {k} -> {w!r}" for k, w in zip(keys, texts)]
        lines.append(f"  (tokens not shown: no tokenizer.json of {recipe.model_name_or_path} on this machine yet: a hub "
                     "model has one once downloaded, a GGUF file once a first train or eval converted it)")
        return lines
    first = recipe.label_word_scoring == "first"
    for key, word, pieces in zip(keys, texts, tokens):
        scored = f", scored on the first: {pieces[0]!r}" if first and len(pieces) > 1 else ""
        lines.append(f"  {key} -> {word!r}: {len(pieces)} token{'s' * (len(pieces) != 1)} "
                     f"{' '.join(map(repr, pieces))}{scored}")
    firsts = [p[0] for p in tokens if p]
    if first and len(set(firsts)) < len(firsts):
        lines.append("  note: two label words share their first token: train and eval refuse label_word_scoring: first")
    return lines


def _generation_lines(recipe: Recipe, record: dict) -> list[str]:
    """The first record's gold answers and how an answer is generated and scored."""
    answers = answer_texts(record, recipe.answer_field)
    stops = ", ".join(json.dumps(s, ensure_ascii=False) for s in recipe.stop_strings) or "none"
    return [f"answers of the first training record ({recipe.answer_field}): {json.dumps(answers, ensure_ascii=False)}"
            " (the first is trained on; the best scores)",
            f"generation: greedy, at most {recipe.max_new_tokens} new tokens, ends at EOS or at a stop string after its "
            f"leading white space: {stops}; scored by SQuAD F1 / exact match (0-1)",
            f"prompt room: {recipe.cutoff_len - recipe.max_new_tokens} tokens (cutoff_len - max_new_tokens); a longer "
            "prompt loses the beginning of its longest field"]


def effective_lines(recipe: Recipe) -> list[str]:
    """What a run of the recipe will use, in words: task, template and the first prompt, label words and their
    tokens, classes, train and eval records (with their labels), threads, and notes.

    Reads the data (checking the fields of each file's first record: :class:`RecipeError`) and,
    when it is on this machine, the model's ``tokenizer.json``; imports no torch.
    """
    settings = task_settings(recipe)
    kind = settings["kind"]
    data = DataSplits(recipe, _FirstRecordFields(settings), checked=1)
    bundled = f" (from dataset {recipe.dataset})" if recipe.dataset in BUILTIN_DATASETS else ""
    lines = [f"task: {kind}" + (bundled if recipe.task is None else "")]
    if settings.get("template") is not None and kind != "sequence_classification":
        lines.append(f"template: {json.dumps(settings['template'], ensure_ascii=False)}"
                     + (bundled if recipe.template is None else ""))
    prompt = _prompt(data.train.records[0], settings)
    if prompt is not None:
        lines.append(f"{'text' if kind == 'sequence_classification' else 'prompt'} of the first training record:")
        lines += [f"  | {line}" for line in prompt.split("\n")]
    if kind == "generation":
        lines += _generation_lines(recipe, data.train.records[0])
    if kind == "classification":
        lines += _label_word_lines(recipe, settings)
    elif kind == "sequence_classification":
        origin = "from label_words" if settings.get("label_words") else "labels are 0 .. num_labels - 1"
        lines.append(f"num_labels: {recipe.num_labels} ({origin})")
    splits = [("train", data.train), ("eval", data.eval)]
    splits += [("guard judges", data.select)] if data.select else []
    for name, split in splits:
        lines.append(f"{name}: {split.description}" if split else f"{name}: none")
        counts = _label_counts(split.records, settings) if split else None
        if counts:
            lines.append(f"  labels: {counts}")
    run = resolve_run(recipe, data)
    if recipe.num_train_epochs is not None:
        per_step = recipe.per_device_train_batch_size * recipe.gradient_accumulation_steps
        lines.append(f"max_steps: {run.max_steps} (num_train_epochs {recipe.num_train_epochs:g} x "
                     f"{len(data.train.records)} training records / {per_step} examples a step, rounded up; a ZO "
                     "data-parallel torchrun job of K ranks reads K times the examples a step, so fewer steps)")
    if isinstance(recipe.warmup_steps, float):
        lines.append(f"warmup: {run.num_warmup_steps} steps ({recipe.warmup_steps} of max_steps {run.max_steps})")
    lines += run_lines(run, data)
    lines.append(f"threads: {recipe.threads}" if recipe.threads else "threads: torch's default (one per core)")
    return lines + [f"note: {note}" for note in data.notes()]
