"""The benchmark suite: ``python -m benchmarks [--quick] [--only NAME[,NAME]] [--device auto|cpu|cuda]``.

Runs, in order, ``batched`` (FZOO batched vs sequential step time), ``convergence`` (MeZO vs
FZOO vs AdaMeZO vs AdamW on SmolLM2-135M + LoRA), ``anatomy`` (step time over forward time),
``memory`` (peak memory per configuration, fresh processes), ``peers`` (vs the ``mezo``
package), ``scaling`` (K = 1 vs 2 torchrun processes), ``startup`` (``import zopeft`` and
the light CLI commands in fresh processes) and ``eps`` (is ε above bf16's rounding?).  Each prints its table and writes its JSON (and PNG where a curve helps) under
``benchmarks/results/``; the suite adds ``suite_<device>[_quick].json`` with each benchmark's
wall time and result file.  ``--quick`` took 16 minutes with one thread on a shared 2-core CPU machine;
the full suite takes hours (mostly the convergence race).  A failing benchmark does not stop
the others; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from . import common

BENCHMARKS = ("batched", "convergence", "anatomy", "memory", "peers", "scaling", "startup", "eps")


def benchmark_main(name: str) -> Callable[[list[str]], dict[str, Any]]:
    """The ``main`` of ``benchmarks/bench_<name>.py`` (imported when it is about to run)."""
    return importlib.import_module(f"benchmarks.bench_{name}").main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    common.add_common_arguments(parser)
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    args = parser.parse_args(argv)
    chosen = args.only.split(",")
    unknown = sorted(set(chosen) - set(BENCHMARKS))
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")

    common.setup(args.threads)
    device = common.resolve_device(args.device)
    shared = (["--quick"] if args.quick else []) + ["--device", device.type, "--out-dir", str(args.out_dir)]
    if args.threads:
        shared += ["--threads", str(args.threads)]
    machine = common.machine_info(device)
    summary: dict[str, Any] = {}
    began = time.perf_counter()
    for name in (b for b in BENCHMARKS if b in chosen):
        print(f"\n===== {name} {'(quick)' if args.quick else ''} =====", flush=True)
        t0 = time.perf_counter()
        try:
            result = benchmark_main(name)(shared)
            summary[name] = {"seconds": time.perf_counter() - t0, "json": result.get("json"), "png": result.get("png")}
        except Exception as exc:  # noqa: BLE001 - report and run the other benchmarks
            traceback.print_exc()
            summary[name] = {"seconds": time.perf_counter() - t0, "error": f"{type(exc).__name__}: {exc}"}
        print(f"===== {name}: {summary[name]['seconds']:.0f} s", flush=True)
    total = time.perf_counter() - began
    print(f"\nsuite: {total / 60:.1f} min on {device} ({machine['device_name']}, {machine['torch_threads']} threads)")
    for name, info in summary.items():
        print(f"  {name:12s} {info['seconds']:7.0f} s  {info.get('json') or info.get('error')}")
    result = {"benchmark": "suite", "quick": args.quick, "machine": machine, "total_seconds": total, "benchmarks": summary}
    common.write_result(common.result_path(args.out_dir, "suite", device, args.quick), result, device)
    return 1 if any("error" in info for info in summary.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
