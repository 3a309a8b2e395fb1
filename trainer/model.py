"""Build the model the recipe asks for.

Order of the transforms (each needs the one before):
1. load: `from_pretrained` (hub id or directory) or `from_config` (architecture dict, from scratch), weights
   in fp32 (the master copy; autocast gives bf16/fp16 compute). For qlora the linear layers are quantized
   while loading (bitsandbytes through transformers' BitsAndBytesConfig): quantization has to see the
   original weights, so it cannot come later, and loading an 8B model unquantized first would not fit;
2. match the vocabulary to the tokenizer (a from-scratch config takes the tokenizer's size);
3. adapter runs: prepare for k-bit training (freeze the base, norms in fp32, inputs that require grad so
   checkpointed blocks have something to differentiate), then attach LoRA (peft). Preparing comes first
   because it freezes every parameter: done after attaching it would freeze the adapter too;
4. gradient checkpointing (non-reentrant), last, so it wraps the final modules, LoRA layers included.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase

from trainer import adapters
from trainer.config import AdapterConfig, ConfigError, ModelConfig
from trainer.precision import DTYPES
from trainer.typed import Problem

log = logging.getLogger(__name__)


def model_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The architecture: from the recipe's dict (vocab and special ids from the tokenizer) or the checkpoint."""
    if cfg.config is None:
        return AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code,
                                          revision=cfg.revision)
    arch = dict(cfg.config)
    model_type = arch.pop("model_type")
    vocab = len(tokenizer)
    given = arch.get("vocab_size")
    if given is not None and given < vocab:
        raise ConfigError([Problem("model.config.vocab_size", given, f"smaller than the tokenizer's {vocab} "
                                   f"tokens; remove it (it defaults to the tokenizer's size) or set >= {vocab}")])
    arch.setdefault("vocab_size", vocab)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        arch.setdefault(name, getattr(tokenizer, name))
    try:
        return AutoConfig.for_model(model_type, **arch)
    except ValueError as e:
        raise ConfigError([Problem("model.config.model_type", model_type, f"{e}".splitlines()[0])]) from None


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int,
                adapter: AdapterConfig | None = None, precision: str = "fp32",
                device: torch.device | None = None, master_weights: bool = True) -> nn.Module:
    """The causal LM in fp32 on the CPU (a qlora base: quantized on `device`), vocabulary matched, adapters
    attached, checkpointing applied; the engine moves it."""
    adapter = adapter or AdapterConfig()
    config = model_config(cfg, tokenizer)
    extra: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        extra["attn_implementation"] = cfg.attn_implementation
    if cfg.config is None:
        load = adapters.load_kwargs(adapter, precision, device or torch.device("cpu"))
        if not master_weights and adapter.type == "none":
            load["dtype"] = DTYPES[precision]  # the model itself in bf16: no fp32 master copy
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, config=config, revision=cfg.revision,
                                                     **load, **extra)
    else:
        torch.manual_seed(seed)  # every rank builds the same initial weights
        dtype = torch.float32 if master_weights else DTYPES[precision]
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **extra)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings and adapter.type != "none":
        rows = model.get_input_embeddings().num_embeddings
        raise ConfigError([Problem("model.tokenizer", cfg.tokenizer, f"has {len(tokenizer)} tokens but the base "
                                   f"model's embeddings have {rows} rows: adapters freeze the embeddings, so the "
                                   f"{len(tokenizer) - rows} new token(s) would keep random vectors; use a tokenizer "
                                   "that fits the model's vocabulary")])
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        log.info("resizing embeddings %d -> %d to fit the tokenizer",
                 model.get_input_embeddings().num_embeddings, len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))
    if adapter.type != "none":
        model = adapters.apply(model, adapter, seed=seed, gradient_checkpointing=cfg.gradient_checkpointing)
        log.info("adapter: %s", adapters.describe(model, adapter))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    _, n = adapters.parameter_counts(model)  # a packed 4-bit weight counts the elements it stands for
    log.info("model: %s, %.2fM parameters%s", type(model).__name__, n / 1e6,
             ", gradient checkpointing" if cfg.gradient_checkpointing else "")
    return model
