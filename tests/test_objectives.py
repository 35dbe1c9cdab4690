"""Objectives only ZO can optimise (zopeft.objectives): values, batched == sequential, flat steps."""

from __future__ import annotations

import json
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
from zopeft.objectives import accuracy_error, clipped_margin, resolve_objective
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


def test_objective_functions_by_hand():
    scores = torch.tensor([[-0.1, -2.0, -3.0], [-1.0, -0.5, -4.0], [-2.0, -2.2, -0.1]])
    gold = torch.tensor([0, 0, 2])
    assert accuracy_error(scores, gold) == pytest.approx(1 / 3)
    # best other - gold, clipped to [-1, 1]: (-2.0+0.1) -> -1, (-0.5+1.0) = 0.5, (-2.0+0.1) -> -1
    assert clipped_margin(scores, gold) == pytest.approx((-1 + 0.5 - 1) / 3)


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
    with pytest.raises(ValueError, match=r"objective python:my_rewards:per_example failed: (ValueError|RuntimeError): .* "
                                         r"\(it is called as f\(scores, gold\)"):
        resolve_objective("python:my_rewards:per_example")(torch.zeros(2, 3), torch.tensor([0, 1]))
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


def test_flat_objective_steps_are_skipped_and_counted():
    model, tok = lora_llm()
    records = load_records("sst2", "train")[:2]
    batch = zopeft.candidate_batch(tok, [TEMPLATE.format(**r) for r in records], [" negative", " positive"],
                                   [r["label"] for r in records])
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    opt = zopeft.FZOO(model, lr=1e-2, eps=1e-4, n_perturbations=3)
    opt.step(zopeft.metric_closure(model, batch, "accuracy"))  # ε too small to flip a prediction
    assert opt.last_stats["skipped"].startswith("sigma=0") and opt.skipped_steps == 1
    assert all(torch.equal(a, p) for a, p in zip(before, (p for p in model.parameters() if p.requires_grad)))


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
