"""The loss of each replica: the model's own loss, projected onto the vocabulary only where labels are.

A causal LM's loss is the mean cross-entropy of the tokens that follow a label position.  Where
the model slices its hidden states with a boolean ``logits_to_keep`` (transformers 5) only those
positions reach the LM head, and where the head is plain (``logits = self.lm_head(hidden)``, no
soft-capping or scaling after it) the head is run here in chunks of rows, each chunk's logits
turned into per-token losses and dropped: fp32 logits for the whole batch never exist at once
(all-token labels of a 128k vocabulary would need 2 GB at 16x256).  The same code serves one
replica (the sequential closure) and R replicas of the batch (the batched path).

Other causal LMs take the model's logits at the labelled positions (a mask without a plain head)
or everywhere, and sequence classifiers their small logits; anything else is
:class:`~.adapters.base.Unsupported` (the sequential closure then uses ``model(**batch).loss``).
"""

from __future__ import annotations

import ast
import functools
import inspect
import math
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .adapters.base import Patch, Unsupported, applied

__all__ = ["HEAD_CHUNK_BYTES", "LossPlan", "plan_loss", "prompt_learning_type", "takes_logit_mask"]

HEAD_CHUNK_BYTES = 256 << 20
"""Logit memory of one chunk of the LM head (all replicas together)."""
_LOGIT_BYTES = 10  # per logit in a chunk: the head's output, its fp32 copy and the fp32 log-softmax
_PLAIN_HEADS = frozenset(
    {"self.lm_head(hidden_states)", "self.lm_head(hidden_states).contiguous()", "self.lm_head(hidden_states).float()"}
)
# Batch keys that change the loss or the forward in ways this module does not model.
DENIED_KEYS = frozenset(
    {
        "num_items_in_batch", "shift_labels", "logits_to_keep", "num_logits_to_keep", "past_key_values",
        "cache", "return_dict", "output_router_logits", "adapter_names", "task_ids", "return_loss",
        "decoder_input_ids", "decoder_attention_mask",
    }
)


def prompt_learning_type(model: nn.Module) -> str | None:
    """The active PEFT prompt-learning method (``"PREFIX_TUNING"``, ``"PROMPT_TUNING"``, ...); None without one."""
    config = getattr(model, "active_peft_config", None)
    if config is None or not getattr(config, "is_prompt_learning", False):
        return None
    return str(getattr(config.peft_type, "value", config.peft_type))


@functools.cache
def _forward_facts(cls: type) -> tuple[bool, bool]:
    """(takes a boolean ``logits_to_keep``, its head is plain) for a model class's ``forward``."""
    from transformers import modeling_utils

    if not hasattr(modeling_utils, "slice_logits_to_keep"):
        return False, False
    try:
        forward = inspect.unwrap(cls.forward)
        takes = "logits_to_keep" in inspect.signature(forward).parameters
        takes = takes and "slice_logits_to_keep" in forward.__code__.co_names
        if not takes:
            return False, False
        tree = ast.parse(textwrap.dedent(inspect.getsource(forward)))
    except (TypeError, ValueError, OSError, SyntaxError, AttributeError):
        return False, False
    assigned = [
        node for node in ast.walk(tree)
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign))
        and any(isinstance(t, ast.Name) and t.id == "logits"
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target]))
    ]
    plain = len(assigned) == 1 and isinstance(assigned[0], ast.Assign) and ast.unparse(assigned[0].value) in _PLAIN_HEADS
    return True, plain


def takes_logit_mask(base: nn.Module) -> bool:
    """Whether ``base.forward`` slices its hidden states with transformers' ``slice_logits_to_keep`` (bool masks)."""
    return _forward_facts(type(base))[0]


@dataclass
class LossPlan:
    """How the loss of R replicas of one batch is computed."""

    base: nn.Module
    kind: str  # "causal" | "seq_cls"
    head: str = "full"  # causal: "chunked" (plain head at labelled rows), "mask" (model logits there), "full"
    extra_tokens: int = 0  # prompt tuning: virtual tokens prepended to the logits

    def extended_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels aligned with the logits: prompt tuning's virtual tokens get -100, as in PEFT's forward."""
        if not self.extra_tokens:
            return labels
        return torch.cat([labels.new_full((labels.shape[0], self.extra_tokens), -100), labels], dim=1)

    def label_mask(self, labels: torch.Tensor) -> torch.Tensor:
        """(b, T') bool: the positions whose next token has a label (the causal shift by one)."""
        labels = self.extended_labels(labels)
        mask = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
        mask[:, :-1] = labels[:, 1:] != -100
        return mask

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """The label tokens, in the order of the masked positions."""
        return self.extended_labels(labels)[:, 1:][self.label_mask(labels)[:, :-1]]

    def inputs(self, batch: Mapping[str, Any], replicas: int) -> dict[str, Any]:
        """The batch's inputs repeated ``replicas`` times along dim 0 (replica-major), without labels."""
        out: dict[str, Any] = {}
        for key, value in batch.items():
            if key == "labels":
                continue
            if isinstance(value, torch.Tensor) and replicas > 1:
                value = value.repeat(replicas, *([1] * (value.dim() - 1)))
            out[key] = value
        if self.kind == "causal":
            out.setdefault("use_cache", False)
            if self.head != "full":  # project onto the vocabulary only where a label follows
                mask = self.label_mask(batch["labels"])
                out["logits_to_keep"] = mask.repeat(replicas, 1) if replicas > 1 else mask
        return out

    def losses(self, model: nn.Module, inputs: dict[str, Any], labels: torch.Tensor, replicas: int) -> list[float]:
        """Run the model on ``inputs`` (R replicas) and return each replica's loss, reduced as the model's own."""
        if self.head == "chunked":
            return self._chunked_head(model, inputs, labels, replicas)
        output = model(**inputs)
        logits = getattr(output, "logits", None)
        if not isinstance(logits, torch.Tensor):
            raise Unsupported("the model output has no logits")
        labels = labels.to(logits.device)
        if self.kind == "seq_cls":
            from transformers.loss.loss_utils import ForSequenceClassificationLoss

            if logits.shape[0] != replicas * labels.shape[0]:
                raise Unsupported(f"logits batch {logits.shape[0]} is not {replicas} x {labels.shape[0]}")
            per = logits.view(replicas, labels.shape[0], *logits.shape[1:])
            return [float(ForSequenceClassificationLoss(labels, per[r], self.base.config)) for r in range(replicas)]
        loss_fn, vocab = self.base.loss_function, logits.shape[-1]
        if self.head == "mask":  # logits (R·n, V) at the masked positions; targets already shifted
            targets = self.targets(labels)
            if not targets.numel():  # no label token: the mean over none, as the model's loss
                return [math.nan] * replicas
            if logits.dim() != 2 or logits.shape[0] != replicas * targets.numel():
                raise Unsupported(f"logits_to_keep gave logits of shape {tuple(logits.shape)}")
            per = logits.view(replicas, -1, vocab)
            return [float(loss_fn(logits=per[r], labels=None, vocab_size=vocab, shift_labels=targets))
                    for r in range(replicas)]
        labels = self.extended_labels(labels)
        if logits.shape[:2] != (replicas * labels.shape[0], labels.shape[1]):
            raise Unsupported(f"logits of shape {tuple(logits.shape)} do not match {replicas} x labels {tuple(labels.shape)}")
        per = logits.view(replicas, labels.shape[0], *logits.shape[1:])
        return [float(loss_fn(logits=per[r], labels=labels, vocab_size=vocab)) for r in range(replicas)]

    def _chunked_head(self, model: nn.Module, inputs: dict[str, Any], labels: torch.Tensor, replicas: int) -> list[float]:
        """Mean cross-entropy per replica, running the LM head on chunks of the labelled rows."""
        head = self.base.get_output_embeddings()
        targets = self.targets(labels.to(head.weight.device))
        n = targets.numel()
        if not n:
            return [math.nan] * replicas
        vocab = int(self.base.config.get_text_config().vocab_size)
        rows = max(1, HEAD_CHUNK_BYTES // (replicas * vocab * _LOGIT_BYTES))
        original = head.forward
        sums = torch.zeros(replicas, dtype=torch.float64, device=head.weight.device)

        def forward(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if args or kwargs or hidden.shape[0] != replicas * n:
                raise Unsupported(f"the LM head got {tuple(hidden.shape)}, not {replicas} x {n} labelled rows")
            per = hidden.view(replicas, n, hidden.shape[-1])
            for start in range(0, n, rows):
                logits = original(per[:, start : start + rows].reshape(-1, hidden.shape[-1])).float()
                tokens = targets[start : start + rows].repeat(replicas)
                ce = F.cross_entropy(logits, tokens, reduction="none").view(replicas, -1)
                sums.add_(ce.sum(1, dtype=torch.float64))
            return hidden.new_zeros(hidden.shape[0], 0)

        with applied([Patch(head, "forward", forward)]):
            model(**inputs)
        return (sums / n).tolist()


def plan_loss(model: nn.Module, batch: Mapping[str, Any]) -> LossPlan:
    """How to compute the loss of ``model`` on ``batch`` replica by replica; :class:`Unsupported` if it cannot."""
    if not isinstance(batch, Mapping):
        raise Unsupported("the batch is not a mapping of keyword inputs")
    labels = batch.get("labels")
    if not isinstance(labels, torch.Tensor) or labels.dim() == 0:
        raise Unsupported("the batch has no labels tensor")
    b = labels.shape[0]
    for key, value in batch.items():
        if key in DENIED_KEYS:
            raise Unsupported(f"batch key {key!r} changes the loss or forward")
        if isinstance(value, torch.Tensor):
            if value.dim() == 0 or value.shape[0] != b:
                raise Unsupported(f"batch tensor {key!r} of shape {tuple(value.shape)} has no leading batch dim {b}")
        elif not (value is None or isinstance(value, bool)):
            raise Unsupported(f"batch key {key!r} is not a tensor")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None:
        raise Unsupported("not a transformers model")
    if getattr(config, "is_encoder_decoder", False):
        raise Unsupported("encoder-decoder model")
    if getattr(config, "output_router_logits", False):
        raise Unsupported("the loss includes a router auxiliary loss")
    cls = type(base).__name__
    if cls.endswith("ForSequenceClassification"):
        return LossPlan(base, "seq_cls")
    if not cls.endswith("ForCausalLM"):
        raise Unsupported(f"{cls}: only causal-LM and sequence-classification losses are batched")
    from transformers.loss.loss_utils import ForCausalLMLoss

    if base.loss_function is not ForCausalLMLoss:
        raise Unsupported(f"{cls} has a custom loss function")
    prompt_type, extra_tokens = prompt_learning_type(model), 0
    if prompt_type not in (None, "PREFIX_TUNING", "PROMPT_TUNING"):
        raise Unsupported(f"prompt-learning method {prompt_type}")
    if prompt_type == "PROMPT_TUNING":
        extra_tokens = int(model.active_peft_config.num_virtual_tokens)
    takes_mask, plain_head = _forward_facts(type(base))
    head = "full"
    if takes_mask:
        head = "chunked" if plain_head and isinstance(base.get_output_embeddings(), nn.Module) else "mask"
    return LossPlan(base, "causal", head, extra_tokens)
