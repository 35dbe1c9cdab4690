"""`zopeft replay`: a ZO run rebuilt from its recipe and seed log (zo_steps.jsonl), bit for bit, without a forward pass."""

from __future__ import annotations

import json

import pytest
import yaml
from test_cli import invoke, write_recipe
from test_user_errors import one_error_line


@pytest.mark.parametrize("optimizer", ["mezo", "fzoo", "adamezo", "hizoo"])
def test_replay_rebuilds_the_adapter_bit_for_bit(tmp_path, optimizer):
    # gradient accumulation, a decaying schedule and weight decay: every number of a step record matters
    path = write_recipe(tmp_path, max_steps=3, gradient_accumulation_steps=2, lr_scheduler_type="linear",
                        weight_decay=0.01, zo__optimizer=optimizer, zo__window=2,
                        load_best_model_at_end=False)  # the last step's adapter (test_best_model: the best's)
    assert invoke("train", path).exit_code == 0
    records = [json.loads(x) for x in (tmp_path / "out" / "zo_steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[0]["lr"][0] > records[2]["lr"][0] > 0 and all(len(r["losses"]) >= 2 for r in records)
    result = invoke("replay", tmp_path / "out", "--out", tmp_path / "replayed")
    assert result.exit_code == 0, result.output
    assert "replayed 3 steps" in result.output and "bit-identical to" in result.output
    assert (tmp_path / "replayed" / "adapter_config.json").exists()
    one_error_line(invoke("replay", tmp_path / "out", "--out", tmp_path / "replayed"), "--out:", "never replaced")


def test_replay_refuses_first_order_runs_and_incomplete_logs(tmp_path):
    recipe = yaml.safe_load(write_recipe(tmp_path).read_text())
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump({**recipe, "zo": {"optimizer": "adamw"}}))
    one_error_line(invoke("replay", run, "--out", tmp_path / "x"), "zo.optimizer:", "first-order", "only ZO runs can be replayed")
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (run / "zo_steps.jsonl").write_text('{"step": 0, "lr": [0.01], "losses": [1.0, 1.1]}\n'
                                        '{"step": 2, "lr": [0.01], "losses": [1.0, 1.1]}\n')
    one_error_line(invoke("replay", run, "--out", tmp_path / "x"), "zo_steps.jsonl", "cannot be replayed")
    one_error_line(invoke("replay", tmp_path / "nowhere", "--out", tmp_path / "x"), "no recipe.yaml")
