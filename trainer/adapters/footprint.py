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
from typing import Any

import torch
from torch import nn

from trainer import int8_weights
from trainer.adapters.quant import expected_4bit_bytes, quantized_weight_bytes
from trainer.adapters.targets import find_targets
from trainer.dtypes import torch_dtype
from trainer.schema import AdapterConfig

BNB_MIN_8BIT_SIZE = 4096


def optimizer_state_bytes(name: str, numels: list[int]) -> int:
    """State of `name` over tensors of these sizes."""
    if name in ("adamw8bit", "paged_adamw8bit"):
        return sum(8 * n if n < BNB_MIN_8BIT_SIZE else 2 * n + 2 * 4 * math.ceil(n / 256) + 2 * 256 * 4
                   for n in numels)
    if name == "adamw":
        return sum(8 * n + 4 for n in numels)  # two fp32 moments and a float32 step tensor
    raise ValueError(f"no state formula for optimizer {name!r}")


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _base_weight_bytes(meta: nn.Module, adapter: AdapterConfig, precision: str) -> int:
    """Frozen base of an adapter run: quantized linear layers (not the head), the rest by dtype."""
    head = meta.get_output_embeddings()
    frozen = torch_dtype(precision).itemsize
    total, seen = 0, set()
    for module in meta.modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen:  # tied embeddings are one tensor
                continue
            seen.add(id(p))
            quantized = adapter.type == "qlora" and isinstance(module, nn.Linear) and module is not head \
                and p is module.weight
            if quantized and adapter.quant.type == "int8":
                total += p.numel() + 4 * p.shape[0]
            elif quantized:
                total += expected_4bit_bytes(p.numel(), adapter.quant.double_quant)
            else:
                total += p.numel() * (4 if _is_norm(module) else frozen)
    return total


def predicted(meta: nn.Module, adapter: AdapterConfig, precision: str, optimizer: str) -> dict[str, int]:
    """Model-state bytes of a run, from the shapes of `meta` (a model on the meta device)."""
    if adapter.type == "none":
        numels = [p.numel() for p in meta.parameters()]
        return {"weights": 4 * sum(numels), "grads": 4 * sum(numels),
                "optimizer": optimizer_state_bytes(optimizer, numels)}
    lora = []
    for t in find_targets(meta, adapter.target_modules):
        lora += [adapter.rank * t.in_features, t.out_features * adapter.rank]
        if adapter.use_dora:
            lora.append(t.out_features)
    fixed_4bit = 0
    if adapter.type == "qlora" and adapter.quant.type != "int8":
        # code table per tensor (16 fp32), with double quant also the 256-entry table and offset of level two
        per = 16 * 4 + (256 * 4 + 4 if adapter.quant.double_quant else 0)
        head = meta.get_output_embeddings()
        fixed_4bit = per * sum(1 for m in meta.modules() if isinstance(m, nn.Linear) and m is not head)
    return {"weights": _base_weight_bytes(meta, adapter, precision) + fixed_4bit + 4 * sum(lora),
            "grads": 4 * sum(lora), "optimizer": optimizer_state_bytes(optimizer, lora)}


def _tensor_bytes(t: Any) -> int:
    return t.numel() * t.element_size() if torch.is_tensor(t) else 0


def _state_bytes(value: Any) -> int:
    if isinstance(value, dict):
        return sum(_state_bytes(v) for v in value.values())
    return _tensor_bytes(value)


def measured(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Model-state bytes held by real tensors (4-bit weights with their quantization state), after a step."""
    weights, seen = quantized_weight_bytes(model), set()
    for p in model.parameters():
        if id(p) not in seen and type(p).__name__ not in ("Params4bit", "Int8Params"):
            weights += int8_weights.weight_bytes(p.data)  # an INT8 weight: its values and scales
        seen.add(id(p))
    grads = sum(_tensor_bytes(p.grad) for p in model.parameters() if p.grad is not None)
    opt = sum(_state_bytes(s) for s in optimizer.state.values())
    return {"weights": weights, "grads": grads, "optimizer": opt}
