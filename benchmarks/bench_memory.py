"""Memory: plain inference vs ZO training (MeZO, FZOO) vs first-order AdamW + LoRA, same model and batch.

    python -m benchmarks.bench_memory [--quick] [--device auto|cpu|cuda] [--bases fp32,bf16,nf4] [--modes ...]

Every configuration runs in a fresh Python process (nothing an earlier configuration allocated
can inflate its numbers), loads the model with LoRA r=8 on q/v, builds the batch, runs one plain
forward pass (so that weights the loader only memory-mapped are resident), records the memory in
use (``setup``), then builds the optimizer and runs a few steps, recording the peak:

* CPU: resident set size.  The peak is the kernel's high-water mark (``VmHWM``), reset just
  before the optimizer is built (``/proc/self/clear_refs``), so loading the model does not count;
  ``increment`` = peak − setup is what training (or inference) adds on top of the loaded model.
  ``file-backed`` is the part of the setup RSS that is file pages: the memory-mapped fp32
  checkpoint (reclaimable).  The 4-bit base is quantized on loading from that fp32 checkpoint, whose
  mapping (and the pages read) outlive loading here, so compare 4-bit rows by their increments.
* CUDA: ``torch.cuda.memory_allocated`` / ``max_memory_allocated`` (tensors only, not the caching
  allocator's reserve).  This path exists for GPU machines and has not been run on this CPU box.

Modes: ``inference`` (``model(**batch)`` under ``no_grad``), ``mezo`` (2 evaluations, sequential),
``fzoo`` (N=8, batched: the 9 points as replicas of the batch, zopeft's default),
``fzoo-sequential`` (one forward per point), ``adamw`` (forward + backward + AdamW on the LoRA
tensors).  Bases: fp32, bf16 (adapters kept in fp32 by PEFT) and bitsandbytes 4-bit nf4 (fp32 compute).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

from . import common

MODES = ("inference", "mezo", "fzoo", "fzoo-sequential", "adamw")
BASES = {"fp32": ("fp32", None), "bf16": ("bf16", None), "nf4": ("fp32", "nf4")}  # name -> (dtype, quant)
COLUMNS: list[common.Column] = [
    ("base", "base", ""), ("mode", "mode", ""), ("setup MiB", "memory_setup_mib", ".0f"),
    ("file-backed", "memory_setup_file_mib", ".0f"),
    ("peak MiB", "memory_peak_mib", ".0f"), ("increment MiB", "memory_increment_mib", ".0f"),
    ("x inference", "vs_inference", ".2f"), ("s/step", "step_s", ".2f"),
]


def make_step(mode: str, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], Any]:
    """Build the optimizer of ``mode`` and return one step of it."""
    import zopeft
    from zopeft.batched import loss_closure

    if mode == "inference":
        return torch.no_grad()(lambda: model(**batch).loss.item())
    if mode == "adamw":
        opt = torch.optim.AdamW(common.trainable(model), lr=1e-4)
        return lambda: common.adamw_step(model, opt, batch)
    zo = {
        "mezo": lambda: zopeft.MeZO(model, lr=1e-4, eps=1e-2),
        "fzoo": lambda: zopeft.FZOO(model, lr=1e-3, eps=1e-3, n_perturbations=8, batched=True),
        "fzoo-sequential": lambda: zopeft.FZOO(model, lr=1e-3, eps=1e-3, n_perturbations=8, batched=False),
    }
    if mode not in zo:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    opt = zo[mode]()
    return lambda: opt.step(loss_closure(model, batch))


def child(config: dict[str, Any]) -> dict[str, Any]:
    """In the fresh process: load, measure, report."""
    device = torch.device(config["device"])
    model, batch = common.model_and_batch(config, device)
    measured = common.measure_steps(lambda: make_step(config["mode"], model, batch), config["steps"], device)
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in common.trainable(model)), **measured.as_dict()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    if common.child_entry(argv, child):
        return {}
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_arguments(parser)
    parser.add_argument("--model", default="smollm2", help="smollm2 (real weights) or a random Llama size")
    parser.add_argument("--bases", default="fp32,bf16,nf4", help=f"comma-separated: {', '.join(BASES)}")
    parser.add_argument("--modes", default=None, help=f"comma-separated: {', '.join(MODES)} (default: all; "
                        "--quick leaves out fzoo-sequential)")
    parser.add_argument("--batch", type=int, default=None, help="rows (default 8 with --quick, else 16)")
    parser.add_argument("--length", type=int, default=48, help="tokens per row (labels on the last one)")
    parser.add_argument("--steps", type=int, default=None, help="steps per configuration (default 2 quick, 3 full)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    common.setup(args.threads)
    device = common.resolve_device(args.device)
    machine = common.machine_info(device)
    modes = args.modes.split(",") if args.modes else [m for m in MODES if not (args.quick and m == "fzoo-sequential")]
    batch_size, steps = args.batch or (8 if args.quick else 16), args.steps or (2 if args.quick else 3)
    path = common.model_path(args.model)
    print(f"device={device} model={args.model} batch={batch_size}x{args.length} steps={steps} "
          f"threads={torch.get_num_threads()}; one fresh process per row", flush=True)
    table = common.TableStream(COLUMNS)
    for base in args.bases.split(","):
        dtype, quant = BASES[base]
        inference_peak = None
        for mode in modes:
            config = {"model": path, "dtype": dtype, "quant": quant, "mode": mode, "batch": batch_size,
                      "length": args.length, "steps": steps, "device": str(device)}
            row = {"base": base, "mode": mode, **common.run_child("bench_memory", config, threads=args.threads)}
            if mode == "inference":
                inference_peak = row["memory_peak_mib"]
            row["vs_inference"] = row["memory_peak_mib"] / inference_peak if inference_peak else None
            table.add(row)
    result = {
        "benchmark": "memory",
        "quick": args.quick,
        "machine": machine,
        "model": args.model,
        "adapter": {"type": "lora", "r": 8, "lora_alpha": 16, "target_modules": common.LORA_TARGETS},
        "batch": {"batch_size": batch_size, "length": args.length, "labels": "answer (last token)"},
        "steps": steps,
        "memory": "CUDA: torch.cuda allocated bytes (untested on this machine)" if device.type == "cuda" else
                  "CPU: resident set size; peak = VmHWM reset after loading (peak_scope since_reset) "
                  "or the process's ru_maxrss (peak_scope process)",
        "definition": "setup = in use after loading model + batch and one plain forward; peak = from building the "
                      "optimizer through the last step; increment = peak - setup; x inference = peak / peak of "
                      "inference on the same base",
        "table": table.text(),
        "results": table.rows,
    }
    return common.save_result(result, args.out_dir, device)


if __name__ == "__main__":
    main()
