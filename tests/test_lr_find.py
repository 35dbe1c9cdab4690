"""zopeft lr-find on a tiny model: a value from its grid, an absurd learning rate flagged."""

from __future__ import annotations

import json

from test_cli import invoke, write_recipe

from zopeft.lr_find import grid
from zopeft.recipe import load_recipe


def test_grid_is_log_spaced_around_the_recipes_lr():
    rates = grid(1e-3, 5, 100.0)
    assert rates[0] == 1e-5 and rates[2] == 1e-3 and abs(rates[-1] - 1e-1) < 1e-12


def test_lr_find_recommends_a_grid_value_and_flags_an_absurd_lr(tmp_path):
    recipe = write_recipe(tmp_path, max_steps=40, learning_rate=1e-4, per_device_train_batch_size=4,
                          finetuning_type="full", zo={"optimizer": "mezo", "eps": 1e-2})
    out = tmp_path / "tuned.yaml"
    result = invoke("lr-find", str(recipe), "--points", "3", "--span", "1000000", "--fraction", "0.1",
                    "--write-recipe", str(out))
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out" / "lr_find.json").read_text())
    lrs = [row["lr"] for row in data["rows"]]
    assert data["recommended"] in lrs and data["forward_passes_per_run"] == 4 * 2
    absurd = data["rows"][-1]
    # lr 100 with full-parameter MeZO: the updates are refused as non-finite or the loss blows up
    assert absurd["lr"] == 100.0 and absurd["status"] in ("diverged", "stalled")
    assert data["rows"][1]["status"] == "ok" and data["rows"][1]["change"] < 0
    assert load_recipe(out).learning_rate == float(f"{data['recommended']:.3g}")
    assert "recommended learning_rate" in result.output
    # first, zo.eps against the rounding of the forward pass (fp32 at 1e-2: ok)
    assert data["eps_check"]["ok"] and data["eps_check"]["eps"] == 1e-2 and "eps check: zo.eps=0.01 ok" in result.output
