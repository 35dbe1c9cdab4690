"""The plan of a batched evaluation: which modules compute per-replica values, and how the loss is taken."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .adapters import KINDS
from .adapters.base import AdapterKind, ModelContext, Patch, Unsupported
from .loss import LossPlan, plan_loss, prompt_learning_type

__all__ = ["Plan", "Target", "build_plan"]


@dataclass
class Target:
    """A module whose trainable tensors (attribute name -> tensor) an adapter kind replicates."""

    kind: AdapterKind
    name: str
    module: nn.Module
    params: dict[str, torch.Tensor]


@dataclass
class Plan:
    """Everything one batched evaluation of a model on a batch needs."""

    ctx: ModelContext
    loss: LossPlan
    targets: list[Target]
    device: torch.device
    rows: int  # token positions per replica (b·T, + virtual tokens)
    length: int  # sequence length seen by attention

    @property
    def kinds(self) -> str:
        return " + ".join(sorted({t.kind.name for t in self.targets}))

    def patches(self, stack: dict[int, torch.Tensor], replicas: int) -> list[Patch]:
        """The patches that make every target compute R replicas with its ``[R, *shape]`` values from ``stack``."""
        out: list[Patch] = []
        for t in self.targets:
            values = {n: stack[id(p)] for n, p in t.params.items()}
            out += t.kind.patches(t.name, t.module, values, replicas, self.ctx)
        return out


def build_plan(model: nn.Module, tensors: Sequence[torch.Tensor], batch: Mapping[str, Any]) -> Plan:
    """The plan for evaluating ``model`` on ``batch`` at points of ``tensors``; :class:`Unsupported` if none."""
    if not tensors:
        raise Unsupported("the optimizer has no tensors")
    loss = plan_loss(model, batch)
    if any(m.training for m in model.modules()):
        raise Unsupported("the model is in training mode (dropout would make evaluations random)")
    labels = batch["labels"]
    length = labels.shape[1] if labels.dim() > 1 else 1
    for key in ("input_ids", "inputs_embeds"):
        value = batch.get(key)
        if isinstance(value, torch.Tensor) and value.dim() > 1:
            length = max(length, value.shape[1])
    prompt_type = prompt_learning_type(model)
    peft_config = getattr(model, "active_peft_config", None)
    if prompt_type is not None:
        if peft_config.inference_mode:
            raise Unsupported("the prompt adapter is in inference mode")
        length += int(getattr(peft_config, "num_virtual_tokens", 0) or 0)
    ctx = ModelContext(model, dict(model.named_modules()), prompt_type, peft_config)
    wanted = {id(p) for p in tensors}
    targets, found = [], 0
    for name, module in ctx.modules.items():
        owned = {pn: p for pn, p in module.named_parameters(recurse=False) if id(p) in wanted}
        if not owned:
            continue
        kind = None if "_hf_hook" in module.__dict__ else next((k for k in KINDS if k.claims(name, module, ctx)), None)
        if kind is None:  # also: an accelerate dispatch hook on the adapter module itself
            raise Unsupported(
                f"trainable tensor {name}.{next(iter(owned))} ({type(module).__name__}) is not a LoRA, IA3, "
                "prefix, prompt or modules_to_save tensor the batched path replicates"
            )
        targets.append(Target(kind, name, module, owned))
        found += len(owned)
    if found != len(wanted):
        raise Unsupported("some optimizer tensors are not parameters of the model")
    return Plan(ctx, loss, targets, tensors[0].device, labels.shape[0] * length, length)
