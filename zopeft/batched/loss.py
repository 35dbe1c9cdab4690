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
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..objectives import CandidateBatch, Objective
from .adapters.base import Patch, Unsupported, applied

__all__ = [
    "HEAD_CHUNK_BYTES", "CandidateScores", "Criterion", "CrossEntropy", "LossPlan", "plan_loss", "prompt_learning_type",
    "takes_logit_mask",
]

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

    def label_rows(self, labels: torch.Tensor) -> torch.Tensor:
        """The batch row of each label token, in the order of :meth:`targets`."""
        return self.label_mask(labels)[:, :-1].nonzero()[:, 0]

    def losses(
        self, model: nn.Module, inputs: dict[str, Any], labels: torch.Tensor, replicas: int,
        criterion: Criterion | None = None,
    ) -> list[float]:
        """Run the model on ``inputs`` (R replicas) and return each replica's value of ``criterion``.

        The default criterion is the model's own loss: the mean cross-entropy of the label tokens
        (causal LM), or the model's classification loss.  Causal-LM criteria see the logits of
        the labelled positions only, a chunk of positions at a time (:class:`Criterion`).
        """
        if self.kind == "seq_cls":
            return self._classes(model, inputs, labels, replicas, criterion)
        device = next(p.device for p in self.base.parameters())
        labels = labels.to(device)
        criterion = criterion or CrossEntropy(self.targets(labels))
        if self.head == "chunked":
            self._chunked_head(model, inputs, criterion, replicas, self.targets(labels).numel())
            return criterion.result(replicas)
        logits = _logits(model(**inputs))
        if self.head == "mask":  # (R·n, V) at the masked positions
            n = self.targets(labels).numel()
            if logits.dim() != 2 or logits.shape[0] != replicas * n:
                raise Unsupported(f"logits_to_keep gave logits of shape {tuple(logits.shape)}")
            criterion.consume(logits.view(replicas, n, -1), 0)
        else:  # (R·b, T', V) everywhere: take the labelled positions
            mask = self.label_mask(labels)
            if logits.shape[:2] != (replicas * mask.shape[0], mask.shape[1]):
                raise Unsupported(f"logits of shape {tuple(logits.shape)} do not match {replicas} x {tuple(mask.shape)}")
            criterion.consume(logits.view(replicas, *mask.shape, -1)[:, mask], 0)
        return criterion.result(replicas)

    def _classes(
        self, model: nn.Module, inputs: dict[str, Any], labels: torch.Tensor, replicas: int, criterion: Criterion | None
    ) -> list[float]:
        """Sequence classification: the model's loss per replica, or ``criterion`` on the class logits."""
        from transformers.loss.loss_utils import ForSequenceClassificationLoss

        logits = _logits(model(**inputs))
        labels = labels.to(logits.device)
        if logits.shape[0] != replicas * labels.shape[0]:
            raise Unsupported(f"logits batch {logits.shape[0]} is not {replicas} x {labels.shape[0]}")
        per = logits.view(replicas, labels.shape[0], *logits.shape[1:])
        if criterion is not None:
            return criterion.classify(per)
        return [float(ForSequenceClassificationLoss(labels, per[r], self.base.config)) for r in range(replicas)]

    def _chunked_head(self, model: nn.Module, inputs: dict[str, Any], criterion: Criterion, replicas: int, n: int) -> None:
        """Run the model with its LM head applied to chunks of the labelled rows, each fed to ``criterion``."""
        if not n:
            return
        head = self.base.get_output_embeddings()
        vocab = int(self.base.config.get_text_config().vocab_size)
        rows = max(1, HEAD_CHUNK_BYTES // (replicas * vocab * _LOGIT_BYTES))
        original = head.forward

        def forward(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if args or kwargs or hidden.shape[0] != replicas * n:
                raise Unsupported(f"the LM head got {tuple(hidden.shape)}, not {replicas} x {n} labelled rows")
            per = hidden.view(replicas, n, hidden.shape[-1])
            for start in range(0, n, rows):
                logits = original(per[:, start : start + rows].reshape(-1, hidden.shape[-1]))
                criterion.consume(logits.view(replicas, -1, logits.shape[-1]), start)
            return hidden.new_zeros(hidden.shape[0], 0)

        with applied([Patch(head, "forward", forward)]):
            model(**inputs)


class Criterion(Protocol):
    """What a replica's value is computed from: the logits of the labelled positions, chunk by chunk."""

    def consume(self, logits: torch.Tensor, start: int) -> None:
        """Logits ``(R, c, V)`` of the labelled positions ``[start, start + c)`` (in :meth:`LossPlan.targets` order)."""

    def result(self, replicas: int) -> list[float]:
        """One value per replica, after every position was consumed."""

    def classify(self, logits: torch.Tensor) -> list[float]:
        """Sequence classification: one value per replica from class logits ``(R, b, C)``."""


class CrossEntropy:
    """The mean cross-entropy of the label tokens (the causal-LM loss), summed in float64 chunk by chunk."""

    def __init__(self, targets: torch.Tensor) -> None:
        self.targets = targets
        self.sums: torch.Tensor | None = None

    def consume(self, logits: torch.Tensor, start: int) -> None:
        replicas, count, vocab = logits.shape
        tokens = self.targets[start : start + count].repeat(replicas)
        ce = F.cross_entropy(logits.reshape(-1, vocab).float(), tokens, reduction="none").view(replicas, count)
        sums = ce.sum(1, dtype=torch.float64)
        self.sums = sums if self.sums is None else self.sums.add_(sums)

    def result(self, replicas: int) -> list[float]:
        if self.sums is None:  # no label token: the mean over none, as the model's loss
            return [math.nan] * replicas
        return (self.sums / self.targets.numel()).tolist()

    def classify(self, logits: torch.Tensor) -> list[float]:
        raise NotImplementedError("the sequence-classification loss is the model's own")


class CandidateScores:
    """A :class:`Criterion`: each replica's candidate scores (see :class:`~zopeft.objectives.CandidateBatch`), then the objective."""

    def __init__(self, batch: CandidateBatch, objective: Objective, targets: torch.Tensor, rows: torch.Tensor) -> None:
        self.batch, self.objective = batch, objective
        self.targets, self.rows = targets, rows  # each labelled position's token and batch row
        self.parts: list[torch.Tensor] = []

    def consume(self, logits: torch.Tensor, start: int) -> None:
        logp = logits.float().log_softmax(-1)  # (R, c, V)
        if self.batch.candidate_tokens is not None:
            self.parts.append(logp[..., self.batch.candidate_tokens.to(logp.device)])  # (R, c, C)
        else:
            tokens = self.targets[start : start + logp.shape[1]].to(logp.device)
            self.parts.append(logp.gather(2, tokens.view(1, -1, 1).expand(logp.shape[0], -1, 1)).squeeze(2))

    def result(self, replicas: int) -> list[float]:
        return self._values(self.scores(replicas))

    def scores(self, replicas: int) -> torch.Tensor:
        """``(R, examples, candidates)``: each candidate's score (-inf where an example has fewer candidates)."""
        b = self.batch
        if b.candidate_tokens is not None:
            scores = torch.cat(self.parts, dim=1)  # (R, examples, C): one labelled position per example
        else:
            per_token = torch.cat(self.parts, dim=1)  # (R, positions)
            rows = self.rows.to(per_token.device)
            n_rows = b.row_example.numel()
            sums = per_token.new_zeros(replicas, n_rows).index_add_(1, rows, per_token)
            if b.length_normalised:
                sums = sums / torch.bincount(rows, minlength=n_rows).clamp_(min=1)
            scores = per_token.new_full((replicas, b.gold.numel(), b.num_candidates), float("-inf"))
            scores[:, b.row_example.to(rows.device), b.row_candidate.to(rows.device)] = sums
        return scores

    def classify(self, logits: torch.Tensor) -> list[float]:
        return self._values(F.log_softmax(logits.float(), -1))

    def _values(self, scores: torch.Tensor) -> list[float]:
        gold = self.batch.gold.to(scores.device)
        return [float(self.objective(scores[r], gold)) for r in range(scores.shape[0])]


def _logits(output: Any) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise Unsupported("the model output has no logits")
    return logits


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
