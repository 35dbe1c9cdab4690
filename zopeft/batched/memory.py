"""How many replicas of the batch one batched forward pass may carry.

The rule: the replicas' activations may take what one sequential forward's activations take,
plus a margin of 25% of the model's weight memory (at least 1 GiB on a GPU, 256 MiB on a CPU),
and never more than the free memory under the caps: ``torch.cuda.set_per_process_memory_fraction``,
the optimizer's ``max_memory`` (recipe ``zo.max_memory``), the device's free memory.  So a batched
step peaks at most that margin above a sequential step of the same batch (both project onto the
vocabulary in chunks of :data:`~zopeft.batched.loss.HEAD_CHUNK_BYTES`).

Activations are estimated per token row of a decoder layer under ``no_grad``: the larger of the
attention block (about 8 hidden-size vectors: residual, norm, q/k/v, rotary copies, output) and
the MLP (2 hidden + 3 intermediate-size vectors), plus eager attention scores (heads × length).
A generation's replicas also hold their KV cache (:func:`kv_cache_bytes`), counted with their
activations.  An out-of-memory error still halves the replicas (see :mod:`zopeft.batched.closure`).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .loss import HEAD_CHUNK_BYTES

__all__ = ["MARGIN_FRACTION", "activation_bytes", "kv_cache_bytes", "replicas_per_pass"]

MARGIN_FRACTION = 0.25
_MIN_MARGIN = {"cuda": 1 << 30, "cpu": 256 << 20}
_CPU_AVAILABLE_FRACTION = 0.5  # of MemAvailable: the host runs other things


def activation_bytes(config: object, rows: int, length: int, element_bytes: int) -> int:
    """Estimated peak activation memory of one forward over ``rows`` token rows of ``length``."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(getattr(text, "hidden_size", 1024) or 1024)
    inter = int(getattr(text, "intermediate_size", 4 * hidden) or 4 * hidden)
    heads = int(getattr(text, "num_attention_heads", 16) or 16)
    per_row = max(8 * hidden, 2 * hidden + 3 * inter) + heads * min(length, 4096)
    return element_bytes * rows * per_row


def kv_cache_bytes(config: object, rows: int, element_bytes: int) -> int:
    """Memory of the keys and values a generation caches for ``rows`` token positions (every layer)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(getattr(text, "hidden_size", 1024) or 1024)
    heads = int(getattr(text, "num_attention_heads", 16) or 16)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    layers = int(getattr(text, "num_hidden_layers", 1) or 1)
    return 2 * layers * kv_heads * head_dim * element_bytes * rows


def _weight_bytes(model: nn.Module, device: torch.device) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type == device.type)


def _free_bytes(device: torch.device, max_memory: int | None) -> float:
    """What the step may still allocate on ``device`` under every cap."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        in_use = torch.cuda.memory_allocated(index)
        free += torch.cuda.memory_reserved(index) - in_use  # cached blocks the allocator reuses
        cap = torch.cuda.get_per_process_memory_fraction(index) * total - in_use
        headroom = min(free, cap)
    else:
        try:
            with open("/proc/meminfo") as fh:
                info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh}
            available = info.get("MemAvailable", info.get("MemFree", 8 << 30))
        except OSError:
            available = 8 << 30
        in_use = _resident_bytes()
        headroom = available * _CPU_AVAILABLE_FRACTION
    if max_memory is not None:
        headroom = min(headroom, max_memory - in_use)
    return headroom


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def replicas_per_pass(
    model: nn.Module, config: object, device: torch.device, rows: int, length: int, max_memory: int | None = None,
    cache_rows: int = 0,
) -> int:
    """Replicas of a batch of ``rows`` token rows (sequence ``length``) one forward pass (or one ``generate``
    call, whose KV cache holds ``cache_rows`` positions per replica) may carry."""
    element = min(4, next((p.element_size() for p in model.parameters() if p.is_floating_point()), 4))
    one = max(1, activation_bytes(config, rows, length, element) + kv_cache_bytes(config, cache_rows, element))
    margin = max(MARGIN_FRACTION * _weight_bytes(model, device), _MIN_MARGIN.get(device.type, _MIN_MARGIN["cpu"]))
    allowed = min(one + margin, _free_bytes(device, max_memory) - HEAD_CHUNK_BYTES)
    return max(1, int(allowed // one))
