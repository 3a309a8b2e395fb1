"""LoRA and QLoRA: glue over peft (adapters) and bitsandbytes (4-bit / 8-bit base weights). No LoRA layer or
quantization kernel is written here; this package decides how the libraries are called and in which order.

Used by:
- model.py: `load_kwargs` (quantization config and dtype for `from_pretrained`), then `apply` (freeze and
  prepare the base, attach the adapter), then `describe` for the log line;
- engines: `is_adapted`, `save_adapter` / `load_adapter` (a checkpoint of an adapter run holds only the
  adapter, in peft's own format, under ADAPTER_DIR);
- checks.py: `targets.target_problems` (module names checked on a meta-device model, before any loading);
- export.py: `merge.merged_model`;
- checkpoint.py, loop.py, export.py, chat.py: `base_identity` (which base an adapter was trained on, recorded in
  its checkpoints and compared whenever the base is read again).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from trainer.adapters.experts import describe_experts
from trainer.adapters.lora import (adapters_disabled, attach, is_adapted, load_adapter, parameter_counts,
                                   prepare_frozen, save_adapter)
from trainer.adapters.quant import bits_per_param, bnb_config, quantized_weight_bytes
from trainer.dtypes import torch_dtype
from trainer.recipe.schema import AdapterConfig

log = logging.getLogger(__name__)


def _drop_optional_kernel_notice(record: logging.LogRecord) -> bool:
    """bitsandbytes' CPU backend warns at import that an optional kernel package (fetched from a hub) is
    missing; its built-in CPU kernels are used instead, so the warning only alarms users."""
    return "kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_optional_kernel_notice)

ADAPTER_DIR = "adapter"  # inside a checkpoint: a peft adapter directory


def load_kwargs(adapter: AdapterConfig, precision: str, device: torch.device) -> dict[str, Any]:
    """`from_pretrained` arguments for the base of a run. Full fine-tuning keeps fp32 master weights; an
    adapter run holds its frozen weights in the precision's dtype, and qlora quantizes the linear layers while
    loading, straight onto this rank's device (quantizing an 8B model on the CPU first would take minutes)."""
    if adapter.type == "none":
        return {"dtype": torch.float32}
    kwargs: dict[str, Any] = {"dtype": torch_dtype(precision)}
    if adapter.type == "qlora":
        kwargs["quantization_config"] = bnb_config(adapter.quant)
        kwargs["device_map"] = {"": device}
    return kwargs


def apply(model: nn.Module, adapter: AdapterConfig, *, seed: int, gradient_checkpointing: bool) -> nn.Module:
    """Prepare the loaded (maybe quantized) base for training adapters, then attach them (a peft model)."""
    prepare_frozen(model, gradient_checkpointing)
    return attach(model, adapter, seed)


def describe(model: nn.Module, adapter: AdapterConfig) -> str:
    """One log line: trainable vs total parameters, and what the quantized base weights take."""
    trainable, total = parameter_counts(model)
    text = (f"{adapter.type} r={adapter.rank} alpha={adapter.alpha:g}{' DoRA' if adapter.use_dora else ''}: "
            f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / max(total, 1):.3f}%)")
    qbytes = quantized_weight_bytes(model)
    if qbytes:
        q = adapter.quant
        text += f"; quantized base weights {qbytes / 2**20:.2f} MiB ({q.type}"
        if q.type != "int8":
            bits = bits_per_param(q.double_quant)
            text += f", double quant {'on' if q.double_quant else 'off'}: {bits:.3f} bits/param"
        text += ")"
    experts = describe_experts(model)
    return f"{text}; {experts}" if experts else text


__all__ = ["ADAPTER_DIR", "adapters_disabled", "load_kwargs", "apply", "describe", "is_adapted", "save_adapter",
           "load_adapter", "parameter_counts", "quantized_weight_bytes", "bnb_config"]
