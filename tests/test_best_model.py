"""Keeping the best model, the guard's default watch, the evaluation cache and num_train_epochs, through the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from test_cli import adapter_tensors, invoke, write_recipe

from zopeft.eval_cache import load_evaluation, store_evaluation
from zopeft.recipe import RecipeError, load_recipe
from zopeft.resolved import resolve_run
from zopeft.splits import DataSplits
from zopeft.tasks import ClassificationTask


@pytest.fixture
def scripted_accuracy(monkeypatch):
    """Each evaluation reports the next of the given accuracies (the real metrics otherwise): what a run does with
    an evaluation must not hang on how a random tiny model happens to score."""
    scores: list[float] = []
    real = ClassificationTask.evaluate

    def evaluate(self, model, tokenizer, records, batch_size=16):
        return {**real(self, model, tokenizer, records, batch_size), "accuracy": scores.pop(0)}

    monkeypatch.setattr(ClassificationTask, "evaluate", evaluate)
    return scores


def log_of(out):
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def epochs_recipe(tmp_path, **keys):
    """A recipe without max_steps (write_recipe's base has one)."""
    recipe = write_recipe(tmp_path, **keys)
    recipe.write_text(yaml.safe_dump({k: v for k, v in yaml.safe_load(recipe.read_text()).items() if k != "max_steps"}))
    return recipe


def test_a_run_whose_last_step_is_worse_leaves_the_earlier_adapter_and_says_so(tmp_path, scripted_accuracy):
    scripted_accuracy += [0.50, 0.90, 0.60, 0.40, 0.30]  # the start, steps 2, 4, 6 and the end (8)
    recipe = write_recipe(tmp_path, max_steps=8, eval_steps=2, save_steps=2, zo={"optimizer": "mezo", "guard": False})
    result = invoke("train", recipe)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert ("best model: output_dir holds the adapter of step 2, eval_accuracy 0.9000; the last step, 8, scored "
            "0.3000 (load_best_model_at_end)") in result.output
    assert "accuracy 0.5000 -> 0.9000" in result.output  # the final line compares the start with the kept adapter
    assert "(the adapter of step 2, eval_accuracy 0.9000; the last step, 8, scored 0.3000)" in result.output
    # chosen by the records it is reported on: the run says the score is optimistic, and how to get one that is not
    assert "note: that score is of the adapter the same records chose" in result.output
    kept, best, last = adapter_tensors(out), adapter_tensors(out / "checkpoint-best"), adapter_tensors(out / "checkpoint-8")
    assert same(kept, adapter_tensors(out / "checkpoint-2")) and same(kept, best) and not same(kept, last)
    assert json.loads((out / "checkpoint-best" / "best.json").read_text())["step"] == 2
    record = next(r["best_model"] for r in log_of(out) if "best_model" in r)
    assert record == {"step": 2, "metric": "eval_accuracy", "value": 0.9, "last_step": 8, "last_value": 0.3,
                      "rollbacks": 0}
    replayed = invoke("replay", out, "--out", tmp_path / "replayed")  # replay rebuilds the adapter the run left
    assert replayed.exit_code == 0 and "replayed 2 steps" in replayed.output and "bit-identical" in replayed.output


def test_a_score_chosen_on_the_records_it_reports_is_said_to_be_optimistic():
    from zopeft.best_model import selection_note

    kept = {"step": 2, "metric": "eval_accuracy", "value": 0.9, "last_step": 8, "last_value": 0.3}
    assert "overstates what other records would give" in selection_note(kept)
    assert selection_note({**kept, "metric": "select_accuracy"}) is None  # chosen on zo.guard.select_size's records
    assert selection_note({**kept, "step": 8}) is None and selection_note({**kept, "step": 0}) is None
    assert selection_note(None) is None


def test_load_best_model_at_end_false_leaves_the_last_steps_adapter(tmp_path, scripted_accuracy):
    scripted_accuracy += [0.50, 0.90, 0.30]
    recipe = write_recipe(tmp_path, max_steps=4, eval_steps=2, save_steps=4, load_best_model_at_end=False,
                          zo={"optimizer": "mezo", "guard": False})
    result = invoke("train", recipe)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert same(adapter_tensors(out), adapter_tensors(out / "checkpoint-4")) and not (out / "checkpoint-best").exists()
    assert "best model: not kept (load_best_model_at_end: false)" in result.output
    assert "output_dir holds the adapter" not in result.output and "accuracy 0.5000 -> 0.3000" in result.output


def test_resume_keeps_the_best_so_far(tmp_path, scripted_accuracy):
    """The best (step 2) was found before the kill; the resumed run's evaluations are worse: the adapter left is still
    step 2's, and checkpoint-best/ is neither rotated by save_total_limit nor lost."""
    scripted_accuracy += [0.50, 0.90, 0.60]  # the first run: the start, steps 2 and 4 (then killed)
    keys = dict(eval_steps=2, save_steps=2, save_total_limit=1, zo={"optimizer": "mezo", "guard": False})
    recipe = write_recipe(tmp_path, max_steps=4, **keys)
    assert invoke("train", recipe).exit_code == 0
    out = tmp_path / "out"
    step2 = adapter_tensors(out / "checkpoint-best")
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-4", "checkpoint-best"]
    scripted_accuracy += [0.70, 0.80]  # the resumed run: steps 6 and 8
    result = invoke("train", write_recipe(tmp_path, max_steps=8, resume_from_checkpoint="auto", **keys))
    assert result.exit_code == 0, result.output
    assert "RESUMING" in result.output and "best model: so far the adapter of step 2 (eval_accuracy 0.9" in result.output
    assert same(adapter_tensors(out), step2) and "the last step, 8, scored 0.8000" in result.output
    scripted_accuracy += [0.80]  # resumed from its last checkpoint into another output_dir: the best comes along
    (tmp_path / "other").mkdir()
    elsewhere = write_recipe(tmp_path / "other", max_steps=10, output_dir=str(tmp_path / "other" / "out"),
                             resume_from_checkpoint=str(out / "checkpoint-8"), **keys)
    assert invoke("train", elsewhere).exit_code == 0
    assert same(adapter_tensors(tmp_path / "other" / "out"), step2)
    assert same(adapter_tensors(tmp_path / "other" / "out" / "checkpoint-best"), step2)


def test_resuming_before_the_best_step_tracks_the_best_afresh(tmp_path, scripted_accuracy):
    """The first run's best (step 6) came after checkpoint-4: a run resumed from checkpoint-4 never reached it, so it
    keeps its own best (step 6 of its own trajectory), which replay rebuilds."""
    scripted_accuracy += [0.50, 0.60, 0.55, 0.90, 0.70]  # the start, steps 2, 4, 6 and the end (8)
    keys = dict(eval_steps=2, save_steps=4, zo={"optimizer": "mezo", "guard": False})
    assert invoke("train", write_recipe(tmp_path, max_steps=8, **keys)).exit_code == 0
    out = tmp_path / "out"
    assert json.loads((out / "checkpoint-best" / "best.json").read_text())["step"] == 6
    scripted_accuracy += [0.40, 0.30, 0.20]  # the resumed run: steps 6, 8 and the end (10)
    result = invoke("train", write_recipe(tmp_path, max_steps=10, resume_from_checkpoint=str(out / "checkpoint-4"),
                                          **keys))
    assert result.exit_code == 0, result.output
    assert ("best model: not continuing from checkpoint-best/ (it holds the adapter of step 6, and checkpoint-4 "
            "records the best as step 2") in result.output
    assert json.loads((out / "checkpoint-best" / "best.json").read_text())["step"] == 6
    assert "output_dir holds the adapter of step 6, eval_accuracy 0.4000" in result.output
    replayed = invoke("replay", out, "--out", tmp_path / "replayed")
    assert replayed.exit_code == 0 and "bit-identical" in replayed.output, replayed.output


@pytest.mark.parametrize("damage", [None, "{", "{}"])
def test_the_last_evaluations_best_is_kept_on_resume_and_a_damaged_best_json_is_no_traceback(
        tmp_path, scripted_accuracy, damage):
    """The best of the end (step 2), evaluated after checkpoint-2 was written, is that checkpoint's own adapter."""
    scripted_accuracy += [0.50, 0.60, 0.40]  # the start and the end (2), then the resumed run's end (4)
    keys = dict(save_steps=2, zo={"optimizer": "mezo", "guard": False})
    assert invoke("train", write_recipe(tmp_path, max_steps=2, **keys)).exit_code == 0
    out = tmp_path / "out"
    if damage is not None:
        (out / "checkpoint-best" / "best.json").write_text(damage)
    result = invoke("train", write_recipe(tmp_path, max_steps=4, resume_from_checkpoint="auto", **keys))
    assert result.exit_code == 0, result.output
    if damage is None:
        assert "best model: so far the adapter of step 2 (eval_accuracy 0.6" in result.output
        assert same(adapter_tensors(out), adapter_tensors(out / "checkpoint-2"))
    else:
        assert "best model: not continuing from checkpoint-best/ (best.json is unreadable" in result.output


def test_the_guard_watches_the_evaluations_by_default(tmp_path, scripted_accuracy):
    """With evaluation records and eval_steps a fall of accuracy is rolled back (zo.guard.watch: auto -> eval); with
    eval_steps null the guard watches the loss, and validate says which."""
    scripted_accuracy += [0.80, 0.50, 0.78, 0.79]  # the start, steps 2 (a collapse), 4, and the end
    recipe = write_recipe(tmp_path, max_steps=6, eval_steps=2, zo={"optimizer": "mezo"})
    validated = invoke("validate", recipe)
    assert "guard: watches the eval accuracy (higher is better) every 2 steps" in validated.output
    result = invoke("train", recipe)
    assert result.exit_code == 0, result.output
    assert "guard: rolled back to the weights after 0 steps" in result.output
    saved = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())["zo"]["guard"]
    assert (saved["watch"], saved["margin"], saved["patience"]) == ("eval", 0.05, 1)  # the run records what it watched
    without = invoke("validate", recipe, "eval_steps=")
    assert "guard: watches the training loss (no evaluations before the end to watch)" in without.output


def test_a_resumed_run_keeps_the_guard_watch_of_its_checkpoint_unless_the_recipe_names_another(tmp_path):
    """watch: auto takes the checkpoint's watch (a run of zopeft 0.2 watched the loss, eval_steps or not); a watch, or
    another zo setting, named and different is refused by its key."""
    keys = dict(save_steps=2, zo={"optimizer": "mezo"})
    assert invoke("train", write_recipe(tmp_path, max_steps=2, **keys)).exit_code == 0  # no eval_steps: loss
    out = tmp_path / "out"
    resumed = invoke("train", write_recipe(tmp_path, max_steps=4, eval_steps=2, resume_from_checkpoint="auto", **keys))
    assert resumed.exit_code == 0, resumed.output
    assert "guard: watches the training loss" in resumed.output
    assert yaml.safe_load((out / "recipe.yaml").read_text())["zo"]["guard"]["watch"] == "loss"
    checkpoint = out / "checkpoint-4" / "recipe.yaml"  # as zopeft 0.2 wrote it: watch: loss, with eval_steps
    assert yaml.safe_load(checkpoint.read_text())["eval_steps"] == 2
    again = write_recipe(tmp_path, max_steps=6, eval_steps=2, resume_from_checkpoint="auto", **keys)
    for override, changed in (("zo.guard.watch=eval", "zo.guard.smoothing, zo.guard.margin, zo.guard.patience, "
                                                      "zo.guard.watch;"), ("zo.eps=0.01", "zo.eps;")):
        refused = invoke("train", again, override)
        assert refused.exit_code == 2 and f"was trained with different {changed}" in refused.output, refused.output
    assert invoke("train", again).exit_code == 0
    watched = load_recipe(again, ["zo.guard.watch=eval"])  # a checkpoint's watch on the evaluations needs eval_steps
    unwatched = load_recipe(again, ["eval_steps="])
    with pytest.raises(RecipeError, match="eval_steps: the checkpoint resumed has its guard watch the evaluations"):
        resolve_run(unwatched, DataSplits(unwatched), resumed=watched)


def test_the_start_is_evaluated_once_for_every_run_of_the_same_model_adapter_and_records(tmp_path):
    for run in "abcd":
        (tmp_path / run).mkdir()
    first = invoke("train", write_recipe(tmp_path / "a", max_steps=2))
    again = invoke("train", write_recipe(tmp_path / "b", max_steps=3, learning_rate=1e-3))
    other = invoke("train", write_recipe(tmp_path / "c", max_steps=2, max_eval_samples=12))
    assert all(r.exit_code == 0 for r in (first, again, other))
    assert "reused" not in first.output and "reused" not in other.output
    assert "eval @ step 0: " in again.output and "(reused from the evaluation cache" in again.output
    starts = [next(r for r in log_of(tmp_path / run / "out") if "eval_loss" in r) for run in "ab"]
    assert starts[0]["eval_loss"] == starts[1]["eval_loss"] and starts[0]["eval_predicted"] == starts[1]["eval_predicted"]
    skipped = invoke("train", write_recipe(tmp_path / "d", max_steps=2, eval_on_start=False))
    assert skipped.exit_code == 0 and "eval @ step 0" not in skipped.output
    assert [r["step"] for r in log_of(tmp_path / "d" / "out") if "eval_loss" in r] == [2]


def test_the_cache_keeps_strict_json_without_the_generations(tmp_path, monkeypatch):
    monkeypatch.setattr("zopeft.eval_cache.cache_dir", lambda: tmp_path)
    store_evaluation("key", {"loss": float("nan"), "f1": 0.5, "generations": [{"prompt": "Q", "generation": "A"}]})
    text = (tmp_path / "key.json").read_text()
    assert json.loads(text, parse_constant=pytest.fail) == {"loss": None, "f1": 0.5}
    kept = load_evaluation("key")  # read back as the evaluation gave it: a NaN loss, which the guard judges
    assert math.isnan(kept.pop("loss")) and kept == {"f1": 0.5}


def test_the_cache_keeps_the_newest_entries_and_removes_nothing_it_did_not_write(tmp_path, monkeypatch):
    import os

    monkeypatch.setattr("zopeft.eval_cache.cache_dir", lambda: tmp_path)
    monkeypatch.setattr("zopeft.eval_cache.MAX_ENTRIES", 3)
    keys = [f"{i:024x}" for i in range(5)]
    for age, key in enumerate(keys):
        store_evaluation(key, {"accuracy": 0.5})
        os.utime(tmp_path / f"{key}.json", ns=(age * 10**9, age * 10**9))  # stored in this order
    (tmp_path / "notes.json").write_text("{}")  # a name the cache does not write
    store_evaluation("f" * 24, {"accuracy": 0.5})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{k}.json" for k in keys[3:]] +
                                                                ["f" * 24 + ".json", "notes.json"])
    assert load_evaluation(keys[4]) == {"accuracy": 0.5} and load_evaluation(keys[0]) is None


def test_an_unwritable_cache_is_said_once_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setattr("zopeft.eval_cache.cache_dir", lambda: tmp_path / "a-file" / "evals")
    recipe = write_recipe(tmp_path, max_steps=1, eval_steps=1, zo__guard={"watch": "eval", "select_size": 8})
    result = invoke("train", recipe)  # two evaluations at the start (eval, the guard's records): one warning
    assert result.exit_code == 0, result.output
    said = [r for r in caplog.records if "evaluation cache" in r.getMessage()]
    assert len(said) == 1 and str(tmp_path / "a-file") in said[0].getMessage(), said


def test_num_train_epochs_counts_the_steps_of_that_many_passes(tmp_path):
    recipe = epochs_recipe(tmp_path, num_train_epochs=0.3, eval_steps=2)  # 64 records, 4 a step
    validated = invoke("validate", recipe)
    assert validated.exit_code == 0, validated.output
    assert "max_steps: 5 (num_train_epochs 0.3 x 64 training records / 4 examples a step, rounded up; a ZO data-parallel" in \
        validated.output
    result = invoke("train", recipe)
    assert result.exit_code == 0, result.output
    assert "num_train_epochs 0.3: max_steps 5" in result.output and "done: 5 steps" in result.output
    saved = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())
    assert (saved["max_steps"], saved["num_train_epochs"]) == (5, None)  # the run records the steps it took


@pytest.mark.parametrize("keys,error", [
    (dict(num_train_epochs=2, max_steps=10), "num_train_epochs: give max_steps or num_train_epochs, not both"),
    (dict(num_train_epochs=2, eval_steps=0.5), "eval_steps: 0.5 is a fraction of max_steps, and the recipe gives "
                                               "num_train_epochs instead"),
    (dict(num_train_epochs=-1), "num_train_epochs: Input should be greater than 0"),
    (dict(num_train_epoch=2), "num_train_epoch: unknown key (did you mean 'num_train_epochs'?)"),
    (dict(load_best_model_at_end=True, dataset="PATH", val_size=0, task="classification",
          label_words=[" negative", " positive"], template="{sentence} It was"),
     "load_best_model_at_end: true, but the run has no evaluation records"),
])
def test_num_train_epochs_and_best_model_errors_are_one_line(tmp_path, keys, error):
    if keys.get("dataset") == "PATH":
        data = tmp_path / "d.jsonl"
        data.write_text("".join(json.dumps({"sentence": f"s{i}", "label": i % 2}) + "\n" for i in range(8)))
        keys["dataset"] = str(data)
    recipe = write_recipe(tmp_path, **keys) if "max_steps" in keys or "num_train_epochs" not in keys else \
        epochs_recipe(tmp_path, **keys)
    result = invoke("validate", recipe)
    assert result.exit_code == 2, result.output
    assert f"error: {error}" in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("keys,evaluations", [
    # write_recipe: 16 eval records, 4 examples a step; FZOO N=3 spends 4 forwards an example, MeZO 2, AdamW 3
    (dict(max_steps=40), "every 4 steps (9 before the end)"),  # 25% of 640 pays 10 evaluations: 10 in all
    (dict(max_steps=20), "every 4 steps (4 before the end)"),  # 25% of 320 pays 5 before the end
    (dict(max_steps=20, zo={"optimizer": "mezo"}), "every 7 steps (2 before the end)"),  # 25% of 160: 2
    (dict(max_steps=20, zo={"optimizer": "adamw"}), "every 5 steps (3 before the end)"),  # 25% of 240: 3
    (dict(max_steps=40, eval_steps=None), "at the start and end only"),
    (dict(max_steps=40, eval_strategy="no"), "at the start and end only"),  # TrainingArguments' spelling
    (dict(max_steps=40, eval_strategy="steps"), "every 4 steps (9 before the end)"),
    (dict(max_steps=40, eval_steps=8), "every 8 steps (4 before the end)"),
])
def test_eval_steps_auto_evaluates_ten_times_within_a_quarter_of_the_training(tmp_path, keys, evaluations):
    validated = invoke("validate", write_recipe(tmp_path, **keys))
    assert validated.exit_code == 0, validated.output
    assert f"evaluations: at the start{', ' if 'every' in evaluations else ' and end only'}" in validated.output
    assert evaluations in validated.output


@pytest.mark.parametrize("keys,evaluations", [
    # 25% of 640 forwards of training; an eval record costs one forward where its candidates are one token each,
    # else one a candidate (each its own sequence): 8 held-out records x 4 choices, 16 x 2 label words -> every 7
    (dict(choices=["the red one", "the blue one", "a green one", "none"]), "every 7 steps (5 before the end)"),
    (dict(choices=["A", "B", "C", "D"]), "every 4 steps (9 before the end)"),
    # a prompt that ends in whitespace is followed by the choices as they are: one token each without the space
    (dict(choices=["Buffer", "Backend", "Dialog", "Bytes"], template="Pick {q}:\n"), "every 4 steps (9 before the end)"),
    (dict(label_words=[" terrible film", " great film"]), "every 7 steps (5 before the end)"),
    (dict(label_words=[" terrible film", " great film"], label_word_scoring="first"), "every 4 steps (9 before the end)"),
])
def test_eval_steps_auto_prices_a_record_by_the_sequences_its_candidates_take(tmp_path, keys, evaluations):
    if "choices" in keys:
        data = tmp_path / "mc.jsonl"
        choices = keys.pop("choices")
        data.write_text("".join(json.dumps({"q": f"Pick {i}", "options": choices, "gold": i % 4}) + "\n" for i in range(80)))
        keys.update(dataset=str(data), task="multiple_choice", choices_field="options", label_field="gold")
        keys.setdefault("text_fields", None if "template" in keys else ["q"])
    validated = invoke("validate", write_recipe(tmp_path, max_steps=40, **keys))
    assert validated.exit_code == 0, validated.output
    assert f"evaluations: at the start, {evaluations} and at the end" in validated.output


def test_eval_steps_auto_is_what_the_run_evaluates_at_records_and_resumes_with(tmp_path):
    recipe = write_recipe(tmp_path, max_steps=4, save_steps=2)  # 25% of 64 forwards pays one evaluation of 16
    result = invoke("train", recipe)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert [r["step"] for r in log_of(out) if "eval_loss" in r] == [0, 2, 4]
    assert yaml.safe_load((out / "recipe.yaml").read_text())["eval_steps"] == 2
    # resumed for 8 steps, the run keeps its checkpoint's cadence (a fresh 8-step run's auto is every 3 steps)
    assert "every 3 steps" in invoke("validate", recipe, "max_steps=8").output
    resumed = invoke("train", recipe, "max_steps=8", "resume_from_checkpoint=auto")
    assert resumed.exit_code == 0, resumed.output
    assert [r["step"] for r in log_of(out) if "eval_loss" in r][-3:] == [4, 6, 8]


@pytest.mark.parametrize("keys,error", [
    (dict(eval_strategy="epoch"), "eval_strategy: steps or no, got 'epoch'; zopeft evaluates every eval_steps steps "
                                  "(epoch: set eval_steps to the training records / the examples a step, which zopeft "
                                  "validate prints)"),
    (dict(eval_strategy="no", eval_steps=5), "eval_strategy: no, and eval_steps is 5; drop one of them"),
    (dict(eval_steps="often"), "eval_steps: a count of steps (e.g. 20), a fraction of max_steps below 1, auto (at "
                               "most 10 evaluations, within 25% of the training's cost) or null (the start and end "
                               "only), got 'often'"),
    (dict(max_steps=1, zo={"optimizer": "mezo", "guard": {"watch": "eval"}}),
     "eval_steps: auto makes no evaluation before the end of this run (one step has no step before its end), and "
     "zo.guard judges the evaluations (watch: eval or select_size); raise max_steps"),
    (dict(max_steps=2, zo={"optimizer": "mezo", "guard": {"watch": "eval"}}),
     "eval_steps: auto makes no evaluation before the end of this run (one evaluation would cost over 25% of the "
     "training's forward passes), and zo.guard judges the evaluations (watch: eval or select_size); set eval_steps"),
])
def test_eval_steps_errors_are_one_line(tmp_path, keys, error):
    result = invoke("validate", write_recipe(tmp_path, **keys))
    assert result.exit_code == 2 and result.output.strip().splitlines() == [f"error: {error}"], result.output
