"""Every user mistake is one `error:` line with exit code 2, and no command loses a user's work.

The classes of bad input found by trying the CLI as a new user and as an adversary: absurd
numbers, data that does not fit the template or task, corrupt or foreign files, surprising
settings, and commands that would overwrite a run (merge --out, two trains on one output_dir).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from test_cli import adapter_tensors, invoke, tiny_llm_dir, write_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from zopeft.rundir import RunDir


def one_error_line(result, *fragments: str) -> str:
    """The single `error:` line of a refused command (exit code 2, no traceback), checked for ``fragments``."""
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2, result.output
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished 4-step FZOO run (linear schedule) with checkpoint-2 and checkpoint-4; copy it before changing it."""
    root = tmp_path_factory.mktemp("run")
    result = invoke("train", write_recipe(root, max_steps=4, save_steps=2, lr_scheduler_type="linear"))
    assert result.exit_code == 0, result.output
    return root / "out"


@pytest.fixture
def run_copy(run_dir, tmp_path) -> Path:
    """A copy of the run whose recipe.yaml trains into the copy."""
    copy = tmp_path / "out"
    shutil.copytree(run_dir, copy)
    recipe = yaml.safe_load((copy / "recipe.yaml").read_text())
    (copy / "recipe.yaml").write_text(yaml.safe_dump({**recipe, "output_dir": str(copy)}))
    return copy


# ----- numbers -----------------------------------------------------------------------------------
@pytest.mark.parametrize("override,key", [
    ("learning_rate=.inf", "learning_rate: Input should be a finite number"),
    ("weight_decay=.nan", "weight_decay: Input should be a finite number"),
    ("zo.eps=.inf", "zo.eps: Input should be a finite number"),
    ("lora_alpha=.inf", "lora_alpha: Input should be a finite number"),
    ("learning_rate=1000", "learning_rate: Input should be less than or equal to 1"),
    ("lora_rank=1000000000", "lora_rank: Input should be less than or equal to 4096"),
    ("zo.n_perturbations=1000000000", "zo.n_perturbations: Input should be less than or equal to 1024"),
    ("per_device_train_batch_size=1000000000000", "per_device_train_batch_size: Input should be less than or equal"),
    ("seed=-1", "seed: Input should be greater than or equal to 0"),
])
def test_non_finite_and_absurd_numbers_are_refused(tmp_path, override, key):
    one_error_line(invoke("validate", write_recipe(tmp_path), override), key)


# ----- settings that used to surprise --------------------------------------------------------------
def test_empty_lora_target_and_empty_output_dir_are_refused(tmp_path):
    one_error_line(invoke("validate", write_recipe(tmp_path, lora_target=[])), "lora_target: names no module", "all-linear")
    one_error_line(invoke("validate", write_recipe(tmp_path, output_dir="")), "output_dir: is empty")


def test_a_model_directory_without_config_json_is_one_line_before_anything_loads(tmp_path):
    (tmp_path / "empty").mkdir()
    one_error_line(invoke("eval", write_recipe(tmp_path, model_name_or_path=str(tmp_path / "empty"))),
                   "model_name_or_path: ", "has no config.json; give a directory written by save_pretrained")


def test_lora_target_in_llama_factory_comma_form(tmp_path):
    path = write_recipe(tmp_path, lora_target="q_proj, v_proj", max_steps=1)
    assert "lora_target:\n- q_proj\n- v_proj" in invoke("validate", path).output
    assert "lora_target: all-linear" in invoke("validate", path, "lora_target=all").output
    assert invoke("train", path).exit_code == 0
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]


def test_a_misnamed_lora_target_names_the_closest_module_before_training(tmp_path):
    one_error_line(invoke("train", write_recipe(tmp_path, lora_target=["q_proj", "v_prj"])),
                   "lora_target: 'v_prj' matches no linear module of this model (did you mean 'v_proj'?); available: ")
    assert not (tmp_path / "out" / "adapter_config.json").exists()


def test_resuming_past_max_steps_is_refused(run_copy):
    recipe = run_copy / "recipe.yaml"
    one_error_line(invoke("train", recipe, "resume_from_checkpoint=auto", "max_steps=3"),
                   "max_steps: 3 is below the step of", "checkpoint-4 (4)", "set max_steps to 4 or more")


def test_raising_max_steps_under_a_linear_schedule_says_what_it_does(run_copy):
    result = invoke("train", run_copy / "recipe.yaml", "resume_from_checkpoint=auto", "max_steps=5")
    assert result.exit_code == 0, result.output
    assert "max_steps: 4 -> 5 under lr_scheduler_type linear" in result.output


def test_resuming_with_the_forwards_batched_otherwise_says_it_is_no_longer_bit_identical(run_copy):
    result = invoke("train", run_copy / "recipe.yaml", "resume_from_checkpoint=auto", "max_steps=5", "zo.batched=false")
    assert result.exit_code == 0, result.output
    assert ("zo.batched: true -> false since checkpoint-4: the perturbed forwards are grouped differently, which rounds "
            "differently: this run can differ in the last bits from one that never stopped") in result.output


def test_resuming_on_changed_training_data_is_refused(tmp_path):
    data = tmp_path / "data.jsonl"
    records = [{"sentence": f"review {i}", "label": i % 2} for i in range(16)]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    recipe = write_recipe(tmp_path, dataset=str(data), task="classification", template="{sentence} It was",
                          label_words=[" bad", " good"], val_size=0, max_steps=2, save_steps=1)
    assert invoke("train", recipe).exit_code == 0
    assert invoke("train", recipe, "resume_from_checkpoint=auto", "max_steps=3").exit_code == 0  # same data: resumes
    records[5]["sentence"] = "an edited review"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    before = snapshot(tmp_path / "out")
    one_error_line(invoke("train", recipe, "resume_from_checkpoint=auto", "max_steps=4"),
                   "dataset: the training records are not those", "checkpoint-3", "the data changed")
    assert snapshot(tmp_path / "out") == before


def test_foreign_checkpoint_directory_is_left_alone(run_copy):
    (run_copy / "checkpoint-mine").mkdir()
    result = invoke("train", run_copy / "recipe.yaml", "resume_from_checkpoint=auto", "max_steps=6", "save_total_limit=1")
    assert result.exit_code == 0, result.output
    assert "leaving checkpoint-mine alone" in result.output
    # checkpoint-best (the best evaluation's adapter) is not rotated by save_total_limit either
    assert sorted(p.name for p in run_copy.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-best", "checkpoint-mine"]


# ----- data that does not fit the task: found before the model loads -----------------------------
@pytest.mark.parametrize("keys,expected", [
    ({"template": "{nope}"}, ["dataset: record 0 of 'sst2' (train split)", "template field 'nope'", "fields: sentence, label"]),
    ({"task": "sft"}, ["does not fit task sft", "prompt/completion"]),
    ({"task": "multiple_choice"}, ["does not fit task multiple_choice", "choices_field"]),
    ({"data": [{"text": "a", "y": 1}], "task": "classification", "template": "{text}", "label_words": [" a", " b"]},
     ["dataset: record 0 of", "no label field 'label'", "set label_field"]),
    ({"data": [{"text": "a", "label": 7}], "task": "classification", "template": "{text}", "label_words": [" a", " b"]},
     ["label 7 is not one of the label words' labels"]),
])
def test_data_that_does_not_fit_the_task_is_one_line_before_the_model_loads(tmp_path, keys, expected):
    if "data" in keys:
        data = tmp_path / "data.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in keys.pop("data")))
        keys["dataset"] = str(data)
    (tmp_path / "not-a-model").mkdir()  # loading it would fail: the data error must come first
    (tmp_path / "not-a-model" / "config.json").write_text("{}")
    path = write_recipe(tmp_path, model_name_or_path=str(tmp_path / "not-a-model"), **keys)
    one_error_line(invoke("train", path), *expected)
    one_error_line(invoke("eval", path), *expected[1:])
    assert not (tmp_path / "out").exists()


def test_label_field_text_fields_and_choices_field_are_recipe_keys(tmp_path):
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"q": f"Pick {i}", "options": ["yes", "no"], "gold": 1}) + "\n" for i in range(4)))
    path = write_recipe(tmp_path, dataset=str(data), task="multiple_choice", text_fields=["q"], choices_field="options",
                        label_field="gold", max_steps=1)
    assert invoke("train", path).exit_code == 0
    one_error_line(invoke("validate", path, "text_fields=[]"), "text_fields:")


# ----- corrupt and foreign files -----------------------------------------------------------------
def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_auto_resume_falls_back_from_a_truncated_checkpoint(run_dir, run_copy):
    truncate(run_copy / "checkpoint-4" / "adapter_model.safetensors")
    (run_copy / "adapter_model.safetensors").unlink()  # the run was killed before its final save
    result = invoke("train", run_copy / "recipe.yaml", "resume_from_checkpoint=auto")
    assert result.exit_code == 0, result.output
    assert "skipping checkpoint-4" in result.output and "checkpoint-4/adapter_model.safetensors is truncated" in result.output
    assert "RESUMING from" in result.output and "checkpoint-2 at step 2" in result.output
    done, reference = adapter_tensors(run_copy), adapter_tensors(run_dir)
    assert all(torch.equal(done[k], reference[k]) for k in reference)


def test_resuming_an_explicit_corrupt_checkpoint_names_the_file(run_copy):
    truncate(run_copy / "checkpoint-4" / "rng.safetensors")
    one_error_line(invoke("train", run_copy / "recipe.yaml", f"resume_from_checkpoint={run_copy / 'checkpoint-4'}"),
                   "resume_from_checkpoint:", "checkpoint-4/rng.safetensors is truncated", "earlier checkpoint-N")


def test_eval_and_merge_of_a_truncated_adapter_name_the_file(run_copy, tmp_path):
    truncate(run_copy / "adapter_model.safetensors")
    expected = ("--adapter:", "out/adapter_model.safetensors is truncated")
    one_error_line(invoke("eval", run_copy / "recipe.yaml", "--adapter", run_copy), *expected)
    one_error_line(invoke("merge", "--adapter", run_copy, "--out", tmp_path / "merged"), *expected)


def test_eval_and_merge_of_an_adapter_trained_on_another_base(run_dir, tmp_path):
    other = tmp_path / "wider-llama"
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm_dir())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    tokenizer.save_pretrained(other)
    recipe = write_recipe(tmp_path, model_name_or_path=str(other))
    one_error_line(invoke("eval", recipe, "--adapter", run_dir), "does not fit", "size mismatch",
                   "use the recipe it was trained with")
    one_error_line(invoke("merge", "--adapter", run_dir, "--out", tmp_path / "merged", "--recipe", recipe),
                   "does not fit", "size mismatch")
    one_error_line(invoke("merge", "--adapter", run_dir, "--out", tmp_path / "merged", "--recipe", tmp_path / "nope.yaml"),
                   "--recipe:", "nope.yaml does not exist")
    one_error_line(invoke("merge", "--adapter", run_dir, "--out", tmp_path / "merged", "--dtype", "int8"),
                   "--dtype 'int8' is not one of bf16, fp16, fp32, bfloat16")
    one_error_line(invoke("merge", "--adapter", run_dir, "--out", tmp_path / "merged", "--max-shard-size", "1KB"),
                   "--max-shard-size '1KB': give a size of at least 1MB")
    assert not (tmp_path / "merged").exists()


# ----- never lose a run ----------------------------------------------------------------------------
def test_merge_never_replaces_a_run_and_needs_overwrite_for_anything_else(run_copy, tmp_path):
    before = snapshot(run_copy)
    for out in (run_copy, run_copy.parent, run_copy / "checkpoint-2"):
        one_error_line(invoke("merge", "--adapter", run_copy, "--out", out), "--out:")
    one_error_line(invoke("merge", "--adapter", run_copy / "checkpoint-2", "--out", run_copy), "would replace")
    one_error_line(invoke("merge", "--adapter", run_copy, "--out", run_copy, "--overwrite"), "would replace")
    assert snapshot(run_copy) == before

    other_run = tmp_path / "elsewhere" / "run"
    other_run.mkdir(parents=True)
    (other_run / "trainer_log.jsonl").write_text("{}\n")
    one_error_line(invoke("merge", "--adapter", run_copy, "--out", tmp_path / "elsewhere", "--overwrite"),
                   "holds a training run or adapter", "never replaced")

    busy, file = tmp_path / "busy", tmp_path / "model.bin"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    file.write_text("mine")
    for flags in ((), ("--overwrite",)):  # what merge did not write is never replaced, --overwrite or not
        one_error_line(invoke("merge", "--adapter", run_copy, "--out", busy, *flags),
                       "holds files `zopeft merge` did not write (notes.txt)", "never replaced")
        one_error_line(invoke("merge", "--adapter", run_copy, "--out", file, *flags), "is a file")
    assert (busy / "notes.txt").read_text() == "mine" and file.read_text() == "mine"


def test_merge_and_replay_overwrite_replace_only_their_own_previous_output(run_copy, tmp_path):
    for command, source in (("merge", ("--adapter", run_copy, "--dtype", "fp32")), ("replay", (run_copy,))):
        out = tmp_path / command
        assert invoke(command, *source, "--out", out).exit_code == 0
        one_error_line(invoke(command, *source, "--out", out), f"holds the output of a previous `zopeft {command}`",
                       "pass --overwrite")
        result = invoke(command, *source, "--out", out, "--overwrite")
        assert result.exit_code == 0, result.output
        other = "replay" if command == "merge" else "merge"  # another command's output is not its own
        one_error_line(invoke(other, *(("--adapter", run_copy) if other == "merge" else (run_copy,)), "--out", out,
                              "--overwrite"), "--out:", "never replace")
        (out / "notes.txt").write_text("mine")  # a file the user added: the directory is no longer only zopeft's
        one_error_line(invoke(command, *source, "--out", out, "--overwrite"), "--out:", "never replaced")
        assert (out / "notes.txt").read_text() == "mine"


def test_train_refuses_a_previous_run_unless_overwrite(run_copy):
    recipe = run_copy / "recipe.yaml"
    before = snapshot(run_copy)
    one_error_line(invoke("train", recipe), "output_dir:", "already holds a run", "resume_from_checkpoint=auto",
                   "--overwrite")
    assert snapshot(run_copy) == before
    result = invoke("train", recipe, "--overwrite", "max_steps=1", "save_steps=1")
    assert result.exit_code == 0, result.output
    assert "removed the previous run's" in result.output
    assert sorted(p.name for p in run_copy.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-best"]  # the new run's
    assert [json.loads(x)["step"] for x in (run_copy / "zo_steps.jsonl").read_text().splitlines()] == [0]


def test_one_train_per_output_dir_and_a_dead_runs_lock_and_temporaries_are_taken_over(tmp_path):
    path = write_recipe(tmp_path, max_steps=1)
    out = tmp_path / "out"
    with RunDir(out).locked(lambda _: None):
        one_error_line(invoke("train", path), "output_dir:", "is in use by another zopeft train", "wait for it")
    assert not out.exists()  # the refused run left nothing behind (the holder's lock is gone with it)

    out.mkdir()
    pid = dead_pid()
    (out / ".zopeft.lock").write_text(f"{pid}\n")
    (out / f".checkpoint-4.zopeft-tmp-{pid}").mkdir()
    (out / f".trainer_log.jsonl.zopeft-tmp-{pid}").write_text("partial")
    (tmp_path / f".checkpoint-4.zopeft-tmp-{pid}").mkdir()  # outside output_dir: not touched
    result = invoke("train", path)
    assert result.exit_code == 0, result.output
    assert f"took over the lock file left by pid {pid}: no process holds its lock" in result.output
    assert "cleaned up what killed runs left unfinished: " in result.output
    assert sorted(p.name for p in out.glob(".*")) == [".zopeft-manifest.json"]
    assert (tmp_path / f".checkpoint-4.zopeft-tmp-{pid}").exists()


def test_a_lock_file_naming_a_live_process_that_does_not_hold_it_is_taken_over_without_calling_it_dead(tmp_path):
    """The flock decides: pid 1 is alive, but it does not hold the lock (a file left behind, a reused pid)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".zopeft.lock").write_text("1\n")
    result = invoke("train", write_recipe(tmp_path, max_steps=1))
    assert result.exit_code == 0, result.output
    assert "took over the lock file left by pid 1: no process holds its lock" in result.output
    assert "no longer running" not in result.output and not (out / ".zopeft.lock").exists()


def test_the_start_up_clean_up_removes_only_zopefts_temporaries_and_survives_any_name(tmp_path):
    """User files named like 0.2's temporaries (.NAME.old-PID), and numbers no pid can be, are left alone."""
    from zopeft.ownership import remove_stale_temporaries

    pid = dead_pid()
    (tmp_path / ".photos.old-31337").mkdir()
    (tmp_path / ".photos.old-31337" / "cat.jpg").write_text("mine")
    for name in (".vimrc.old-2024", ".bashrc.old-99999999999", ".notes.tmp-keep", f".x.zopeft-tmp-{'9' * 30}",
                 ".x.zopeft-tmp-0", f".x.zopeft-tmp-{pid}.bak"):
        (tmp_path / name).write_text("mine")
    (tmp_path / f".recipe.yaml.zopeft-tmp-{pid}").write_text("partial")
    (tmp_path / f".runs.zopeft-tmp-{pid}").symlink_to(tmp_path / ".photos.old-31337")  # a link: never followed
    assert remove_stale_temporaries(tmp_path) == [f".recipe.yaml.zopeft-tmp-{pid}", f".runs.zopeft-tmp-{pid}"]
    assert (tmp_path / ".photos.old-31337" / "cat.jpg").read_text() == "mine"
    assert len(list(tmp_path.iterdir())) == 7


def test_a_checkpoint_replaced_when_its_writer_was_killed_between_the_renames_is_put_in_place(tmp_path):
    """atomic_directory moved checkpoint-4 aside (.old) and died before renaming its complete .tmp into place."""
    from zopeft.ownership import remove_stale_temporaries

    pid = dead_pid()
    for name, text in ((f".checkpoint-4.zopeft-old-{pid}", "previous"), (f".checkpoint-4.zopeft-tmp-{pid}", "new"),
                       ("checkpoint-6", "kept"), (f".checkpoint-6.zopeft-tmp-{pid}", "half-written")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.json").write_text(text)
    done = remove_stale_temporaries(tmp_path)
    assert done == [f".checkpoint-4.zopeft-tmp-{pid} (complete: now checkpoint-4)", f".checkpoint-4.zopeft-old-{pid}",
                    f".checkpoint-6.zopeft-tmp-{pid}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-6"]
    assert (tmp_path / "checkpoint-4" / "state.json").read_text() == "new"
    assert (tmp_path / "checkpoint-6" / "state.json").read_text() == "kept"


def test_state_files_appear_whole_or_not_at_all(tmp_path, monkeypatch):
    """save_state writes the tensors first, each file by rename: a crash while writing them leaves no NAME.json."""
    import zopeft.checkpoint as checkpoint

    def crash(tensors, path):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_state({"step": 3, "window": torch.ones(2)}, tmp_path, "zo_optimizer")
    assert list(tmp_path.iterdir()) == []  # no state, and no temporary left
    monkeypatch.undo()
    checkpoint.save_state({"step": 3, "window": torch.ones(2)}, tmp_path, "zo_optimizer")
    assert checkpoint.load_state(tmp_path, "zo_optimizer")["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zo_optimizer.json", "zo_optimizer.safetensors"]
