"""Which records a recipe trains and evaluates on: val_size, default held-out slices, seeded subsets, CSV columns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zopeft.data import load_records, named_splits
from zopeft.recipe import Recipe, RecipeError, load_recipe, parse_overrides
from zopeft.records import template_fields
from zopeft.splits import DataSplits

CLASSES = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]


def sorted_jsonl(path: Path, per_class: int = 10) -> Path:
    """A file sorted by label, as many real files are: the first N rows hold one or two classes."""
    rows = [{"q": f"question {c} {i}", "coarse_label": c} for c in CLASSES for i in range(per_class)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe(dataset: Path | str, **keys) -> Recipe:
    return Recipe(model_name_or_path="m", dataset=str(dataset), task="classification", template="{q}",
                  label_field="coarse_label", label_words={c: f" {c.lower()}" for c in CLASSES}, **keys)


def keys_of(records: list[dict]) -> set[str]:
    return {r["q"] for r in records}


def test_a_local_file_holds_out_a_default_slice_that_is_never_trained_on(tmp_path):
    data = DataSplits(recipe(sorted_jsonl(tmp_path / "train.jsonl")))
    train, evaluated = data.train, data.eval
    assert len(evaluated.records) == 6 and len(train.records) == 54  # ceil(10% of 60)
    assert not keys_of(train.records) & keys_of(evaluated.records)
    assert evaluated.description == "train.jsonl, held out by val_size 0.1 with seed 42 (6 records)"
    assert train.description == "train.jsonl (54 records; 6 more held out for evaluation)"
    (note,) = data.notes()
    assert note.startswith("val_size: train.jsonl has no dev or validation split and no eval_dataset is given: 6 of its 60 records")
    assert "never trained on" in note and "set val_size (0: none) or eval_dataset" in note


@pytest.mark.parametrize("val_size,held", [(0.25, 15), (7, 7)])
def test_val_size_is_a_fraction_or_a_count_drawn_with_the_seed(tmp_path, val_size, held):
    path = sorted_jsonl(tmp_path / "train.jsonl")
    first, again = (DataSplits(recipe(path, val_size=val_size)) for _ in range(2))
    assert first.held_out == again.held_out and len(first.held_out) == held
    assert first.held_out != DataSplits(recipe(path, val_size=val_size, seed=1)).held_out
    assert not keys_of(first.train.records) & keys_of(first.eval.records)
    assert first.notes() == []  # chosen, not a default


def test_val_size_zero_trains_on_everything_and_evaluates_nothing(tmp_path):
    data = DataSplits(recipe(sorted_jsonl(tmp_path / "train.jsonl"), val_size=0))
    assert data.eval is None and len(data.train.records) == 60
    assert any("nothing is evaluated" in note for note in data.notes())
    with pytest.raises(RecipeError, match="split dev: train.jsonl has no evaluation records"):
        data.split("dev")
    with pytest.raises(RecipeError, match="split: 'test' is not one of dev, train"):
        data.split("test")


def test_holding_out_everything_is_refused(tmp_path):
    with pytest.raises(RecipeError, match="val_size: holding out 60 of the 60 records of train.jsonl leaves none"):
        _ = DataSplits(recipe(sorted_jsonl(tmp_path / "train.jsonl"), val_size=60)).train


def watching(**select) -> dict:
    return {"zo": {"guard": {"watch": "eval", **select}}, "eval_steps": 10}


def test_the_guards_records_are_held_out_after_val_sizes_and_never_trained_on(tmp_path):
    path = sorted_jsonl(tmp_path / "train.jsonl")
    plain, data = DataSplits(recipe(path, val_size=6)), DataSplits(recipe(path, val_size=6, **watching(select_size=0.2)))
    assert data.held_out == plain.held_out and data.eval.records == plain.eval.records  # val_size's records unchanged
    assert len(data.select.records) == 12 and len(data.train.records) == 42  # ceil(20% of 60); 60 - 6 - 12
    assert not keys_of(data.select.records) & (keys_of(data.train.records) | keys_of(data.eval.records))
    assert keys_of(data.select.records) <= keys_of(plain.train.records)
    assert data.select.description == "train.jsonl, held out by zo.guard.select_size 0.2 with seed 42 (12 records)"
    assert data.train.description == "train.jsonl (42 records; 6 more held out for evaluation; 12 for the guard to judge)"
    assert data.split("select") is data.select
    assert plain.select is None
    with pytest.raises(RecipeError, match="split select: the recipe holds out no records for the guard; set zo.guard"):
        plain.split("select")
    reseeded = DataSplits(recipe(path, val_size=6, seed=1, **watching(select_size=0.2)))
    assert keys_of(reseeded.select.records) != keys_of(data.select.records)  # drawn with the seed
    with pytest.raises(RecipeError, match="val_size and zo.guard.select_size: holding out 60 of the 60 records"):
        _ = DataSplits(recipe(path, val_size=6, **watching(select_size=54))).train


@pytest.mark.parametrize("overrides,error", [
    (["zo.guard.select_size=100", "zo.guard.watch=loss"], "zo.guard: select_size: the records the guard judges when "
                                                          "it watches the evaluations, but it watches the loss; set "
                                                          "zo.guard.watch: eval"),
    (["zo.guard.select_size=1.5", "zo.guard.watch=eval", "eval_steps=5"],
     "zo.guard.select_size: a fraction below 1 (e.g. 0.1) or a count of records (e.g. 200), got 1.5"),
])
def test_select_size_needs_a_guard_on_the_evaluations(overrides, error):
    with pytest.raises(RecipeError) as err:
        load_recipe(None, ["model_name_or_path=m", "dataset=sst2", *overrides], check_files=False)
    assert err.value.errors == [error + err.value.errors[0][len(error):]], err.value.errors
    adamw = load_recipe(None, ["model_name_or_path=m", "dataset=sst2", "zo.guard.watch=eval", "eval_steps=5",
                               "zo.guard.select_size=100", "zo.optimizer=adamw"], check_files=False)
    assert adamw.notes() == ["zo.guard.select_size: adamw trains without the guard: the records it holds out are not "
                             "trained on and pick the best model, as in a ZO run of the recipe"]


def test_select_size_under_the_default_watch(tmp_path):
    """AdamW keeps a ZO run's held-out records (comparable baselines); ZO judges them every eval_steps, so it needs
    eval_steps."""
    from test_cli import invoke, write_recipe

    adamw = write_recipe(tmp_path, max_steps=2, learning_rate=1e-3,
                         zo={"optimizer": "adamw", "guard": {"select_size": 12}})
    validated = invoke("validate", adamw)
    assert validated.exit_code == 0 and "guard: off" in validated.output, validated.output
    trained = invoke("train", adamw)
    assert trained.exit_code == 0, trained.output
    assert "best model judges sst2 train split, held out by zo.guard.select_size 12" in trained.output
    zo = write_recipe(tmp_path, zo={"optimizer": "mezo", "guard": {"select_size": 12}})
    refused = invoke("validate", zo, "eval_steps=null")
    assert refused.exit_code == 2 and refused.output.strip().splitlines() == [
        "error: zo.guard.select_size: the guard judges the evaluations every eval_steps, but "
        "eval_steps is null (the run evaluates at its start and end only); set eval_steps (or auto), or drop "
        "select_size"]
    unaffordable = invoke("validate", zo)  # eval_steps: auto: 28 records an evaluation, 48 forwards of training
    assert unaffordable.exit_code == 2 and unaffordable.output.strip().splitlines() == [
        "error: eval_steps: auto makes no evaluation before the end of this run (one evaluation would cost over 25% "
        "of the training's forward passes), and zo.guard judges the evaluations (watch: eval or select_size); set "
        "eval_steps"]
    watched = invoke("validate", zo, "eval_steps=2")
    assert watched.exit_code == 0, watched.output
    assert "guard: watches the accuracy (higher is better) on the guard's records every 2 steps" in watched.output


def test_a_bundled_dataset_evaluates_its_dev_split_and_an_eval_file_is_named(tmp_path):
    data = DataSplits(Recipe(model_name_or_path="m", dataset="sst2", max_eval_samples=64))
    assert data.eval.description == "sst2 dev split (64 of 872 records: max_eval_samples, a fixed random subset)"
    assert data.train.description == "sst2 train split (2000 records)" and data.notes() == []
    path = sorted_jsonl(tmp_path / "my_test.jsonl")
    named = DataSplits(recipe(sorted_jsonl(tmp_path / "train.jsonl"), eval_dataset=str(path)))
    assert named.eval.description == "my_test.jsonl (60 records)" and named.held_out == []
    same = DataSplits(recipe(path, eval_dataset=str(path)))
    assert same.notes() == ["eval_dataset: my_test.jsonl is also the training file: its scores are on records the "
                            "model is trained on"]


def saved_dataset_dict(path: Path, **splits: range) -> Path:
    """A directory written by ``DatasetDict.save_to_disk``; each split's records numbered by ``splits``."""
    datasets = pytest.importorskip("datasets")
    rows = {name: [{"q": f"{name} {i}", "coarse_label": CLASSES[i % 6]} for i in span] for name, span in splits.items()}
    datasets.DatasetDict({name: datasets.Dataset.from_list(r) for name, r in rows.items()}).save_to_disk(str(path))
    return path


def test_a_saved_dataset_dict_trains_on_train_and_evaluates_its_validation_split(tmp_path):
    folder = saved_dataset_dict(tmp_path / "trec", train=range(40), validation=range(12), test=range(30))
    data = DataSplits(recipe(folder))
    assert keys_of(data.train.records) == {f"train {i}" for i in range(40)} and data.held_out == []
    assert keys_of(data.eval.records) == {f"validation {i}" for i in range(12)}  # not held out of train, not test
    assert data.eval.description == "trec validation split (12 records)" and data.notes() == []
    # as eval_dataset: its validation split (its train split used to be read), and no "also the training file"
    again = DataSplits(recipe(folder, eval_dataset=str(folder)))
    assert keys_of(again.eval.records) == keys_of(data.eval.records) and again.notes() == []
    only_test = saved_dataset_dict(tmp_path / "held", train=range(5), test=range(9))
    named = DataSplits(recipe(sorted_jsonl(tmp_path / "train.jsonl"), eval_dataset=str(only_test)))
    assert named.eval.description == "held test split (9 records)" and named.held_out == []
    without = DataSplits(recipe(only_test))  # dataset's test split is never evaluated on by default
    assert len(without.held_out) == 1 and "has no dev or validation split" in without.notes()[0]
    test = data.split("test")  # zopeft eval --split test
    assert keys_of(test.records) == {f"test {i}" for i in range(30)} and test.description == "trec test split (30 records)"
    with pytest.raises(RecipeError, match="split: 'tst' is not one of dev, train, select .*; trec also has validation, "
                                          "test \\(did you mean 'test'\\?\\)"):
        data.split("tst")
    odd = saved_dataset_dict(tmp_path / "odd", a=range(3), b=range(3))
    with pytest.raises(RecipeError, match="eval_dataset: .*odd' has splits a, b, none of them dev, validation, valid, val, eval, test"):
        _ = DataSplits(recipe(folder, eval_dataset=str(odd))).eval


def test_a_data_folder_that_datasets_reads_has_splits_too(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "folder"
    folder.mkdir()
    for name, n in (("train", 20), ("valid", 5), ("test", 7)):
        (folder / f"{name}.jsonl").write_text("".join(
            json.dumps({"q": f"{name} {i}", "coarse_label": CLASSES[i % 6]}) + "\n" for i in range(n)))
    assert named_splits(folder) == ("train", "validation", "test")  # datasets names valid.jsonl "validation"
    data = DataSplits(recipe(folder))
    assert len(data.train.records) == 20 and data.held_out == [] and len(data.eval.records) == 5
    assert data.eval.description == "folder validation split (5 records)"
    assert len(DataSplits(recipe(sorted_jsonl(tmp_path / "t.jsonl"), eval_dataset=str(folder))).eval.records) == 5
    assert len(data.split("test").records) == 7


def test_named_splits_of_what_has_none(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "dataset_dict.json").write_text('{"splits": "train"}')
    assert named_splits(None) == named_splits(tmp_path / "missing") == named_splits(broken) == ()
    assert named_splits(sorted_jsonl(tmp_path / "t.jsonl")) == () and named_splits("sst2") == ("train", "dev")


def test_max_eval_samples_is_a_fixed_random_subset_not_the_first_rows(tmp_path):
    path = sorted_jsonl(tmp_path / "test.jsonl")
    subsets = [DataSplits(recipe(path, eval_dataset=str(path), max_eval_samples=cap, seed=seed)).eval.records
               for cap, seed in ((12, 42), (12, 7), (24, 42))]
    assert subsets[0] == subsets[1]  # the same records whatever the run's seed (and so on resume)
    assert keys_of(subsets[0]) < keys_of(subsets[2])  # a larger cap keeps the smaller one's records
    assert len({r["coarse_label"] for r in subsets[0]}) >= 4  # the first 12 rows hold two classes
    assert subsets[0] == sorted(subsets[0], key=load_records(path).index)  # file order


def test_headerless_csv_with_column_names(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text('"What is AI, really?",DESC\nWho wrote it?,HUM\n')
    assert load_records(path, column_names=["q", "coarse_label"]) == [
        {"q": "What is AI, really?", "coarse_label": "DESC"}, {"q": "Who wrote it?", "coarse_label": "HUM"}]
    with pytest.raises(ValueError, match=r"mine.csv:1: expected 3 fields \(column_names: q, coarse_label, extra\)"):
        load_records(path, column_names=["q", "coarse_label", "extra"])
    with pytest.raises(ValueError, match="column_names: names the columns of a .csv/.tsv file"):
        load_records(sorted_jsonl(tmp_path / "a.jsonl"), column_names=["q"])
    assert load_recipe(None, ["model_name_or_path=m", "dataset=x.csv", "column_names=q, coarse_label"],
                       check_files=False).column_names == ["q", "coarse_label"]
    # a headerless CSV trained on, a JSONL evaluated on: column_names names the CSV's columns only
    mixed = DataSplits(recipe(path, column_names=["q", "coarse_label"], eval_dataset=str(sorted_jsonl(tmp_path / "e.jsonl"))))
    assert len(mixed.train.records) == 2 and len(mixed.eval.records) == 60


@pytest.mark.parametrize("overrides", [["dataset=sst2"], ["dataset=x.jsonl", "eval_dataset=y.json"]])
def test_column_names_without_a_csv_or_tsv_file_is_refused(overrides):
    with pytest.raises(RecipeError, match="column_names: names the columns of .csv/.tsv files without a header row; "
                                          "neither dataset nor eval_dataset is one: drop it"):
        load_recipe(None, ["model_name_or_path=m", "column_names=[a, b]", *overrides], check_files=False)


@pytest.mark.parametrize("overrides,error", [
    (["val_size=0.1", "eval_dataset=sst2"], "val_size: holds records out of dataset for evaluation, but eval_dataset"),
    (["val_size=1.5"], "val_size: a fraction below 1 (e.g. 0.1) or a count of records (e.g. 200), got 1.5"),
    (["num_labels=2", "label_words=[' a', ' b', ' c']"], "num_labels: 2, but label_words name 3 labels"),
    (["task=sft", "label_word_scoring=mean"], "label_word_scoring: ranks the label words of task classification"),
    (["label_words=good"], "label_words: a list of words ([' bad', ' good']) or a mapping of labels to words"),
    (["zo=3"], "zo: a mapping of ZO settings (optimizer: fzoo, eps: 0.001, ...), got 3"),
    (["lora_target=5"], "lora_target: Input should be 'all-linear' or a valid list, got 5"),  # a union: one line
    (["zo.guard=eval"], "zo.guard: true, false or a mapping of guard settings (watch: eval, patience: 3, ...), got "
                        "'eval' (did you mean zo.guard.watch: eval?)"),
])
def test_recipe_errors(overrides, error):
    with pytest.raises(RecipeError) as err:
        load_recipe(None, ["model_name_or_path=m", "dataset=sst2", *overrides], check_files=False)
    assert err.value.errors == [next(e for e in err.value.errors if e.startswith(error))]


def test_text_fields_take_one_name_or_a_comma_separated_list():
    base = ["model_name_or_path=m", "dataset=x.csv"]
    assert load_recipe(None, [*base, "text_fields=sentence"], check_files=False).text_fields == ["sentence"]
    assert load_recipe(None, [*base, "text_fields=q, a"], check_files=False).text_fields == ["q", "a"]


def test_num_labels_follows_the_label_words():
    six = load_recipe(None, ["model_name_or_path=m", "dataset=x.csv", f"label_words={CLASSES}"], check_files=False)
    assert six.num_labels == 6
    assert load_recipe(None, ["model_name_or_path=m", "dataset=rte"], check_files=False).num_labels == 2


def test_template_overrides_read_escapes_and_a_literal_backslash_n_is_noted():
    assert parse_overrides([r"template=Question: {q}\nAnswer:\t\\n", r"output_dir=C:\new"]) == {
        "template": "Question: {q}\nAnswer:\t\\n", "output_dir": "C:\\new"}  # paths keep their backslashes
    literal = Recipe(model_name_or_path="m", dataset="sst2", template=r"Q: {sentence}\nA:")
    assert any(n.startswith("template: holds a backslash + n or t as two characters") for n in literal.notes())
    assert Recipe(model_name_or_path="m", dataset="sst2", template="Q: {sentence}\nA:").notes() == []
    assert Recipe(model_name_or_path="m", dataset="sst2", template="Sentiment:").notes() == [
        "template: 'Sentiment:' names no field of the records: every record gets the same prompt"]
    with pytest.raises(ValueError, match=r"template: 'a \{0\[x\]\}' has a positional field"):
        Recipe(model_name_or_path="m", dataset="sst2", template="a {0[x]}")


def test_one_reading_of_a_templates_fields_serves_the_recipe_and_the_tasks():
    assert template_fields("Q: {question}\n{} {context}") == ["question", "", "context"]  # {}: refused by the recipe
    with pytest.raises(ValueError):
        template_fields("Q: {question")
    with pytest.raises(ValueError, match=r"template: 'a \{\}' has a positional field"):
        Recipe(model_name_or_path="m", dataset="sst2", template="a {}")


@pytest.mark.parametrize("keys,note", [
    (["quantization_bit=8", "double_quantization=true"],
     "double_quantization: acts only with quantization_bit: 4, and quantization_bit is 8; it is ignored"),
    (["quantization_type=fp4"], "quantization_type: acts only with quantization_bit: 4, and quantization_bit is not set"),
    (["finetuning_type=prefix", "lora_rank=4"], "lora_rank: acts only with finetuning_type: lora, and finetuning_type is prefix"),
    (["num_virtual_tokens=8"], "num_virtual_tokens: acts only with finetuning_type: prefix or prompt, and finetuning_type is lora"),
    (["choices_field=options"], "choices_field: acts only with task: multiple_choice, and task is not set; it is ignored"),
    (["save_total_limit=2"], "save_total_limit: limits the checkpoints saved every save_steps, and save_steps is not set"),
    (["warmup_steps=10"], "warmup_steps: lr_scheduler_type constant has no warmup"),
    (["zo.objective=accuracy"], "zo.eps: 0.001 rarely changes a prediction or a generated token, so most steps on "
     "zo.objective accuracy would be skipped"),
    (["task=generation", "zo.objective=exact_match", "zo.eps=5e-3"], "zo.eps: 0.005 rarely changes a prediction"),
])
def test_a_setting_that_cannot_act_in_the_recipe_is_noted(keys, note):
    recipe = load_recipe(None, ["model_name_or_path=m", "dataset=sst2", *keys], check_files=False)
    (only,) = recipe.notes()  # that note, and no other
    assert only.startswith(note)
    acting = {"double_quantization": "quantization_bit=4", "quantization_type": "quantization_bit=4",
              "lora_rank": "finetuning_type=lora", "num_virtual_tokens": "finetuning_type=prompt",
              "choices_field": "task=multiple_choice", "save_total_limit": "save_steps=10",
              "warmup_steps": "lr_scheduler_type=linear", "zo.eps": "zo.eps=1e-2"}[note.split(":")[0]]
    assert load_recipe(None, ["model_name_or_path=m", "dataset=sst2", *keys, acting], check_files=False).notes() == []
