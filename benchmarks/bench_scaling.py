"""Scaling out with torchrun: step time with K = 1 and K = 2 processes (one thread each).

    python -m benchmarks.bench_scaling [--quick] [--ks 1,2] [--steps S] [--model tiny|quick|full]

A Llama-architecture model built from a config (random weights) with LoRA r=8 on q/v runs
``--steps`` timed steps under ``torchrun --standalone --nproc_per_node K`` (one job per K) for FZOO (N = 8,
perturbation parallel: the ranks split the 9 loss evaluations of one batch) and MeZO (data
parallel: each rank its own batch, so K times the examples per step).  Each process uses one
thread, so K = 2 uses two cores where K = 1 uses one.  The table gives seconds per step,
the speed-up over K = 1 in examples per second, and the bytes each rank contributes to the
one all-reduce per step (the losses and an evaluation count, float64).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from zopeft.distributed import exit_worker

from . import common

RUNS = (("fzoo", "perturbation", dict(lr=1e-3, n_perturbations=8)), ("mezo", "data", dict(lr=1e-5)))
COLUMNS: list[common.Column] = [
    ("optimizer", "optimizer", ""), ("parallel", "parallel", ""), ("K", "world_size", "d"),
    ("s/step", "step_s", ".3f"), ("examples/s", "examples_per_s", ".2f"), ("speed-up", "speedup", ".2f"),
    ("bytes/step/rank", "comm_bytes", "d"),
]


def worker(config: dict[str, Any]) -> list[dict[str, Any]] | None:
    """One rank of a torchrun job: time ``steps`` optimizer steps of each of :data:`RUNS`; rank 0 returns the figures."""
    import zopeft
    from zopeft.distributed import barrier, distributed_session

    device = torch.device("cpu")
    rows = []
    with distributed_session() as (rank, world):
        for name, parallel, kwargs in RUNS:
            # the same token batch on every rank: data-parallel ranks would read different examples
            # of the same shape, which costs the same
            model, batch = common.model_and_batch({**config, "adapter": "lora"}, device)
            opt = zopeft.get_optimizer(name, model, eps=1e-3, seed=0, parallel=parallel, **kwargs)
            closure = zopeft.loss_closure(model, batch)
            opt.step(closure)  # warm-up (first-touch allocations, bitsandbytes repacking)
            seconds = []
            for _ in range(config["steps"]):
                barrier()
                began = time.perf_counter()
                opt.step(closure)
                barrier()
                seconds.append(time.perf_counter() - began)
            examples = config["batch"] * (world if parallel == "data" else 1)
            step_s = common.median(seconds)
            rows.append({"optimizer": name, "parallel": parallel, "world_size": world, "step_seconds": seconds,
                         "step_s": step_s, "examples_per_step": examples, "examples_per_s": examples / step_s,
                         "comm_bytes": opt.last_stats.get("comm_bytes", 0), "evaluations_per_step": len(opt.evaluations())})
    return rows if rank == 0 else None


def launch(k: int, config: dict[str, Any]) -> list[dict[str, Any]]:
    """Run :func:`worker` under torchrun with ``k`` processes; return rank 0's rows (its JSON line)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(k),
           "-m", "benchmarks.bench_scaling", "--worker", json.dumps(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parent.parent)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"torchrun K={k} failed (exit {proc.returncode}):\n" + proc.stderr[-3000:])
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_scaling", description=__doc__.splitlines()[0])
    common.add_common_arguments(parser)
    parser.add_argument("--ks", default="1,2", help="process counts to compare")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 3 quick, 8 full)")
    parser.add_argument("--model", choices=tuple(common.LLAMA_SIZES), default=None,
                        help="random Llama size (default: quick with --quick, else full)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        common.setup(1)
        figures = worker(json.loads(args.worker))
        if figures is not None:
            print(json.dumps(figures), flush=True)
        exit_worker()
        return {}
    common.setup(args.threads)
    device = common.resolve_device(args.device)
    if device.type != "cpu":
        raise SystemExit("bench_scaling measures CPU processes (gloo); on GPUs launch the recipe under torchrun")
    size = args.model or ("quick" if args.quick else "full")
    base = dict(model=common.model_path(size), batch=8, length=64, steps=args.steps or (3 if args.quick else 8))
    print(f"model: random Llama '{size}' + LoRA r=8 q/v, batch {base['batch']}x{base['length']}, one thread per process")
    table = common.TableStream(COLUMNS)
    by_k = [launch(int(k), base) for k in args.ks.split(",")]  # one torchrun job per K, every optimizer in it
    for i in range(len(RUNS)):
        for rows in by_k:
            rows[i]["speedup"] = rows[i]["examples_per_s"] / by_k[0][i]["examples_per_s"]
            table.add(rows[i])
    result = {"benchmark": "scaling", "quick": args.quick, "config": base, "results": table.rows, "table": table.text()}
    path = common.write_result(common.result_path(args.out_dir, "scaling", device, args.quick), result, device)
    return {"json": str(path), **result}


if __name__ == "__main__":
    main()
