"""The one owner of the trainable tensors and of the points θ₀ + s·ε·z_k around them.

The trainable tensors are laid out in flat *buffers*: one per (param group, device, dtype),
split further only where a buffer would exceed :data:`MAX_BUFFER_NUMEL` elements (full-parameter
ZO of a large model).  Each buffer keeps its fp32 master values θ₀ in one flat vector, and its
noise z_k is one vector drawn from the key (seed, step, k, buffer).  Writing a point, restoring
θ₀, stacking R points for a batched forward, applying an update Σ c_k·z_k and rebuilding an old
perturbation are therefore a constant number of tensor operations per buffer, however many
tensors (LoRA layers) the model has: ``torch._foreach_copy_`` moves the flat values into the
model's own tensors, which stay ordinary, separately stored parameters (PEFT ``save_pretrained``,
``state_dict`` and safetensors see nothing unusual).

Exactness: a point is computed as ``master + (s·ε)·z`` from the fp32 masters, the same single
operation on the same inputs whether it is written into the model (sequential evaluation) or
stacked as a replica (batched evaluation), so both paths see bit-identical values, and
:meth:`Points.restore` returns the model to θ₀ bit-exactly.  Without masters
(``master_weights=False``, MeZO's in-place memory for fp32 tensors) a point is added to and
subtracted from the tensors in place, which is not bit-exact.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..noise import NOISE_KINDS, draw_noise, noise_key

__all__ = ["MAX_BUFFER_NUMEL", "Buffer", "Point", "Points"]

_FP32_MAX = torch.finfo(torch.float32).max

MAX_BUFFER_NUMEL = 1 << 26
"""A buffer holds at most this many elements (256 MiB of fp32) unless one tensor alone is larger.

Part of the noise format: changing it changes which noise every tensor sees."""
SCRATCH_NUMEL = 1 << 22
"""Buffers up to this size (adapters) keep a reusable point vector, so that writing a point creates
no tensors (per-tensor views cost Python time that matters with hundreds of small tensors)."""
NOISE_CACHE_BYTES = 64 << 20
"""Noise vectors of up to this many bytes in all are kept for reuse within and across steps (MeZO
draws z once a step instead of three times, FZOO's update reuses its N draws, AdaMeZO its window)."""

Point = tuple[int, float] | None
"""A point: ``(perturbation index k, scale s)`` for θ₀ + s·ε·z_k, or ``None`` for θ₀."""


@dataclass
class Buffer:
    """Trainable tensors of one param group, device and dtype, seen as one flat vector."""

    index: int
    group: int
    device: torch.device
    dtype: torch.dtype
    tensors: list[torch.Tensor]
    numels: list[int] = field(default_factory=list)
    numel: int = 0
    master: torch.Tensor | None = None  # fp32 θ₀ (None without master weights)
    master_views: list[torch.Tensor] = field(default_factory=list)
    scratch: torch.Tensor | None = None  # a small buffer's reusable point, with its views cached
    scratch_views: list[torch.Tensor] = field(default_factory=list)

    def set_master(self, values: torch.Tensor) -> None:
        """Own ``values`` (flat fp32) as θ₀; a small buffer also gets a scratch vector for its points."""
        self.master, self.master_views = values, self.views(values)
        if self.numel <= SCRATCH_NUMEL:
            self.scratch = torch.empty_like(values)
            self.scratch_views = self.views(self.scratch)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``flat[..., P]`` cut into per-tensor views ``[..., *shape]`` (no copy)."""
        lead = flat.shape[:-1]
        return [v.view(*lead, *t.shape) for v, t in zip(flat.split(self.numels, dim=-1), self.tensors)]

    def values(self) -> torch.Tensor:
        """θ₀ as one flat fp32 vector (the master, or the tensors' current values)."""
        return self.master if self.master is not None else self.model_values()

    def model_values(self) -> torch.Tensor:
        """The model's tensors as they are now, as one flat fp32 vector (a copy)."""
        return torch.cat([t.detach().reshape(-1).float() for t in self.tensors])


class Points:
    """The trainable tensors in flat fp32 buffers, and the perturbed points around them.

    Args:
        groups: the tensors of each param group (in order).
        eps: perturbation scale ε.
        seed: run seed of the noise keys.
        noise: ``"rademacher"`` or ``"gaussian"``.
        master_weights: keep fp32 master buffers (bit-exact restore; required for fp16/bf16).
    """

    def __init__(
        self, groups: Sequence[Sequence[torch.Tensor]], *, eps: float, seed: int, noise: str = "rademacher",
        master_weights: bool = True,
    ) -> None:
        if noise not in NOISE_KINDS:
            raise ValueError(f"unknown noise {noise!r}; choose one of {', '.join(NOISE_KINDS)}")
        self.eps, self.seed, self.noise = float(eps), int(seed), noise
        self.tensors = [t for group in groups for t in group]
        if not master_weights:
            for t in self.tensors:
                if t.dtype != torch.float32:
                    raise ValueError(
                        f"a trainable tensor is {t.dtype}: in-place perturbation of low-precision weights drifts; "
                        "use master_weights=True (fp32 master copies) or cast the trainable tensors to float32"
                    )
        self.buffers = _layout(groups)
        self._versions: list[int] = []  # with masters: each tensor's version counter after the last write here
        if master_weights:
            for b in self.buffers:
                b.set_master(b.model_values())
            self._written()
        self._applied: list[tuple[list[torch.Tensor], float]] = []  # in-place mode: noise currently on θ
        self._noise: OrderedDict[tuple[Any, ...], torch.Tensor] = OrderedDict()  # recent draws, LRU
        self.draws = 0  # noise vectors drawn so far (one per buffer and perturbation)
        self.perturbation_scale: list[torch.Tensor] | None = None  # per buffer: points move along scale ⊙ z

    @property
    def has_masters(self) -> bool:
        return bool(self.buffers) and self.buffers[0].master is not None

    @property
    def numel(self) -> int:
        return sum(b.numel for b in self.buffers)

    def layout(self) -> list[list[Any]]:
        """``[[group, device type, dtype, numel], ...]`` per buffer: what a saved state must match."""
        return [[b.group, b.device.type, str(b.dtype).removeprefix("torch."), b.numel] for b in self.buffers]

    # ----- noise -----------------------------------------------------------------------------
    def noise_at(self, step: int, perturbation: int, buffer: Buffer) -> torch.Tensor:
        """The flat fp32 noise z of ``buffer`` at ``(step, perturbation)``, on its device (do not modify it)."""
        cache_key = (self.seed, self.noise, step, perturbation, buffer.index)
        z = self._noise.get(cache_key)
        if z is not None:
            self._noise.move_to_end(cache_key)
            return z
        self.draws += 1
        key = noise_key(self.seed, step, perturbation, buffer.index)
        z = draw_noise((buffer.numel,), key, buffer.device, self.noise)
        size = 4 * buffer.numel
        if size <= NOISE_CACHE_BYTES:
            self._noise[cache_key] = z
            while len(self._noise) * size > NOISE_CACHE_BYTES and len(self._noise) > 1:  # drop the oldest
                self._noise.popitem(last=False)
        return z

    def perturbation(self, step: int, perturbation: int, buffer: Buffer) -> torch.Tensor:
        """The direction u of a point: z, or ``perturbation_scale ⊙ z`` where a method sets a scale (HiZOO)."""
        z = self.noise_at(step, perturbation, buffer)
        return z if self.perturbation_scale is None else z * self.perturbation_scale[buffer.index]

    def combination(self, step: int, buffer: Buffer, coefficients: Sequence[tuple[int, float]]) -> torch.Tensor:
        """Σ c_k·z_k over ``(k, c_k)`` for ``buffer`` at ``step`` (a new flat fp32 vector)."""
        total: torch.Tensor | None = None
        for k, c in coefficients:
            z = self.noise_at(step, k, buffer)
            total = z * c if total is None else total.add_(z, alpha=c)
        return torch.zeros(buffer.numel, device=buffer.device) if total is None else total

    # ----- points ----------------------------------------------------------------------------
    def point_values(
        self, step: int, point: Point, buffer: Buffer, *, theta: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """θ₀ + s·ε·u_k of ``buffer`` as a flat fp32 vector (θ₀ itself for ``None``); ``theta``: θ₀ if known."""
        theta = buffer.values() if theta is None else theta
        if point is None:
            return theta if out is None else out.copy_(theta)
        k, scale = point
        return torch.add(theta, self.perturbation(step, k, buffer), alpha=scale * self.eps, out=out)

    @torch.no_grad()
    def write(self, step: int, point: Point) -> None:
        """Set the model's tensors to ``point`` (with masters: exactly ``point_values``)."""
        if point is None or not self.has_masters:
            self.restore()
        if point is None:
            return
        if not self.has_masters:
            k, scale = point
            noises = [self.perturbation(step, k, b) for b in self.buffers]
            for b, z in zip(self.buffers, noises):
                torch._foreach_add_(b.tensors, b.views(z), alpha=scale * self.eps)
            self._applied.append((noises, scale * self.eps))
            return
        for b in self.buffers:
            if b.scratch is not None:
                self.point_values(step, point, b, out=b.scratch)
                torch._foreach_copy_(b.tensors, b.scratch_views)
                continue
            # A large buffer (few, big tensors): each tensor's values go straight into the model, so no
            # buffer-sized vector is allocated (on the CPU a fresh one costs more than the arithmetic).
            k, scale = point
            for t, m, u in zip(b.tensors, b.master_views, b.views(self.perturbation(step, k, b))):
                torch.add(m, u, alpha=scale * self.eps, out=t)
        self._written()

    @torch.no_grad()
    def restore(self) -> None:
        """Return the tensors to θ₀ (bit-exact with masters)."""
        if self.has_masters:
            for b in self.buffers:
                torch._foreach_copy_(b.tensors, b.master_views)
            self._written()
            return
        for noises, alpha in reversed(self._applied):
            for b, z in zip(self.buffers, noises):
                torch._foreach_add_(b.tensors, b.views(z), alpha=-alpha)
        self._applied.clear()

    @torch.no_grad()
    def stack(self, step: int, points: Sequence[Point]) -> dict[int, torch.Tensor]:
        """Every tensor at each of R points: ``{id(tensor): values [R, *shape]}`` in the tensor's dtype.

        Built per buffer as one ``[R, P]`` matrix, row r = ``point_values(points[r])``: the very
        values :meth:`write` puts into the model.  Views of the matrix, no per-tensor copy.
        """
        out: dict[int, torch.Tensor] = {}
        for b in self.buffers:
            rows = torch.empty(len(points), b.numel, dtype=torch.float32, device=b.device)
            theta = b.values()
            for r, point in enumerate(points):
                self.point_values(step, point, b, theta=theta, out=rows[r])
            rows = rows if b.dtype == torch.float32 else rows.to(b.dtype)
            out.update(zip(map(id, b.tensors), b.views(rows)))
        return out

    # ----- updates ---------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, directions: Sequence[torch.Tensor], lrs: Sequence[float], weight_decays: Sequence[float]) -> bool:
        """θ₀ ← θ₀ − lr·(d + wd·θ₀) per buffer (lr, wd of its group); write θ₀ into the model.

        ``directions`` (one flat fp32 vector per buffer) are consumed.  Returns ``False``,
        changing nothing, when any new value would be non-finite (in-place mode: any direction).
        """
        if not all(abs(lr) <= _FP32_MAX and abs(lr * wd) <= _FP32_MAX for lr, wd in zip(lrs, weight_decays)):
            return False
        if not self.has_masters:
            if not all(_all_finite(d) for d in directions):
                return False
            for b, d in zip(self.buffers, directions):
                lr, wd = lrs[b.group], weight_decays[b.group]
                if wd:
                    torch._foreach_mul_(b.tensors, 1 - lr * wd)
                torch._foreach_add_(b.tensors, b.views(d), alpha=-lr)
            return True
        for b, d in zip(self.buffers, directions):
            lr, wd = lrs[b.group], weight_decays[b.group]
            if wd:
                d.add_(b.master, alpha=wd)
            torch.sub(b.master, d, alpha=lr, out=d)  # d now holds the new θ₀
        if not all(_all_finite(d) for d in directions):
            return False
        for b, new in zip(self.buffers, directions):
            b.master.copy_(new)
        self.restore()
        return True

    # ----- state -----------------------------------------------------------------------------
    def _written(self) -> None:
        # torch counts the in-place writes of every tensor (Tensor._version, which autograd reads too)
        self._versions = [t._version for b in self.buffers for t in b.tensors]

    @torch.no_grad()
    def adopt_outside_writes(self) -> int:
        """With masters: re-read θ₀ of the tensors written in place outside since this object last wrote
        them (weights loaded into the model, a user's edit), so the model's values win, as with torch.optim.
        Returns how many tensors were re-read.  Torch does not count writes through ``.data``, by
        torch.distributed collectives or by custom kernels: :meth:`sync_from_model` re-reads every tensor."""
        if not self.has_masters:
            return 0  # in place, the model's tensors are θ₀
        pairs = ((t, m) for b in self.buffers for t, m in zip(b.tensors, b.master_views))
        changed = [(m, t.detach()) for (t, m), seen in zip(pairs, self._versions) if t._version != seen]
        if changed:
            torch._foreach_copy_([m for m, _ in changed], [t for _, t in changed])
            self._written()
        return len(changed)

    @torch.no_grad()
    def sync_from_model(self) -> None:
        """Re-read θ₀ from the model's tensors (after their weights were loaded)."""
        for b in self.buffers:
            if b.master is not None:
                torch._foreach_copy_(b.master_views, [t.detach() for t in b.tensors])
        self._written()

    def snapshot(self) -> list[torch.Tensor]:
        """Copies of θ₀ per buffer (flat fp32), for :meth:`load`."""
        return [b.values().clone() for b in self.buffers]

    @torch.no_grad()
    def load(self, values: Sequence[torch.Tensor]) -> None:
        """Set θ₀ from :meth:`snapshot` values and write it into the model (any mode)."""
        if self.has_masters:
            self.load_masters(values)
            return
        self._applied.clear()
        for b, v in zip(self.buffers, values):
            torch._foreach_copy_(b.tensors, b.views(v.to(b.device)))

    @torch.no_grad()
    def load_masters(self, masters: Sequence[torch.Tensor]) -> None:
        """Set θ₀ from saved flat masters (:meth:`masters`) and write it into the model."""
        for b, m in zip(self.buffers, masters):
            if b.master is None or m.shape != b.master.shape:
                raise ValueError("saved master weights do not match this optimizer's buffers")
            b.master.copy_(m)
        self.restore()

    def masters(self) -> list[torch.Tensor]:
        """Copies of the flat fp32 masters (empty without master weights)."""
        return [b.master.clone() for b in self.buffers if b.master is not None]

    def needs_saved_masters(self) -> bool:
        """Whether the masters hold bits the model's own tensors cannot (fp16/bf16 tensors)."""
        return self.has_masters and any(b.dtype != torch.float32 for b in self.buffers)

    def fingerprint(self, *, model: bool = False) -> int:
        """A checksum that changes with any bit of θ₀ (``model``: of the model's tensors as they are)."""
        total = 0
        for b in self.buffers:
            flat = b.model_values() if model else b.values()
            words = flat.view(torch.int32).to(torch.int64)
            weights = torch.arange(words.numel(), device=words.device) % 7 + 1
            total += (b.index + 1) * int((words * weights).sum().item())
        return total & ((1 << 63) - 1)


def _all_finite(x: torch.Tensor) -> bool:
    """Whether every value of ``x`` is finite: its fp32 sum is (one read; NaN and ±inf propagate)."""
    return math.isfinite(float(x.sum()))


def _layout(groups: Sequence[Sequence[torch.Tensor]]) -> list[Buffer]:
    """Buffers per (group, device, dtype) in first-seen order, each cut at :data:`MAX_BUFFER_NUMEL`."""
    buffers: list[Buffer] = []
    for g, tensors in enumerate(groups):
        open_: dict[tuple[torch.device, torch.dtype], Buffer] = {}
        for t in tensors:
            key = (t.device, t.dtype)
            b = open_.get(key)
            if b is None or (b.numels and b.numel + t.numel() > MAX_BUFFER_NUMEL):
                b = open_[key] = Buffer(len(buffers), g, t.device, t.dtype, [])
                buffers.append(b)
            b.tensors.append(t)
            b.numels.append(t.numel())
            b.numel += t.numel()
    return buffers

