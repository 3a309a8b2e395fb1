"""Inference defaults for a model that is saved to be used (exports, a checkpoint's `hf/`), not trained."""

from __future__ import annotations


from trainer.model.causal_lm import CausalLM


def for_inference(model: CausalLM) -> CausalLM:
    """The KV cache on: training turns it off, and a saved `use_cache: false` makes generate() recompute every
    token (about 45x slower for 200 new tokens)."""
    model.config.use_cache = True
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.use_cache = True
    return model
