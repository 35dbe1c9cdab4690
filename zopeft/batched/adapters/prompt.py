"""Prompt tuning: per-replica virtual-token embeddings prepended to the replicated batch."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import AdapterKind, ModelContext, Patch, Unsupported, register


@register
class Prompt(AdapterKind):
    """``prompt_encoder.<adapter>.embedding``: PEFT embeds one prompt and repeats it over the batch,
    so ``PeftModel.get_prompt`` itself is replaced by one lookup per replica."""

    name = "prompt"

    def claims(self, name: str, module: nn.Module, ctx: ModelContext) -> bool:
        parts = name.split(".")
        return (
            ctx.prompt_type == "PROMPT_TUNING"
            and type(module) is nn.Embedding
            and parts[-3:-2] == ["prompt_encoder"]
            and parts[-1] == "embedding"
        )

    def patches(
        self, name: str, module: nn.Module, values: dict[str, torch.Tensor], replicas: int, ctx: ModelContext
    ) -> list[Patch]:
        model = ctx.model
        weight = values["weight"]  # (R, virtual tokens, D)
        tokens = model.prompt_tokens[model.active_adapter]

        def get_prompt(batch_size: int, task_ids: Any = None, **kwargs: Any) -> torch.Tensor:
            if task_ids is not None or batch_size % replicas:
                raise Unsupported(f"prompt for batch {batch_size} is not {replicas} replicas")
            prompts = weight[:, tokens.to(weight.device)]  # an embedding lookup per replica
            return prompts.repeat_interleave(batch_size // replicas, dim=0)

        return [Patch(model, "get_prompt", get_prompt)]
