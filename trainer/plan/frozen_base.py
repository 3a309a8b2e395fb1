"""The frozen base of an adapter run (LoRA: weights in the precision dtype; QLoRA: 4-bit codes in their storage
dtype with their quantization constants), tensor by tensor, by the adapter package's own accounting
(adapters/footprint.py). Engines that partition it (DeepSpeed ZeRO-3) count their share from these tensors."""

from __future__ import annotations

from trainer.adapters.footprint import FrozenTensor, frozen_tensors
from trainer.adapters.quant import storage_dtype
from trainer.plan.items import Item, Kind, Shapes
from trainer.recipe.resolved import ResolvedRun


def base_tensors(run: ResolvedRun, sh: Shapes) -> list[FrozenTensor]:
    """The frozen tensors of an adapter run's base as this run stores them (4-bit codes in their storage dtype)."""
    a = run.recipe.adapter
    return frozen_tensors(sh.meta, a, run.recipe.precision.dtype, storage_dtype(a.quant, zero3=run.execution.zero3))


def base_label(run: ResolvedRun) -> str:
    """How the base is stored: '4-bit nf4 with double quant', 'int8', 'bf16'."""
    a = run.recipe.adapter
    if a.type == "qlora" and a.quant.type != "int8":
        return "4-bit " + a.quant.type + (" with double quant" if a.quant.double_quant else "")
    return "int8" if a.type == "qlora" else run.recipe.precision.dtype


def whole_base_bytes(frozen: list[FrozenTensor]) -> int:
    """Every frozen tensor with its quantization constants: what a rank holds when nothing partitions the base."""
    return sum(t.stored + t.constants for t in frozen)


def whole_base_item(run: ResolvedRun, frozen: list[FrozenTensor]) -> Item:
    return Item(Kind.WEIGHTS, f"base weights (frozen, {base_label(run)}; norms fp32)", whole_base_bytes(frozen))
