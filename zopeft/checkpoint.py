"""Checkpoint files without pickle, written atomically.

Nested state (optimizer, scheduler, RNG) is split into ``NAME.json`` for plain
values and ``NAME.safetensors`` for tensors.  Directories are assembled under a
temporary name (:func:`zopeft.ownership.temporary`) and renamed into place, so a run killed
mid-save leaves the previous checkpoint intact and never a half-written one; the temporaries a
killed process leaves behind are removed by :func:`zopeft.ownership.remove_stale_temporaries`.

``NAME.json`` is strict JSON: a non-finite float (a guard's best loss before its first
step) is written as ``{"__float__": "inf"}`` and read back as the float.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .ownership import aside, claim, remove, temporary, write_text_atomic

__all__ = ["atomic_directory", "atomic_files", "check_safetensors", "load_state", "save_state", "write_text_atomic"]

_TENSOR, _DICT, _FLOAT = "__tensor__", "__dict__", "__float__"


@contextlib.contextmanager
def atomic_directory(final: str | Path, written_by: str | None = None) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``final`` only if the block succeeds.

    ``written_by`` (a command, e.g. ``zopeft merge``): the directory gets a manifest of its
    files (:mod:`zopeft.ownership`), so that the command may replace it later and nothing else.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if written_by is not None:
            claim(tmp, [p.name for p in tmp.iterdir()], written_by)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = aside(final)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    remove(old)


@contextlib.contextmanager
def atomic_files(directory: str | Path) -> Iterator[Path]:
    """Yield a staging directory whose files are each renamed into ``directory`` if the block succeeds."""
    directory = Path(directory)
    staging = temporary(directory / "files")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        for f in staging.iterdir():
            os.replace(f, directory / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_state(state: Any, directory: str | Path, name: str) -> None:
    """Write a nested structure of dicts, lists, scalars and tensors as NAME.json (+ NAME.safetensors).

    Each file is written under a temporary name and renamed, the tensors first: a ``NAME.json`` in
    a checkpoint (e.g. one the HF Trainer writes in place) means its tensors are there in full.
    """
    tensors: dict[str, torch.Tensor] = {}

    def encode(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors[path] = x.detach().cpu().contiguous()
            return {_TENSOR: path}
        if isinstance(x, dict):  # key types (int param indices) survive as [key, value] pairs
            return {_DICT: [[k, encode(v, f"{path}.{k}")] for k, v in x.items()]}
        if isinstance(x, (list, tuple)):
            return [encode(v, f"{path}.{i}") for i, v in enumerate(x)]
        if isinstance(x, float) and not math.isfinite(x):  # strict JSON has no NaN / Infinity
            return {_FLOAT: repr(x)}
        return x

    directory = Path(directory)
    text = json.dumps(encode(state, name), indent=1, allow_nan=False)
    if tensors:  # first, and each file by rename: a NAME.json on disk means its tensors are complete
        path = directory / f"{name}.safetensors"
        try:
            save_file(tensors, str(temporary(path)))
        except BaseException:
            temporary(path).unlink(missing_ok=True)
            raise
        os.replace(temporary(path), path)
    write_text_atomic(directory / f"{name}.json", text)


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
        if isinstance(x, dict) and _FLOAT in x:
            return float(x[_FLOAT])
        if isinstance(x, list):
            return [decode(v) for v in x]
        return x

    return decode(json.loads((directory / f"{name}.json").read_text()))


def check_safetensors(path: str | Path) -> str | None:
    """What makes the safetensors file at ``path`` unusable (missing, truncated, no valid header), or None.

    Reads only the header, so a truncated file is found without loading its tensors.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if size < 8 or 8 + length > size:
                return f"{path} is truncated or not a safetensors file ({size} bytes)"
            header = json.loads(f.read(length))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except FileNotFoundError:
        return f"{path} is missing"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{path} has no valid safetensors header"
    if 8 + length + end > size:
        return f"{path} is truncated ({size} of {8 + length + end} bytes)"
    return None
