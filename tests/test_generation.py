"""Generation tasks: SQuAD metrics, the stop rule, the task format, generation objectives (batched and
sequential), ZOTrainer, and the CLI (train / eval / generate, every bad input) on tiny models."""

from __future__ import annotations

import json
import logging
import math
import sys
import textwrap

import pytest
import torch
from peft import PrefixTuningConfig, TaskType, get_peft_model
from conftest import VOCAB
from test_batched import peft_model
from test_cli import invoke, tiny_bert_dir, tiny_llm_dir, write_recipe
from test_user_errors import one_error_line
from test_objectives import lora_llm
from transformers import AutoModelForCausalLM, AutoTokenizer

import zopeft
import zopeft.batched.generation as batched_generation
from zopeft.data import load_records
from zopeft.generation import answer_text, greedy_generate
from zopeft.inference import generate as zopeft_generate
from zopeft.objectives import objective_failures, resolve_generation_objective
from zopeft.optim.evaluation_log import evaluation_path
from zopeft.plot import curves
from zopeft.squad_metrics import exact_match, f1, normalize_answer, squad_scores
from zopeft.tasks import IGNORE, build_task

TEMPLATE = "{context}\nQuestion: {question}\nAnswer:"


@pytest.fixture(autouse=True)
def _keep_global_rng():
    state = torch.random.get_rng_state()  # the tiny models seed torch: later modules see the RNG as if these had not run
    yield
    torch.random.set_rng_state(state)


def squad_task(**keys):
    return build_task("generation", **{"template": TEMPLATE, "cutoff_len": 64, "max_new_tokens": 8, **keys})


def squad_records(n: int = 3) -> list[dict]:
    return load_records("squad", "train")[:n]


def generation_recipe(tmp_path, **keys):
    return write_recipe(tmp_path, **{"dataset": "squad", "cutoff_len": 96, "max_new_tokens": 6, "max_train_samples": 16,
                                     "max_eval_samples": 4, "max_steps": 2, **keys})


def talkative_llm():
    """The tiny Llama with SmolLM2's tokenizer and a LoRA whose B is large enough to make it say words."""
    model, tok = lora_llm()
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    return model, tok


def token_batch(tok, rows: int = 3, length: int = 10) -> zopeft.GenerationBatch:
    """Random prompts of the 128-token conftest Llama (SmolLM2's tokenizer decodes those ids), the last two left-padded."""
    ids = torch.randint(4, VOCAB, (rows, length), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :2] = mask[2, :4] = 0
    return zopeft.GenerationBatch({"input_ids": ids * mask, "attention_mask": mask}, [["x"]] * rows, [{}] * rows,
                                  [""] * rows, tok, max_new_tokens=6, stop_strings=())


# ----- SQuAD metrics ---------------------------------------------------------------------------------
def test_squad_metrics_against_hand_checked_cases():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"  # punctuation goes, it is not a space
    assert normalize_answer("An apple, a pear and THE plum") == "apple pear and plum"
    assert exact_match("The Eiffel Tower.", "eiffel tower") == 1.0 and f1("The Eiffel Tower.", "eiffel tower") == 1.0
    assert exact_match("in 1889", "1889") == 0.0
    assert f1("in 1889", "1889") == pytest.approx(2 / 3)  # precision 1/2, recall 1
    assert f1("the cat the cat", "cat") == pytest.approx(2 / 3)  # "cat cat" vs "cat": a bag of words, counted
    assert f1("Denver Broncos", "Carolina Panthers") == 0.0 and f1("", "Broncos") == 0.0
    assert (exact_match("a", "the"), f1("a", "the")) == (1.0, 0.0)  # the script's quirk: both normalise to ""
    scores = squad_scores(["Denver Broncos", "in 1889", "no idea"],
                          [["Broncos", "Denver Broncos"], ["1889", "in 1889 "], ["Paris"]])
    assert scores["exact_match"] == pytest.approx(2 / 3) and scores["f1"] == pytest.approx(2 / 3)  # max over answers
    assert [r["f1"] for r in scores["per_record"]] == [1.0, 1.0, 0.0]
    assert scores["f1_stderr"] == pytest.approx(math.sqrt((2 / 3) * (1 / 3) / 2))  # √(p(1−p)/(n−1)) for 0/1 values


def test_answer_text_skips_leading_white_space_then_cuts_at_the_first_stop_string():
    tok = AutoTokenizer.from_pretrained(tiny_llm_dir())
    ids = tok("\n\n Denver Broncos\nQuestion: who", add_special_tokens=False)["input_ids"]
    assert answer_text(tok, ids) == "Denver Broncos"
    assert answer_text(tok, ids, ["Question:"]) == "Denver Broncos"
    assert answer_text(tok, ids, []) == "Denver Broncos\nQuestion: who"
    assert answer_text(tok, ids + [tok.eos_token_id]) == "Denver Broncos"


def test_generation_stops_per_row_at_a_stop_string_or_eos_and_keeps_its_tokens():
    model, tok = lora_llm()
    batch = squad_task(stop_strings=[":"]).generation_batch(squad_records(), tok)
    free = greedy_generate(model, squad_task(stop_strings=[]).generation_batch(squad_records(), tok))
    stopped = greedy_generate(model, batch)
    assert all(len(row) == 8 for row in free)  # no stop string, no EOS: max_new_tokens
    for full, cut in zip(free, stopped):  # the same tokens up to the first one whose text holds ":"
        assert full[: len(cut)] == cut
        assert cut == full if ":" not in tok.decode(full) else ":" in tok.decode(cut) and ":" not in tok.decode(cut[:-1])
    assert any(len(cut) < 8 for cut in stopped), "the tiny model must say ':' for this test"
    eos = tok.eos_token_id
    model.generation_config.eos_token_id = free[0][2]  # the model's own EOS: the row ends before it
    try:
        assert greedy_generate(model, squad_task(stop_strings=[]).generation_batch(squad_records(1), tok))[0] == \
            free[0][: free[0].index(free[0][2])]
    finally:
        model.generation_config.eos_token_id = eos


# ----- the task format -------------------------------------------------------------------------------
def test_training_batch_is_the_first_answer_after_the_prompt_then_eos():
    tok = AutoTokenizer.from_pretrained(tiny_llm_dir())
    record = {"context": "Paris is in France.", "question": "Where is Paris?", "answers": ["France", "in France"]}
    batch = squad_task(cutoff_len=128).collate([record], tok)
    labelled = batch["labels"][0][batch["labels"][0] != IGNORE].tolist()
    assert labelled == tok(" France", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    prompt = batch["input_ids"][0][batch["labels"][0] == IGNORE].tolist()
    assert tok.decode(prompt) == "Paris is in France.\nQuestion: Where is Paris?\nAnswer:"


def test_a_long_prompt_loses_the_start_of_its_context_never_the_question():
    tok = AutoTokenizer.from_pretrained(tiny_llm_dir())
    record = {"context": " ".join(f"word{i}" for i in range(200)), "question": "Which word comes last?", "answers": ["x"]}
    task = squad_task(cutoff_len=48, max_new_tokens=8)
    tokens = task.prompt_tokens(record, tok)
    text = tok.decode(tokens)
    assert len(tokens) == 40 and text.endswith("word199\nQuestion: Which word comes last?\nAnswer:")
    assert "word0 " not in text
    batch = task.generation_batch([record, {**record, "context": "short"}], tok)
    assert batch.inputs["attention_mask"][1].tolist()[0] == 0 and batch.inputs["attention_mask"][:, -1].all()  # left-padded
    long_question = {**record, "question": " ".join(["why"] * 60)}
    with pytest.raises(ValueError, match="cutoff_len: 48 leaves 40 tokens for the prompt.*without its field 'context'"):
        task.prompt_tokens(long_question, tok)


@pytest.mark.parametrize("answers,expected", [
    ([], "answer field 'answers' is an empty list"),
    ([3], "answer 0 is a int (3), not text"),
    (["Paris", " "], "answer 1 is empty"),
    (7, "holds a int (7), not an answer text"),
])
def test_bad_answers_are_one_clear_line(answers, expected):
    with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        squad_task().check({"context": "c", "question": "q", "answers": answers})
    with pytest.raises(KeyError, match="no answer field 'answer'.*did you mean 'answers'"):
        squad_task(answer_field="answer").check({"context": "c", "question": "q", "answers": ["a"]})
    task = squad_task()
    assert task.answers({"answers": '["Broncos", "Denver Broncos"]'}) == ["Broncos", "Denver Broncos"]  # a CSV cell
    assert task.answers({"answers": {"text": ["a", "b"], "answer_start": [0, 3]}}) == ["a", "b"]  # HF's SQuAD layout


def test_evaluation_generates_scores_and_reports_the_teacher_forced_loss():
    model, tok = talkative_llm()
    task = squad_task()
    records = squad_records(4)
    said = squad_task().generation_batch(records, tok)
    answers = said.texts(greedy_generate(model, said))
    assert all(answers), "the tiny model must say something for this test"
    scored = [{**records[0], "answers": [answers[0]]}, {**records[1], "answers": ["certainly not this"]}]
    metrics = task.evaluate(model, tok, [scored[0], scored[1], records[2]], batch_size=2)
    assert (metrics["exact_match"], metrics["f1"], metrics["n"]) == (pytest.approx(1 / 3), pytest.approx(1 / 3), 3)
    rows = metrics["generations"]
    assert [r["generation"] for r in rows] == answers[:3] and rows[0]["answers"] == [answers[0]]
    assert (rows[0]["exact_match"], rows[1]["f1"]) == (1.0, 0.0) and rows[0]["prompt"].endswith("\nAnswer:")
    with torch.no_grad():
        loss = model(**task.collate([scored[0], scored[1], records[2]], tok)).loss.item()
    assert metrics["loss"] == pytest.approx(loss, rel=1e-4)


# ----- objectives on generations: batched = sequential ------------------------------------------------
@pytest.mark.parametrize("kind,quant", [("lora", None), ("lora", "nf4"), ("ia3", None), ("prompt", None)])
def test_batched_generations_equal_the_sequential_ones_token_for_token(kind, quant, monkeypatch):
    model = peft_model("llama", kind, quant)
    batch = token_batch(AutoTokenizer.from_pretrained(tiny_llm_dir()))
    start = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    generated, values = {}, {}
    real = batched_generation.greedy_generate
    for batched in (False, True):
        calls = generated[batched] = []
        monkeypatch.setattr(batched_generation, "greedy_generate",
                            lambda m, b, replicas=1: calls.append(real(m, b, replicas)) or calls[-1])
        with torch.no_grad():
            for p, s in zip((p for p in model.parameters() if p.requires_grad), start):
                p.copy_(s)
        opt = zopeft.FZOO(model, lr=1e-3, eps=0.5, n_perturbations=4, seed=1, batched=batched)
        opt.step(zopeft.generation_closure(model, batch, lambda gens, records: float(len("".join(gens)))))
        assert evaluation_path(opt) == ("batched" if batched else None)
        values[batched] = opt.step_log[-1]["losses"]
    sequential, (one_call,) = generated[False], generated[True]  # the 5 points in ONE generate call
    assert len(sequential) == 5 and len(one_call) == 5 * len(batch)
    assert [one_call[r * 3 : (r + 1) * 3] for r in range(5)] == sequential  # row r·B + b: replica r of prompt b
    assert len({json.dumps(s) for s in sequential}) > 1, "the points must generate differently for this to mean much"
    assert values[True] == values[False]


def test_unsupported_adapters_generate_point_by_point_with_one_warning(caplog):
    model = peft_model("llama", "dora")
    batch = token_batch(AutoTokenizer.from_pretrained(tiny_llm_dir()))
    opt = zopeft.FZOO(model, lr=1e-3, eps=1e-2, n_perturbations=3)
    with caplog.at_level(logging.INFO, logger="zopeft"):
        opt.step(zopeft.generation_closure(model, batch, "f1"))
        opt.step(zopeft.generation_closure(model, batch, "f1"))
    warnings = [r.message for r in caplog.records if r.name == "zopeft" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "sequential evaluation" in warnings[0] and "LoRA variant" in warnings[0]
    assert opt.forward_passes == 8 and opt.step_log[-1]["losses"][0] == pytest.approx(1.0)  # 1 - F1 of random tokens


@pytest.mark.parametrize("name", ["mezo", "adamezo", "hizoo"])
def test_every_optimizer_takes_the_generation_objectives(name):
    model, tok = lora_llm()
    batch = squad_task().generation_batch(squad_records(2), tok)
    opt = zopeft.get_optimizer(name, model, lr=1e-3, eps=1e-2, batched=True)
    opt.step(zopeft.generation_closure(model, batch, "exact_match"))
    assert all(x == 1.0 for x in opt.step_log[-1]["losses"])  # a random model matches no answer
    assert opt.skipped_steps == 1 and evaluation_path(opt) == "batched"  # flat: skipped and counted


@pytest.mark.parametrize("body", ["raise RuntimeError('boom')", "return None", "return 'high'"])
def test_a_user_objective_that_fails_skips_the_step_and_is_counted(tmp_path, monkeypatch, caplog, body):
    (tmp_path / "bad_reward.py").write_text(f"def reward(generations, records):\n    {body}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("bad_reward", None)
    model, tok = lora_llm()
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    objective = resolve_generation_objective("python:bad_reward:reward")
    opt = zopeft.FZOO(model, lr=1e-2, eps=1e-2, n_perturbations=3)
    batch = squad_task().generation_batch(squad_records(2), tok)
    with caplog.at_level(logging.WARNING, logger="zopeft"):
        for _ in range(2):
            opt.step(zopeft.generation_closure(model, batch, objective))
    assert opt.skipped_steps == 2 and opt.step_log[-1]["skipped"] == "non-finite loss"
    assert all(torch.equal(b, p) for b, p in zip(before, (p for p in model.parameters() if p.requires_grad)))
    shown = [r.message for r in caplog.records if "bad_reward" in r.message]
    assert len(shown) == 1 and "f(generations, records)" in shown[0]
    assert objective.failures == 2 and "failed 2 times" in objective_failures(objective)


def test_a_user_objective_gets_the_generations_and_records(tmp_path, monkeypatch):
    (tmp_path / "length_reward.py").write_text(textwrap.dedent("""
        def reward(generations, records):
            assert isinstance(generations[0], str) and "question" in records[0]
            return -sum(map(len, generations)) / len(generations)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    model, tok = lora_llm()
    batch = squad_task().generation_batch(squad_records(2), tok)
    value = zopeft.generation_closure(model, batch, "python:length_reward:reward")()
    texts = batch.texts(greedy_generate(model, batch))
    assert float(value) == -sum(map(len, texts)) / 2
    sys.modules.pop("length_reward", None)


def test_library_batch_refuses_what_it_cannot_score():
    model, tok = lora_llm()
    batch = zopeft.generation_batch(tok, ["Q: 2+2?\nA:"], max_new_tokens=4)
    with pytest.raises(ValueError, match="objective f1 scores against gold answers"):
        zopeft.generation_closure(model, batch, "f1")
    with pytest.raises(ValueError, match="max_new_tokens: a count of new tokens from 1 to 1024, got 0"):
        zopeft.generation_batch(tok, ["Q"], [["a"]], max_new_tokens=0)
    with pytest.raises(ValueError, match="'accuracy' scores candidates"):
        zopeft.generation_closure(model, zopeft.generation_batch(tok, ["Q"], ["a"]), "accuracy")
    prefix = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llm_dir()),
                            PrefixTuningConfig(num_virtual_tokens=2, task_type=TaskType.CAUSAL_LM)).eval()
    with pytest.raises(ValueError, match="prefix tuning cannot generate here"):
        zopeft.generation_closure(prefix, zopeft.generation_batch(tok, ["Q"], ["a"]), "f1")


# ----- ZOTrainer ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("objective", ["f1", None])
def test_zotrainer_trains_on_generations_through_the_collator(tmp_path, objective):
    from datasets import Dataset
    from transformers import TrainingArguments

    model, tok = lora_llm()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                             report_to=[], remove_unused_columns=False, use_cpu=True, save_strategy="no")
    trainer = zopeft.ZOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(squad_records(4)),
        data_collator=zopeft.GenerationCollator(tok, template=TEMPLATE, cutoff_len=64, max_new_tokens=4),
        zo_objective=objective, zo_kwargs={"eps": 0.5, "n_perturbations": 2},
    )
    trainer.train()
    steps = trainer.zo_optimizer.step_log
    assert len(steps) == 2
    if objective == "f1":
        assert all(0.0 <= x <= 1.0 for r in steps for x in r["losses"])  # 1 - F1, not a cross-entropy
    else:
        assert all(x > 5 for r in steps for x in r["losses"])  # the first answer's loss
    assert trainer.evaluate(Dataset.from_list(squad_records(2)))["eval_loss"] > 0


# ----- the CLI ------------------------------------------------------------------------------------------
def test_cli_trains_on_f1_evaluates_by_generation_and_generates(tmp_path):
    recipe = generation_recipe(tmp_path, eval_steps=1, zo={"optimizer": "fzoo", "n_perturbations": 2, "objective": "f1",
                                                             "eps": 0.5})
    shown = invoke("validate", recipe)
    assert shown.exit_code == 0 and "task: generation (from dataset squad)" in shown.output
    assert "answers of the first training record (answers): [\"" in shown.output and "prompt room: 90 tokens" in shown.output
    result = invoke("train", recipe)
    # a random tiny model answers nothing right: every point's F1 is 0, so each step is skipped and the run says
    # that no step trained (status 1) after writing and evaluating it as any other
    assert result.exit_code == 1 and "error: no step trained: all 2 steps were skipped" in result.output, result.output
    out = tmp_path / "out"
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    evals = [r for r in log if "eval_f1" in r]
    assert len(evals) == 3 and all({"eval_exact_match", "eval_loss", "eval_f1_stderr"} <= r.keys() for r in evals)
    assert not any("eval_generations" in r for r in log)
    right = curves(log).axes[1]  # the plot's right panel: the F1 and exact-match curves
    assert right.get_legend_handles_labels()[1] == ["F1", "exact match"]
    assert list(right.lines[0].get_ydata()) == [r["eval_f1"] for r in evals]
    steps = [json.loads(line) for line in (out / "zo_steps.jsonl").read_text().splitlines()]
    assert all(0 <= x <= 1 for r in steps for x in r["losses"])
    assert "eval on squad dev split (4 of 500 records: max_eval_samples, a fixed random subset): F1 " in result.output

    evaluated = invoke("eval", recipe, "--adapter", out)
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads((out / "eval_dev.json").read_text())
    assert {"f1", "exact_match", "loss", "n"} <= metrics.keys() and "generations" not in metrics
    assert metrics["f1"] == pytest.approx(evals[-1]["eval_f1"])
    rows = [json.loads(line) for line in (out / "generations_dev.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all({"prompt", "generation", "answers", "f1", "exact_match"} <= r.keys() for r in rows)

    said = invoke("generate", out, "--prompt", "Paris is in France.\\nQuestion: Where is Paris?\\nAnswer:")
    assert said.exit_code == 0, said.output
    (expected,) = zopeft_generate(out, prompts=["Paris is in France.\nQuestion: Where is Paris?\nAnswer:"])
    assert said.output.splitlines()[-1] == expected["generation"]  # \n typed on the command line is a newline
    records = tmp_path / "mine.jsonl"
    records.write_text(json.dumps({"context": "c", "question": "q?", "answers": ["x"]}) + "\n"
                       + json.dumps({"context": "c2", "question": "q2?"}) + "\n")
    lines = invoke("generate", out, "--file", records, "--max-new-tokens", 3)
    assert lines.exit_code == 0, lines.output
    first, second = (json.loads(x) for x in lines.output.strip().splitlines()[-2:])
    assert first["prompt"] == "c\nQuestion: q?\nAnswer:" and first["f1"] == 0.0 and "f1" not in second


def test_cli_generate_from_a_merged_model_and_with_adamw(tmp_path):
    recipe = generation_recipe(tmp_path, zo={"optimizer": "adamw"}, learning_rate=1e-3)
    result = invoke("train", recipe)
    assert result.exit_code == 0, result.output
    assert "2 forward + 2 backward passes" in result.output
    merged = invoke("merge", "--adapter", tmp_path / "out", "--out", tmp_path / "merged", "--dtype", "fp32")
    assert merged.exit_code == 0, merged.output
    prompt = "Paris is in France.\\nQuestion: Where is Paris?\\nAnswer:"
    from_run = invoke("generate", tmp_path / "out", "--prompt", prompt, "--max-new-tokens", 4)
    from_merged = invoke("generate", tmp_path / "merged", "--prompt", prompt, "--max-new-tokens", 4)
    assert from_run.exit_code == from_merged.exit_code == 0, from_merged.output
    assert from_run.output.splitlines()[-1] == from_merged.output.splitlines()[-1]  # the same model, merged
    records = tmp_path / "mine.jsonl"
    records.write_text(json.dumps({"context": "c", "question": "q?"}) + "\n")
    no_template = invoke("generate", tmp_path / "merged", "--file", records)
    assert no_template.exit_code == 2 and "--file: records are formatted with the recipe's template" in no_template.output


def test_a_users_csv_of_the_same_shape_is_a_generation_dataset(tmp_path):
    data = tmp_path / "qa.csv"
    paris = '"Paris is in France.",Where is Paris?,"[""France"", ""in France""]"\n'
    data.write_text("passage,question,answers\n" + paris * 4 + "Rome is in Italy.,Where is Rome?,Italy\n" * 4)
    recipe = generation_recipe(tmp_path, dataset=str(data), task="generation", template="{passage}\nQuestion: {question}"
                               "\nAnswer:", max_train_samples=None, max_eval_samples=None, val_size=2)
    shown = invoke("validate", recipe)
    assert shown.exit_code == 0, shown.output
    assert 'answers of the first training record (answers): ["' in shown.output and "eval: qa.csv, held out" in shown.output
    result = invoke("eval", recipe, "--split", "train")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "out" / "generations_train.jsonl").read_text().splitlines()]
    assert len(rows) == 6  # 8 records, 2 held out by val_size
    assert {json.dumps(r["answers"]) for r in rows} == {'["France", "in France"]', '["Italy"]'}  # a JSON list, or a text


BAD_RECORDS = {
    "no_answer_field": {"context": "c", "question": "q"},
    "empty_answers": {"context": "c", "question": "q", "answers": []},
    "answer_not_text": {"context": "c", "question": "q", "answers": [42]},
}


@pytest.mark.parametrize("case,keys,expected", [
    ("no_answer_field", {}, "record has no answer field 'answers'"),
    ("empty_answers", {}, "answer field 'answers' is an empty list"),
    ("answer_not_text", {}, "answer 0 is a int (42), not text"),
    (None, {"max_new_tokens": 0}, "max_new_tokens: Input should be greater than or equal to 1"),
    (None, {"max_new_tokens": 2000}, "max_new_tokens: Input should be less than or equal to 1024"),
    (None, {"max_new_tokens": 96}, "max_new_tokens: 96 leaves no room for the prompt in cutoff_len 96"),
    (None, {"zo": {"objective": "accuracy"}}, "zo.objective: accuracy scores candidates"),
    (None, {"zo": {"objective": "f1"}, "dataset": "sst2"}, "zo.objective: f1 scores generated answers (task generation), "
                                                           "and task is classification"),
    (None, {"zo": {"objective": "exact_mach"}}, "(did you mean 'exact_match'?)"),
    (None, {"finetuning_type": "prefix"}, "finetuning_type: prefix: task generation is scored by generating"),
    (None, {"stop_strings": [""]}, "stop_strings: an empty string ends every answer at once"),
])
def test_every_bad_generation_input_is_one_line_exit_2_and_nothing_written(tmp_path, case, keys, expected):
    if case is not None:
        data = tmp_path / "qa.jsonl"
        good = {"context": "Paris is in France.", "question": "Where is Paris?", "answers": ["France"]}
        data.write_text("".join(json.dumps(r) + "\n" for r in [good] * 5 + [BAD_RECORDS[case]] + [good] * 4))
        keys = {"dataset": str(data), "task": "generation", "template": TEMPLATE, "max_train_samples": None,
                "max_eval_samples": None, **keys}
    recipe = generation_recipe(tmp_path, **keys)
    for command in ("validate", "train") if case is None else ("train",):
        result = invoke(command, recipe)
        assert result.exit_code == 2, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0] and "Traceback" not in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_a_run_whose_objective_fails_finishes_and_says_so(tmp_path, monkeypatch):
    (tmp_path / "flaky_reward.py").write_text("def reward(generations, records):\n    raise ValueError('no score')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = generation_recipe(tmp_path, zo={"optimizer": "fzoo", "n_perturbations": 2,
                                             "objective": "python:flaky_reward:reward"})
    result = invoke("train", recipe)
    assert result.exit_code == 1 and "error: no step trained" in result.output, result.output  # every step failed
    assert ("warning: zo.objective python:flaky_reward:reward failed 2 times (first: ValueError: no score); a step "
            "with a failed point is skipped") in result.output
    steps = [json.loads(line) for line in (tmp_path / "out" / "zo_steps.jsonl").read_text().splitlines()]
    assert [s["skipped"] for s in steps if "losses" in s] == ["non-finite loss"] * 2  # (and the guard's rollbacks)
    sys.modules.pop("flaky_reward", None)


def test_generate_refuses_what_is_not_a_model_source(tmp_path):
    for args, expected in [
        ((tmp_path / "nowhere", "--prompt", "x"), "SOURCE: "),
        ((tmp_path, "--prompt", "x"), "holds neither adapter_config.json nor config.json"),
        ((generation_recipe(tmp_path),), "give --prompt TEXT or --file RECORDS"),
        ((generation_recipe(tmp_path), "--prompt", "x", "--max-new-tokens", 0), "max_new_tokens: a count of new tokens"),
    ]:
        result = invoke("generate", *args)
        assert result.exit_code == 2 and expected in result.output, result.output
        assert len([x for x in result.output.splitlines() if x.startswith("error:")]) == 1


def test_generate_refuses_a_classifier_run_and_an_empty_prompt_with_one_line(tmp_path):
    recipe = write_recipe(tmp_path, model_name_or_path=tiny_bert_dir(), task="sequence_classification",
                          lora_target=["query", "value"], modules_to_save=["classifier"], max_steps=1)
    assert invoke("train", recipe).exit_code == 0
    one_error_line(invoke("generate", tmp_path / "out", "--prompt", "x"), "sequence_classification model",
                   "needs a causal LM")
    one_error_line(invoke("generate", generation_recipe(tmp_path), "--prompt", "x", "--prompt", ""),
                   "prompt 2 ('') has no tokens")
    with pytest.raises(ValueError, match="has no tokens"):
        zopeft.generation_batch(AutoTokenizer.from_pretrained(tiny_llm_dir()), [""])
