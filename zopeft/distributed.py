"""Multi-process ZO under torchrun: ranks share every perturbation and exchange only loss scalars.

Every rank regenerates every noise tensor from its seed, so replicas never
exchange weights or gradients:

* ``perturbation`` parallel (default for FZOO): all ranks see the same batch,
  the step's n loss evaluations are divided among them, and one all-reduce of
  n + 1 floats (the losses and the evaluation count) gives every rank all the
  losses.
* ``data`` parallel (MeZO, AdaMeZO, or FZOO when asked): each rank evaluates
  every point on its own micro-batch; the same all-reduce averages the loss
  vectors, a K-times larger effective batch.

Either way every rank applies the identical update.  :meth:`ZOComm.check_sync`
compares an exact checksum of the trainable tensors across ranks.  From a
script started with ``torchrun``, an optimizer joins the job by itself::

    opt = zopeft.FZOO(model, lr=1e-3)          # parallel="auto": perturbation parallel
    opt.step(zopeft.loss_closure(model, batch))  # every rank passes the same batch
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "PARALLEL_MODES", "ReplicaDivergence", "ZOComm", "barrier", "distributed_session", "exit_worker", "from_rank0",
    "init_distributed", "launch_rank",
]

PARALLEL_MODES = ("perturbation", "data")
T = TypeVar("T")


class ReplicaDivergence(RuntimeError):
    """The trainable tensors differ between ranks."""


def launch_rank() -> tuple[int, int]:
    """This process's (rank, world size) as torchrun launched it (``RANK``, ``WORLD_SIZE``), also once the run's
    process group is gone; (0, 1) outside torchrun.  Rank 0 alone reports a run."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _launched_with_peers() -> bool:
    """Whether torchrun started this process as one of several (``WORLD_SIZE`` > 1)."""
    return launch_rank()[1] > 1


def init_distributed() -> tuple[int, int]:
    """Initialise ``torch.distributed`` from the torchrun environment; return (rank, world size).

    Backend ``nccl`` when CUDA is available (one device per local rank), ``gloo`` otherwise.
    Outside torchrun (no ``WORLD_SIZE`` > 1) nothing is initialised and (0, 1) is returned.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if not _launched_with_peers():
        return 0, 1
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


@contextlib.contextmanager
def distributed_session() -> Iterator[tuple[int, int]]:
    """:func:`init_distributed` for the duration of a run; tears the process group down if it set it up."""
    created = _launched_with_peers() and not (dist.is_available() and dist.is_initialized())
    try:
        yield init_distributed()
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def exit_worker(code: int | str | None = 0) -> None:
    """End a torchrun worker (world size > 1) now, its output flushed; elsewhere return.

    After a finished multi-process job the interpreter's own teardown sometimes aborts (SIGABRT,
    "terminate called without an active exception", no Python frame left: 4 of ~370 2-process
    launches on two CPU cores, torch 2.13 with gloo), which torchrun reports as a
    failed job.  Everything is written by then: skipping the teardown skips the abort.
    ``code`` is :class:`SystemExit`'s: a number, None (0) or a message (printed; exit status 1).
    """
    if not _launched_with_peers():
        return
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def from_rank0(value: T) -> T:
    """Rank 0's ``value`` on every rank (e.g. what only rank 0 evaluated), after every rank got there."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@dataclass
class ZOComm:
    """How one optimizer shares its loss evaluations with the other ranks."""

    mode: Literal["perturbation", "data"] = "perturbation"
    rank: int = 0
    world_size: int = 1

    @classmethod
    def for_optimizer(cls, parallel: str | None, default: str) -> ZOComm | None:
        """The communicator for an optimizer's ``parallel`` setting; ``None`` for a single process.

        ``"auto"`` picks ``default`` when the job has several ranks (initialising
        ``torch.distributed`` from the torchrun environment if needed).
        """
        if parallel is None:
            return None
        if parallel != "auto" and parallel not in PARALLEL_MODES:
            raise ValueError(f"unknown parallel mode {parallel!r}; choose one of auto, {', '.join(PARALLEL_MODES)}")
        rank, world = init_distributed()
        if world == 1:
            return None
        return cls(mode=default if parallel == "auto" else parallel, rank=rank, world_size=world)  # type: ignore[arg-type]

    @property
    def device(self) -> torch.device:
        backend_is_nccl = dist.is_initialized() and dist.get_backend() == "nccl"
        return torch.device("cuda", torch.cuda.current_device()) if backend_is_nccl else torch.device("cpu")

    @property
    def data_shard(self) -> tuple[int, int]:
        """(this rank's shard, number of shards) of each global batch: each rank its own in data-parallel mode."""
        return (self.rank, self.world_size) if self.mode == "data" else (0, 1)

    def assigned(self, n: int) -> list[int]:
        """Indices of the evaluations this rank runs (all of them in data-parallel mode)."""
        if self.mode == "data":
            return list(range(n))
        return list(range(self.rank, n, self.world_size))

    def combine(self, mine: list[float], n: int, evaluated: int) -> tuple[list[float], int]:
        """All n losses (averaged over ranks in data-parallel mode) and the job's evaluation count.

        One all-reduce of n + 1 float64 values; a non-finite loss on any rank makes that
        entry non-finite on every rank, so all ranks skip the step together.
        """
        vec = torch.zeros(n + 1, dtype=torch.float64, device=self.device)
        vec[self.assigned(n)] = torch.tensor(mine, dtype=torch.float64, device=self.device)
        vec[n] = evaluated
        dist.all_reduce(vec)
        losses = vec[:n] / self.world_size if self.mode == "data" else vec[:n]
        return losses.tolist(), int(vec[n].item())

    @staticmethod
    def payload_bytes(n: int) -> int:
        """Bytes each rank contributes to :meth:`combine` for n evaluations."""
        return (n + 1) * torch.finfo(torch.float64).bits // 8

    def check_sync(self, fingerprint: int, step: int) -> None:
        """Raise :class:`ReplicaDivergence` unless every rank has the same ``fingerprint`` of its trainable tensors."""
        local = torch.tensor([fingerprint], dtype=torch.int64, device=self.device)
        gathered = [torch.zeros_like(local) for _ in range(self.world_size)]
        dist.all_gather(gathered, local)
        values = [int(g.item()) for g in gathered]
        if len(set(values)) > 1:
            raise ReplicaDivergence(
                f"trainable tensors differ between ranks at step {step} (checksums {values}); "
                "check that every rank runs the same recipe, seed and library versions"
            )
