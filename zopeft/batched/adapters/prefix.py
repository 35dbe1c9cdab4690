"""Prefix tuning: the prefix encoder's embedding (and projection MLP) see the replicated batch."""

from __future__ import annotations

import torch
from torch import nn

from .base import AdapterKind, ModelContext, Patch, module_patch, plain_linear_or_embedding, register


@register
class Prefix(AdapterKind):
    """PEFT's ``PrefixEncoder`` (``prompt_encoder.<adapter>``): its embedding and optional MLP.

    PEFT builds the past key values of a batch of B rows from B copies of the virtual-token
    ids; with the batch replicated, replica r's copies look up replica r's table.
    """

    name = "prefix"

    def claims(self, name: str, module: nn.Module, ctx: ModelContext) -> bool:
        return (
            ctx.prompt_type == "PREFIX_TUNING"
            and "prompt_encoder" in name.split(".")
            and plain_linear_or_embedding(module) is not None
        )

    def patches(
        self, name: str, module: nn.Module, values: dict[str, torch.Tensor], replicas: int, ctx: ModelContext
    ) -> list[Patch]:
        return [module_patch(module, values, replicas)]
