"""Record loading: the bundled subsets, every local file format, and the error messages."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from zopeft.data import BUILTIN_DATASETS, BUNDLED_DIR, load_records
from zopeft.tasks import TASK_KINDS, build_task

SHARED = Path("/work/shared/data")


@pytest.mark.parametrize(
    ("name", "split", "rows", "fields"),
    [
        ("sst2", "train", 2000, {"sentence", "label"}),
        ("sst2", "dev", 872, {"sentence", "label"}),
        ("rte", "train", 1000, {"sentence1", "sentence2", "label", "idx"}),
        ("rte", "dev", 277, {"sentence1", "sentence2", "label", "idx"}),
        ("boolq", "train", 32, {"question", "passage", "label", "idx"}),
        ("boolq", "dev", 300, {"question", "passage", "label", "idx"}),
    ],
)
def test_builtin_splits(name: str, split: str, rows: int, fields: set[str]) -> None:
    records = load_records(name, split)
    assert len(records) == rows
    assert all(set(r) == fields for r in records)
    labels = {r["label"] for r in records}
    if name == "boolq":
        assert all(isinstance(r["label"], bool) for r in records) and labels == {True, False}
    else:
        assert all(type(r["label"]) is int for r in records) and labels == {0, 1}
    text = "sentence" if name == "sst2" else "sentence1" if name == "rte" else "passage"
    assert all(isinstance(r[text], str) and r[text].strip() for r in records)


def test_tsv_quoting_bare_and_csv_quoted_cells() -> None:
    # RTE's TSV has pandas-style quoted cells ("... ""Devils and Dust"", ..."): they are unquoted.
    rte = load_records("rte", "train")
    devils = next(r for r in rte if "Devils and Dust" in r["sentence1"])
    assert '"Devils and Dust",' in devils["sentence1"] and not devils["sentence1"].startswith('"')
    assert not any('""' in r["sentence1"] + r["sentence2"] for r in rte)
    assert load_records("sst2", "dev")[0] == {"sentence": "it 's a charming and often affecting journey . ", "label": 1}


def test_builtin_defaults_build_every_kind_that_applies() -> None:
    for name, spec in BUILTIN_DATASETS.items():
        assert all((BUNDLED_DIR / f).is_file() for f in spec["files"].values())
        settings = dict(spec["task"])
        kind = settings.pop("kind")
        assert kind in TASK_KINDS
        record = load_records(name, "dev")[0]
        settings["template"].format_map(record)  # every template field is a record field
        assert all(f in record for f in settings["text_fields"])
        assert build_task(kind, **settings).kind == kind
        assert build_task("sequence_classification", **settings).kind == "sequence_classification"


def test_bundled_size_is_small() -> None:
    # SQuAD's 1,500 questions carry their paragraphs (1.55 MB); the classification subsets 0.86 MB
    assert sum(p.stat().st_size for p in BUNDLED_DIR.rglob("*") if p.is_file()) < 2_500_000


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs the shared source data")
def test_make_subsets_reproduces_the_bundled_files(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_subsets", BUNDLED_DIR / "make_subsets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for src, dst, n in module.SUBSETS:
        rows = module.subset(SHARED / src, tmp_path / dst, n)
        assert (tmp_path / dst).read_bytes() == (BUNDLED_DIR / dst).read_bytes(), dst
        assert rows == (n if n is not None else len((SHARED / src).read_bytes().splitlines()) - (dst.endswith(".tsv")))


# ----- local files ---------------------------------------------------------------------------
ROWS = [
    {"text": 'He said "hi", then left', "label": 1, "score": 0.5},
    {"text": "plain", "label": 0, "score": 1.5},
    {"text": "it's 3", "label": 1, "score": 2.0},
]


def test_jsonl_and_json(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    (tmp_path / "b.json").write_text(json.dumps(ROWS))
    (tmp_path / "c.json").write_text(json.dumps({"data": ROWS, "version": 1}))
    for name in ("a.jsonl", "b.json", "c.json"):
        assert load_records(tmp_path / name) == ROWS
    assert load_records(str(tmp_path / "a.jsonl")) == ROWS  # str paths too


def test_csv_and_tsv(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text('text,label,note\n"He said ""hi"", then left",1,x\nplain,0,7\n')
    # TSV: a bare quote is text (one row per line), a wholly quoted cell is CSV-unquoted.
    (tmp_path / "a.tsv").write_text('text\tlabel\tnote\n"He said hi, then left\t1\tx\n"a ""b"" c"\t0\t7\n"x" y "z"\t1\t8\n')
    csv_rows, tsv_rows = load_records(tmp_path / "a.csv"), load_records(tmp_path / "a.tsv")
    assert csv_rows == [{"text": 'He said "hi", then left', "label": 1, "note": "x"}, {"text": "plain", "label": 0, "note": "7"}]
    assert [r["text"] for r in tsv_rows] == ['"He said hi, then left', 'a "b" c', '"x" y "z"']
    assert [r["label"] for r in tsv_rows] == [1, 0, 1] and [r["note"] for r in tsv_rows] == ["x", "7", "8"]


def test_datasets_directory(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "dev": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(tmp_path / "dd")
    assert load_records(tmp_path / "dd") == ROWS
    assert load_records(tmp_path / "dd", "dev") == ROWS[:1]
    with pytest.raises(ValueError, match="did you mean 'dev'"):
        load_records(tmp_path / "dd", "deb")


def test_a_directory_without_the_datasets_package_says_what_to_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed (an import of it raises ImportError)
    (tmp_path / "dd").mkdir()
    with pytest.raises(ImportError, match=r"dd is a directory: reading it needs the `datasets` package \(pip install"):
        load_records(tmp_path / "dd")
    from test_cli import invoke, write_recipe  # the CLI: one error line, no traceback

    result = invoke("validate", write_recipe(tmp_path, dataset=str(tmp_path / "dd"), task="classification"))
    assert result.exit_code == 2 and result.output.strip().splitlines() == [
        f"error: {tmp_path / 'dd'} is a directory: reading it needs the `datasets` package (pip install 'zopeft[datasets]')"]


# ----- errors --------------------------------------------------------------------------------
def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError) as err:
        load_records(missing)
    assert str(missing) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="data/train.csv"):
        load_records("data/train.csv")


def test_unknown_builtin_suggests_a_name() -> None:
    with pytest.raises(ValueError) as err:
        load_records("sst")
    message = str(err.value)
    assert "did you mean 'sst2'" in message and all(name in message for name in BUILTIN_DATASETS)
    with pytest.raises(ValueError, match="did you mean 'boolq'"):
        load_records("bool_q", "dev")


def test_bad_split_lists_splits() -> None:
    with pytest.raises(ValueError, match=r"train, dev.*did you mean 'dev'"):
        load_records("rte", "dve")
    with pytest.raises(ValueError, match="train, dev"):
        load_records("rte")


def test_malformed_files(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_records(tmp_path / "bad.jsonl")
    (tmp_path / "bad.tsv").write_text("a\tb\n1\t2\n3\t4\t5\n")
    with pytest.raises(ValueError, match=r"bad.tsv:3: expected 2 fields"):
        load_records(tmp_path / "bad.tsv")
    (tmp_path / "bad.json").write_text('{"rows": []}')
    with pytest.raises(ValueError, match="list of objects"):
        load_records(tmp_path / "bad.json")
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported data format"):
        load_records(tmp_path / "x.parquet")
