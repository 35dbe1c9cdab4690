"""FZOO step time: batched evaluation of the N+1 points vs one forward pass per point (and one ``generate``).

    python -m benchmarks.bench_batched [--quick] [--device auto|cpu|cuda] [--labels all,answer] [--ns 4,8,16]
        [--quant none,nf4] [--generation smollm2|quick|...|none]

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

The generation row: a FZOO step on ``zo.objective: f1`` (:func:`zopeft.generation_closure`), N+1 = 9
points x 4 SQuAD dev prompts (the bundled template, prompts cut to 496 tokens), up to 16 greedy new
tokens each, generated point by point (9 ``generate`` calls) or as replica rows of one ``generate``
call (fewer than 9 replicas per call where the memory rule of :mod:`zopeft.batched.memory`, the KV
cache included, allows fewer: the table says how many calls); seconds per step, the peak memory each adds to what is in use before it (RSS since
a reset of the high-water mark, CPU; allocated, CUDA), and whether both gave the same generations.
``--generation`` names its model: ``smollm2`` (real SmolLM2-135M-Instruct weights, LoRA r=8 q/v
with B = 0: the zero-shot model), or a random Llama size with SmolLM2's vocabulary (default
``quick`` with ``--quick``, else ``smollm2``; ``none`` skips it).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from . import common

GEN_COLUMNS: list[common.Column] = [
    ("model", "model", ""), ("points", "points", "d"), ("prompts", "prompts", "d"), ("prompt tokens", "prompt_tokens", "d"),
    ("new tokens", "new_tokens", "d"), ("sequential s/step", "sequential_s", ".2f"), ("batched s/step", "batched_s", ".2f"),
    ("batched/seq.", "ratio", ".2f"), ("generate calls", "calls", ""), ("seq. peak MiB", "sequential_peak_mib", ".0f"),
    ("batched peak MiB", "batched_peak_mib", ".0f"), ("same generations", "identical", ""),
]
COLUMNS: list[common.Column] = [
    ("quant", "quant", ""), ("labels", "labels", ""), ("N", "n_perturbations", "d"),
    ("sequential s/step", "sequential_s", ".3f"), ("batched s/step", "batched_s", ".3f"),
    ("speed-up", "speedup", ".2f"), ("max rel Δloss", "max_rel_loss_diff", ".1e"),
]


def build_model(size: str, quant: str | None, device: torch.device, vocab_size: int | None = None,
                trained: bool = True) -> torch.nn.Module:
    """The model of ``size`` (a random Llama, or ``smollm2``) with LoRA; ``trained``: its B matrices non-zero (as
    after some training; B = 0 at initialisation would hide every perturbation of A from the loss)."""
    model = common.load_base(common.model_path(size, vocab_size), device, quant=quant)
    torch.manual_seed(1)
    model = common.with_adapter(model, "lora")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n and trained:
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


def time_generation(model: torch.nn.Module, batch: Any, points: int, repeats: int, device: torch.device,
                    replicas: int | None = None) -> dict[str, Any]:
    """Median seconds and peak memory of a FZOO step on 1 − F1 of ``points`` points' generations, one ``generate``
    per point vs one for all, and whether both generated the same answers."""
    import zopeft
    from zopeft.squad_metrics import best_over_answers, f1

    opts = {mode: zopeft.FZOO(model, lr=0.0, eps=1e-3, n_perturbations=points - 1, seed=0, batched=(mode == "batched"),
                              perturbation_batch_size=replicas) for mode in ("sequential", "batched")}
    meter = common.PeakMemory(device)
    times: dict[str, list[float]] = {m: [] for m in opts}
    peaks: dict[str, list[int]] = {m: [] for m in opts}
    said: dict[str, list[list[str]]] = {}
    calls: dict[str, int] = {}
    generate = model.generate
    model.generate = lambda *args, **kwargs: calls.update(n=calls.get("n", 0) + 1) or generate(*args, **kwargs)

    def f1_error(mode: str) -> Any:  # 1 − mean F1, keeping what each point said
        def objective(generations: list[str], records: list[dict]) -> float:
            said[mode].append(generations)
            return 1 - sum(best_over_answers(f1, g, a) for g, a in zip(generations, batch.answers)) / len(generations)
        return objective

    same = True
    try:
        for i in range(repeats + 1):  # the first round warms up
            for mode, opt in opts.items():
                said[mode], calls["n"] = [], 0
                common.release_freed_memory()
                before = meter.current()
                meter.reset()
                dt = common.timed(lambda: opt.step(zopeft.generation_closure(model, batch, f1_error(mode))), device)
                calls[mode] = calls["n"]
                if i:
                    times[mode].append(dt)
                    peaks[mode].append(meter.peak() - before)
            same = same and said["sequential"] == said["batched"]
    finally:
        del model.generate  # the model's own again
    seq, bat = common.median(times["sequential"]), common.median(times["batched"])
    return {
        "points": points, "prompts": len(batch), "prompt_tokens": int(batch.inputs["attention_mask"].sum()),
        "new_tokens": batch.max_new_tokens, "sequential_s": seq, "batched_s": bat, "ratio": bat / seq,
        "calls": f"{calls['sequential']} -> {calls['batched']}",
        "sequential_peak_mib": max(peaks["sequential"]) / common.MIB, "batched_peak_mib": max(peaks["batched"]) / common.MIB,
        "peak_scope": meter.scope, "identical": "yes" if same else "NO", "times": times,
        "generations": said["batched"][0], "answers": batch.answers,
    }


def generation_row(name: str, device: torch.device, repeats: int, replicas: int | None = None) -> dict[str, Any]:
    """The generation row on model ``name``: 9 points x 4 SQuAD dev prompts x 16 new tokens (``replicas`` per
    ``generate`` call: the optimizer's ``perturbation_batch_size``; None: the memory rule's)."""
    from zopeft.data import BUILTIN_DATASETS, load_records
    from zopeft.models import ModelSpec, load_tokenizer
    from zopeft.tasks import build_task

    tokenizer = load_tokenizer(ModelSpec(common.SMOLLM2))
    model = build_model(name, None, device, None if name == "smollm2" else len(tokenizer), trained=name != "smollm2")
    task = build_task("generation", template=BUILTIN_DATASETS["squad"]["task"]["template"], cutoff_len=512,
                      max_new_tokens=16)
    batch = task.generation_batch(load_records("squad", "dev")[:4], tokenizer).to(device)
    return {"model": name, **time_generation(model, batch, 9, repeats, device, replicas)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_arguments(parser)
    parser.add_argument("--model", default=None, help="random Llama size (default: quick with --quick, else full)")
    parser.add_argument("--ns", default="4,8,16", help="comma-separated N (perturbations per step); none: no loss rows")
    parser.add_argument("--quant", default="none,nf4", help="comma-separated: none, nf4, fp4")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--labels", default="all,answer",
                        help="comma-separated: all (LM on every token), answer (last token only)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per configuration (after one warm-up)")
    parser.add_argument("--generation", default=None,
                        help="model of the generation row: smollm2, a random Llama size, or none (default: quick with "
                             "--quick, else smollm2)")
    parser.add_argument("--gen-replicas", type=int, default=None,
                        help="replicas per generate call of the generation row (default: the memory rule's)")
    args = parser.parse_args(argv)

    common.setup(args.threads)
    device = common.resolve_device(args.device)
    machine = common.machine_info(device)
    size = args.model or ("quick" if args.quick else "full")
    repeats = args.repeats or (2 if device.type == "cpu" else 5)
    ns = [] if args.ns == "none" else [int(x) for x in args.ns.split(",")]
    quants = [None if q == "none" else q for q in args.quant.split(",")]
    label_modes = args.labels.split(",")
    print(f"device={device} model={size} batch={args.batch}x{args.length} threads={torch.get_num_threads()} "
          f"repeats={repeats}", flush=True)
    params = None
    table = common.TableStream(COLUMNS)
    for quant in quants if ns else []:
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
    generation = args.generation or ("quick" if args.quick else "smollm2")
    gen_rows = []
    if generation != "none":
        print("\ngeneration: FZOO on 1 - F1, 9 points x 4 SQuAD prompts, up to 16 new tokens", flush=True)
        gen_table = common.TableStream(GEN_COLUMNS)
        gen_rows.append(generation_row(generation, device, repeats, args.gen_replicas))
        gen_table.add(gen_rows[-1])
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
        "generation": {
            "timing": "median seconds per FZOO step on zo.objective f1 (N+1 generations + update, lr=0); peak: the "
                      "most a step added to the memory in use before it",
            "table": common.format_table(gen_rows, GEN_COLUMNS) if gen_rows else None,
            "results": gen_rows,
        },
    }
    return common.save_result(result, args.out_dir, device)


if __name__ == "__main__":
    main()
