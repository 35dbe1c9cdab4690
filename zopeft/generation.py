"""Greedy generation with a stop rule, and the batch of prompts it runs on.

A :class:`GenerationBatch` holds left-padded prompts (``input_ids``, ``attention_mask``), the gold
answers and records they came from, and how a generation ends: after ``max_new_tokens``, at an
EOS token, or at the first of ``stop_strings`` (default: a newline) once the generation's leading
white space is past (SmolLM2 often opens its answer with a newline).  :func:`greedy_generate`
runs ``model.generate`` greedily (the argmax at every step; sampling, beams and repetition
penalties of the model's own generation config are overridden) and returns each row's new tokens
up to where it stopped; :func:`answer_text` makes the answer of them: decoded, leading white space
dropped, cut before the first stop string, stripped.

The rows of R replicas of a batch (:func:`zopeft.generation_closure`) are ``r·B + b``: replica r of
prompt b, as in the batched forward.  Greedy decoding makes each row's tokens a function of the
weights it sees alone, so a replica generates what its point generates on its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

__all__ = [
    "DEFAULT_STOP_STRINGS", "MAX_NEW_TOKENS", "GenerationBatch", "answer_text", "check_generates",
    "check_max_new_tokens", "greedy_generate", "left_padded",
]

DEFAULT_STOP_STRINGS = ("\n",)
MAX_NEW_TOKENS = 1024


def check_max_new_tokens(value: int) -> int:
    """``value`` if it is a count of new tokens in 1 .. :data:`MAX_NEW_TOKENS`, else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_NEW_TOKENS:
        raise ValueError(f"max_new_tokens: a count of new tokens from 1 to {MAX_NEW_TOKENS}, got {value!r}")
    return value


def check_generates(model: torch.nn.Module) -> None:
    """Refuse (``ValueError``) a model whose generations would not be its own: PEFT prefix tuning, whose prefix
    PEFT 0.21's ``generate`` passes under a name transformers 5 ignores (the base model generates)."""
    config = getattr(model, "active_peft_config", None)
    if getattr(config, "peft_type", None) == "PREFIX_TUNING":  # PeftType is a str enum
        raise ValueError("prefix tuning cannot generate here: with PEFT 0.21 and transformers 5, generate() ignores the "
                         "prefix (the base model answers); use lora, ia3 or prompt for a generation task")


@dataclass
class GenerationBatch:
    """Prompts to generate from, their gold answers and records, and the stop rule.

    ``inputs``: left-padded ``input_ids`` and ``attention_mask`` (the prompts end at the last
    column, where generation continues).  ``prompts``: the prompt texts as the model sees them
    (after any truncation).  ``records``: what the prompts were made from (a ``python:``
    objective receives them).
    """

    inputs: dict[str, torch.Tensor]
    answers: list[list[str]]
    records: list[dict]
    prompts: list[str]
    tokenizer: Any
    max_new_tokens: int = 16
    stop_strings: tuple[str, ...] = field(default=DEFAULT_STOP_STRINGS)

    def to(self, device: torch.device | str) -> GenerationBatch:
        """This batch with its tensors on ``device``."""
        return dataclasses.replace(self, inputs={k: v.to(device) for k, v in self.inputs.items()})

    def __len__(self) -> int:
        return len(self.prompts)

    def texts(self, tokens: Sequence[Sequence[int]]) -> list[str]:
        """The answers of :func:`greedy_generate`'s tokens (:func:`answer_text`)."""
        return [answer_text(self.tokenizer, t, self.stop_strings) for t in tokens]


def left_padded(sequences: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids`` / ``attention_mask`` of token lists padded on the left (decoder-only generation)."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(sequences):
        if seq:
            ids[i, length - len(seq):] = torch.tensor(seq)
            mask[i, length - len(seq):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def answer_text(tokenizer: Any, tokens: Sequence[int], stop_strings: Sequence[str] = DEFAULT_STOP_STRINGS) -> str:
    """The answer in generated tokens: decoded, leading white space dropped, cut before the first stop string."""
    text = tokenizer.decode(list(tokens), skip_special_tokens=True).lstrip()
    cuts = [i for i in (text.find(s) for s in stop_strings if s) if i >= 0]
    return (text[: min(cuts)] if cuts else text).strip()


class _StopRule(StoppingCriteria):
    """Stops each row at EOS, or once its text (leading white space skipped) holds a stop string; keeps its length."""

    def __init__(self, tokenizer: Any, start: int, stop_strings: Sequence[str], eos: set[int]) -> None:
        self.tokenizer, self.start, self.stop_strings, self.eos = tokenizer, start, [s for s in stop_strings if s], eos
        self.kept: dict[int, int] = {}  # row -> new tokens kept (the EOS is not)

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        new = input_ids[:, self.start:].tolist()
        rows = [r for r in range(len(new)) if r not in self.kept]
        texts = self.tokenizer.batch_decode([new[r] for r in rows], skip_special_tokens=True) if self.stop_strings else []
        for i, r in enumerate(rows):
            if new[r][-1] in self.eos:
                self.kept[r] = len(new[r]) - 1
            elif texts and any(s in texts[i].lstrip() for s in self.stop_strings):
                self.kept[r] = len(new[r])
        done = torch.zeros(len(new), dtype=torch.bool, device=input_ids.device)
        done[list(self.kept)] = True
        return done


def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> set[int]:
    """The tokenizer's EOS and those of the model's generation config."""
    found = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(found if isinstance(found, (list, tuple)) else [found] if found is not None else [])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, batch: GenerationBatch, replicas: int = 1) -> list[list[int]]:
    """Each row's new tokens up to where it stopped (a stop string's token kept, EOS not).

    ``replicas``: the batch's prompts repeated that many times (replica-major: row ``r·B + b``),
    for a model whose adapter layers compute each replica with its own values.
    """
    check_generates(model)
    inputs = {k: v.repeat(replicas, 1) if replicas > 1 else v for k, v in batch.inputs.items()}
    tokenizer = batch.tokenizer
    eos = _eos_ids(model, tokenizer)
    pad = next((p for p in (tokenizer.pad_token_id, tokenizer.eos_token_id) if p is not None), 0)
    start = inputs["input_ids"].shape[1]
    rule = _StopRule(tokenizer, start, batch.stop_strings, eos)
    config = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=batch.max_new_tokens, repetition_penalty=1.0,
        no_repeat_ngram_size=0, eos_token_id=sorted(eos) or None, pad_token_id=pad,
    )
    out = model.generate(**inputs, generation_config=config, stopping_criteria=StoppingCriteriaList([rule]))
    new = out[:, start:].tolist()
    return [row[: rule.kept.get(r, len(row))] for r, row in enumerate(new)]
