"""Seeded perturbation noise that is regenerated, never stored.

Every noise tensor is a pure function of a 64-bit key derived from
(run seed, step, perturbation index, tensor index).  It is drawn on the
tensor's own device from a dedicated :class:`torch.Generator`, so the global
torch RNG is never touched and any tensor's noise for any step can be rebuilt
on its own (AdaMeZO's moment window, replay, and multi-rank runs rely on it).
"""

from __future__ import annotations

import torch

__all__ = ["NOISE_KINDS", "noise_key", "draw_noise"]

NOISE_KINDS = ("rademacher", "gaussian")
_MASK64 = (1 << 64) - 1
_generators: dict[torch.device, torch.Generator] = {}


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def noise_key(seed: int, step: int, perturbation: int, tensor: int) -> int:
    """Mix the four coordinates of one noise tensor into a 64-bit generator seed."""
    key = 0
    for part in (seed, step, perturbation, tensor):
        key = _splitmix64(key ^ (part & _MASK64))
    return key


def _generator(device: torch.device) -> torch.Generator:
    gen = _generators.get(device)
    if gen is None:
        gen = _generators[device] = torch.Generator(device=device)
    return gen


def draw_noise(
    shape: torch.Size,
    key: int,
    device: torch.device,
    kind: str = "rademacher",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Draw the noise tensor for ``key`` on ``device``: Rademacher (±1) or standard Gaussian."""
    gen = _generator(torch.device(device))
    gen.manual_seed(key)
    if kind == "rademacher":
        bits = torch.randint(0, 2, shape, generator=gen, device=device, dtype=torch.int8)
        return bits.to(dtype).mul_(2).sub_(1)
    if kind == "gaussian":
        return torch.randn(shape, generator=gen, device=device, dtype=dtype)
    raise ValueError(f"unknown noise {kind!r}; choose one of {', '.join(NOISE_KINDS)}")
