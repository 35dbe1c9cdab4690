"""ZOTrainer: forward-only training through the real HuggingFace Trainer."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import fixed_batch, tiny_model
from peft import LoraConfig, get_peft_model
from transformers import TrainingArguments

import zopeft


class Rows(torch.utils.data.Dataset):
    def __init__(self, batch):
        self.batch = batch

    def __len__(self):
        return len(self.batch["input_ids"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.batch.items()}


def test_zo_trainer_trains_logs_schedules_and_checkpoints(tmp_path):
    model = lora_model()
    data = Rows(fixed_batch("llama", batch=8))
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=1e-2, lr_scheduler_type="linear", logging_steps=10, save_steps=15, eval_strategy="steps",
        eval_steps=30, report_to=[], use_cpu=True, seed=0,
    )
    trainer = zopeft.ZOTrainer(
        model=model, args=args, train_dataset=data, eval_dataset=data,
        zo_optimizer="fzoo", zo_kwargs={"eps": 1e-3, "n_perturbations": 4},
    )
    before = trainer.evaluate()["eval_loss"]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer.train()
    opt = trainer.zo_optimizer
    assert isinstance(opt, zopeft.FZOO)
    assert trainer.evaluate()["eval_loss"] < before - 0.05
    assert opt.step_index == 30 and opt.forward_passes == 30 * 2 * 5  # 2 micro-batches × (N+1)
    lrs = [r["lr"][0] for r in opt.step_log]
    assert lrs[0] == 1e-2 and lrs[-1] < lrs[0] / 10  # the Trainer's linear schedule drives the ZO lr
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if n in frozen)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and {"zo_sigma", "zo_forward_passes"} <= set(logs[-1])
    saved = json.loads((tmp_path / "checkpoint-30" / "trainer_state.json").read_text())
    assert saved["global_step"] == 30 and (tmp_path / "checkpoint-15" / "adapter_model.safetensors").exists()


def trainer_for(tmp_path, model, data, **extra):
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4, learning_rate=1e-2,
        lr_scheduler_type="linear", logging_steps=4, save_steps=6, report_to=[], use_cpu=True, seed=0,
    )
    return zopeft.ZOTrainer(model=model, args=args, train_dataset=data, zo_optimizer="fzoo",
                            zo_kwargs={"eps": 1e-3, "n_perturbations": 3}, **extra)


def lora_model():
    torch.manual_seed(0)
    return get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules="all-linear"))


def test_zo_trainer_checkpoints_without_pickle_resume_bit_identically_and_log_no_grad_norm(tmp_path):
    data = Rows(fixed_batch("llama", batch=8))
    full = trainer_for(tmp_path / "full", lora_model(), data, zo_guard=True)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-6"
    names = {p.name for p in checkpoint.iterdir()}
    assert {"zo_optimizer.json", "zo_scheduler.json", "zo_guard.json"} <= names
    assert not names & {"optimizer.pt", "scheduler.pt"}
    assert not any("grad_norm" in h for h in full.state.log_history)
    assert all("zo_rollbacks" in h for h in full.state.log_history if "loss" in h)
    resumed = trainer_for(tmp_path / "full", lora_model(), data, zo_guard=True)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    a = {n: p for n, p in full.model.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.model.named_parameters() if p.requires_grad}
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_zo_trainer_takes_a_datasets_dataset_with_text_columns(tmp_path):
    """The usual HF input: a tokenized ``datasets.Dataset`` that still holds its text column (the Trainer drops it)."""
    datasets = pytest.importorskip("datasets")
    batch = fixed_batch("llama", batch=8)
    data = datasets.Dataset.from_dict({**{k: v.tolist() for k, v in batch.items()}, "text": [f"row {i}" for i in range(8)]})
    trainer = trainer_for(tmp_path, lora_model(), data)
    before = trainer.evaluate(data)["eval_loss"]
    trainer.train()
    assert trainer.zo_optimizer.step_index == 12 and trainer.zo_optimizer.forward_passes == 12 * 4
    assert trainer.evaluate(data)["eval_loss"] < before


def test_zo_trainer_trains_a_classifier_on_an_objective(tmp_path, monkeypatch):
    from peft import TaskType

    from zopeft.objectives import OBJECTIVES, clipped_margin

    seen = []  # every value the named objective returned: the step's losses are these, not the model's loss

    def spy(scores, gold):
        seen.append(clipped_margin(scores, gold))
        return seen[-1]

    monkeypatch.setitem(OBJECTIVES, "margin", spy)
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("bert"), LoraConfig(r=4, target_modules=["query", "value"],
                                                          task_type=TaskType.SEQ_CLS))
    data = Rows(fixed_batch("bert", batch=16))
    trainer = trainer_for(tmp_path, model, data, zo_objective="margin")
    trainer.train()
    opt = trainer.zo_optimizer
    assert opt.step_index == 12 and len(seen) == 12 * 4  # N + 1 = 4 points a step
    assert [x for r in opt.step_log for x in r["losses"]] == seen


def test_zo_trainer_checks_eps_first_on_a_bfloat16_model(tmp_path, caplog):
    data = Rows(fixed_batch("llama", batch=8))
    checks = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = get_peft_model(tiny_model("llama").to(dtype), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        trainer = trainer_for(tmp_path / str(dtype), model, data)
        trainer.zo_kwargs["eps"] = 1e-6  # far below bf16's rounding on this model, on any CPU (tests/test_eps_check.py)
        trainer.args.max_steps = 1
        with caplog.at_level("WARNING", logger="zopeft"):
            trainer.train()
        checks[dtype] = trainer.zo_eps_check
        assert trainer.zo_optimizer.step_index == 1
    assert checks[torch.float32] is None  # fp32: not checked unless asked (zo_check_eps=True)
    check = checks[torch.bfloat16]
    assert not check.ok and (check.suggested is None or check.suggested > 1e-6)
    assert any("eps check: eps=1e-06 noisy" in r.getMessage() for r in caplog.records)


def test_the_guard_judges_the_eval_dataset_that_metric_for_best_model_names(tmp_path, monkeypatch):
    """With several eval datasets the Trainer logs eval_<name>_loss ...: metric_for_best_model names the one the
    guard judges (and its direction); the other set's evaluations are not judged."""
    judged = []
    real = zopeft.Guard.observe_eval
    monkeypatch.setattr(zopeft.Guard, "observe_eval", lambda self, value, *, higher_is_better=True: (
        judged.append((value, higher_is_better)), real(self, value, higher_is_better=higher_is_better)))
    select, report = (Rows(fixed_batch("llama", batch=8, seed=s)) for s in (2, 3))
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2, eval_strategy="steps",
        eval_steps=2, metric_for_best_model="select_loss", report_to=[], use_cpu=True, seed=0,
    )
    trainer = zopeft.ZOTrainer(model=lora_model(), args=args, train_dataset=Rows(fixed_batch("llama", batch=8)),
                               eval_dataset={"select": select, "report": report}, zo_optimizer="mezo",
                               zo_guard={"watch": "eval"})
    trainer.train()
    logged = [h["eval_select_loss"] for h in trainer.state.log_history if "eval_select_loss" in h]
    reported = [h["eval_report_loss"] for h in trainer.state.log_history if "eval_report_loss" in h]
    assert len(logged) == len(reported) == 3 and logged != reported
    assert judged == [(v, False) for v in logged]  # a loss: lower is better


def test_an_eval_guard_with_several_eval_datasets_and_no_metric_for_best_model_warns(tmp_path, caplog):
    data = Rows(fixed_batch("llama", batch=8))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, eval_strategy="steps",
                             eval_steps=2, report_to=[], use_cpu=True, seed=0)
    trainer = zopeft.ZOTrainer(model=lora_model(), args=args, train_dataset=data, eval_dataset={"a": data, "b": data},
                               zo_optimizer="mezo", zo_guard={"watch": "eval"})
    with caplog.at_level("WARNING", logger="zopeft"):
        trainer.train()
    assert caplog.text.count("zopeft guard: an evaluation without eval_accuracy or eval_loss (several eval datasets?) "
                             "is not judged; set metric_for_best_model") == 1


def test_without_metric_for_best_model_the_guard_judges_the_eval_accuracy_else_loss(tmp_path, monkeypatch):
    judged = []
    monkeypatch.setattr(zopeft.Guard, "observe_eval",
                        lambda self, value, *, higher_is_better=True: judged.append((value, higher_is_better)))
    data = Rows(fixed_batch("llama", batch=8))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, eval_strategy="steps",
                             eval_steps=2, report_to=[], use_cpu=True, seed=0)
    trainer = zopeft.ZOTrainer(model=lora_model(), args=args, train_dataset=data, eval_dataset=data,
                               zo_optimizer="mezo", zo_guard={"watch": "eval"})
    trainer.train()
    logged = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(logged) == 2 and judged == [(v, False) for v in logged]  # a causal LM has no accuracy


def test_zo_trainer_keeps_the_best_model_and_its_guard_watches_the_evaluations_by_default(tmp_path, monkeypatch):
    """load_best_model_at_end / metric_for_best_model as in the Trainer; zo_guard=True judges the evaluations when the
    Trainer evaluates during training."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    judged = []
    real = zopeft.Guard.observe_eval
    monkeypatch.setattr(zopeft.Guard, "observe_eval", lambda self, value, *, higher_is_better=True: (
        judged.append((value, higher_is_better)), real(self, value, higher_is_better=higher_is_better)))
    model = lora_model()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4, learning_rate=0.3, eval_strategy="steps",
        eval_steps=3, save_steps=3, load_best_model_at_end=True, report_to=[], use_cpu=True, seed=0)
    trainer = zopeft.ZOTrainer(model=model, args=args, train_dataset=Rows(fixed_batch("llama", batch=8)),
                               eval_dataset=Rows(fixed_batch("llama", batch=8, seed=5)), zo_optimizer="mezo",
                               zo_kwargs={"eps": 1e-2}, zo_guard=True)
    trainer.train()
    assert trainer.zo_guard.watch == "eval"
    losses = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert judged == [(v, False) for v in losses]  # metric_for_best_model: loss (the Trainer's default), lower is better
    best = load_file(f"{trainer.state.best_model_checkpoint}/adapter_model.safetensors")
    kept = get_peft_model_state_dict(model)
    assert all(torch.equal(best[k], kept[k]) for k in best) and trainer.state.best_metric == min(losses)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(min(losses))
    plain = zopeft.ZOTrainer(model=lora_model(), args=TrainingArguments(output_dir=str(tmp_path / "b"), report_to=[],
                                                                         use_cpu=True),
                             train_dataset=Rows(fixed_batch("llama", batch=8)), zo_guard=True)
    plain.create_optimizer()
    assert plain.zo_guard.watch == "loss"  # no evaluation during training: the step losses


def test_a_misspelled_zo_optimizer_or_setting_is_refused_when_the_trainer_is_built(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    data = Rows(fixed_batch("llama", batch=4))
    with pytest.raises(ValueError, match="unknown ZO optimizer 'fzo' \\(did you mean 'fzoo'\\?\\)"):
        zopeft.ZOTrainer(model=lora_model(), args=args, train_dataset=data, zo_optimizer="fzo")
    with pytest.raises(TypeError, match="fzoo: unknown keyword argument 'n_perturbation' \\(did you mean 'n_perturbations'"):
        zopeft.ZOTrainer(model=lora_model(), args=args, train_dataset=data, zo_kwargs={"n_perturbation": 4})
