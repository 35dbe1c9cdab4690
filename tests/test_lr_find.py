"""lr-find on a tiny model: successive halving within a quarter of the run, ranked on the metric, and
``learning_rate: auto`` recording its pick."""

from __future__ import annotations

import json

import pytest
import yaml
from test_cli import invoke, write_recipe

from zopeft.lr_find import grid, rungs
from zopeft.recipe import load_recipe


def test_grid_is_log_spaced_around_the_recipes_lr_and_rungs_halve_it():
    rates = grid(1e-3, 5, 100.0)
    assert rates[0] == 1e-5 and rates[2] == 1e-3 and abs(rates[-1] - 1e-1) < 1e-12
    assert rungs(7) == [7, 4, 2] and rungs(4) == [4, 2] and rungs(2) == [2]


def test_lr_find_spends_at_most_a_quarter_of_the_run_ranks_on_the_metric_and_flags_an_absurd_lr(tmp_path):
    recipe = write_recipe(tmp_path, max_steps=200, learning_rate=1e-4, finetuning_type="full",
                          zo={"optimizer": "mezo", "eps": 1e-2})
    out = tmp_path / "tuned.yaml"
    result = invoke("lr-find", str(recipe), "--span", "1000000", "--write-recipe", str(out))
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out" / "lr_find.json").read_text())
    assert data["run_forward_passes"] == 200 * 2 and data["spent"]["total"] <= 0.25 * 200 * 2
    assert data["fraction"] <= 0.25 and "lr-find spent" in result.output and "of the run's 400" in result.output
    # every step it trained is paid for: 2 forward passes a MeZO step, and the evaluations
    assert data["spent"]["training"] == 2 * sum(row["steps"] for row in data["rows"])
    assert data["rungs"] == [7, 4, 2] and data["first_rung_steps"] >= 2
    assert data["ranked_by"].startswith("eval accuracy on sst2 dev split")  # the metric, on lr-find's records
    assert data["recommended"] in [row["lr"] for row in data["rows"]]
    absurd = data["rows"][-1]  # lr 100 with full-parameter MeZO: refused as non-finite or blowing up
    assert absurd["lr"] == 100.0 and absurd["status"] == "diverged"
    lines = result.output.splitlines()
    progress = [i for i, line in enumerate(lines) if line.startswith("lr-find: lr ")]
    assert len(progress) >= 7 and progress[-1] < lines.index(next(x for x in lines if x.strip().startswith("lr ")))
    assert load_recipe(out).learning_rate == float(f"{data['recommended']:.3g}")
    assert "recommended learning_rate" in result.output


def test_learning_rate_auto_records_its_pick_and_a_resumed_run_keeps_it(tmp_path):
    keys = dict(learning_rate="auto", save_steps=50, eval_steps=50, zo={"optimizer": "mezo", "eps": 1e-2})
    result = invoke("train", write_recipe(tmp_path, max_steps=100, **keys))
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    found = next(r["lr_find"] for r in log if "lr_find" in r)
    picked = float(f"{found['recommended']:.3g}")
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert (saved["learning_rate"], saved["lr_find_pick"]) == ("auto", picked)  # found by lr-find, and what it found
    assert f"learning_rate: auto: {picked:g} (lr-find spent" in result.output
    assert f"+ {found['spent']['total']} of lr-find (learning_rate: auto: {picked:g})" in result.output
    assert found["spent"]["total"] <= 0.25 * 100 * 2 and "s lr-find + " in result.output  # its time, apart
    assert all(r["lr"] == [picked] for r in map(json.loads, (out / "zo_steps.jsonl").read_text().splitlines()))
    # the run reports on the evaluation records lr-find did not rank on
    assert "less the 4 lr-find ranks learning rates on" in result.output
    scored = invoke("eval", out / "recipe.yaml", "--adapter", out)  # the run's recipe: the records the run reported
    assert scored.exit_code == 0, scored.output
    reported = next(line for line in result.output.splitlines() if line.startswith("eval on "))
    assert reported == f"eval on {json.loads((out / 'eval_dev.json').read_text())['evaluated_on']}"
    switched = invoke("train", write_recipe(tmp_path, max_steps=104, resume_from_checkpoint="auto",
                                            **{**keys, "learning_rate": picked}))
    assert switched.exit_code == 2 and "was trained with different learning_rate;" in switched.output
    resumed = invoke("train", write_recipe(tmp_path, max_steps=104, resume_from_checkpoint="auto", **keys))
    assert resumed.exit_code == 0, resumed.output
    assert f"learning_rate: auto: {picked:g}, picked by lr-find when this run started" in resumed.output
    assert "lr-find spent" not in resumed.output and "best model: so far the adapter of step" in resumed.output
    assert yaml.safe_load((out / "recipe.yaml").read_text())["lr_find_pick"] == picked


def test_learning_rate_auto_under_torchrun_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    import contextlib

    import zopeft.runner

    monkeypatch.setattr(zopeft.runner, "distributed_session", lambda: contextlib.nullcontext((0, 2)))
    monkeypatch.setattr(zopeft.runner, "load_model", lambda *a: pytest.fail("the model was loaded"))
    result = invoke("train", write_recipe(tmp_path, learning_rate="auto", zo={"optimizer": "mezo"}))
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1].startswith("error: learning_rate: auto runs lr-find in one process")


def test_learning_rate_auto_pays_for_a_generation_evaluation_as_prefill_and_decoding(tmp_path):
    from test_generation import generation_recipe
    from test_user_errors import one_error_line

    keys = dict(max_eval_samples=16, max_new_tokens=16, learning_rate="auto", eval_steps=50,
                zo={"optimizer": "mezo", "eps": 1e-2})
    result = invoke("train", generation_recipe(tmp_path, max_steps=30, **keys))
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (tmp_path / "out" / "trainer_log.jsonl").read_text().splitlines()]
    found = next(r["lr_find"] for r in log if "lr_find" in r)
    evaluations = 1 + sum(len(row["evaluations"]) for row in found["rows"])
    # 4 records a batch of 4: the teacher-forced loss, the prefill and the cached decoding (one at most) per record
    assert found["spent"]["evaluation"] <= 3 * evaluations
    (tmp_path / "short").mkdir()
    short = invoke("train", generation_recipe(tmp_path / "short", max_steps=2, **keys))
    line = one_error_line(short, "learning_rate: auto:", "raise max_steps, or give learning_rate a number")
    assert "--budget" not in line


def test_learning_rate_auto_warns_when_no_learning_rate_beat_the_start(tmp_path, monkeypatch):
    """RTE's lr-find (README): every learning rate level with the start on its records; the pick barely trains."""
    import zopeft.auto_lr
    from zopeft.lr_find import LRFindResult

    found = LRFindResult(rows=[{"lr": 1e-5, "status": "ok"}, {"lr": 1e-1, "status": "ok"}], recommended=1e-5,
                         ranked_by="eval accuracy on 32 records", start={"value": 0.5625}, rungs=[2],
                         first_rung_steps=3, spent={"training": 54, "evaluation": 4, "eps_check": 0, "total": 58},
                         run_forward_passes=720, budget=0.25, eps_check=None, improved=False)
    monkeypatch.setattr(zopeft.auto_lr, "search", lambda *args, **kwargs: found)
    lines: list[str] = []
    recipe = load_recipe(write_recipe(tmp_path, learning_rate="auto"))
    picked = zopeft.auto_lr.find_learning_rate(recipe, None, None, None, None, None, lines.append, False)
    assert picked.recipe.lr_find_pick == 1e-5
    assert lines[0].endswith("; no learning rate beat the start)")
    assert lines[1].startswith("warning: learning_rate: auto: no learning rate lr-find tried beat the start (eval "
                               "accuracy on 32 records)") and "set learning_rate" in lines[1]
    found.improved = True
    lines.clear()
    zopeft.auto_lr.find_learning_rate(recipe, None, None, None, None, None, lines.append, False)
    assert len(lines) == 1 and "beat the start" not in lines[0]
