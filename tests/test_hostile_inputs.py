"""Inputs that used to hang, crash or pass silently: each is one `error:` line now (or, for a run in which no
step trained, a clear last line and exit status 1)."""

from __future__ import annotations

import json

import pytest
import yaml
from test_cli import invoke, write_recipe
from test_user_errors import one_error_line

LEVELS = "\n".join(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 10))


@pytest.mark.parametrize("text,expected", [
    (f"l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n{LEVELS}\n",  # a billion laughs
     "more than 100000 values with its aliases (*name) expanded"),
    ("label_words: " + "[" * 5000 + "]" * 5000 + "\n", "line 3: nested more than 32 levels deep"),
    ("learning_rate: 0.1\nmax_steps: 3\nlearning_rate: 0.2\n",
     "line 5: key 'learning_rate' is given twice in one mapping (first on line 3); keep one"),
    ("zo:\n  eps: 0.01\n  eps: 0.001\n", "line 5: key 'eps' is given twice in one mapping (first on line 4)"),
    ("description: " + "x" * (2 << 20) + "\n", "bytes; a recipe is at most 1048576"),
    ("template: '{sentence}" + "x" * 200_000 + "'\n", "template: 200010 characters; at most 100000"),
])
def test_recipe_files_past_a_bound_are_one_line(tmp_path, text, expected):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": "x", "dataset": "sst2"}) + text)
    one_error_line(invoke("validate", path), expected)


def test_a_yaml_merge_key_may_be_overridden_and_aliases_within_bounds_are_read():
    from zopeft.recipe_yaml import load_yaml

    assert load_yaml("a: &a {x: 1, y: 2}\nb:\n  <<: *a\n  x: 3\nc: [*a, *a]\n") == {
        "a": {"x": 1, "y": 2}, "b": {"x": 3, "y": 2}, "c": [{"x": 1, "y": 2}, {"x": 1, "y": 2}]}


@pytest.mark.parametrize("override,expected", [
    ("learning_rate=true", "learning_rate: Input should be a number, not true or false"),
    ("max_steps=true", "max_steps: Input should be a number, got true"),
    ("zo.eps=false", "zo.eps: Input should be a number, got false"),
    ("zo.guard.foo=1", "zo.guard.foo: unknown key; zo.guard takes enabled, smoothing"),
    ("zo.guard.patiense=2", "zo.guard.patiense: unknown key (did you mean 'patience'?)"),
    ("label_words=[' good', ' good']", "label_words: labels 0 and 1 have the same word ' good'"),
    ("label_words={pos: ' yes', neg: ' yes'}", "label_words: labels 'pos' and 'neg' have the same word ' yes'"),
    ("label_words=" + "[" * 40 + "]" * 40, "override label_words=...: line 1: nested more than 32 levels deep"),
])
def test_values_that_passed_silently_are_refused(tmp_path, override, expected):
    one_error_line(invoke("validate", write_recipe(tmp_path), override), expected)


def test_a_null_text_field_is_refused_not_prompted_as_none(tmp_path):
    data = tmp_path / "data.jsonl"
    records = [{"sentence": f"review {i}", "label": i % 2} for i in range(8)]
    records[5]["sentence"] = None
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    recipe = write_recipe(tmp_path, dataset=str(data), eval_dataset=str(data), task="classification",
                          template="Review: {sentence}\nIt was", label_words=[" bad", " good"])
    one_error_line(invoke("train", recipe), "record 5", "field 'sentence' is null", "prompt text 'None'")
    sft = write_recipe(tmp_path, dataset=str(data), eval_dataset=str(data), task="sft")
    data.write_text("".join(json.dumps({"prompt": "Say hi", "completion": None if i == 2 else "hi"}) + "\n"
                            for i in range(4)))
    one_error_line(invoke("train", sft), "record 2", "field 'completion' is null")
    assert not (tmp_path / "out").exists()


def test_a_run_in_which_no_step_trained_ends_with_one_line_and_exit_status_1(tmp_path, monkeypatch):
    (tmp_path / "nan_objective.py").write_text("def nan(scores, gold):\n    return float('nan')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = invoke("train", write_recipe(tmp_path, max_steps=4, zo__objective="python:nan_objective:nan"))
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: no step trained: all 4 steps were skipped (non-finite loss: 4)"), last
    assert "check zo.objective's function" in last and "raise zo.eps" not in result.output
