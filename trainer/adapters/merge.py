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

import yaml

from trainer.adapters.quant import DTYPES
from trainer.config import AdapterConfig, Config, ModelConfig
from trainer.typed import Converter

log = logging.getLogger(__name__)


def load_base(model: ModelConfig, adapter: AdapterConfig, precision: str, device: torch.device) -> nn.Module:
    """The base model as an adapter run loads it: quantized for qlora, frozen weights in the precision dtype."""
    from transformers import AutoModelForCausalLM

    from trainer.adapters import load_kwargs

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
        base = base.dequantize(dtype=DTYPES[adapter.quant.compute_dtype])
    base = base.to(dtype)
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir), autocast_adapter_dtype=False)
    merged = peft_model.merge_and_unload(safe_merge=True)  # safe_merge: refuse to write a NaN weight
    merged.config.use_cache = True
    log.info("merged the adapter of %s into %s (%s)", adapter_dir, model.name_or_path, dtype)
    return merged


def saved_config(ckpt: Path) -> Config:
    """The recipe a checkpoint was saved under (typed, without the cross-checks: its data may be gone)."""
    raw = yaml.safe_load((ckpt / "config.yaml").read_text(encoding="utf-8")) or {}
    return Converter().build(Config, raw, "")


def write_adapter_export(ckpt: Path, out: Path, *, merge: bool, dtype: torch.dtype) -> None:
    """Into `out`: the checkpoint's peft adapter directory, or (merge) the merged plain transformers model."""
    from trainer.adapters import ADAPTER_DIR
    from trainer.checkpoint import CheckpointError

    if not merge:
        shutil.copytree(ckpt / ADAPTER_DIR, out)
        return
    cfg = saved_config(ckpt)
    base = cfg.model.name_or_path or ""
    looks_local = base.startswith(("/", ".", "~")) or Path(base).expanduser().exists()
    if looks_local and not Path(base).expanduser().is_dir():
        raise CheckpointError(f"--merge needs the base model the adapter was trained on: {base!r} (model.name_or_path "
                              f"in {ckpt / 'config.yaml'}) is not a directory; restore it, or export with "
                              "--adapter-only and merge where the base is")
    model = merged_model(ckpt / ADAPTER_DIR, cfg.model, cfg.adapter, cfg.precision.dtype, dtype)
    model.save_pretrained(out, safe_serialization=True)
