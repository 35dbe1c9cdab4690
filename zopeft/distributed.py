"""Multi-process ZO under torchrun: ranks share every perturbation and exchange only loss scalars.

Every rank regenerates every noise tensor from its seed, so replicas never
exchange weights or gradients:

* ``perturbation`` parallel (default for FZOO): all ranks see the same batch,
  the N+1 evaluations are divided among them, and one all-reduce of N+1
  floats gives every rank all the losses.
* ``data`` parallel (MeZO, AdaMeZO, or FZOO when asked): each rank evaluates
  every perturbation on its own micro-batch; one all-reduce averages the loss
  vectors, a K-times larger effective batch.

Either way every rank applies the identical update.  :meth:`ZOComm.check_sync`
compares an exact checksum of the trainable tensors across ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

__all__ = ["PARALLEL_MODES", "ReplicaDivergence", "ZOComm", "init_distributed"]

PARALLEL_MODES = ("perturbation", "data")


class ReplicaDivergence(RuntimeError):
    """The trainable tensors differ between ranks."""


def init_distributed() -> tuple[int, int]:
    """Initialise ``torch.distributed`` from the torchrun environment; return (rank, world size).

    Backend ``nccl`` when CUDA is available (one device per local rank), ``gloo`` otherwise.
    Outside torchrun (no ``WORLD_SIZE`` > 1) nothing is initialised and (0, 1) is returned.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


@dataclass
class ZOComm:
    """How one optimizer shares its loss evaluations with the other ranks."""

    mode: Literal["perturbation", "data"] = "perturbation"
    rank: int = 0
    world_size: int = 1
    bytes_per_step: int = 0

    @classmethod
    def from_env(cls, mode: str) -> ZOComm:
        if mode not in PARALLEL_MODES:
            raise ValueError(f"unknown parallel mode {mode!r}; choose one of {', '.join(PARALLEL_MODES)}")
        rank, world = init_distributed()
        return cls(mode=mode, rank=rank, world_size=world)  # type: ignore[arg-type]

    @property
    def device(self) -> torch.device:
        backend_is_nccl = dist.is_initialized() and dist.get_backend() == "nccl"
        return torch.device("cuda", torch.cuda.current_device()) if backend_is_nccl else torch.device("cpu")

    def assigned(self, n: int) -> list[int]:
        """Indices of the evaluations this rank runs (all of them in data-parallel mode)."""
        if self.mode == "data":
            return list(range(n))
        return list(range(self.rank, n, self.world_size))

    def combine(self, mine: list[float], n: int) -> list[float]:
        """All ranks' losses for the n evaluations, after one all-reduce of n floats."""
        if self.world_size == 1:
            return mine
        vec = torch.zeros(n, dtype=torch.float64, device=self.device)
        vec[self.assigned(n)] = torch.tensor(mine, dtype=torch.float64, device=self.device)
        dist.all_reduce(vec)
        self.bytes_per_step = vec.numel() * vec.element_size()
        if self.mode == "data":
            vec /= self.world_size
        return vec.tolist()

    def evaluations_per_rank_step(self, n: int) -> int:
        """Model evaluations the whole job runs for one micro-batch step of n evaluations."""
        return n * self.world_size if self.mode == "data" else n

    def check_sync(self, tensors: list[torch.Tensor], step: int) -> None:
        """Raise :class:`ReplicaDivergence` unless every rank holds bit-identical tensors."""
        if self.world_size == 1:
            return
        local = torch.tensor([_checksum(tensors)], dtype=torch.int64, device=self.device)
        gathered = [torch.zeros_like(local) for _ in range(self.world_size)]
        dist.all_gather(gathered, local)
        values = [int(g.item()) for g in gathered]
        if len(set(values)) > 1:
            raise ReplicaDivergence(
                f"trainable tensors differ between ranks at step {step} (checksums {values}); "
                "check that every rank runs the same recipe, seed and library versions"
            )


def _checksum(tensors: list[torch.Tensor]) -> int:
    """A bit-sensitive checksum: position-weighted sum of the tensors' raw fp32 words."""
    total = 0
    for i, t in enumerate(tensors):
        words = t.detach().float().reshape(-1).view(torch.int32).to(torch.int64)
        weights = torch.arange(words.numel(), device=words.device) % 7 + 1
        total += (i + 1) * int((words * weights).sum().item())
    return total & ((1 << 63) - 1)
