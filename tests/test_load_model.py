"""zopeft.load_model: a model as recipes name it (folder, hub id, .gguf, pkg:), quantized as they say, from a script."""

from __future__ import annotations

import importlib.metadata

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel
from test_cli import tiny_llm_dir

import zopeft
from zopeft.models import AdapterSpec, ModelSpec


def test_load_model_gives_the_base_and_its_tokenizer_quantized_as_asked():
    model, tokenizer = zopeft.load_model(tiny_llm_dir(), quantization_bit=4, quantization_type="fp4")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.quant_state.quant_type == "fp4" for m in layers)
    assert not isinstance(model, PeftModel) and tokenizer.pad_token is not None
    ids = tokenizer("Review: fine.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape[-1] == len(tokenizer)


def test_load_model_with_an_adapter_is_what_training_loads():
    torch.manual_seed(0)
    model, _ = zopeft.load_model(tiny_llm_dir(), AdapterSpec(lora_rank=2, lora_target=["q_proj"]))
    torch.manual_seed(0)
    spec_model, _ = zopeft.load_model(ModelSpec(tiny_llm_dir()), AdapterSpec(lora_rank=2, lora_target=["q_proj"]))
    assert isinstance(model, PeftModel)
    theirs = dict(spec_model.named_parameters())
    assert all(torch.equal(p, theirs[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("settings,message", [
    ({"quantisation_bit": 4}, "load_model: unknown setting 'quantisation_bit' (did you mean 'quantization_bit'?); "
                              "the settings are task_type, num_labels, quantization_bit, "),
    ({"quantization_bit": 3}, "load_model: quantization_bit=3 is not one of None, 4, 8"),
    ({"compute_dtype": "bf16"}, "load_model: compute_dtype='bf16' is not one of 'float32', 'bfloat16', 'float16'"),
])
def test_load_model_refuses_a_setting_in_one_line_before_loading(settings, message):
    with pytest.raises(ValueError) as raised:
        zopeft.load_model(tiny_llm_dir(), **settings)
    assert str(raised.value).startswith(message), str(raised.value)


def test_the_gguf_reader_the_bundled_recipes_need_is_a_dependency():
    """A .gguf model (both offline recipes) needs `gguf`: installed with zopeft, not an extra to remember."""
    required = [r for r in importlib.metadata.requires("zopeft") if r.startswith("gguf")]
    assert required and all("extra" not in r for r in required)
