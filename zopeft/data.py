"""Loading records: the bundled datasets (``sst2``, ``rte``, ``boolq``, ``squad``) or local data files.

A record is a plain ``dict`` (one row / JSON object).  :data:`BUILTIN_DATASETS` also carries each
bundled dataset's default task settings, so a recipe can say just ``dataset: sst2``.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

from .hints import did_you_mean

__all__ = ["BUILTIN_DATASETS", "BUNDLED_DIR", "DATA_FORMATS", "TABLE_FORMATS", "load_records", "named_splits"]

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled_data"
DATA_FORMATS = (".jsonl", ".json", ".csv", ".tsv")
TABLE_FORMATS = (".csv", ".tsv")  # the formats whose columns column_names can name

# name -> {"files": split -> file under BUNDLED_DIR, "task": build_task kind + keyword defaults}
BUILTIN_DATASETS: dict[str, dict[str, Any]] = {
    "sst2": {
        "files": {"train": "sst2/train.tsv", "dev": "sst2/dev.tsv"},
        "task": {
            "kind": "classification",
            "template": "Review: {sentence}\nSentiment:",
            "label_words": {0: " negative", 1: " positive"},
            "text_fields": ["sentence"],
        },
    },
    "rte": {
        "files": {"train": "rte/train.tsv", "dev": "rte/dev.tsv"},
        "task": {
            "kind": "classification",
            "template": "{sentence1}\nQuestion: {sentence2} True or False?\nAnswer:",
            "label_words": {0: " True", 1: " False"},  # label 0 = entailment
            "text_fields": ["sentence1", "sentence2"],
        },
    },
    "boolq": {
        "files": {"train": "boolq/train.jsonl", "dev": "boolq/dev.jsonl"},
        "task": {
            "kind": "classification",
            "template": "{passage}\nQuestion: {question}?\nAnswer:",
            "label_words": {0: " No", 1: " Yes"},  # JSON false / true; the tasks map booleans to 0 / 1
            "text_fields": ["question", "passage"],
        },
    },
    "squad": {
        "files": {"train": "squad/train.jsonl", "dev": "squad/dev.jsonl"},
        "task": {
            "kind": "generation",
            "template": "{context}\nQuestion: {question}\nAnswer:",  # the gold answers: answer_field "answers"
            "text_fields": ["question", "context"],
        },
    },
}

_INT = re.compile(r"-?\d+")


def named_splits(source: str | Path | None) -> tuple[str, ...]:
    """The splits of a bundled dataset, of a directory saved by ``DatasetDict.save_to_disk`` (listed in its
    ``dataset_dict.json``) or of a data folder that ``datasets.load_dataset`` reads (``train.jsonl``,
    ``validation.jsonl``, ...; needs the ``datasets`` package); ``()`` for a file or anything else."""
    if isinstance(source, str) and source in BUILTIN_DATASETS:
        return tuple(BUILTIN_DATASETS[source]["files"])
    if not isinstance(source, (str, Path)) or not Path(source).expanduser().is_dir():
        return ()
    path = Path(source).expanduser()
    if (path / "dataset_dict.json").is_file():
        try:
            splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        except (OSError, ValueError, KeyError, TypeError):
            return ()
        return tuple(splits) if isinstance(splits, list) and all(isinstance(s, str) for s in splits) else ()
    if (path / "state.json").is_file():  # one saved Dataset: no splits
        return ()
    try:
        import datasets
    except ImportError:
        return ()  # load_records says what to install
    try:
        return tuple(datasets.get_dataset_split_names(str(path)))
    except Exception:  # noqa: BLE001 - a folder datasets cannot read: load_records reports why
        return ()


def load_records(source: str | Path, split: str | None = None, column_names: list[str] | None = None) -> list[dict]:
    """Records of a bundled dataset's ``split`` (``train``/``dev``), or of a local data file or directory.

    Files: ``.jsonl`` (one object a line), ``.json`` (a list of objects or ``{"data": [...]}``),
    ``.csv`` and ``.tsv`` (a header row names the columns; without one, ``column_names`` names
    them, as in HF ``datasets``' CSV loader).  A TSV row is one line (``csv.QUOTE_NONE``: bare quotes are
    text); a cell that is wholly CSV-quoted (``"a ""b"" c"``, as in the RTE files) is unquoted.
    CSV/TSV columns whose every cell is an integer become ``int``.  A directory is read with the optional ``datasets`` library
    (``load_from_disk`` output or anything ``load_dataset`` reads offline; ``split`` defaults to train;
    :func:`named_splits` lists a directory's).
    """
    if isinstance(source, str) and source in BUILTIN_DATASETS:
        return _load_builtin(source, split)
    path = Path(source).expanduser()
    if column_names is not None and path.suffix.lower() not in TABLE_FORMATS:
        raise ValueError(f"column_names: names the columns of a .csv/.tsv file without a header row; {path.name} is not one")
    if path.is_file():
        return _load_file(path, column_names)
    if path.is_dir():
        return _load_with_datasets(path, split)
    text = str(source)
    if path.suffix.lower() in DATA_FORMATS or "/" in text or "\\" in text or text.startswith((".", "~")):
        raise FileNotFoundError(f"data file not found: {path}")
    raise ValueError(
        f"unknown dataset {text!r}{did_you_mean(text, BUILTIN_DATASETS)}: built-in datasets are "
        f"{', '.join(BUILTIN_DATASETS)} (or give the path of a {'/'.join(DATA_FORMATS)} file)"
    )


def _load_builtin(name: str, split: str | None) -> list[dict]:
    files = BUILTIN_DATASETS[name]["files"]
    if split not in files:
        raise ValueError(
            f"dataset {name!r} has splits {', '.join(files)}, got split={split!r}{did_you_mean(split, files)}"
        )
    return _load_file(BUNDLED_DIR / files[split])


def _load_file(path: Path, column_names: list[str] | None = None) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = _read_jsonl(path)
    elif suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        records = data["data"] if isinstance(data, dict) and "data" in data else data
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of objects or {{\"data\": [...]}}")
    elif suffix in (".csv", ".tsv"):
        records = _read_table(path, tab=suffix == ".tsv", names=column_names)
    else:
        raise ValueError(f"{path}: unsupported data format {suffix!r} (supported: {', '.join(DATA_FORMATS)})")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: record {i} is a {type(record).__name__}, expected an object")
    return records


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
    return records


def _unquote(cell: str) -> str:
    """A CSV-quoted TSV cell (``"a ""b"" c"``, as pandas writes them) as its text; other cells unchanged."""
    if len(cell) >= 2 and cell[0] == cell[-1] == '"' and '"' not in cell[1:-1].replace('""', ""):
        return cell[1:-1].replace('""', '"')
    return cell


def _read_table(path: Path, tab: bool, names: list[str] | None = None) -> list[dict]:
    """The rows of a CSV/TSV file; ``names``: the columns of a file without a header row."""
    options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if tab else {}
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, fieldnames=names, **options)
        records = []
        for record in reader:
            if None in record or None in record.values():
                named = f" (column_names: {', '.join(names)})" if names else ""
                raise ValueError(f"{path}:{reader.line_num}: expected {len(reader.fieldnames)} fields{named}")
            records.append({k: _unquote(v) for k, v in record.items()} if tab else record)
    for column in reader.fieldnames or []:
        if records and all(_INT.fullmatch(r[column]) for r in records):
            for r in records:
                r[column] = int(r[column])
    return records


def _load_with_datasets(path: Path, split: str | None) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{path} is a directory: reading it needs the `datasets` package (pip install 'zopeft[datasets]')") from None
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            split = split or "train"
            if split not in data:
                raise ValueError(f"{path} has splits {', '.join(data)}, got split={split!r}{did_you_mean(split, data)}")
            data = data[split]
    else:
        data = datasets.load_dataset(str(path), split=split or "train")
    return data.to_list()
