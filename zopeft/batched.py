"""Evaluate several perturbed adapter points on one batch in one batched forward pass.

FZOO evaluates the loss at N+1 points (θ and θ + ε·uᵢ) on the *same* batch.  With an
adapter, the points differ only in the small adapter tensors, so the N+1 forwards can
share the expensive frozen base: the batch is replicated R times along the batch
dimension (replica-major: rows ``[r·b, (r+1)·b)`` are replica ``r``) and every adapter
module computes its output with the replica's own tensors.  One forward then runs one
large base matmul (one dequantization of a 4/8-bit weight) instead of R small ones.

Usage — build the closure with :func:`loss_closure` instead of a lambda::

    closure = zopeft.batched.loss_closure(model, batch)
    opt.step(closure)            # FZOO: batched where supported, else sequential

Calling the closure is the ordinary sequential closure (``model(**batch).loss``); its
:meth:`BatchedLoss.losses` method is what an optimizer with ``batched=True`` uses.

Supported (the per-replica tensors are computed from the optimizer's master weights
and its seeded noise; the model's own weights are never written):

* LoRA on ``nn.Linear`` layers (PEFT ``lora.Linear`` over unquantized, bitsandbytes
  4-bit ``Linear4bit`` and 8-bit ``Linear8bitLt`` bases), including ``lora_bias``, plus
  ``modules_to_save`` copies that are ``nn.Linear`` / ``nn.Embedding`` (e.g. a
  classification head);
* prefix tuning and prompt tuning (per-replica virtual tokens from the prompt encoder,
  with or without prefix projection);
* causal-LM loss (mean over label tokens ≠ -100 after the shift by one, per replica,
  with the model's own ``loss_function``; where the model takes a boolean
  ``logits_to_keep`` — transformers 5 — the vocabulary projection runs only at the
  positions followed by a label, which for MeZO-style prompts with one answer token
  removes most of the LM-head cost) and sequence-classification loss (regression /
  single-label / multi-label, as the model's own ``loss``).

The replicas are chunked: ``perturbation_batch_size`` replicas per forward pass (on the
closure or the optimizer), else as many as a rough activation estimate fits into half of
the free GPU memory / 30% of the available host memory; an out-of-memory error halves the
chunk (remembered per model).  Exactness: every replica's adapter tensors are exactly the
values the sequential path writes (θ₀ + scale·ε·z from the optimizer's fp32 masters and
``optimizer.draw``), and the model's weights are never written; the losses agree with the
sequential ones to fp32 rounding (different kernel shapes), bit-for-bit in some cases.

Anything else (full-parameter ZO, DoRA and other LoRA variants, IA³, LoRA on
embeddings/convolutions, encoder-decoder models, a model in training mode, batches with
loss-changing keys such as ``num_items_in_batch``) falls back to the sequential loop,
with a log line (logger ``"zopeft"``) naming the reason.  The path taken is logged at
INFO level when it is first chosen or changes for an optimizer.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .optim.base import Evaluation, ZOOptimizer

__all__ = ["BatchedLoss", "batched_support", "loss_closure", "log_evaluation_path"]

logger = logging.getLogger("zopeft")

# Batch keys that change the loss or the forward in ways the batched path does not model.
_DENIED_KEYS = frozenset(
    {
        "num_items_in_batch", "shift_labels", "logits_to_keep", "num_logits_to_keep", "past_key_values",
        "cache", "return_dict", "output_router_logits", "adapter_names", "task_ids", "return_loss",
        "decoder_input_ids", "decoder_attention_mask",
    }
)
# Fraction of free accelerator memory / available host memory the replicas may use.
_CUDA_MEMORY_FRACTION = 0.5
_CPU_MEMORY_FRACTION = 0.3
_CPU_MEMORY_CAP = 16 << 30

_logged_path: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
_max_replicas: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()  # after an OOM
_failed: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()  # batched forward raised


class _Unsupported(Exception):
    """Raised while planning or running when the batched path cannot reproduce the sequential one."""


def log_evaluation_path(optimizer: Any, path: str, detail: str) -> None:
    """Log which evaluation path ``optimizer`` takes: INFO when it changes, DEBUG otherwise."""
    message = f"{type(optimizer).__name__}: {path} evaluation ({detail})"
    try:
        changed = _logged_path.get(optimizer) != message
        _logged_path[optimizer] = message
    except TypeError:  # not weak-referenceable
        changed = True
    logger.log(logging.INFO if changed else logging.DEBUG, message)


def loss_closure(model: nn.Module, batch: Mapping[str, Any], *, perturbation_batch_size: int | None = None) -> BatchedLoss:
    """A closure for ``opt.step``/``opt.estimate`` that also offers batched evaluation.

    Args:
        model: the (PEFT-wrapped) model; ``model(**batch).loss`` is the loss.
        batch: the model's keyword inputs, with ``labels``.
        perturbation_batch_size: replicas (loss evaluations) per forward pass; overrides
            the optimizer's ``perturbation_batch_size``; ``None``: the optimizer's, else
            automatic (from free memory).
    """
    return BatchedLoss(model, batch, perturbation_batch_size=perturbation_batch_size)


def batched_support(model: nn.Module, optimizer: ZOOptimizer, batch: Mapping[str, Any]) -> str | None:
    """``None`` if the batched path supports this model/optimizer/batch, else the reason it does not.

    Checked as the optimizer evaluates: in eval mode when it was built from the module.
    """
    import contextlib

    mode = getattr(optimizer, "_eval_mode", None)
    try:
        with mode() if mode is not None else contextlib.nullcontext():
            _plan(model, optimizer, batch)
    except _Unsupported as exc:
        return str(exc)
    return None


class BatchedLoss:
    """``model(**batch).loss`` as a closure, plus :meth:`losses`: many perturbed losses in few forwards."""

    def __init__(self, model: nn.Module, batch: Mapping[str, Any], *, perturbation_batch_size: int | None = None) -> None:
        if perturbation_batch_size is not None and perturbation_batch_size < 1:
            raise ValueError(f"perturbation_batch_size must be >= 1, got {perturbation_batch_size}")
        self.model = model
        self.batch = batch
        self.perturbation_batch_size = perturbation_batch_size
        self._replicated: dict[int, dict[str, Any]] = {}

    def __call__(self) -> Any:
        """The sequential closure: the model's own loss on the batch at its current weights."""
        return self.model(**self.batch).loss

    def losses(self, optimizer: ZOOptimizer, evaluations: Sequence[Evaluation]) -> list[float] | None:
        """The loss at each evaluation point, or ``None`` where unsupported (the caller runs the sequential loop).

        ``evaluations`` are the optimizer's ``(perturbation index, scale)`` pairs (``None``: θ);
        the point's tensors are θ₀ + scale·ε·z with z from ``optimizer.draw`` — the same
        values the sequential path writes into the model.  Replicas are evaluated in chunks
        of ``perturbation_batch_size`` (automatic if unset, halved after an out-of-memory
        error).  After the first chunk with a non-finite loss no further chunk runs; the
        list then ends at that chunk (the optimizer pads it with NaN).
        """
        mode = getattr(optimizer, "_eval_mode", None)
        if mode is not None:  # as the optimizer evaluates (a no-op when it already did)
            with mode():
                return self._losses(optimizer, evaluations)
        return self._losses(optimizer, evaluations)

    def _losses(self, optimizer: ZOOptimizer, evaluations: Sequence[Evaluation]) -> list[float] | None:
        model = self.model
        if model in _failed:
            log_evaluation_path(optimizer, "sequential", _failed[model])
            return None
        try:
            plan = _plan(model, optimizer, self.batch)
        except _Unsupported as exc:
            log_evaluation_path(optimizer, "sequential", f"batched unsupported: {exc}")
            return None
        total = len(evaluations)
        chunk = self._chunk_size(optimizer, plan, total)
        log_evaluation_path(
            optimizer, "batched",
            f"{plan.kind}; {total} points, up to {chunk} replicas of the batch per forward pass",
        )
        out: list[float] = []
        start = 0
        try:
            while start < total:
                evs = evaluations[start : start + chunk]
                try:
                    chunk_losses = self._run(plan, optimizer, evs)
                except torch.OutOfMemoryError:
                    if chunk == 1:
                        raise
                    chunk = max(1, chunk // 2)
                    _max_replicas[model] = chunk
                    logger.warning("out of memory in a batched evaluation; retrying with %d replicas per forward pass", chunk)
                    _empty_cache(plan.device)
                    continue
                out += chunk_losses
                start += len(evs)
                if not all(map(math.isfinite, chunk_losses)):
                    break
        except _Unsupported as exc:
            reason = f"batched evaluation unsupported at run time: {exc}"
            _failed[model] = reason
            log_evaluation_path(optimizer, "sequential", reason)
            return None
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - never let the fast path break a run the slow path handles
            reason = f"batched evaluation failed ({type(exc).__name__}: {exc}); using sequential from now on"
            _failed[model] = reason
            logger.warning("%s", reason)
            log_evaluation_path(optimizer, "sequential", reason)
            return None
        return out

    # ----- internals -------------------------------------------------------------------------
    def _chunk_size(self, optimizer: ZOOptimizer, plan: _Plan, total: int) -> int:
        size = self.perturbation_batch_size or getattr(optimizer, "perturbation_batch_size", None)
        if not size:
            size = _auto_replicas(self.model, plan)
        size = min(size, _max_replicas.get(self.model, total), total)
        chunks = -(-total // size)
        return -(-total // chunks)  # even chunks: 9 points at 8 per forward -> 5 + 4

    def _replicate(self, plan: _Plan, replicas: int) -> dict[str, Any]:
        """The batch's inputs repeated ``replicas`` times along dim 0 (replica-major), without labels."""
        cached = self._replicated.get(replicas)
        if cached is None:
            cached = {}
            for key, value in self.batch.items():
                if key == "labels":
                    continue
                if isinstance(value, torch.Tensor):
                    value = value.repeat(replicas, *([1] * (value.dim() - 1)))
                cached[key] = value
            if plan.kind_loss == "causal":
                if "use_cache" not in cached:
                    cached["use_cache"] = False
                if plan.keep_mask:  # project onto the vocabulary only where a label follows
                    mask = plan.label_mask(self.batch["labels"])
                    cached["logits_to_keep"] = mask.repeat(replicas, 1)
            self._replicated[replicas] = cached  # at most two sizes: chunks are even
        return cached

    def _run(self, plan: _Plan, optimizer: ZOOptimizer, evaluations: Sequence[Evaluation]) -> list[float]:
        replicas = len(evaluations)
        stacks = {index: _stack_values(optimizer, index, evaluations) for index in plan.indices}
        inputs = self._replicate(plan, replicas)
        with plan.patched(stacks, replicas):
            output = self.model(**inputs)
        logits = getattr(output, "logits", None)
        if not isinstance(logits, torch.Tensor):
            raise _Unsupported("the model output has no logits")
        return plan.loss(logits, self.batch["labels"], replicas)


# ----- the plan: which modules get per-replica tensors, and the loss ---------------------------
@dataclass
class _Target:
    module: nn.Module
    kind: str  # "linear" | "embedding" | "prompt"
    params: dict[str, int]  # attribute name -> optimizer tensor index


@dataclass
class _Plan:
    model: nn.Module
    base: nn.Module
    kind: str
    kind_loss: str  # "causal" | "seq_cls"
    targets: list[_Target]
    indices: list[int]
    device: torch.device
    rows: int  # token positions per replica (b·T, + virtual tokens)
    length: int  # sequence length seen by attention
    labelled: int = 0  # label tokens per replica
    extra_tokens: int = 0  # prompt tuning: virtual tokens prepended to the logits
    keep_mask: bool = False  # the model takes a boolean ``logits_to_keep``

    def patched(self, stacks: dict[int, torch.Tensor], replicas: int) -> _Patched:
        return _Patched(self, stacks, replicas)

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

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, replicas: int) -> list[float]:
        """Per-replica losses, each reduced exactly as the model's own ``loss`` on the batch."""
        labels = labels.to(logits.device)
        b = labels.shape[0]
        if self.kind_loss == "causal":
            loss_fn = self.base.loss_function  # checked in _plan: transformers' ForCausalLMLoss
            vocab = logits.shape[-1]
            if self.keep_mask:  # logits (R·n, V) at the masked positions; targets already shifted
                mask = self.label_mask(labels)
                targets = self.extended_labels(labels)[:, 1:][mask[:, :-1]]
                if not targets.numel():  # no label token: the mean over none, as the model's loss
                    return [math.nan] * replicas
                if logits.dim() != 2 or logits.shape[0] != replicas * targets.numel():
                    raise _Unsupported(f"logits_to_keep gave logits of shape {tuple(logits.shape)}")
                per = logits.view(replicas, -1, vocab)
                return [
                    float(loss_fn(logits=per[r], labels=None, vocab_size=vocab, shift_labels=targets))
                    for r in range(replicas)
                ]
            labels = self.extended_labels(labels)
            if logits.shape[:2] != (replicas * b, labels.shape[1]):
                raise _Unsupported(
                    f"logits of shape {tuple(logits.shape)} do not match {replicas} x labels {tuple(labels.shape)}"
                )
            per = logits.view(replicas, b, *logits.shape[1:])
            return [float(loss_fn(logits=per[r], labels=labels, vocab_size=vocab)) for r in range(replicas)]
        from transformers.loss.loss_utils import ForSequenceClassificationLoss

        if logits.shape[0] != replicas * b:
            raise _Unsupported(f"logits batch {logits.shape[0]} is not {replicas} x {b}")
        per = logits.view(replicas, b, *logits.shape[1:])
        return [float(ForSequenceClassificationLoss(labels, per[r], self.base.config)) for r in range(replicas)]


class _Patched:
    """Temporarily route the target modules' forwards through per-replica tensors."""

    def __init__(self, plan: _Plan, stacks: dict[int, torch.Tensor], replicas: int) -> None:
        self.plan, self.stacks, self.replicas = plan, stacks, replicas
        self.saved: list[tuple[nn.Module, str, Any]] = []

    def __enter__(self) -> None:
        for target in self.plan.targets:
            values = {name: self.stacks[i] for name, i in target.params.items()}
            if target.kind == "prompt":  # PEFT embeds one prompt and repeats it: replace get_prompt itself
                owner, attr = self.plan.model, "get_prompt"
                patched = _prompt_getter(values["weight"], owner.prompt_tokens[owner.active_adapter], self.replicas)
            else:
                owner, attr = target.module, "forward"
                fn = _linear_forward if target.kind == "linear" else _embedding_forward
                patched = _bind(fn, owner, values, self.replicas)
            self.saved.append((owner, attr, owner.__dict__.get(attr)))
            setattr(owner, attr, patched)

    def __exit__(self, *exc: Any) -> None:
        for owner, attr, previous in reversed(self.saved):
            if previous is None:
                owner.__dict__.pop(attr, None)
            else:
                setattr(owner, attr, previous)
        self.saved.clear()


def _prompt_getter(weight: torch.Tensor, tokens: torch.Tensor, replicas: int) -> Any:
    """``PeftModel.get_prompt`` for prompt tuning with per-replica virtual-token embeddings."""

    def get_prompt(batch_size: int, task_ids: Any = None, **kwargs: Any) -> torch.Tensor:
        if task_ids is not None or batch_size % replicas:
            raise _Unsupported(f"prompt for batch {batch_size} is not {replicas} replicas")
        prompts = weight[:, tokens.to(weight.device)]  # (R, virtual tokens, D): embedding lookup per replica
        return prompts.repeat_interleave(batch_size // replicas, dim=0)

    return get_prompt


def _bind(fn: Any, module: nn.Module, values: dict[str, torch.Tensor], replicas: int) -> Any:
    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs:
            raise _Unsupported(f"{type(module).__name__} called with extra arguments")
        return fn(module, values, replicas, x)

    return forward


def _split(x: torch.Tensor, replicas: int, keep_last: bool = True) -> torch.Tensor:
    """View ``x`` (R·b, ..., d) as (R, b·..., d): replica-major rows, as the batch was replicated."""
    if x.dim() < (2 if keep_last else 1) or x.shape[0] % replicas:
        raise _Unsupported(f"an adapter input of shape {tuple(x.shape)} is not {replicas} replicas along dim 0")
    return x.reshape(replicas, -1, x.shape[-1]) if keep_last else x.reshape(replicas, -1)


def _linear_forward(module: nn.Linear, values: dict[str, torch.Tensor], replicas: int, x: torch.Tensor) -> torch.Tensor:
    weight = values.get("weight")
    bias = values.get("bias", module.bias)
    if replicas == 1:  # exactly the module's own computation
        w = module.weight if weight is None else weight[0]
        b = bias[0] if bias is not None and "bias" in values else bias
        return F.linear(x, w, b)
    xr = _split(x, replicas)  # (R, M, in)
    if weight is None:
        y = F.linear(xr, module.weight)
    else:
        y = torch.bmm(xr, weight.transpose(1, 2))
    if bias is not None:
        y = y + (bias.unsqueeze(1) if "bias" in values else bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _embedding_forward(module: nn.Embedding, values: dict[str, torch.Tensor], replicas: int, idx: torch.Tensor) -> torch.Tensor:
    weight = values["weight"]  # (R, V, D)
    if replicas == 1:
        return F.embedding(idx, weight[0], module.padding_idx)
    rows = weight.shape[1]
    ir = _split(idx, replicas, keep_last=False)
    offsets = torch.arange(replicas, device=idx.device, dtype=idx.dtype).mul_(rows).unsqueeze(1)
    out = F.embedding(ir + offsets, weight.reshape(replicas * rows, -1))
    return out.reshape(*idx.shape, weight.shape[-1])


def _stack_values(optimizer: ZOOptimizer, index: int, evaluations: Sequence[Evaluation]) -> torch.Tensor:
    """Tensor ``index`` at each evaluation point, stacked: bit-identical to what ``perturb`` writes."""
    p = optimizer._tensors[index]
    masters = optimizer._masters
    step = optimizer.step_index
    values = []
    for ev in evaluations:
        if ev is None:  # θ₀: what ``restore`` writes
            values.append(p.detach() if masters is None else masters[index].to(p.dtype))
            continue
        k, scale = ev
        z = optimizer.draw(step, k, index, p)
        if masters is None:
            values.append(p.detach().add(z, alpha=scale * optimizer.eps))
        else:
            values.append(z.mul_(scale * optimizer.eps).add_(masters[index]).to(p.dtype))
    return torch.stack(values)


def _lora_linear_types() -> tuple[type, ...]:
    from peft.tuners.lora import layer

    types: list[type] = [layer.Linear]
    try:
        from peft.tuners.lora import bnb as lora_bnb

        types += [getattr(lora_bnb, n) for n in ("Linear8bitLt", "Linear4bit") if hasattr(lora_bnb, n)]
    except ImportError:  # bitsandbytes missing
        pass
    return tuple(types)


def _plan(model: nn.Module, optimizer: ZOOptimizer, batch: Mapping[str, Any]) -> _Plan:
    if not getattr(optimizer, "_tensors", None):
        raise _Unsupported("the optimizer has no tensors")
    # -- the batch
    if not isinstance(batch, Mapping):
        raise _Unsupported("the batch is not a mapping of keyword inputs")
    labels = batch.get("labels")
    if not isinstance(labels, torch.Tensor) or labels.dim() == 0:
        raise _Unsupported("the batch has no labels tensor")
    b = labels.shape[0]
    length = labels.shape[1] if labels.dim() > 1 else 1
    for key, value in batch.items():
        if key in _DENIED_KEYS:
            raise _Unsupported(f"batch key {key!r} changes the loss or forward")
        if isinstance(value, torch.Tensor):
            if value.dim() == 0 or value.shape[0] != b:
                raise _Unsupported(f"batch tensor {key!r} of shape {tuple(value.shape)} has no leading batch dim {b}")
            if key in ("input_ids", "inputs_embeds") and value.dim() > 1:
                length = max(length, value.shape[1])
        elif not (value is None or isinstance(value, bool)):
            raise _Unsupported(f"batch key {key!r} is not a tensor")
    # -- the model
    if any(m.training for m in model.modules()):
        raise _Unsupported("the model is in training mode (dropout would make evaluations random)")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None:
        raise _Unsupported("not a transformers model")
    if getattr(config, "is_encoder_decoder", False):
        raise _Unsupported("encoder-decoder model")
    if getattr(config, "output_router_logits", False):
        raise _Unsupported("the loss includes a router auxiliary loss")
    cls = type(base).__name__
    if cls.endswith("ForCausalLM"):
        from transformers.loss.loss_utils import ForCausalLMLoss

        if base.loss_function is not ForCausalLMLoss:
            raise _Unsupported(f"{cls} has a custom loss function")
        kind_loss = "causal"
    elif cls.endswith("ForSequenceClassification"):
        kind_loss = "seq_cls"
    else:
        raise _Unsupported(f"{cls}: only causal-LM and sequence-classification losses are batched")
    peft_config = getattr(model, "active_peft_config", None)
    prompt_type, extra_tokens = prompt_learning_type(model), 0
    if prompt_type is not None:
        if prompt_type not in ("PREFIX_TUNING", "PROMPT_TUNING"):
            raise _Unsupported(f"prompt-learning method {prompt_type}")
        if peft_config.inference_mode:
            raise _Unsupported("the prompt adapter is in inference mode")
        length += int(getattr(peft_config, "num_virtual_tokens", 0) or 0)
        if prompt_type == "PROMPT_TUNING" and kind_loss == "causal":
            extra_tokens = int(peft_config.num_virtual_tokens)
    # -- the trainable tensors: each must live in a module the batched path can replicate
    index_of = {id(p): i for i, p in enumerate(optimizer._tensors)}
    modules = dict(model.named_modules())
    lora_types = _lora_linear_types()
    targets: dict[int, _Target] = {}
    found: set[int] = set()
    kinds: set[str] = set()
    for name, module in modules.items():
        owned = {pn: index_of[id(p)] for pn, p in module.named_parameters(recurse=False) if id(p) in index_of}
        if not owned:
            continue
        role = _role(name, module, modules, lora_types, prompt_type)
        if role is None:
            pname = next(iter(owned))
            raise _Unsupported(
                f"trainable tensor {name}.{pname} ({type(module).__name__}) is not a LoRA, prompt or "
                "modules_to_save tensor the batched path replicates"
            )
        kinds.add(role)
        found.update(owned.values())
        if id(module) not in targets:
            kind = "linear" if isinstance(module, nn.Linear) else "prompt" if role == "prompt" else "embedding"
            targets[id(module)] = _Target(module, kind, owned)
    if len(found) != len(optimizer._tensors):
        raise _Unsupported("some optimizer tensors are not parameters of the model")
    p0 = optimizer._tensors[0]
    return _Plan(
        model=model, base=base, kind=" + ".join(sorted(kinds)), kind_loss=kind_loss, targets=list(targets.values()),
        indices=sorted(found), device=p0.device, rows=b * length, length=length, extra_tokens=extra_tokens,
        labelled=int((labels != -100).sum()) if labels.dtype != torch.float32 else b,
        keep_mask=kind_loss == "causal" and takes_logit_mask(base),
    )


def prompt_learning_type(model: nn.Module) -> str | None:
    """The active PEFT prompt-learning method (``"PREFIX_TUNING"``, ``"PROMPT_TUNING"``, ...); None without one."""
    config = getattr(model, "active_peft_config", None)
    if config is None or not getattr(config, "is_prompt_learning", False):
        return None
    return str(getattr(config.peft_type, "value", config.peft_type))


def takes_logit_mask(base: nn.Module) -> bool:
    """Whether ``base.forward`` slices its hidden states with transformers' ``slice_logits_to_keep`` (bool masks)."""
    import inspect

    from transformers import modeling_utils

    if not hasattr(modeling_utils, "slice_logits_to_keep"):
        return False
    try:
        forward = inspect.unwrap(type(base).forward)
        takes = "logits_to_keep" in inspect.signature(forward).parameters
        return takes and "slice_logits_to_keep" in forward.__code__.co_names
    except (TypeError, ValueError, AttributeError):
        return False


def _role(
    name: str, module: nn.Module, modules: dict[str, nn.Module], lora_types: tuple[type, ...], prompt_type: str | None
) -> str | None:
    """What a module holding optimizer tensors is to the batched path (None: not replicable)."""
    if "_hf_hook" in module.__dict__:
        return None  # accelerate dispatch hook on the adapter module itself
    is_linear = type(module) is nn.Linear
    is_embedding = type(module) is nn.Embedding and module.max_norm is None
    if not (is_linear or is_embedding):
        return None
    parts = name.split(".")
    if is_linear and len(parts) >= 3 and parts[-2] in ("lora_A", "lora_B"):
        layer = modules.get(".".join(parts[:-2]))
        adapter = parts[-1]
        if not isinstance(layer, lora_types):
            raise _Unsupported(f"LoRA layer type {type(layer).__name__} ({name}) is not batched")
        if getattr(layer, "merged", False):
            raise _Unsupported(f"the LoRA weights of {name} are merged into the base layer")
        variant = getattr(layer, "lora_variant", {}).get(adapter)
        if variant is not None or getattr(layer, "use_dora", {}).get(adapter, False):
            # DoRA and the other variants read the adapter weights directly (e.g. for the weight norm)
            raise _Unsupported(f"LoRA variant {type(variant).__name__ if variant else 'DoRA'} ({name})")
        return "LoRA"
    if "modules_to_save" in parts:
        return "modules_to_save"
    if prompt_type == "PREFIX_TUNING" and "prompt_encoder" in parts:
        return "prefix"  # the prefix encoder's embedding (and projection MLP) see the replicated batch
    if prompt_type == "PROMPT_TUNING" and is_embedding and parts[-3:-2] == ["prompt_encoder"] and parts[-1] == "embedding":
        return "prompt"  # prompt_encoder.<adapter>.embedding
    return None


def _auto_replicas(model: nn.Module, plan: _Plan) -> int:
    """How many replicas of the batch fit: a rough activation estimate against free memory."""
    cap = _max_replicas.get(model, 1 << 30)
    config = plan.base.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(getattr(text, "hidden_size", 1024) or 1024)
    heads = int(getattr(text, "num_attention_heads", 16) or 16)
    vocab = int(getattr(text, "vocab_size", 32000) or 32000) if plan.kind_loss == "causal" else 16
    inter = int(getattr(text, "intermediate_size", 4 * hidden) or 4 * hidden)
    rows, length, elem = plan.rows, plan.length, 4
    projected = plan.labelled if plan.keep_mask else rows  # positions projected onto the vocabulary
    # logits, ~ a dozen hidden-size activations, the MLP, and attention scores
    per_replica = elem * (projected * vocab + rows * (12 * hidden + 2 * inter) + rows * heads * min(length, 4096))
    budget = _memory_budget(plan.device)
    return max(1, min(cap, int(budget // max(1, per_replica))))


def _memory_budget(device: torch.device) -> float:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free * _CUDA_MEMORY_FRACTION
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh}
        available = info.get("MemAvailable", info.get("MemFree", 8 << 30))
    except OSError:
        available = 8 << 30
    return min(available * _CPU_MEMORY_FRACTION, _CPU_MEMORY_CAP)


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
