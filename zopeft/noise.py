"""Seeded perturbation noise that is regenerated, never stored.

Every noise vector is a pure function of a 64-bit key derived from
(run seed, step, perturbation index, buffer index).  A *buffer* is one flat
fp32 vector holding many trainable tensors (see :mod:`zopeft.optim.points`),
so one perturbation costs one draw per buffer, however many tensors there are.
The draw runs on the buffer's own device from a dedicated
:class:`torch.Generator`, so the global torch RNG is never touched and any
buffer's noise for any step can be rebuilt on its own (AdaMeZO's moment
window, replay, and multi-rank runs rely on it).

:data:`NOISE_FORMAT` names this stream.  Format 1 (zopeft 0.1) drew one
stream per tensor; states and step logs of that format cannot be continued.
"""

from __future__ import annotations

import math

import torch

__all__ = ["NOISE_FORMAT", "NOISE_KINDS", "draw_noise", "noise_key"]

NOISE_FORMAT = 2
NOISE_KINDS = ("rademacher", "gaussian")
_MASK64 = (1 << 64) - 1
_generators: dict[torch.device, torch.Generator] = {}
_sign_tables: dict[torch.device, torch.Tensor] = {}


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def noise_key(seed: int, step: int, perturbation: int, buffer: int) -> int:
    """Mix the four coordinates of one noise vector into a 64-bit generator seed."""
    key = 0
    for part in (seed, step, perturbation, buffer):
        key = _splitmix64(key ^ (part & _MASK64))
    return key


def _generator(device: torch.device) -> torch.Generator:
    gen = _generators.get(device)
    if gen is None:
        gen = _generators[device] = torch.Generator(device=device)
    return gen


def _sign_table(device: torch.device) -> torch.Tensor:
    """``[256, 8]`` fp32: row b holds the signs ``2·bit_j(b) − 1`` of byte b, lowest bit first."""
    table = _sign_tables.get(device)
    if table is None:
        bits = torch.arange(256, device=device).unsqueeze(1).bitwise_right_shift(torch.arange(8, device=device))
        table = _sign_tables[device] = bits.bitwise_and_(1).float().mul_(2).sub_(1)
    return table


def draw_noise(
    shape: torch.Size | tuple[int, ...],
    key: int,
    device: torch.device | str,
    kind: str = "rademacher",
) -> torch.Tensor:
    """Draw the fp32 noise for ``key`` on ``device``: Rademacher (±1) or standard Gaussian.

    Rademacher signs are the bits of random bytes, eight per draw of the generator (a CPU
    generator costs a few ns per number, so this is several times faster than one number per sign),
    looked up a byte at a time in a sign table: one pass that writes the fp32 result and nothing else.
    """
    device = torch.device(device)
    gen = _generator(device)
    gen.manual_seed(key)
    if kind == "rademacher":
        n = math.prod(shape)
        packed = torch.randint(0, 256, ((n + 7) // 8,), generator=gen, device=device, dtype=torch.uint8)
        return torch.index_select(_sign_table(device), 0, packed.int()).view(-1)[:n].view(shape)
    if kind == "gaussian":
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    raise ValueError(f"unknown noise {kind!r}; choose one of {', '.join(NOISE_KINDS)}")
