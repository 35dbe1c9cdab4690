"""zopeft: zeroth-order (forward-only) optimizers for PEFT fine-tuning.

>>> opt = zopeft.FZOO(peft_model, lr=1e-3, eps=1e-3, n_perturbations=8)
>>> loss = opt.step(lambda: peft_model(**batch).loss)
"""

from .batched import BatchedLoss, batched_support, loss_closure, metric_closure
from .objectives import OBJECTIVES, CandidateBatch
from .noise import draw_noise, noise_key
from .optim.adamezo import AdaMeZO
from .optim.base import StepRecord, ZOOptimizer
from .optim.fzoo import FZOO
from .optim.hizoo import HiZOO
from .optim.hyperparameters import Setting, hyperparameters
from .optim.mezo import MeZO
from .registry import available_optimizers, get_optimizer, register_optimizer
from .tasks import candidate_batch
from .trainer import ZOTrainer

__version__ = "0.1.0"

__all__ = [
    "AdaMeZO",
    "BatchedLoss",
    "CandidateBatch",
    "FZOO",
    "OBJECTIVES",
    "HiZOO",
    "MeZO",
    "Setting",
    "StepRecord",
    "ZOOptimizer",
    "ZOTrainer",
    "available_optimizers",
    "batched_support",
    "candidate_batch",
    "draw_noise",
    "get_optimizer",
    "hyperparameters",
    "loss_closure",
    "metric_closure",
    "noise_key",
    "register_optimizer",
]
