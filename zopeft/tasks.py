"""Task formats: turn records into model batches (whose ``model(**batch).loss`` is the training loss) and evaluate.

Kinds (see :func:`build_task`):

* ``classification`` -- a prompt and label words scored by a causal LM (MeZO-style);
* ``multiple_choice`` -- a prompt and per-record candidate continuations (COPA-style);
* ``sft`` -- prompt/completion or alpaca records, loss on the completion only;
* ``sequence_classification`` -- an encoder with a classification head;
* ``generation`` -- a prompt and gold answers: trained on the first answer's loss, evaluated by
  greedy generation (SQuAD exact match and F1).

Causal-LM batches are right-padded (pad token, else eos) with an ``attention_mask``; ``labels``
are -100 except on the tokens the loss is taken on.  Prompts are truncated on the left, so that
prompt + continuation fits in ``cutoff_len`` tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from .generation import (
    DEFAULT_STOP_STRINGS, GenerationBatch, check_max_new_tokens, greedy_generate, left_padded,
)
from .hints import did_you_mean
from .metrics import class_metrics
from .objectives import CandidateBatch
from .records import (
    answer_list, answer_texts, choice_prompt, choice_texts, continuation, fill, label_index, label_keys, prompt_text,
    require_text_fields, template_fields, text_of,
)
from .squad_metrics import squad_scores

__all__ = [
    "ALPACA_TEMPLATE", "LABEL_WORD_SCORINGS", "TASK_KINDS", "GenerationTask", "Task", "build_task", "candidate_batch",
    "generation_batch",
]

IGNORE = -100
ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
_ALPACA_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
# text fields tried in order when a sequence_classification task names none
_DEFAULT_TEXT_FIELDS = (
    ("sentence1", "sentence2"), ("question", "passage"), ("premise", "hypothesis"), ("sentence",), ("text",),
)


@runtime_checkable
class Task(Protocol):
    """A task format: training batches from records, and evaluation of a model on records."""

    kind: str

    def collate(self, records: list[dict], tokenizer: Any) -> dict[str, torch.Tensor]:
        """A training batch; the model's own loss on it is the training loss."""
        ...

    def evaluate(self, model: Any, tokenizer: Any, records: list[dict], batch_size: int = 16) -> dict[str, Any]:
        """``accuracy``, ``macro_f1``, ``loss``, ``n``, ``per_class`` and ``confusion`` (see
        :func:`zopeft.metrics.class_metrics`); sft gives ``loss``, ``perplexity`` and ``n``."""
        ...

    def check(self, record: dict) -> None:
        """Raise ``KeyError`` / ``ValueError`` naming what ``record`` lacks for this format (no tokenizer needed)."""
        ...


# ----- shared helpers ----------------------------------------------------------------------------
def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _special_prefix(tokenizer: Any) -> list[int]:
    """The special tokens (e.g. BOS) the tokenizer puts before a text; kept when the prompt is truncated."""
    plain = _encode(tokenizer, "a")
    full = list(tokenizer("a")["input_ids"])
    return full[: len(full) - len(plain)] if full[len(full) - len(plain):] == plain else []


def _pad_id(tokenizer: Any) -> int:
    for pad in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if pad is not None:
            return pad
    return 0


def _device(model: torch.nn.Module) -> torch.device:
    return next(p.device for p in model.parameters())


def _pad(sequences: list[list[int]], targets: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token lists into ``input_ids``/``attention_mask``/``labels`` tensors."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for i, (seq, tgt) in enumerate(zip(sequences, targets)):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, : len(tgt)] = torch.tensor(tgt)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    device = _device(model)
    ids = batch["input_ids"].to(device)
    out = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device))
    return out.logits[:, -ids.shape[1]:].float()  # prompt tuning prepends virtual-token positions


def _logits_at(model: torch.nn.Module, batch: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """fp32 logits ``(keep.sum(), V)`` at the ``True`` positions of ``keep`` (row by row).

    Where the model takes a boolean ``logits_to_keep`` (transformers 5 causal LMs) only those
    positions are projected onto the vocabulary; prompt tuning's prepended tokens rule it out.
    """
    from .batched import prompt_learning_type, takes_logit_mask

    prepends = prompt_learning_type(model) not in (None, "PREFIX_TUNING")  # prompt tuning shifts the positions
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = _device(model)
    if prepends or not takes_logit_mask(base):
        return _logits(model, batch)[keep.to(device)]
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                logits_to_keep=keep.to(device))
    return out.logits.float()


@contextmanager
def _evaluating(model: torch.nn.Module) -> Iterator[None]:
    """``no_grad`` and ``model.eval()`` for the duration, restoring the training mode after."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(training)


def _check_records(records: list[dict]) -> None:
    if not records:
        raise ValueError("no records")


# ----- prompt + candidate continuations (classification, multiple_choice) -----------------------
@dataclass
class _Example:
    context: list[int]  # special prefix + (left-truncated) prompt tokens
    candidates: list[list[int]]
    gold: int


def _example(prefix: list[int], prompt: list[int], candidates: list[list[int]], gold: int, cutoff_len: int) -> _Example:
    """Left-truncate the prompt (and, if they alone overflow, right-truncate the candidates) to ``cutoff_len``."""
    room = cutoff_len - len(prefix) - 1  # at least one prompt token, so that every candidate token is predicted
    if room < 1:
        raise ValueError(f"cutoff_len={cutoff_len} leaves no room for a continuation")
    candidates = [c[:room] for c in candidates]
    if any(not c for c in candidates):
        raise ValueError("a candidate continuation has no tokens")
    keep = cutoff_len - len(prefix) - max(len(c) for c in candidates)
    context = prefix + prompt[-keep:]
    if not context:
        raise ValueError("empty prompt: a causal LM cannot score a continuation without context")
    return _Example(context, candidates, gold)


def _score(model: torch.nn.Module, examples: list[_Example], pad_id: int, batch_size: int) -> list[list[tuple[float, int]]]:
    """``(sum of log-probs, token count)`` of every candidate of every example given its context.

    Single-token candidates: one sequence per example (its context), read at the last position;
    otherwise one per (example, candidate).  Sequences run shortest first (less padding), and the
    vocabulary projection runs only at the positions read (see :func:`_logits_at`).
    """
    single = all(len(c) == 1 for ex in examples for c in ex.candidates)
    jobs = ([(e, None) for e in range(len(examples))] if single
            else [(e, c) for e, ex in enumerate(examples) for c in range(len(ex.candidates))])

    def tokens(job: tuple[int, int | None]) -> list[int]:
        e, c = job
        return examples[e].context + ([] if c is None else examples[e].candidates[c])

    jobs.sort(key=lambda job: len(tokens(job)))
    out: list[list[tuple[float, int]]] = [[(0.0, 0)] * len(ex.candidates) for ex in examples]
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        seqs = [tokens(job) for job in chunk]
        batch = _pad(seqs, [[] for _ in seqs], pad_id)
        keep = torch.zeros(batch["input_ids"].shape, dtype=torch.bool)
        for row, (e, c) in enumerate(chunk):  # the positions predicting the candidate tokens
            ctx = len(examples[e].context)
            keep[row, ctx - 1 : ctx - 1 + (1 if c is None else len(examples[e].candidates[c]))] = True
        logprobs = _logits_at(model, batch, keep).log_softmax(-1).cpu()
        rows = logprobs.split(keep.sum(1).tolist())
        for (e, c), row in zip(chunk, rows):
            if c is None:
                out[e] = [(row[0, cand[0]].item(), 1) for cand in examples[e].candidates]
            else:
                cand = examples[e].candidates[c]
                out[e][c] = (row.gather(1, torch.tensor(cand).unsqueeze(1)).sum().item(), len(cand))
    return out


def _candidate_batch(examples: list[_Example], pad_id: int, length_normalised: bool, shared: bool) -> CandidateBatch:
    """Model inputs scoring every candidate of every example (see :class:`~zopeft.objectives.CandidateBatch`).

    ``shared`` single-token candidates (label words): one row per example, scored at its answer
    position on every candidate token; otherwise one row per (example, candidate).
    """
    gold = torch.tensor([ex.gold for ex in examples])
    count = max(len(ex.candidates) for ex in examples)
    if shared and all(len(c) == 1 for c in examples[0].candidates):
        seqs = [ex.context + ex.candidates[ex.gold] for ex in examples]
        targets = [[IGNORE] * len(ex.context) + ex.candidates[ex.gold] for ex in examples]
        tokens = torch.tensor([c[0] for c in examples[0].candidates])
        return CandidateBatch(_pad(seqs, targets, pad_id), gold, count, candidate_tokens=tokens)
    pairs = [(e, c) for e, ex in enumerate(examples) for c in range(len(ex.candidates))]
    seqs = [examples[e].context + examples[e].candidates[c] for e, c in pairs]
    targets = [[IGNORE] * len(examples[e].context) + examples[e].candidates[c] for e, c in pairs]
    return CandidateBatch(
        _pad(seqs, targets, pad_id), gold, count, row_example=torch.tensor([e for e, _ in pairs]),
        row_candidate=torch.tensor([c for _, c in pairs]), length_normalised=length_normalised,
    )


LABEL_WORD_SCORINGS = ("sum", "mean", "first")


def candidate_batch(
    tokenizer: Any, prompts: list[str], choices: list[str] | list[list[str]], gold: list[int], *,
    cutoff_len: int = 256, scoring: str = "sum",
) -> CandidateBatch:
    """A batch for :func:`zopeft.metric_closure` from prompts, their candidate continuations and gold indices.

    ``choices``: one list of label words shared by every prompt (``[" bad", " good"]``), or a list
    per prompt.  Continuations are appended to the prompt verbatim.  ``scoring`` ranks the
    candidates as a recipe's ``label_word_scoring`` does: by summed log-probability (``sum``),
    its mean per token (``mean``), or the first token's alone (``first``, as in LM-BFF and MeZO;
    a prompt's candidates may then not share a first token).
    """
    if not prompts or len(prompts) != len(gold):
        raise ValueError(f"candidate_batch: {len(prompts)} prompts and {len(gold)} gold indices")
    if scoring not in LABEL_WORD_SCORINGS:
        raise ValueError(f"candidate_batch: scoring {scoring!r} is not one of {', '.join(LABEL_WORD_SCORINGS)}")
    shared = bool(choices) and isinstance(choices[0], str)
    per_prompt = [choices] * len(prompts) if shared else choices

    def scored(options: list[str]) -> list[list[int]]:
        return _scored_tokens(tokenizer, options, scoring == "first", "candidate_batch: scoring first: choices")

    shared_tokens = scored(choices) if shared else None  # label words: tokenized (and checked) once
    prefix = _special_prefix(tokenizer)
    examples = []
    for prompt, options, g in zip(prompts, per_prompt, gold):
        if not 0 <= g < len(options):
            raise ValueError(f"candidate_batch: gold index {g} is not one of the {len(options)} choices")
        tokens = shared_tokens if shared_tokens is not None else scored(options)
        examples.append(_example(prefix, _encode(tokenizer, prompt), tokens, g, cutoff_len))
    return _candidate_batch(examples, _pad_id(tokenizer), scoring == "mean", shared)


def _scored_tokens(tokenizer: Any, words: list[str], first: bool, what: str) -> list[list[int]]:
    """Each word's tokens, or (``first``) its first token alone, refusing two words that share it."""
    tokens = [_encode(tokenizer, w) for w in words]
    if not first:
        return tokens
    seen: dict[int, str] = {}
    for word, ids in zip(words, tokens):
        if ids and ids[0] in seen:
            raise ValueError(f"{what} {seen[ids[0]]!r} and {word!r} both start with the token "
                             f"{tokenizer.decode(ids[:1])!r}; use sum or mean, or other words")
        seen.update({ids[0]: word} if ids else {})
    return [ids[:1] for ids in tokens]


@dataclass
class _CandidateTask:
    """Shared by classification and multiple_choice: train on the gold continuation, eval by argmax."""

    template: str | None = None
    text_fields: list[str] | None = None
    label_field: str = "label"
    cutoff_len: int = 256
    length_normalised = False  # rank candidates by mean (True) or summed (False) log-prob per token

    def examples(self, records: list[dict], tokenizer: Any) -> list[_Example]:
        raise NotImplementedError

    shared_candidates = False  # every record has the same candidates (label words)

    def collate(self, records: list[dict], tokenizer: Any) -> dict[str, torch.Tensor]:
        _check_records(records)
        examples = self.examples(records, tokenizer)
        seqs = [ex.context + ex.candidates[ex.gold] for ex in examples]
        targets = [[IGNORE] * len(ex.context) + ex.candidates[ex.gold] for ex in examples]
        return _pad(seqs, targets, _pad_id(tokenizer))

    def candidate_batch(self, records: list[dict], tokenizer: Any) -> CandidateBatch:
        """Every candidate's score of every record, for an objective (:func:`zopeft.metric_closure`)."""
        _check_records(records)
        examples = self.examples(records, tokenizer)
        return _candidate_batch(examples, _pad_id(tokenizer), self.length_normalised, self.shared_candidates)

    def classes(self, examples: list[_Example]) -> tuple[list[str], list[str] | None]:
        """The class names of the per-class metrics (here the gold choice's position) and their words (none)."""
        return [str(i) for i in range(max(len(ex.candidates) for ex in examples))], None

    def evaluate(self, model: Any, tokenizer: Any, records: list[dict], batch_size: int = 16) -> dict[str, Any]:
        _check_records(records)
        examples = self.examples(records, tokenizer)
        with _evaluating(model):
            scores = _score(model, examples, _pad_id(tokenizer), batch_size)
        pred, loss = [], 0.0
        for ex, cand in zip(examples, scores):
            values = [s / n if self.length_normalised else s for s, n in cand]
            pred.append(max(range(len(values)), key=values.__getitem__))
            loss += -cand[ex.gold][0] / cand[ex.gold][1]
        metrics = class_metrics([ex.gold for ex in examples], pred, *self.classes(examples))
        return {"accuracy": metrics.pop("accuracy"), "macro_f1": metrics.pop("macro_f1"), "loss": loss / len(examples),
                "n": len(examples), **metrics}


@dataclass
class ClassificationTask(_CandidateTask):
    """Prompt + label words on a causal LM; eval picks the label word with the highest score.

    ``label_words``: ``{label: word}`` or a list (label = index); words are appended to the prompt
    verbatim, so they usually start with a space (``" positive"``).  ``label_word_scoring``: a
    word's score is the sum of its tokens' log-probs (``sum``, its probability as a string; it
    favours short words), their mean (``mean``), or the first token's alone (``first``, as in
    LM-BFF and MeZO: the word is cut to its first token for training and evaluation alike, so
    two words may not share one).  Objectives (:meth:`candidate_batch`) rank by the same scores.
    """

    label_words: dict | list = field(default_factory=dict)
    label_word_scoring: str = "sum"
    kind = "classification"
    shared_candidates = True

    def __post_init__(self) -> None:
        if not self.label_words:
            raise ValueError("classification needs label_words, e.g. {0: ' negative', 1: ' positive'}")
        if self.label_word_scoring not in LABEL_WORD_SCORINGS:
            raise ValueError(f"label_word_scoring: {self.label_word_scoring!r} is not one of {', '.join(LABEL_WORD_SCORINGS)}")
        self.keys = label_keys(self.label_words)
        self.words = list(self.label_words.values() if isinstance(self.label_words, dict) else self.label_words)
        self.length_normalised = self.label_word_scoring == "mean"

    def classes(self, examples: list[_Example]) -> tuple[list[str], list[str] | None]:
        return [str(k) for k in self.keys], self.words

    def word_tokens(self, tokenizer: Any) -> list[list[int]]:
        """Each label word's tokens as scored: all of them, or (``first``) the first alone."""
        return _scored_tokens(tokenizer, self.words, self.label_word_scoring == "first",
                              "label_word_scoring: first: label words")

    def check(self, record: dict) -> None:
        prompt_text(record, self.template, self.text_fields, self.kind)
        label_index(record, self.label_field, self.keys)

    def examples(self, records: list[dict], tokenizer: Any) -> list[_Example]:
        prefix, words = _special_prefix(tokenizer), self.word_tokens(tokenizer)
        return [
            _example(
                prefix, _encode(tokenizer, prompt_text(r, self.template, self.text_fields, self.kind)), words,
                label_index(r, self.label_field, self.keys), self.cutoff_len,
            )
            for r in records
        ]


@dataclass
class MultipleChoiceTask(_CandidateTask):
    """A prompt and candidate continuations (``choices`` list or ``choice1``, ``choice2``, ...); ``label`` = gold index.

    The prompt is the template, else the text fields joined by newlines, else the ``prompt`` or
    ``premise`` field.  A continuation is joined with a space unless either side has whitespace there.
    Eval picks the continuation with the highest mean log-prob per token.
    """

    choices_field: str = "choices"
    kind = "multiple_choice"
    length_normalised = True

    def choices(self, record: dict) -> list[str]:
        return choice_texts(record, self.choices_field)

    def prompt(self, record: dict) -> str:
        return choice_prompt(record, self.template, self.text_fields)

    def read(self, record: dict) -> tuple[str, list[str], int]:
        """``(prompt, choices, gold index)`` of a record."""
        prompt, choices = self.prompt(record), self.choices(record)
        gold = label_index(record, self.label_field, None)
        if not 0 <= gold < len(choices):
            raise ValueError(f"label {gold} is not an index into the {len(choices)} choices")
        return prompt, choices, gold

    def check(self, record: dict) -> None:
        self.read(record)

    def examples(self, records: list[dict], tokenizer: Any) -> list[_Example]:
        prefix, out = _special_prefix(tokenizer), []
        for r in records:
            prompt, choices, gold = self.read(r)
            out.append(_example(prefix, _encode(tokenizer, prompt), [_encode(tokenizer, continuation(prompt, c))
                                                                      for c in choices], gold, self.cutoff_len))
        return out


# ----- sft -------------------------------------------------------------------------------------
@dataclass
class SFTTask:
    """Supervised fine-tuning: ``prompt``/``completion`` or alpaca ``instruction``/``input``/``output``.

    The loss is on the completion tokens (+ eos) only.  With a template, the prompt is the filled
    template and the completion the ``completion`` (or ``output``) field.  Over-long examples keep
    the start of the completion and the end of the prompt (at least half of ``cutoff_len`` for the
    prompt when both are long).  Eval reports the per-token loss and its perplexity.
    """

    template: str | None = None
    cutoff_len: int = 256
    kind = "sft"

    def split(self, record: dict) -> tuple[str, str]:
        completion_key = next((k for k in ("completion", "output") if k in record), None)
        if completion_key is None:
            raise KeyError(f"sft record needs prompt/completion or instruction/input/output (fields: {', '.join(record)})")
        if self.template is not None:
            prompt = fill(self.template, record)
        elif "prompt" in record:
            prompt = text_of(record, "prompt")
        elif "instruction" in record:
            has_input = str(record.get("input") or "").strip()
            prompt = (ALPACA_TEMPLATE if has_input else _ALPACA_NO_INPUT).format(
                instruction=text_of(record, "instruction"), input=record.get("input") or ""
            )
        else:
            raise KeyError(f"sft record needs prompt/completion or instruction/input/output (fields: {', '.join(record)})")
        return prompt, text_of(record, completion_key)

    def check(self, record: dict) -> None:
        self.split(record)

    def collate(self, records: list[dict], tokenizer: Any) -> dict[str, torch.Tensor]:
        _check_records(records)
        prefix, eos = _special_prefix(tokenizer), tokenizer.eos_token_id
        seqs, targets = [], []
        for r in records:
            prompt_str, completion_str = self.split(r)
            prompt = _encode(tokenizer, prompt_str)
            completion = _encode(tokenizer, completion_str) + ([eos] if eos is not None else [])
            room = self.cutoff_len - len(prefix)
            keep = min(len(prompt), max(room - len(completion), room // 2))
            context = prefix + (prompt[-keep:] if keep else [])
            completion = completion[: self.cutoff_len - len(context)]
            seqs.append(context + completion)
            targets.append([IGNORE] * len(context) + completion)
        return _pad(seqs, targets, _pad_id(tokenizer))

    def evaluate(self, model: Any, tokenizer: Any, records: list[dict], batch_size: int = 16) -> dict[str, float]:
        _check_records(records)
        with _evaluating(model):
            loss = _labelled_loss(model, self.collate, records, tokenizer, batch_size)
        return {"loss": loss, "perplexity": math.exp(loss), "n": len(records)}


def _labelled_loss(model: Any, collate: Any, records: list[dict], tokenizer: Any, batch_size: int) -> float:
    """The mean cross-entropy per labelled token of ``collate``'s batches (projected onto the vocabulary only there)."""
    nll, tokens = 0.0, 0
    for start in range(0, len(records), batch_size):
        batch = collate(records[start : start + batch_size], tokenizer)
        targets = batch["labels"][:, 1:]
        keep = torch.zeros(batch["labels"].shape, dtype=torch.bool)
        keep[:, :-1] = targets != IGNORE  # the positions predicting a labelled token
        logits = _logits_at(model, batch, keep)
        nll += F.cross_entropy(logits, targets[targets != IGNORE].to(logits.device), reduction="sum").item()
        tokens += int(keep.sum())
    return nll / max(tokens, 1)


# ----- sequence classification -----------------------------------------------------------------
@dataclass
class SequenceClassificationTask:
    """An encoder + classification head: one or two text fields (a pair), integer ``labels``.

    ``text_fields`` defaults to the first of sentence1/sentence2, question/passage,
    premise/hypothesis, sentence, text present in the records.  ``label_words`` (optional) only
    fixes the label order: the class index is the label's position among its keys.
    """

    text_fields: list[str] | None = None
    label_words: dict | list | None = None
    label_field: str = "label"
    cutoff_len: int = 256
    num_labels: int | None = None  # the head's classes: integer labels must be below it
    kind = "sequence_classification"

    def fields(self, record: dict) -> list[str]:
        if self.text_fields:
            return list(self.text_fields)
        for names in _DEFAULT_TEXT_FIELDS:
            if all(n in record for n in names):
                return list(names)
        raise KeyError(f"give text_fields: none of the default text fields is in the record (fields: {', '.join(record)})")

    def check(self, record: dict) -> None:
        require_text_fields(record, self.fields(record))
        index = label_index(record, self.label_field, label_keys(self.label_words))
        if self.num_labels is not None and not 0 <= index < self.num_labels:
            raise ValueError(f"label {index} is not a class of a {self.num_labels}-class head; set num_labels "
                             "(or label_words)")

    def collate(self, records: list[dict], tokenizer: Any) -> dict[str, torch.Tensor]:
        _check_records(records)
        names, keys = self.fields(records[0]), label_keys(self.label_words)
        if len(names) > 2:
            raise ValueError(f"sequence_classification takes one or two text fields, got {names}")
        texts = [[str(r[n]) for r in records] for n in names]
        enc = tokenizer(*texts, truncation=True, max_length=self.cutoff_len)
        length = max(len(ids) for ids in enc["input_ids"])
        batch = {}
        for name, pad in (("input_ids", _pad_id(tokenizer)), ("attention_mask", 0), ("token_type_ids", 0)):
            if name in enc:
                batch[name] = torch.tensor([list(v) + [pad] * (length - len(v)) for v in enc[name]])
        batch["labels"] = torch.tensor([label_index(r, self.label_field, keys) for r in records])
        return batch

    def candidate_batch(self, records: list[dict], tokenizer: Any) -> CandidateBatch:
        """The batch with its classes as the candidates, for an objective (:func:`zopeft.metric_closure`)."""
        batch = self.collate(records, tokenizer)
        keys = label_keys(self.label_words)
        classes = len(keys) if keys is not None else int(batch["labels"].max()) + 1
        return CandidateBatch(batch, batch["labels"], classes)

    def evaluate(self, model: Any, tokenizer: Any, records: list[dict], batch_size: int = 16) -> dict[str, Any]:
        _check_records(records)
        gold, pred, loss = [], [], 0.0
        device = _device(model)
        with _evaluating(model):
            for start in range(0, len(records), batch_size):
                batch = {k: v.to(device) for k, v in self.collate(records[start : start + batch_size], tokenizer).items()}
                labels = batch.pop("labels")
                logits = model(**batch).logits.float()
                gold += labels.tolist()
                pred += logits.argmax(-1).tolist()
                loss += F.cross_entropy(logits, labels, reduction="sum").item()
        keys = label_keys(self.label_words)
        metrics = class_metrics(gold, pred, [str(k) for k in keys] if keys else [str(i) for i in range(logits.shape[-1])])
        return {"accuracy": metrics.pop("accuracy"), "macro_f1": metrics.pop("macro_f1"), "loss": loss / len(records),
                "n": len(records), **metrics}


# ----- generation ----------------------------------------------------------------------------------
def _generation_batch(
    tokenizer: Any, prompts: list[list[int]], answers: list[list[str]], records: list[dict], max_new_tokens: int,
    stop_strings: Iterable[str],
) -> GenerationBatch:
    """A :class:`GenerationBatch` of prompt token lists (special prefix included), left-padded; a prompt without
    tokens is refused (``ValueError``)."""
    prefix = len(_special_prefix(tokenizer))
    texts = [tokenizer.decode(p[prefix:]) for p in prompts]
    empty = next((i for i, p in enumerate(prompts) if not p), None)
    if empty is not None:
        raise ValueError(f"generation_batch: prompt {empty + 1} ({texts[empty]!r}) has no tokens to generate from; "
                         "give every prompt some text")
    return GenerationBatch(left_padded(prompts, _pad_id(tokenizer)), answers, records, texts, tokenizer,
                           max_new_tokens, tuple(stop_strings))


def generation_batch(
    tokenizer: Any, prompts: list[str], answers: list[str | list[str]] | None = None, *, records: list[dict] | None = None,
    max_new_tokens: int = 16, stop_strings: Iterable[str] = DEFAULT_STOP_STRINGS, cutoff_len: int = 256,
) -> GenerationBatch:
    """A batch for :func:`zopeft.generation_closure` (and :func:`zopeft.generation.greedy_generate`).

    ``answers``: each prompt's gold answer text or list of texts (None: none, to generate only; the
    ``f1`` and ``exact_match`` objectives need them).  A prompt keeps its last
    ``cutoff_len - max_new_tokens`` tokens.  ``records`` (default ``{"prompt", "answers"}`` per
    prompt) is what a ``python:`` objective receives with the generations.  A generation ends after
    ``max_new_tokens``, at EOS, or at the first of ``stop_strings`` after its leading white space.
    """
    check_max_new_tokens(max_new_tokens)
    counts = {"answers": answers, "records": records}
    if not prompts or any(v is not None and len(v) != len(prompts) for v in counts.values()):
        given = ", ".join(f"{len(v)} {k}" for k, v in counts.items() if v is not None)
        raise ValueError(f"generation_batch: {len(prompts)} prompts{', ' + given if given else ''}: give one each per "
                         "prompt")
    room = cutoff_len - max_new_tokens - len(_special_prefix(tokenizer))
    if room < 1:
        raise ValueError(f"generation_batch: cutoff_len={cutoff_len} leaves no room for a prompt before "
                         f"max_new_tokens={max_new_tokens} new tokens")
    golds = [answer_list(a, f"generation_batch: answers[{i}]") for i, a in enumerate(answers)] if answers else \
        [[] for _ in prompts]
    records = records if records is not None else [{"prompt": p, "answers": a} for p, a in zip(prompts, golds)]
    tokens = [_special_prefix(tokenizer) + _encode(tokenizer, p)[-room:] for p in prompts]
    return _generation_batch(tokenizer, tokens, golds, records, max_new_tokens, stop_strings)


@dataclass
class GenerationTask:
    """A prompt and gold answers (``answer_field``: a text or a list of texts); the answer is generated.

    Training (``collate``) is on the teacher-forced loss of the first gold answer (+ EOS) after the
    prompt, joined with a space unless either side has white space there.  Evaluation generates
    greedily (:func:`zopeft.generation.greedy_generate`: ``max_new_tokens``, EOS and
    ``stop_strings`` end an answer) and scores the answers with SQuAD v1.1's exact match and F1
    (max over the gold answers, fractions 0-1), with the teacher-forced loss.

    A prompt keeps at most ``cutoff_len - max_new_tokens`` tokens (the training target at most
    ``max_new_tokens``); a longer one loses the beginning of its longest field (the context), never
    the template's text or its other fields (the question).
    """

    template: str | None = None
    text_fields: list[str] | None = None
    answer_field: str = "answers"
    cutoff_len: int = 256
    max_new_tokens: int = 16
    stop_strings: tuple[str, ...] | list[str] = DEFAULT_STOP_STRINGS
    kind = "generation"

    def __post_init__(self) -> None:
        check_max_new_tokens(self.max_new_tokens)
        if self.max_new_tokens >= self.cutoff_len:
            raise ValueError(f"max_new_tokens: {self.max_new_tokens} leaves no room for the prompt in cutoff_len "
                             f"{self.cutoff_len}; raise cutoff_len or lower max_new_tokens")
        self.stop_strings = tuple(self.stop_strings)
        if self.template is None and self.text_fields:
            self.template = "\n".join(f"{{{name}}}" for name in self.text_fields)

    def answers(self, record: dict) -> list[str]:
        return answer_texts(record, self.answer_field)

    def prompt(self, record: dict) -> str:
        return prompt_text(record, self.template, None, self.kind)

    def check(self, record: dict) -> None:
        self.prompt(record)
        self.answers(record)

    def prompt_tokens(self, record: dict, tokenizer: Any) -> list[int]:
        """The special prefix and the prompt, its longest field cut from the left to fit (see the class)."""
        prefix = _special_prefix(tokenizer)
        room = self.cutoff_len - self.max_new_tokens - len(prefix)
        tokens = _encode(tokenizer, self.prompt(record))
        if len(tokens) <= room:
            return prefix + tokens
        name = max(template_fields(self.template), key=lambda f: len(str(record[f])))
        parts = fill(self.template, {**record, name: "\0"}).split("\0")
        if len(parts) != 2:  # the field appears more than once: cut the prompt from the left
            return prefix + tokens[-room:]
        head, tail = _encode(tokenizer, parts[0]), _encode(tokenizer, parts[1])
        keep = room - len(head) - len(tail)
        if keep < 0:
            raise ValueError(f"cutoff_len: {self.cutoff_len} leaves {room} tokens for the prompt (after max_new_tokens "
                             f"{self.max_new_tokens}), and the prompt without its field {name!r} takes "
                             f"{len(head) + len(tail)}; raise cutoff_len")
        context = _encode(tokenizer, str(record[name]))
        return prefix + head + context[len(context) - keep:] + tail

    def completion(self, record: dict, tokenizer: Any) -> list[int]:
        """The training target: the first gold answer's tokens and EOS, at most ``max_new_tokens``."""
        answer, prompt = self.answers(record)[0], self.prompt(record)
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        return (_encode(tokenizer, continuation(prompt, answer)) + eos)[: self.max_new_tokens]

    def collate(self, records: list[dict], tokenizer: Any) -> dict[str, torch.Tensor]:
        _check_records(records)
        seqs, targets = [], []
        for r in records:
            prompt, answer = self.prompt_tokens(r, tokenizer), self.completion(r, tokenizer)
            seqs.append(prompt + answer)
            targets.append([IGNORE] * len(prompt) + answer)
        return _pad(seqs, targets, _pad_id(tokenizer))

    def generation_batch(self, records: list[dict], tokenizer: Any, prompts: list[list[int]] | None = None) -> GenerationBatch:
        """The records' prompts (left-padded; ``prompts``: their :meth:`prompt_tokens` if known) and gold answers,
        for generation and the generation objectives."""
        _check_records(records)
        prompts = prompts if prompts is not None else [self.prompt_tokens(r, tokenizer) for r in records]
        return _generation_batch(tokenizer, prompts, [self.answers(r) for r in records], records,
                                 self.max_new_tokens, self.stop_strings)

    def evaluate(self, model: Any, tokenizer: Any, records: list[dict], batch_size: int = 16) -> dict[str, Any]:
        """``f1``, ``exact_match`` (0-1) with standard errors, ``loss`` (teacher-forced, first answer), ``n``, and
        ``generations``: per record its ``prompt``, ``generation``, ``answers``, ``f1`` and ``exact_match``."""
        _check_records(records)
        device = _device(model)
        prompts = [self.prompt_tokens(r, tokenizer) for r in records]
        order = sorted(range(len(records)), key=lambda i: len(prompts[i]))
        texts: dict[int, tuple[str, str]] = {}  # record -> (prompt, generation)
        with _evaluating(model):
            loss = _labelled_loss(model, self.collate, records, tokenizer, batch_size)
            for start in range(0, len(order), batch_size):  # prompts of similar length together: less padding
                chosen = order[start : start + batch_size]
                batch = self.generation_batch([records[i] for i in chosen], tokenizer, [prompts[i] for i in chosen])
                batch = batch.to(device)
                texts.update(zip(chosen, zip(batch.prompts, batch.texts(greedy_generate(model, batch)))))
        answers = [self.answers(r) for r in records]
        generated = [texts[i][1] for i in range(len(records))]
        scores = squad_scores(generated, answers)
        rows = [{"prompt": texts[i][0], "generation": generated[i], "answers": answers[i], **scores["per_record"][i]}
                for i in range(len(records))]
        return {"f1": scores["f1"], "exact_match": scores["exact_match"], "loss": loss, "n": len(records),
                "f1_stderr": scores["f1_stderr"], "exact_match_stderr": scores["exact_match_stderr"],
                "generations": rows}


# ----- factory ---------------------------------------------------------------------------------
TASK_KINDS = ("classification", "multiple_choice", "sft", "sequence_classification", "generation")


def build_task(
    kind: str,
    *,
    template: str | None = None,
    label_words: dict | list | None = None,
    text_fields: list[str] | tuple[str, ...] | None = None,
    label_field: str = "label",
    cutoff_len: int = 256,
    label_word_scoring: str = "sum",
    num_labels: int | None = None,
    **kw: Any,
) -> Task:
    """The task format ``kind`` (one of :data:`TASK_KINDS`).

    Each kind uses the arguments that apply to it and ignores the others, so a bundled dataset's
    defaults work with any kind: classification uses all but ``num_labels``; multiple_choice
    ignores ``label_words`` and ``label_word_scoring`` (extra option ``choices_field``); sft uses
    ``template`` and ``cutoff_len``; sequence_classification ignores ``template`` and
    ``label_word_scoring``; generation uses ``template``, ``text_fields`` and ``cutoff_len`` (extra
    options ``answer_field``, ``max_new_tokens``, ``stop_strings``).
    """
    fields = list(text_fields) if text_fields else None
    if kind == "classification":
        return ClassificationTask(template, fields, label_field, cutoff_len, label_words=label_words or {},
                                  label_word_scoring=label_word_scoring, **kw)
    if kind == "multiple_choice":
        return MultipleChoiceTask(template, fields, label_field, cutoff_len, **kw)
    if kind == "sft":
        return SFTTask(template, cutoff_len, **kw)
    if kind == "sequence_classification":
        return SequenceClassificationTask(fields, label_words, label_field, cutoff_len, num_labels, **kw)
    if kind == "generation":
        return GenerationTask(template, fields, cutoff_len=cutoff_len, **kw)
    raise ValueError(f"unknown task kind {kind!r}: valid kinds are {', '.join(TASK_KINDS)}{did_you_mean(kind, TASK_KINDS)}")
