"""Start-up time of ``import zopeft`` and of the light CLI commands, in fresh processes.

    python -m benchmarks.bench_startup [--quick] [--repeats R]

Each command runs ``--repeats`` times (default 3 quick, 10 full) in a fresh interpreter; the
table gives the median and the fastest wall time, and which heavy libraries the process had
imported when it ended (``--help``, ``recipes`` and ``validate`` should import none).  For
scale, ``import torch``, a first use of an optimizer class (which imports torch) and the
modules ``zopeft train`` needs (transformers, PEFT, bitsandbytes) are measured the same way.  The device options are accepted for the suite's sake; nothing
here uses a device.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import common

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "peft", "bitsandbytes")
CLI = "import sys; from zopeft_cli.app import main; sys.argv[0] = 'zopeft'; main()"
# name -> (label, python code, argv)
COMMANDS = {
    "import": ("import zopeft", "import zopeft", []),
    "help": ("zopeft --help", CLI, ["--help"]),
    "recipes": ("zopeft recipes", CLI, ["recipes"]),
    "validate": ("zopeft validate", CLI, ["validate", "recipes/smollm2_lora_fzoo_sst2.yaml"]),
    "torch": ("import torch (reference)", "import torch", []),
    "optimizer": ("zopeft.FZOO (first use)", "import zopeft; zopeft.FZOO", []),
    "train": ("import zopeft.runner (train)", "import zopeft.runner", []),
}
COLUMNS: list[common.Column] = [
    ("command", "command", ""), ("median s", "median_s", ".3f"), ("min s", "min_s", ".3f"),
    ("heavy imports", "heavy_imports", ""),
]


def time_command(code: str, argv: list[str], repeats: int) -> dict[str, Any]:
    """Wall seconds of ``python -c code argv`` over ``repeats`` fresh runs, and what it imported."""
    report = f"import atexit, sys; atexit.register(lambda: print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules)))"
    seconds, heavy = [], ""
    for _ in range(repeats):
        began = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", f"{report}\n{code}", *argv], capture_output=True, text=True, cwd=ROOT)
        seconds.append(time.perf_counter() - began)
        if done.returncode != 0:
            raise RuntimeError(f"{code} {argv} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
        heavy = done.stdout.strip().splitlines()[-1].removeprefix("HEAVY=")
    return {"median_s": common.median(seconds), "min_s": min(seconds), "seconds": seconds,
            "heavy_imports": heavy or "none"}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_startup", description=__doc__.splitlines()[0])
    common.add_common_arguments(parser)
    parser.add_argument("--repeats", type=int, default=None, help="fresh runs per command (default 3 quick, 10 full)")
    parser.add_argument("--commands", default=",".join(COMMANDS), help=f"comma-separated subset of: {', '.join(COMMANDS)}")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.commands.split(",")) - set(COMMANDS))
    if unknown:
        parser.error(f"--commands: unknown {', '.join(unknown)}; choose from {', '.join(COMMANDS)}")
    device = common.resolve_device("cpu")
    repeats = args.repeats or (3 if args.quick else 10)
    print(f"{repeats} fresh processes per command ({sys.executable})")
    rows = [{"command": label, **time_command(code, command_argv, repeats)}
            for name, (label, code, command_argv) in COMMANDS.items() if name in args.commands.split(",")]
    result = {"benchmark": "startup", "quick": args.quick, "repeats": repeats, "results": rows,
              "table": common.print_table(rows, COLUMNS)}
    return common.save_result(result, args.out_dir, device)


if __name__ == "__main__":
    main()
