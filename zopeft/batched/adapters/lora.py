"""LoRA: the ``lora_A`` / ``lora_B`` linear layers of PEFT LoRA layers (plain, 4-bit and 8-bit bases)."""

from __future__ import annotations

import torch
from torch import nn

from .base import AdapterKind, ModelContext, Patch, Unsupported, module_patch, peft_linear_types, register


@register
class LoRA(AdapterKind):
    """``<layer>.lora_A.<adapter>`` / ``lora_B`` (with ``lora_bias``): a per-replica ``torch.bmm``.

    DoRA and the other LoRA variants read the adapter weights directly (e.g. for the weight
    norm) and are not batched; neither are LoRA weights merged into the base layer.
    """

    name = "LoRA"

    def claims(self, name: str, module: nn.Module, ctx: ModelContext) -> bool:
        parts = name.split(".")
        if type(module) is not nn.Linear or len(parts) < 3 or parts[-2] not in ("lora_A", "lora_B"):
            return False
        layer = ctx.modules.get(".".join(parts[:-2]))
        adapter = parts[-1]
        if not isinstance(layer, peft_linear_types("lora")):
            raise Unsupported(f"LoRA layer type {type(layer).__name__} ({name}) is not batched")
        if getattr(layer, "merged", False):
            raise Unsupported(f"the LoRA weights of {name} are merged into the base layer")
        variant = getattr(layer, "lora_variant", {}).get(adapter)
        if variant is not None or getattr(layer, "use_dora", {}).get(adapter, False):
            raise Unsupported(f"LoRA variant {type(variant).__name__ if variant else 'DoRA'} ({name})")
        return True

    def patches(
        self, name: str, module: nn.Module, values: dict[str, torch.Tensor], replicas: int, ctx: ModelContext
    ) -> list[Patch]:
        return [module_patch(module, values, replicas)]
