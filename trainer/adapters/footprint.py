"""Model-state bytes (weights, gradients, optimizer state) of full fine-tuning, LoRA and QLoRA, two ways:
`predicted` from shapes alone (a meta-device model, so an 8B model costs nothing to plan), and `measured` from
the real tensors of a built model and optimizer. The benchmark checks one against the other on a small model
and then trusts the prediction where the real tensors would not fit.

The rules, as the code in this package and bitsandbytes apply them:
- full fine-tune: fp32 weights (master copy), fp32 gradients, AdamW 2 x fp32 moments + a step counter;
- adapter runs: quantized linear weights (quant.py's accounting) or frozen weights in the precision dtype,
  norm scales in fp32, LoRA A (r x in) and B (out x r) in fp32 with fp32 gradients;
- AdamW8bit keeps tensors under 4096 elements in fp32 (8 B/param); larger ones get two uint8 moments, one fp32
  absmax per 256 elements for each, and two 256-entry fp32 code tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trainer.model import int8_weights
from trainer.adapters.lora import is_norm
from trainer.adapters.quant import expected_4bit_bytes, quant_state_bytes, quantized_weight_bytes
from trainer.adapters.targets import find_targets
from trainer.dtypes import torch_dtype
from trainer.model.causal_lm import CausalLM
from trainer.recipe.schema import AdapterConfig

BNB_MIN_8BIT_SIZE = 4096


def optimizer_state_bytes(name: str, numels: list[int]) -> int:
    """State of `name` over tensors of these sizes."""
    if name in ("adamw8bit", "paged_adamw8bit"):
        return sum(8 * n if n < BNB_MIN_8BIT_SIZE else 2 * n + 2 * 4 * math.ceil(n / 256) + 2 * 256 * 4
                   for n in numels)
    if name == "adamw":
        return sum(8 * n + 4 for n in numels)  # two fp32 moments and a float32 step tensor
    raise ValueError(f"no state formula for optimizer {name!r}")


@dataclass(frozen=True)
class FrozenTensor:
    """One frozen tensor of an adapter run's base as it is stored: `elements` of `itemsize` bytes (a 4-bit weight:
    its packed codes, two per byte, in the storage dtype), plus the quantization constants bitsandbytes keeps
    beside it (absmax, code tables; 0 for a tensor that is not quantized)."""

    name: str
    elements: int
    itemsize: int
    constants: int = 0

    @property
    def stored(self) -> int:
        return self.elements * self.itemsize


def _fixed_4bit_bytes(double_quant: bool) -> int:
    """Per-tensor extras of a 4-bit weight: its code table (16 fp32), with double quant also the 256-entry table
    and the offset of level two."""
    return 16 * 4 + (256 * 4 + 4 if double_quant else 0)


def _quantized(name: str, p: torch.Tensor, adapter: AdapterConfig, storage: str) -> FrozenTensor:
    """A quantized linear weight: LLM.int8 (one int8 per element and an fp32 scale per output row) or 4-bit codes
    packed into `storage` elements as bitsandbytes allocates them ((n + 1) // (2 x itemsize))."""
    numel = p.numel()
    if adapter.quant.type == "int8":
        return FrozenTensor(name, numel, 1, 4 * p.shape[0])
    itemsize = 1 if storage == "uint8" else torch_dtype(storage).itemsize
    dq = adapter.quant.double_quant
    constants = expected_4bit_bytes(numel, dq) - math.ceil(numel / 2) + _fixed_4bit_bytes(dq)
    return FrozenTensor(name, (numel + 1) // (2 * itemsize), itemsize, constants)


def frozen_tensors(meta: CausalLM, adapter: AdapterConfig, precision: str,
                   storage: str = "uint8") -> list[FrozenTensor]:
    """Every frozen tensor of an adapter run's base (tied ones once), from the shapes of `meta`: quantized linear
    layers (not the head) in `storage`, norm scales in fp32, the rest in the precision's dtype."""
    head = meta.get_output_embeddings()
    frozen = torch_dtype(precision).itemsize
    out, seen = [], set()
    for module_name, module in meta.named_modules():
        for key, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # tied embeddings are one tensor
                continue
            seen.add(id(p))
            name = f"{module_name}.{key}" if module_name else key
            quantized = adapter.type == "qlora" and isinstance(module, nn.Linear) and module is not head \
                and p is module.weight
            if quantized:
                out.append(_quantized(name, p, adapter, storage))
            else:
                out.append(FrozenTensor(name, p.numel(), 4 if is_norm(module) else frozen))
    return out


def lora_numels(meta: nn.Module, adapter: AdapterConfig) -> list[int]:
    """Elements of every trainable LoRA tensor: A (r x in) and B (out x r) per adapted module, and DoRA's magnitude
    vector (out)."""
    lora = []
    for t in find_targets(meta, adapter.target_modules, adapter.target_experts):
        lora += [adapter.rank * t.in_features, t.out_features * adapter.rank]
        if adapter.use_dora:
            lora.append(t.out_features)
    return lora


def predicted(meta: nn.Module, adapter: AdapterConfig, precision: str, optimizer: str) -> dict[str, int]:
    """Model-state bytes of a run, from the shapes of `meta` (a model on the meta device)."""
    if adapter.type == "none":
        numels = [p.numel() for p in meta.parameters()]
        return {"weights": 4 * sum(numels), "grads": 4 * sum(numels),
                "optimizer": optimizer_state_bytes(optimizer, numels)}
    lora = lora_numels(meta, adapter)
    base = sum(t.stored + t.constants for t in frozen_tensors(meta, adapter, precision))
    return {"weights": base + 4 * sum(lora), "grads": 4 * sum(lora),
            "optimizer": optimizer_state_bytes(optimizer, lora)}


def _tensor_bytes(t: Any) -> int:
    return t.numel() * t.element_size() if torch.is_tensor(t) else 0


def _state_bytes(value: Any) -> int:
    if isinstance(value, dict):
        return sum(_state_bytes(v) for v in value.values())
    return _tensor_bytes(value)


def held_frozen_bytes(model: CausalLM) -> int:
    """Bytes of the frozen weights this process holds now, on any device: for a ZeRO-3 parameter its partition
    (ds_tensor) plus what its .data holds (an empty placeholder once partitioned; the whole tensor while gathered,
    or if it was never partitioned), and for a 4-bit weight its quantization constants, which bitsandbytes keeps
    beside the parameter where DeepSpeed does not see them."""
    total, seen = 0, set()
    for p in model.parameters():
        if p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        total += _tensor_bytes(getattr(p, "ds_tensor", None)) + _tensor_bytes(p.data)
        state = getattr(p, "quant_state", None)
        if type(p).__name__ == "Params4bit" and state is not None:
            total += sum(quant_state_bytes(state).values())
    return total


def measured(model: CausalLM, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Model-state bytes held by real tensors (4-bit weights with their quantization state), after a step."""
    weights, seen = quantized_weight_bytes(model), set()
    for p in model.parameters():
        if id(p) not in seen and type(p).__name__ not in ("Params4bit", "Int8Params"):
            weights += int8_weights.weight_bytes(p.data)  # an INT8 weight: its values and scales
        seen.add(id(p))
    grads = sum(_tensor_bytes(p.grad) for p in model.parameters() if p.grad is not None)
    opt = sum(_state_bytes(s) for s in optimizer.state.values())
    return {"weights": weights, "grads": grads, "optimizer": opt}
