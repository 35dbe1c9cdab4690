"""A recipe's YAML, read within bounds: its size, its nesting, the values its aliases expand to, one value per key.

PyYAML reads an alias bomb at once (the aliases share one object), but whatever walks the result
then expands it, for minutes; a deeply nested document overflows PyYAML's recursive composer; and a
key given twice in one mapping silently takes its last value.  :func:`load_yaml` reads the
document's events first (no recursion, no expansion) and refuses each of these in one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

__all__ = ["MAX_BYTES", "MAX_DEPTH", "MAX_VALUES", "load_yaml"]

MAX_BYTES = 1 << 20  # a recipe is a few KB
MAX_DEPTH = 32  # a recipe nests three levels (zo.guard.watch); lists of lists a few more
MAX_VALUES = 100_000  # scalars and collections, aliases expanded


@dataclass
class _Collection:
    """An open mapping or sequence: its anchor, how many values it holds so far, the keys seen (a mapping)."""

    anchor: str | None
    mapping: bool
    values: int = 1
    keys: dict[str, int] = field(default_factory=dict)  # key -> its line
    at_key: bool = True  # a mapping's next node is a key


def _check(text: str) -> None:
    """Raise ``ValueError`` at the first bound the document passes or the first key it repeats in a mapping."""
    sizes: dict[str, int] = {}  # anchor -> the values of its node, aliases expanded
    open_: list[_Collection] = []
    total = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):  # iterative: no depth limit of its own
        if not isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent, yaml.CollectionStartEvent, yaml.CollectionEndEvent)):
            continue
        line = event.start_mark.line + 1
        if isinstance(event, yaml.CollectionEndEvent):
            done = open_.pop()
            if done.anchor:
                sizes[done.anchor] = done.values
            if open_:
                open_[-1].values += done.values
            continue
        parent = open_[-1] if open_ else None
        if parent is not None and parent.mapping:
            if parent.at_key and isinstance(event, yaml.ScalarEvent) and event.value != "<<":  # <<: a merge, overridable
                if event.value in parent.keys:
                    raise ValueError(f"line {line}: key {event.value!r} is given twice in one mapping (first on line "
                                     f"{parent.keys[event.value]}); keep one")
                parent.keys[event.value] = line
            parent.at_key = not parent.at_key
        values = sizes.get(event.anchor, 1) if isinstance(event, yaml.AliasEvent) else 1
        total += values
        if total > MAX_VALUES:
            raise ValueError(f"line {line}: more than {MAX_VALUES} values with its aliases (*name) expanded; a recipe "
                             "holds a few dozen: write them out, or use fewer aliases")
        if isinstance(event, yaml.CollectionStartEvent):
            open_.append(_Collection(event.anchor, isinstance(event, yaml.MappingStartEvent)))
            if len(open_) > MAX_DEPTH:
                raise ValueError(f"line {line}: nested more than {MAX_DEPTH} levels deep; a recipe nests a few "
                                 "(zo: guard: watch)")
        else:
            if event.anchor:
                sizes[event.anchor] = values
            if parent is not None:
                parent.values += values


def load_yaml(text: str) -> Any:
    """The data of a YAML document; ``ValueError`` (one line) past a bound or for a repeated key,
    :class:`yaml.YAMLError` for malformed YAML."""
    if len(text) > MAX_BYTES:
        raise ValueError(f"{len(text)} characters; a recipe is at most {MAX_BYTES} (a few KB is usual): is it the "
                         "right file?")
    _check(text)
    return yaml.safe_load(text)
