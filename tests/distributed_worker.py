"""Worker for tests/test_distributed.py: a few ZO steps on a tiny LoRA model, from a plain script.

    torchrun --nproc_per_node 2 distributed_worker.py MODEL_DIR OUT_DIR [--diverge]   # K ranks
    python distributed_worker.py MODEL_DIR OUT_DIR                                     # the reference

For each (optimizer, parallel mode) it trains from the same initial adapter and writes the
trainable tensors and the last step's statistics to ``OUT_DIR/<name>-rank<r>.*``.  The
single-process reference reproduces data parallelism with gradient accumulation over the
K ranks' batches (the losses are averaged the same way).  ``--diverge`` nudges rank 1's
adapter first, so the replica check must stop the run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import zopeft
from zopeft.distributed import ReplicaDivergence, distributed_session, exit_worker

RUNS = [("fzoo", "perturbation", dict(lr=1e-2, n_perturbations=5, batched=False)),
        ("mezo", "data", dict(lr=1e-2)), ("adamezo", "data", dict(lr=1e-3, window=2))]
WORLD, STEPS = 2, 3


def batch(step: int, shard: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + shard)
    ids = torch.randint(4, 128, (2, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def run(model_dir: str, name: str, parallel: str, kwargs: dict, rank: int, world: int, diverge: bool):
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=2, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:  # non-zero B: every tensor's perturbation changes the loss
                p.normal_(0, 0.05)
                if diverge and rank == 1:
                    p.add_(1e-6)
    opt = zopeft.get_optimizer(name, model, eps=1e-2, seed=3, parallel=parallel if world > 1 else None,
                               sync_check_steps=1, **kwargs)
    for step in range(STEPS):
        if world > 1:  # data parallel: rank r's own batch; perturbation parallel: the same batch everywhere
            opt.step(zopeft.loss_closure(model, batch(step, rank if parallel == "data" else 0)))
        elif parallel == "data":  # reference: the K ranks' batches as accumulated micro-batches
            for shard in range(WORLD - 1):
                opt.estimate(zopeft.loss_closure(model, batch(step, shard)))
            opt.step(zopeft.loss_closure(model, batch(step, WORLD - 1)))
        else:
            opt.step(zopeft.loss_closure(model, batch(step, 0)))
    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    return tensors, opt.last_stats


def main() -> None:
    model_dir, out = sys.argv[1], Path(sys.argv[2])
    diverge = "--diverge" in sys.argv
    torch.set_num_threads(1)
    with distributed_session() as (rank, world):
        for name, parallel, kwargs in RUNS:
            try:
                tensors, stats = run(model_dir, name, parallel, kwargs, rank, world, diverge)
            except ReplicaDivergence as exc:
                (out / f"{name}-rank{rank}.error").write_text(str(exc))
                continue
            save_file(tensors, str(out / f"{name}-rank{rank}-world{world}.safetensors"))
            (out / f"{name}-rank{rank}-world{world}.json").write_text(json.dumps(stats))
    exit_worker()


if __name__ == "__main__":
    main()
