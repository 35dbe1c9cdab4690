"""Files zopeft did not write are never replaced or removed, and a run that failed before training can be retried.

The cases a hostile or careless user produces: an output_dir that is a project folder (its README.md and
recipe.yaml), result files pointed at existing files or directories, and runs that fail after they started.
"""

from __future__ import annotations

import json

from test_cli import invoke, write_recipe
from test_user_errors import one_error_line, snapshot

from zopeft.ownership import MANIFEST_NAME, manifest


def test_a_folder_of_user_files_is_refused_and_overwrite_writes_beside_them_never_over_them(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("# my project\n")
    recipe = write_recipe(project, output_dir=str(project), max_steps=2)  # project/recipe.yaml, the user's own
    recipe.write_text("# my comments\n" + recipe.read_text())
    before = snapshot(project)
    one_error_line(invoke("train", recipe), "output_dir:", "holds files zopeft did not write (README.md, recipe.yaml)",
                   "and no zopeft run", "--overwrite")
    one_error_line(invoke("train", recipe, "--overwrite"), "output_dir:", "holds recipe.yaml, which zopeft did not write",
                   "never replaces them")
    assert snapshot(project) == before

    mine = recipe.rename(project / "my-recipe.yaml")  # the user's recipe under a name a run does not write
    result = invoke("train", mine, "--overwrite")
    assert result.exit_code == 0, result.output
    assert "kept README.md, which zopeft did not write" in result.output
    assert (project / "README.md").read_text() == "# my project\n" and mine.read_bytes() == before["recipe.yaml"]
    assert (project / "adapter_model.safetensors").exists() and "README.md" not in manifest(project)["names"]
    again = invoke("train", mine, "--overwrite")  # starting over removes zopeft's files alone
    assert again.exit_code == 0, again.output
    removed = next(line for line in again.output.splitlines() if "removed the previous run's" in line)
    assert "README.md" not in removed and "my-recipe.yaml" not in removed and "recipe.yaml" in removed
    assert (project / "README.md").read_text() == "# my project\n" and mine.read_bytes() == before["recipe.yaml"]


def test_a_run_in_a_new_directory_lists_what_it_wrote(tmp_path):
    result = invoke("train", write_recipe(tmp_path, max_steps=2, save_steps=1, save_total_limit=1))
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    written = set(manifest(out)["names"])
    on_disk = {p.name for p in out.iterdir()} - {MANIFEST_NAME}
    assert on_disk <= written and {"README.md", "recipe.yaml", "adapter_model.safetensors", "checkpoint-2"} <= on_disk
    assert manifest(out)["written_by"] == "zopeft train" and manifest(out / "checkpoint-2") is not None
    (out / "checkpoint-7").mkdir()  # not zopeft's: never rotated away or resumed from
    (out / "checkpoint-7" / "mine.txt").write_text("mine")
    resumed = invoke("train", tmp_path / "recipe.yaml", "resume_from_checkpoint=auto", "max_steps=3", "save_steps=1",
                     "save_total_limit=1")
    one_error_line(resumed, "holds checkpoint-7, which zopeft did not write")
    (out / "checkpoint-7" / "mine.txt").unlink()
    (out / "checkpoint-7").rmdir()
    resumed = invoke("train", tmp_path / "recipe.yaml", "resume_from_checkpoint=auto", "max_steps=3", "save_steps=1",
                     "save_total_limit=1")
    assert resumed.exit_code == 0 and "RESUMING" in resumed.output and "checkpoint-2" in resumed.output, resumed.output
    assert sorted(p.name for p in out.glob("checkpoint-[0-9]*")) == ["checkpoint-3"]  # and checkpoint-best


def test_a_run_that_failed_before_its_first_step_is_started_over_with_a_note(tmp_path):
    """Two label words sharing their first token under label_word_scoring: first fail once the tokenizer is
    loaded: the retry with the fix is not refused as "already holds a run"."""
    recipe = write_recipe(tmp_path, task="classification", template="Review: {sentence}\nSentiment:",
                          label_words=[" good", " goodish"], label_word_scoring="first", max_steps=2)
    one_error_line(invoke("train", recipe), "label_word_scoring: first", "' good' and ' goodish'")
    assert (tmp_path / "out" / "recipe.yaml").exists()  # it got as far as writing its recipe and logs
    result = invoke("train", recipe, "label_word_scoring=sum")
    assert result.exit_code == 0, result.output
    assert "stopped before training a step" in result.output and "starting over" in result.output
    assert [json.loads(x)["step"] for x in (tmp_path / "out" / "zo_steps.jsonl").read_text().splitlines()] == [0, 1]


def test_a_run_that_trained_steps_is_never_started_over_without_overwrite(tmp_path):
    """No checkpoint and no adapter (killed before its final save), but its step log can rebuild it (replay)."""
    recipe = write_recipe(tmp_path, max_steps=2)
    assert invoke("train", recipe).exit_code == 0
    (tmp_path / "out" / "adapter_model.safetensors").unlink()
    before = snapshot(tmp_path / "out")
    one_error_line(invoke("train", recipe), "already holds a run", "--overwrite")
    assert snapshot(tmp_path / "out") == before


def test_report_to_wandb_without_a_login_is_one_line_before_anything_is_written(tmp_path, monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setattr("wandb.sdk.wandb_setup._singleton", None)  # wandb keeps the settings of its first use
    one_error_line(invoke("train", write_recipe(tmp_path, report_to="wandb")), "report_to: wandb has no login",
                   "wandb login", "WANDB_MODE=offline")
    assert not (tmp_path / "out").exists()


def test_result_files_are_checked_before_the_work_and_replaced_only_with_overwrite(tmp_path):
    recipe = write_recipe(tmp_path)
    mine = tmp_path / "metrics.json"
    mine.write_text("mine")
    one_error_line(invoke("eval", recipe, "--output", mine), "--output:", "exists; pass --overwrite")
    one_error_line(invoke("eval", recipe, "--output", tmp_path), "--output:", "is a directory")
    for option in ("--output", "--write-recipe"):
        one_error_line(invoke("lr-find", recipe, option, recipe), f"{option}:", "exists; pass --overwrite")
        one_error_line(invoke("lr-find", recipe, option, tmp_path), f"{option}:", "is a directory")
    assert mine.read_text() == "mine" and not (tmp_path / "out").exists()  # refused before any work
    result = invoke("eval", recipe, "--output", mine, "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads(mine.read_text())["split"] == "dev"
    for _ in range(2):  # its own default output (listed in the directory's manifest) is replaced without asking
        assert invoke("eval", recipe).exit_code == 0
    assert manifest(tmp_path / "out") == {"written_by": "zopeft eval", "names": ["eval_dev.json"],
                                      "results": {"eval_dev.json": "zopeft eval"}}
    assert invoke("train", recipe, "max_steps=1").exit_code == 0  # an output_dir holding only zopeft's files


def test_lr_find_counts_are_bounded(tmp_path):
    recipe = write_recipe(tmp_path)
    for option, value, expected in (("--points", "1000000", "--points 1000000: from 2 to 50 learning rates"),
                                    ("--points", "1", "--points 1: from 2 to 50"),
                                    ("--span", "inf", "--span inf: above 1 and at most 1e+06"),
                                    ("--budget", "nan", "--budget nan: a share of the run's forward passes in (0, 1]")):
        one_error_line(invoke("lr-find", recipe, option, value), expected)


def test_a_run_of_zopeft_0_2_without_a_manifest_resumes_and_starts_over(tmp_path):
    recipe = write_recipe(tmp_path, max_steps=2, save_steps=1)
    assert invoke("train", recipe).exit_code == 0
    out = tmp_path / "out"
    (out / MANIFEST_NAME).unlink()  # as zopeft 0.2 left it
    (out / "notes.txt").write_text("mine")
    resumed = invoke("train", recipe, "resume_from_checkpoint=auto", "max_steps=3")
    assert resumed.exit_code == 0 and "RESUMING" in resumed.output, resumed.output
    assert "kept" not in resumed.output  # the model card and tokenizer files it finds hold the same bytes
    (out / MANIFEST_NAME).unlink()
    again = invoke("train", recipe, "--overwrite")
    assert again.exit_code == 0, again.output
    assert (out / "notes.txt").read_text() == "mine" and "notes.txt" not in manifest(out)["names"]


def test_a_result_never_replaces_a_runs_files_and_replaces_another_commands_result_only_with_overwrite(tmp_path):
    recipe = write_recipe(tmp_path, max_steps=1, save_steps=1)
    assert invoke("train", recipe).exit_code == 0
    out = tmp_path / "out"
    before = snapshot(out)
    for command, option, name in (("lr-find", "--write-recipe", "recipe.yaml"), ("lr-find", "--output", "zo_steps.jsonl"),
                                  ("eval", "--output", "trainer_log.jsonl"),
                                  ("eval", "--output", "checkpoint-1/adapter_model.safetensors")):
        for flags in ((), ("--overwrite",)):
            one_error_line(invoke(command, recipe, option, out / name, *flags), f"{option}:", "never replaced")
    assert snapshot(out) == before
    assert invoke("eval", recipe).exit_code == 0  # its own result in the run's directory, again without asking
    assert invoke("eval", recipe).exit_code == 0
    (out / "lr_find.json").write_text("{}")  # as if lr-find had written it there: another command's result
    data = json.loads((out / MANIFEST_NAME).read_text())
    data["results"]["lr_find.json"] = "zopeft lr-find"
    data["names"].append("lr_find.json")
    (out / MANIFEST_NAME).write_text(json.dumps(data))
    one_error_line(invoke("eval", recipe, "--output", out / "lr_find.json"), "--output:", "pass --overwrite")
    assert invoke("eval", recipe, "--output", out / "lr_find.json", "--overwrite").exit_code == 0
    assert manifest(out)["results"] == {"eval_dev.json": "zopeft eval", "lr_find.json": "zopeft eval"}
