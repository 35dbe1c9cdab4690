"""Every JSON and JSON-lines file zopeft writes is strict JSON (no NaN / Infinity) and reads back as written."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch
from test_cli import invoke, write_recipe

from zopeft.checkpoint import load_state, save_state
from zopeft.jsonl import dumps


def strict(text: str) -> object:
    """``text`` parsed as strict JSON: a bare NaN, Infinity or -Infinity fails the test."""
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))


def test_non_finite_numbers_are_written_as_null():
    assert dumps({"loss": math.nan, "sigma": [1.0, math.inf, -math.inf], "n": 3}) == (
        '{"loss": null, "sigma": [1.0, null, null], "n": 3}')


def test_saved_state_keeps_non_finite_numbers_exactly(tmp_path):
    state = {"best": math.inf, "low": -math.inf, "average": math.nan, "log": [{"losses": [math.nan, 1.5]}],
             "w": torch.ones(2)}
    save_state(state, tmp_path, "guard")
    strict((tmp_path / "guard.json").read_text())
    back = load_state(tmp_path, "guard")
    assert back["best"] == math.inf and back["low"] == -math.inf and math.isnan(back["average"])
    assert math.isnan(back["log"][0]["losses"][0]) and back["log"][0]["losses"][1] == 1.5
    assert torch.equal(back["w"], torch.ones(2))


def test_a_run_whose_losses_are_not_finite_writes_strict_json_that_resumes_and_replays(tmp_path, monkeypatch):
    (tmp_path / "nan_objective.py").write_text(textwrap.dedent("""
        def nan(scores, gold):
            return float("nan")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = write_recipe(tmp_path, max_steps=2, save_steps=1, zo__objective="python:nan_objective:nan",
                          load_best_model_at_end=False)  # leave the last step's adapter: replay all of the log
    trained = invoke("train", recipe)  # every step skipped: the run ends with an error line and status 1
    assert trained.exit_code == 1 and "error: no step trained" in trained.output, trained.output
    run = tmp_path / "out"
    written = [run / "trainer_log.jsonl", run / "zo_steps.jsonl"]
    written += [p for p in run.rglob("*.json") if p.name != "tokenizer_config.json"]
    for path in written:
        for line in path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]:
            strict(line)
    steps = [r for r in map(strict, (run / "zo_steps.jsonl").read_text().splitlines()) if "losses" in r]
    assert len(steps) == 2 and all(r["skipped"] and r["losses"] == [None] * len(r["losses"]) for r in steps)
    resumed = invoke("train", recipe, "max_steps=3", "resume_from_checkpoint=auto")  # reads the files back
    assert resumed.exit_code == 1 and "RESUMING" in resumed.output and "no step trained" in resumed.output, resumed.output
    replayed = invoke("replay", run, "--out", tmp_path / "replayed")
    assert replayed.exit_code == 0 and "replayed 3 steps" in replayed.output, replayed.output
    evaluated = invoke("eval", recipe, "--adapter", run, "--output", tmp_path / "eval.json")
    assert evaluated.exit_code == 0, evaluated.output
    strict((tmp_path / "eval.json").read_text())


def test_the_trainer_log_reads_back_into_the_plot(tmp_path):
    from zopeft.plot import plot_log

    log = Path(tmp_path / "trainer_log.jsonl")
    log.write_text(dumps({"step": 1, "forward_passes": 3, "loss": math.nan, "loss_ema": None}) + "\n"
                   + dumps({"step": 2, "forward_passes": 6, "loss": 2.0, "loss_ema": 2.0}) + "\n")
    assert plot_log(log, tmp_path / "curves.png").stat().st_size > 0
