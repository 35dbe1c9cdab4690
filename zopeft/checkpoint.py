"""Checkpoint files without pickle, written atomically.

Nested state (optimizer, scheduler, RNG) is split into ``NAME.json`` for plain
values and ``NAME.safetensors`` for tensors.  Directories are assembled under a
temporary name and renamed into place, so a run killed mid-save leaves the
previous checkpoint intact and never a half-written one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = ["atomic_directory", "latest_checkpoint", "load_state", "save_state", "write_text_atomic"]

_TENSOR, _DICT = "__tensor__", "__dict__"


@contextlib.contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file via a temporary file and rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_state(state: Any, directory: str | Path, name: str) -> None:
    """Write a nested structure of dicts, lists, scalars and tensors as NAME.json (+ NAME.safetensors)."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors[path] = x.detach().cpu().contiguous()
            return {_TENSOR: path}
        if isinstance(x, dict):  # key types (int param indices) survive as [key, value] pairs
            return {_DICT: [[k, encode(v, f"{path}.{k}")] for k, v in x.items()]}
        if isinstance(x, (list, tuple)):
            return [encode(v, f"{path}.{i}") for i, v in enumerate(x)]
        return x

    directory = Path(directory)
    (directory / f"{name}.json").write_text(json.dumps(encode(state, name), indent=1))
    if tensors:
        save_file(tensors, str(directory / f"{name}.safetensors"))


def load_state(directory: str | Path, name: str) -> Any:
    """Read what :func:`save_state` wrote."""
    directory = Path(directory)
    tensor_file = directory / f"{name}.safetensors"
    tensors = load_file(str(tensor_file)) if tensor_file.exists() else {}

    def decode(x: Any) -> Any:
        if isinstance(x, dict) and _TENSOR in x:
            return tensors[x[_TENSOR]]
        if isinstance(x, dict) and _DICT in x:
            return {k: decode(v) for k, v in x[_DICT]}
        if isinstance(x, list):
            return [decode(v) for v in x]
        return x

    return decode(json.loads((directory / f"{name}.json").read_text()))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The ``checkpoint-N`` directory with the largest N, or None."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None)
