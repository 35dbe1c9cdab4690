"""IA³: learned per-feature scales of PEFT IA3 layers (plain, 4-bit and 8-bit bases)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import AdapterKind, ModelContext, Patch, Unsupported, peft_linear_types, register, split_replicas


@register
class IA3(AdapterKind):
    """``<layer>.ia3_l.<adapter>``: the layer scales its input (feed-forward layers) or its output
    by the vector; each replica's rows are scaled by the replica's vector."""

    name = "IA3"

    def claims(self, name: str, module: nn.Module, ctx: ModelContext) -> bool:
        parts = name.split(".")
        if not isinstance(module, nn.ParameterDict) or parts[-1] != "ia3_l":
            return False
        layer = ctx.modules.get(".".join(parts[:-1]))
        if not isinstance(layer, peft_linear_types("ia3")):
            raise Unsupported(f"IA3 layer type {type(layer).__name__} ({name}) is not batched")
        if getattr(layer, "merged", False) or len(layer.active_adapters) != 1:
            raise Unsupported(f"IA3 layer {name} is merged or has several active adapters")
        return True

    def patches(
        self, name: str, module: nn.Module, values: dict[str, torch.Tensor], replicas: int, ctx: ModelContext
    ) -> list[Patch]:
        layer = ctx.modules[name.rsplit(".", 1)[0]]
        adapter = layer.active_adapters[0]
        if adapter not in values:
            raise Unsupported(f"the active IA3 adapter {adapter!r} of {name} is not trainable")
        scale = values[adapter].reshape(replicas, 1, -1)  # (R, 1, features)

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if args or kwargs:
                raise Unsupported(f"{type(layer).__name__} called with extra arguments")
            if layer.is_feedforward:
                xr = split_replicas(x, replicas)
                return layer.base_layer((xr.to(scale.dtype) * scale).reshape(x.shape).to(x.dtype))
            y = layer.base_layer(x)
            return (split_replicas(y, replicas) * scale).reshape(y.shape).to(y.dtype)

        return [Patch(layer, "forward", forward)]
