"""Reuse a run's evaluation at the start when nothing it depends on changed (``eval_on_start``).

A new run evaluates its starting adapter before the first step, and that evaluation is a function
of the base model, the adapter's initial values and the evaluation records (on a 5-class task it
cost ~80 s of every run, with the same numbers each time).  So its metrics are kept in
``$ZOPEFT_CACHE/evals/KEY.json`` (default ``~/.cache/zopeft``), KEY a hash of:

* the base model: ``model_name_or_path``, how it is loaded (quantization, dtype) and the size and
  modification time of its weight files (a local folder, a ``.gguf`` file, a package's file), or
  the cached revision of a hub id;
* the adapter: its initial trainable tensors, bit for bit (the seed and the adapter keys decide them);
* the records: their content and order, the task's settings (template, label words, scoring,
  ``cutoff_len``) and ``per_device_eval_batch_size``;
* the versions of zopeft, torch, transformers, peft and bitsandbytes, and the device.

The cache is kept as strict JSON and without a generation task's ``generations`` (each record's
prompt and output: the training log does not need them).  It is best-effort: a cache that cannot
be written is said once (a warning) and the run goes on.  It keeps the :data:`MAX_ENTRIES` most
recently stored evaluations (a few hundred bytes each); storing one more removes the oldest of
the files it named itself (24 hex digits ``.json``), nothing else in the directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from .checkpoint import write_text_atomic
from .components import model_spec
from .jsonl import dumps
from .metrics import without_generations
from .model_files import resolve_model_path
from .recipe import Recipe
from .resolved import task_settings
from .splits import Split

__all__ = ["cache_dir", "evaluation_key", "load_evaluation", "store_evaluation"]

logger = logging.getLogger("zopeft")
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.gguf", "config.json")
MAX_ENTRIES = 1000  # evaluations kept; the oldest go first
ENTRY = re.compile(r"[0-9a-f]{24}\.json")  # the names store_evaluation writes
_UNWRITABLE: set[Path] = set()  # cache directories already said to be unwritable (said once each)


def cache_dir() -> Path:
    """Where evaluations are kept: ``$ZOPEFT_CACHE/evals`` (default ``~/.cache/zopeft/evals``)."""
    return Path(os.environ.get("ZOPEFT_CACHE", Path.home() / ".cache" / "zopeft")) / "evals"


def _weight_files(name: str) -> list[Any]:
    """What identifies the base model's weights: each weight file's name, size and modification time."""
    directory, gguf_file = resolve_model_path(name)
    folder = Path(directory)
    if gguf_file is not None:
        files = [folder / gguf_file]
    elif folder.is_dir():
        files = sorted(f for pattern in WEIGHT_FILES for f in folder.glob(pattern))
    else:  # a hub id: the revision of its cached download
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(directory, "config.json")
        return [directory, Path(cached).parent.name if isinstance(cached, str) else None]
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _trainable_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def evaluation_key(recipe: Recipe, model: torch.nn.Module, split: Split) -> str:
    """The hash an evaluation of ``split`` by ``model`` at its start is kept under (see the module docstring)."""
    import bitsandbytes
    import peft
    import transformers

    from . import __version__

    device = next(model.parameters()).device
    parts = {
        "model": dataclasses.asdict(model_spec(recipe)), "weights": _weight_files(recipe.model_name_or_path),
        "adapter": _trainable_digest(model), "records": split.fingerprint(), "task": task_settings(recipe),
        "batch_size": recipe.per_device_eval_batch_size,
        "versions": [__version__, torch.__version__, transformers.__version__, peft.__version__,
                     bitsandbytes.__version__],
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def load_evaluation(key: str) -> dict[str, Any] | None:
    """The metrics kept under ``key`` (a ``null`` number read as NaN: it was not finite), or None."""
    path = cache_dir() / f"{key}.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return {k: math.nan if v is None else v for k, v in metrics.items()} if isinstance(metrics, dict) else None


def store_evaluation(key: str, metrics: dict[str, Any]) -> None:
    """Keep ``metrics`` (without ``generations``) under ``key``, written atomically; a failure is a warning."""
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_text_atomic(directory / f"{key}.json", dumps(without_generations(metrics)))
        _prune(directory)
    except OSError as error:
        if directory not in _UNWRITABLE:
            _UNWRITABLE.add(directory)
            logger.warning("zopeft: the evaluation cache %s cannot be written (%s); runs evaluate their start "
                           "each time (set ZOPEFT_CACHE to a writable directory)", directory, error)


def _prune(directory: Path) -> None:
    """Remove the oldest entries past :data:`MAX_ENTRIES` (by the time each was stored)."""
    entries = []
    for entry in directory.iterdir():
        if ENTRY.fullmatch(entry.name):
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile by another run's pruning
                entries.append((entry.stat().st_mtime_ns, entry))
    for _, old in sorted(entries)[:-MAX_ENTRIES]:
        old.unlink(missing_ok=True)
