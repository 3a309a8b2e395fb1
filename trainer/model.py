"""Build the model the recipe asks for.

Order of the transforms (each needs the one before):
1. load: `from_pretrained` (hub id or directory) or `from_config` (architecture dict, from scratch), weights
   in fp32 (the master copy; autocast gives bf16/fp16 compute);
2. match the vocabulary to the tokenizer (a from-scratch config takes the tokenizer's size);
3. gradient checkpointing (non-reentrant), last, so it wraps the final modules.
Later transforms (4-bit loading, adapters) slot in between 1 and 3.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase

from trainer.config import ConfigError, ModelConfig
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


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> nn.Module:
    """The causal LM in fp32 on the CPU, vocabulary matched, checkpointing applied; the engine moves it."""
    config = model_config(cfg, tokenizer)
    extra: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        extra["attn_implementation"] = cfg.attn_implementation
    if cfg.config is None:
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, config=config, dtype=torch.float32,
                                                     revision=cfg.revision, **extra)
    else:
        torch.manual_seed(seed)  # every rank builds the same initial weights
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **extra)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        log.info("resizing embeddings %d -> %d to fit the tokenizer",
                 model.get_input_embeddings().num_embeddings, len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    n = sum(p.numel() for p in model.parameters())
    log.info("model: %s, %.2fM parameters%s", type(model).__name__, n / 1e6,
             ", gradient checkpointing" if cfg.gradient_checkpointing else "")
    return model
