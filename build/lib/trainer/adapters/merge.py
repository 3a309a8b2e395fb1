"""Exporting an adapter run: the peft adapter directory as is, or the adapter merged into a plain base model.

Merging into a 4-bit model would re-quantize the merged weights and lose the update in the rounding (peft
#2321). Instead the base is loaded exactly as in training (same quantization, so the same 4-bit values the
adapter was trained against), dequantized to the compute dtype (the values the 4-bit matmuls actually used),
cast to the export dtype, and only then merged with peft's `merge_and_unload`: W' = W + (alpha/r) * B @ A.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from trainer.adapters import ADAPTER_DIR, load_kwargs
from trainer.dtypes import torch_dtype
from trainer.errors import CheckpointError
from trainer.inference import for_inference
from trainer.paths import looks_local
from trainer.recipe import saved_recipe
from trainer.schema import AdapterConfig, ModelConfig

log = logging.getLogger(__name__)


def load_base(model: ModelConfig, adapter: AdapterConfig, precision: str, device: torch.device) -> nn.Module:
    """The base model as an adapter run loads it: quantized for qlora, frozen weights in the precision dtype."""
    from transformers import AutoModelForCausalLM

    extra = {"attn_implementation": model.attn_implementation} if model.attn_implementation else {}
    return AutoModelForCausalLM.from_pretrained(model.name_or_path, revision=model.revision,
                                                trust_remote_code=model.trust_remote_code,
                                                **load_kwargs(adapter, precision, device), **extra)


def merged_model(adapter_dir: Path, model: ModelConfig, adapter: AdapterConfig, precision: str,
                 dtype: torch.dtype) -> nn.Module:
    """A plain transformers model (no peft, no quantization) whose weights hold base + adapter, in `dtype`."""
    from peft import PeftModel

    base = load_base(model, adapter, precision, torch.device("cpu"))
    if adapter.type == "qlora":
        base = base.dequantize(dtype=torch_dtype(adapter.quant.compute_dtype))
    base = base.to(dtype)
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir), autocast_adapter_dtype=False)
    merged = peft_model.merge_and_unload(safe_merge=True)  # safe_merge: refuse to write a NaN weight
    for_inference(merged)
    log.info("merged the adapter of %s into %s (%s)", adapter_dir, model.name_or_path, dtype)
    return merged


def write_adapter_export(ckpt: Path, out: Path, *, merge: bool, dtype: torch.dtype) -> None:
    """Into `out`: the checkpoint's peft adapter directory, or (merge) the merged plain transformers model."""
    if not merge:
        shutil.copytree(ckpt / ADAPTER_DIR, out)
        return
    cfg = saved_recipe(ckpt / "config.yaml")
    base = cfg.model.name_or_path or ""
    if looks_local(base) and not Path(base).expanduser().is_dir():
        raise CheckpointError(f"--merge needs the base model the adapter was trained on: {base!r} (model.name_or_path "
                              f"in {ckpt / 'config.yaml'}) is not a directory; restore it, or export with "
                              "--adapter-only and merge where the base is")
    model = merged_model(ckpt / ADAPTER_DIR, cfg.model, cfg.adapter, cfg.precision.dtype, dtype)
    model.save_pretrained(out, safe_serialization=True)
