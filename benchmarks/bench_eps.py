"""Is ε above the rounding of the forward pass?  ``check_eps`` in fp32 and bf16 on real weights.

    python -m benchmarks.bench_eps [--quick] [--device auto|cpu|cuda] [--dtypes fp32,bf16] [--eps 1e-3,3e-3,1e-2]
        [--model smollm2|tiny]

SmolLM2-135M-Instruct + LoRA r=8 on q/v (B = 0, the start of every run), one batch of the demo's
2-shot SST-2 prompt.  For each dtype and ε, :meth:`zopeft.ZOOptimizer.check_eps` measures the
central differences along K directions at ε, 2ε and 3ε and the rounding noise's share of a
difference at ε (see :mod:`zopeft.optim.eps_check`), and the table gives how well each dtype's d_k(ε)
agree with the first dtype's (fp32), direction by direction: the correlation and the share of
equal signs.  The same seed gives the same directions in every dtype (the LoRA tensors are fp32
in all of them).  A noise r above 0.7 is what ``zopeft train`` warns about.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from zopeft.optim.eps_check import MAX_NOISE

from . import common
from .bench_convergence import Race

COLUMNS: list[common.Column] = [
    ("dtype", "dtype", ""), ("eps", "eps", "g"), ("noise", "noise", ".3f"), ("verdict", "verdict", ""),
    ("corr vs fp32", "correlation", ".3f"), ("same sign", "same_sign", ".2f"), ("fwd s", "forward_s", ".2f"),
]


def differences(race: Race, dtype: str, eps: float, batch: dict[str, torch.Tensor], directions: int) -> dict[str, Any]:
    """``check_eps`` at one ε (no larger ε tried) for a fresh LoRA model in ``dtype``."""
    import zopeft
    from zopeft.batched import loss_closure

    base = common.load_base(race.path, race.device, dtype=dtype)
    torch.manual_seed(0)
    model = common.with_adapter(base, "lora")
    opt = zopeft.MeZO(model, lr=0.0, eps=eps, seed=0)
    closure = loss_closure(model, batch)
    began = time.perf_counter()
    check = opt.check_eps(closure, directions=directions, scales=(1.0,))
    common.sync(race.device)
    seconds = time.perf_counter() - began
    return {"dtype": dtype, "eps": eps, "noise": check.noise[eps], "verdict": "ok" if check.ok else "noisy",
            "differences": check.differences, "forward_s": seconds / check.forward_passes}


def agreement(a: list[float], b: list[float]) -> tuple[float, float]:
    """Correlation and share of equal signs of two lists of differences."""
    x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float(torch.corrcoef(torch.stack([x, y]))[0, 1]), float((x.sign() == y.sign()).double().mean())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_eps", description=__doc__.splitlines()[0])
    common.add_common_arguments(parser)
    parser.add_argument("--model", default="smollm2", help="smollm2 (real weights) or a random Llama size (tests)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated, the first is the reference")
    parser.add_argument("--eps", default=None, help="comma-separated ε (default 1e-3,1e-2 quick, 1e-3,3e-3,1e-2 full)")
    parser.add_argument("--directions", type=int, default=None, help="K (default 4 quick, 8 full)")
    parser.add_argument("--batch", type=int, default=None, help="examples (default 4 quick, 8 full)")
    args = parser.parse_args(argv)
    common.setup(args.threads)
    device = common.resolve_device(args.device)
    dtypes = args.dtypes.split(",")
    unknown = sorted(set(dtypes) - set(common.DTYPES))
    if unknown:
        parser.error(f"--dtypes: unknown {', '.join(unknown)}; choose from {', '.join(common.DTYPES)}")
    epsilons = [float(e) for e in (args.eps or ("1e-3,1e-2" if args.quick else "1e-3,3e-3,1e-2")).split(",")]
    directions = args.directions or (4 if args.quick else 8)
    size = args.batch or (4 if args.quick else 8)
    machine = common.machine_info(device)
    race = Race(args.model, device)
    task = race.task("sst2-2shot")
    batch = race.batch(task, race.records("sst2-2shot", "train"), 0, 0, size)
    rows = [differences(race, dtype, eps, batch, directions) for dtype in dtypes for eps in epsilons]
    reference = {r["eps"]: r["differences"] for r in rows if r["dtype"] == dtypes[0]}
    for r in rows:
        r["correlation"], r["same_sign"] = agreement(r["differences"], reference[r["eps"]])
    print(f"{args.model} + LoRA r=8 q/v (B = 0), {size} examples of the demo's 2-shot SST-2 prompt, "
          f"{directions} directions; noise r > {MAX_NOISE:g}: a run needs over {1 + MAX_NOISE ** 2:.1f}x the steps")
    result = {"benchmark": "eps", "quick": args.quick, "machine": machine, "model": args.model,
              "directions": directions, "batch": size,
              "results": rows, "table": common.print_table(rows, COLUMNS)}
    return common.save_result(result, args.out_dir, device)


if __name__ == "__main__":
    main()
