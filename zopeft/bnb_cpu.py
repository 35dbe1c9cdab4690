"""Keep bitsandbytes 4-bit layers on their exact CPU path.

On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a ``Linear4bit`` weight for a bf16
kernel at its first forward in eval mode without gradients - exactly how a ZO step runs.
That kernel rounds activations to bf16, whose noise is of the size of the ε-perturbation
loss differences ZO measures (FZOO's σ grows 2-3x on SmolLM2-135M), and saving a checkpoint
unpacks the live weight, after which the next repack corrupted the model in our runs
(loss 4.3 -> 13.7 after one checkpoint).  zopeft therefore keeps every 4-bit layer on the
dequantize + fp32/bf16-compute path that GPUs and other CPUs use.
"""

from __future__ import annotations

from torch import nn

__all__ = ["use_exact_4bit_cpu_path"]


def use_exact_4bit_cpu_path(model: nn.Module) -> None:
    """Turn off bitsandbytes' AVX512-BF16 CPU repacking in ``model``.

    Call it before the model's first forward (zopeft's loaders and optimizers do).  Where the
    repacking already ran it is undone, but the block scales it rounded to bf16 stay rounded.
    """
    for module in model.modules():
        if not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state
            )
