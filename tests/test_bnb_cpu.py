"""bitsandbytes' 4-bit CPU layers stay exact whatever the order of forwards, optimizers and trainers.

On AVX512-BF16 CPUs bitsandbytes repacks a 4-bit weight for a bf16 kernel at its first eval
forward without gradients, and its inverse does not restore the block scales.  Train mode
never repacks, so a train-mode forward is the exact reference (no dropout in these models).

Every test runs on any CPU, as on both kinds: the ``cpu`` fixture makes bitsandbytes see
AVX512-BF16 or not (its ``has_avx512bf16``, read as a layer is built) and records every repack
through bitsandbytes' own conversion; the bf16 kernel itself, which needs the instructions, is
never run (a stand-in takes its place where a test repacks on purpose).
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from conftest import fixed_batch, tiny_model
from peft import LoraConfig, get_peft_model
from transformers import TrainingArguments

import zopeft

ROOT = Path(__file__).resolve().parent.parent
PARAMS = {
    "module": lambda model: model,
    "tensors": lambda model: [p for p in model.parameters() if p.requires_grad],
    "param groups": lambda model: [{"params": [p for p in model.parameters() if p.requires_grad], "lr": 1e-2}],
}
CPUS = {"without AVX512-BF16": False, "with AVX512-BF16": True}
STAND_IN = "lambda A, B, out=None, state=None, **kw: torch.zeros(*A.shape[:-1], state.shape[0])"
"""bitsandbytes.functional.gemv_4bit, the repacked layers' bf16 kernel, stood in for (its result is not compared)."""


@pytest.fixture(params=list(CPUS))
def cpu(request, monkeypatch) -> list[str]:
    """bitsandbytes as on a CPU with or without AVX512-BF16; the repacks it made (the shapes of the weights)."""
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: CPUS[request.param])
    repacks: list[str] = []
    convert = bnb.nn.modules._convert_weight_packed_for_cpu

    def recorded(weight, state, *args, **kwargs):
        repacks.append(str(list(state.shape)))
        return convert(weight, state, *args, **kwargs)

    monkeypatch.setattr(bnb.nn.modules, "_convert_weight_packed_for_cpu", recorded)
    monkeypatch.setattr(bnb.functional, "gemv_4bit", eval(STAND_IN))
    return repacks


def lora_model() -> torch.nn.Module:
    base = tiny_model("llama", "nf4")
    torch.manual_seed(0)  # the adapter's initialisation (after the first tiny_model call, which seeds and draws)
    return get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))


def logits(model: torch.nn.Module, batch: dict, *, train: bool) -> torch.Tensor:
    model.train(train)
    with torch.no_grad():
        return model(**batch).logits


def quantized_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every 4-bit layer's packed weight and quantization state (block scales, codebook), as saved."""
    return {
        f"{name}.{key}": value.clone()
        for name, layer in model.named_modules() if isinstance(layer, bnb.nn.Linear4bit)
        for key, value in {"weight": layer.weight.data, **layer.weight.quant_state.as_dict(packed=True)}.items()
    }


def fzoo_step(model: torch.nn.Module, params, batch: dict) -> tuple[list[float], torch.Tensor]:
    """One FZOO step in eval mode; its losses and the eval-mode logits after it."""
    opt = zopeft.FZOO(params, lr=1e-2, eps=1e-3, n_perturbations=2, seed=0)
    model.eval()
    opt.step(lambda: model(**batch).loss)
    return opt.step_log[-1]["losses"], logits(model, batch, train=False)


@functools.cache
def safe_order() -> tuple[list[float], torch.Tensor]:
    """The order that was always exact: optimizer from the module before any forward."""
    model = lora_model()
    return fzoo_step(model, model, fixed_batch())


@pytest.mark.parametrize("forward_first", [False, True], ids=["optimizer first", "forward first"])
@pytest.mark.parametrize("params", PARAMS)
def test_same_logits_and_step_whatever_the_order(forward_first, params, cpu):
    model, batch = lora_model(), fixed_batch()
    assert all(not layer.support_avx512bf16_for_cpu for layer in model.modules() if isinstance(layer, bnb.nn.Linear4bit))
    exact = logits(model, batch, train=True)
    stored = quantized_state(model)
    if forward_first:  # a user's baseline evaluation
        assert torch.equal(logits(model, batch, train=False), exact)
    losses, after = fzoo_step(model, PARAMS[params](model), batch)
    assert losses == safe_order()[0]
    assert torch.equal(after, safe_order()[1])
    assert torch.equal(after, logits(model, batch, train=True))
    now = quantized_state(model)
    assert now.keys() == stored.keys() and all(torch.equal(stored[k], v) for k, v in now.items())
    assert cpu == []


class Rows(torch.utils.data.Dataset):
    def __init__(self, batch: dict) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch["input_ids"])

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.batch.items()}


def test_trainer_evaluate_before_training_changes_nothing(tmp_path, cpu):
    def run(evaluate_first: bool) -> tuple[list[float], list]:
        model = lora_model()
        data = Rows(fixed_batch(batch=4))
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                                 per_device_eval_batch_size=4, learning_rate=1e-2, report_to=[], use_cpu=True, seed=0)
        trainer = zopeft.ZOTrainer(model=model, args=args, train_dataset=data, eval_dataset=data,
                                   zo_kwargs={"eps": 1e-3, "n_perturbations": 2})
        evals = [trainer.evaluate()["eval_loss"]] if evaluate_first else []
        trainer.create_optimizer()
        evals.append(trainer.evaluate()["eval_loss"])
        trainer.train()
        return evals + [trainer.evaluate()["eval_loss"]], trainer.zo_optimizer.step_log

    (before, built, trained), log = run(evaluate_first=True)
    (safe_built, safe_trained), safe_log = run(evaluate_first=False)
    assert before == built == safe_built
    assert log == safe_log and trained == safe_trained
    assert cpu == []


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize("zopeft_first", [True, False], ids=["import zopeft first", "without zopeft"])
def test_bitsandbytes_imported_after_the_module_never_repacks(zopeft_first):
    """``import zopeft`` (lazy: no torch) installs the patch, which waits for ``import bitsandbytes`` and survives a
    ``find_spec`` probe (as transformers probes).  Without zopeft the same layer repacks (bitsandbytes sees
    AVX512-BF16 as on such a CPU): the check can fail."""
    out = run_python(
        "import importlib.util, sys\n"
        + ("import zopeft\n" if zopeft_first else "")
        + "assert 'torch' not in sys.modules and 'bitsandbytes' not in sys.modules\n"
        "assert importlib.util.find_spec('bitsandbytes') is not None\n"
        "import torch, bitsandbytes as bnb\n"
        "bnb.nn.modules.has_avx512bf16 = lambda: True  # as on a CPU with AVX512-BF16\n"
        f"bnb.functional.gemv_4bit = {STAND_IN}\n"
        "layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type='nf4').to('cpu').eval()\n"
        "with torch.no_grad():\n"
        "    layer(torch.randn(2, 64))\n"
        "print(getattr(layer.weight.quant_state, 'packing_format_for_cpu', False))\n"
    )
    assert out.strip() == str(not zopeft_first)


class ShippedLinear4bit(bnb.nn.Linear4bit):
    """``Linear4bit`` as bitsandbytes ships it: a plain class attribute hides zopeft's ``False``."""

    support_avx512bf16_for_cpu = True


def test_a_layer_repacked_before_zopeft_saw_it_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)  # as on a CPU with AVX512-BF16
    monkeypatch.setattr(bnb.functional, "gemv_4bit", eval(STAND_IN))
    layer = ShippedLinear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4").to("cpu").eval()
    with torch.no_grad():
        layer(torch.randn(2, 64))  # bitsandbytes' repack, as before zopeft was imported
    assert layer.weight.quant_state.packing_format_for_cpu
    model = torch.nn.Sequential(layer, torch.nn.Linear(64, 1))
    message = "repacked the 4-bit layer '0' .* import zopeft before loading the model, then load it again$"
    with pytest.raises(RuntimeError, match=message):
        zopeft.MeZO(model, lr=1e-3)
    with pytest.raises(RuntimeError, match=message):
        zopeft.ZOTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True))
