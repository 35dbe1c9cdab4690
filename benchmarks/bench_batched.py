"""FZOO step time: batched evaluation of the N+1 points vs one forward pass per point.

    python -m benchmarks.bench_batched [--quick] [--device auto|cpu|cuda] [--labels all,answer] [--ns 4,8,16]
        [--quant none,nf4]

A Llama-architecture model is built from a config (random weights, nothing downloaded),
wrapped with LoRA r=8 on q_proj/v_proj, unquantized and bitsandbytes nf4.  For each N the
same optimizer settings run with ``batched=False`` (sequential: N+1 forward passes) and
``batched=True`` (the replicas of the batch in one pass, chunked automatically), the steps
alternating so that machine load affects both alike.  Prints a table and writes JSON to
``benchmarks/results/batched_<device>.json`` (``..._quick.json`` with ``--quick``).

``--labels`` picks the label layouts (default both): ``all`` is language modelling on every
token; ``answer`` puts labels on the last token of each row only (the MeZO-style
classification format of zopeft.tasks); the batched path then also projects onto the
vocabulary only at that position (``logits_to_keep``), which the opaque sequential closure
cannot do.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from . import common

COLUMNS: list[common.Column] = [
    ("quant", "quant", ""), ("labels", "labels", ""), ("N", "n_perturbations", "d"),
    ("sequential s/step", "sequential_s", ".3f"), ("batched s/step", "batched_s", ".3f"),
    ("speed-up", "speedup", ".2f"), ("max rel Δloss", "max_rel_loss_diff", ".1e"),
]


def build_model(size: str, quant: str | None, device: torch.device) -> torch.nn.Module:
    """The random Llama of ``size`` with LoRA, its B matrices non-zero (as after some training;
    B = 0 at initialisation would hide every perturbation of A from the loss)."""
    model = common.load_base(common.model_path(size), device, quant=quant)
    torch.manual_seed(1)
    model = common.with_adapter(model, "lora")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return model


def time_pair(model: torch.nn.Module, batch: dict[str, torch.Tensor], n: int, repeats: int,
              device: torch.device) -> dict[str, Any]:
    """Median/min seconds per FZOO step, sequential vs batched, and the largest relative loss difference."""
    import zopeft
    from zopeft.batched import batched_support, loss_closure

    # lr=0: a full step (evaluations + update) that leaves the weights alone, so both optimizers
    # see the same model and their losses can be compared step by step
    opts = {
        mode: zopeft.FZOO(model, lr=0.0, eps=1e-3, n_perturbations=n, seed=0, batched=(mode == "batched"))
        for mode in ("sequential", "batched")
    }
    reason = batched_support(model, opts["batched"], batch)
    if reason is not None:
        raise RuntimeError(f"the benchmark model is not supported by the batched path: {reason}")
    times: dict[str, list[float]] = {m: [] for m in opts}
    losses: dict[str, list[float]] = {}
    for i in range(repeats + 1):  # the first round warms up
        for mode, opt in opts.items():
            dt = common.timed(lambda: opt.step(loss_closure(model, batch)), device)
            losses[mode] = opt.step_log[-1]["losses"]
            if i:
                times[mode].append(dt)
    diff = max(abs(a - b) / abs(b) for a, b in zip(losses["batched"], losses["sequential"]))
    seq, bat = common.median(times["sequential"]), common.median(times["batched"])
    return {
        "n_perturbations": n,
        "sequential_s": seq,
        "batched_s": bat,
        "speedup": seq / bat,
        "sequential_min_s": min(times["sequential"]),
        "batched_min_s": min(times["batched"]),
        "speedup_min": min(times["sequential"]) / min(times["batched"]),
        "max_rel_loss_diff": diff,
        "times": times,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_arguments(parser)
    parser.add_argument("--model", default=None, help="random Llama size (default: quick with --quick, else full)")
    parser.add_argument("--ns", default="4,8,16", help="comma-separated N (perturbations per step)")
    parser.add_argument("--quant", default="none,nf4", help="comma-separated: none, nf4, fp4")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--labels", default="all,answer",
                        help="comma-separated: all (LM on every token), answer (last token only)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per configuration (after one warm-up)")
    args = parser.parse_args(argv)

    common.setup(args.threads)
    device = common.resolve_device(args.device)
    machine = common.machine_info(device)
    size = args.model or ("quick" if args.quick else "full")
    repeats = args.repeats or (2 if device.type == "cpu" else 5)
    ns = [int(x) for x in args.ns.split(",")]
    quants = [None if q == "none" else q for q in args.quant.split(",")]
    label_modes = args.labels.split(",")
    print(f"device={device} model={size} batch={args.batch}x{args.length} threads={torch.get_num_threads()} "
          f"repeats={repeats}", flush=True)
    params = None
    table = common.TableStream(COLUMNS)
    for quant in quants:
        model = build_model(size, quant, device)
        params = params or sum(p.numel() for p in model.get_base_model().parameters())
        for labels in label_modes:
            batch = common.token_batch(args.batch, args.length, common.vocab_size(model), device, labels=labels)
            for n in ns:
                row = {"quant": quant or "none", "labels": labels, **time_pair(model, batch, n, repeats, device)}
                table.add(row)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = {
        "benchmark": "batched",
        "quick": args.quick,
        "machine": machine,
        "model": {"arch": "llama", "size": size, **common.LLAMA_SIZES[size], "parameters": params,
                  "weights": "random (built from a config)"},
        "adapter": {"type": "lora", "r": 8, "lora_alpha": 16, "target_modules": common.LORA_TARGETS},
        "batch": {"batch_size": args.batch, "length": args.length, "labels": label_modes},
        "repeats": repeats,
        "timing": "median (and min) seconds per FZOO step (N+1 loss evaluations + update, lr=0)",
        "table": table.text(),
        "results": table.rows,
    }
    return common.save_result(result, args.out_dir, device)


if __name__ == "__main__":
    main()
