"""Step anatomy: how much of a ZO step is forward passes, and how much is optimizer overhead.

    python -m benchmarks.bench_anatomy [--quick] [--device auto|cpu|cuda] [--adapters lora,prefix,full] [--quant none,nf4]
                                       [--no-deep-narrow]

For each adapter (LoRA r=8 q/v, prefix tuning with 16 virtual tokens, full-parameter) on an
unquantized and a bitsandbytes 4-bit (nf4) Llama-architecture model built from a config (random
weights), and for a deep narrow model with LoRA on every linear layer (24 layers of width 64, 336
adapter tensors, batch 2x16: many tiny tensors, where per-tensor optimizer work would dominate),
the time of one optimizer step is divided by the time of the forward passes it needs::

    ratio = t(step) / (loss evaluations per step × t(one loss evaluation))

One loss evaluation is what the optimizers run per point, ``zopeft.loss_closure(model, batch)()``
under ``no_grad`` (the model's own loss, projected onto the vocabulary only at labelled positions);
the ``plain fwd`` column is the closure a user writes, ``model(**batch).loss``, for reference.  The
floor of a step that evaluates its points one forward pass each is 1.0; what is above it is the
optimizer's own work: drawing the seeded noise, writing perturbed weights and restoring them,
computing the update (AdaMeZO rebuilds its moments from the last K noise vectors each step).

Batched FZOO evaluates its N+1 points as replicas of the batch in few forward passes
(:mod:`zopeft.batched`) and can go *below* 1.0: one large matmul over the shared frozen base uses
the hardware better than N+1 small ones, and a 4-bit weight is dequantized once per pass instead
of N+1 times.  Where the batched path does not apply (full-parameter ZO) it falls back to the
sequential loop; the ``path`` column says which path ran.

The model stays fixed (lr = 0: the step's work is done, the update is zero).  Steps of all
optimizers alternate within each round (with three forwards of each kind) so that machine load
affects them alike; the table shows medians over the rounds after a warm-up round.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

from . import common

N_PERTURBATIONS = 8
FORWARDS_PER_ROUND = 3
FULL_4BIT = "full-parameter ZO cannot train a 4-bit base"
ZO_EPS = 1e-3
DEEP_NARROW = {"model": "deep-narrow", "adapter": "lora-all", "batch": 2, "length": 16}
COLUMNS: list[common.Column] = [
    ("model", "model", ""), ("adapter", "adapter", ""), ("tensors", "tensors", "d"), ("quant", "quant", ""),
    ("batch", "batch", ""),
    ("optimizer", "optimizer", ""),
    ("path", "path", ""), ("evals/step", "evaluations_per_step", "d"), ("fwd s", "forward_s", ".4f"),
    ("plain fwd s", "plain_forward_s", ".4f"),
    ("step s", "step_s", ".4f"), ("ratio", "ratio", ".2f"), ("overhead s", "overhead_s", ".4f"),
    ("peak GiB", "peak_gib", ".2f"),
]


def optimizers(model: torch.nn.Module) -> dict[str, Any]:
    """The optimizers whose steps are timed (lr = 0), AdaMeZO's window filled by replaying K steps."""
    import zopeft

    out = {
        "mezo": zopeft.MeZO(model, lr=0.0, eps=ZO_EPS),
        "adamezo": zopeft.AdaMeZO(model, lr=0.0, eps=ZO_EPS),
        "fzoo-sequential": zopeft.FZOO(model, lr=0.0, eps=ZO_EPS, n_perturbations=N_PERTURBATIONS, batched=False),
        "fzoo-batched": zopeft.FZOO(model, lr=0.0, eps=ZO_EPS, n_perturbations=N_PERTURBATIONS, batched=True),
    }
    ada = out["adamezo"]  # steady state: the timed steps rebuild the moments from a full window
    ada.replay([{"step": s, "lr": [0.0], "losses": [1.0, 0.5]} for s in range(ada.window)])
    return out


def measure(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], repeats: int, device: torch.device
) -> list[dict[str, Any]]:
    """Median seconds of one loss evaluation, a plain forward and each optimizer's step; one row per optimizer."""
    from zopeft.batched import batched_support, loss_closure

    opts = optimizers(model)

    @torch.no_grad()
    def forward() -> None:  # one loss evaluation, as the optimizers run it
        float(loss_closure(model, batch)())

    @torch.no_grad()
    def plain() -> None:  # the closure a user writes
        model(**batch).loss.item()

    actions: dict[str, Callable[[], Any]] = {"forward": forward, "plain": plain}
    actions.update({name: (lambda o=opt: o.step(loss_closure(model, batch))) for name, opt in opts.items()})
    times: dict[str, list[float]] = {name: [] for name in actions}
    peaks: dict[str, int] = {}
    memory = common.PeakMemory(device)
    for i in range(repeats + 1):  # round 0 warms up
        for name, action in actions.items():
            if device.type == "cuda":
                memory.reset()
            if name in opts:  # the others' restores wrote the shared tensors: re-read them, untimed
                opts[name].sync_masters()
            for _ in range(FORWARDS_PER_ROUND if name in ("forward", "plain") else 1):
                dt = common.timed(action, device)
                if i:
                    times[name].append(dt)
            if device.type == "cuda":
                peaks[name] = max(peaks.get(name, 0), memory.peak())
    t_fwd, t_plain = common.median(times["forward"]), common.median(times["plain"])
    rows = []
    for name, opt in opts.items():
        evals = len(opt.evaluations())
        t_step = common.median(times[name])
        reason = batched_support(model, opt, batch) if opt.batched else "not requested"
        rows.append({
            "optimizer": name,
            "path": "batched" if reason is None else "sequential",
            "sequential_reason": reason,
            "evaluations_per_step": evals,
            "forward_s": t_fwd,
            "plain_forward_s": t_plain,
            "step_s": t_step,
            "ratio": t_step / (evals * t_fwd),
            "overhead_s": t_step - evals * t_fwd,
            "peak_gib": peaks[name] / 2**30 if name in peaks else None,
            "forward_peak_gib": peaks["forward"] / 2**30 if peaks else None,
            "times": times[name],
        })
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_arguments(parser)
    parser.add_argument("--model", default=None, help="random Llama size (default: quick with --quick, else full)")
    parser.add_argument("--adapters", default="lora,prefix,full", help="comma-separated: lora, prefix, full")
    parser.add_argument("--quant", default="none,nf4", help="comma-separated: none, nf4, fp4")
    parser.add_argument("--batch", type=int, default=None, help="rows (default 4 with --quick, else 16)")
    parser.add_argument("--length", type=int, default=48, help="tokens per row")
    parser.add_argument("--dtype", default="fp32", choices=tuple(common.DTYPES), help="compute dtype of the base")
    parser.add_argument("--labels", default="answer", choices=("answer", "all"), help="answer: label on the last token")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds after one warm-up (default 2 quick, 4 full)")
    parser.add_argument("--no-deep-narrow", dest="deep_narrow", action="store_false",
                        help="skip the deep-narrow case (24 layers of width 64, LoRA r=4 on every linear layer: "
                             "336 adapter tensors, batch 2x16, unquantized)")
    args = parser.parse_args(argv)

    common.setup(args.threads)
    device = common.resolve_device(args.device)
    machine = common.machine_info(device)
    size = args.model or ("quick" if args.quick else "full")
    batch_size = args.batch or (4 if args.quick else 16)
    repeats = args.repeats or (2 if args.quick else 4)
    print(f"device={device} model=llama-{size} (random weights) batch={batch_size}x{args.length} labels={args.labels} "
          f"threads={torch.get_num_threads()} repeats={repeats}", flush=True)
    table = common.TableStream(COLUMNS)
    skipped = []
    cases = [
        (size, adapter, quant, batch_size, args.length)
        for quant in [None if q == "none" else q for q in args.quant.split(",")]
        for adapter in args.adapters.split(",")
    ]
    if args.deep_narrow:
        cases.append((DEEP_NARROW["model"], DEEP_NARROW["adapter"], None, DEEP_NARROW["batch"], DEEP_NARROW["length"]))
    for model_size, adapter, quant, rows, length in cases:
        if adapter == "full" and quant:
            skipped.append({"adapter": adapter, "quant": quant, "reason": FULL_4BIT})
            continue
        base = common.load_base(common.model_path(model_size), device, dtype=args.dtype, quant=quant)
        model = common.with_adapter(base, adapter)
        batch = common.token_batch(rows, length, common.vocab_size(model), device, labels=args.labels)
        tensors = len(common.trainable(model))
        for row in measure(model, batch, repeats, device):
            table.add({"model": model_size, "adapter": adapter, "tensors": tensors, "quant": quant or "none",
                       "batch": f"{rows}x{length}", **row})
        del model
    result = {
        "benchmark": "anatomy",
        "quick": args.quick,
        "machine": machine,
        "model": {"arch": "llama", "size": size, **common.LLAMA_SIZES[size], "weights": "random (built from a config)"},
        "deep_narrow": {**DEEP_NARROW, **common.LLAMA_SIZES["deep-narrow"]} if args.deep_narrow else None,
        "batch": {"batch_size": batch_size, "length": args.length, "labels": args.labels},
        "optimizers": {"eps": ZO_EPS, "lr": 0.0, "fzoo_n_perturbations": N_PERTURBATIONS, "adamezo_window": "default (10)"},
        "repeats": repeats,
        "definition": "ratio = median step seconds / (loss evaluations per step x median seconds of one loss "
                      "evaluation, zopeft.loss_closure(model, batch)()); 1.0 = the step costs exactly its forward "
                      "passes. plain fwd = model(**batch).loss (the vocabulary projection at every position)",
        "table": table.text(),
        "results": table.rows,
        "skipped": skipped,
    }
    return common.save_result(result, args.out_dir, device)


if __name__ == "__main__":
    main()
