"""Checkpoint files without pickle, written atomically.

Nested state (optimizer, scheduler, RNG) is split into ``NAME.json`` for plain
values and ``NAME.safetensors`` for tensors.  Directories are assembled under a
temporary name (``.NAME.tmp-PID``) and renamed into place, so a run killed mid-save
leaves the previous checkpoint intact and never a half-written one; the temporaries a
killed process leaves behind are removed by :func:`remove_stale_temporaries`.

``NAME.json`` is strict JSON: a non-finite float (a guard's best loss before its first
step) is written as ``{"__float__": "inf"}`` and read back as the float.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "atomic_directory", "atomic_files", "check_safetensors", "load_state", "remove_stale_temporaries", "save_state",
    "write_text_atomic",
]

_TENSOR, _DICT, _FLOAT = "__tensor__", "__dict__", "__float__"
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)")


@contextlib.contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(final)
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
    _remove(old)


@contextlib.contextmanager
def atomic_files(directory: str | Path) -> Iterator[Path]:
    """Yield a staging directory whose files are each renamed into ``directory`` if the block succeeds."""
    directory = Path(directory)
    staging = _temporary(directory / "files")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        for f in staging.iterdir():
            os.replace(f, directory / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _temporary(final: Path) -> Path:
    """Where :func:`atomic_directory` and :func:`write_text_atomic` assemble ``final``."""
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def remove_stale_temporaries(directory: str | Path) -> list[str]:
    """Remove the ``.NAME.tmp-PID`` / ``.NAME.old-PID`` entries directly in ``directory`` whose process is gone.

    These are what a process killed in the middle of :func:`atomic_directory` or
    :func:`write_text_atomic` leaves; nothing else is touched.  One killed between
    :func:`atomic_directory`'s two renames (``NAME`` already moved aside to ``.NAME.old-PID``) left
    a complete ``.NAME.tmp-PID``: that one is put in place as ``NAME``.  Returns what was done, a
    name each.
    """
    done = []
    for path in sorted(Path(directory).glob(".*")):  # .NAME.old-PID sorts before .NAME.tmp-PID
        match = _TEMPORARY.fullmatch(path.name)
        if not match or not path.exists() or int(match["pid"]) == os.getpid() or _process_alive(int(match["pid"])):
            continue
        final, new = path.with_name(match["name"]), path.with_name(f".{match['name']}.tmp-{match['pid']}")
        if match["kind"] == "old" and new.exists() and not final.exists():
            os.replace(new, final)
            done.append(f"{new.name} (complete: now {final.name})")
        _remove(path)
        done.append(path.name)
    return done

def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file via a temporary file and rename."""
    path = Path(path)
    tmp = _temporary(path)
    tmp.write_text(text)
    os.replace(tmp, path)


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
            save_file(tensors, str(_temporary(path)))
        except BaseException:
            _temporary(path).unlink(missing_ok=True)
            raise
        os.replace(_temporary(path), path)
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
