"""Exporting an adapter run: the peft adapter directory as is, or the adapter merged into a plain base model.

Merging into a 4-bit model would re-quantize the merged weights and lose the update in the rounding (peft
#2321). Instead the base is loaded exactly as in training (same quantization, so the same 4-bit values the
adapter was trained against), dequantized to the compute dtype (the values the 4-bit matmuls actually used),
cast to the export dtype, and only then merged with peft's `merge_and_unload`: W' = W + (alpha/r) * B @ A. The
base is only read; the merged model is a new one, written to the export's folder.

The base read must be the one the adapter was trained on (adapters/base_identity.py): merging into another is
refused unless forced, and generate/chat warn.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from trainer.adapters import ADAPTER_DIR, bnb_config, load_kwargs
from trainer.adapters import streamed
from trainer.adapters.experts import fuse_experts, splits_experts
from trainer.adapters.base_identity import Identity, describe, identify, mismatch, mismatch_line
from trainer.adapters.lora import no_cpu_repacking
from trainer.dtypes import torch_dtype
from trainer.errors import CheckpointError
from trainer.model.causal_lm import CausalLM
from trainer.model.inference import for_inference
from trainer.paths import looks_local
from trainer.recipe.read import saved_recipe
from trainer.recipe.schema import AdapterConfig, ModelConfig

log = logging.getLogger(__name__)


def load_base(model: ModelConfig, adapter: AdapterConfig, precision: str, device: torch.device) -> CausalLM:
    """The base model as an adapter run loads it: quantized for qlora, frozen weights in the precision dtype, a
    mixture-of-experts base with its experts split (and quantized) as in training (adapters/experts.py)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    assert model.name_or_path is not None, "an adapter run names its base (validated)"
    extra = {"attn_implementation": model.attn_implementation} if model.attn_implementation else {}
    config = AutoConfig.from_pretrained(model.name_or_path, revision=model.revision,
                                        trust_remote_code=model.trust_remote_code, **extra)
    if splits_experts(adapter, config):
        folder = streamed.checkpoint_folder(model.name_or_path, model.revision)
        quantization = bnb_config(adapter.quant) if adapter.type == "qlora" else None
        base = streamed.load_base(folder, config, quantization, torch_dtype(precision), device, None,
                                  split_experts=True, trust_remote_code=model.trust_remote_code)
    else:
        base = AutoModelForCausalLM.from_pretrained(model.name_or_path, revision=model.revision,
                                                    trust_remote_code=model.trust_remote_code,
                                                    **load_kwargs(adapter, precision, device), **extra)
    no_cpu_repacking(base)
    return base


def merged_model(adapter_dir: Path, model: ModelConfig, adapter: AdapterConfig, precision: str,
                 dtype: torch.dtype) -> CausalLM:
    """A plain transformers model (no peft, no quantization) whose weights hold base + adapter, in `dtype`."""
    from peft import PeftModel

    base = load_base(model, adapter, precision, torch.device("cpu"))
    if adapter.type == "qlora":
        base = base.dequantize(dtype=torch_dtype(adapter.quant.compute_dtype))
    base = base.to(dtype)
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir), autocast_adapter_dtype=False)
    merged = peft_model.merge_and_unload(safe_merge=True)  # safe_merge: refuse to write a NaN weight
    fuse_experts(merged)  # a mixture-of-experts base: transformers' own layout again
    for_inference(merged)
    log.info("merged the adapter of %s with its base %s (read only, unchanged) in %s", adapter_dir,
             model.name_or_path, dtype)
    return merged


BASE_FILE = "base_model.json"  # beside an --adapter-only export: the identity of the base it was trained on
ADAPTER_CONFIG = "adapter_config.json"


def trained_base(adapter_dir: Path, model: ModelConfig) -> ModelConfig:
    """The recipe's model section with the base found from any working directory: a relative local path is
    replaced by the absolute one the adapter's config recorded when it was saved (lora.save_adapter)."""
    try:
        recorded = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return model
    if isinstance(recorded, str) and Path(recorded).is_absolute() and Path(recorded).is_dir():
        return model.model_copy(update={"name_or_path": recorded})
    return model


def check_merge_base(ckpt: Path, recorded: Identity | None, current: Identity, force: bool) -> None:
    """--merge reads the base the adapter was trained on, or is refused (--force: merged anyway, warned)."""
    if recorded is None:
        log.warning("%s records no identity of its base model (written before they were recorded): cannot check "
                    "that %s is the base the adapter was trained on", ckpt, describe(current))
        return
    why = mismatch(recorded, current)
    if why is None:
        return
    if not force:
        raise CheckpointError(f"--merge refused: the base model found now is not the one the adapter of {ckpt} was "
                              f"trained on:\n{why}\nrestore that base where model.name_or_path (in "
                              f"{ckpt / 'config.yaml'}) points, or add --force to merge with this one anyway "
                              "(logged as a warning)")
    log.warning("--force: merging the adapter of %s with another base model than it was trained on:\n%s", ckpt, why)


def warn_if_other_base(adapter: Path, recorded: Identity | None, current: Identity) -> None:
    """generate/chat: one warning line when the base found is not the one the adapter was trained on."""
    line = mismatch_line(recorded, current) if recorded is not None else None
    if line:
        log.warning("the base model is not the one the adapter %s was trained on: %s", adapter, line)


def write_adapter_export(ckpt: Path, out: Path, *, merge: bool, dtype: torch.dtype, recorded: Identity | None,
                         force: bool = False) -> None:
    """Into `out`: the checkpoint's peft adapter directory (with the identity of its base, `recorded`), or (merge)
    the merged plain transformers model, made from the base, which is only read."""
    if not merge:
        shutil.copytree(ckpt / ADAPTER_DIR, out)
        if recorded is not None:
            (out / BASE_FILE).write_text(json.dumps(recorded, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return
    cfg = saved_recipe(ckpt / "config.yaml")
    model = trained_base(ckpt / ADAPTER_DIR, cfg.model)
    base = model.name_or_path or ""
    if looks_local(base) and not Path(base).expanduser().is_dir():
        raise CheckpointError(f"--merge needs the base model the adapter was trained on: {base!r} (model.name_or_path "
                              f"in {ckpt / 'config.yaml'}) is not a directory; restore it, or export with "
                              "--adapter-only and merge where the base is")
    check_merge_base(ckpt, recorded, identify(base, model.revision), force)
    merged = merged_model(ckpt / ADAPTER_DIR, model, cfg.adapter, cfg.precision.dtype, dtype)
    merged.save_pretrained(out, safe_serialization=True)
