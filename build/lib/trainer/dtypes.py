"""The recipe's dtype names and the torch dtypes they stand for (one table for precision, quantization and
DeepSpeed)."""

from __future__ import annotations

import torch

TORCH_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                                        "uint8": torch.uint8}


def torch_dtype(name: str) -> torch.dtype:
    return TORCH_DTYPES[name]
