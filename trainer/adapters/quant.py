"""The base model's quantization: a BitsAndBytesConfig from `adapter.quant`, and what the quantized weights cost.

Byte accounting of a 4-bit (NF4/FP4) weight of n elements, as bitsandbytes stores it (blocks of 64 on CPU and
CUDA): n/2 bytes of packed codes plus one absmax constant per block. Without double quantization each constant
is fp32: 4 + 32/64 = 4.5 bits per parameter. With double quantization the constants are themselves quantized
to 8 bits in blocks of 256, whose own constants stay fp32: 4 + 8/64 + 32/(64*256) = 4.127 bits per parameter,
0.373 bit less (the QLoRA paper's figure). Each tensor adds a few fixed bytes (code tables, an offset), which
`quantized_weight_bytes` counts too. LLM.int8 stores one int8 per element plus one fp32 scale per output row.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from trainer.dtypes import torch_dtype
from trainer.recipe.schema import QuantConfig

BLOCKSIZE = 64  # bitsandbytes' 4-bit block size on CPU and CUDA (ROCm uses 128)
NESTED_BLOCKSIZE = 256  # double quantization: block size of the 8-bit absmax constants


def storage_dtype(quant: QuantConfig, zero3: bool) -> str:
    """The container dtype of the packed 4-bit codes: `quant.storage_dtype`, or for `auto` the compute dtype under
    ZeRO-3 (DeepSpeed partitions a parameter as a flat tensor of its dtype, and the 4-bit layers must come back
    from a gather in the dtype bitsandbytes stored them in) and uint8 elsewhere. The codes are the same bytes in
    any container, so the choice never changes what is computed."""
    if quant.storage_dtype != "auto":
        return quant.storage_dtype
    return quant.compute_dtype if zero3 else "uint8"


def bnb_config(quant: QuantConfig, zero3: bool = False) -> Any:
    """transformers' BitsAndBytesConfig for `adapter.quant` (imported late: bitsandbytes is slow to import)."""
    from transformers import BitsAndBytesConfig

    if quant.type == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.type,
                              bnb_4bit_use_double_quant=quant.double_quant,
                              bnb_4bit_compute_dtype=torch_dtype(quant.compute_dtype),
                              bnb_4bit_quant_storage=torch_dtype(storage_dtype(quant, zero3)))


def bits_per_param(double_quant: bool, blocksize: int = BLOCKSIZE, nested_blocksize: int = NESTED_BLOCKSIZE) -> float:
    """Asymptotic storage of one 4-bit weight element, absmax constants included (fixed per-tensor bytes not)."""
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * nested_blocksize)
    return 4 + 32 / blocksize


def expected_4bit_bytes(numel: int, double_quant: bool, blocksize: int = BLOCKSIZE,
                        nested_blocksize: int = NESTED_BLOCKSIZE) -> int:
    """Bytes of codes + absmax constants of one 4-bit tensor (what `bits_per_param` counts), exact per tensor."""
    blocks = math.ceil(numel / blocksize)
    codes = math.ceil(numel / 2)
    if double_quant:
        return codes + blocks + 4 * math.ceil(blocks / nested_blocksize)
    return codes + 4 * blocks


def _tensor_bytes(t: torch.Tensor | None) -> int:
    return t.numel() * t.element_size() if t is not None else 0


def quant_state_bytes(state: Any) -> dict[str, int]:
    """Bytes of one bitsandbytes 4-bit QuantState: absmax, nested absmax and the fixed per-tensor extras."""
    out = {"absmax": _tensor_bytes(state.absmax), "nested_absmax": 0, "fixed": _tensor_bytes(state.code)}
    if state.nested:
        out["nested_absmax"] = _tensor_bytes(state.state2.absmax)
        out["fixed"] += _tensor_bytes(state.state2.code) + _tensor_bytes(state.offset)
    return out


def int8_scale(module: nn.Module) -> torch.Tensor | None:
    """The fp32 row scales of an LLM.int8 layer: on its weight until the first forward, then on its state."""
    scale = getattr(module.weight, "SCB", None)
    return scale if scale is not None else getattr(getattr(module, "state", None), "SCB", None)


def whole_bytes(p: torch.Tensor) -> int:
    """Bytes of a parameter's whole value, also when ZeRO-3 has partitioned it (its .data is then a placeholder)."""
    return int(getattr(p, "ds_numel", p.numel())) * p.element_size()


def quantized_weight_bytes(model: nn.Module) -> int:
    """Bytes of the quantized weights of `model` (codes and every quantization constant), whole also when ZeRO-3
    has partitioned the codes; 0 if none."""
    total = 0
    for module in model.modules():
        p = module._parameters.get("weight")  # its own parameter: peft's wrappers only forward `.weight`
        if p is None:
            continue
        kind, state = type(p).__name__, getattr(p, "quant_state", None)
        if kind == "Params4bit" and state is not None:
            total += whole_bytes(p) + sum(quant_state_bytes(state).values())
        elif kind == "Int8Params":
            total += _tensor_bytes(p.data) + _tensor_bytes(int8_scale(module))
    return total


def logical_numel(p: torch.Tensor) -> int:
    """Elements a parameter stands for: a packed 4-bit weight counts its original shape, not its bytes; a ZeRO-3
    partitioned parameter (an empty placeholder on every rank) its full size, ds_numel."""
    state = getattr(p, "quant_state", None)
    if type(p).__name__ == "Params4bit" and state is not None:
        return int(torch.Size(state.shape).numel())
    return int(getattr(p, "ds_numel", p.numel()))
