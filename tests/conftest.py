"""Tiny random models built from configs (no downloads), shared by the test modules."""

from __future__ import annotations

import functools
import os
import tempfile

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BitsAndBytesConfig,
    LlamaConfig,
    OPTConfig,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB = 128
CONFIGS = {
    "llama": lambda: LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    ),
    "opt": lambda: OPTConfig(
        vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, word_embed_proj_dim=64,
    ),
    "bert": lambda: BertConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, num_labels=2,
    ),
}
QUANT = {
    None: None,
    "nf4": lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4": lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": lambda: BitsAndBytesConfig(load_in_8bit=True),
}


@functools.cache
def saved_tiny_model(arch: str) -> str:
    """Save a seeded random tiny model of ``arch`` once per session; return its directory."""
    torch.manual_seed(0)
    auto = AutoModelForSequenceClassification if arch == "bert" else AutoModelForCausalLM
    path = tempfile.mkdtemp(prefix=f"zopeft-tiny-{arch}-")
    auto.from_config(CONFIGS[arch]()).save_pretrained(path)
    return path


def tiny_model(arch: str = "llama", quant: str | None = None) -> torch.nn.Module:
    """A fresh copy of the tiny ``arch`` model, optionally bitsandbytes-quantized."""
    auto = AutoModelForSequenceClassification if arch == "bert" else AutoModelForCausalLM
    q = QUANT[quant]
    kwargs = {"quantization_config": q(), "device_map": "cpu"} if q else {}
    return auto.from_pretrained(saved_tiny_model(arch), dtype=torch.float32, **kwargs)


def fixed_batch(arch: str = "llama", batch: int = 4, length: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    """A fixed random batch (causal LM: labels = inputs; bert: 2-way labels)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (batch, length), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out["labels"] = torch.randint(0, 2, (batch,), generator=g) if arch == "bert" else ids.clone()
    return out


@pytest.fixture
def tiny() -> callable:
    return tiny_model


@pytest.fixture(autouse=True)
def _evaluation_cache(tmp_path_factory, monkeypatch):
    """Each test's runs evaluate their start themselves: the evaluation cache (zopeft.eval_cache) is per test."""
    cache = tmp_path_factory.mktemp("eval-cache")
    monkeypatch.setattr("zopeft.eval_cache.cache_dir", lambda: cache)
