"""Objectives only ZO can optimise (zopeft.objectives): values, batched == sequential, flat steps."""

from __future__ import annotations

import json
import math
import sys
import textwrap

import pytest
import torch
from conftest import tiny_model
from peft import LoraConfig, PromptTuningConfig, TaskType, get_peft_model
from test_cli import tiny_llm_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

import zopeft
from zopeft.data import load_records
from zopeft.objectives import (
    accuracy_error, candidate_cross_entropy, clipped_margin, objective_failures, resolve_objective,
)
from zopeft.optim.evaluation_log import evaluation_path
from zopeft.tasks import build_task

TEMPLATE = "Review: {sentence}\nSentiment:"


def lora_llm(adapter: str = "lora"):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llm_dir())
    config = (LoraConfig(r=4, target_modules=["q_proj", "v_proj"]) if adapter == "lora"
              else PromptTuningConfig(num_virtual_tokens=3, task_type=TaskType.CAUSAL_LM))
    model = get_peft_model(base, config).eval()
    with torch.no_grad():  # B = 0 would hide the LoRA perturbations of A
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model, AutoTokenizer.from_pretrained(tiny_llm_dir())


def sentiment_batch(tokenizer, n: int) -> zopeft.CandidateBatch:
    """The first ``n`` SST-2 training reviews, scored on the label words."""
    records = load_records("sst2", "train")[:n]
    return zopeft.candidate_batch(tokenizer, [TEMPLATE.format(**r) for r in records], [" negative", " positive"],
                                  [r["label"] for r in records])


def trainable(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


def test_objective_functions_by_hand():
    scores = torch.tensor([[-0.1, -2.0, -3.0], [-1.0, -0.5, -4.0], [-2.0, -2.2, -0.1]])
    gold = torch.tensor([0, 0, 2])
    assert accuracy_error(scores, gold) == pytest.approx(1 / 3)
    # best other - gold, clipped to [-1, 1]: (-2.0+0.1) -> -1, (-0.5+1.0) = 0.5, (-2.0+0.1) -> -1
    assert clipped_margin(scores, gold) == pytest.approx((-1 + 0.5 - 1) / 3)
    # -log of the gold candidate's share of the candidates' probabilities, mean over examples
    shares = [0.9048 / (0.9048 + 0.1353 + 0.0498), 0.3679 / (0.3679 + 0.6065 + 0.0183), 0.9048 / (0.1353 + 0.1108 + 0.9048)]
    assert candidate_cross_entropy(scores, gold) == pytest.approx(-sum(map(math.log, shares)) / 3, rel=1e-3)


def test_python_objectives_and_clear_errors(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def top2_miss(scores, gold):
            return float((scores.topk(2).indices != gold[:, None]).all(-1).float().mean())

        def per_example(scores, gold):
            return scores.argmax(-1) != gold  # a tensor per example, not one number
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = resolve_objective("python:my_rewards:top2_miss")
    assert fn(torch.tensor([[0.0, -1.0, -2.0]]), torch.tensor([2])) == 1.0
    with pytest.raises(ValueError, match="did you mean 'accuracy'"):
        resolve_objective("acuracy")
    with pytest.raises(ValueError, match="cannot import nope from my_rewards"):
        resolve_objective("python:my_rewards:nope")
    with pytest.raises(ValueError, match="python:MODULE:FUNCTION"):
        resolve_objective("python:my_rewards")
    per_example = resolve_objective("python:my_rewards:per_example")
    assert math.isnan(per_example(torch.zeros(2, 3), torch.tensor([0, 1])))  # no number: the step is skipped
    assert objective_failures(per_example) == (
        "zo.objective python:my_rewards:per_example failed 1 time (first: it returned a Tensor (tensor([False,  "
        "True])), not a number); a step with a failed point is skipped (counted in skipped_steps). It is called as "
        "f(scores, gold): log-probabilities (examples, candidates) and gold indices (examples,); it returns one "
        "number to minimise")
    assert objective_failures(fn) is None and resolve_objective(per_example) is per_example
    sys.modules.pop("my_rewards", None)


@pytest.mark.parametrize("kind", ["classification", "multiple_choice"])
def test_accuracy_objective_is_one_minus_the_task_accuracy(kind):
    model, tok = lora_llm()
    if kind == "classification":
        task = build_task("classification", template=TEMPLATE, label_words={0: " negative", 1: " positive"}, cutoff_len=48)
        records = load_records("sst2", "dev")[:12]
    else:  # several tokens per choice: one row per (example, choice), mean log-prob per token
        task = build_task("multiple_choice", cutoff_len=48)
        records = [{"premise": r["sentence"][:60], "choices": ["a dull and tiring film", "great fun"], "label": r["label"]}
                   for r in load_records("sst2", "dev")[:12]]
    batch = task.candidate_batch(records, tok)
    assert (batch.candidate_tokens is not None) == (kind == "classification")
    accuracy = task.evaluate(model, tok, records)["accuracy"]
    with torch.no_grad():
        value = zopeft.metric_closure(model, batch, "accuracy")()
    assert float(value) == pytest.approx(1 - accuracy)


@pytest.mark.parametrize("case", ["label_words", "choices", "prompt_tuning", "seq_cls"])
def test_batched_objective_equals_sequential(case):
    """Every point's objective, replicas in one forward pass vs one forward each; the margin moves with ε."""
    if case == "seq_cls":
        model = get_peft_model(tiny_model("bert"), LoraConfig(r=4, target_modules=["query", "value"],
                                                              task_type=TaskType.SEQ_CLS)).eval()
        ids = torch.randint(4, 128, (6, 10), generator=torch.Generator().manual_seed(0))
        labels = torch.tensor([0, 1, 1, 0, 1, 0])
        batch = zopeft.CandidateBatch({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels},
                                      labels, 2)
    else:
        model, tok = lora_llm("prompt" if case == "prompt_tuning" else "lora")
        records = load_records("sst2", "train")[:6]
        prompts = [TEMPLATE.format(**r) for r in records]
        choices = [" negative", " positive"] if case != "choices" else [[" bad movie", " good one"]] * 6
        batch = zopeft.candidate_batch(tok, prompts, choices, [r["label"] for r in records], cutoff_len=48)
    losses = {}
    trainable = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in trainable]
    for batched in (False, True):
        with torch.no_grad():  # both paths from the same weights
            for p, s in zip(trainable, start):
                p.copy_(s)
        opt = zopeft.FZOO(model, lr=1e-3, eps=5e-2, n_perturbations=4, seed=1, batched=batched)
        opt.step(zopeft.metric_closure(model, batch, "margin"))
        assert evaluation_path(opt) == ("batched" if batched else None)  # no silent fallback to sequential
        losses[batched] = opt.step_log[-1]["losses"]
    assert len(set(losses[False])) > 1
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["classification", "multiple_choice"])
def test_candidate_loss_is_the_candidate_ce_objective_with_a_gradient_on_the_adapter_only(kind):
    model, tok = lora_llm()
    records = load_records("sst2", "train")[:6]
    prompts = [TEMPLATE.format(**r) for r in records]
    choices = [" negative", " positive"] if kind == "classification" else [[" a dull film", " great fun"]] * 6
    batch = zopeft.candidate_batch(tok, prompts, choices, [r["label"] for r in records], cutoff_len=48)
    with torch.no_grad():
        objective = float(zopeft.metric_closure(model, batch, "candidate_ce")())
        vocabulary_loss = float(model(**batch.inputs).loss)
    loss = zopeft.candidate_loss(model, batch)
    assert float(loss) == pytest.approx(objective, rel=1e-5) and objective != pytest.approx(vocabulary_loss)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads) and any(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("value,shown", [("0.5", "str ('0.5')"), (None, "NoneType (None)"), (True, "bool (True)"),
                                         (torch.ones(2), "Tensor (tensor([1., 1.]))")])
def test_an_objective_that_returns_no_number_skips_the_step_and_says_why(value, shown, caplog):
    model, tok = lora_llm()
    batch = sentiment_batch(tok, 4)
    before = trainable(model)
    opt = zopeft.FZOO(model, lr=1e-2, eps=1e-2, n_perturbations=2)

    def reward(scores, gold):
        return value

    with caplog.at_level("WARNING", logger="zopeft"):
        opt.step(zopeft.metric_closure(model, batch, reward))
    assert opt.last_stats["skipped"].startswith("non-finite") and opt.skipped_steps == 1
    assert f"objective reward failed (it returned a {shown}, not a number); the step is skipped. It is called as " \
           "f(scores, gold)" in caplog.text
    assert all(map(torch.equal, before, trainable(model)))
    opt.step(zopeft.metric_closure(model, batch, "margin"))  # the user's mistake did not turn batching off
    assert evaluation_path(opt) == "batched" and opt.skipped_steps == 1


def test_cli_says_that_an_objective_returned_no_number_and_that_no_step_trained(tmp_path, monkeypatch):
    from test_cli import invoke, write_recipe

    (tmp_path / "my_scores.py").write_text("def label(scores, gold):\n    return 'positive'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = invoke("train", write_recipe(tmp_path, max_steps=2), "zo.objective=python:my_scores:label")
    assert result.exit_code == 1, result.output
    assert "warning: zo.objective python:my_scores:label failed " in result.output  # once per point evaluated
    assert "times (first: it returned a str ('positive'), not a number); a step with a failed point is skipped" \
        in result.output
    assert result.output.strip().splitlines()[-1].startswith("error: no step trained: all 2 steps were skipped")
    sys.modules.pop("my_scores", None)


def test_flat_objective_steps_are_skipped_and_counted():
    model, tok = lora_llm()
    batch = sentiment_batch(tok, 2)
    before = trainable(model)
    opt = zopeft.FZOO(model, lr=1e-2, eps=1e-4, n_perturbations=3)
    opt.step(zopeft.metric_closure(model, batch, "accuracy"))  # ε too small to flip a prediction
    assert opt.last_stats["skipped"].startswith("sigma=0") and opt.skipped_steps == 1
    assert all(map(torch.equal, before, trainable(model)))


def test_a_run_on_a_flat_objective_says_what_to_change(tmp_path):
    from test_cli import invoke, write_recipe

    result = invoke("train", write_recipe(tmp_path), "zo.objective=accuracy", "zo.eps=1e-7", "max_steps=4")
    assert result.exit_code == 1, result.output  # no step trained: the run failed, and says so last
    assert "warning: 4 of 4 steps were skipped" in result.output and "raise zo.eps" in result.output
    assert result.output.strip().splitlines()[-1].startswith("error: no step trained: all 4 steps were skipped (every point equal")
    result = invoke("train", write_recipe(tmp_path, output_dir=str(tmp_path / "o2")), "zo.objective=margin",
                    "zo.eps=1e-2", "max_steps=4")
    assert result.exit_code == 0 and "steps were skipped" not in result.output, result.output


def test_cli_trains_on_an_objective_and_refuses_it_for_sft(tmp_path):
    from test_cli import invoke, write_recipe

    result = invoke("train", write_recipe(tmp_path), "zo.objective=margin", "max_steps=3")
    assert result.exit_code == 0, result.output
    steps = [json.loads(x) for x in (tmp_path / "out" / "zo_steps.jsonl").read_text().splitlines()]
    # clipped margins in [-1, 1], not the tiny model's cross-entropy (~11)
    assert len(steps) == 3 and all(-1 <= x <= 1 for r in steps for x in r["losses"])
    sft = tmp_path / "sft.jsonl"
    sft.write_text('{"prompt": "2+2=", "completion": "4"}\n' * 4)
    result = invoke("train", write_recipe(tmp_path, dataset=str(sft), task="sft", output_dir=str(tmp_path / "o2")),
                    "zo.objective=accuracy")
    assert result.exit_code == 2
    assert "zo.objective: accuracy scores candidates" in result.output and "task sft" in result.output
    assert not (tmp_path / "o2").exists()


def test_cli_trains_adamw_on_the_candidate_cross_entropy_and_refuses_a_metric(tmp_path):
    from test_cli import invoke, write_recipe

    result = invoke("train", write_recipe(tmp_path), "zo.optimizer=adamw", "zo.objective=candidate_ce", "max_steps=3",
                    "logging_steps=1")
    assert result.exit_code == 0, result.output
    log = [json.loads(x) for x in (tmp_path / "out" / "trainer_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    # the cross-entropy over two label words (about log 2), not the tiny model's vocabulary loss (~11)
    assert len(losses) == 3 and all(0 < x < 2 for x in losses)
    result = invoke("train", write_recipe(tmp_path, output_dir=str(tmp_path / "o2")), "zo.optimizer=adamw",
                    "zo.objective=margin")
    assert result.exit_code == 2 and "zo.objective: adamw needs a gradient, which margin has none of" in result.output


def test_objective_auto_trains_classification_on_the_candidates_and_a_resumed_run_keeps_its_checkpoints(tmp_path):
    """auto (the default): the candidates' cross-entropy for label words, the loss for sft; a run resumed without
    naming an objective keeps its checkpoint's (a 0.2 run's loss), and naming another is refused by its key."""
    from test_cli import invoke, write_recipe

    sft = tmp_path / "sft.jsonl"
    sft.write_text('{"prompt": "2+2=", "completion": "4"}\n' * 8)
    shown = invoke("validate", write_recipe(tmp_path, dataset=str(sft), task="sft"))
    assert shown.exit_code == 0 and "objective: loss (the language-model loss" in shown.output, shown.output
    result = invoke("train", write_recipe(tmp_path, max_steps=2))
    assert result.exit_code == 0 and "objective: candidate_ce (the cross-entropy over the candidates" in result.output
    steps = [json.loads(x) for x in (tmp_path / "out" / "zo_steps.jsonl").read_text().splitlines()]
    assert all(0 < x < 2 for r in steps for x in r["losses"])  # about log 2 over two label words, not ~11
    assert yaml_of(tmp_path / "out" / "recipe.yaml")["zo"]["objective"] == "candidate_ce"  # the run records it

    old = tmp_path / "old"  # a run trained on the loss (every 0.2 run), resumed by a recipe that names no objective
    old.mkdir()
    keys = dict(save_steps=2, output_dir=str(old / "out"))
    assert invoke("train", write_recipe(old, max_steps=2, **keys), "zo.objective=loss").exit_code == 0
    resumed = invoke("train", write_recipe(old, max_steps=4, resume_from_checkpoint="auto", **keys))
    assert resumed.exit_code == 0 and "objective: loss (" in resumed.output, resumed.output
    assert yaml_of(old / "out" / "recipe.yaml")["zo"]["objective"] == "loss"
    refused = invoke("train", write_recipe(old, max_steps=6, resume_from_checkpoint="auto", **keys),
                     "zo.objective=candidate_ce")
    assert refused.exit_code == 2 and "was trained with different zo.objective;" in refused.output, refused.output


def yaml_of(path):
    import yaml

    return yaml.safe_load(path.read_text())
