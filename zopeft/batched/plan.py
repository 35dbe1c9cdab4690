"""The plan of a batched evaluation: which modules compute per-replica values, and how the loss is taken (or
the replicas generate)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .adapters import KINDS
from .adapters.base import AdapterKind, ModelContext, Patch, Unsupported
from .loss import LossPlan, plan_loss, prompt_learning_type

__all__ = ["Plan", "Target", "build_plan", "generation_plan"]


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
    targets: list[Target]
    device: torch.device
    base: nn.Module  # the transformers model under the adapter (its config sizes the replicas)
    rows: int  # token positions per replica (b·T, + virtual tokens)
    length: int  # sequence length seen by attention
    loss: LossPlan | None = None  # how a replica's loss is taken (None: generation)
    cache_rows: int = 0  # generation: KV-cache positions per replica

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
    labels = batch["labels"]
    length = labels.shape[1] if labels.dim() > 1 else 1
    for key in ("input_ids", "inputs_embeds"):
        value = batch.get(key)
        if isinstance(value, torch.Tensor) and value.dim() > 1:
            length = max(length, value.shape[1])
    return _replica_plan(model, tensors, loss.base, labels.shape[0], length, loss=loss)


def generation_plan(model: nn.Module, tensors: Sequence[torch.Tensor], prompts: Mapping[str, Any], new_tokens: int) -> Plan:
    """The plan for generating ``new_tokens`` after ``prompts`` (``input_ids``, ``attention_mask``) at points of
    ``tensors``, the replicas in one ``generate`` call; :class:`Unsupported` if it cannot be batched."""
    if not tensors:
        raise Unsupported("the optimizer has no tensors")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or not callable(getattr(model, "generate", None)):
        raise Unsupported("not a transformers model that generates")
    if getattr(config, "is_encoder_decoder", False):
        raise Unsupported("encoder-decoder model")
    if prompt_learning_type(model) not in (None, "PREFIX_TUNING", "PROMPT_TUNING"):
        raise Unsupported(f"prompt-learning method {prompt_learning_type(model)}")
    rows, length = prompts["input_ids"].shape
    return _replica_plan(model, tensors, base, rows, length + new_tokens, cache=True)


def _replica_plan(
    model: nn.Module, tensors: Sequence[torch.Tensor], base: nn.Module, batch_rows: int, length: int, *,
    loss: LossPlan | None = None, cache: bool = False,
) -> Plan:
    """Which modules of ``model`` compute per-replica values of ``tensors``, for rows of ``length`` tokens."""
    if any(m.training for m in model.modules()):
        raise Unsupported("the model is in training mode (dropout would make evaluations random)")
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
    rows = batch_rows * length
    return Plan(ctx, targets, tensors[0].device, base, rows, length, loss, rows if cache else 0)
