"""Keep bitsandbytes 4-bit layers on their exact CPU path, whatever the order of operations.

On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a ``Linear4bit`` weight for a bf16
kernel at its first forward in eval mode without gradients - a baseline evaluation, or any ZO
step.  The kernel's bf16 noise is of the size of the loss differences ZO measures, and the
repack cannot be undone: it rounds the block scales to bf16 for good, and bitsandbytes' own
inverse (run by ``state_dict()``, ``.cuda()``) leaves single-quantized scales transposed and
re-quantizes double-quantized ones (``docs/upstream/bitsandbytes-cpu-4bit-repack.md``).

So zopeft never lets the repack happen: importing this module (``import zopeft`` does) makes
``Linear4bit.support_avx512bf16_for_cpu`` a class-level ``False`` - at once if bitsandbytes is
loaded, else when it gets imported - which covers layers built before and after.  Every 4-bit
layer then runs dequantize + matmul in its compute dtype, as on GPUs and other CPUs.  A layer
repacked before that (a model loaded and evaluated before zopeft was imported) is refused by
:func:`require_exact_4bit_cpu_path`.  This module imports neither torch nor bitsandbytes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

__all__ = ["require_exact_4bit_cpu_path"]

# bitsandbytes' Linear4bit.forward repacks when this (public) instance attribute is true; a
# data descriptor on the class wins over the instance attribute its __init__ sets.
_NO_BF16_REPACK = property(lambda self: False, lambda self, value: None, doc="Set to False by zopeft.bnb_cpu.")


def _keep_exact(bitsandbytes: ModuleType) -> None:
    bitsandbytes.nn.Linear4bit.support_avx512bf16_for_cpu = _NO_BF16_REPACK


class _PatchWhenImported:
    """A ``sys.meta_path`` finder that runs :func:`_keep_exact` right after ``import bitsandbytes``.

    It stays in place until that import: ``importlib.util.find_spec("bitsandbytes")`` (how
    transformers probes for it) asks the finders too, without importing.
    """

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != "bitsandbytes":
            return None
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if finder is not self else None
            if spec is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module: ModuleType) -> None:
            exec_module(module)
            _keep_exact(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)

        spec.loader.exec_module = exec_and_patch
        return spec


def require_exact_4bit_cpu_path(model: nn.Module) -> None:
    """Raise one line if bitsandbytes already repacked a 4-bit layer of ``model`` for its bf16 CPU kernel."""
    for name, module in model.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            raise RuntimeError(
                f"bitsandbytes repacked the 4-bit layer {name!r} for its bf16 CPU kernel (an eval forward ran "
                "before zopeft was imported) and that cannot be undone exactly: import zopeft before loading "
                "the model, then load it again"
            )


if "bitsandbytes" in sys.modules:
    _keep_exact(sys.modules["bitsandbytes"])
else:
    sys.meta_path.insert(0, _PatchWhenImported())
