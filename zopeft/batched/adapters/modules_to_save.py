"""``modules_to_save``: trainable copies of whole linear / embedding modules (e.g. a classification head)."""

from __future__ import annotations

import torch
from torch import nn

from .base import AdapterKind, ModelContext, Patch, module_patch, plain_linear_or_embedding, register


@register
class ModulesToSave(AdapterKind):
    """A ``modules_to_save`` copy that is an ``nn.Linear`` or ``nn.Embedding``."""

    name = "modules_to_save"

    def claims(self, name: str, module: nn.Module, ctx: ModelContext) -> bool:
        return "modules_to_save" in name.split(".") and plain_linear_or_embedding(module) is not None

    def patches(
        self, name: str, module: nn.Module, values: dict[str, torch.Tensor], replicas: int, ctx: ModelContext
    ) -> list[Patch]:
        return [module_patch(module, values, replicas)]
