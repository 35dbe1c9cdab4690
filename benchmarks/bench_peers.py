"""Peers: zopeft's MeZO step vs the ``mezo`` package from PyPI - time, memory, exact restore.

    python -m benchmarks.bench_peers [--quick] [--device auto|cpu|cuda] [--adapters lora,full]

The peer is ``mezo`` 0.0.1 on PyPI (``pip install --no-deps mezo``: its metadata pins
``transformers<5`` and ``datasets``, which it does not import; the code needs only torch).  It
provides the MeZO paper's algorithm as functions: ``mezo.update(model, inputs, loss_fn, epsilon,
learning_rate, random_seed)`` perturbs every trainable tensor in place with Gaussian noise from a
``torch.Generator`` seeded with ``random_seed`` (θ+εz, then θ−εz, then back), computes the projected
gradient and applies θ ← θ − lr·g·z, regenerating z from the seed - the MeZO reference loop.  When
``mezo`` is not installed its rows are left out (and the JSON says so).

zopeft runs as ``zopeft.MeZO`` with fp32 master copies (its default: exact restore, one extra fp32
copy of the trainable tensors) and with ``master_weights=False`` (in place, as the paper).  zopeft
draws Rademacher noise (its default), the package Gaussian noise.

Each row runs in a fresh process (see :mod:`benchmarks.bench_memory` for how memory is measured):
the model with the adapter (LoRA r=8 q/v, or every tensor for ``full``) and the batch are loaded,
after a warm-up forward two more are timed (``fwd s``: the faster), then the optimizer is built and run.  All
steps use lr = 0, so a step should leave the weights as they were: ``exact`` says whether every
trainable tensor is bit-identical afterwards (in-place perturb/restore in floating point drifts).
``ratio`` = step seconds / (2 × forward seconds), as in :mod:`benchmarks.bench_anatomy`.

The package's update draws a tensor of more than 100,000 elements row by row, its perturbation in
one piece; :func:`mezo_noise_check` tests whether the two draws agree for a 1000×101 tensor (on
CPU they agree only when the row length is a multiple of 16; SmolLM2's widths are).  Where they
differ, the update moves along a different random direction than the one whose loss difference
was measured.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable
from typing import Any

import torch

from . import common

EPS = 1e-3
IMPLEMENTATIONS = {
    "zopeft": "zopeft.MeZO (fp32 master copies, default)",
    "zopeft-inplace": "zopeft.MeZO(master_weights=False)",
    "mezo-pypi": "mezo 0.0.1 from PyPI: mezo.update",
}
COLUMNS: list[common.Column] = [
    ("adapter", "adapter", ""), ("implementation", "implementation", ""), ("s/step", "step_s", ".3f"),
    ("fwd s", "forward_s", ".3f"), ("ratio", "ratio", ".2f"), ("setup MiB", "memory_setup_mib", ".0f"),
    ("peak MiB", "memory_peak_mib", ".0f"), ("increment MiB", "memory_increment_mib", ".0f"), ("exact", "exact", ""),
]


def mezo_installed() -> bool:
    return importlib.util.find_spec("mezo") is not None


def mezo_noise_check(shape: tuple[int, ...] = (1000, 101)) -> dict[str, Any]:
    """Does ``mezo``'s update regenerate the noise its perturbation used?  Its ``update_param`` draws
    tensors of more than 100,000 elements row by row, which matches one whole-tensor draw of the
    perturbation only when the CPU generator's 16-value blocks line up with the rows."""
    from mezo.mezo import perturb_parameters, update_params

    perturbed, updated = torch.zeros(shape), torch.zeros(shape)
    perturb_parameters([perturbed], 1.0, 123)  # ε = 1: the tensor becomes z
    update_params([updated], random_seed=123, learning_rate=-1.0, projected_grad=1.0)  # θ − lr·g·z = z
    return {"shape": list(shape), "update_noise_equals_perturbation_noise": torch.equal(perturbed, updated),
            "max_abs_difference": float((perturbed - updated).abs().max())}


def make_step(impl: str, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], Any]:
    """Build implementation ``impl`` (lr = 0) and return one MeZO step of it."""
    if impl == "mezo-pypi":
        import mezo

        seeds = iter(range(1, 1 << 30))
        return lambda: mezo.update(model, batch, lambda m, b: m(**b).loss, EPS, 0.0, next(seeds))
    import zopeft

    if impl not in ("zopeft", "zopeft-inplace"):
        raise ValueError(f"unknown implementation {impl!r}; choose from {', '.join(IMPLEMENTATIONS)}")
    opt = zopeft.MeZO(model, lr=0.0, eps=EPS, master_weights=impl == "zopeft")
    return lambda: opt.step(lambda: model(**batch).loss)


def child(config: dict[str, Any]) -> dict[str, Any]:
    """In the fresh process: time plain forwards, then measure the steps and check the weights."""
    device = torch.device(config["device"])
    model, batch = common.model_and_batch(config, device)
    with torch.no_grad():
        forward_s = min(common.timed(lambda: model(**batch).loss.item(), device) for _ in range(2))
    before = common.tensor_digest(common.trainable(model))
    measured = common.measure_steps(lambda: make_step(config["impl"], model, batch), config["steps"], device).as_dict()
    changed = sum(a != b for a, b in zip(before, common.tensor_digest(common.trainable(model))))
    return {
        "trainable": sum(p.numel() for p in common.trainable(model)),
        "forward_s": forward_s,
        "ratio": measured["step_s"] / (2 * forward_s),
        "tensors_changed": changed,
        "tensors": len(before),
        "exact": "yes" if changed == 0 else f"no ({changed}/{len(before)})",
        **measured,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    if common.child_entry(argv, child):
        return {}
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_arguments(parser)
    parser.add_argument("--model", default="smollm2", help="smollm2 (real weights) or a random Llama size")
    parser.add_argument("--adapters", default="lora,full", help="comma-separated: lora, full")
    parser.add_argument("--impls", default=",".join(IMPLEMENTATIONS), help=f"comma-separated: {', '.join(IMPLEMENTATIONS)}")
    parser.add_argument("--batch", type=int, default=None, help="rows (default 8 with --quick, else 16)")
    parser.add_argument("--length", type=int, default=48, help="tokens per row (labels on the last one)")
    parser.add_argument("--steps", type=int, default=None, help="steps per configuration (default 2 quick, 4 full)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    common.setup(args.threads)
    device = common.resolve_device(args.device)
    machine = common.machine_info(device)
    impls = args.impls.split(",")
    missing = "mezo-pypi" in impls and not mezo_installed()
    if missing:
        impls.remove("mezo-pypi")
        print("the `mezo` package is not installed (pip install --no-deps mezo): its rows are left out", flush=True)
    batch_size, steps = args.batch or (8 if args.quick else 16), args.steps or (2 if args.quick else 4)
    path = common.model_path(args.model)
    print(f"device={device} model={args.model} batch={batch_size}x{args.length} steps={steps} lr=0 eps={EPS} "
          f"threads={torch.get_num_threads()}; one fresh process per row", flush=True)
    check = mezo_noise_check() if "mezo-pypi" in impls else None
    if check:
        print(f"mezo package: its update regenerates the perturbation's noise for a {check['shape']} tensor: "
              f"{check['update_noise_equals_perturbation_noise']}", flush=True)
    table = common.TableStream(COLUMNS)
    for adapter in args.adapters.split(","):
        for impl in impls:
            config = {"model": path, "adapter": adapter, "impl": impl, "batch": batch_size, "length": args.length,
                      "steps": steps, "device": str(device)}
            table.add({"adapter": adapter, "implementation": impl,
                       **common.run_child("bench_peers", config, threads=args.threads)})
    result = {
        "benchmark": "peers",
        "quick": args.quick,
        "machine": machine,
        "model": args.model,
        "implementations": {k: v for k, v in IMPLEMENTATIONS.items() if k in impls},
        "mezo_package": "not installed: rows left out" if missing else "mezo 0.0.1 (PyPI, installed with --no-deps)",
        "mezo_package_noise_check": check,
        "noise": "zopeft: Rademacher (default); mezo package: Gaussian",
        "batch": {"batch_size": batch_size, "length": args.length, "labels": "answer (last token)"},
        "steps": steps,
        "definition": "s/step = median of the steps after the first (lr = 0); ratio = s/step / (2 x plain forward); "
                      "memory as in bench_memory (increment = peak from building the optimizer on - setup); "
                      "exact = every trainable tensor bit-identical after the lr = 0 steps",
        "table": table.text(),
        "results": table.rows,
    }
    return common.save_result(result, args.out_dir, device)


if __name__ == "__main__":
    main()
