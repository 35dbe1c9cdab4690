"""Strict JSON for the files zopeft writes, and JSON-lines logs whose lines carry a chained checksum.

JSON has no NaN or infinity, but Python's ``json`` writes them as bare ``NaN`` / ``Infinity``,
which strict readers (``jq``, JavaScript, Go, most JSON libraries) refuse.  :func:`dumps` writes a
non-finite number as ``null`` (the loss of a skipped step, a diverged probe); readers of zopeft's
logs take ``null`` where a number belongs as "not finite".

A *checked* log (``zo_steps.jsonl``) ends each line with ``"crc"``: the CRC-32 of the line's
record without it, chained from the previous line's, so a line edited, removed, inserted or
moved, and a last line cut off, are found by :func:`read_checked` before the log is used.  It
guards against damage and hand edits, not against someone who recomputes the chain.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Any

__all__ = ["CRC_KEY", "LogError", "checked_line", "dumps", "read_checked", "strict"]

CRC_KEY = "crc"


class LogError(ValueError):
    """A checked log that is damaged, edited or cut off (the message names the line)."""


def strict(value: Any) -> Any:
    """``value`` with every non-finite float (at any depth of dicts, lists and tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` that writes strict JSON: non-finite numbers become ``null``."""
    return json.dumps(strict(value), allow_nan=False, **kwargs)


def checked_line(record: dict[str, Any], previous: int) -> tuple[str, int]:
    """The JSON line of ``record`` with its chained checksum (after the line whose checksum is ``previous``)."""
    body = {k: v for k, v in strict(record).items() if k != CRC_KEY}
    crc = _crc(body, previous)
    return json.dumps({**body, CRC_KEY: f"{crc:08x}"}), crc


def _crc(body: dict[str, Any], previous: int) -> int:
    return zlib.crc32(json.dumps(body).encode(), previous)


def read_checked(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """The records of a checked log (without their checksums) and whether it had checksums at all.

    A log without any checksum (written before zopeft checked its logs) is returned as it is,
    with ``False``; :class:`LogError` names the first line that is not JSON, cut off, or does not
    match its checksum, or that lacks one where the others have it.
    """
    text = path.read_text()
    lines = text.splitlines()
    records: list[dict[str, Any]] = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            cut = n == len(lines) and not text.endswith("\n")
            problem = "is cut off (the file was truncated)" if cut else "is not JSON"
            raise LogError(f"{path}: line {n} {problem}") from None
        if not isinstance(record, dict):
            raise LogError(f"{path}: line {n} is not a JSON object")
        records.append(record)
    if not any(CRC_KEY in r for r in records):
        return records, False
    bodies = [{k: v for k, v in r.items() if k != CRC_KEY} for r in records]
    crc = 0
    for n, (record, body) in enumerate(zip(records, bodies), 1):
        if CRC_KEY not in record:
            raise LogError(f"{path}: line {n} has no checksum while the other lines have one (a line added by hand?)")
        crc = _crc(body, crc)
        if record[CRC_KEY] != f"{crc:08x}":
            raise LogError(f"{path}: line {n} does not match its checksum (the line was edited, or a line before it "
                           "was removed, added or moved)")
    return bodies, True
