"""Reading a record (one row / JSON object): its prompt text and its label, with one-line errors.

Shared by the task formats (:mod:`zopeft.tasks`) and by ``zopeft validate``, which checks the
first records without importing torch.  Errors are ``KeyError`` / ``ValueError`` naming the
recipe key to fix and the record's fields.
"""

from __future__ import annotations

import json
import string
from typing import Any

from .hints import did_you_mean

__all__ = [
    "answer_list", "answer_texts", "canon_label", "choice_prompt", "choice_texts", "continuation", "fill", "label_index",
    "label_keys", "prompt_text", "require_text_fields", "template_fields", "text_of",
]


def _fields_hint(name: str, record: dict) -> str:
    return f"fields: {', '.join(map(str, record))}{did_you_mean(name, record, cutoff=0.5)}"


def canon_label(value: Any) -> Any:
    """Booleans and integer strings become ints, ``"true"``/``"false"`` 1/0; other values are kept."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("true", "false"):
            return int(text.lower() == "true")
        try:
            return int(text)
        except ValueError:
            return text
    return value


def label_keys(label_words: dict | list | None) -> list[Any] | None:
    """The labels that ``label_words`` maps (a list's labels are its indices), canonicalised."""
    if label_words is None:
        return None
    keys = range(len(label_words)) if isinstance(label_words, (list, tuple)) else label_words.keys()
    return [canon_label(k) for k in keys]


def label_index(record: dict, label_field: str, keys: list[Any] | None) -> int:
    """Index of the record's label: its position among ``keys``, or the label itself as an int."""
    if label_field not in record:
        raise KeyError(f"record has no label field {label_field!r} ({_fields_hint(label_field, record)}); "
                       "set label_field to the field that holds the label")
    label = canon_label(record[label_field])
    if keys is None:
        if not isinstance(label, int):
            raise ValueError(f"label {record[label_field]!r} is not an integer; give label_words to map labels")
        return label
    if label not in keys:
        raise ValueError(f"label {record[label_field]!r} is not one of the label words' labels {keys}")
    return keys.index(label)


def _null(name: str) -> ValueError:
    return ValueError(f"field {name!r} is null, which would become the prompt text 'None'; give the record a text "
                      "there, or drop the record")


def text_of(record: dict, name: str) -> str:
    """The record's field ``name`` as text (``KeyError`` if it has none, ``ValueError`` if it is null)."""
    if record[name] is None:
        raise _null(name)
    return str(record[name])


def template_fields(template: str) -> list[str]:
    """The replacement fields of a ``str.format`` template in order, as written (``""`` for a positional ``{}``);
    ``ValueError`` for a malformed template."""
    return [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]


def fill(template: str, record: dict) -> str:
    """The template with the record's fields filled in (a null field is refused, not written as 'None')."""
    try:
        text = template.format_map(record)
    except KeyError as err:
        raise KeyError(f"template field {err.args[0]!r} is not in the record ({_fields_hint(str(err.args[0]), record)}); "
                       "use these fields in the template") from None
    null = next((f for f in template_fields(template) if record.get(f, "") is None), None)
    if null is not None:
        raise _null(null)
    return text


def require_text_fields(record: dict, names: list[str]) -> None:
    """Raise ``KeyError`` naming the first of ``names`` the record lacks, ``ValueError`` for the first that is null."""
    missing = [n for n in names if n not in record]
    if missing:
        raise KeyError(f"text field {missing[0]!r} is not in the record ({_fields_hint(missing[0], record)}); "
                       "fix text_fields")
    null = next((n for n in names if record[n] is None), None)
    if null is not None:
        raise _null(null)


def prompt_text(record: dict, template: str | None, text_fields: list[str] | None, kind: str) -> str:
    """The prompt of a record: the filled template, else its text fields joined by newlines."""
    if template is not None:
        return fill(template, record)
    if text_fields:
        require_text_fields(record, text_fields)
        return "\n".join(text_of(record, f) for f in text_fields)
    raise ValueError(f"{kind}: give a template (e.g. 'Review: {{sentence}}\\nSentiment:') or text_fields")


def choice_prompt(record: dict, template: str | None, text_fields: list[str] | None) -> str:
    """A multiple-choice record's prompt: the filled template or text fields, else its ``prompt`` or ``premise``."""
    if template is None and not text_fields:
        for name in ("prompt", "premise"):
            if name in record:
                return text_of(record, name)
    return prompt_text(record, template, text_fields, "multiple_choice")


def continuation(prompt: str, text: str) -> str:
    """``text`` as it follows ``prompt``: after a space, unless one of them already has the whitespace."""
    return text if not prompt or prompt[-1].isspace() or text[:1].isspace() else " " + text


def choice_texts(record: dict, choices_field: str) -> list[str]:
    """A multiple-choice record's candidates: the ``choices_field`` list, else ``choice1``, ``choice2``, ..."""
    if choices_field in record:
        if record[choices_field] is None or None in record[choices_field]:
            raise _null(choices_field)
        return [str(c) for c in record[choices_field]]
    found, i = [], 1
    while f"choice{i}" in record:
        found.append(text_of(record, f"choice{i}"))
        i += 1
    if len(found) < 2:
        raise KeyError(f"record has neither {choices_field!r} nor choice1, choice2, ... "
                       f"({_fields_hint(choices_field, record)}); set choices_field to the field that lists the choices")
    return found


def answer_list(value: Any, where: str) -> list[str]:
    """Gold answers as a list of texts: a text, a list of texts, a JSON list in a text (a CSV cell), or the
    ``{"text": [...]}`` of HF's SQuAD layout; ``ValueError`` naming ``where`` for anything else."""
    if isinstance(value, dict) and "text" in value:
        value = value["text"]
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except ValueError:
            pass  # an answer that starts with a bracket
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, (list, tuple)):
        raise ValueError(f"{where} holds a {type(value).__name__} ({value!r}), not an answer text or a list of them")
    if not texts:
        raise ValueError(f"{where} is an empty list; give at least one answer")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"{where}: answer {i} is a {type(text).__name__} ({text!r}), not text; write answers as strings")
        if not text.strip():
            raise ValueError(f"{where}: answer {i} is empty; give the answer's text")
    return list(texts)


def answer_texts(record: dict, answer_field: str) -> list[str]:
    """A generation record's gold answers (see :func:`answer_list`), from its ``answer_field``."""
    if answer_field not in record:
        raise KeyError(f"record has no answer field {answer_field!r} ({_fields_hint(answer_field, record)}); "
                       "set answer_field to the field that holds the answers")
    return answer_list(record[answer_field], f"answer field {answer_field!r}")
