"""`zopeft replay`: a ZO run rebuilt from its recipe and seed log (zo_steps.jsonl), bit for bit, without a forward pass."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from test_cli import invoke, tiny_llm_dir, write_recipe
from test_user_errors import one_error_line
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from zopeft.jsonl import checked_line


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
    one_error_line(invoke("replay", tmp_path / "out", "--out", tmp_path / "replayed"), "--out:",
                   "holds the output of a previous `zopeft replay`; pass --overwrite")


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


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A 3-step FZOO run with a checkpoint after step 2."""
    tmp = tmp_path_factory.mktemp("finished")
    assert invoke("train", write_recipe(tmp, max_steps=3, save_steps=2)).exit_code == 0
    return tmp / "out"


def step_lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "zo_steps.jsonl").read_text().splitlines()]


def write_step_lines(run: Path, records: list[dict], *, checksums: str = "kept") -> None:
    """Write the step log: each line as it is (``kept``), re-chained (``new``: a careful editor) or without its
    checksum (``none``: a log of zopeft 0.2.0)."""
    out, crc = [], 0
    for record in records:
        if checksums == "new":
            line, crc = checked_line(record, crc)
        else:
            line = json.dumps(record if checksums == "kept" else {k: v for k, v in record.items() if k != "crc"})
        out.append(line + "\n")
    (run / "zo_steps.jsonl").write_text("".join(out))


def edit_a_loss(run: Path) -> None:
    records = step_lines(run)
    records[1]["losses"][0] += 1e-3
    write_step_lines(run, records)


def a_loss_not_a_number(checksums: str):
    def damage(run: Path) -> None:
        records = step_lines(run)
        records[1]["losses"][0] = "abc"
        write_step_lines(run, records, checksums=checksums)
    return damage


def cut_before_the_checkpoint_of_a_killed_run(run: Path) -> None:
    write_step_lines(run, step_lines(run)[:1])
    (run / "adapter_model.safetensors").unlink()  # the run never finished


DAMAGE = {  # what is done to a finished run's step log, and what the one error line then says
    "a loss edited": (edit_a_loss, "line 2 does not match its checksum"),
    "a line removed": (lambda run: write_step_lines(run, step_lines(run)[::2]), "line 2 does not match its checksum"),
    "cut off mid-line": (lambda run: (run / "zo_steps.jsonl").write_bytes((run / "zo_steps.jsonl").read_bytes()[:-9]),
                         "line 3 is cut off (the file was truncated)"),
    "its last line removed": (lambda run: write_step_lines(run, step_lines(run)[:-1]),
                              "ends after step 2, but trainer_log.jsonl records step 3: the log was cut short"),
    "cut before a killed run's checkpoint": (cut_before_the_checkpoint_of_a_killed_run,
                                             "ends after step 1, but checkpoint-2 records step 2"),
    "a loss not a number, re-checksummed": (a_loss_not_a_number("new"), "line 2 (step) has losses ['abc', "),
    "a loss not a number, no checksums": (a_loss_not_a_number("none"), "line 2 (step) has losses ['abc', "),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_replay_refuses_a_damaged_log_before_writing_anything(finished_run, tmp_path, damage):
    run = shutil.copytree(finished_run, tmp_path / "run")
    change, message = DAMAGE[damage]
    change(run)
    one_error_line(invoke("replay", run, "--out", tmp_path / "replayed"), "zo_steps.jsonl", message)
    assert not (tmp_path / "replayed").exists()


def test_a_log_without_checksums_is_replayed_with_a_note(finished_run, tmp_path):
    run = shutil.copytree(finished_run, tmp_path / "run")
    write_step_lines(run, step_lines(run), checksums="none")  # as zopeft 0.2.0 wrote it
    result = invoke("replay", run, "--out", tmp_path / "replayed")
    assert result.exit_code == 0, result.output
    assert "note: zo_steps.jsonl has no line checksums (written by zopeft 0.2.0 or earlier)" in result.output
    assert "bit-identical to" in result.output


def test_the_step_log_is_strict_json_with_a_seed_and_start_and_a_checksum_per_line(finished_run):
    text = (finished_run / "zo_steps.jsonl").read_text()
    records = [json.loads(x, parse_constant=pytest.fail) for x in text.splitlines()]  # NaN / Infinity: not JSON
    assert all(len(r["crc"]) == 8 for r in records)
    assert records[0]["seed"] == 42 and isinstance(records[0]["start"], int)
    assert not any("seed" in r or "start" in r for r in records[1:])


def other_tiny_llm_dir(tmp_path: Path) -> Path:
    """A random Llama of another width with the same tokenizer."""
    torch.manual_seed(0)
    config = LlamaConfig.from_pretrained(tiny_llm_dir())
    config.hidden_size, config.intermediate_size = 32, 64
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "other")
    AutoTokenizer.from_pretrained(tiny_llm_dir()).save_pretrained(tmp_path / "other")
    return tmp_path / "other"


@pytest.mark.parametrize("edit", ["seed", "model_name_or_path"])
def test_replay_refuses_a_recipe_edited_since_the_run(finished_run, tmp_path, edit):
    run = shutil.copytree(finished_run, tmp_path / "run")
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe[edit] = 7 if edit == "seed" else str(other_tiny_llm_dir(tmp_path))
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    expected = {"seed": ("seed:", "says 7, but zo_steps.jsonl was recorded with seed 42"),
                "model_name_or_path": ("model_name_or_path:", "are not the weights zo_steps.jsonl started from")}
    one_error_line(invoke("replay", run, "--out", tmp_path / "replayed"), *expected[edit])
    assert not (tmp_path / "replayed").exists()


def test_a_run_resumed_after_a_guard_rollback_is_replayed_without_a_false_warning(tmp_path, monkeypatch):
    """The rollback's record in zo_steps.jsonl is no gap in the steps: resuming past it says nothing about replay."""
    import zopeft

    scores = iter([0.9, 0.5])  # the start, then step 2: worse, rolled back
    monkeypatch.setattr(zopeft.Guard, "observe_metrics", lambda self, metrics, **kw: self.observe_eval(next(scores)))
    keys = dict(eval_steps=2, save_steps=4, load_best_model_at_end=False,
                zo={"optimizer": "mezo", "guard": {"watch": "eval", "margin": 0.0}})
    first = invoke("train", write_recipe(tmp_path, max_steps=4, **keys))
    assert first.exit_code == 0 and "guard: rolled back" in first.output, first.output
    resumed = invoke("train", write_recipe(tmp_path, max_steps=6, resume_from_checkpoint="auto", **keys))
    assert resumed.exit_code == 0 and "RESUMING" in resumed.output, resumed.output
    assert "will not be able to rebuild" not in resumed.output
    replayed = invoke("replay", tmp_path / "out", "--out", tmp_path / "replayed")
    assert replayed.exit_code == 0 and "replayed 6 steps" in replayed.output, replayed.output
    assert "bit-identical to" in replayed.output
