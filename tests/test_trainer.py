"""ZOTrainer: forward-only training through the real HuggingFace Trainer."""

from __future__ import annotations

import json

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
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules="all-linear"))
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
