"""Rebuild the bundled data subsets from the shared copies of SST-2, RTE, BoolQ and SQuAD.

Usage: ``python zopeft/bundled_data/make_subsets.py [SOURCE_DIR]`` (default ``/work/shared/data``).
Rows are copied byte for byte; a subset is the first N rows after ``random.Random(0).shuffle``
of the data rows (the header row of a TSV stays first).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# (source file, bundled file, rows to keep after a seed-0 shuffle; None = all rows in their order)
SUBSETS = [
    ("sst2/train.tsv", "sst2/train.tsv", 2000),
    ("sst2/dev.tsv", "sst2/dev.tsv", None),
    ("rte/train.tsv", "rte/train.tsv", 1000),
    ("rte/dev.tsv", "rte/dev.tsv", None),
    ("boolq/train32.jsonl", "boolq/train.jsonl", None),
    ("boolq/val.jsonl", "boolq/dev.jsonl", 300),
    ("squad/train.jsonl", "squad/train.jsonl", None),
    ("squad/dev.jsonl", "squad/dev.jsonl", None),
]


def subset(src: Path, dst: Path, n: int | None, seed: int = 0) -> int:
    """Copy ``n`` seed-shuffled data rows of ``src`` (all rows, unshuffled, if ``n`` is None) to ``dst``."""
    lines = src.read_bytes().splitlines(keepends=True)
    header, rows = (lines[:1], lines[1:]) if src.suffix == ".tsv" else ([], lines)
    if n is not None:
        random.Random(seed).shuffle(rows)
        rows = rows[:n]
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(b"".join(header + rows))
    return len(rows)


def main(source: Path) -> None:
    for src, dst, n in SUBSETS:
        rows = subset(source / src, HERE / dst, n)
        print(f"{dst}: {rows} rows")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data"))
