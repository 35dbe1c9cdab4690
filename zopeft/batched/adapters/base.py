"""What every adapter kind shares: the contract, and forwards that run R replicas of a module at once.

The batch is replicated R times along dim 0 (replica-major: rows ``[r·b, (r+1)·b)`` are replica
``r``); a patched module computes replica r's rows with replica r's tensors, which arrive as
``[R, *shape]`` stacks (views of the optimizer's ``[R, P]`` point matrix).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "KINDS", "AdapterKind", "ModelContext", "Patch", "Unsupported", "applied", "bind", "embedding_forward",
    "linear_forward", "module_patch", "peft_linear_types", "plain_linear_or_embedding", "register", "split_replicas",
]


class Unsupported(Exception):
    """The batched path cannot reproduce the sequential one here (the caller falls back to it)."""


@dataclass
class ModelContext:
    """What an adapter kind may look at while claiming modules."""

    model: nn.Module
    modules: dict[str, nn.Module]
    prompt_type: str | None  # the active PEFT prompt-learning method, e.g. "PREFIX_TUNING"
    peft_config: Any = None


@dataclass
class Patch:
    """Replace ``owner.<attr>`` by ``value`` for one batched forward pass."""

    owner: Any
    attr: str
    value: Callable[..., Any]


@contextlib.contextmanager
def applied(patches: Iterable[Patch]) -> Iterator[None]:
    """Apply ``patches`` (instance attributes) for the duration of the block, then put back what was there."""
    saved: list[tuple[Any, str, Any]] = []
    try:
        for p in patches:
            saved.append((p.owner, p.attr, p.owner.__dict__.get(p.attr)))
            setattr(p.owner, p.attr, p.value)
        yield
    finally:
        for owner, attr, previous in reversed(saved):
            if previous is None:
                owner.__dict__.pop(attr, None)
            else:
                setattr(owner, attr, previous)


class AdapterKind:
    """One kind of trainable tensor the batched path replicates (PEFT's one room per tuner).

    Subclasses say which modules they own (:meth:`claims`) and how a module computes R
    replicas at once (:meth:`patches`); :func:`register` adds them.
    """

    name = "adapter"

    def claims(self, name: str, module: nn.Module, ctx: ModelContext) -> bool:
        """Whether this kind replicates the trainable tensors held directly by ``module``.

        Raise :class:`Unsupported` for a variant of the kind that cannot be batched.
        """
        raise NotImplementedError

    def patches(
        self, name: str, module: nn.Module, values: dict[str, torch.Tensor], replicas: int, ctx: ModelContext
    ) -> list[Patch]:
        """The patches that make ``module`` compute R replicas with ``values`` (name -> ``[R, *shape]``)."""
        raise NotImplementedError


KINDS: list[AdapterKind] = []  # filled as the package imports its modules


def register(cls: type[AdapterKind]) -> type[AdapterKind]:
    """Class decorator: add an instance of ``cls`` to :data:`KINDS`."""
    KINDS.append(cls())
    return cls


def split_replicas(x: torch.Tensor, replicas: int, keep_last: bool = True) -> torch.Tensor:
    """View ``x`` (R·b, ..., d) as (R, b·..., d) (or (R, b·...) without ``keep_last``)."""
    if x.dim() < (2 if keep_last else 1) or x.shape[0] % replicas:
        raise Unsupported(f"an adapter input of shape {tuple(x.shape)} is not {replicas} replicas along dim 0")
    return x.reshape(replicas, -1, x.shape[-1]) if keep_last else x.reshape(replicas, -1)


def bind(fn: Callable[..., torch.Tensor], module: nn.Module, values: dict[str, torch.Tensor], replicas: int) -> Patch:
    """A patch of ``module.forward`` by ``fn(module, values, replicas, x)`` (single-input forwards only)."""

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs:
            raise Unsupported(f"{type(module).__name__} called with extra arguments")
        return fn(module, values, replicas, x)

    return Patch(module, "forward", forward)


def linear_forward(module: nn.Linear, values: dict[str, torch.Tensor], replicas: int, x: torch.Tensor) -> torch.Tensor:
    """``nn.Linear`` with per-replica ``weight`` (and ``bias``) where given."""
    weight = values.get("weight")
    bias = values.get("bias", module.bias)
    if replicas == 1:  # exactly the module's own computation
        w = module.weight if weight is None else weight[0]
        b = bias[0] if bias is not None and "bias" in values else bias
        return F.linear(x, w, b)
    xr = split_replicas(x, replicas)  # (R, M, in)
    y = F.linear(xr, module.weight) if weight is None else torch.bmm(xr, weight.transpose(1, 2))
    if bias is not None:
        y = y + (bias.unsqueeze(1) if "bias" in values else bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def embedding_forward(
    module: nn.Embedding, values: dict[str, torch.Tensor], replicas: int, idx: torch.Tensor
) -> torch.Tensor:
    """``nn.Embedding`` with a per-replica ``weight`` (one lookup into the stacked tables)."""
    weight = values["weight"]  # (R, V, D)
    if replicas == 1:
        return F.embedding(idx, weight[0], module.padding_idx)
    rows = weight.shape[1]
    ir = split_replicas(idx, replicas, keep_last=False)
    offsets = torch.arange(replicas, device=idx.device, dtype=idx.dtype).mul_(rows).unsqueeze(1)
    out = F.embedding(ir + offsets, weight.reshape(replicas * rows, -1))
    return out.reshape(*idx.shape, weight.shape[-1])


@functools.cache
def peft_linear_types(tuner: str) -> tuple[type, ...]:
    """PEFT's linear layer classes of ``tuner`` (``"lora"``, ``"ia3"``): plain, and 8/4-bit where bitsandbytes is."""
    layer = importlib.import_module(f"peft.tuners.{tuner}.layer")
    types: list[type] = [layer.Linear]
    try:
        bnb = importlib.import_module(f"peft.tuners.{tuner}.bnb")
        types += [getattr(bnb, n) for n in ("Linear8bitLt", "Linear4bit") if hasattr(bnb, n)]
    except ImportError:  # bitsandbytes missing
        pass
    return tuple(types)


def plain_linear_or_embedding(module: nn.Module) -> str | None:
    """``"linear"`` / ``"embedding"`` for an exact ``nn.Linear`` / ``nn.Embedding`` (no max_norm), else None."""
    if type(module) is nn.Linear:
        return "linear"
    if type(module) is nn.Embedding and module.max_norm is None:
        return "embedding"
    return None


def module_patch(module: nn.Module, values: dict[str, torch.Tensor], replicas: int) -> Patch:
    """The replica forward of a plain linear or embedding module."""
    fn = linear_forward if plain_linear_or_embedding(module) == "linear" else embedding_forward
    return bind(fn, module, values, replicas)
