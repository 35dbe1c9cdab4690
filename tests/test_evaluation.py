"""A user's own 6-class CSV through the CLI: honest evaluation, per-class results, what validate shows, costs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_cli import invoke, tiny_llm_dir, write_recipe
from test_user_errors import one_error_line
from transformers import AutoTokenizer

from zopeft.metrics import collapse_warning, majority_note
from zopeft.resolved import label_word_tokens

WORDS = {"ABBR": " abbr", "DESC": " description", "ENTY": " entity", "HUM": " human", "LOC": " location",
         "NUM": " numeric value"}  # " abbr" and " numeric value" are two tokens each for SmolLM2's tokenizer
TEMPLATE = r"Q: {question}\nA:"  # as typed on a command line: \n is a newline


@pytest.fixture
def user_csv(tmp_path) -> Path:
    """60 rows sorted by label, no header row, the label column called coarse_label."""
    path = tmp_path / "mine.csv"
    path.write_text("".join(f"what is {label.lower()} number {i}?,{label}\n" for label in WORDS for i in range(10)))
    return write_recipe(tmp_path, dataset=str(path), task="classification", column_names="question,coarse_label",
                        label_field="coarse_label", label_words=WORDS, template="Question: {question}\nAnswer:",
                        max_steps=2)


def test_validate_shows_derived_values_tokens_prompt_and_the_held_out_slice(user_csv):
    result = invoke("validate", user_csv, f"template={TEMPLATE}")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "\nnum_labels: 6\n" in out  # derived from the 6 label words
    assert '#   template: "Q: {question}\\nA:"\n' in out
    assert "#     | Q: what is abbr number 0?\n#     | A:\n" in out  # the first training record
    assert "#   label words: 6 classes, label_word_scoring: sum\n" in out
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm_dir())
    for label, word in WORDS.items():
        pieces = [tokenizer.decode([i]) for i in tokenizer(word, add_special_tokens=False)["input_ids"]]
        count = f"{len(pieces)} token{'s' * (len(pieces) > 1)}"
        assert f"#     {label} -> {word!r}: {count} {' '.join(map(repr, pieces))}\n" in out
    assert "#   eval: mine.csv, held out by val_size 0.1 with seed 42 (6 records)\n" in out
    assert "#   train: mine.csv (54 records; 6 more held out for evaluation)\n" in out
    assert re.search(r"#     labels: ABBR: \d+, DESC: \d+, ENTY: \d+, HUM: \d+, LOC: \d+, NUM: \d+\n", out)
    assert "#   note: val_size: mine.csv has no dev or validation split and no eval_dataset is given: 6 of its 60 records" in out
    assert "#     ABBR -> ' abbr': 2 tokens ' ab' 'br'\n" in out
    first = invoke("validate", user_csv, "label_word_scoring=first").output
    assert "#     NUM -> ' numeric value': 2 tokens ' numeric' ' value', scored on the first: ' numeric'\n" in first


def test_label_word_tokens_are_the_fast_tokenizers():
    words = [" abbreviation", " supercalifragilistic", " not entailment", " Ünïcode"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm_dir())
    assert label_word_tokens(tiny_llm_dir(), words) == [
        [tokenizer.decode([i]) for i in tokenizer(w, add_special_tokens=False)["input_ids"]] for w in words]


def test_validate_checks_field_names_against_the_first_record(user_csv, tmp_path):
    one_error_line(invoke("validate", user_csv, "label_field=label"),
                   "dataset: record 0 of", "no label field 'label'", "did you mean 'coarse_label'?")
    one_error_line(invoke("validate", user_csv, "column_names="),  # without column_names the first row is the header
                   "template field 'question' is not in the record")
    one_error_line(invoke("validate", user_csv, "num_labels=2"), "num_labels: 2, but label_words name 6 labels")


def test_train_and_eval_on_a_users_csv_hold_out_and_report_per_class(user_csv, tmp_path, monkeypatch):
    import zopeft.runner
    from zopeft.tasks import ClassificationTask

    evaluate = ClassificationTask.evaluate
    now = [0.0]  # the run's clock: 1 ms per reading, and a second per evaluation (no real time is measured)

    def clock() -> float:
        now[0] += 1e-3
        return now[0]

    def slow(self, *args, **kwargs):  # each evaluation takes a second more: the time line must say where it went
        now[0] += 1.0
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(zopeft.runner, "time", SimpleNamespace(perf_counter=clock))
    monkeypatch.setattr(ClassificationTask, "evaluate", slow)
    threads = torch.get_num_threads()
    # eval_steps: 1: an evaluation between the start and the end (auto makes none: 6 records of 6 multi-token label
    # words, 36 forward passes, cost more than a quarter of the 2 steps' 24)
    result = invoke("train", user_csv, "zo.optimizer=adamw", "learning_rate=1e-3", "eval_steps=1",
                    "--threads", "1")
    monkeypatch.undo()
    assert result.exit_code == 0, result.output
    out = result.output
    assert "note: val_size: mine.csv has no dev or validation split" in out and "| torch threads: 1\n" in out
    assert "eval on mine.csv, held out by val_size 0.1 with seed 42 (6 records)\n" in out
    assert torch.get_num_threads() == threads  # the process's setting is restored after the run
    assert "done: 2 steps, 2 forward + 2 backward passes = 6 forward-pass equivalents (a backward ≈ 2 forwards)" in out
    wall, training, evaluation, rest = map(float, re.search(
        r"time: ([\d.]+)s wall = ([\d.]+)s training \+ ([\d.]+)s evaluation \+ ([\d.]+)s loading", out).groups())
    assert evaluation >= 3.0 and 0 < training < 1.0 and rest > 0  # start, step 1, end; apart
    assert wall == pytest.approx(training + evaluation + rest, abs=0.3)  # each printed to a tenth of a second

    log = [json.loads(line) for line in (tmp_path / "out" / "trainer_log.jsonl").read_text().splitlines()]
    steps, evals = [r for r in log if "loss" in r], [r for r in log if "eval_accuracy" in r]
    assert [r["forward_equivalents"] for r in steps] == [3, 6]  # forward + backward (= 2 forwards) per step
    assert steps[0]["loss_ema"] == steps[0]["loss"] and steps[1]["loss_ema"] == pytest.approx(
        0.9 * steps[0]["loss"] + 0.1 * steps[1]["loss"])
    assert [sorted(r["eval_predicted"]) for r in evals] == [sorted(WORDS)] * 3  # the predicted-label distribution
    assert all(sum(r["eval_predicted"].values()) == r["eval_n"] == 6 for r in evals)

    evaluated = invoke("eval", user_csv, "--adapter", tmp_path / "out")
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads((tmp_path / "out" / "eval_dev.json").read_text())
    assert report["evaluated_on"] == "mine.csv, held out by val_size 0.1 with seed 42 (6 records)"
    assert list(report["per_class"]) == list(WORDS) and len(report["confusion"]) == 6
    assert sum(row["support"] for row in report["per_class"].values()) == report["n"] == 6
    assert report["accuracy"] == pytest.approx(evals[-1]["eval_accuracy"]) and "macro_f1" in report
    assert ("warning: label" in evaluated.output) == (collapse_warning(report) is not None)
    noted = majority_note(report)  # the adapter left, on the records the run ended with
    assert noted is None or (f"note: {noted}\n" in evaluated.output and f"note: {noted}\n" in out)
    assert ("note: always answering" in evaluated.output + out) == (noted is not None)
    lines = evaluated.output.splitlines()
    assert lines[0] == "eval on mine.csv, held out by val_size 0.1 with seed 42 (6 records)"
    assert lines[1].startswith("accuracy ") and "macro-F1 " in lines[1] and lines[1].endswith("n 6")
    assert lines[2].split() == ["label", "precision", "recall", "f1", "support", "predicted"]
    assert lines[3].startswith("ABBR (' abbr')") and lines[9] == "confusion (rows: gold, columns: predicted):"
    trained_on = invoke("eval", user_csv, "--adapter", tmp_path / "out", "--split", "train")
    assert "eval on mine.csv (54 records; 6 more held out for evaluation)" in trained_on.output


def test_eval_split_of_a_local_file_without_evaluation_records_is_refused(user_csv):
    one_error_line(invoke("eval", user_csv, "val_size=0"),
                   "split dev: mine.csv has no evaluation records (val_size: 0 and no eval_dataset)",
                   "evaluate the train split")
    one_error_line(invoke("eval", user_csv, "--split", "test"), "split: 'test' is not one of dev, train")
    one_error_line(invoke("eval", user_csv, "--threads", "0"), "threads: Input should be greater than or equal to 1")


def test_training_without_evaluation_records_says_so(user_csv, tmp_path):
    result = invoke("train", user_csv, "val_size=0", "max_steps=1")
    assert result.exit_code == 0, result.output
    assert "note: val_size: 0 and no eval_dataset: mine.csv is trained on in full and nothing is evaluated" in result.output
    assert "train on mine.csv (60 records)\neval: none\n" in result.output and "eval on" not in result.output
    log = [json.loads(line) for line in (tmp_path / "out" / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1] and (tmp_path / "out" / "training_curves.png").is_file()
